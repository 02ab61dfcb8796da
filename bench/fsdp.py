"""FSDP2 against DDP and one process: step time, per-rank memory, and the training stall of sharded
checkpoint saves (synchronous vs asynchronous).

The model is an MLP of ``--blocks`` blocks (Linear ``--width`` x ``--width`` + ReLU; default 8 x
1024: 8.4 M parameters, 34 MB in fp32) with AdamW (two state tensors per parameter), a global batch
of 64 samples, one thread per process, gloo on this machine. Measured, in this order:

1. step time of one process (batch 64), 2 DDP processes (32 each) and 2 FSDP processes (32 each,
   every block a unit): the fastest of 5 windows of steps, the slowest rank;
2. the bytes of parameters + optimizer state each FSDP rank holds, against one process;
3. with 2 FSDP processes and a ``Checkpointer``: a synchronous sharded save (the training waits for
   the whole write), an asynchronous one (the training waits only for the copy into CPU memory:
   the *stall*; the write goes on in the background, on a process group of its own), and the time
   until that write is complete. The target is a stall of at most 10% of a synchronous save. The
   first asynchronous save allocates the staging buffers; later ones reuse them (steady state).

    python bench/fsdp.py [--blocks 8] [--width 1024] [--steps 30] [--saves 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint import Checkpointer, sharded
from d2engine.engine.ddp import create_ddp_model, create_fsdp_model
from d2engine.engine.launch import launch
from d2engine.utils import comm

GLOBAL_BATCH = 64


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def _mlp(blocks: int, width: int) -> nn.Module:
    return nn.Sequential(*(Block(width) for _ in range(blocks)), nn.Linear(width, 10))


def _held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the unsharded model) of parameters + optimizer state."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    tensors = params + [v for p in params for v in optimizer.state[p].values() if v.dim()]
    held = sum(local(t).numel() * t.element_size() for t in tensors)
    return held, sum(t.numel() * t.element_size() for t in tensors)


def _worker(mode: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = comm.get_world_size()
    model = _mlp(args.blocks, args.width)
    if mode == "fsdp":
        model = create_fsdp_model(model, shard_modules=[Block])
    elif mode == "ddp":
        model = create_ddp_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = GLOBAL_BATCH // world
    data = [(torch.randn(batch, args.width), torch.randint(0, 10, (batch,))) for _ in range(4)]

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(i)
    windows = []
    for _ in range(5):
        comm.synchronize()
        start = time.perf_counter()
        for i in range(args.steps // 5):
            step(i)
        windows.append((time.perf_counter() - start) / (args.steps // 5))
    result: dict[str, Any] = {"step_s": max(comm.all_gather(min(windows)))}
    result["held"], result["unsharded"] = _held_bytes(model, optimizer)
    if mode == "fsdp":
        result.update(_saves(model, optimizer, step, args))
    if comm.is_main_process():
        Path(out).write_text(json.dumps(result))


def _saves(model: nn.Module, optimizer: torch.optim.Optimizer, step: Any, args: Any) -> dict:
    """Seconds (the slowest rank) of sync saves; of async saves: the save() call, the stall (the
    call plus the time the next optimizer step waits for the copy of the shards), the slowdown
    of that training step beyond the stall (the background write shares the CPU), and the time
    until the write is complete."""
    times: dict[str, list[float]] = {
        "sync": [],
        "returned": [],
        "stall": [],
        "slowdown": [],
        "async_total": [],
        "step": [],
    }
    # Measurement only: time the optimizer hook that waits for the copy of the shards.
    fence_waits: list[float] = []
    wait_for_staging = sharded.ShardedSaver._wait_for_staging

    def timed_wait(self: Any, *hook_args: Any) -> None:
        start = time.perf_counter()
        wait_for_staging(self, *hook_args)
        fence_waits.append(time.perf_counter() - start)

    sharded.ShardedSaver._wait_for_staging = timed_wait  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = comm.all_gather(tmp)[0]  # rank 0's directory for everyone
        for async_save in (False, True):
            checkpointer = Checkpointer(model, tmp, optimizer=optimizer, async_save=async_save)
            for i in range(args.saves):
                step(i)
                comm.synchronize()
                start = time.perf_counter()
                step(i + 1)
                plain_step = time.perf_counter() - start  # a step without a save
                comm.synchronize()
                start = time.perf_counter()
                checkpointer.save(f"model_{int(async_save)}{i:06d}")
                returned = time.perf_counter() - start
                fence_waits.clear()
                if async_save:
                    step(i + 2)  # its optimizer step waits for the copy of the shards
                stepped = time.perf_counter() - start
                checkpointer.wait()
                complete = time.perf_counter() - start
                fence = sum(fence_waits)
                slowdown = stepped - returned - fence - plain_step
                values = comm.all_gather((returned, fence, slowdown, complete, plain_step))
                returned, fence, slowdown, complete, plain_step = (max(t) for t in zip(*values))
                if async_save:
                    times["returned"].append(returned)
                    times["stall"].append(returned + fence)
                    times["slowdown"].append(slowdown)
                    times["async_total"].append(complete)
                else:
                    times["sync"].append(complete)
                times["step"].append(plain_step)
            checkpointer.close()
        comm.synchronize()
    return times


def _measure(mode: str, procs: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        launch(_worker, procs, args=(mode, args, out))
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="number of Linear blocks")
    parser.add_argument("--width", type=int, default=1024, help="width of the blocks")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--saves", type=int, default=4, help="saves of each kind")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default /tmp)")
    args = parser.parse_args()

    params = sum(p.numel() for p in _mlp(args.blocks, args.width).parameters())
    one, ddp, fsdp = _measure("one", 1, args), _measure("ddp", 2, args), _measure("fsdp", 2, args)
    print(
        f"MLP {args.blocks} x {args.width} ({params / 1e6:.1f} M parameters, "
        f"{params * 4 / 2**20:.0f} MiB fp32), AdamW, global batch {GLOBAL_BATCH}, gloo, "
        f"1 thread per process"
    )
    print(f"{'configuration':<22}{'step ms':>10}{'params+optimizer MiB/rank':>28}")
    for name, r in (("1 process", one), ("2 processes, DDP", ddp), ("2 processes, FSDP2", fsdp)):
        print(f"{name:<22}{r['step_s'] * 1e3:>10.1f}{r['held'] / 2**20:>28.1f}")
    print(f"FSDP rank holds {fsdp['held'] / one['held']:.2f} of one process's parameters+optimizer")

    sync = statistics.median(fsdp["sync"])
    stall_first, stall = fsdp["stall"][0], statistics.median(fsdp["stall"][1:])
    returned = statistics.median(fsdp["returned"][1:])
    total = statistics.median(fsdp["async_total"][1:])
    print(f"sharded save, 2 FSDP processes ({args.saves} of each, medians; ms):")
    print(f"  synchronous save (training waits for all of it)      {sync * 1e3:8.1f}")
    print(f"  asynchronous save() returns after                    {returned * 1e3:8.1f}")
    print(f"  asynchronous save: training stall (+ the wait of the  {stall * 1e3:8.1f}")
    print("    next optimizer step for the copy of the shards)")
    slowdown = statistics.median(fsdp["slowdown"][1:])
    print(f"    next training step slower besides (shared CPU)     {slowdown * 1e3:8.1f}")
    print(f"    first asynchronous save's stall (allocates)        {stall_first * 1e3:8.1f}")
    print(f"    until the background write is complete             {total * 1e3:8.1f}")
    print(f"  (a training step without a save: {statistics.median(fsdp['step']) * 1e3:.1f} ms)")
    print(f"  stall / synchronous save: {stall / sync:.3f} (target <= 0.10)")


if __name__ == "__main__":
    main()
