"""Tests for d2engine.utils.trackers: CSVWriter, and MLflowWriter / WandbWriter against the real
libraries (MLflow on a local SQLite store, W&B in offline mode; no network)."""

from __future__ import annotations

import csv
import glob
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from d2engine.config import get_cfg
from d2engine.utils import trackers
from d2engine.utils.events import CSVWriter, EventStorage, EventWriter, MLflowWriter, WandbWriter

# MLflow's SQL store calls an SQLAlchemy loader option deprecated in SQLAlchemy 2.1.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _log(writer: EventWriter, fail: bool = False) -> dict[tuple[str, int], float]:
    """Six iterations: a smoothed loss, an unsmoothed lr, a name MLflow refuses, an image at
    iteration 2 and an evaluation result at 5; the writer writes after iterations 2 and 5.

    Returns:
        What every writer must report: (name, iteration) -> value, read from the storage with
        the writers' smoothing (window 2) just before each write.
    """
    expected: dict[tuple[str, int], float] = {}
    last = -1
    with EventStorage(0) as storage:
        for it in range(6):
            storage.iter = it
            storage.put_scalar("total_loss", torch.tensor(1.0 / (it + 1)))
            storage.put_scalar("lr", 0.1 * (it + 1), smoothing_hint=False)
            storage.put_scalar("[metric]scale", 2.0**it, smoothing_hint=False)
            if it == 2:
                storage.put_image("viz/sample", torch.linspace(0, 1, 3 * 4 * 5).reshape(3, 4, 5))
            if it == 5:
                storage.put_scalar("accuracy/top1", 97.5, smoothing_hint=False)
            if it in (2, 5):
                for name, (value, itr) in storage.latest_with_smoothing_hint(2).items():
                    if itr > last:
                        expected[(name, itr)] = value
                last = it
                writer.write()
        if fail:
            try:
                raise RuntimeError("training failed")
            except RuntimeError:
                writer.close()  # as PeriodicWriter.after_train does, in a `finally`
        else:
            writer.close()
    return expected


def test_smoothing_is_the_writers_window() -> None:
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            storage.put_scalar("total_loss", 1.0 / (it + 1))
        values = storage.latest_with_smoothing_hint(2)
    assert values["total_loss"] == (pytest.approx((1 / 2 + 1 / 3) / 2), 2)


# --------------------------------------------------------------------------- CSV
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_writer_rows_per_iteration_and_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "out" / "metrics.csv"
    expected = _log(CSVWriter(path, window_size=2))
    rows = _read_csv(path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[0] == "iteration" and header[-1] == "accuracy/top1"  # added at iteration 5
    assert [r["iteration"] for r in rows] == ["2", "5"]
    got = {
        (k, int(r["iteration"])): float(v)
        for r in rows
        for k, v in r.items()
        if v and k != "iteration"
    }
    assert got == pytest.approx(expected)
    assert rows[0]["accuracy/top1"] == ""  # not logged at iteration 2: an empty cell


def test_csv_writer_continues_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    _log(CSVWriter(path, window_size=2))
    with EventStorage(6) as storage:  # a resumed run
        writer = CSVWriter(path)
        storage.put_scalar("lr", 0.7, smoothing_hint=False)
        writer.write()
        writer.close()
    rows = _read_csv(path)
    assert [r["iteration"] for r in rows] == ["2", "5", "6"]
    assert rows[-1]["lr"] == "0.7" and rows[-1]["total_loss"] == ""
    assert path.read_text().count("iteration") == 1


def test_tracker_writers_do_nothing_off_the_main_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trackers.comm, "is_main_process", lambda: False)
    _log(CSVWriter(tmp_path / "metrics.csv"))
    assert not (tmp_path / "metrics.csv").exists()


def test_a_missing_extra_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"MLflowWriter needs .*pip install 'd2engine\[mlflow\]'"):
        MLflowWriter()
    with pytest.raises(ImportError, match=r"WandbWriter needs .*pip install 'd2engine\[wandb\]'"):
        WandbWriter()


# --------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); each test uses its
    own experiment."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts go to ./mlruns
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return mlflow_db


