"""Overhead of d2engine's train loop and basic hooks over a raw PyTorch loop.

The same MLP (784-512-512-10 returning a dict of two losses, batch 64, SGD, data pre-generated in
memory, one CPU thread) is trained by

  (a) a raw PyTorch loop,
  (b) SimpleTrainer without hooks,
  (c) SimpleTrainer with IterationTimer, LRScheduler and
      PeriodicWriter(JSONWriter, CommonMetricPrinter, TensorboardXWriter) at period 20,
  (d) as (c) with gather_metric_period=20,

and the training features' per-iteration cost (``feature_variants``):

  (e) the raw loop + ``ModelEMA.update`` after each step (decay 0.9999),
  (f) as (d) + ``EMAHook``.

The variants run interleaved, round after round, so that drift of a shared machine hits them all;
each table shows the fastest round (the least disturbed by other work) and the median, with
ratios against (a) measured in the same run, and the
engine's cost in microseconds per iteration ((variant - a) / iterations). A separate, untimed run
per variant counts the tensor reads that synchronise with the device (item, tolist, float, bool,
numpy, cpu) per iteration.

Usage::

    python bench/overhead.py            # 300 iterations x 15 rounds (~2 min on a free core)
    python bench/overhead.py --quick    # 100 iterations x 3 rounds (a smoke run, < 30 s)
    python bench/overhead.py --tiny     # hidden width 1: the engine's own cost in us/iter
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2engine.engine import hooks
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.modeling import ModelEMA
from d2engine.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

BATCH = 64
PERIOD = 20


HIDDEN = 512  # --tiny sets 1: the step then costs almost nothing but the engine's own work


class MLP(nn.Module):
    """784-512-512-10 returning two losses (cross-entropy and a small L2 term on the logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, 10),
        )

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.net(x)
        return {
            "loss_cls": nn.functional.cross_entropy(logits, y),
            "loss_reg": 1e-4 * logits.pow(2).mean(),
        }


def make_data(n_batches: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(BATCH, 784, generator=g).to(device),
            torch.randint(0, 10, (BATCH,), generator=g).to(device),
        )
        for _ in range(n_batches)
    ]


def cycle(data: list[Any]) -> Iterator[Any]:
    while True:
        yield from data


def build(device: torch.device) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP().to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_raw(data: list[Any], iters: int, device: torch.device, out: Path) -> float:
    model, opt = build(device)
    model.train()
    it = cycle(data)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        batch = next(it)
        loss_dict = model(batch)
        losses = sum(loss_dict.values())
        opt.zero_grad()
        losses.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start


def _trainer_run(
    data: list[Any],
    iters: int,
    device: torch.device,
    out: Path,
    *,
    with_hooks: bool,
    period: int,
    extra_hooks: Callable[[nn.Module], list[HookBase]] | None = None,
) -> float:
    model, opt = build(device)
    trainer = SimpleTrainer(model, cycle(data), opt, gather_metric_period=period)
    if extra_hooks is not None:
        trainer.register_hooks(extra_hooks(model))
    if with_hooks:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
        writers = [
            JSONWriter(out / "metrics.json"),
            CommonMetricPrinter(iters),
            TensorboardXWriter(out / "tb"),
        ]
        trainer.register_hooks(
            [
                hooks.IterationTimer(),
                hooks.LRScheduler(opt, sched),
                hooks.PeriodicWriter(writers, period=PERIOD),
            ]
        )
    sync(device)
    start = time.perf_counter()
    trainer.train(0, iters)
    sync(device)
    return time.perf_counter() - start


VARIANTS: dict[str, Callable[..., float]] = {
    "(a) raw loop": run_raw,
    "(b) SimpleTrainer, no hooks": lambda *a: _trainer_run(*a, with_hooks=False, period=1),
    "(c) + timer, LR, writers @20": lambda *a: _trainer_run(*a, with_hooks=True, period=1),
    "(d) as (c), gather period 20": lambda *a: _trainer_run(*a, with_hooks=True, period=PERIOD),
}


# ------------------------------------------------------------------ training features (issue 12)
def run_raw_ema(data: list[Any], iters: int, device: torch.device, out: Path) -> float:
    """The raw loop with an EMA of the weights updated after each optimizer step."""
    model, opt = build(device)
    ema = ModelEMA(model, decay=0.9999)
    model.train()
    it = cycle(data)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        batch = next(it)
        loss_dict = model(batch)
        losses = sum(loss_dict.values())
        opt.zero_grad()
        losses.backward()
        opt.step()
        ema.update(model)
    sync(device)
    return time.perf_counter() - start


def feature_variants() -> dict[str, Callable[..., float]]:
    """The training features' rows; each is compared with (a) and with its base variant."""
    return {
        "(e) raw loop + ModelEMA.update": run_raw_ema,
        "(f) as (d) + EMAHook": lambda *a: _trainer_run(
            *a,
            with_hooks=True,
            period=PERIOD,
            extra_hooks=lambda model: [hooks.EMAHook(ModelEMA(model, decay=0.9999))],
        ),
    }


