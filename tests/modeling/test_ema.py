"""d2engine.modeling.ema: ModelEMA arithmetic, buffers, swap, state and load_ema_weights."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.modeling import ModelEMA, load_ema_weights


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, g: torch.Generator) -> None:
    """One SGD step that also moves the BN statistics and counter."""
    loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_matches_a_hand_computed_average_over_steps() -> None:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEMA(model, decay=0.8, warmup=2.0)
    expected = _snapshot(model)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        _step(model, opt, g)
        ema.update(model)
        d = min(0.8, (1 + t) / (2.0 + t))  # warm-up: 2/3, 3/4, 0.8, 0.8, 0.8
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
            else:  # num_batches_tracked: copied, not averaged
                expected[k] = v.clone()
    assert ema.updates == 5
    got = ema.weights()
    assert list(got) == list(model.state_dict())
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    assert int(got["bn.num_batches_tracked"]) == 5
    # and the average differs from the last weights (the test has teeth)
    assert not torch.allclose(got["fc.weight"], model.fc.weight)


def test_decay_at_and_constant_decay() -> None:
    ema = ModelEMA(nn.Linear(1, 1), decay=0.999, warmup=10)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(10**6) == 0.999
    assert ModelEMA(nn.Linear(1, 1), decay=0.9).decay_at(1) == 0.9
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.0)  # decay 0: the average is the last weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.weights()["weight"], model.weight.detach())


def test_unwraps_compiled_models_and_follows_a_new_model_object() -> None:
    model = _Net()
    compiled = torch.compile(model)  # no forward: nothing is compiled
    ema = ModelEMA(compiled, decay=0.5)
    assert list(ema.weights()) == list(model.state_dict())  # no "_orig_mod." prefix
    other = _Net()
    ema.update(other)  # a different object (e.g. rebuilt): its tensors are used
    torch.testing.assert_close(
        ema.weights()["fc.weight"], 0.5 * model.fc.weight.detach() + 0.5 * other.fc.weight.detach()
    )


def test_update_reads_nothing_to_the_host() -> None:
    model = _Net()
    ema = ModelEMA(model, decay=0.9, warmup=5)
    ema.update(model)  # binds the model's tensors
    reads = []
    names = ("item", "tolist", "__float__", "__bool__", "numpy", "cpu")
    originals: dict[str, Callable[..., Any]] = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name: str) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            reads.append(name)
            return originals[name](self, *a, **k)

        return wrapper

    try:
        for n in names:
            setattr(torch.Tensor, n, counting(n))
        for _ in range(3):
            ema.update(model)
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    assert reads == []


def test_swap_evaluates_with_the_average_and_restores_even_on_error() -> None:
    torch.manual_seed(0)
    model = _Net()
    ema = ModelEMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _step(model, opt, torch.Generator().manual_seed(0))
    ema.update(model)
    trained = _snapshot(model)
    with ema.swap(model) as swapped:
        assert swapped is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.weights()[k])
        assert not torch.equal(model.fc.weight, trained["fc.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    with pytest.raises(RuntimeError, match="evaluation failed"), ema.swap(model):
        raise RuntimeError("evaluation failed")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), f"{k} not restored after an error"


def test_copy_to_and_reset() -> None:
    model, other = _Net(), _Net()
    ema = ModelEMA(model, decay=0.9)
    ema.copy_to(other)
    assert all(
        torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.weights().values())
    )
    with torch.no_grad():
        model.fc.weight.fill_(3.0)
    ema.update(model)
    ema.reset(model)
    assert ema.updates == 0 and torch.equal(ema.weights()["fc.weight"], model.fc.weight.detach())
    with pytest.raises(ValueError, match=r"not in the model: \['bn.bias'"):
        ema.copy_to(nn.Sequential())  # another architecture
    with pytest.raises(ValueError, match="not averaged"):
        ema.reset(nn.Linear(1, 1))


def test_state_dict_round_trip_and_errors() -> None:
    model = _Net()
    ema = ModelEMA(model, decay=0.7)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    assert set(state) == {"updates", "weights"} and state["updates"] == 1
    restored = ModelEMA(_Net(), decay=0.7)
    restored.load_state_dict({k: v for k, v in state.items()})
    assert restored.updates == 1
    for k, v in ema.weights().items():
        assert torch.equal(restored.weights()[k], v)
    with pytest.raises(KeyError, match="no 'updates'"):
        restored.load_state_dict({"weights": state["weights"]})
    bad = OrderedDict(state["weights"])
    bad["fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1,\)"):
        restored.load_state_dict({"updates": 1, "weights": bad})
    with pytest.raises(ValueError, match="differ from the averaged"):
        restored.load_state_dict({"updates": 1, "weights": {"x": torch.zeros(1)}})


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\], got 1.5"):
        ModelEMA(nn.Linear(1, 1), decay=1.5)
    with pytest.raises(ValueError, match="warmup must be None or a number >= 0"):
        ModelEMA(nn.Linear(1, 1), warmup=-1)


def test_average_on_its_own_device_dtype_is_kept() -> None:
    model = nn.Linear(2, 2).to(torch.float64)
    ema = ModelEMA(model, decay=0.5, device="cpu")
    assert ema.weights()["weight"].dtype == torch.float64
    assert ema.weights()["weight"].data_ptr() != model.weight.data_ptr()  # a copy


def test_load_ema_weights_from_a_checkpoint(tmp_path: Any) -> None:
    model = _Net()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.fc.weight.fill_(2.0)
    ema.update(model)
    Checkpointer(model, str(tmp_path), ema=ema).save("model_final")
    fresh = _Net()
    unused = Checkpointer(fresh).load(str(tmp_path / "model_final.pth"))
    assert torch.equal(fresh.fc.weight, model.fc.weight)  # the trained weights
    load_ema_weights(fresh, unused)
    assert torch.equal(fresh.fc.weight, ema.weights()["fc.weight"])
    with pytest.raises(KeyError, match=r"model.pth has no EMA weights.*MODEL_EMA.ENABLED True"):
        load_ema_weights(fresh, {"iteration": 3}, source="model.pth")


def test_follows_replaced_parameter_data_and_buffers_after_follow() -> None:
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, decay=0.0)  # decay 0: the average is the last weights
    ema.update(model)
    model.weight.data = torch.full((2,), 5.0)  # what module.to() does to a parameter
    ema.update(model)
    assert torch.equal(ema.weights()["weight"], torch.full((2,), 5.0))
    model.running_mean = torch.full((2,), 3.0)  # module.to() replaces buffers by new tensors
    ema.follow(model)
    ema.update(model)
    assert torch.equal(ema.weights()["running_mean"], torch.full((2,), 3.0))
