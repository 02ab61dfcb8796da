"""Overhead of d2engine's train loop and basic hooks over a raw PyTorch loop.

The same MLP (784-512-512-10 returning a dict of two losses, batch 64, SGD, data pre-generated in
memory, one CPU thread) is trained by

  (a) a raw PyTorch loop,
  (k) as (a), the gradients set to None by a loop over the parameters instead of
      ``opt.zero_grad()`` (what the trainers do when no profiler records: torch's zero_grad opens
      an empty profiler range, 10-20 us on a CPU; (k) shows the engine's own work without that
      saving),
  (b) SimpleTrainer without hooks,
  (j) as (b) with gather_metric_period=20 (the train loop alone, as DefaultTrainer reads losses),
  (c) SimpleTrainer with DefaultTrainer's per-iteration hooks: IterationTimer, LRScheduler (its
      default schedule, WarmupMultiStepLR: a linear warm-up over the first tenth, one decay at
      three quarters) and PeriodicWriter(JSONWriter, CommonMetricPrinter, TensorboardXWriter)
      at period 20,
  (d) as (c) with gather_metric_period=20 (DefaultTrainer's default: the losses are read once per
      writer period, no host-device sync in between),

the training features' per-iteration cost (``feature_variants``):

  (e) the raw loop + ``ModelEMA.update`` after each step (decay 0.9999),
  (f) as (d) + ``EMAHook``,

a peer, when installed (``pip install pytorch-ignite``; not a dependency of d2engine):

  (g) Ignite's ``create_supervised_trainer`` (its default output: ``loss.item()`` per iteration),

and gradient accumulation, each iteration 4 micro-batches of 16 (one optimizer step):

  (h) a raw loop accumulating 4 micro-batches,
  (i) as (d) with ``grad_accum_steps=4``.

How it is timed: every run notes the time every 20 iterations (the writers' period, so that each
window holds one write and one read of the losses; on CUDA the device is synchronised there), and
a variant's time per iteration is a statistic of all its 20-iteration windows, pooled over the
rounds (the first window of each run, a warm-up, left out): the 10th percentile (the windows the
least disturbed by other work on a shared machine) and the median. Once-per-run costs (a writer
creating its file, its fsync at close) are thus not spread over the iterations. The notes cost the
raw loops a modulo per iteration, the trainers one ``before_step`` hook (~0.3 us) and Ignite one
event handler per iteration (~1 us). The variants run interleaved, round after round, so that drift
of a shared machine hits them all; ratios are against (a) measured in the same run, and the
engine's cost is in microseconds per iteration (variant - a). A separate, untimed run per variant
counts the tensor reads to the host (item, tolist, float, bool, numpy, cpu) per iteration (on CPU
each scalar is read by itself at a flush: there is no transfer to batch).

``--clock cpu`` times the windows with the process's CPU time (``time.process_time``: every
thread of the process, so a writer's background thread counts) instead of the wall clock: on a
machine shared with other jobs it leaves out the time the process waits for a core, which the
wall clock counts (a waiting thread's GIL hand-over still costs wall time only).

Usage::

    python bench/overhead.py            # 300 iterations x 15 rounds (~2 min on a free core)
    python bench/overhead.py --quick    # 100 iterations x 3 rounds (a smoke run, < 30 s)
    python bench/overhead.py --tiny     # hidden width 1: the engine's own cost in us/iter
    python bench/overhead.py --variants a,b,d,g   # some rows only ("a" is always measured)
    python bench/overhead.py --tiny --clock cpu   # CPU time: less disturbed by a busy machine
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
from d2engine.solver.lr_scheduler import WarmupMultiStepLR
from d2engine.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

BATCH = 64
PERIOD = 20  # the writers' period, and the timing window
ACCUM = 4  # micro-batches per iteration in (h) and (i)


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


TIMER: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


class Clock:
    """The time every PERIOD iterations of a run (the device synchronised there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []

    def tick(self, iteration: int) -> None:
        if iteration % PERIOD == 0:
            sync(self.device)
            self.marks.append(TIMER())

    def stop(self) -> list[float]:
        sync(self.device)
        self.marks.append(TIMER())
        return self.marks


class _Ticks(HookBase):
    """Registered first: notes the time before every PERIOD-th iteration and at the end."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def before_step(self) -> None:
        self.clock.tick(self.trainer.iter)

    def after_train(self) -> None:
        self.clock.stop()


def _raw_loop(
    data: list[Any],
    iters: int,
    device: torch.device,
    make_after_step: Callable[[nn.Module], Callable[[], None]] | None = None,
    grads_to_none: bool = False,
) -> list[float]:
    """The raw PyTorch loop; ``make_after_step(model)`` gives what runs after each step;
    ``grads_to_none``: ``p.grad = None`` for each parameter instead of ``opt.zero_grad()``."""
    model, opt = build(device)
    after_step = None if make_after_step is None else make_after_step(model)
    params = list(model.parameters())
    model.train()
    it = cycle(data)
    clock = Clock(device)
    for i in range(iters):
        clock.tick(i)
        batch = next(it)
        loss_dict = model(batch)
        losses = sum(loss_dict.values())
        if grads_to_none:
            for p in params:
                p.grad = None
        else:
            opt.zero_grad()
        losses.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return clock.stop()


def run_raw(data: list[Any], iters: int, device: torch.device, out: Path) -> list[float]:
    return _raw_loop(data, iters, device)


def run_raw_grads_to_none(
    data: list[Any], iters: int, device: torch.device, out: Path
) -> list[float]:
    return _raw_loop(data, iters, device, grads_to_none=True)


def _trainer_run(
    data: list[Any],
    iters: int,
    device: torch.device,
    out: Path,
    *,
    with_hooks: bool,
    period: int,
    extra_hooks: Callable[[nn.Module], list[HookBase]] | None = None,
    accum: int = 1,
) -> list[float]:
    model, opt = build(device)
    extra = {"grad_accum_steps": accum} if accum > 1 else {}
    trainer = SimpleTrainer(model, cycle(data), opt, gather_metric_period=period, **extra)
    clock = Clock(device)
    trainer.register_hooks([_Ticks(clock)])
    if extra_hooks is not None:
        trainer.register_hooks(extra_hooks(model))
    if with_hooks:
        # DefaultTrainer's default schedule (SOLVER.LR_SCHEDULER_NAME "WarmupMultiStepLR")
        sched = WarmupMultiStepLR(opt, [3 * iters // 4], warmup_iters=iters // 10, max_iter=iters)
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
    trainer.train(0, iters)
    return clock.marks


VARIANTS: dict[str, Callable[..., list[float]]] = {
    "(a) raw loop": run_raw,
    "(k) (a), grads set to None directly": run_raw_grads_to_none,
    "(b) SimpleTrainer, no hooks": lambda *a: _trainer_run(*a, with_hooks=False, period=1),
    "(j) as (b), gather period 20": lambda *a: _trainer_run(*a, with_hooks=False, period=PERIOD),
    "(c) + timer, LR, writers @20": lambda *a: _trainer_run(*a, with_hooks=True, period=1),
    "(d) as (c), gather period 20": lambda *a: _trainer_run(*a, with_hooks=True, period=PERIOD),
}


# ------------------------------------------------------------------ training features (issue 12)
def run_raw_ema(data: list[Any], iters: int, device: torch.device, out: Path) -> list[float]:
    """The raw loop with an EMA of the weights updated after each optimizer step."""

    def ema_update(model: nn.Module) -> Callable[[], None]:
        ema = ModelEMA(model, decay=0.9999)
        return lambda: ema.update(model)

    return _raw_loop(data, iters, device, ema_update)


def feature_variants() -> dict[str, Callable[..., list[float]]]:
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
    "(i) as (d), grad_accum_steps=4": "(h) raw loop, 4 micro-batches/step",
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


def print_feature_costs(per_iter: dict[str, float], device: torch.device) -> None:
    """Each feature's cost per iteration: its row minus its base row, and the EMA update timed
    alone against the raw loop's iteration."""
    for name, base in FEATURE_BASES.items():
        if name in per_iter and base in per_iter:
            cost = per_iter[name] - per_iter[base]
            share = cost / per_iter[base]
            print(f"{name}: {1e6 * cost:+.1f} us/iter over {base} ({100 * share:+.2f}%)")
    if "(e) raw loop + ModelEMA.update" in per_iter:
        update = time_ema_update(device)
        raw = per_iter["(a) raw loop"]
        print(
            f"ModelEMA.update timed alone: {1e6 * update:.1f} us per update "
            f"({100 * update / raw:.2f}% of a raw-loop iteration)"
        )


# ------------------------------------------------------------ a peer, and gradient accumulation
def run_ignite(data: list[Any], iters: int, device: torch.device, out: Path) -> list[float]:
    """Ignite's supervised trainer on the same model, losses summed as in the raw loop."""
    from ignite.engine import Events, create_supervised_trainer  # optional: the bench's only

    model, opt = build(device)
    trainer = create_supervised_trainer(
        model,
        opt,
        loss_fn=lambda loss_dict, _: sum(loss_dict.values()),
        prepare_batch=lambda batch, device, non_blocking: (batch, None),
        model_fn=lambda model, batch: model(batch),
    )
    clock = Clock(device)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: clock.tick(e.state.iteration - 1))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: clock.stop())
    trainer.run(cycle(data), max_epochs=1, epoch_length=iters)
    return clock.marks


