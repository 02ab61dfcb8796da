"""Build the optimizer and the lr scheduler from a config (``cfg.SOLVER``).

- :func:`build_optimizer`: SGD over the parameter groups of :func:`get_default_optimizer_params`
  (normalization layers and biases get their own weight decay / lr), with gradient clipping when
  ``SOLVER.CLIP_GRADIENTS.ENABLED``.
- :func:`build_lr_scheduler`: ``SOLVER.LR_SCHEDULER_NAME`` with warm-up, as an
  :class:`~d2engine.solver.lr_scheduler.LRMultiplier`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch
from torch import nn
from torch.optim import Optimizer

from d2engine.solver.lr_scheduler import (
    LRMultiplier,
    WarmupCosineLR,
    WarmupMultiStepLR,
    WarmupStepWithFixedGammaLR,
)

__all__ = [
    "LR_SCHEDULER_NAMES",
    "NORM_MODULE_TYPES",
    "build_lr_scheduler",
    "build_optimizer",
    "get_default_optimizer_params",
    "maybe_add_gradient_clipping",
    "reduce_param_groups",
]

logger = logging.getLogger(__name__)

#: Module types whose parameters get ``weight_decay_norm``.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    # Lazy variants are subclasses of the above once materialised; RMSNorm where torch has it.
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

#: The values accepted for ``SOLVER.LR_SCHEDULER_NAME``.
LR_SCHEDULER_NAMES = ("WarmupCosineLR", "WarmupMultiStepLR", "WarmupStepWithFixedGammaLR")

# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float | None = None,
    weight_decay: float | None = None,
    weight_decay_norm: float | None = None,
    bias_lr_factor: float | None = 1.0,
    weight_decay_bias: float | None = None,
    lr_factor_func: Callable[[str], float] | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups with per-kind hyper-parameters, equal groups merged.

    Every trainable parameter appears exactly once (a parameter shared by several modules gets
    the hyper-parameters of the first module that owns it, in ``named_modules()`` order). The
    hyper-parameters of a parameter are, from lowest to highest priority: the defaults
    (``base_lr``, ``weight_decay``), ``weight_decay_norm`` for parameters of normalization layers
    (:data:`NORM_MODULE_TYPES`), ``lr_factor_func``, then ``overrides`` by parameter name, where
    the bias settings (``bias_lr_factor``, ``weight_decay_bias``) are the override for "bias".
    Hyper-parameters left as None are not set, so the optimizer's defaults apply.

    Args:
        model: the model.
        base_lr: the lr of every group (needed for ``bias_lr_factor`` and ``lr_factor_func``).
        weight_decay: the default weight decay.
        weight_decay_norm: the weight decay of normalization-layer parameters.
        bias_lr_factor: the lr multiplier of parameters named "bias".
        weight_decay_bias: the weight decay of parameters named "bias".
        lr_factor_func: maps a full parameter name ("backbone.conv1.weight") to an lr
            multiplier.
        overrides: per parameter name (the last part, e.g. "embedding"), hyper-parameters to
            set, e.g. ``{"embedding": {"lr": 0.01, "weight_decay": 0.0}}``.

    Returns:
        Parameter groups for a torch optimizer: dicts with "params" and hyper-parameters.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if a factor is given without ``base_lr`` or "bias" is overridden twice.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"get_default_optimizer_params needs an nn.Module, got {type(model).__name__}"
        )
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    defaults: dict[str, float] = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    bias_overrides: dict[str, float] = {}
    if bias_lr_factor is not None and bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError(f"bias_lr_factor={bias_lr_factor} needs base_lr; pass base_lr as well")
        bias_overrides["lr"] = base_lr * bias_lr_factor
    if weight_decay_bias is not None:
        bias_overrides["weight_decay"] = weight_decay_bias
    if bias_overrides:
        if "bias" in overrides:
            raise ValueError(
                "overrides['bias'] conflicts with bias_lr_factor / weight_decay_bias; set the bias "
                "hyper-parameters in one place only"
            )
        overrides["bias"] = bias_overrides
    if lr_factor_func is not None and base_lr is None:
        raise ValueError("lr_factor_func needs base_lr; pass base_lr as well")

    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            hyper = dict(defaults)
            if weight_decay_norm is not None and isinstance(module, NORM_MODULE_TYPES):
                hyper["weight_decay"] = weight_decay_norm
            if lr_factor_func is not None:
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                hyper["lr"] = hyper["lr"] * lr_factor_func(full_name)
            hyper.update(overrides.get(param_name, {}))
            groups.append({"params": [param], **hyper})
    return reduce_param_groups(groups)


def _expand_param_groups(params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split parameter groups into one group per parameter, with its merged hyper-parameters.

    A parameter listed in several groups gets the hyper-parameters of all of them, later groups
    winning. A group may carry ``"param_names"`` (one name per parameter), which is kept per
    parameter. Parameters are in order of first appearance.

    Args:
        params: parameter groups, each a dict with "params" and hyper-parameters.

    Returns:
        One dict per distinct parameter: ``{"params": [p], **hyper}`` (and ``"param_names"``).

    Raises:
        ValueError: if a group has no "params", or "param_names" of another length.
    """
    per_param: dict[int, dict[str, Any]] = {}
    for i, item in enumerate(params):
        if "params" not in item:
            raise ValueError(
                f"parameter group {i} has no 'params' entry, got keys {sorted(item)}. HINT: each "
                "group is a dict {'params': [...], 'lr': ..., ...}."
            )
        hyper = {k: v for k, v in item.items() if k not in ("params", "param_names")}
        group_params = list(item["params"])
        names = item.get("param_names")
        if names is not None and len(names) != len(group_params):
            raise ValueError(
                f"parameter group {i} has {len(group_params)} params but {len(names)} "
                "param_names; give one name per parameter."
            )
        for k, p in enumerate(group_params):
            entry = per_param.setdefault(id(p), {"params": [p]})
            if names is not None:
                entry["param_names"] = [names[k]]
            entry.update(hyper)
    return list(per_param.values())


