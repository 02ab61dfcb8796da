"""Tests for d2engine.model_zoo: the configs shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import d2engine
from d2engine.config import get_cfg
from d2engine.model_zoo import get_config_file
from d2engine.modeling import add_classifier_config

PACKAGE = Path(d2engine.__file__).resolve().parent
REPO = PACKAGE.parent


def test_get_config_file_finds_the_shipped_demo_inside_the_package() -> None:
    path = Path(get_config_file("digits/convnet.yaml"))
    assert path.is_absolute() and path.is_file()
    assert path.is_relative_to(PACKAGE)  # inside the package, so a wheel carries it
    assert get_config_file("configs/digits/convnet.yaml") == str(path)  # repository spelling
    cfg = get_cfg()
    add_classifier_config(cfg)
    cfg.merge_from_file(path)  # its _BASE_ sits next to it
    assert cfg.MODEL.META_ARCHITECTURE == "ImageClassifier"
    assert cfg.SOLVER.MAX_ITER == 500


def test_the_repository_configs_folder_is_the_shipped_one() -> None:
    # `configs/` in a checkout links to the package's folder: one copy, both paths work.
    in_repo = REPO / "configs" / "digits" / "convnet.yaml"
    assert in_repo.resolve() == Path(get_config_file("digits/convnet.yaml"))


@pytest.mark.parametrize("name", ["digits/missing.yaml", "../config/defaults.py", "digits"])
def test_unknown_config_names_the_shipped_ones(name: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"shipped configs are: .*digits/convnet\.yaml"):
        get_config_file(name)


def test_module_prints_the_path() -> None:
    run = [sys.executable, "-m", "d2engine.model_zoo"]
    ok = subprocess.run(
        [*run, "digits/convnet.yaml"], capture_output=True, text=True, timeout=60, check=True
    )
    assert ok.stdout.strip() == get_config_file("digits/convnet.yaml")
    bad = subprocess.run([*run, "nope.yaml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "HINT:" in bad.stderr


def test_get_config_loads_the_common_lazy_configs_as_detectron2_configs_do() -> None:
    # the lines of detectron2's example lazy configs, with the prefix changed
    from omegaconf import DictConfig

    from d2engine.config import instantiate
    from d2engine.model_zoo import get_config

    train = get_config("common/train.py").train
    assert train.max_iter == 90000 and train.checkpointer == {"period": 5000, "max_to_keep": 100}
    assert set(train.ddp) == {"broadcast_buffers", "find_unused_parameters", "fp16_compression"}
    optim = get_config("common/optim.py")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optim.AdamW.params.model = model
    opt = instantiate(optim.AdamW)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {1e-4}  # base_lr follows "${..lr}"
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # no decay for norm
    schedule = instantiate(get_config("common/coco_schedule.py").lr_multiplier_1x)
    assert schedule(0.0) == pytest.approx(0.001)  # warm-up start
    assert schedule(0.5) == 1.0 and schedule(0.7) == pytest.approx(0.1)
    assert schedule(0.95) == pytest.approx(0.01)
    assert isinstance(get_config("common/train.py"), DictConfig)
    assert get_config("digits/convnet.yaml").MODEL.META_ARCHITECTURE == "ImageClassifier"
    with pytest.raises(ValueError, match="no trained weights"):
        get_config("common/train.py", trained=True)
    with pytest.raises(FileNotFoundError, match=r"common/train\.py"):
        get_config("common/nope.py")
