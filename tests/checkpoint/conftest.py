"""Fixtures for the checkpoint tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _import_torch_optim_lazies() -> None:
    """Create one optimizer before any test runs.

    torch's first optimizer imports ``torch._dynamo``, which sets ``TORCHINDUCTOR_CACHE_DIR`` in the
    environment; without this warm-up the leak check of tests/conftest.py blames whichever test
    happened to be first.
    """
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
