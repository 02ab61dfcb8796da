"""The event writers of a job: :func:`default_writers` and those a config names.

:func:`default_writers` (detectron2's, re-exported by :mod:`d2engine.engine.defaults`) gives the
console, ``metrics.json`` and TensorBoard writers, or, with a config, :func:`writers_from_config`:
the writers of ``OUTPUT.WRITERS`` with the trackers' settings (and so those of
``DefaultTrainer.build_writers``); see the ``OUTPUT`` block of :mod:`d2engine.config.defaults` for
the keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from d2engine.config import CfgNode
from d2engine.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter
from d2engine.utils.trackers import CSVWriter, MLflowWriter, WandbWriter

__all__ = ["WRITER_NAMES", "default_writers", "writers_from_config"]

WRITER_NAMES = ("console", "json", "tensorboard", "csv", "mlflow", "wandb")
"""The names ``OUTPUT.WRITERS`` may hold."""


def _get(cfg: Mapping[str, Any], dotted: str, default: Any) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def writers_from_config(
    cfg: Mapping[str, Any], output_dir: str, max_iter: int | None = None
) -> list[EventWriter]:
    """The writers named by ``cfg.OUTPUT.WRITERS``, in its order (each name once).

    ``"console"``: :class:`CommonMetricPrinter`; ``"json"``: ``output_dir/metrics.json``;
    ``"tensorboard"``: event files in ``output_dir``; ``"csv"``: ``output_dir/metrics.csv``;
    ``"mlflow"``: an :class:`MLflowWriter` with ``OUTPUT.MLFLOW`` (experiment, run name, tracking
    URI) logging ``cfg`` as parameters; ``"wandb"``: a :class:`WandbWriter` with ``OUTPUT.WANDB``
    (project, entity, run name, mode), its local files in ``output_dir``, ``cfg`` as config. A
    :class:`TensorboardXWriter` is put last: it empties the image queue the trackers also read.

    Args:
        cfg: the config (a CfgNode from ``get_cfg()``); without ``OUTPUT.WRITERS`` the default
            ``["console", "json", "tensorboard"]`` is used.
        output_dir: directory of the files written (created).
        max_iter: the total number of iterations, for the console ETA.

    Returns:
        The writers.

    Raises:
        ValueError: ``OUTPUT.WRITERS`` holds an unknown name.
        ImportError: a tracker's package is not installed (the message names the extra).
    """
    names = list(_get(cfg, "OUTPUT.WRITERS", ["console", "json", "tensorboard"]))
    unknown = [n for n in names if n not in WRITER_NAMES]
    if unknown:
        raise ValueError(
            f"OUTPUT.WRITERS holds unknown writer names {unknown}; known: {list(WRITER_NAMES)}. "
            'HINT: e.g. OUTPUT.WRITERS \'["console", "json", "tensorboard", "csv"]\'.'
        )
    os.makedirs(output_dir, exist_ok=True)
    names = [n for n in dict.fromkeys(names) if n != "tensorboard"] + (
        ["tensorboard"] if "tensorboard" in names else []
    )
    writers: list[EventWriter] = []
    for name in names:
        if name == "console":
            writers.append(CommonMetricPrinter(max_iter))
        elif name == "json":
            writers.append(JSONWriter(os.path.join(output_dir, "metrics.json")))
        elif name == "tensorboard":
            writers.append(TensorboardXWriter(output_dir))
        elif name == "csv":
            writers.append(CSVWriter(os.path.join(output_dir, "metrics.csv")))
        elif name == "mlflow":
            writers.append(
                MLflowWriter(
                    experiment_name=_get(cfg, "OUTPUT.MLFLOW.EXPERIMENT_NAME", "") or "d2engine",
                    run_name=_get(cfg, "OUTPUT.MLFLOW.RUN_NAME", "") or None,
                    tracking_uri=_get(cfg, "OUTPUT.MLFLOW.TRACKING_URI", "") or None,
                    config=cfg,
                )
            )
        else:
            writers.append(
                WandbWriter(
                    project=_get(cfg, "OUTPUT.WANDB.PROJECT", "") or "d2engine",
                    entity=_get(cfg, "OUTPUT.WANDB.ENTITY", "") or None,
                    name=_get(cfg, "OUTPUT.WANDB.RUN_NAME", "") or None,
                    mode=_get(cfg, "OUTPUT.WANDB.MODE", "") or None,
                    dir=output_dir,
                    config=cfg,
                )
            )
    return writers


def default_writers(
    output_dir: str, max_iter: int | None = None, cfg: CfgNode | None = None
) -> list[EventWriter]:
    """The default event writers: console, ``metrics.json`` and TensorBoard.

    Args:
        output_dir: directory for ``metrics.json`` and the TensorBoard event files (created).
        max_iter: the total number of iterations, for the console ETA.
        cfg: (d2engine) a config: then the writers named by its ``OUTPUT.WRITERS`` (csv, mlflow,
            wandb too), see :func:`writers_from_config`.

    Returns:
        ``[CommonMetricPrinter(max_iter), JSONWriter(output_dir/metrics.json),
        TensorboardXWriter(output_dir)]`` without ``cfg``.
    """
    if cfg is not None:
        return writers_from_config(cfg, output_dir, max_iter)
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]