def reduce_param_groups(params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge parameter groups with equal hyper-parameters.

    A parameter listed in several groups keeps the hyper-parameters of all of them, later ones
    winning (see :func:`_expand_param_groups`). Groups keep the order of first appearance, and
    parameters (and their ``"param_names"``, if given) their order within.

    Args:
        params: parameter groups, each a dict with "params" and hyper-parameters.

    Returns:
        The merged groups, one per distinct set of hyper-parameters.

    Raises:
        ValueError: if a group has no "params".
    """
    merged: dict[Any, dict[str, Any]] = {}
    for entry in _expand_param_groups(params):
        hyper = {k: v for k, v in entry.items() if k not in ("params", "param_names")}
        key = tuple(sorted((k, _hashable(v)) for k, v in hyper.items()))
        group = merged.setdefault(key, {**hyper, "params": []})
        group["params"].extend(entry["params"])
        if "param_names" in entry:
            group.setdefault("param_names", []).extend(entry["param_names"])
    return list(merged.values())


def _hashable(value: Any) -> Any:
    """A hashable stand-in for a hyper-parameter value (lists such as betas become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------

_CLIP_TYPES = ("full_model", "norm", "value")

# (base optimizer class, clip spec) -> generated class; generated once so that instances share it.
_CLIPPED_CLASSES: dict[tuple[type[Optimizer], tuple[str, float, float]], type[Optimizer]] = {}


def _clip_spec(clip_cfg: Any) -> tuple[str, float, float]:
    clip_type = str(clip_cfg.CLIP_TYPE)
    if clip_type not in _CLIP_TYPES:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {list(_CLIP_TYPES)}, got {clip_type!r}"
        )
    clip_value = float(clip_cfg.CLIP_VALUE)
    if not clip_value > 0:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip_cfg.CLIP_VALUE!r}"
        )
    norm_type = float(clip_cfg.NORM_TYPE)
    if not (norm_type > 0 or math.isinf(norm_type)):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.NORM_TYPE must be > 0 (or inf), got {clip_cfg.NORM_TYPE!r}"
        )
    return clip_type, clip_value, norm_type


@torch.no_grad()
def _clip_gradients(params: list[torch.Tensor], spec: tuple[str, float, float]) -> None:
    clip_type, clip_value, norm_type = spec
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if clip_type == "value":
        torch.nn.utils.clip_grad_value_(
            [p for p in params if p.grad is not None], clip_value, foreach=None
        )
    elif clip_type == "full_model":
        torch.nn.utils.clip_grad_norm_(
            [p for p in params if p.grad is not None], clip_value, norm_type
        )
    else:  # "norm": detectron2's semantics, the norm of each parameter's gradient is clipped
        for g in grads:
            norm = torch.linalg.vector_norm(g, norm_type)
            g.mul_(torch.clamp(clip_value / (norm + 1e-6), max=1.0))


