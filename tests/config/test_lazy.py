"""Tests for d2engine.config.lazy (LazyConfig, LazyCall) and d2engine.config.instantiate."""

from __future__ import annotations

import builtins
import collections
import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from d2engine.config import InstantiationError, LazyCall, LazyConfig, instantiate, locate
from d2engine.config.instantiate import target_to_string


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def _fail(**kwargs: object) -> None:
    raise RuntimeError("boom")


@dataclasses.dataclass
class _Point:
    x: int = 0
    y: int = 0


# --------------------------------------------------------------------------- LazyCall
def test_lazycall_builds_an_editable_config() -> None:
    cfg = LazyCall(torch.nn.Linear)(in_features=3, out_features=2)
    assert isinstance(cfg, DictConfig)
    assert cfg._target_ is torch.nn.Linear and cfg.in_features == 3
    cfg.out_features = 4
    layer = instantiate(cfg)
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 4
    assert LazyCall("torch.nn.ReLU")()._target_ == "torch.nn.ReLU"
    point = LazyCall(_Point)(x=1)
    assert point._target_ == f"{__name__}._Point"  # dataclass types are kept as names
    assert instantiate(point) == _Point(x=1)


def test_lazycall_errors() -> None:
    with pytest.raises(TypeError, match=r"target must be a callable or an import path.*got int"):
        LazyCall(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target is given to LazyCall itself"):
        LazyCall(dict)(_target_="x")


# ------------------------------------------------------------------------ instantiate
def test_instantiate_is_recursive() -> None:
    cfg = OmegaConf.create({"model": {"_target_": "torch.nn.Sequential"}})
    tree = {
        "seq": LazyCall(collections.OrderedDict)(
            a=LazyCall("torch.nn.Linear")(in_features=2, out_features=2),
        ),
        "layers": [LazyCall(torch.nn.ReLU)(), {"inner": LazyCall("builtins.dict")(k=1)}, 5],
        "plain": {"x": 1, "y": [1, 2]},
        "scalar": "keep",
    }
    built = instantiate(OmegaConf.create(tree, flags={"allow_objects": True}))
    assert isinstance(built["seq"], collections.OrderedDict)
    assert isinstance(built["seq"]["a"], torch.nn.Linear)
    assert isinstance(built["layers"][0], torch.nn.ReLU)
    assert built["layers"][1] == {"inner": {"k": 1}}
    assert built["layers"][2] == 5
    assert built["plain"] == {"x": 1, "y": [1, 2]} and built["scalar"] == "keep"
    assert isinstance(instantiate(cfg.model), torch.nn.Sequential)
    assert instantiate(7) == 7 and instantiate((LazyCall(dict)(a=1),)) == ({"a": 1},)
    obj = object()
    assert instantiate({"value": obj})["value"] is obj  # objects pass through unchanged


def test_instantiate_structured_dataclass_config() -> None:
    structured = OmegaConf.structured(_Point(x=2))
    assert instantiate(structured) == _Point(x=2, y=0)


def test_instantiate_errors_name_key_and_target() -> None:
    missing = {"model": {"act": {"_target_": "torch.nn.NoSuchLayer"}}}
    with pytest.raises(
        ImportError,
        match=r"cfg.model.act: _target_ 'torch.nn.NoSuchLayer'.*no attribute 'NoSuchLayer'",
    ):
        instantiate(missing)
    with pytest.raises(
        ImportError, match=r"cfg.opt: _target_ 'nopkg_zz.Thing'.*no module 'nopkg_zz'"
    ):
        instantiate({"opt": {"_target_": "nopkg_zz.Thing"}})
    with pytest.raises(TypeError, match=r"cfg.layers\[1\]: _target_ must be a callable.*got int"):
        instantiate({"layers": [1, {"_target_": 3}]})
    with pytest.raises(
        InstantiationError,
        match=r"cfg.model with _target_=torch.nn.Linear\(\*\*\{in_features, wrong\}\).*TypeError",
    ) as info:
        instantiate({"model": LazyCall("torch.nn.Linear")(in_features=2, wrong=1)})
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(
        InstantiationError, match=rf"cfg with _target_={__name__}._fail.*RuntimeError: boom"
    ):
        instantiate(LazyCall(_fail)())


def test_locate_and_target_to_string() -> None:
    assert locate("torch.nn.Linear") is torch.nn.Linear
    assert locate("dict") is dict and locate("builtins.len") is builtins.len
    assert locate("collections.OrderedDict.fromkeys") == collections.OrderedDict.fromkeys
    with pytest.raises(ImportError, match="expected a dotted import path"):
        locate("")
    assert target_to_string(torch.nn.modules.linear.Linear) == "torch.nn.Linear"
    assert target_to_string(_Point) == f"{__name__}._Point"
    with pytest.raises(ValueError, match="lambda or a class defined inside a function"):
        target_to_string(lambda: 0)


# ------------------------------------------------------------------------ LazyConfig
@pytest.fixture
def config_tree(tmp_path: Path) -> Path:
    _write(
        tmp_path / "common" / "optim.py",
        """
        from d2engine.config import LazyCall as L
        optimizer = L("torch.optim.SGD")(params=None, lr=0.1, momentum=0.9)
        train = dict(max_iter=100, output_dir="./out", steps=[10, 20])
        """,
    )
    _write(
        tmp_path / "common" / "models" / "mlp.py",
        """
        import torch
        from d2engine.config import LazyCall as L
        model = L(torch.nn.Linear)(in_features=4, out_features=2)
        """,
    )
    _write(tmp_path / "common" / "data.py", "dataloader = {'batch_size': 8}\n")
    _write(
        tmp_path / "exp" / "main.py",
        """
        import os
        from ..common.optim import optimizer, train
        from ..common.models.mlp import model
        from ..common import data
        train.max_iter = 200
        dataloader = data.dataloader
        _private = {"hidden": True}
        helper = os.path.join
        values = [1, 2]
        """,
    )
    return tmp_path


def test_load_python_config_with_relative_imports(config_tree: Path) -> None:
    cfg = LazyConfig.load(str(config_tree / "exp" / "main.py"))
    assert set(cfg) == {"optimizer", "train", "model", "dataloader", "values"}
    assert cfg.train.max_iter == 200 and cfg.train.steps == [10, 20]
    assert cfg.dataloader.batch_size == 8
    assert isinstance(instantiate(cfg.model), torch.nn.Linear)
    # Each load executes the files again: no state is shared between loads.
    again = LazyConfig.load(str(config_tree / "common" / "optim.py"))
    assert again.train.max_iter == 100
    assert builtins.__import__ is __import__  # the import hook is removed afterwards
    lr, train = LazyConfig.load(
        str(config_tree / "common" / "optim.py"), keys=("optimizer", "train")
    )
    assert lr.lr == 0.1 and train.max_iter == 100
    assert (
        LazyConfig.load(str(config_tree / "common" / "data.py"), keys="dataloader").batch_size == 8
    )


def test_load_errors(config_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loads .py, .yaml or .yml files.*merge_from_file"):
        LazyConfig.load(str(tmp_path / "cfg.json"))
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        LazyConfig.load(str(tmp_path / "nothere.py"))
    with pytest.raises(KeyError, match=r"has no top-level key 'nope'"):
        LazyConfig.load(str(config_tree / "common" / "data.py"), keys="nope")
    bad_import = _write(tmp_path / "bad.py", "from .missing import x\n")
    with pytest.raises(ImportError, match=r"missing.py does not exist, nor a directory"):
        LazyConfig.load(bad_import)
    no_name = _write(tmp_path / "no_name.py", "from .other.main import nothing\n")
    _write(tmp_path / "other" / "main.py", "x = {}\n")
    with pytest.raises(
        ImportError, match=r"Cannot import name 'nothing' from config file .*main.py"
    ):
        LazyConfig.load(no_name)
    cyc_a = _write(tmp_path / "cyc_a.py", "from .cyc_b import b\na = {}\n")
    _write(tmp_path / "cyc_b.py", "from .cyc_a import a\nb = {}\n")
    with pytest.raises(ImportError, match=r"cycle: .*cyc_a.py -> .*cyc_b.py -> .*cyc_a.py"):
        LazyConfig.load(cyc_a)
    assert builtins.__import__ is __import__


@pytest.mark.timeout(30)
def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb = _write(tmp_path / "bomb.yaml", "\n".join(levels) + "\n")
    with pytest.raises(ValueError, match=r"bomb\.yaml.*more than 1,000,000 values.*aliases"):
        LazyConfig.load(bomb)


def test_yaml_between_omegaconfs_bound_and_ours_is_not_called_a_tag(tmp_path: Path) -> None:
    # 20,000 expanded values: under our 1,000,000 bound, over omegaconf's own 10,000.
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 4)]
    levels.append("top: [*l3, *l3]")
    big = _write(tmp_path / "big.yaml", "\n".join(levels) + "\n")
    with pytest.raises(ValueError, match=r"big\.yaml: its YAML aliases expand to too many") as e:
        LazyConfig.load(big)
    assert "tag" not in str(e.value).split("(")[0]


