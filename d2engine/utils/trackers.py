"""Event writers for experiment trackers and spreadsheets: MLflow, Weights & Biases, CSV.

Like :class:`~d2engine.utils.events.JSONWriter`, each :meth:`write` reads the current
:class:`~d2engine.utils.events.EventStorage` and sends the scalars newer than its last write, at
the iteration they were logged at (scalars logged with ``smoothing_hint=True`` as the median over
``window_size`` iterations). The tracker writers also log the run's config once, as parameters
or config, and the images queued by ``put_image``. They write on the main process only (elsewhere
they do nothing) and start their run at the first :meth:`write`; :meth:`close` ends it (as
failed when called while an exception propagates, e.g. from a crashed training loop).

MLflow and W&B are optional extras: ``pip install 'd2engine[mlflow]'`` or ``'d2engine[wandb]'``.
The writers are re-exported by :mod:`d2engine.utils.events`.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from d2engine.utils import comm
from d2engine.utils.event_writers import EventWriter
from d2engine.utils.events import EventStorage, get_event_storage

__all__ = ["CSVWriter", "MLflowWriter", "WandbWriter"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- shared helpers
def _require(module: str, writer: str, extra: str) -> None:
    """Raise an ImportError naming the extra when ``module`` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(
            f"{writer} needs the '{module}' package, which is not installed. HINT: "
            f"pip install 'd2engine[{extra}]'."
        )


def _scalars_by_iteration(
    storage: EventStorage, window_size: int, after: int
) -> dict[int, dict[str, float]]:
    """The scalars logged at iterations > ``after``, grouped by iteration (smoothed ones as the
    median over ``window_size`` iterations, as every writer reports them)."""
    by_iter: dict[int, dict[str, float]] = defaultdict(dict)
    for name, (value, itr) in storage.latest_with_smoothing_hint(window_size).items():
        if itr > after:
            by_iter[itr][name] = value
    return dict(sorted(by_iter.items()))


class _ImageCursor:
    """Which of the storage's queued images a writer has not logged yet.

    ``put_image`` appends to a queue that a :class:`~d2engine.utils.events.TensorboardXWriter`
    empties after writing it; a writer placed before it in the list sees every image once.
    """

    def __init__(self) -> None:
        self._queue: list[Any] | None = None
        self._seen = 0

    def new_images(self, storage: EventStorage) -> list[tuple[str, torch.Tensor, int]]:
        queue = storage._vis_data
        start = self._seen if queue is self._queue else 0
        self._queue, self._seen = queue, len(queue)
        return list(queue[start:])


def _image_hwc_uint8(img: torch.Tensor) -> np.ndarray:
    """A CHW image tensor (float in [0, 1] or uint8) as an HWC uint8 array."""
    array = img.detach().cpu()
    if array.ndim == 2:
        array = array.unsqueeze(0)
    if array.dtype != torch.uint8:
        array = (array.float().clamp(0, 1) * 255).round().to(torch.uint8)
    hwc = array.permute(1, 2, 0).numpy()
    return hwc[:, :, 0] if hwc.shape[2] == 1 else hwc


def _config_to_dict(config: Any) -> dict[str, Any]:
    """A CfgNode, omegaconf DictConfig or mapping as plain nested dicts of plain values."""
    if config is None:
        return {}
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=False)  # type: ignore[return-value]

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a CfgNode, DictConfig or mapping, got {type(config).__name__}. "
            "HINT: pass cfg (or dict(...) of what to log)."
        )
    return plain(config)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_yaml(config: Any) -> str:
    if hasattr(config, "dump"):
        return str(config.dump())
    return yaml.safe_dump(_config_to_dict(config), sort_keys=False)


def _failing() -> bool:
    """Whether an exception is propagating (close() called from a ``finally`` after a crash)."""
    return sys.exc_info()[1] is not None


