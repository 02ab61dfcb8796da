"""d2engine.modeling.compile: compile_model, its platform check, and checkpoints of compiled models
(DefaultTrainer's MODEL.COMPILE is tested in tests/engine/test_defaults_features.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dist_helpers  # tests/ is on sys.path (see dist_helpers' docstring)
import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.engine.train_loop import SimpleTrainer
from d2engine.modeling import ModelEMA, compile_model


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self.fc2(torch.relu(self.bn(self.fc1(x)))).squeeze(1)
        return {"loss_mse": ((out - y) ** 2).mean()}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, generator=g)) for _ in range(6)]


def _train(compiled: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained = compile_model(model) if compiled else model
    SimpleTrainer(trained, _batches(), optimizer).train(0, 6)
    return model


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import test_compile as t
torch.set_num_threads(1)
eager, compiled = t._train(compiled=False), t._train(compiled=True)
print(json.dumps({
    "eager": {k: v.tolist() for k, v in eager.state_dict().items()},
    "compiled": {k: v.tolist() for k, v in compiled.state_dict().items()},
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_training_matches_eager() -> None:
    """Compiles a small model with inductor on this machine's CPU (a C++ compiler is needed).

    In a child process: inductor sets process-wide state (an environment variable) on first use.
    """
    result = dist_helpers.run_python(["-c", _CHILD, str(Path(__file__).parent)], timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    states = json.loads(result.stdout.strip().splitlines()[-1])
    eager, compiled = states["eager"], states["compiled"]
    assert list(eager) == list(compiled)  # the same names: no "_orig_mod." prefix
    for name in eager:
        torch.testing.assert_close(
            torch.tensor(compiled[name]), torch.tensor(eager[name]), rtol=1e-4, atol=1e-5
        )
    assert eager["fc1.weight"] != _Net().fc1.weight.tolist()  # training did something


def test_checkpoints_of_a_compiled_model_have_no_prefix_and_load_both_ways(tmp_path: Path) -> None:
    model = _Net()
    compiled = torch.compile(model)  # no forward: nothing is compiled here
    ema = ModelEMA(compiled)
    Checkpointer(compiled, str(tmp_path), ema=ema).save("compiled")
    saved = torch.load(tmp_path / "compiled.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in saved["model"])
    assert not any("_orig_mod" in k for k in saved["ema"]["weights"])

    plain = _Net()
    report_plain = Checkpointer(plain).load(str(tmp_path / "compiled.pth"))
    assert torch.equal(plain.fc1.weight, model.fc1.weight) and "ema" in report_plain
    into_compiled = torch.compile(_Net())
    Checkpointer(into_compiled).load(str(tmp_path / "compiled.pth"))
    assert torch.equal(into_compiled._orig_mod.fc1.weight, model.fc1.weight)
    # a state dict saved from the compiled module itself (with the prefix) loads into a plain one
    torch.save(compiled.state_dict(), tmp_path / "raw.pth")
    assert all(k.startswith("_orig_mod.") for k in torch.load(tmp_path / "raw.pth"))
    plain2 = _Net()
    checkpointer = Checkpointer(plain2)
    checkpointer.load(str(tmp_path / "raw.pth"))
    assert checkpointer.last_load_report is not None and checkpointer.last_load_report.ok


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="MODEL.COMPILE.MODE must be one of .*got 'fast'"):
        compile_model(nn.Linear(1, 1), mode="fast")


def test_a_platform_that_cannot_compile_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error: g++ not found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError) as info:
        compile_model(nn.Linear(1, 1))
    message = str(info.value)
    assert "torch.compile cannot compile on this platform" in message
    assert "g++ not found" in message
    assert "HINT: train without compiling (MODEL.COMPILE.ENABLED False)" in message
