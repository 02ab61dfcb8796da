"""Tests for d2engine.engine.writers: the event writers a config names (OUTPUT.WRITERS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from d2engine.config import get_cfg
from d2engine.engine.defaults import default_writers
from d2engine.engine.writers import WRITER_NAMES, writers_from_config
from d2engine.utils.events import (
    CommonMetricPrinter,
    CSVWriter,
    JSONWriter,
    MLflowWriter,
    TensorboardXWriter,
    WandbWriter,
)


def test_default_config_gives_the_default_writers(tmp_path: Path) -> None:
    writers = default_writers(str(tmp_path / "out"), 100, cfg=get_cfg())
    assert [type(w) for w in writers] == [CommonMetricPrinter, JSONWriter, TensorboardXWriter]
    assert writers[0]._max_iter == 100
    for w in writers:
        w.close()


def test_writers_in_order_with_tensorboard_last(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    cfg = get_cfg()
    cfg.OUTPUT.WRITERS = ["tensorboard", "csv", "json", "mlflow", "wandb", "csv"]
    cfg.OUTPUT.MLFLOW.EXPERIMENT_NAME = "exp"
    cfg.OUTPUT.MLFLOW.TRACKING_URI = "sqlite:///x.db"
    cfg.OUTPUT.WANDB.PROJECT = "proj"
    cfg.OUTPUT.WANDB.MODE = "offline"
    writers = writers_from_config(cfg, str(tmp_path))
    # TensorboardXWriter empties the image queue: it runs after the trackers that read it.
    assert [type(w) for w in writers] == [
        CSVWriter, JSONWriter, MLflowWriter, WandbWriter, TensorboardXWriter,
    ]  # fmt: skip
    csv_writer, _, mlflow_writer, wandb_writer, _ = writers
    assert csv_writer._path == str(tmp_path / "metrics.csv")
    assert mlflow_writer._experiment_name == "exp" and mlflow_writer._run_name is None
    assert mlflow_writer._tracking_uri == "sqlite:///x.db" and mlflow_writer._config is cfg
    kwargs = wandb_writer._init_kwargs
    assert (kwargs["project"], kwargs["mode"], kwargs["entity"]) == ("proj", "offline", None)
    assert (
        kwargs["dir"] == str(tmp_path) and kwargs["config"]["OUTPUT"]["WANDB"]["PROJECT"] == "proj"
    )
    for w in writers:
        w.close()  # the trackers never started a run: nothing was written


def test_unknown_writer_names_are_an_error(tmp_path: Path) -> None:
    cfg = get_cfg()
    cfg.OUTPUT.WRITERS = ["json", "tensorbaord"]
    with pytest.raises(ValueError, match=r"unknown writer names \['tensorbaord'\]; known: "):
        writers_from_config(cfg, str(tmp_path))
    assert set(WRITER_NAMES) == {"console", "json", "tensorboard", "csv", "mlflow", "wandb"}


def test_a_tracker_without_its_extra_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = get_cfg()
    cfg.OUTPUT.WRITERS = ["json", "mlflow"]
    with pytest.raises(ImportError, match=r"pip install 'd2engine\[mlflow\]'"):
        writers_from_config(cfg, str(tmp_path))
