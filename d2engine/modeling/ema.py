"""An exponential moving average (EMA) of a model's weights: :class:`ModelEMA`.

After each optimizer step, ``ema = decay * ema + (1 - decay) * weights`` for every parameter and
floating-point buffer (BatchNorm running statistics are averaged like the weights); integer buffers
(``num_batches_tracked``) are copied. The averaged weights are usually better for evaluation than
the last ones. :class:`~d2engine.engine.hooks.EMAHook` updates it during training;
:meth:`ModelEMA.swap` evaluates a model with them; ``docs/features.md`` shows the config.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from d2engine.checkpoint.model_loading import load_model_state, unwrap_model

__all__ = ["ModelEMA", "load_ema_weights"]

logger = logging.getLogger(__name__)


def _model_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The parameters and persistent buffers of ``model`` by state-dict name, unwrapped."""
    return OrderedDict(unwrap_model(model).state_dict(keep_vars=True))


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _groups(
    dst: list[torch.Tensor], src: list[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Split pairs for ``torch._foreach`` calls: DTensors (FSDP2 parameters) and plain tensors
    (e.g. the buffers of a sharded model) cannot be mixed in one call."""
    by_kind: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dst, src):
        pair = by_kind.setdefault(isinstance(s, DTensor), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    return list(by_kind.values())


def _same_devices(dst: list[torch.Tensor], src: list[torch.Tensor]) -> bool:
    return all(d.device == s.device for d, s in zip(dst, src))


class ModelEMA:
    """An exponential moving average of a model's parameters and buffers.

    The averaged copy is made of plain tensors (no second module). :meth:`update` costs two
    ``torch._foreach`` kernels, with no host-device sync and no allocation (on another ``device``
    one more copy per tensor into buffers kept between updates). Like an optimizer, it keeps
    references to the model's parameters and buffers, taken when it first sees a model object;
    call :meth:`follow` after moving the model (``model.to()`` replaces buffers) or replacing its
    parameters (:class:`~d2engine.engine.hooks.EMAHook` does at the start of training).
    DistributedDataParallel and ``torch.compile`` wrappers are unwrapped, so the names are those
    of the plain model (and of its checkpoints).

    Decay: ``decay`` at every update; with ``warmup`` (d2go's ``DECAY_WARM_UP_FACTOR``) the
    ``t``-th update (from 1) uses ``min(decay, (1 + t) / (warmup + t))``, so that the first updates
    follow the young model closely instead of averaging it with its initial weights.

    State (:meth:`state_dict`): ``{"updates": int, "weights": {name: tensor}}``.

    Args:
        model: the model to average (possibly DDP-wrapped or compiled); the average starts at its
            current weights.
        decay: the weight of the old average, in [0, 1].
        device: where the average lives (e.g. ``"cpu"`` to save accelerator memory); None: each
            tensor on the device of the model's tensor.
        warmup: None for a constant decay, or the warm-up factor ``w >= 0`` above.

    Raises:
        ValueError: ``decay`` outside [0, 1] or a negative ``warmup``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        device: str | torch.device | None = None,
        warmup: float | None = None,
    ) -> None:
        if not (isinstance(decay, (int, float)) and 0.0 <= float(decay) <= 1.0):
            raise ValueError(
                f"ModelEMA decay must be a number in [0, 1], got {decay!r}. HINT: typical values "
                "are 0.999 to 0.9999 (MODEL_EMA.DECAY)."
            )
        if warmup is not None and not (isinstance(warmup, (int, float)) and warmup >= 0):
            raise ValueError(
                f"ModelEMA warmup must be None or a number >= 0, got {warmup!r}. HINT: None (or "
                "MODEL_EMA.DECAY_WARM_UP_FACTOR -1) disables the warm-up."
            )
        self.decay = float(decay)
        self.warmup = None if warmup is None else float(warmup)
        self.device = torch.device(device) if device else None
        self.updates = 0
        self._weights: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._source: nn.Module | None = None  # the unwrapped model followed
        self._given: nn.Module | None = None  # the object last given (maybe a wrapper)
        self.reset(model)

    # ------------------------------------------------------------------ averaging
    def reset(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights (``updates = 0``).

        Args:
            model: the model (its names must be those of the model given at construction).
        """
        tensors = _model_tensors(model)
        with torch.no_grad():
            if not self._weights:
                for name, t in tensors.items():
                    device = self.device if self.device is not None else t.device
                    self._weights[name] = t.detach().to(device, copy=True)
            else:
                self._check_names(tensors, "reset()")
                for name, t in tensors.items():
                    self._weights[name].copy_(t.detach())
        self.updates = 0
        self.follow(model)

    def _check_names(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        if list(tensors) != list(self._weights):
            missing = sorted(set(self._weights) - set(tensors))
            extra = sorted(set(tensors) - set(self._weights))
            raise ValueError(
                f"ModelEMA.{what}: the model's parameters and buffers differ from the averaged "
                f"ones (not in the model: {missing[:10]}, not averaged: {extra[:10]}). HINT: use "
                "the model the ModelEMA was built from."
            )

    def follow(self, model: nn.Module) -> None:
        """Average ``model``'s current parameter and buffer objects from now on.

        :meth:`update` calls it for a model object it has not seen; call it after moving the
        model or replacing its parameters or buffers.

        Args:
            model: the model (its names must be the average's).

        Raises:
            ValueError: the model's parameter and buffer names differ from the average's.
        """
        source = unwrap_model(model)
        tensors = _model_tensors(source)
        self._check_names(tensors, "follow()")
        avg = [n for n, t in self._weights.items() if _averaged(t)]
        copy = [n for n, t in self._weights.items() if not _averaged(t)]
        # The parameter objects themselves (updated under no_grad), not detached aliases, so
        # that an in-place change of ``param.data`` is followed, as an optimizer does.
        self._avg_groups = [
            # staging buffers when the average lives on another device (one device per foreach)
            (dst, src, None if _same_devices(dst, src) else [torch.empty_like(d) for d in dst])
            for dst, src in _groups([self._weights[n] for n in avg], [tensors[n] for n in avg])
        ]
        self._copy_groups = _groups([self._weights[n] for n in copy], [tensors[n] for n in copy])
        self._source, self._given = source, model

    def decay_at(self, update: int) -> float:
        """The decay used by the ``update``-th update (counted from 1).

        Args:
            update: the update's number.

        Returns:
            ``decay``, or ``min(decay, (1 + update) / (warmup + update))`` with a warm-up.
        """
        if self.warmup is None:
            return self.decay
        return min(self.decay, (1.0 + update) / (self.warmup + update))

    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights into the EMA (after an optimizer step).

        Args:
            model: the trained model (DDP-wrapped or compiled models are unwrapped).
        """
        if model is not self._given and unwrap_model(model) is not self._source:
            self.follow(model)
        self._given = model
        weight = 1.0 - self.decay_at(self.updates + 1)
        with torch.no_grad():
            for dst, src, staging in self._avg_groups:
                if staging is not None:
                    torch._foreach_copy_(staging, src)
                    src = staging
                torch._foreach_lerp_(dst, src, weight)
            for dst, src in self._copy_groups:
                torch._foreach_copy_(dst, src)
        self.updates += 1

    # ------------------------------------------------------------------ using the average
    def weights(self) -> OrderedDict[str, torch.Tensor]:
        """The averaged weights by state-dict name (the live tensors: clone to keep them)."""
        return OrderedDict(self._weights)

    def copy_to(self, model: nn.Module) -> None:
        """Copy the averaged weights into ``model`` (for good: see :meth:`swap` to evaluate).

        Args:
            model: the model (or one of the same architecture).
        """
        tensors = _model_tensors(model)
        self._check_names(tensors, "copy_to()")
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(self._weights[name])

    @contextlib.contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the averaged weights into ``model`` for the block, then restore its own weights.

        The trained weights are restored on exit, also when the block raises. Memory: one copy of
        the model's weights while the block runs.

        Args:
            model: the trained model.

        Yields:
            ``model``, holding the averaged weights.

        Example::

            with ema.swap(model):
                results = inference_on_dataset(model, loader, evaluator)
        """
        tensors = _model_tensors(model)
        self._check_names(tensors, "swap()")
        with torch.no_grad():
            backup = [t.detach().clone() for t in tensors.values()]
            for name, t in tensors.items():
                t.copy_(self._weights[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, saved in zip(tensors.values(), backup):
                    t.copy_(saved)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """``{"updates": int, "weights": OrderedDict(name -> tensor)}`` (live tensors)."""
        return {"updates": self.updates, "weights": OrderedDict(self._weights)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the number of updates and the averaged weights.

        Args:
            state_dict: from :meth:`state_dict`.

        Raises:
            KeyError: an entry is missing.
            ValueError: the names or shapes of the weights differ from this average's.
        """
        for key in ("updates", "weights"):
            if key not in state_dict:
                raise KeyError(
                    f"ModelEMA state_dict has no {key!r}; got keys {sorted(state_dict)}. HINT: "
                    "pass the dict produced by ModelEMA.state_dict()."
                )
        weights = state_dict["weights"]
        if set(weights) != set(self._weights):
            self._check_names(OrderedDict((k, weights[k]) for k in weights), "load_state_dict()")
        with torch.no_grad():
            for name, t in self._weights.items():
                value = weights[name]
                if value.shape != t.shape:
                    raise ValueError(
                        f"ModelEMA.load_state_dict: {name!r} has shape {tuple(value.shape)} in "
                        f"the state, {tuple(t.shape)} in the average. HINT: load the EMA of the "
                        "same architecture."
                    )
                t.copy_(value)
        self.updates = int(state_dict["updates"])

    def __repr__(self) -> str:
        return (
            f"ModelEMA(decay={self.decay}, warmup={self.warmup}, device={self.device}, "
            f"updates={self.updates}, tensors={len(self._weights)})"
        )


def load_ema_weights(
    model: nn.Module, checkpoint: Mapping[str, Any], source: str = "the checkpoint"
) -> None:
    """Load the EMA weights of a trainer checkpoint (its ``"ema"`` entry) into ``model``.

    For evaluating with the averaged weights: ``--eval-only`` and
    :class:`~d2engine.engine.defaults.DefaultPredictor` call it when
    ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY`` is set. Loaded leniently as model weights are
    (what does not fit is logged).

    Args:
        model: the model (DDP-wrapped or compiled models are unwrapped).
        checkpoint: a loaded checkpoint, or the entries that loading it left unused.
        source: names the checkpoint in the error message.

    Raises:
        KeyError: the checkpoint has no EMA weights.
    """
    ema = checkpoint.get("ema")
    if not isinstance(ema, Mapping) or not isinstance(ema.get("weights"), Mapping):
        raise KeyError(
            f"{source} has no EMA weights (an 'ema' entry with 'weights'); its entries are "
            f"{sorted(map(str, checkpoint))}. HINT: train with MODEL_EMA.ENABLED True to save "
            "them, or set MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False to use the trained weights."
        )
    logger.info("Loading the EMA weights of %s (%d updates).", source, int(ema.get("updates", 0)))
    report = load_model_state(unwrap_model(model), dict(ema["weights"]))
    report.log(logger)
