"""Facts the documentation states about the code, checked against the code so they cannot drift:
DefaultTrainer's hooks and their order (the training tutorial), the config keys d2engine adds to
detectron2's (the porting page), and the home page's links to every page of the site."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import d2engine.engine
from d2engine.config import CfgNode, get_cfg
from d2engine.data import DatasetCatalog
from d2engine.engine import DefaultTrainer, HookBase, hooks
from d2engine.modeling import META_ARCH_REGISTRY

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# --------------------------------------------------------------------------- DefaultTrainer's hooks
_HOOKS_INTRO = "`DefaultTrainer` registers these hooks, in this order"


def documented_hooks() -> list[str]:
    """The hook classes of the training tutorial's numbered list, in its order."""
    text = (DOCS / "tutorials" / "training.md").read_text(encoding="utf-8")
    assert _HOOKS_INTRO in text, f"docs/tutorials/training.md lost its line {_HOOKS_INTRO!r}"
    after_intro = text[text.index(_HOOKS_INTRO) :].split("\n\n", 2)[1]  # the list: no blank line
    items = re.split(r"^\d+\. ", after_intro, flags=re.M)[1:]
    names = []
    for item in items:
        m = re.match(r"`(\w+)`", item)
        assert m, f"a list item of DefaultTrainer's hooks does not start with a hook: {item!r}"
        names.append(m[1])
    return names


class _BNPoints(nn.Module):
    """A tiny classifier with a BatchNorm layer (so that DefaultTrainer adds PreciseBN)."""

    def __init__(self, cfg: CfgNode | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        logits = self.net(torch.stack([d["x"] for d in batch]))
        if self.training:
            labels = torch.tensor([d["label"] for d in batch])
            return {"loss_cls": nn.functional.cross_entropy(logits, labels)}
        return [{"scores": s} for s in logits]


def _points(n: int) -> list[dict[str, Any]]:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(n))
    return [{"x": p, "label": int(p.sum() > 0)} for p in x]