def _rebuild_clipped_optimizer(base: type[Optimizer], spec: tuple[str, float, float]) -> Optimizer:
    cls = _optimizer_class_with_clipping(base, spec)
    return cls.__new__(cls)


def _optimizer_class_with_clipping(
    base: type[Optimizer], spec: tuple[str, float, float]
) -> type[Optimizer]:
    key = (base, spec)
    if key in _CLIPPED_CLASSES:
        return _CLIPPED_CLASSES[key]

    def step(self: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"]]
        if closure is None:
            _clip_gradients(params, spec)
            return base.step(self)

        def clipped_closure() -> Any:
            # The closure recomputes the gradients, so they are clipped after it runs.
            loss = closure()
            _clip_gradients(params, spec)
            return loss

        return base.step(self, clipped_closure)

    # torch wraps a subclass's step with its hook runner unless marked; the base step already
    # runs the optimizer hooks once, so marking keeps them from running twice.
    step.hooked = True  # type: ignore[attr-defined]

    def __reduce_ex__(self: Optimizer, protocol: int) -> tuple[Any, ...]:  # noqa: N807
        # The generated class is not importable by name; rebuild it from (base, spec).
        return (_rebuild_clipped_optimizer, (base, spec), self.__getstate__())

    cls = type(
        f"{base.__name__}WithGradientClip",
        (base,),
        {
            "step": step,
            "__reduce_ex__": __reduce_ex__,
            "__module__": __name__,
            "__doc__": f"{base.__name__} that clips gradients ({spec[0]}, {spec[1]}) in step().",
            "_d2e_clip_base": base,
            "_d2e_clip_spec": spec,
        },
    )
    _CLIPPED_CLASSES[key] = cls
    return cls


_OptimizerT = TypeVar("_OptimizerT", bound=Optimizer)


@overload
def maybe_add_gradient_clipping(cfg: Any, optimizer: type[_OptimizerT]) -> type[_OptimizerT]: ...
@overload
def maybe_add_gradient_clipping(cfg: Any, optimizer: _OptimizerT) -> _OptimizerT: ...
def maybe_add_gradient_clipping(
    cfg: Any, optimizer: Optimizer | type[Optimizer]
) -> Optimizer | type[Optimizer]:
    """Make an optimizer clip gradients in ``step()`` if ``SOLVER.CLIP_GRADIENTS.ENABLED``.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``: "value" clips every gradient element to
    ``[-CLIP_VALUE, CLIP_VALUE]``; "norm" clips the ``NORM_TYPE``-norm of each parameter's
    gradient to ``CLIP_VALUE`` (detectron2's meaning, per parameter); "full_model" clips the norm
    of all gradients together. The optimizer class becomes a subclass ``<Name>WithGradientClip``
    whose ``state_dict()`` is the base class's, and which pickles and deep-copies. When a
    ``closure`` is passed to ``step``, the gradients it computes are clipped.

    Apply it before creating an lr scheduler for the optimizer (torch schedulers wrap the
    instance's ``step``).

    Args:
        cfg: the config; only ``cfg.SOLVER.CLIP_GRADIENTS`` is read.
        optimizer: an optimizer instance (its class is changed in place) or an optimizer class.

    Returns:
        The same instance, or the generated class; unchanged when clipping is disabled.

    Raises:
        TypeError: if ``optimizer`` is neither an Optimizer nor a subclass of it.
        ValueError: for an unknown clip type, a non-positive clip value or norm type.
        RuntimeError: if an lr scheduler already wrapped this instance's ``step``.
    """
    if not cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        return optimizer
    if isinstance(optimizer, Optimizer):
        base = type(optimizer)
    elif isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        base = optimizer
    else:
        raise TypeError(
            "maybe_add_gradient_clipping needs a torch Optimizer or Optimizer subclass, got "
            f"{optimizer!r}"
        )
    spec = _clip_spec(cfg.SOLVER.CLIP_GRADIENTS)
    base = getattr(base, "_d2e_clip_base", base)  # re-applying replaces the clipping
    cls = _optimizer_class_with_clipping(base, spec)
    if not isinstance(optimizer, Optimizer):
        return cls
    if "step" in vars(optimizer):
        raise RuntimeError(
            "maybe_add_gradient_clipping: this optimizer's step() was already wrapped (by an lr "
            "scheduler), so the clipping would be bypassed. Hint: add gradient clipping before "
            "creating the lr scheduler."
        )
    optimizer.__class__ = cls
    return optimizer


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def build_optimizer(cfg: Any, model: nn.Module) -> Optimizer:
    """Build SGD from ``cfg.SOLVER`` over :func:`get_default_optimizer_params` groups.

    Reads BASE_LR, MOMENTUM, NESTEROV, WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR,
    WEIGHT_DECAY_BIAS (None: same as WEIGHT_DECAY) and CLIP_GRADIENTS.

    Args:
        cfg: the config.
        model: the model to optimize.

    Returns:
        The optimizer (``SGDWithGradientClip`` when clipping is enabled).

    Raises:
        ValueError: if the model has no trainable parameter or NESTEROV is set without momentum.
    """
    solver = cfg.SOLVER
    if solver.NESTEROV and not solver.MOMENTUM > 0:
        raise ValueError(
            f"SOLVER.NESTEROV=True needs SOLVER.MOMENTUM > 0, got MOMENTUM={solver.MOMENTUM}. "
            "Hint: set a momentum such as 0.9 or turn NESTEROV off."
        )
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
    )
    if not params:
        raise ValueError(
            f"build_optimizer: {type(model).__name__} has no parameter with requires_grad=True. "
            "Hint: unfreeze some parameters or skip building an optimizer."
        )
    sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return sgd(
        params,
        lr=solver.BASE_LR,
        momentum=solver.MOMENTUM,
        nesterov=bool(solver.NESTEROV),
        weight_decay=solver.WEIGHT_DECAY,
    )


