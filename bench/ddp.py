"""Throughput of 2 gloo processes against 1 on a CPU MLP, and the per-step communication cost.

The model is the MLP of bench/overhead.py (784-512-512-10, batch 64 per process, SGD, one thread
per process). Three configurations run in this order, each for the same number of timed steps
after a warm-up:

1. one process, no DDP (the baseline);
2. two processes started by ``d2engine.engine.launch``, each training its own model without DDP
   (what two processes cost on this machine without any communication);
3. two processes with ``create_ddp_model`` (gloo all-reduce of the gradients).

Printed: step time (the fastest of 5 windows of steps; the slowest rank) and samples/s of each,
the throughput ratio of 3 to 1 (2.0 is perfect scaling), and the communication cost per step =
step time of 3 minus step time of 2, which separates the all-reduce from the slowdown two
processes cause by sharing CPU cores and memory bandwidth.

    python bench/ddp.py [--steps 200] [--warmup 20] [--fp16-compression]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from d2engine.engine.ddp import create_ddp_model
from d2engine.engine.launch import launch
from d2engine.utils import comm

BATCH_SIZE = 64


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def _train(steps: int, warmup: int, use_ddp: bool, fp16_compression: bool, out: str) -> None:
    """Train for ``warmup + steps`` steps; rank 0 writes the step time of the timed part."""
    torch.set_num_threads(1)
    torch.manual_seed(comm.get_rank())
    model = _mlp()
    if use_ddp:
        model = create_ddp_model(model, fp16_compression=fp16_compression)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [
        (torch.randn(BATCH_SIZE, 1, 28, 28), torch.randint(0, 10, (BATCH_SIZE,))) for _ in range(8)
    ]
    loss_fn = nn.CrossEntropyLoss()

    def step(i: int) -> None:
        images, labels = batches[i % len(batches)]
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    # The timed steps run in 5 windows; the fastest window's mean is reported, which filters out
    # the slowdowns other programs on a shared machine cause.
    windows = []
    for w in range(5):
        comm.synchronize()
        start = time.perf_counter()
        for i in range(steps // 5):
            step(w * (steps // 5) + i)
        windows.append((time.perf_counter() - start) / (steps // 5))
    times = comm.all_gather(min(windows))
    if comm.is_main_process():
        Path(out).write_text(json.dumps({"step_s": max(times)}))


def _measure(num_procs: int, use_ddp: bool, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        launch(
            _train,
            num_procs,
            dist_url="auto",
            args=(args.steps, args.warmup, use_ddp, args.fp16_compression, out),
        )
        return json.loads(Path(out).read_text())["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--fp16-compression", action="store_true", help="compress gradients")
    args = parser.parse_args()

    params = sum(p.numel() for p in _mlp().parameters())
    rows = [
        ("1 process", 1, _measure(1, False, args)),
        ("2 processes, no DDP", 2, _measure(2, False, args)),
        ("2 processes, DDP (gloo)", 2, _measure(2, True, args)),
    ]
    print(
        f"MLP 784-512-512-10 ({params / 1e6:.2f} M parameters), batch {BATCH_SIZE} per process, "
        f"SGD, 1 thread per process, {args.steps} timed steps"
        + (", fp16 gradient compression" if args.fp16_compression else "")
    )
    print(f"{'configuration':<26}{'step ms':>10}{'samples/s':>12}")
    for name, procs, step_s in rows:
        print(f"{name:<26}{step_s * 1e3:>10.2f}{procs * BATCH_SIZE / step_s:>12.0f}")
    base, alone, ddp = (r[2] for r in rows)
    ratio = (2 * BATCH_SIZE / ddp) / (BATCH_SIZE / base)
    grad_mb = params * (2 if args.fp16_compression else 4) / 2**20
    print(f"throughput ratio, 2 DDP processes vs 1: {ratio:.2f} (2.00 = perfect scaling)")
    print(
        f"communication per step (DDP - no DDP, 2 processes): {(ddp - alone) * 1e3:.2f} ms "
        f"for {grad_mb:.1f} MiB of gradients"
    )
    print(f"slowdown of 2 processes without communication vs 1: {alone / base:.2f}x")


if __name__ == "__main__":
    main()
