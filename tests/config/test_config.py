"""Tests for d2engine.config.config (CfgNode, get_cfg, configurable) and the defaults."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from d2engine.config import (
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    FrozenConfigError,
    configurable,
    get_cfg,
)
from d2engine.config import defaults as defaults_module


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- defaults
DETECTRON2_DEFAULTS = {
    "VERSION": 2,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.WEIGHTS": "",
    "MODEL.DEVICE": "cuda",
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "DATASETS.TRAIN": (),
    "DATASETS.TEST": (),
    "DATALOADER.NUM_WORKERS": 4,
    "INPUT.FORMAT": "BGR",
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.MAX_ITER": 40000,
    "SOLVER.BASE_LR": 0.001,
    "SOLVER.BASE_LR_END": 0.0,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.NESTEROV": False,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WEIGHT_DECAY_BIAS": None,
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.GAMMA": 0.1,
    "SOLVER.STEPS": (30000,),
    "SOLVER.NUM_DECAYS": 3,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.WARMUP_ITERS": 1000,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.RESCALE_INTERVAL": False,
    "SOLVER.CHECKPOINT_PERIOD": 5000,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.REFERENCE_WORLD_SIZE": 0,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "value",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0,
    "SOLVER.AMP.ENABLED": False,
    "TEST.EVAL_PERIOD": 0,
    "TEST.EXPECTED_RESULTS": [],
    "TEST.PRECISE_BN.ENABLED": False,
    "TEST.PRECISE_BN.NUM_ITER": 200,
    "OUTPUT_DIR": "./output",
    "SEED": -1,
    "CUDNN_BENCHMARK": False,
    # generic keys read by detectron2's tools/*.py, engine/defaults.py and data/build.py
    "TEST.AUG.ENABLED": False,
    "TEST.AUG.MIN_SIZES": (400, 500, 600, 700, 800, 900, 1000, 1100, 1200),
    "TEST.AUG.MAX_SIZE": 4000,
    "TEST.AUG.FLIP": True,
    "DATALOADER.ASPECT_RATIO_GROUPING": True,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
    "DATALOADER.REPEAT_THRESHOLD": 0.0,
    "DATALOADER.REPEAT_SQRT": True,
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "FLOAT32_PRECISION": "",
}


def _get(cfg: CfgNode, dotted: str) -> object:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(("key", "expected"), sorted(DETECTRON2_DEFAULTS.items()))
def test_defaults_match_detectron2(key: str, expected: object) -> None:
    value = _get(get_cfg(), key)
    assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected
    assert type(value) is type(expected)


def test_get_cfg_returns_independent_copies() -> None:
    first = get_cfg()
    first.SOLVER.BASE_LR = 5.0
    first.MODEL.PIXEL_MEAN.append(1.0)
    second = get_cfg()
    assert second.SOLVER.BASE_LR == 0.001
    assert second.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675]
    assert isinstance(second.SOLVER.CLIP_GRADIENTS, CfgNode)


def test_every_default_is_documented_by_a_comment() -> None:
    source = Path(defaults_module.__file__).read_text().splitlines()
    tree = ast.parse("\n".join(source))
    undocumented = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("_C.")):
            continue
        # Walk up over directly preceding assignments (a documented block, e.g. PIXEL_MEAN/STD)
        # until a non-assignment line: it must be a comment.
        line = node.lineno - 2
        while line >= 0 and source[line].startswith("_C."):
            line -= 1
        if line < 0 or not source[line].lstrip().startswith("#"):
            undocumented.append(ast.unparse(node.targets[0]))
    assert not undocumented


# ------------------------------------------------------------------------ basic node
def test_attribute_and_item_access() -> None:
    cfg = CfgNode({"A": {"B": 1}, "C": "x"})
    assert isinstance(cfg.A, CfgNode)
    assert cfg.A.B == cfg["A"]["B"] == 1
    cfg.C = "y"
    cfg.D = {"E": 2}  # a plain dict becomes a node
    assert cfg["C"] == "y" and isinstance(cfg.D, CfgNode) and cfg.D.E == 2
    with pytest.raises(AttributeError, match=r"no key 'CC'.*Did you mean: C"):
        _ = cfg.CC
    assert not hasattr(cfg, "MISSING")


def test_missing_key_error_names_the_full_dotted_path() -> None:
    # tools/train_net.py reads cfg.TEST.AUG.ENABLED; a project's own key that was never added
    # must be named in full, not as a bare "AUG".
    cfg = get_cfg()
    assert cfg.TEST.AUG.ENABLED is False
    del cfg.TEST.AUG
    with pytest.raises(AttributeError, match=r"no key 'TEST.AUG'\..*HINT"):
        _ = cfg.TEST.AUG
    with pytest.raises(AttributeError, match=r"no key 'SOLVER.AMP.NOPE'"):
        _ = cfg.SOLVER.AMP.NOPE
    node = CfgNode()
    node.A = CfgNode()
    node.A.B = {"COUNT": 1}  # nodes made at any depth know their path
    with pytest.raises(AttributeError, match=r"no key 'A.B.COUNTS'.*Did you mean: A.B.COUNT"):
        _ = node.A.B.COUNTS
    for copied in (node.clone(), pickle.loads(pickle.dumps(node)), copy.copy(node)):
        with pytest.raises(AttributeError, match=r"no key 'A.B.D'"):
            _ = copied.A.B.D


def test_unsupported_value_type_is_refused() -> None:
    cfg = CfgNode()
    with pytest.raises(ConfigTypeError, match=r"OBJ got a value of type object.*LazyConfig"):
        cfg.OBJ = object()


def test_freeze_is_recursive_and_errors_say_how_to_defrost() -> None:
    cfg = get_cfg()
    cfg.freeze()
    assert cfg.is_frozen() and cfg.SOLVER.CLIP_GRADIENTS.is_frozen()
    with pytest.raises(FrozenConfigError, match=r"'BASE_LR'.*frozen.*defrost\(\)"):
        cfg.SOLVER.BASE_LR = 1.0
    with pytest.raises(FrozenConfigError, match="defrost"):
        cfg.SOLVER.CLIP_GRADIENTS["ENABLED"] = True
    with pytest.raises(FrozenConfigError, match="defrost"):
        cfg.merge_from_list(["SOLVER.BASE_LR", "1.0"])
    with pytest.raises(FrozenConfigError, match="defrost"):
        cfg.SOLVER.update({"BASE_LR": 1.0})
    with pytest.raises(FrozenConfigError, match="defrost"):
        del cfg.SOLVER.BASE_LR
    with pytest.raises(FrozenConfigError, match="defrost"):
        cfg.pop("SEED")
    assert cfg.SOLVER.BASE_LR == 0.001
    cfg.defrost()
    assert not cfg.SOLVER.CLIP_GRADIENTS.is_frozen()
    cfg.SOLVER.BASE_LR = 1.0
    assert cfg.SOLVER.BASE_LR == 1.0


def test_clone_is_deep_and_keeps_frozen_state() -> None:
    cfg = get_cfg()
    cfg.freeze()
    clone = cfg.clone()
    assert clone == cfg and clone.is_frozen() and clone.SOLVER.is_frozen()
    clone.defrost()
    clone.SOLVER.STEPS = (1, 2)
    clone.MODEL.PIXEL_MEAN[0] = 0.0
    assert cfg.SOLVER.STEPS == (30000,) and cfg.MODEL.PIXEL_MEAN[0] == 103.530
    shallow = copy.copy(cfg)
    assert shallow.SOLVER is cfg.SOLVER


def test_pickle_round_trip_of_frozen_config() -> None:
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.5
    cfg.freeze()
    loaded = pickle.loads(pickle.dumps(cfg))
    assert loaded == cfg
    assert type(loaded.SOLVER) is CfgNode and loaded.SOLVER.is_frozen()


# ------------------------------------------------------------------ merge_from_list
def test_merge_from_list_parses_literals_and_casts() -> None:
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.BASE_LR", "1",  # int for a float key: cast
            "SOLVER.MAX_ITER", "300",
            "SOLVER.STEPS", "[100, 200]",  # list for a tuple key: cast
            "MODEL.PIXEL_MEAN", "(1.0, 2.0, 3.0)",  # tuple for a list key: cast
            "SOLVER.NESTEROV", "True",
            "SOLVER.WEIGHT_DECAY_BIAS", "0.0",  # None default accepts anything
            "MODEL.DEVICE", "cpu",  # not a literal: a string
            "MODEL.WEIGHTS", "123",  # a string key keeps the text as written
            "DATASETS.TRAIN", "('a', 'b')",
            "OUTPUT_DIR", "/tmp/out",
        ]
    )  # fmt: skip
    assert cfg.SOLVER.BASE_LR == 1.0 and type(cfg.SOLVER.BASE_LR) is float
    assert cfg.SOLVER.MAX_ITER == 300
    assert cfg.SOLVER.STEPS == (100, 200)
    assert cfg.MODEL.PIXEL_MEAN == [1.0, 2.0, 3.0]
    assert cfg.SOLVER.NESTEROV is True
    assert cfg.SOLVER.WEIGHT_DECAY_BIAS == 0.0
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.WEIGHTS == "123"
    assert cfg.DATASETS.TRAIN == ("a", "b")
    assert cfg.OUTPUT_DIR == "/tmp/out"
    cfg.merge_from_list(["SOLVER.WEIGHT_DECAY_BIAS", "None", "SOLVER.GAMMA", 0.5])
    assert cfg.SOLVER.WEIGHT_DECAY_BIAS is None and cfg.SOLVER.GAMMA == 0.5


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["SOLVER.MAX_ITER", "1.5"], r"SOLVER.MAX_ITER: the default is int \(40000\), got float"),
        (["SOLVER.NESTEROV", "yes"], r"SOLVER.NESTEROV.*got str.*Write True or False"),
        (["SOLVER.NESTEROV", "1"], r"SOLVER.NESTEROV: the default is bool.*got int"),
        (["DATASETS.TRAIN", "digits"], r"DATASETS.TRAIN.*got str.*\"\('digits',\)\""),
        (["SOLVER.STEPS", "100"], r"SOLVER.STEPS: the default is tuple.*got int"),
        (["SOLVER", "3"], r"SOLVER is a group of keys.*Set its sub-keys instead"),
    ],
)
def test_merge_from_list_type_errors(overrides: list[str], match: str) -> None:
    cfg = get_cfg()
    with pytest.raises(ConfigTypeError, match=match):
        cfg.merge_from_list(overrides)
    with pytest.raises(ValueError):  # yacs raised ValueError: still caught by such code
        cfg.merge_from_list(overrides)


def test_merge_from_list_odd_length() -> None:
    with pytest.raises(ValueError, match=r"odd number of items \(3\).*Give every key a value"):
        get_cfg().merge_from_list(["SOLVER.BASE_LR", "0.1", "SOLVER.MAX_ITER"])


def test_unknown_key_names_key_and_close_matches() -> None:
    cfg = get_cfg()
    with pytest.raises(
        ConfigKeyError, match=r"SOLVER.BASE_RL. Did you mean: SOLVER.BASE_LR"
    ) as info:
        cfg.merge_from_list(["SOLVER.BASE_RL", "0.1"])
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("Non-existent config key")  # not quoted like KeyError
    with pytest.raises(KeyError, match=r"SOLVR.BASE_LR \(SOLVR is not a group.*SOLVER.BASE_LR"):
        cfg.merge_from_list(["SOLVR.BASE_LR", "0.1"])
    with pytest.raises(KeyError, match=r"SOLVER.BASE_LR.X \(SOLVER.BASE_LR is not a group"):
        cfg.merge_from_list(["SOLVER.BASE_LR.X", "0.1"])
    with pytest.raises(KeyError, match=r"Non-existent config key: ZZZZZZ\. A new key"):
        cfg.merge_from_list(["ZZZZZZ", "1"])


# ------------------------------------------------------------------ merge_from_file
def test_merge_from_file_with_relative_recursive_bases(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path / "base" / "root.yaml", "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 10\nSEED: 1\n")
    _write(
        tmp_path / "base" / "mid.yaml",
        "_BASE_: root.yaml\nSOLVER:\n  MAX_ITER: 20\nMODEL:\n  DEVICE: cpu\n",
    )
    top = _write(tmp_path / "exp" / "top.yaml", "_BASE_: ../base/mid.yaml\nSEED: 3\n")
    monkeypatch.chdir("/")
    cfg = get_cfg()
    cfg.merge_from_file(top)
    assert cfg.SOLVER.BASE_LR == 0.5  # from the grand-parent
    assert cfg.SOLVER.MAX_ITER == 20  # the parent overrides the grand-parent
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.SEED == 3  # the file overrides its bases
    assert cfg.SOLVER.MOMENTUM == 0.9  # untouched keys keep the defaults


def test_base_list_merges_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "SEED: 1\nOUTPUT_DIR: a\n")
    _write(tmp_path / "b.yaml", "SEED: 2\n")
    _write(tmp_path / "d.yaml", "SOLVER:\n  GAMMA: 0.5\n")
    _write(tmp_path / "c.yaml", "_BASE_: d.yaml\n")
    top = _write(tmp_path / "top.yaml", "_BASE_: [a.yaml, b.yaml, c.yaml, d.yaml]\n")  # diamond ok
    cfg = get_cfg()
    cfg.merge_from_file(top)
    assert (cfg.SEED, cfg.OUTPUT_DIR, cfg.SOLVER.GAMMA) == (2, "a", 0.5)
    assert CfgNode.load_yaml_with_base(top) == {
        "SEED": 2,
        "OUTPUT_DIR": "a",
        "SOLVER": {"GAMMA": 0.5},
    }


def test_base_cycle_is_detected(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "_BASE_: b.yaml\nSEED: 1\n")
    _write(tmp_path / "b.yaml", "_BASE_: sub/../a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle through _BASE_: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        get_cfg().merge_from_file(a)
    own = _write(tmp_path / "self.yaml", "_BASE_: self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        get_cfg().merge_from_file(own)


def test_missing_base_and_bad_base_value(tmp_path: Path) -> None:
    missing = _write(tmp_path / "m.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml") as info:
        get_cfg().merge_from_file(missing)
    assert "named by _BASE_ in" in str(info.value) and "m.yaml" in str(info.value)
    assert "HINT: check the path" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"nothing.yaml does not exist \(working"):
        get_cfg().merge_from_file(str(tmp_path / "nothing.yaml"))
    bad = _write(tmp_path / "bad.yaml", "_BASE_: {a: 1}\n")
    with pytest.raises(ValueError, match=r"_BASE_ in .*bad.yaml must be a path or a list"):
        get_cfg().merge_from_file(bad)


def test_python_yaml_tag_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = _write(
        tmp_path / "evil.yaml",
        f"SEED: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    with pytest.raises(ValueError, match=r"Refusing to load .*evil.yaml.*safe YAML loader"):
        get_cfg().merge_from_file(evil)
    assert not marker.exists()
    # Also through a base file.
    top = _write(tmp_path / "top.yaml", "_BASE_: evil.yaml\n")
    with pytest.raises(ValueError, match="Refusing to load"):
        get_cfg().merge_from_file(top)
    assert not marker.exists()


def test_file_errors_name_the_key_and_file(tmp_path: Path) -> None:
    typo = _write(tmp_path / "typo.yaml", "SOLVER:\n  MAX_ITERS: 10\n")
    with pytest.raises(
        KeyError, match=r"SOLVER.MAX_ITERS \(from .*typo.yaml\). Did you mean: SOLVER.MAX_ITER"
    ):
        get_cfg().merge_from_file(typo)
    wrong = _write(tmp_path / "wrong.yaml", "SOLVER:\n  MAX_ITER: ten\n")
    with pytest.raises(ConfigTypeError, match="SOLVER.MAX_ITER.*got str"):
        get_cfg().merge_from_file(wrong)
    scalar = _write(tmp_path / "scalar.yaml", "- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        get_cfg().merge_from_file(scalar)
    version = _write(tmp_path / "v1.yaml", "VERSION: 1\n")
    with pytest.raises(ValueError, match=r"VERSION 1.*set VERSION: 2"):
        get_cfg().merge_from_file(version)


def test_yaml_values_are_decoded_like_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.yaml",
        "SOLVER:\n  BASE_LR: 1e-3\n  STEPS: [10, 20]\n  WEIGHT_DECAY: 0\nMODEL:\n  WEIGHTS: '42'\n",
    )
    empty = _write(tmp_path / "empty.yaml", "")
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_file(Path(empty))  # os.PathLike works too
    assert cfg.SOLVER.BASE_LR == 0.001  # PyYAML reads 1e-3 as a string
    assert cfg.SOLVER.STEPS == (10, 20)
    assert cfg.SOLVER.WEIGHT_DECAY == 0.0 and type(cfg.SOLVER.WEIGHT_DECAY) is float
    assert cfg.MODEL.WEIGHTS == "42"


def test_new_allowed_nodes_accept_new_keys(tmp_path: Path) -> None:
    cfg = get_cfg()
    cfg.MODEL.EXTRA = CfgNode({"DEPTH": 2}, new_allowed=True)
    path = _write(tmp_path / "c.yaml", "MODEL:\n  EXTRA:\n    WIDTH: 64\n    SUB: {A: 1}\n")
    cfg.merge_from_file(path)
    assert cfg.MODEL.EXTRA.WIDTH == 64 and cfg.MODEL.EXTRA.SUB.A == 1
    assert cfg.MODEL.EXTRA.SUB.is_new_allowed()
    assert not cfg.MODEL.is_new_allowed()
    with pytest.raises(KeyError, match=r"MODEL.OTHER"):
        cfg.merge_from_list(["MODEL.OTHER", "1"])


# ----------------------------------------------------------- merge_from_other / dump
def test_merge_from_other_cfg() -> None:
    cfg = get_cfg()
    other = CfgNode({"SOLVER": {"BASE_LR": 2, "STEPS": [5]}, "SEED": 7})
    cfg.merge_from_other_cfg(other)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS, cfg.SEED) == (2.0, (5,), 7)
    cfg.merge_from_other_cfg({"INPUT": {"FORMAT": "RGB"}})
    assert cfg.INPUT.FORMAT == "RGB"
    with pytest.raises(KeyError, match=r"INPUT.FORMATS.*Did you mean: INPUT.FORMAT"):
        cfg.merge_from_other_cfg({"INPUT": {"FORMATS": "RGB"}})
    with pytest.raises(ConfigTypeError, match="INPUT.MIN_SIZE_TEST"):
        cfg.merge_from_other_cfg({"INPUT": {"MIN_SIZE_TEST": [1]}})


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = get_cfg()
    cfg.merge_from_list(
        ["SOLVER.STEPS", "(7, 9)", "DATASETS.TRAIN", "('x',)", "MODEL.WEIGHTS", "0.5",
         "SOLVER.WEIGHT_DECAY_BIAS", "0.0", "TEST.EXPECTED_RESULTS", "[['a', 'b', 1.0, 0.1]]"]
    )  # fmt: skip
    text = cfg.dump()
    assert isinstance(yaml.safe_load(text), dict)  # plain YAML, no Python tags
    assert "!!python" not in text
    path = _write(tmp_path / "dumped.yaml", text)
    loaded = get_cfg()
    loaded.merge_from_file(path)
    assert loaded == cfg
    assert str(cfg).startswith("VERSION: 2")


# ---------------------------------------------------------------------- configurable
class _Net:
    @configurable
    def __init__(self, width: int, depth: int = 1) -> None:
        self.width, self.depth = width, depth

    @classmethod
    def from_config(cls, cfg: CfgNode, depth: int = 5) -> dict:
        return {"width": cfg.MODEL.PIXEL_STD.__len__(), "depth": depth}


@configurable(from_config=lambda cfg: {"lr": cfg.SOLVER.BASE_LR})
def _build(lr: float, momentum: float = 0.9) -> tuple[float, float]:
    return lr, momentum


def test_configurable_class_and_function() -> None:
    cfg = get_cfg()
    assert vars(_Net(8)) == {"width": 8, "depth": 1}
    assert vars(_Net(cfg)) == {"width": 3, "depth": 5}
    assert vars(_Net(cfg, depth=2)) == {"width": 3, "depth": 2}
    assert _build(0.5) == (0.5, 0.9)
    assert _build(cfg, momentum=0.1) == (0.001, 0.1)
    assert _build(cfg=OmegaConf.create({"SOLVER": {"BASE_LR": 0.2}})) == (0.2, 0.9)


def test_configurable_errors() -> None:
    class NoFromConfig:
        @configurable
        def __init__(self, a: int) -> None:
            self.a = a

    with pytest.raises(TypeError, match=r"needs a classmethod from_config"):
        NoFromConfig(get_cfg())
    with pytest.raises(TypeError, match="decorates a class __init__"):
        configurable(lambda x: x)

    @configurable(from_config=lambda cfg: [1])
    def bad(a: int) -> int:
        return a

    with pytest.raises(TypeError, match="must return a dict"):
        bad(get_cfg())
