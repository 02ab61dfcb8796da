"""Precise BatchNorm statistics: the true average of batch statistics instead of an EMA.

BatchNorm layers track ``running_mean`` / ``running_var`` as an exponential moving average of the
batch statistics seen during training, which weighs the last (most recent weights') batches
unevenly. :func:`update_bn_stats` replaces them by the plain average, over ``num_iters`` batches,
of the per-batch statistics under the current weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["get_bn_modules", "update_bn_stats"]


def get_bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that are in training mode and track running statistics.

    Args:
        model: any module.

    Returns:
        The layers, in ``model.modules()`` order (SyncBatchNorm included).
    """
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
    ]


@torch.no_grad()
def update_bn_stats(model: nn.Module, data_loader: Iterable[Any], num_iters: int = 200) -> None:
    """Set every training-mode BN layer's running statistics to their average over batches.

    Runs ``model(batch)`` under ``no_grad`` for ``num_iters`` batches with each layer's momentum
    set to 1 (so its running statistics are those of the last batch), and averages them. The
    layers' momentum and ``num_batches_tracked`` are restored afterwards; the statistics tensors
    are updated in place; on failure they are left as they were.

    Args:
        model: a module whose BN layers to update are in training mode.
        data_loader: yields inputs of ``model``; at least ``num_iters`` of them.
        num_iters: the number of batches to average over.

    Raises:
        ValueError: if ``num_iters`` is not positive.
        RuntimeError: if ``data_loader`` yields fewer than ``num_iters`` batches.
    """
    if num_iters <= 0:
        raise ValueError(f"update_bn_stats needs num_iters > 0, got {num_iters}")
    bn_layers = get_bn_modules(model)
    if not bn_layers:
        return
    momenta = [bn.momentum for bn in bn_layers]
    tracked = [
        bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
        for bn in bn_layers
    ]
    stats = [_running_stats(bn) for bn in bn_layers]
    means = [torch.zeros_like(mean) for mean, _ in stats]
    variances = [torch.zeros_like(var) for _, var in stats]
    originals = [(mean.clone(), var.clone()) for mean, var in stats]
    for bn in bn_layers:
        bn.momentum = 1.0
    n = 0
    done = False
    try:
        for batch in itertools.islice(data_loader, num_iters):
            model(batch)
            n += 1
            for i, bn in enumerate(bn_layers):
                running_mean, running_var = _running_stats(bn)
                # running average: after n batches, means[i] is the mean of n batch means
                means[i] += (running_mean - means[i]) / n
                variances[i] += (running_var - variances[i]) / n
        if n != num_iters:
            raise RuntimeError(
                f"update_bn_stats needed {num_iters} batches but the data loader yielded only "
                f"{n}. HINT: use an infinite data loader or a smaller num_iters."
            )
        for bn, mean, var in zip(bn_layers, means, variances):
            running_mean, running_var = _running_stats(bn)
            running_mean.copy_(mean)
            running_var.copy_(var)
        done = True
    finally:
        for bn, momentum, count, (mean, var) in zip(bn_layers, momenta, tracked, originals):
            bn.momentum = momentum
            if count is not None and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(count)
            # a failed update leaves the statistics as they were
            if not done and bn.running_mean is not None and bn.running_var is not None:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)


def _running_stats(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn``'s running mean and variance (never None for the layers of :func:`get_bn_modules`)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise RuntimeError(
            f"update_bn_stats: {type(bn).__name__} lost its running statistics during the update "
            "(running_mean or running_var is None). HINT: do not replace BN buffers in forward()."
        )
    return mean, var