def _micro_batches(data: list[Any]) -> list[Any]:
    """Each batch split into ACCUM micro-batches, in order."""
    return [(x[i::ACCUM], y[i::ACCUM]) for x, y in data for i in range(ACCUM)]


def run_raw_accumulating(
    data: list[Any], iters: int, device: torch.device, out: Path
) -> list[float]:
    """The raw loop over ACCUM micro-batches per optimizer step (the same samples per step)."""
    model, opt = build(device)
    model.train()
    it = cycle(_micro_batches(data))
    clock = Clock(device)
    for i in range(iters):
        clock.tick(i)
        opt.zero_grad()
        for _ in range(ACCUM):
            loss_dict = model(next(it))
            (sum(loss_dict.values()) / ACCUM).backward()
        opt.step()
    return clock.stop()


def _accumulating_run(data: list[Any], iters: int, device: torch.device, out: Path) -> list[float]:
    return _trainer_run(
        _micro_batches(data), iters, device, out, with_hooks=True, period=PERIOD, accum=ACCUM
    )


def peer_and_accumulation_variants() -> dict[str, Callable[..., list[float]]]:
    """(g) when Ignite is installed, (h) and (i)."""
    variants: dict[str, Callable[..., list[float]]] = {}
    try:
        import ignite  # noqa: F401  (optional: the bench's only)
    except ImportError:
        print("(g) skipped: Ignite is not installed (pip install pytorch-ignite)")
    else:
        variants["(g) Ignite create_supervised_trainer"] = run_ignite
    variants["(h) raw loop, 4 micro-batches/step"] = run_raw_accumulating
    variants["(i) as (d), grad_accum_steps=4"] = _accumulating_run
    return variants