FEATURE_BASES = {
    "(e) raw loop + ModelEMA.update": "(a) raw loop",
    "(f) as (d) + EMAHook": "(d) as (c), gather period 20",
}


def time_ema_update(device: torch.device, calls: int = 50, rounds: int = 20) -> float:
    """Seconds per ``ModelEMA.update`` of the MLP alone: the fastest of ``rounds`` short runs,
    which a busy machine disturbs less than whole training runs."""
    model, _ = build(device)
    ema = ModelEMA(model, decay=0.9999)
    ema.update(model)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            ema.update(model)
        sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def print_feature_costs(times: dict[str, list[float]], iters: int, device: torch.device) -> None:
    """Each feature's cost per iteration: its row minus its base row (fastest rounds), and the
    EMA update timed alone against the raw loop's iteration."""
    for name, base in FEATURE_BASES.items():
        if name in times:
            cost = (min(times[name]) - min(times[base])) / iters
            share = cost / (min(times[base]) / iters)
            print(f"{name}: {1e6 * cost:+.1f} us/iter over {base} ({100 * share:+.2f}%)")
    update = time_ema_update(device)
    raw = min(times["(a) raw loop"]) / iters
    print(
        f"ModelEMA.update timed alone: {1e6 * update:.1f} us per update "
        f"({100 * update / raw:.2f}% of a raw-loop iteration)"
    )


_READS = ("item", "tolist", "__float__", "__bool__", "numpy", "cpu")


def count_host_reads(fn: Callable[..., float], data: list[Any], iters: int, *args: Any) -> int:
    """The number of tensor reads to the host during one (untimed) run of ``fn``."""
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            nonlocal count
            count += 1
            return orig(self, *a, **k)

        return wrapper

    try:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, wrap(orig))
        fn(data, iters, *args)
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="iterations per run")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (min and median reported)")
    parser.add_argument("--quick", action="store_true", help="100 iterations x 3 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="hidden width 1: the model costs little, so 'engine us/iter' is measured with less noise",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        global HIDDEN
        HIDDEN = 1
    if args.quick:
        args.iters, args.repeats = 100, 3
    torch.set_num_threads(1)
    device = torch.device(args.device)
    data = make_data(32, device)

    variants = {**VARIANTS, **feature_variants()}
    with tempfile.TemporaryDirectory() as tmp:
        # CommonMetricPrinter logs to a file, as in a real job (not to the console here).
        log = logging.getLogger("d2engine")
        log.setLevel(logging.INFO)
        log.propagate = False
        handler = logging.FileHandler(Path(tmp) / "log.txt")
        log.addHandler(handler)
        times: dict[str, list[float]] = {name: [] for name in variants}
        reads: dict[str, int] = {}
        for i, (name, fn) in enumerate(variants.items()):  # warm-up and read counts
            out = Path(tmp) / f"warm{i}"
            out.mkdir()
            reads[name] = count_host_reads(fn, data, args.iters, device, out)
        items = list(variants.items())
        for r in range(args.repeats):
            # Rotate the order each round: no variant always runs first (or after the slowest).
            for i in range(len(items)):
                name, fn = items[(i + r) % len(items)]
                out = Path(tmp) / f"r{r}v{i}"
                out.mkdir()
                times[name].append(fn(data, args.iters, device, out))
        log.removeHandler(handler)
        handler.close()

    print(
        f"d2engine overhead: MLP 784-{HIDDEN}-{HIDDEN}-10, batch {BATCH}, SGD, {args.iters} iterations, "
        f"{args.repeats} rounds, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread"
    )
    # Noise on a shared machine only ever adds time, so the fastest round of each variant is the
    # least disturbed estimate of its cost; the median is printed beside it.
    ratios = {}
    for stat_name, stat in (("min", min), ("median", statistics.median)):
        base = stat(times["(a) raw loop"])
        print(f"\n{stat_name} over rounds:")
        header = (
            f"{'variant':32s} {'ms/iter':>9s} {'ratio':>7s} {'engine us/iter':>15s} "
            f"{'reads/iter':>11s}"
        )
        print(header)
        print("-" * len(header))
        for name, ts in times.items():
            value = stat(ts)
            ratios[stat_name, name] = value / base
            print(
                f"{name:32s} {1e3 * value / args.iters:9.3f} {value / base:7.3f} "
                f"{1e6 * (value - base) / args.iters:15.1f} {reads[name] / args.iters:11.2f}"
            )
    print()
    for stat_name in ("min", "median"):
        ratio_c = ratios[stat_name, "(c) + timer, LR, writers @20"]
        ratio_d = ratios[stat_name, "(d) as (c), gather period 20"]
        verdict = "met" if ratio_c <= 1.03 else "NOT met"
        print(
            f"{stat_name:6s}: target (c)/(a) <= 1.03 {verdict} ({ratio_c:.3f}); "
            f"(d)/(a) = {ratio_d:.3f}"
        )
    print_feature_costs(times, args.iters, device)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
