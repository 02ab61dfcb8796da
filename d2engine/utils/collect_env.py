"""A table of facts about the environment, logged at the start of every job to help bug reports.

Versions of the optional packages are read from the installed metadata, without importing them, so
that collecting the table stays cheap. Run ``python -m d2engine.utils.collect_env`` to print it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import numpy as np
import torch

import d2engine

__all__ = ["collect_env_info"]

_PACKAGES = (
    "d2engine",
    "omegaconf",
    "PyYAML",
    "fsspec",
    "safetensors",
    "tensorboard",
    "scikit-learn",
    "pillow",
    "torchvision",
)
"""Packages whose version the table lists (``"not installed"`` when missing)."""

_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
"""Environment variables the table shows when they are set."""


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_rows() -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("CUDA available", str(torch.cuda.is_available()))]
    if torch.version.cuda is not None:
        rows.append(("torch built with CUDA", torch.version.cuda))
    if torch.cuda.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
        names: dict[str, list[str]] = {}
        for idx in range(torch.cuda.device_count()):
            names.setdefault(torch.cuda.get_device_name(idx), []).append(str(idx))
        for name, ids in names.items():
            rows.append((f"GPU {','.join(ids)}", name))
    return rows


def _format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    rule = "-" * (width + 2) + "+" + "-" * 40
    lines = [rule] + [f"{key:<{width}}  | {value}" for key, value in rows] + [rule]
    return "\n".join(lines)


def collect_env_info() -> str:
    """Describe the platform, Python, PyTorch, devices and related package versions.

    Returns:
        A two-column text table, one fact per line.
    """
    rows: list[tuple[str, str]] = [
        ("sys.platform", sys.platform),
        ("Platform", platform.platform()),
        ("Python", sys.version.replace("\n", " ")),
        ("numpy", np.__version__),
        (
            "d2engine",
            f"{getattr(d2engine, '__version__', _package_version('d2engine'))} @"
            f"{os.path.dirname(d2engine.__file__)}",
        ),
        ("PyTorch", f"{torch.__version__} @{os.path.dirname(torch.__file__)}"),
        ("PyTorch debug build", str(torch.version.debug)),
    ]
    rows += _cuda_rows()
    rows.append(
        (
            "torch.distributed (gloo/nccl)",
            f"{torch.distributed.is_available()} "
            f"({torch.distributed.is_available() and torch.distributed.is_gloo_available()}/"
            f"{torch.distributed.is_available() and torch.distributed.is_nccl_available()})",
        )
    )
    rows.append(("CPU count", str(os.cpu_count())))
    rows.append(("torch threads", str(torch.get_num_threads())))
    rows += [(name, _package_version(name)) for name in _PACKAGES[1:]]
    rows += [(var, os.environ[var]) for var in _ENV_VARS if var in os.environ]
    return _format_table(rows)


if __name__ == "__main__":  # pragma: no cover - a convenience for bug reports
    print(collect_env_info())