def build_lr_scheduler(cfg: Any, optimizer: Optimizer) -> LRMultiplier:
    """Build ``cfg.SOLVER.LR_SCHEDULER_NAME`` with warm-up for ``optimizer``.

    - "WarmupMultiStepLR": the lr is multiplied by GAMMA at each of STEPS; steps at or past
      MAX_ITER are dropped with a warning naming them.
    - "WarmupCosineLR": half a cosine from BASE_LR to BASE_LR_END at MAX_ITER.
    - "WarmupStepWithFixedGammaLR": NUM_DECAYS equally spaced decays by GAMMA.

    Warm-up: WARMUP_METHOD "linear" (multiplier WARMUP_FACTOR rising to the schedule's value) or
    "constant" (WARMUP_FACTOR times the schedule's first value) over the first WARMUP_ITERS
    iterations (capped at MAX_ITER). RESCALE_INTERVAL=True stretches the schedule over the
    iterations after the warm-up instead of all of them.

    Args:
        cfg: the config.
        optimizer: the optimizer whose lrs are scheduled.

    Returns:
        An :class:`LRMultiplier` (an instance of the named class).

    Raises:
        ValueError: for an unknown scheduler or warm-up name (listing the valid ones) or an
            inconsistent solver config.
    """
    solver = cfg.SOLVER
    name = solver.LR_SCHEDULER_NAME
    warmup = {
        "warmup_factor": solver.WARMUP_FACTOR,
        "warmup_iters": solver.WARMUP_ITERS,
        "warmup_method": solver.WARMUP_METHOD,
    }
    rescale = bool(solver.RESCALE_INTERVAL)
    if name == "WarmupMultiStepLR":
        return WarmupMultiStepLR(
            optimizer,
            list(solver.STEPS),
            solver.GAMMA,
            **warmup,
            max_iter=solver.MAX_ITER,
            rescale_interval=rescale,
        )
    if name == "WarmupCosineLR":
        if solver.BASE_LR == 0:
            end_factor = 0.0
        else:
            end_factor = solver.BASE_LR_END / solver.BASE_LR
        if not 0.0 <= end_factor <= 1.0:
            raise ValueError(
                f"WarmupCosineLR needs 0 <= SOLVER.BASE_LR_END <= SOLVER.BASE_LR, got "
                f"BASE_LR_END={solver.BASE_LR_END}, BASE_LR={solver.BASE_LR}"
            )
        return WarmupCosineLR(
            optimizer,
            solver.MAX_ITER,
            **warmup,
            end_factor=end_factor,
            rescale_interval=rescale,
        )
    if name == "WarmupStepWithFixedGammaLR":
        return WarmupStepWithFixedGammaLR(
            optimizer,
            solver.MAX_ITER,
            solver.GAMMA,
            solver.NUM_DECAYS,
            **warmup,
            rescale_interval=rescale,
        )
    raise ValueError(
        f"Unknown SOLVER.LR_SCHEDULER_NAME {name!r}; expected one of {list(LR_SCHEDULER_NAMES)}"
    )
