"""Tests for d2engine.config.cfg_node: the config package's leaf, and the import layout above it.

The behaviour of ``CfgNode`` itself is tested through ``get_cfg`` in test_config.py.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import d2engine.config
import d2engine.config.config
from d2engine.config import cfg_node

CONFIG_DIR = Path(d2engine.config.__file__).parent
CONFIG_MODULES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _imported_config_modules(module: str) -> set[str]:
    """Modules of d2engine.config that ``module`` imports anywhere (top level or in a function)."""
    tree = ast.parse((CONFIG_DIR / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.module and node.module.startswith("d2engine.config."):
                base = node.module.removeprefix("d2engine.config.")
            elif node.module in ("d2engine.config", None) and node.level in (0, 1):
                base = None  # "from d2engine.config import x" / "from . import x": names below
            else:
                continue
            if base is None:
                found.update(a.name for a in node.names if a.name in CONFIG_MODULES)
            else:
                found.add(base.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("d2engine.config."):
                    found.add(alias.name.split(".")[2])
    return found & set(CONFIG_MODULES)


def test_config_modules_import_each_other_without_a_cycle() -> None:
    graph = {m: _imported_config_modules(m) for m in CONFIG_MODULES}
    assert graph["cfg_node"] == set(), "cfg_node must import nothing else of d2engine.config"

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        for dep in graph[module]:
            visit(dep, (*path, module))

    for module in CONFIG_MODULES:
        visit(module, ())
    # The layout this test guards: the face builds on the leaf, the defaults and @configurable.
    assert graph["config"] == {"cfg_node", "defaults", "_configurable"}
    assert graph["defaults"] == {"cfg_node"}
    assert graph["_configurable"] == {"cfg_node"}


def test_cfg_node_runs_as_a_standalone_file() -> None:
    """The leaf imports nothing of d2engine: its source runs outside the package."""
    code = (
        "import runpy, sys\n"
        f"ns = runpy.run_path({str(CONFIG_DIR / 'cfg_node.py')!r})\n"
        "node = ns['CfgNode']({'A': {'B': 1}})\n"
        "node.merge_from_list(['A.B', '2'])\n"
        "assert node.A.B == 2\n"
        "assert not any(m.startswith('d2engine') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=CONFIG_DIR)


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_each_config_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    code = f"import d2engine.config.{module}; import d2engine.config; d2engine.config.get_cfg()"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_detectron2_import_paths_name_the_leaf_objects() -> None:
    # detectron2 users import these from detectron2.config.config and detectron2.config.
    for name in ("CfgNode", "ConfigKeyError", "ConfigTypeError", "FrozenConfigError"):
        assert getattr(d2engine.config.config, name) is getattr(cfg_node, name)
        assert getattr(d2engine.config, name) is getattr(cfg_node, name)
    for name in ("get_cfg", "configurable", "global_cfg", "set_global_cfg"):
        assert getattr(d2engine.config, name) is getattr(d2engine.config.config, name)
    assert set(cfg_node.__all__) <= set(d2engine.config.config.__all__)
    assert isinstance(d2engine.config.config.get_cfg(), cfg_node.CfgNode)


def test_a_config_pickled_by_0_1_0_still_loads() -> None:
    # pickle.dumps(frozen CfgNode({"A": {"B": 1}, "C": "x"}), protocol=2) with d2engine 0.1.0,
    # where CfgNode and _rebuild_node lived in d2engine.config.config.
    old = (
        b"\x80\x02cd2engine.config.config\n_rebuild_node\nq\x00(cd2engine.config.config\nCfgNode\n"
        b"q\x01}q\x02(X\x01\x00\x00\x00Aq\x03h\x00(h\x01}q\x04X\x01\x00\x00\x00Bq\x05K\x01s\x88\x89"
        b"tq\x06Rq\x07X\x01\x00\x00\x00Cq\x08X\x01\x00\x00\x00xq\tu\x88\x89tq\nRq\x0b."
    )
    node = pickle.loads(old)
    assert type(node) is cfg_node.CfgNode
    assert node == {"A": {"B": 1}, "C": "x"} and node.A.B == 1
    assert node.is_frozen() and node.A.is_frozen()


# --------------------------------------------------------------------------- YAML size bound
def _alias_bomb(levels: int = 9) -> str:
    """A 'billion laughs' YAML document: 10 ** levels strings through nested aliases."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(30)
def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("MODEL:\n  DEVICE: cpu\n" + _alias_bomb())
    cfg = d2engine.config.get_cfg()
    cfg.set_new_allowed(True)
    with pytest.raises(
        ValueError, match=r"bomb\.yaml.*more than 1,000,000 values.*aliases"
    ) as info:
        cfg.merge_from_file(str(path))
    assert "HINT" in str(info.value)
    with pytest.raises(ValueError, match="aliases"):
        cfg_node.check_yaml_size(path.read_text(), str(path))


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("A: &a {B: *a}\n")
    with pytest.raises(ValueError, match=r"loop\.yaml.*refers to itself"):
        cfg_node.CfgNode.load_yaml_with_base(str(path))


def test_ordinary_aliases_and_large_plain_lists_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("A: &steps [1, 2, 3]\nB: *steps\nC: &base {X: 1, Y: 2}\nD: {<<: *base, Y: 3}\n")
    loaded = cfg_node.CfgNode.load_yaml_with_base(str(path))
    assert loaded["B"] == [1, 2, 3] and loaded["D"] == {"X": 1, "Y": 3}

    # Only what aliases add counts: a long plain list is bounded by the file's own size.
    plain = "BIG: [" + ", ".join(["1"] * 5000) + "]\n"
    cfg_node.check_yaml_size(plain, "plain.yaml", max_values=1000)
    cfg_node.check_yaml_size(_alias_bomb(levels=1), "small.yaml", max_values=1000)  # 125 values
    with pytest.raises(ValueError, match=r"small\.yaml.*more than 1,000 values"):
        cfg_node.check_yaml_size(_alias_bomb(levels=3), "small.yaml", max_values=1000)
