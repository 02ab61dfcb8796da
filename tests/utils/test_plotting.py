"""Tests for d2engine.utils.plotting: reading metrics.json (also after a resume) and the PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2engine.utils.plotting import (
    MissingPlotExtraError,
    default_panels,
    figure_size,
    load_metrics,
    plot_metrics,
)

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def _write(path: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _run(seed: int, iters: int = 100, period: int = 10, eval_at: tuple[int, ...] = (49, 99)):
    """The lines a JSONWriter writes for a short training run with evaluations."""
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    for it in range(period - 1, iters, period):
        loss = float(2.0 * math.exp(-it / (20 + 10 * seed)) + 0.05 * rng.random())
        records.append(
            {
                "iteration": it, "total_loss": loss, "loss_cls": loss * 0.7,
                "loss_box": loss * 0.3, "lr": 0.1 * (1 - it / iters), "time": 0.02,
                "data_time": 0.001, "eta_seconds": 3.0, "rank_data_time": 0.001,
            }
        )  # fmt: skip
        if it in eval_at:
            records.append({"iteration": it, "accuracy/top1": 50.0 + it / 2 + 10 * seed})
    return records


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------- load_metrics
def test_load_metrics_groups_points_by_metric(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.json", _run(0))
    curves = load_metrics(tmp_path)  # a directory holding metrics.json, or the file itself
    assert curves == load_metrics(path)
    assert [it for it, _ in curves["total_loss"]] == list(range(9, 100, 10))
    assert curves["accuracy/top1"] == [(49, 74.5), (99, 99.5)]


def test_a_resumed_run_supersedes_what_was_logged_after_its_start(tmp_path: Path) -> None:
    # A run logged up to iteration 59 and crashed; it was resumed from a checkpoint at 39,
    # logged 49 and 59 again (other values) and went on to 79. An extra point at 55 exists only
    # in the crashed part: it is superseded too.
    first = [{"iteration": it, "total_loss": 10.0 + it} for it in (9, 19, 29, 39, 49, 55, 59)]
    second = [{"iteration": it, "total_loss": 1.0 * it} for it in (49, 59, 69, 79)]
    path = _write(tmp_path / "metrics.json", first + second + [{"iteration": 79, "acc": 3.0}])
    curves = load_metrics(path)
    assert curves["total_loss"] == [
        (9, 19.0), (19, 29.0), (29, 39.0), (39, 49.0), (49, 49.0), (59, 59.0), (69, 69.0),
        (79, 79.0),
    ]  # fmt: skip
    iterations = [it for it, _ in curves["total_loss"]]
    assert iterations == sorted(set(iterations))  # no zig-zag: a function of the iteration
    assert curves["acc"] == [(79, 3.0)]


def test_a_repeated_iteration_keeps_its_last_value(tmp_path: Path) -> None:
    records = [
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 9, "total_loss": 2.0, "acc": 5.0},  # written again at the same iteration
        {"iteration": 19, "total_loss": 3.0},
    ]
    curves = load_metrics(_write(tmp_path / "metrics.json", records))
    assert curves == {"total_loss": [(9, 2.0), (19, 3.0)], "acc": [(9, 5.0)]}


def test_broken_lines_and_non_finite_values_are_skipped(tmp_path: Path) -> None:
    records = [
        {"iteration": 1, "total_loss": 1.0, "note": "text", "flag": True},
        {"iteration": 2, "total_loss": float("nan")},
        {"iteration": "3", "total_loss": 3.0},
        {"total_loss": 4.0},
    ]
    path = _write(tmp_path / "metrics.json", records, tail='[1, 2]\n{"iteration": 5, "total_lo')
    assert load_metrics(path) == {"total_loss": [(1, 1.0)]}


def test_missing_metrics_file_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No metrics file at .*HINT: give an OUTPUT_DIR"):
        load_metrics(tmp_path)


def test_default_panels() -> None:
    names = set(_run(0)[0]) | {"accuracy/top1", "loss_aux"}
    assert default_panels(names) == [
        ["total_loss"], ["loss_aux"], ["loss_box"], ["loss_cls"], ["lr"], ["time", "data_time"],
        ["accuracy/top1"],
    ]  # fmt: skip


# --------------------------------------------------------------------------- the PNG
def test_png_decodes_with_the_expected_size(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "metrics.json", _run(0))
    out = plot_metrics([tmp_path / "run"], tmp_path / "curves.png")
    assert out == str(tmp_path / "curves.png")
    pixels = _pixels(tmp_path / "curves.png")
    # 7 panels (total, box, cls losses, lr, time, accuracy) in rows of 3 at 100 dpi.
    assert figure_size(6) == (1440, 690)
    assert pixels.shape == (690, 1440, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    plot_metrics([tmp_path / "run"], tmp_path / "small.png", ["total_loss", "lr"], dpi=50)
    assert _pixels(tmp_path / "small.png").shape[:2] == (figure_size(2, 50)[1], 480)


def test_the_image_follows_the_data(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "metrics.json", _run(0))
    _write(tmp_path / "b" / "metrics.json", _run(1))
    _write(tmp_path / "a_again" / "metrics.json", _run(0))
    a = _pixels(Path(plot_metrics([tmp_path / "a"], tmp_path / "a.png", labels=["run"])))
    b = _pixels(Path(plot_metrics([tmp_path / "b"], tmp_path / "b.png", labels=["run"])))
    again = _pixels(Path(plot_metrics([tmp_path / "a_again"], tmp_path / "a2.png", labels=["run"])))
    assert a.shape == b.shape
    assert (a != b).any(axis=2).sum() > 500  # different runs: different curves
    assert np.array_equal(a, again)  # the same data: the same picture
    both = _pixels(Path(plot_metrics([tmp_path / "a", tmp_path / "b"], tmp_path / "ab.png")))
    assert not np.array_equal(both, a)  # the overlay draws a second colour
    orange = np.array([255, 127, 14])  # matplotlib's second colour (C1), for the second run
    assert (np.abs(both.astype(int) - orange).sum(axis=2) < 30).sum() > 100
    assert (np.abs(a.astype(int) - orange).sum(axis=2) < 30).sum() == 0


def test_a_resumed_run_is_drawn_as_its_final_curves(tmp_path: Path) -> None:
    # A run crashed after logging iteration 69; its checkpoint at 39 was resumed, and the
    # resumed part logged 49 on. What the crashed run logged after 39 differs (other values).
    clean = _run(0)
    crashed = [r if r["iteration"] <= 39 else {k: 5.0 for k in r} | {"iteration": r["iteration"]}
               for r in clean if r["iteration"] <= 69]  # fmt: skip
    resumed = crashed + [r for r in clean if r["iteration"] > 39]
    _write(tmp_path / "clean" / "metrics.json", clean)
    _write(tmp_path / "resumed" / "metrics.json", resumed)
    got = plot_metrics([tmp_path / "resumed"], tmp_path / "r.png", labels=["run"])
    want = plot_metrics([tmp_path / "clean"], tmp_path / "c.png", labels=["run"])
    assert np.array_equal(_pixels(Path(got)), _pixels(Path(want)))


def test_metrics_selects_panels_by_name_or_pattern(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.json", _run(0))
    plot_metrics([tmp_path], tmp_path / "sel.png", ["loss_*", "accuracy/*"])
    assert _pixels(tmp_path / "sel.png").shape[:2] == figure_size(3)[::-1]
    with pytest.raises(ValueError, match=r"--metrics 'acc' matches none of the metrics"):
        plot_metrics([tmp_path], tmp_path / "x.png", ["acc"])
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_metrics([tmp_path], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="smoothing must be in"):
        plot_metrics([tmp_path], tmp_path / "x.png", smoothing=1.0)


def test_nothing_to_plot_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.json", [{"iteration": 1, "eta_seconds": 2.0}])
    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_metrics([tmp_path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "metrics.json", _run(0))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingPlotExtraError, match=r"pip install 'd2engine\[plot\]'"):
        plot_metrics([tmp_path], tmp_path / "x.png")
