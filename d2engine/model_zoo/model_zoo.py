"""Find a config that ships inside the installed package, by its path under ``configs/``.

The configs live in ``d2engine/model_zoo/configs/`` (the repository's ``configs/`` is a link to
that folder), so an installed wheel carries them and a script can reach them from any
directory::

    from d2engine.model_zoo import get_config, get_config_file

    cfg.merge_from_file(get_config_file("digits/convnet.yaml"))
    train = get_config("common/train.py").train  # detectron2's model-agnostic lazy configs

Shipped: the digits demo (YAML) and detectron2's model-agnostic ``common/`` lazy configs
(``common/train.py``, ``common/optim.py``, ``common/coco_schedule.py``).

From a shell, ``python -m d2engine.model_zoo PATH`` prints the file path::

    d2engine-train --config-file "$(python -m d2engine.model_zoo digits/convnet.yaml)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2engine.config import LazyConfig, get_cfg
from d2engine.modeling import add_classifier_config

__all__ = ["get_config", "get_config_file"]

_CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def get_config_file(config_path: str) -> str:
    """Return the file path of a config shipped with d2engine.

    Args:
        config_path: the config's path relative to ``configs/``, e.g. ``"digits/convnet.yaml"``
            (a leading ``"configs/"`` is accepted too, so repository paths work unchanged).

    Returns:
        The absolute path of the file; its ``_BASE_`` files sit next to it.

    Raises:
        FileNotFoundError: if no shipped config has that path.
    """
    relative = config_path.removeprefix("configs/")
    path = (_CONFIG_ROOT / relative).resolve()
    if path.is_file() and path.is_relative_to(_CONFIG_ROOT):
        return str(path)
    shipped = sorted(
        p.relative_to(_CONFIG_ROOT).as_posix()
        for p in _CONFIG_ROOT.rglob("*")
        if p.suffix in (".yaml", ".py")
    )
    raise FileNotFoundError(
        f"No config {config_path!r} ships with d2engine (looked in {_CONFIG_ROOT}); the shipped "
        f"configs are: {', '.join(shipped) or 'none'}. HINT: pass one of these paths, or give "
        "your own file's path to merge_from_file / --config-file directly."
    )


def get_config(config_path: str, trained: bool = False) -> Any:
    """Load a shipped config: a YAML file into ``get_cfg()``, a Python file as a lazy config.

    Args:
        config_path: the config's path relative to ``configs/``, e.g. ``"common/train.py"`` or
            ``"digits/convnet.yaml"``.
        trained: detectron2 sets the weights of its trained model zoo models here; d2engine
            ships no trained weights, so True is an error.

    Returns:
        A :class:`~d2engine.config.CfgNode` (YAML; the demo classifier's keys included) or an
        omegaconf ``DictConfig`` (Python).

    Raises:
        FileNotFoundError: if no shipped config has that path.
        ValueError: if ``trained`` is True.
    """
    if trained:
        raise ValueError(
            f"get_config({config_path!r}, trained=True): d2engine ships configs but no trained "
            "weights. HINT: set MODEL.WEIGHTS (or train.init_checkpoint) to your own checkpoint."
        )
    path = get_config_file(config_path)
    if path.endswith(".py"):
        return LazyConfig.load(path)
    cfg = get_cfg()
    add_classifier_config(cfg)
    cfg.merge_from_file(path)
    return cfg
