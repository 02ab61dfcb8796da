"""Shared fixtures: every test starts and ends without a process group or leaked environment."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported by torch's first optimizer; sets TORCHINDUCTOR_CACHE_DIR)
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves a process group behind or changes the environment."""
    env_before = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    yield
    leaked_group = dist.is_available() and dist.is_initialized()
    if leaked_group:
        dist.destroy_process_group()
    env_after = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    for key in env_after.keys() - env_before.keys():
        del os.environ[key]
    os.environ.update(env_before)
    assert not leaked_group, "the test left a torch.distributed process group initialised"
    changed = {
        k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k)
    }
    assert not changed, f"the test changed environment variables: {sorted(changed)}"


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterator[None]:
    """Tests run single-threaded and seeded so that their numbers repeat."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """Put back the handlers of the signals a test may change (``launch`` ignores SIGTERM after a
    stopped job; child processes would inherit that)."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in signals}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
