"""d2engine.utils.memory.retry_if_cuda_oom: retry after emptying the cache, then on the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from d2engine.utils.memory import retry_if_cuda_oom


class _FakeCuda:
    """Something with a CUDA device that can move to the CPU (no GPU needed)."""

    device = torch.device("cuda")

    def to(self, device: str) -> str:
        return f"moved to {device}"


def test_retries_then_moves_inputs_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    calls: list[tuple[Any, ...]] = []

    def flaky(x: Any, *, y: Any) -> str:
        calls.append((x, y))
        if len(calls) < 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return f"{x} / {y}"

    assert retry_if_cuda_oom(flaky)(_FakeCuda(), y=3) == "moved to cpu / 3"
    assert len(calls) == 3 and emptied == [1]


def test_succeeds_after_emptying_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    attempts = iter([torch.cuda.OutOfMemoryError("oom"), None])

    def once_oom(x: int) -> int:
        error = next(attempts)
        if error is not None:
            raise error
        return x + 1

    assert retry_if_cuda_oom(once_oom)(1) == 2


def test_other_errors_pass_through_at_once() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        retry_if_cuda_oom(broken)()
    assert calls == [1]