def test_yaml_with_python_tag_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = _write(
        tmp_path / "evil.yaml", f"a: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ValueError, match=r"Refusing to load .*evil.yaml.*safe loader"):
        LazyConfig.load(evil)
    assert not marker.exists()


def test_save_and_load_round_trip(config_tree: Path, tmp_path: Path) -> None:
    cfg = LazyConfig.load(str(config_tree / "exp" / "main.py"))
    cfg.train.ref = "${train.max_iter}"  # interpolations survive unresolved
    path = str(tmp_path / "out" / "config.yaml")
    LazyConfig.save(cfg, path)
    text = Path(path).read_text()
    assert "_target_: torch.nn.Linear" in text and "!!python" not in text
    loaded = LazyConfig.load(path)
    assert loaded.train.ref == 200 and loaded.model._target_ == "torch.nn.Linear"
    assert loaded.train.max_iter == 200 and loaded.train.steps == [10, 20]
    assert isinstance(instantiate(loaded.model), torch.nn.Linear)
    LazyConfig.save({"a": {"b": 1}}, str(tmp_path / "plain.yaml"))
    assert LazyConfig.load(str(tmp_path / "plain.yaml")).a.b == 1


def test_save_keeps_going_on_values_yaml_cannot_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # detectron2's call form: a config holding an object and a lambda still saves.
    cfg = DictConfig(
        {"model": {"layers": [1, torch.nn.ReLU()]}, "f": LazyCall(lambda: 0)(), "n": 3},
        flags={"allow_objects": True},
    )
    path = tmp_path / "x.yaml"
    with caplog.at_level("WARNING", logger="d2engine.config.lazy"):
        LazyConfig.save(cfg, str(path))
    loaded = LazyConfig.load(str(path))
    assert loaded.n == 3 and loaded.model.layers[0] == 1
    assert loaded.model.layers[1].startswith("<not saved: ReLU")
    assert loaded.f._target_.startswith("<not saved: function")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # one warning for the whole save
    assert "cfg.model.layers[1]" in warnings[0].message and "cfg.f._target_" in warnings[0].message
    # the whole config is pickled next to the YAML (cloudpickle is a dev dependency)
    assert (tmp_path / "x.yaml.pkl").exists()
    import cloudpickle

    with open(tmp_path / "x.yaml.pkl", "rb") as f:
        assert cloudpickle.load(f).model.layers[1].__class__ is torch.nn.ReLU


def test_save_writes_classes_as_values_through_locate(tmp_path: Path) -> None:
    cfg = {
        "m": LazyCall(torch.nn.Sequential)(),
        "act": torch.nn.ReLU,
        "fn": torch.nn.functional.relu,
    }
    LazyConfig.save(cfg, str(tmp_path / "c.yaml"))
    loaded = LazyConfig.load(str(tmp_path / "c.yaml"))
    assert loaded.act == {"_target_": "d2engine.config.locate", "name": "torch.nn.ReLU"}
    assert instantiate(loaded.act) is torch.nn.ReLU
    assert instantiate(loaded.fn) is torch.nn.functional.relu
    assert not (tmp_path / "c.yaml.pkl").exists()  # nothing was lost: no pickle, no warning


def test_save_of_a_config_defining_its_own_classes_copies_the_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The shape of detectron2's "train an ImageNet classifier" lazy config: a model class and a
    # loader function defined in the config file itself, an object instance as a value.
    _write(tmp_path / "cfgs" / "common.py", "train = dict(max_iter=10, output_dir='out')\n")
    _write(tmp_path / "cfgs" / "extra.py", "extra = dict(k=1)\n")
    main = _write(
        tmp_path / "cfgs" / "exp" / "net.py",
        """
        import torch
        from torch import nn
        from d2engine.config import LazyCall as L, LazyConfig
        from d2engine.model_zoo import get_config
        from ..common import train
        extra = LazyConfig.load_rel("../extra.py", "extra")
        schedule = get_config("common/coco_schedule.py").lr_multiplier_1x

        class Net(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.fc = nn.Linear(width, 2)

        def build_loader(n):
            return list(range(n))

        model = L(Net)(width=4)
        dataloader = dict(train=L(build_loader)(n=3), head=nn.Identity())
        """,
    )
    cfg = LazyConfig.load(main)
    out = tmp_path / "run" / "config.yaml"
    with caplog.at_level("WARNING", logger="d2engine.config.lazy"):
        LazyConfig.save(cfg, str(out))
    text = out.read_text()
    assert "max_iter: 10" in text and "width: 4" in text
    copies = tmp_path / "run" / "config_sources"
    assert (copies / "exp" / "net.py").read_text() == Path(main).read_text()
    assert (copies / "common.py").exists()  # the whole load, relative imports included
    assert (copies / "extra.py").exists()  # and files read with load_rel
    assert not list(copies.rglob("coco_schedule.py"))  # a separate load (get_config) is not
    (warning,) = [r.message for r in caplog.records if r.levelname == "WARNING"]
    for key in ("cfg.model._target_", "cfg.dataloader.train._target_", "cfg.dataloader.head"):
        assert key in warning
    assert "config_sources" in warning
    assert isinstance(
        instantiate(LazyConfig.load(str(copies / "exp" / "net.py")).model), torch.nn.Module
    )


def test_load_keys_name_any_top_level_variable(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.py", "name = 'base'\nsize = 3\nd = {'a': 1}\n")
    assert LazyConfig.load(path, keys="name") == "base"
    assert LazyConfig.load(path, keys=("name", "size")) == ("base", 3)
    assert LazyConfig.load(path, keys="d").a == 1  # a dict comes back as a config
    assert set(LazyConfig.load(path)) == {"d"}  # without keys: the configs only


def test_to_py_renders_black_formatted_assignments() -> None:
    cfg = DictConfig(
        {
            "model": LazyCall(torch.nn.Linear)(in_features=4, out_features=2),
            "train": {"max_iter": 10, "output_dir": "o", "ref": "${train.max_iter}"},
            "optim": LazyCall(collections.OrderedDict)(
                a={"first": "aaaaaaaaaaaaaaaaaaaa", "second": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},
                b=LazyCall(torch.nn.Linear)(in_features=1000000000, out_features=2000000000),
            ),
        },
        flags={"allow_objects": True},
    )
    text = LazyConfig.to_py(cfg)
    assert text == (
        "cfg.model = torch.nn.Linear(in_features=4, out_features=2)\n"
        "cfg.optim = collections.OrderedDict(\n"
        '    a={"first": "aaaaaaaaaaaaaaaaaaaa", "second": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},\n'
        "    b=torch.nn.Linear(in_features=1000000000, out_features=2000000000),\n"
        ")\n"
        "cfg.train.max_iter = 10\n"
        'cfg.train.output_dir = "o"\n'
        "cfg.train.ref = 10\n"
    )
    assert LazyConfig.to_py({"x": {"y": 1}}, prefix="c.") == "c.x.y = 1\n"


def test_relative_import_errors_say_relative_import(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.py", "from .does_not_exist import x\n")
    with pytest.raises(ImportError, match=r"relative import.*does_not_exist.py does not exist"):
        LazyConfig.load(bad)


def test_apply_overrides(config_tree: Path) -> None:
    cfg = LazyConfig.load(str(config_tree / "exp" / "main.py"))
    out = LazyConfig.apply_overrides(
        cfg,
        [
            "train.max_iter=5",
            "optimizer.lr=1e-3",
            "train.steps=[1, 2, 3]",
            "train.output_dir=/tmp/run",
            "train.flag=true",
            "train.none=null",
            "model.out_features=(3)",
            "train.new_key=hello world",
            "model._target_=torch.nn.Bilinear",
        ],
    )
    assert out is cfg
    assert cfg.train.max_iter == 5 and cfg.optimizer.lr == 0.001
    assert cfg.train.steps == [1, 2, 3] and cfg.train.output_dir == "/tmp/run"
    assert cfg.train.flag is True and cfg.train.none is None
    assert cfg.model.out_features == 3 and cfg.train.new_key == "hello world"
    assert cfg.model._target_ == "torch.nn.Bilinear"


def test_apply_overrides_errors(config_tree: Path) -> None:
    cfg = LazyConfig.load(str(config_tree / "exp" / "main.py"))
    with pytest.raises(ValueError, match=r"'train.max_iter' must have the form key=value"):
        LazyConfig.apply_overrides(cfg, ["train.max_iter"])
    with pytest.raises(ValueError, match="key=value"):
        LazyConfig.apply_overrides(cfg, ["=3"])
    with pytest.raises(KeyError, match=r"train.max_iter is a int \(200\), not a config node"):
        LazyConfig.apply_overrides(cfg, ["train.max_iter.x=1"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        LazyConfig.apply_overrides(cfg, "train.max_iter=1")  # type: ignore[arg-type]


def test_load_rel(config_tree: Path, tmp_path: Path) -> None:
    caller = _write(
        tmp_path / "caller.py",
        """
        from d2engine.config import LazyConfig
        def get():
            return LazyConfig.load_rel("common/data.py", keys="dataloader")
        """,
    )
    namespace: dict = {}
    exec(compile(Path(caller).read_text(), caller, "exec"), namespace)
    assert namespace["get"]().batch_size == 8