def _only_run(client: Any, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run


def test_mlflow_writer_logs_metrics_params_config_and_images(mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.25
    writer = MLflowWriter("d2-test", run_name="r1", tracking_uri=mlflow_store, config=cfg,
                          tags={"team": "vision"}, window_size=2)  # fmt: skip
    expected = _log(writer)
    client = MlflowClient(tracking_uri=mlflow_store)
    run = _only_run(client, "d2-test")
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision"
    names = {"total_loss", "lr", "_metric_scale", "accuracy/top1"}  # "[metric]" made MLflow-safe
    assert set(run.data.metrics) == names
    got = {
        (name if name != "_metric_scale" else "[metric]scale", m.step): m.value
        for name in names
        for m in client.get_metric_history(run.info.run_id, name)
    }
    assert got == pytest.approx(expected)
    assert run.data.params["SOLVER.BASE_LR"] == "0.25"
    assert run.data.params["OUTPUT.WRITERS"] == "['console', 'json', 'tensorboard']"
    assert len(run.data.params) == len(trackers._flatten(trackers._config_to_dict(cfg)))
    text = Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()
    assert "BASE_LR: 0.25" in text
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    # log_image(key="viz/sample", step=2): MLflow names the file "viz~sample+step+2+...".
    assert any(a.startswith("images/viz~sample+step+2+") and a.endswith(".png") for a in artifacts)


def test_mlflow_run_fails_when_closed_during_an_exception(mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    _log(MLflowWriter("d2-fail", tracking_uri=mlflow_store), fail=True)
    run = _only_run(MlflowClient(tracking_uri=mlflow_store), "d2-fail")
    assert run.info.status == "FAILED"


def test_mlflow_writer_continues_a_run_or_joins_the_active_one(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    first = MLflowWriter("d2-resume", tracking_uri=mlflow_store)
    _log(first)
    run_id = _only_run(client, "d2-resume").info.run_id
    with EventStorage(10) as storage:
        again = MLflowWriter(tracking_uri=mlflow_store, run_id=run_id)
        storage.put_scalar("lr", 0.5, smoothing_hint=False)
        again.write()
        assert again.run_id == run_id
        again.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")][-1] == (10, 0.5)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    with mlflow.start_run(experiment_id=client.create_experiment("d2-active")) as active:
        joined = MLflowWriter(tracking_uri=mlflow_store)
        with EventStorage(3) as storage:
            storage.put_scalar("lr", 0.3, smoothing_hint=False)
            joined.write()
            joined.close()
        assert client.get_run(active.info.run_id).info.status == "RUNNING"  # left open
    assert client.get_metric_history(active.info.run_id, "lr")[0].value == 0.3


# --------------------------------------------------------------------------- W&B
def _wandb_records(run_dir: Path) -> list[Any]:
    """Decode an offline run's ``run-*.wandb`` file: a W&B header, then LevelDB-log framing
    (32 KiB blocks; records of 7-byte headers: crc32c, length, type full/first/middle/last)
    around ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0
            continue
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    wandb = pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # wandb.init sets it: restored after
    yield wandb
    wandb.teardown()  # stop the background service process


def _history(records: list[Any]) -> dict[tuple[str, int], Any]:
    """(key, step) -> value of the history records; a media value's fields (nested keys such as
    ["viz/sample", "width"]) are gathered into a dict."""
    out: dict[tuple[str, int], Any] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        items: dict[str, Any] = {}
        for item in r.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            value = json.loads(item.value_json)
            if len(path) == 1:
                items[path[0]] = value
            else:
                items.setdefault(path[0], {})[path[1]] = value
        for key, value in items.items():
            if not key.startswith("_"):
                out[(key, items["_step"])] = value
    return out


def test_wandb_writer_offline_run_holds_history_config_and_images(
    tmp_path: Path, wandb_offline: Any
) -> None:
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.25
    writer = WandbWriter(project="d2-test", name="r1", config=cfg, dir=tmp_path / "out",
                         mode="offline", window_size=2)  # fmt: skip
    expected = _log(writer)
    wandb_offline.teardown()  # every record is on disk once the service stopped
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    records = _wandb_records(run_dir)
    history = _history(records)
    image = history.pop(("viz/sample", 2))
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (5, 4)
    assert history == pytest.approx(expected)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "r1" and run.project == "d2-test"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["SOLVER"]["BASE_LR"] == 0.25 and config["OUTPUT"]["WRITERS"][0] == "console"
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]


def test_wandb_run_exits_with_1_when_closed_during_an_exception(
    tmp_path: Path, wandb_offline: Any
) -> None:
    _log(WandbWriter(project="d2-test", dir=tmp_path, mode="offline"), fail=True)
    wandb_offline.teardown()  # the service writes the exit record last: wait until it is written
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    exits = [
        r.exit.exit_code for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "exit"
    ]
    assert exits == [1]
