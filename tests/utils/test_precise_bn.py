"""update_bn_stats when a layer's running statistics disappear during the update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2engine.utils.precise_bn import update_bn_stats


class _DropsStats(nn.Module):
    """Two BN layers; the second one's running statistics are set to None by the second forward."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = nn.BatchNorm1d(3)
        self.dropped = nn.BatchNorm1d(3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            self.dropped.running_mean = self.dropped.running_var = None
        return self.dropped(self.kept(x))


def test_update_bn_stats_names_a_layer_that_lost_its_statistics() -> None:
    torch.manual_seed(0)
    model = _DropsStats().train()
    before = model.kept.running_mean.clone(), model.kept.running_var.clone()
    batches = [torch.randn(8, 3) * 3 + 1 for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"BatchNorm1d lost its running statistics.*HINT"):
        update_bn_stats(model, batches, num_iters=3)
    # the failed update leaves the layers that still have statistics as they were
    torch.testing.assert_close(model.kept.running_mean, before[0])
    torch.testing.assert_close(model.kept.running_var, before[1])
    assert model.kept.momentum == 0.1 and model.dropped.momentum == 0.1
