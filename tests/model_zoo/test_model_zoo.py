"""Tests for d2engine.model_zoo: the configs shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