# --------------------------------------------------------------------------- CSV
class CSVWriter(EventWriter):
    """Write scalars to a CSV file: an ``iteration`` column, then one column per scalar.

    Each :meth:`write` appends a row for every iteration with values newer than the last row
    (smoothed scalars as the median over ``window_size`` iterations); a scalar that was not
    logged at an iteration leaves its cell empty. When a new scalar appears (e.g. the first
    evaluation), the file is rewritten once with the new column. An existing file is continued
    (a resumed run may repeat iterations; the later row is the newer value). Read it with
    ``csv.DictReader`` or ``pandas.read_csv``. Images are not written. Main process only.

    Args:
        csv_file: the file (parent directories are created).
        window_size: the smoothing window for scalars logged with ``smoothing_hint=True``.
    """

    def __init__(self, csv_file: str | os.PathLike[str], window_size: int = 20) -> None:
        self._path = os.fspath(csv_file)
        self._window_size = window_size
        self._last_write = -1
        self._columns: list[str] = ["iteration"]
        self._file: io.TextIOWrapper | None = None
        if os.path.isfile(self._path) and os.path.getsize(self._path) > 0:
            with open(self._path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header and header[0] == "iteration":
                self._columns = header

    def _open(self) -> io.TextIOWrapper:
        if self._file is None:
            parent = os.path.dirname(self._path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            new = not os.path.isfile(self._path) or os.path.getsize(self._path) == 0
            self._file = open(self._path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            if new:
                csv.writer(self._file).writerow(self._columns)
        return self._file

    def _add_columns(self, names: list[str]) -> None:
        """Rewrite the file with ``names`` appended to the header (atomically)."""
        self._columns = self._columns + names
        if self._file is not None:
            self._file.close()
            self._file = None
        if not os.path.isfile(self._path):  # _open writes the header
            return
        with open(self._path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        tmp = f"{self._path}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self._columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self._path)

    def write(self) -> None:
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.wait_pending()
        by_iter = _scalars_by_iteration(storage, self._window_size, self._last_write)
        if not by_iter:
            return
        known = set(self._columns)
        new = sorted({k for values in by_iter.values() for k in values} - known)
        if new:
            self._add_columns(new)
        writer = csv.DictWriter(self._open(), self._columns, restval="")
        for itr, values in by_iter.items():
            writer.writerow({"iteration": itr, **{k: repr(float(v)) for k, v in values.items()}})
        self._last_write = max(by_iter)
        assert self._file is not None
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._file.close()
        self._file = None


# --------------------------------------------------------------------------- MLflow
_MLFLOW_BAD_CHARS = re.compile(r"[^\w\-. :/]")
_MLFLOW_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
_MLFLOW_PARAMS_BATCH = 100  # params per log_batch call (MLflow's limit)


def _mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: characters other than letters, digits, ``_-. :/`` become
    ``_`` (``[metric]grad_scaler`` -> ``_metric_grad_scaler``)."""
    return _MLFLOW_BAD_CHARS.sub("_", name)


class MLflowWriter(EventWriter):
    """Log scalars, the config and images to an MLflow run.

    The run starts at the first :meth:`write`: a new run of experiment ``experiment_name``
    (created if needed), or the run ``run_id`` (to continue a resumed training), or the active
    run of ``mlflow.start_run()`` when there is one (then :meth:`close` leaves it open). A new run
    gets the config as parameters (dotted keys such as ``SOLVER.BASE_LR``, values as text) and as
    the artifact ``config.yaml``. Each write logs the scalars newer than the last one in one
    batch, with ``step`` = the storage iteration; names are made MLflow-safe (see
    :func:`_mlflow_key`). Images from ``put_image`` are logged with ``log_image(key, step)``
    (needs pillow); put this writer before a ``TensorboardXWriter``, which empties the image
    queue. :meth:`close` ends the run (``FINISHED``, or ``FAILED`` during an exception). Main
    process only.

    Args:
        experiment_name: the MLflow experiment.
        run_name: the run's name; None lets MLflow choose one.
        tracking_uri: where runs are stored (``http://host:5000``, ``sqlite:///mlflow.db``,
            ``databricks``); None uses MLflow's default (``MLFLOW_TRACKING_URI``, ...).
        config: the config to log (a CfgNode, DictConfig or mapping); None logs none.
        tags: tags of a new run.
        run_id: continue this run instead of starting one.
        window_size: the smoothing window for scalars logged with ``smoothing_hint=True``.

    Raises:
        ImportError: MLflow is not installed (``pip install 'd2engine[mlflow]'``).
    """

    def __init__(
        self,
        experiment_name: str = "d2engine",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        config: Any = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        window_size: int = 20,
    ) -> None:
        _require("mlflow", "MLflowWriter", "mlflow")
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self._config = config
        self._tags = dict(tags or {})
        self._run_id = run_id
        self._window_size = window_size
        self._client: Any = None
        self._owns_run = True
        self._last_write = -1
        self._images = _ImageCursor()

    @property
    def run_id(self) -> str | None:
        """The id of the MLflow run (None before the first write)."""
        return self._run_id if self._client is not None else None

    def _start(self) -> Any:
        if self._client is not None:
            return self._client
        import mlflow  # optional: the mlflow extra

        client = mlflow.tracking.MlflowClient(tracking_uri=self._tracking_uri)
        active = mlflow.active_run()
        if self._run_id is None and active is not None:
            self._run_id, self._owns_run = active.info.run_id, False
        elif self._run_id is not None:
            client.update_run(self._run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(self._experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(self._experiment_name)
            )
            run = client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
            self._run_id = run.info.run_id
            self._log_config(client)
        self._client = client
        return client

    def _log_config(self, client: Any) -> None:
        if self._config is None:
            return
        from mlflow.entities import Param  # optional: the mlflow extra

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # optional: the mlflow extra
        except ImportError:  # pragma: no cover - older MLflow
            MAX_PARAM_VAL_LENGTH = 500  # noqa: N806
        params = [
            Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in _flatten(_config_to_dict(self._config)).items()
        ]
        for i in range(0, len(params), _MLFLOW_PARAMS_BATCH):
            client.log_batch(self._run_id, params=params[i : i + _MLFLOW_PARAMS_BATCH])
        client.log_text(self._run_id, _config_yaml(self._config), "config.yaml")

    def write(self) -> None:
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.wait_pending()
        by_iter = _scalars_by_iteration(storage, self._window_size, self._last_write)
        images = self._images.new_images(storage)
        if not by_iter and not images:
            return
        from mlflow.entities import Metric  # optional: the mlflow extra

        client = self._start()
        now = int(time.time() * 1000)
        metrics = [
            Metric(_mlflow_key(k), float(v), now, itr)
            for itr, values in by_iter.items()
            for k, v in values.items()
        ]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            client.log_batch(self._run_id, metrics=metrics[i : i + _MLFLOW_BATCH])
        for name, img, itr in images:
            client.log_image(self._run_id, _image_hwc_uint8(img), key=_mlflow_key(name), step=itr)
        if by_iter:
            self._last_write = max(by_iter)

    def close(self) -> None:
        if self._client is None:
            return
        if self._owns_run:
            status = "FAILED" if _failing() else "FINISHED"
            self._client.set_terminated(self._run_id, status=status)
        self._client = None


# --------------------------------------------------------------------------- W&B
class WandbWriter(EventWriter):
    """Log scalars, the config and images to a Weights & Biases run.

    The run starts at the first :meth:`write` with ``wandb.init(project=..., config=...)`` and
    the config as W&B config (nested, shown with dotted keys), unless a run is already active
    (``wandb.init`` called by the user), which is used and left open by :meth:`close`. Each write
    calls ``run.log(values, step=iteration)`` once per iteration, in increasing order; images
    from ``put_image`` are logged as ``wandb.Image`` at their iteration (needs pillow; put this
    writer before a ``TensorboardXWriter``, which empties the image queue). :meth:`close` finishes
    the run (exit code 1 during an exception). Main process only. Offline runs
    (``mode="offline"``) are written under ``dir`` and uploaded later with ``wandb sync``.

    Args:
        project: the W&B project.
        entity: the user or team; None: the default entity.
        name: the run's display name; None lets W&B choose one.
        config: the config to log (a CfgNode, DictConfig or mapping); None logs none.
        dir: the directory of W&B's local files (its ``wandb/`` folder); None: W&B's default.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; None: W&B's default
            (``WANDB_MODE``, else online).
        window_size: the smoothing window for scalars logged with ``smoothing_hint=True``.
        **init_kwargs: more arguments of ``wandb.init`` (``tags``, ``group``, ``id``,
            ``resume``, ...).

    Raises:
        ImportError: wandb is not installed (``pip install 'd2engine[wandb]'``).
    """

    def __init__(
        self,
        project: str = "d2engine",
        entity: str | None = None,
        name: str | None = None,
        config: Any = None,
        dir: str | os.PathLike[str] | None = None,  # noqa: A002 (wandb.init's name)
        mode: str | None = None,
        window_size: int = 20,
        **init_kwargs: Any,
    ) -> None:
        _require("wandb", "WandbWriter", "wandb")
        self._init_kwargs = {
            "project": project,
            "entity": entity,
            "name": name,
            "config": _config_to_dict(config) if config is not None else None,
            "dir": os.fspath(dir) if dir is not None else None,
            "mode": mode,
            **init_kwargs,
        }
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
        self._window_size = window_size
        self._run: Any = None
        self._owns_run = True
        self._last_write = -1
        self._images = _ImageCursor()

    @property
    def run(self) -> Any:
        """The ``wandb`` run (None before the first write)."""
        return self._run

    def _start(self) -> Any:
        if self._run is None:
            import wandb  # optional: the wandb extra

            if wandb.run is not None:
                self._run, self._owns_run = wandb.run, False
            else:
                kwargs = {k: v for k, v in self._init_kwargs.items() if v is not None}
                self._run = wandb.init(**kwargs)
        return self._run

    def write(self) -> None:
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.wait_pending()
        by_iter = _scalars_by_iteration(storage, self._window_size, self._last_write)
        images = self._images.new_images(storage)
        if not by_iter and not images:
            return
        import wandb  # optional: the wandb extra

        run = self._start()
        logs: dict[int, dict[str, Any]] = defaultdict(dict)
        for itr, values in by_iter.items():
            logs[itr].update(values)
        for name, img, itr in images:
            logs[itr][name] = wandb.Image(_image_hwc_uint8(img))
        for itr in sorted(logs):
            run.log(logs[itr], step=itr)
        if by_iter:
            self._last_write = max(by_iter)

    def close(self) -> None:
        if self._run is None:
            return
        if self._owns_run:
            self._run.finish(exit_code=1 if _failing() else 0)
        self._run = None
