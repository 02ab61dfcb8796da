"""A process SIGKILLed while writing large checkpoints never leaves a bad last_checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[2]
SIZE = 3600  # a 3600 x 3600 float32 weight: ~50 MB per checkpoint

CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from d2engine.checkpoint import Checkpointer, PeriodicCheckpointer

    save_dir, size, async_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    model = nn.Linear(size, size)
    ckpt = Checkpointer(model, save_dir, async_save=async_save)
    periodic = PeriodicCheckpointer(ckpt, period=1, max_to_keep=2)
    ckpt.add_checkpointable("periodic", periodic)  # a resumed run deletes the right files
    start = ckpt.resume_or_load("", resume=True).get("iteration", -1) + 1
    for it in range(start, start + 1000):
        with torch.no_grad():
            model.weight.fill_(float(it))
            model.bias.fill_(float(it))
        print("writing", it, flush=True)
        periodic.step(it)
    """
)


def _check_directory(save_dir: Path) -> int | None:
    """Every visible checkpoint loads and is self-consistent; returns the resumed iteration."""
    model = nn.Linear(SIZE, SIZE)
    ckpt = Checkpointer(model, str(save_dir))
    for path in ckpt.get_all_checkpoint_files():
        data = torch.load(path, weights_only=True)  # every visible file is complete
        assert float(data["model"]["bias"][0]) == data["iteration"], path
    if not ckpt.has_checkpoint():
        return None
    last = ckpt.get_checkpoint_file()
    rest = ckpt.load(last)  # the file last_checkpoint names loads: no fallback needed
    iteration = rest["iteration"]
    assert (
        bool((model.weight == float(iteration)).all())
        and float(model.bias.detach()[-1]) == iteration
    )
    return iteration


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_during_large_saves(tmp_path: Path) -> None:
    rng = random.Random(1234)
    last_seen: int | None = None
    for round_index in range(6):
        async_save = round_index % 2 == 1
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(SIZE), "1" if async_save else "0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            lines_to_wait = rng.randint(1, 3)
            deadline = time.monotonic() + 120
            while lines_to_wait and time.monotonic() < deadline:
                line = child.stdout.readline()
                assert line, "the child died before it was killed"
                if line.startswith("writing"):
                    lines_to_wait -= 1
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
            child.stdout.close()
        iteration = _check_directory(tmp_path)
        periodic_files = [n for n in os.listdir(tmp_path) if n.endswith(".pth")]
        # kept (2) + one whose deletion may have been cut off + one renamed but not yet tagged
        assert len(periodic_files) <= 4, sorted(os.listdir(tmp_path))
        if last_seen is not None:
            assert iteration is not None and iteration >= last_seen  # resumed, never went back
        last_seen = iteration

    ckpt = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    ckpt.save("after_crashes")  # the first save removes temporary files of killed writers
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