if "_DocsBNPoints" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_BNPoints, name="_DocsBNPoints")
for _name, _n in (("_docs_points_train", 32), ("_docs_points_test", 16)):
    if _name not in DatasetCatalog.list():
        DatasetCatalog.register(_name, lambda n=_n: _points(n))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def everything_on(tmp_path: Path) -> Iterator[CfgNode]:
    """A config with every optional hook of DefaultTrainer on."""
    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.DEVICE = "_DocsBNPoints", "cpu"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("_docs_points_train",), ("_docs_points_test",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER = 8, 20
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = (), 0
    cfg.SOLVER.HANG_TIMEOUT = 900.0
    cfg.MODEL_EMA.ENABLED = True
    cfg.TEST.EVAL_PERIOD = 10
    cfg.TEST.PRECISE_BN.ENABLED, cfg.TEST.PRECISE_BN.NUM_ITER = True, 2
    cfg.TEST.LOSS_EVAL_PERIOD = 10
    cfg.TEST.EARLY_STOPPING.METRIC, cfg.TEST.EARLY_STOPPING.MODE = "validation_loss", "min"
    cfg.OUTPUT.WRITERS, cfg.OUTPUT.PROGRESS_BAR, cfg.OUTPUT.PLOT = ["json"], True, True
    cfg.OUTPUT_DIR = str(tmp_path)
    yield cfg
    for h in log.handlers:
        if h not in handlers:
            h.close()
    log.handlers[:], log.level, log.propagate = handlers, level, propagate


def _hook_names(cfg: CfgNode) -> list[str]:
    trainer = DefaultTrainer(cfg)
    names = [type(h).__name__ for h in trainer._hooks]
    for h in trainer._hooks:
        if isinstance(h, hooks.PeriodicWriter):
            for writer in h._writers:
                writer.close()
    return names


def test_the_training_tutorial_lists_default_trainers_hooks_in_order(
    everything_on: CfgNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The progress bar is drawn on a terminal (set here: pytest sets sys.stderr before each test).
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.delenv("D2ENGINE_PROGRESS", raising=False)
    documented = documented_hooks()
    for name in documented:
        cls = getattr(hooks, name, None) or getattr(d2engine.engine, name, None)
        assert isinstance(cls, type) and issubclass(cls, HookBase), (
            f"docs/tutorials/training.md lists {name!r} as a hook of DefaultTrainer, but neither "
            "d2engine.engine.hooks nor d2engine.engine has a hook class of that name"
        )
    # Without early stopping, the list's order (its EarlyStopping item left out).
    cfg = everything_on.clone()
    cfg.TEST.EARLY_STOPPING.ENABLED = False
    assert _hook_names(cfg) == [n for n in documented if n != "EarlyStopping"]
    # With it, as the list says: the evaluation hooks come before the PeriodicCheckpointer.
    cfg.TEST.EARLY_STOPPING.ENABLED = True
    evaluation = ["EvalHook", "LossEvalHook", "EarlyStopping"]
    expected = [n for n in documented if n not in evaluation]
    at = expected.index("PeriodicCheckpointer")
    assert _hook_names(cfg) == expected[:at] + evaluation + expected[at:]


# --------------------------------------------------------------------------- config keys
DETECTRON2_KEYS = frozenset({
    "CUDNN_BENCHMARK", "DATALOADER.ASPECT_RATIO_GROUPING", "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
    "DATALOADER.NUM_WORKERS", "DATALOADER.REPEAT_SQRT", "DATALOADER.REPEAT_THRESHOLD",
    "DATALOADER.SAMPLER_TRAIN", "DATASETS.TEST", "DATASETS.TRAIN", "FLOAT32_PRECISION",
    "INPUT.FORMAT", "INPUT.MAX_SIZE_TEST", "INPUT.MIN_SIZE_TEST", "MODEL.DEVICE",
    "MODEL.META_ARCHITECTURE", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.WEIGHTS",
    "OUTPUT_DIR", "SEED", "SOLVER.AMP.ENABLED", "SOLVER.BASE_LR", "SOLVER.BASE_LR_END",
    "SOLVER.BIAS_LR_FACTOR", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "SOLVER.CLIP_GRADIENTS.ENABLED",
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE", "SOLVER.GAMMA", "SOLVER.IMS_PER_BATCH",
    "SOLVER.LR_SCHEDULER_NAME", "SOLVER.MAX_ITER", "SOLVER.MOMENTUM", "SOLVER.NESTEROV",
    "SOLVER.NUM_DECAYS", "SOLVER.REFERENCE_WORLD_SIZE", "SOLVER.RESCALE_INTERVAL", "SOLVER.STEPS",
    "SOLVER.WARMUP_FACTOR", "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_METHOD", "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_BIAS", "SOLVER.WEIGHT_DECAY_NORM", "TEST.AUG.ENABLED", "TEST.AUG.FLIP",
    "TEST.AUG.MAX_SIZE", "TEST.AUG.MIN_SIZES", "TEST.EVAL_PERIOD", "TEST.EXPECTED_RESULTS",
    "TEST.PRECISE_BN.ENABLED", "TEST.PRECISE_BN.NUM_ITER", "VERSION",
})  # fmt: skip
"""The keys of d2engine's ``get_cfg()`` that detectron2's ``get_cfg()`` also has (its
``detectron2/config/defaults.py`` at commit 02b5c4e): every other key is one d2engine adds."""


def _leaf_keys(node: CfgNode, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        path = f"{prefix}{name}"
        keys |= _leaf_keys(value, f"{path}.") if isinstance(value, CfgNode) else {path}
    return keys


def documented_added_keys() -> set[str]:
    """The keys of the porting page's table of added keys, ``X.*`` expanded to the keys under X."""
    text = (DOCS / "porting.md").read_text(encoding="utf-8")
    table = text[text.index("### Config keys d2engine adds") :].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_.*]+)` \|", table, flags=re.M)
    assert rows, "docs/porting.md has no table of the config keys d2engine adds"
    cfg, keys = get_cfg(), set()
    for row in rows:
        if row.endswith(".*"):
            node = cfg
            for part in row[:-2].split("."):
                node = node[part]
            assert isinstance(node, CfgNode), f"docs/porting.md: {row} is not a config node"
            keys |= _leaf_keys(node, row[:-1])
        else:
            keys.add(row)
    return keys


def test_the_porting_page_lists_exactly_the_config_keys_d2engine_adds() -> None:
    keys = _leaf_keys(get_cfg())
    added = keys - DETECTRON2_KEYS
    documented = documented_added_keys()
    assert documented == added, (
        "docs/porting.md's table 'Config keys d2engine adds' is out of date: "
        f"not listed: {sorted(added - documented)}; listed but not added by d2engine: "
        f"{sorted(documented - added)}. HINT: add a row per new key (or its node as X.*); a key "
        "that detectron2's get_cfg() has too belongs in DETECTRON2_KEYS here instead."
    )
    # A detectron2 key d2engine dropped would be a difference the page must explain.
    assert keys >= DETECTRON2_KEYS, f"detectron2's keys missing: {sorted(DETECTRON2_KEYS - keys)}"


# --------------------------------------------------------------------------- the home page
def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return [p for item in nav for p in _nav_pages(item)]


def test_the_home_page_links_every_page_but_the_generated_api_pages() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = [p for p in _nav_pages(config["nav"]) if p != "index.md"]
    assert "tutorials/write-hooks.md" in pages and "porting.md" in pages
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", home))
    wanted = [p for p in pages if not p.startswith("api/") or p == "api/index.md"]
    assert not [p for p in wanted if p not in linked], "docs/index.md does not link these pages"


# ------------------------------------------------------------------- `make docs` after `make test`
def test_make_tests_bootstrap_installs_the_docs_extra() -> None:
    """CI runs `make test` in a clean clone, and the suite builds the site: the Makefile's install
    must pull in the `docs` extra (directly, or through an extra that names `d2engine[docs]`)."""
    from setuptools.config.pyprojecttoml import read_configuration

    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    installed = re.search(r'pip install -q -e "\.\[([\w,-]+)\]"', makefile)
    assert installed, "the Makefile's bootstrap no longer installs the package with extras"
    extras = read_configuration(REPO / "pyproject.toml", expand=False)["project"][
        "optional-dependencies"
    ]
    todo, reached = installed[1].split(","), set()
    while todo:
        extra = todo.pop()
        if extra in reached:
            continue
        reached.add(extra)
        for requirement in extras[extra]:
            m = re.fullmatch(r"d2engine\[([\w,-]+)\]", requirement)
            todo += m[1].split(",") if m else []
    assert "docs" in reached, f"`make test` installs the extras {sorted(reached)}, not `docs`"
    docs_dependencies = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in extras["docs"]}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"} <= docs_dependencies
