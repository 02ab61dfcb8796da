"""Tests for d2engine.tools.predict: the d2engine-predict command on a PNG of a digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

import d2engine.data.datasets  # noqa: E402,F401
from d2engine.config import get_cfg  # noqa: E402
from d2engine.data import DatasetCatalog  # noqa: E402
from d2engine.modeling import build_model  # noqa: E402
from d2engine.modeling.classifier import add_classifier_config  # noqa: E402
from d2engine.tools.predict import cli, read_bgr_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "digits" / "convnet.yaml")


def _digits_cfg():
    cfg = get_cfg()
    add_classifier_config(cfg)
    cfg.merge_from_file(CONFIG)
    return cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module]:
    """Weights of a digits model fitted for a few steps (enough to be far from uniform)."""
    torch.manual_seed(0)
    model = build_model(_digits_cfg())
    data = DatasetCatalog.get("digits_train")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(30):
        loss = model(data[step * 32 : (step + 1) * 32])["loss_cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path), model.eval()


def _write_png(path: Path, item: dict, scale: int = 1) -> None:
    gray = item["image"][0].numpy()
    img = Image.fromarray(gray, mode="L")
    if scale > 1:
        img = img.resize((8 * scale, 8 * scale), Image.NEAREST)
    img.save(path)


def test_predict_png_matches_the_model(weights, tmp_path: Path, capsys) -> None:
    path, model = weights
    item = DatasetCatalog.get("digits_test")[3]
    png = tmp_path / "digit.png"
    _write_png(png, item)
    # Reading the PNG gives the dataset's pixels back (as gray BGR).
    bgr = read_bgr_image(str(png))
    assert bgr.shape == (8, 8, 3) and np.array_equal(bgr[:, :, 0], item["image"][0].numpy())

    assert cli(["--config-file", CONFIG, "--input", str(png), "--json", "MODEL.WEIGHTS", path]) == 0
    info = json.loads(capsys.readouterr().out.strip())
    with torch.no_grad():
        expected = model([item])[0]
    assert info["pred_class"] == expected["pred_class"]
    assert info["pred_name"] == str(expected["pred_class"])  # the class name from the metadata
    assert info["score"] == pytest.approx(
        float(expected["scores"][expected["pred_class"]]), abs=1e-5
    )
    assert len(info["top_k"]) == 3


def test_predict_resizes_large_png_and_prints_text(weights, tmp_path: Path, capsys) -> None:
    path, model = weights
    item = DatasetCatalog.get("digits_test")[5]
    big = tmp_path / "big.png"
    _write_png(big, item, scale=4)  # 32x32: DefaultPredictor resizes it to 8x8
    assert cli(["--config-file", CONFIG, "--input", str(big), "MODEL.WEIGHTS", path]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{big}: ") and "top-3" in line


def test_predict_uses_last_checkpoint_or_explains(weights, tmp_path: Path, capsys) -> None:
    path, _ = weights
    out = tmp_path / "out"
    out.mkdir()
    png = tmp_path / "d.png"
    _write_png(png, DatasetCatalog.get("digits_test")[0])
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS is empty"):
        cli(["--config-file", CONFIG, "--input", str(png), "OUTPUT_DIR", str(out)])
    os.symlink(path, out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    assert cli(["--config-file", CONFIG, "--input", str(png), "OUTPUT_DIR", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{png}: ")
    # An unreadable input is reported and gives exit status 1.
    assert (
        cli(
            [
                "--config-file",
                CONFIG,
                "--input",
                str(tmp_path / "missing.png"),
                "MODEL.WEIGHTS",
                path,
            ]
        )
        == 1
    )


def test_invert(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    Image.fromarray(np.full((4, 4), 10, dtype=np.uint8), mode="L").save(png)
    assert int(read_bgr_image(str(png), invert=True)[0, 0, 0]) == 245


def test_predict_entry_point_subprocess(weights, tmp_path: Path) -> None:
    path, _ = weights
    png = tmp_path / "digit.png"
    _write_png(png, DatasetCatalog.get("digits_test")[1])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "d2engine.tools.predict",
            "--config-file",
            CONFIG,
            "--input",
            str(png),
            "MODEL.WEIGHTS",
            path,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{png}: ")


def test_parse_args_splits_inputs_and_overrides(tmp_path: Path, monkeypatch) -> None:
    from d2engine.tools.predict import parse_args

    args = parse_args(
        [
            "--config-file",
            "c.yaml",
            "--input",
            "a.png",
            "b.png",
            "MODEL.WEIGHTS",
            "w.pth",
            "OUTPUT_DIR",
            "x",
        ]
    )
    assert args.input == ["a.png", "b.png"]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "OUTPUT_DIR", "x"]
    args = parse_args(["--config-file", "c.yaml", "--input", "Model.v2.png"])
    assert args.input == ["Model.v2.png"] and args.opts == []
    # An upper-case name that is an existing file stays an input.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IMG_01.PNG").write_bytes(b"")
    args = parse_args(["--config-file", "c.yaml", "--input", "IMG_01.PNG", "SEED", "1"])
    assert args.input == ["IMG_01.PNG"] and args.opts == ["SEED", "1"]
    with pytest.raises(SystemExit):
        parse_args(["--config-file", "c.yaml", "--input", "MODEL.WEIGHTS", "w.pth"])
