"""Exact resume with the training features on together: a DefaultTrainer run with EMA, the
validation-loss hook and early stopping, killed (SIGKILL) at chosen iterations and resumed from
its last checkpoint, ends bit-identically to an uninterrupted run: same weights, same EMA, same
iteration of the early stop, same final checkpoint.

The job is test_resume.py's DefaultTrainer job (dropout, shuffled data, an augmentation drawing
from every random generator) with those features enabled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_resume import (
    _DropoutClassifier,
    _Kill,
    assert_bit_identical,
    default_trainer_cfg,
)

from d2engine.engine.defaults import DefaultTrainer
from d2engine.evaluation import ClassificationEvaluator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_ITER = 40
CHECKPOINT_PERIOD = 4
# Every feature together: gradient accumulation (2 micro-batches of 2 per optimizer step), EMA,
# the validation loss and early stopping; _cfg sets the key only when it differs from 1.
GRAD_ACCUM_STEPS = [2]

_ = _DropoutClassifier  # registered under "_ResumeDropoutClassifier" by the job


class _Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg: Any, dataset_name: str) -> Any:
        return ClassificationEvaluator(dataset_name)


def _cfg(out: str, grad_accum_steps: int) -> Any:
    cfg = default_trainer_cfg(out, MAX_ITER, CHECKPOINT_PERIOD)
    if grad_accum_steps != 1:
        cfg.SOLVER.GRAD_ACCUM_STEPS = grad_accum_steps
    # The base config evaluates every 4 iterations: checkpoints come after those evaluations.
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.DECAY = 0.9
    cfg.MODEL_EMA.DECAY_WARM_UP_FACTOR = 4.0
    cfg.TEST.LOSS_EVAL_PERIOD = 2
    cfg.TEST.EARLY_STOPPING.ENABLED = True
    cfg.TEST.EARLY_STOPPING.METRIC = "validation_loss"
    cfg.TEST.EARLY_STOPPING.MODE = "min"
    cfg.TEST.EARLY_STOPPING.PATIENCE = 3
    cfg.TEST.EARLY_STOPPING.MIN_DELTA = 0.01  # stops after iteration 23
    return cfg


def run(out: str, *, resume: bool, grad_accum_steps: int = 1, kill_at: int | None = None) -> Any:
    """Train (resuming from ``out`` when asked); used in-process and by the killed subprocesses."""
    torch.manual_seed(0)
    trainer = _Trainer(_cfg(out, grad_accum_steps))
    if kill_at is not None:
        trainer.register_hooks([_Kill(kill_at, signal.SIGKILL)])
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    return trainer, results


def _spawn(out: Path, kill_at: int, grad_accum_steps: int) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_resume_features as t; "
        "t.run(sys.argv[2], resume=False, kill_at=int(sys.argv[3]), "
        "grad_accum_steps=int(sys.argv[4]))"
    )
    args = [str(HERE), str(out), str(kill_at), str(grad_accum_steps)]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _state(trainer: Any) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in trainer.model_ema.weights().items()})
    return state


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("grad_accum_steps", GRAD_ACCUM_STEPS)
def test_killed_and_resumed_with_every_feature_is_bit_identical(
    tmp_path: Path, grad_accum_steps: int
) -> None:
    reference, ref_results = run(
        str(tmp_path / "reference"), resume=False, grad_accum_steps=grad_accum_steps
    )
    stop = reference.iter
    # the features acted: stopped early, between evaluations, after several checkpoints
    assert reference.stop_reason is not None and 8 < stop < MAX_ITER - 1, reference.stop_reason
    assert reference.model_ema.updates == stop + 1
    ref_final = torch.load(tmp_path / "reference" / "model_final.pth", weights_only=True)

    # Killed in iteration 9 (resumes from the checkpoint of iteration 7, written after that
    # iteration's evaluations), and in the iteration where training stops early.
    kills = [9, stop]
    procs = [(k, tmp_path / f"kill{k}", None) for k in kills]
    procs = [(k, out, _spawn(out, k, grad_accum_steps)) for k, out, _ in procs]
    for kill_at, out, proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        assert not (out / "model_final.pth").exists()
        resumed, results = run(str(out), resume=True, grad_accum_steps=grad_accum_steps)
        last_saved = (kill_at // CHECKPOINT_PERIOD) * CHECKPOINT_PERIOD  # its start_iter
        assert resumed.start_iter == last_saved, kill_at
        assert (resumed.iter, resumed.stop_reason) == (stop, reference.stop_reason)
        assert results == ref_results
        assert_bit_identical(_state(resumed), _state(reference))
        final = torch.load(out / "model_final.pth", weights_only=True)
        assert final["trainer"]["hooks"] == ref_final["trainer"]["hooks"]
        assert_bit_identical(final["ema"]["weights"], ref_final["ema"]["weights"])
        assert final["ema"]["updates"] == ref_final["ema"]["updates"]