_READS = ("item", "tolist", "__float__", "__bool__", "numpy", "cpu")


def count_host_reads(fn: Callable[..., Any], data: list[Any], iters: int, *args: Any) -> int:
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="iterations per run")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (windows pooled)")
    parser.add_argument("--quick", action="store_true", help="100 iterations x 3 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=(
            "hidden width 1: the model costs little, so 'engine us/iter' is measured with less "
            "noise"
        ),
    )
    parser.add_argument(
        "--variants", default="", help="the rows to run, e.g. a,b,d,g (default: all)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time the windows with the wall clock or the process's CPU time (all threads)",
    )
    args = parser.parse_args(argv)
    global TIMER
    TIMER = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.tiny:
        global HIDDEN
        HIDDEN = 1
    if args.quick:
        args.iters, args.repeats = 100, 3
    args.iters = max(2, -(-args.iters // PERIOD)) * PERIOD  # whole windows, at least two
    torch.set_num_threads(1)
    device = torch.device(args.device)
    data = make_data(32, device)

    variants = {**VARIANTS, **feature_variants(), **peer_and_accumulation_variants()}
    if args.variants:
        wanted = {"a", *args.variants.split(",")}
        variants = {k: v for k, v in variants.items() if k[1] in wanted}
    with tempfile.TemporaryDirectory() as tmp:
        # CommonMetricPrinter logs to a file, as in a real job (not to the console here).
        log = logging.getLogger("d2engine")
        log.setLevel(logging.INFO)
        log.propagate = False
        handler = logging.FileHandler(Path(tmp) / "log.txt")
        log.addHandler(handler)
        windows: dict[str, list[float]] = {name: [] for name in variants}
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
                marks = fn(data, args.iters, device, out)
                windows[name] += [(b - a) / PERIOD for a, b in zip(marks[1:], marks[2:])]
        log.removeHandler(handler)
        handler.close()

    print(
        f"d2engine overhead: MLP 784-{HIDDEN}-{HIDDEN}-10, batch {BATCH}, SGD, {args.iters} "
        f"iterations x {args.repeats} rounds ({PERIOD}-iteration windows, {args.clock} clock), "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    stats = (("p10", lambda v: _percentile(v, 0.1)), ("median", statistics.median))
    per_iter: dict[str, dict[str, float]] = {}
    for stat_name, stat in stats:
        per_iter[stat_name] = {name: stat(w) for name, w in windows.items()}
        base = per_iter[stat_name]["(a) raw loop"]
        print(f"\n{stat_name} of the windows:")
        header = (
            f"{'variant':40s} {'ms/iter':>9s} {'ratio':>7s} {'engine us/iter':>15s} "
            f"{'reads/iter':>11s}"
        )
        print(header)
        print("-" * len(header))
        for name, value in per_iter[stat_name].items():
            print(
                f"{name:40s} {1e3 * value:9.3f} {value / base:7.3f} "
                f"{1e6 * (value - base):15.1f} {reads[name] / args.iters:11.2f}"
            )
    print()
    for stat_name, values in per_iter.items():
        base = values["(a) raw loop"]
        summary = []
        for key, label in (("c", "(c) gather period 1"), ("d", "(d) gather period 20")):
            name = next((n for n in values if n[1] == key), None)
            if name is not None:
                ratio = values[name] / base
                verdict = "met" if ratio <= 1.03 else "NOT met"
                summary.append(
                    f"{label} {verdict} ({ratio:.3f}, {1e6 * (values[name] - base):+.1f} us)"
                )
        direct = next((values[n] for n in values if n[1] == "k"), None)
        if direct is not None:
            for key in "jd":
                row = next((values[n] for n in values if n[1] == key), None)
                if row is not None:
                    summary.append(f"({key}) - (k) {1e6 * (row - direct):+.1f} us")
        ignite = values.get("(g) Ignite create_supervised_trainer")
        if ignite is not None:
            summary.append(f"Ignite (g) {1e6 * (ignite - base):+.1f} us")
            for key in "jd":
                row = next((values[n] for n in values if n[1] == key), None)
                if row is not None:
                    summary.append(f"({key}) - (g) {1e6 * (row - ignite):+.1f} us")
        print(f"{stat_name:6s}: hooks/raw <= 1.03: " + "; ".join(summary))
    print_feature_costs(per_iter["p10"], device)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
