"""DefaultTrainer's training features from the config: MODEL_EMA, TEST.LOSS_EVAL_PERIOD,
TEST.EARLY_STOPPING and MODEL.COMPILE; DefaultPredictor with EMA weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_defaults import ToyTrainer, _toy_cfg, quiet_d2_logger  # noqa: F401  (the fixture)

import d2engine.engine.defaults as defaults_module
from d2engine.engine import hooks
from d2engine.engine.defaults import DefaultPredictor, DefaultTrainer
from d2engine.modeling import ModelEMA

pytestmark = pytest.mark.usefixtures("quiet_d2_logger")  # trainers set up the d2engine logger


def _features_cfg(out: str, **overrides: Any) -> Any:
    settings = {
        "MODEL_EMA.ENABLED": True,
        "MODEL_EMA.DECAY": 0.8,
        "TEST.LOSS_EVAL_PERIOD": 2,
        "TEST.EARLY_STOPPING.ENABLED": True,
        "TEST.EARLY_STOPPING.METRIC": "validation_loss",
        "TEST.EARLY_STOPPING.MODE": "min",
        "TEST.EARLY_STOPPING.PATIENCE": 2,
        "TEST.EARLY_STOPPING.MIN_DELTA": 100.0,  # nothing improves after the first evaluation
        "SOLVER.MAX_ITER": 30,
        "SOLVER.CHECKPOINT_PERIOD": 4,
        "TEST.EVAL_PERIOD": 4,
    }
    settings.update(overrides)
    return _toy_cfg(out, **settings)


_ORDERED = {
    "IterationTimer",
    "LRScheduler",
    "EMAHook",
    "PeriodicCheckpointer",
    "EvalHook",
    "LossEvalHook",
    "EarlyStopping",
    "PeriodicWriter",
}


def _names(trainer: DefaultTrainer) -> list[str]:
    """The names of the hooks whose order matters here (not e.g. the watchdog or display hooks)."""
    return [type(h).__name__ for h in trainer._hooks if type(h).__name__ in _ORDERED]


def test_hooks_and_their_order(tmp_path: Path) -> None:
    plain = ToyTrainer(_toy_cfg(str(tmp_path / "a")))
    assert plain.model_ema is None
    assert _names(plain) == [
        "IterationTimer",
        "LRScheduler",
        "PeriodicCheckpointer",
        "EvalHook",
        "PeriodicWriter",
    ]
    everything = ToyTrainer(_features_cfg(str(tmp_path / "b")))
    assert isinstance(everything.model_ema, ModelEMA)
    # with early stopping, the evaluations come before the checkpointer (exact resume)
    assert _names(everything) == [
        "IterationTimer",
        "LRScheduler",
        "EMAHook",
        "EvalHook",
        "LossEvalHook",
        "EarlyStopping",
        "PeriodicCheckpointer",
        "PeriodicWriter",
    ]
    no_stopping = ToyTrainer(
        _features_cfg(str(tmp_path / "c"), **{"TEST.EARLY_STOPPING.ENABLED": False})
    )
    assert _names(no_stopping) == [
        "IterationTimer",
        "LRScheduler",
        "EMAHook",
        "PeriodicCheckpointer",
        "EvalHook",
        "LossEvalHook",
        "PeriodicWriter",
    ]
    stopping = next(h for h in everything._hooks if isinstance(h, hooks.EarlyStopping))
    assert (stopping.metric, stopping.mode, stopping.patience, stopping.min_delta) == (
        "validation_loss",
        "min",
        2,
        100.0,
    )
    ema = everything.model_ema
    assert ema is not None and (ema.decay, ema.warmup, ema.device) == (0.8, None, None)
    warm = ToyTrainer(
        _features_cfg(str(tmp_path / "d"), **{"MODEL_EMA.DECAY_WARM_UP_FACTOR": 10.0})
    )
    assert warm.model_ema is not None and warm.model_ema.warmup == 10.0


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with EMA, validation loss and early stopping."""
    out = tmp_path_factory.mktemp("features")
    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    trainer = ToyTrainer(_features_cfg(str(out)))
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate
    return {"trainer": trainer, "results": results, "out": out}


def test_early_stopping_ends_training_with_a_final_checkpoint(stopped: dict[str, Any]) -> None:
    trainer, out = stopped["trainer"], stopped["out"]
    # validation_loss after 1 (best), 3, 5: two evaluations without improvement
    assert trainer.iter == 5 and not trainer.completed and not trainer.preempted
    assert trainer.stop_reason.startswith("Early stopping: validation_loss did not improve")
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 5
    assert saved["trainer"]["hooks"]["EarlyStopping"]["num_bad_evals"] == 2
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    # the results of the last evaluation (after iteration 3) are returned
    assert set(stopped["results"]) == {"accuracy", "accuracy_ema"}


