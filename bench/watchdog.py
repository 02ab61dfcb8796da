"""Per-iteration cost of the hang watchdog (``hooks.HangWatchdog``, ``SOLVER.HANG_TIMEOUT``).

The model, data and method are those of ``bench/overhead.py`` (its MLP and SimpleTrainer; one CPU
thread; the variants run interleaved, round after round, and each row shows the fastest round and
the median). The rows:

  (b) SimpleTrainer without hooks (overhead.py's row b), the baseline here;
  (w) (b) + HangWatchdog(900): the default, its thread samples the iteration every 5 s;
  (p) (b) + HangWatchdog(2, poll=0.01): a thread waking 100 times a second, a pessimistic bound
      on what the sampling costs the training thread (the GIL it takes at each wake-up).

``us/iter`` is (row - b) / iterations, for the wall time and for the CPU time of the process (all
its threads, the watchdog's included: on a shared machine the CPU time is far less noisy, and it
is what the watchdog could add). The timings are noisy; a count is not: the Python and C calls
the training thread makes per iteration (``sys.setprofile``; runs of N and 2N iterations, so that
what ``train()`` does once cancels out) are counted for each row. Then ``keep_alive()`` (what an
evaluation calls after each batch) is timed alone, with one watchdog running.

Usage::

    python bench/watchdog.py            # 300 iterations x 15 rounds
    python bench/watchdog.py --tiny     # hidden width 1: the engine's own cost, less noise
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (bench/ is not a package)

from d2engine.engine.hooks import HangWatchdog  # noqa: E402
from d2engine.engine.train_loop import SimpleTrainer  # noqa: E402
from d2engine.utils.watchdog import ProgressWatchdog, keep_alive  # noqa: E402


def _run(
    data: list[Any], iters: int, hook: Callable[[], HangWatchdog] | None
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training run."""
    model, opt = overhead.build(torch.device("cpu"))
    trainer = SimpleTrainer(model, overhead.cycle(data), opt)
    if hook is not None:
        trainer.register_hooks([hook()])
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train(0, iters)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _calls_per_iter(data: list[Any], iters: int, hook: Callable[[], HangWatchdog] | None) -> float:
    """Calls the training thread makes per iteration: (calls(2 * iters) - calls(iters)) / iters."""
    counts = []
    for n in (iters, 2 * iters):
        model, opt = overhead.build(torch.device("cpu"))
        trainer = SimpleTrainer(model, overhead.cycle(data), opt)
        if hook is not None:
            trainer.register_hooks([hook()])
        calls = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            if event in ("call", "c_call"):
                calls += 1

        sys.setprofile(profile)
        try:
            trainer.train(0, n)
        finally:
            sys.setprofile(None)
        counts.append(calls)
    return (counts[1] - counts[0]) / iters


VARIANTS: dict[str, Callable[[], HangWatchdog] | None] = {
    "(b) SimpleTrainer, no hooks": None,
    "(w) + HangWatchdog(900)": lambda: HangWatchdog(900),
    "(p) + HangWatchdog(2, poll=0.01)": lambda: HangWatchdog(2, poll=0.01),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="iterations per run")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (min and median reported)")
    parser.add_argument("--tiny", action="store_true", help="hidden width 1 (see overhead.py)")
    args = parser.parse_args(argv)
    if args.tiny:
        overhead.HIDDEN = 1
    torch.set_num_threads(1)
    data = overhead.make_data(32, torch.device("cpu"))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    items = list(VARIANTS.items())
    for hook in VARIANTS.values():  # warm-up
        _run(data, args.iters, hook)
    calls = {name: _calls_per_iter(data, 100, hook) for name, hook in VARIANTS.items()}
    for r in range(args.repeats):
        for i in range(len(items)):
            name, hook = items[(i + r) % len(items)]
            times[name].append(_run(data, args.iters, hook))

    print(
        f"hang watchdog: MLP 784-{overhead.HIDDEN}-{overhead.HIDDEN}-10, batch {overhead.BATCH}, "
        f"SGD, {args.iters} iterations, {args.repeats} rounds, cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread"
    )
    for stat_name, stat in (("min", min), ("median", statistics.median)):
        print(f"\n{stat_name} over rounds:")
        header = (
            f"{'variant':34s} {'wall ms/iter':>12s} {'us/iter':>8s} "
            f"{'CPU ms/iter':>12s} {'us/iter':>8s}"
        )
        print(header)
        print("-" * len(header))
        base = [stat(t[k] for t in times["(b) SimpleTrainer, no hooks"]) for k in (0, 1)]
        for name, ts in times.items():
            cells = []
            for k in (0, 1):
                value = stat(t[k] for t in ts)
                cells.append(
                    f"{1e3 * value / args.iters:12.3f} {1e6 * (value - base[k]) / args.iters:8.2f}"
                )
            print(f"{name:34s} {' '.join(cells)}")

    print("\ncalls per iteration in the training thread (Python and C functions):")
    for name, count in calls.items():
        print(f"{name:34s} {count:8.1f}")

    dog = ProgressWatchdog(900, lambda: 0, end_process=False)
    dog.start()
    try:
        n = 1_000_000
        per_call = min(timeit.repeat(keep_alive, number=n, repeat=5)) / n
    finally:
        dog.stop()
    print(f"\nkeep_alive() with one watchdog running: {1e9 * per_call:.0f} ns per call")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
