"""Benchmark checkpoints: atomic Checkpointer.save vs torch.save, async vs sync stall, and the
cost of the integrity checks (CRC-32 verification on load, the finite-weights check on save).

Measures, for a model + SGD-momentum state of about ``--size-mb`` MB:

1. ``save ratio``: median time of ``Checkpointer.save`` (temporary file, fsync, rename, then the
   same for ``last_checkpoint``) divided by the median time of a plain ``torch.save`` of the same
   state to a path. The difference is mostly the cost of fsync (durability).
2. ``stall ratio``: median time ``Checkpointer(async_save=True).save`` blocks the caller (the CPU
   snapshot) divided by the median time of a synchronous ``save``. Target: <= 0.10.
3. ``verify ratio``: median time of ``load_checkpoint_file`` (CRC-32 of every record, then
   ``torch.load``) divided by the same load without verification (the file in the page cache, as
   right after a save: the ratio is an upper bound; from a cold disk the read dominates both).
4. ``finite check``: the time of the check that the parameters are finite (part of every tagged
   save) as a share of a synchronous ``save``.

Usage: ``python bench/checkpoint.py [--size-mb 100] [--repeats 5] [--dir DIR]``. Runs in well under
a minute on a laptop; prints one line per figure.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from d2engine.checkpoint import Checkpointer, file_io, integrity


def _timed(
    fn: Callable[[], None], repeats: int, after: Callable[[], None] | None = None
) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return times


def _build(size_mb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    # weights + momentum buffer = size_mb: side^2 * 4 bytes * 2
    side = int(math.sqrt(size_mb * 1024 * 1024 / 8))
    model = nn.Linear(side, side)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(4, side)).sum().backward()
    optimizer.step()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per figure")
    parser.add_argument("--dir", default=None, help="directory to write to (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, optimizer = _build(args.size_mb)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        sync = Checkpointer(model, os.path.join(root, "sync"), optimizer=optimizer)
        sync.save("warmup")
        size = os.path.getsize(os.path.join(root, "sync", "warmup.pth")) / 2**20
        plain_path = os.path.join(root, "plain.pth")

        def plain_save() -> None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, plain_path)

        def plain_save_fsync() -> None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            with open(plain_path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        plain = _timed(plain_save, args.repeats)
        plain_fsync = _timed(plain_save_fsync, args.repeats)
        atomic = _timed(lambda: sync.save("model"), args.repeats)

        async_ckpt = Checkpointer(
            model, os.path.join(root, "async"), optimizer=optimizer, async_save=True
        )
        async_ckpt.save("warmup")
        async_ckpt.wait()
        stall = _timed(lambda: async_ckpt.save("model"), args.repeats, after=async_ckpt.wait)
        async_ckpt.close()

        saved = os.path.join(root, "sync", "model.pth")
        file_io.load_checkpoint_file(saved)  # in the page cache for both
        unverified = _timed(lambda: file_io.load_checkpoint_file(saved, verify=False), args.repeats)
        verified = _timed(lambda: file_io.load_checkpoint_file(saved), args.repeats)
        verify_only = _timed(lambda: file_io.verify_checkpoint_file(saved), args.repeats)
        params = dict(model.named_parameters())
        finite = _timed(lambda: integrity.non_finite_tensors(params), args.repeats)

    plain_med, fsync_med, atomic_med, stall_med = map(
        statistics.median, (plain, plain_fsync, atomic, stall)
    )
    print(f"checkpoint size           : {size:.1f} MiB, {args.repeats} repeats, medians")
    print(f"torch.save (plain)        : {plain_med * 1e3:8.1f} ms")
    print(f"torch.save + fsync        : {fsync_med * 1e3:8.1f} ms")
    print(f"Checkpointer.save (sync)  : {atomic_med * 1e3:8.1f} ms")
    print(f"save ratio                : {atomic_med / plain_med:8.2f}x  (atomic+fsync / plain)")
    print(
        f"save ratio vs durable     : {atomic_med / fsync_med:8.2f}x  (atomic+fsync / save+fsync)"
    )
    print(f"async save() stall        : {stall_med * 1e3:8.1f} ms")
    ratio = stall_med / atomic_med
    verdict = "OK" if ratio <= 0.10 else "ABOVE TARGET"
    print(
        f"stall ratio               : {ratio:8.3f}   "
        f"(async stall / sync save; target <= 0.10: {verdict})"
    )
    load_med, verified_med, verify_med, finite_med = map(
        statistics.median, (unverified, verified, verify_only, finite)
    )
    print(f"load, no verification     : {load_med * 1e3:8.1f} ms")
    print(f"load, CRC-32 verified     : {verified_med * 1e3:8.1f} ms")
    print(
        f"  of which verification   : {verify_med * 1e3:8.1f} ms  "
        f"({size / verify_med / 1024:.2f} GiB/s)"
    )
    print(
        f"verify ratio              : {verified_med / load_med:8.2f}x  (verified / unverified load)"
    )
    print(
        f"finite check (on save)    : {finite_med * 1e3:8.1f} ms  "
        f"({finite_med / atomic_med:.1%} of a sync save)"
    )


if __name__ == "__main__":
    main()
