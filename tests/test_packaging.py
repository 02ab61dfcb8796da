"""The project as a distribution: pyproject metadata, the CHANGELOG, and a wheel that works.

The slow tests build an sdist and a wheel (from the sdist) with ``python -m build`` and this
environment's setuptools (no network), install the wheel into a fresh venv outside the repository
(its dependencies come from this environment through a ``.pth`` file; the wheel itself with
``--no-deps``), and train the shipped digits demo with the installed ``d2engine-train``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration, read_configuration
from setuptools.dist import Distribution

import d2engine

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = read_configuration(REPO / "pyproject.toml", expand=False)  # tomllib is 3.11+
VERSION = PYPROJECT["project"]["version"]


def test_version_matches_the_package_and_the_changelog() -> None:
    assert d2engine.__version__ == VERSION
    headings = re.findall(r"^## (.+)$", (REPO / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    # Keep a Changelog: new entries go under "[Unreleased]", above the newest release.
    assert headings[0] == "[Unreleased]"
    releases = [h for h in headings[1:] if re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d\d-\d\d", h)]
    assert releases == headings[1:], f"malformed release headings: {headings[1:]}"
    assert releases[0].startswith(f"[{VERSION}] - "), (releases[0], VERSION)


def test_setuptools_reads_the_metadata_without_deprecation_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # setuptools' license deprecations would raise here
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [c for c in dist.metadata.get_classifiers() if c.startswith("License ::")]


def test_build_requirements_are_what_the_dev_extra_installs() -> None:
    # `python -m build --no-isolation` (below) checks [build-system] requires against the
    # environment, so every build requirement must come with the dev extra.
    dev = set(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert set(PYPROJECT["build-system"]["requires"]) <= dev
    assert any(req.startswith("build") for req in dev)


# ----------------------------------------------------------------------- build and install
def _copy_source(dest: Path) -> Path:
    """Copy the checkout (without VCS, venvs and build outputs): a build writes into its source."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "output", ".*_cache"
    )
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


def _run(cmd: list[str], cwd: Path, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-4000:]}"
    return output


def _fresh_venv(path: Path) -> Path:
    """A venv without pip whose dependencies come from this interpreter's site-packages."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], path.parent, 120)
    python = path / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        path.parent,
        60,
    ).strip()
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(purelib) / "_d2engine_test_deps.pth").write_text("\n".join(ours) + "\n")
    return python


def _pip_install(python: Path, *args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-v"]
    return _run([*cmd, "--no-deps", "--no-index", "--no-build-isolation", *args], cwd, 300)


def _no_deprecation(output: str) -> None:
    lines = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert not lines, "the build printed deprecation warnings:\n" + "\n".join(lines)


@pytest.mark.slow
def test_wheel_from_sdist_installs_into_a_fresh_venv_and_trains_the_demo(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "source")
    dist = tmp_path / "dist"
    # No target: build makes the sdist, then the wheel from the unpacked sdist, so a file that
    # the sdist misses fails here.
    output = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist)], source, 300
    )
    _no_deprecation(output)
    (sdist,) = dist.glob(f"d2engine-{VERSION}.tar.gz")
    (wheel,) = dist.glob(f"d2engine-{VERSION}-py3-none-any.whl")

    with tarfile.open(sdist) as tar:
        sdist_names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"} <= sdist_names
    assert "d2engine/model_zoo/configs/digits/convnet.yaml" in sdist_names
    assert not [name for name in sdist_names if name.startswith("tests/")]
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = set(whl.namelist())
    assert {
        "d2engine/py.typed",
        "d2engine/model_zoo/configs/digits/convnet.yaml",
        "d2engine/model_zoo/configs/digits/Base-Digits.yaml",
        f"d2engine-{VERSION}.dist-info/licenses/LICENSE",
    } <= wheel_names

    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _pip_install(python, str(wheel), cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import d2engine; print(d2engine.__file__)"], work, 120)
    assert Path(where.strip()).is_relative_to(venv), where
    config = _run([str(python), "-m", "d2engine.model_zoo", "digits/convnet.yaml"], work, 120)
    config = config.strip()
    assert Path(config).is_relative_to(venv), config

    train = [str(venv / "bin" / "d2engine-train"), "--config-file", config]
    overrides = [
        "SOLVER.MAX_ITER",
        "10",
        "SOLVER.WARMUP_ITERS",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "10",
        "TEST.EVAL_PERIOD",
        "0",
        "TEST.EXPECTED_RESULTS",
        "[]",
        "OUTPUT_DIR",
        "out",
    ]
    log = _run([*train, *overrides], work, 300)
    assert "accuracy/top1" in log, log[-2000:]
    assert (work / "out" / "model_final.pth").is_file()
    assert (work / "out" / "metrics.json").is_file()
    assert (work / "out" / "curves.png").is_file()  # drawn by the trainer (matplotlib is here)
    plotted = _run([str(venv / "bin" / "d2engine-plot"), "out", "--out", "again.png"], work, 120)
    assert plotted.strip() == "again.png" and (work / "again.png").is_file()
    # The environment table at the start of the log names the d2engine that ran.
    assert re.search(rf"^d2engine\s+\| {re.escape(VERSION)} @{re.escape(str(venv))}/", log, re.M)


@pytest.mark.slow
def test_editable_install_prints_no_deprecation_warning(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "source")
    python = _fresh_venv(tmp_path / "venv")
    output = _pip_install(python, "-e", str(source), cwd=tmp_path)
    _no_deprecation(output)
    assert "Successfully installed d2engine" in output