def test_ema_is_evaluated_and_saved(stopped: dict[str, Any]) -> None:
    trainer, out = stopped["trainer"], stopped["out"]
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert saved["ema"]["updates"] == 6  # one per iteration 0..5
    for k, v in trainer.model_ema.weights().items():
        assert torch.equal(saved["ema"]["weights"][k], v)
    assert not torch.equal(
        saved["ema"]["weights"]["linear.weight"], saved["model"]["linear.weight"]
    )
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evaluated = [line for line in lines if "accuracy/top1" in line]
    assert evaluated and all("accuracy_ema/top1" in line for line in evaluated)
    with_loss = [line["iteration"] for line in lines if "validation_loss" in line]
    assert with_loss and all(
        "validation_loss_cls" in line for line in lines if "validation_loss" in line
    )


def test_test_reports_the_ema_results_with_a_suffix(stopped: dict[str, Any]) -> None:
    trainer = stopped["trainer"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    results = ToyTrainer.test(trainer.cfg, trainer.model, ema=trainer.model_ema)
    assert set(results) == {"accuracy", "accuracy_ema"}
    assert results["accuracy"] == ToyTrainer.test(trainer.cfg, trainer.model)["accuracy"]
    with trainer.model_ema.swap(trainer.model):
        assert results["accuracy_ema"] == ToyTrainer.test(trainer.cfg, trainer.model)["accuracy"]
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_predictor_loads_the_ema_weights_when_asked(
    stopped: dict[str, Any], tmp_path: Path
) -> None:
    out = stopped["out"]
    saved = torch.load(out / "model_final.pth", weights_only=True)
    cfg = _toy_cfg(str(tmp_path), **{"MODEL.WEIGHTS": str(out / "model_final.pth")})
    trained = DefaultPredictor(cfg).model.state_dict()
    assert torch.equal(trained["linear.weight"], saved["model"]["linear.weight"])
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = True
    averaged = DefaultPredictor(cfg).model.state_dict()
    assert torch.equal(averaged["linear.weight"], saved["ema"]["weights"]["linear.weight"])

    without_ema = tmp_path / "plain.pth"
    torch.save({"model": saved["model"]}, without_ema)
    cfg.MODEL.WEIGHTS = str(without_ema)
    with pytest.raises(KeyError, match="plain.pth has no EMA weights"):
        DefaultPredictor(cfg)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(KeyError, match="MODEL.WEIGHTS is empty"):
        DefaultPredictor(cfg)


def test_loss_eval_needs_test_datasets(tmp_path: Path) -> None:
    cfg = _toy_cfg(str(tmp_path), **{"TEST.LOSS_EVAL_PERIOD": 2, "DATASETS.TEST": ()})
    with pytest.raises(ValueError, match="TEST.LOSS_EVAL_PERIOD is set but DATASETS.TEST is empty"):
        ToyTrainer(cfg)
    # several test datasets: one loader over all of them
    cfg = _toy_cfg(str(tmp_path), **{"DATASETS.TEST": ("_test_points_test", "_test_points_val")})
    loader = ToyTrainer.build_loss_eval_loader(cfg)
    assert sum(len(batch) for batch in loader) == 32 + 16
    assert sum(len(batch) for batch in loader) == 48  # iterable again


def test_auto_scale_workers_scales_the_loss_eval_period() -> None:
    cfg = _toy_cfg("", **{"TEST.LOSS_EVAL_PERIOD": 100, "SOLVER.REFERENCE_WORLD_SIZE": 2})
    scaled = DefaultTrainer.auto_scale_workers(cfg, 4)
    assert scaled.TEST.LOSS_EVAL_PERIOD == 50 and scaled.TEST.EARLY_STOPPING.PATIENCE == 3


def test_compile_happens_before_ddp_and_checkpoints_have_plain_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODEL.COMPILE: the model is compiled (here with dynamo's "eager" backend, which needs no C++
    compiler; the inductor case is test_compile.py's) and trains; its checkpoints and EMA load
    into an uncompiled model."""
    calls: list[tuple[str, str]] = []

    def compile_eagerly(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
        calls.append((type(model).__name__, mode))
        return torch.compile(model, backend="eager")  # type: ignore[return-value]

    monkeypatch.setattr(defaults_module, "compile_model", compile_eagerly)
    cfg = _toy_cfg(
        str(tmp_path),
        **{
            "MODEL.COMPILE.ENABLED": True,
            "MODEL.COMPILE.MODE": "max-autotune",
            "MODEL_EMA.ENABLED": True,
        },
    )
    trainer = ToyTrainer(cfg)
    assert calls == [("_ToyClassifier", "max-autotune")]
    assert hasattr(trainer.model, "_orig_mod")
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in saved["model"])
    assert list(saved["ema"]["weights"]) == list(saved["model"])
    cfg.MODEL.COMPILE.ENABLED = False
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    predictor = DefaultPredictor(cfg)  # an uncompiled model loads it
    assert torch.equal(predictor.model.linear.weight, saved["model"]["linear.weight"])
    assert os.path.exists(tmp_path / "model_0000009.pth")
