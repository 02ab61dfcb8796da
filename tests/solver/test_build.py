"""Tests for d2engine.solver.build: parameter groups, SGD, gradient clipping."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.config import get_cfg
from d2engine.solver.build import (
    NORM_MODULE_TYPES,
    build_lr_scheduler,
    build_optimizer,
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)


class _Net(nn.Module):
    """Conv + BN + Linear + LayerNorm, a linear layer used twice, a tied weight, a frozen param."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.fc_again = self.fc  # the same module under a second name
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.fc.weight  # a tied parameter
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _cfg(**solver: Any) -> Any:
    cfg = get_cfg()
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _group_of(groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """id(param) -> its group; fails if a parameter is in two groups."""
    out: dict[int, dict[str, Any]] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter appears in two groups"
            out[id(p)] = g
    return out


def test_param_groups_for_norm_bias_shared_and_frozen() -> None:
    net = _Net()
    groups = get_default_optimizer_params(
        net,
        base_lr=0.1,
        weight_decay=1e-4,
        weight_decay_norm=0.0,
        bias_lr_factor=2.0,
        weight_decay_bias=0.0,
    )
    by_param = _group_of(groups)
    # every trainable parameter exactly once, frozen ones left out
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(by_param) == trainable
    # conv, bn, fc, ln: weight + bias each; head.weight is fc.weight; fc_again is fc
    assert sum(len(g["params"]) for g in groups) == len(trainable) == 8

    def hp(p: torch.Tensor) -> tuple[float, float]:
        g = by_param[id(p)]
        return g["lr"], g["weight_decay"]

    assert hp(net.conv.weight) == (0.1, 1e-4)
    assert hp(net.fc.weight) == (0.1, 1e-4)  # also head.weight (tied)
    assert hp(net.bn.weight) == (0.1, 0.0)
    assert hp(net.ln.weight) == (0.1, 0.0)
    for bias in (net.conv.bias, net.fc.bias, net.bn.bias, net.ln.bias):
        assert hp(bias) == pytest.approx((0.2, 0.0))  # 0.1 * BIAS_LR_FACTOR 2
    # equal hyper-parameters merged: 3 distinct sets -> 3 groups, in first-appearance order
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 1e-4), (0.2, 0.0), (0.1, 0.0)]
    assert [len(g["params"]) for g in groups] == [2, 4, 2]
    assert groups[0]["params"] == [net.conv.weight, net.fc.weight]


def test_param_groups_merge_into_one_when_nothing_differs() -> None:
    net = _Net()
    groups = get_default_optimizer_params(net, base_lr=0.1, weight_decay=1e-4)
    assert len(groups) == 1
    assert groups[0]["lr"] == 0.1 and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == 8


def test_weight_decay_bias_none_follows_weight_decay() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    groups = get_default_optimizer_params(
        net, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=None
    )
    by_param = _group_of(groups)
    assert by_param[id(net[0].bias)]["weight_decay"] == 1e-4
    assert by_param[id(net[1].bias)]["weight_decay"] == 0.0  # norm layer's bias: norm decay


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3),
        nn.BatchNorm3d(3),
        nn.SyncBatchNorm(3),
        nn.GroupNorm(1, 3),
        nn.InstanceNorm1d(3, affine=True),
        nn.InstanceNorm2d(3, affine=True),
        nn.InstanceNorm3d(3, affine=True),
        nn.LayerNorm(3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_norm_type_gets_weight_decay_norm(norm: nn.Module) -> None:
    assert isinstance(norm, NORM_MODULE_TYPES)
    groups = get_default_optimizer_params(
        nn.Sequential(norm), base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.5
    )
    assert [g["weight_decay"] for g in groups] == [0.5]
    assert len(groups[0]["params"]) == 2


def test_local_response_norm_is_a_norm_type() -> None:
    # it has no parameters, but a subclass with one must still count as a norm layer
    class LRNWithScale(nn.LocalResponseNorm):
        def __init__(self) -> None:
            super().__init__(2)
            self.scale = nn.Parameter(torch.ones(1))

    groups = get_default_optimizer_params(
        LRNWithScale(), base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.5
    )
    assert [g["weight_decay"] for g in groups] == [0.5]


def test_lr_factor_func_and_overrides() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2))
    groups = get_default_optimizer_params(
        net,
        base_lr=1.0,
        weight_decay=1e-4,
        lr_factor_func=lambda name: 0.5 if name.startswith("0.") else 1.0,
        overrides={"weight": {"weight_decay": 0.0}},
    )
    by_param = _group_of(groups)
    assert by_param[id(net[0].weight)]["lr"] == 0.5
    assert by_param[id(net[0].weight)]["weight_decay"] == 0.0
    assert by_param[id(net[0].bias)]["lr"] == 0.5
    assert by_param[id(net[0].bias)]["weight_decay"] == 1e-4
    assert by_param[id(net[1].weight)]["lr"] == 1.0


def test_param_group_errors() -> None:
    with pytest.raises(TypeError, match="needs an nn.Module, got list"):
        get_default_optimizer_params([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias_lr_factor=2.0 needs base_lr"):
        get_default_optimizer_params(nn.Linear(1, 1), bias_lr_factor=2.0)
    with pytest.raises(ValueError, match="conflicts with bias_lr_factor"):
        get_default_optimizer_params(
            nn.Linear(1, 1), base_lr=0.1, weight_decay_bias=0.0, overrides={"bias": {"lr": 1.0}}
        )
    with pytest.raises(ValueError, match="lr_factor_func needs base_lr"):
        get_default_optimizer_params(nn.Linear(1, 1), lr_factor_func=lambda n: 1.0)
    with pytest.raises(ValueError, match="group 0 has no 'params'"):
        reduce_param_groups([{"lr": 0.1}])


def test_reduce_param_groups_later_groups_win_and_lists_are_hashable() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    groups = reduce_param_groups(
        [
            {"params": [a, b], "lr": 0.1, "betas": [0.9, 0.99]},
            {"params": [b], "lr": 0.2},
            {"params": [a], "lr": 0.2},
        ]
    )
    assert groups == [{"lr": 0.2, "betas": [0.9, 0.99], "params": [a, b]}]


def test_expand_param_groups_gives_one_group_per_param_later_groups_winning() -> None:
    # detectron2's helper, called with any hashable stand-ins for parameters
    from d2engine.solver.build import _expand_param_groups

    out = _expand_param_groups(
        [
            {"params": ["p1", "p2", "p3"], "lr": 1.0, "weight_decay": 3.0},
            {"params": ["p2", "p4"], "lr": 2.0, "momentum": 2.0},
            {"params": ["p1"], "weight_decay": 4.0},
        ]
    )
    assert out == [
        {"params": ["p1"], "lr": 1.0, "weight_decay": 4.0},
        {"params": ["p2"], "lr": 2.0, "weight_decay": 3.0, "momentum": 2.0},
        {"params": ["p3"], "lr": 1.0, "weight_decay": 3.0},
        {"params": ["p4"], "lr": 2.0, "momentum": 2.0},
    ]


def test_reduce_param_groups_keeps_param_names_aligned() -> None:
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = reduce_param_groups(
        [
            {"params": [a, b, c], "param_names": ["a", "b", "c"], "lr": 0.1},
            {"params": [b], "param_names": ["b"], "lr": 0.2},
        ]
    )
    assert groups == [
        {"lr": 0.1, "params": [a, c], "param_names": ["a", "c"]},
        {"lr": 0.2, "params": [b], "param_names": ["b"]},
    ]
    with pytest.raises(ValueError, match="2 params but 1 param_names"):
        reduce_param_groups([{"params": [a, b], "param_names": ["a"]}])


def test_build_optimizer_is_sgd_with_cfg_values() -> None:
    cfg = _cfg(BASE_LR=0.05, MOMENTUM=0.8, NESTEROV=True, WEIGHT_DECAY=1e-3, WEIGHT_DECAY_NORM=0.0)
    opt = build_optimizer(cfg, _Net())
    assert type(opt) is torch.optim.SGD
    # WEIGHT_DECAY_BIAS None and BIAS_LR_FACTOR 1: biases join the weights of their layer kind,
    # leaving two groups: decay 1e-3 (conv, fc) and decay 0 (bn, ln)
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert g["momentum"] == 0.8 and g["nesterov"] is True and g["lr"] == 0.05
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-3]


def test_build_optimizer_errors() -> None:
    with pytest.raises(ValueError, match="NESTEROV=True needs SOLVER.MOMENTUM > 0"):
        build_optimizer(_cfg(NESTEROV=True, MOMENTUM=0.0), nn.Linear(1, 1))
    frozen = nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no parameter with requires_grad=True"):
        build_optimizer(_cfg(), frozen)


# ------------------------------------------------------------------------------ clipping


def _clip_cfg(clip_type: str, value: float = 1.0, norm_type: float = 2.0, **solver: Any) -> Any:
    base = {"BASE_LR": 1.0, "MOMENTUM": 0.0, "WEIGHT_DECAY": 0.0, "WEIGHT_DECAY_NORM": 0.0}
    cfg = _cfg(**{**base, **solver})
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = norm_type
    return cfg


class _TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(2))


def _step_with_grads(opt: torch.optim.Optimizer, model: _TwoParams) -> None:
    model.a.grad = torch.tensor([3.0, 4.0])  # norm 5
    model.b.grad = torch.tensor([0.3, -0.4])  # norm 0.5
    opt.step()


def test_clip_by_value() -> None:
    model = _TwoParams()
    opt = build_optimizer(_clip_cfg("value", 1.0), model)
    assert type(opt).__name__ == "SGDWithGradientClip" and isinstance(opt, torch.optim.SGD)
    _step_with_grads(opt, model)
    # lr 1, no momentum: param = -clipped grad; elements clipped to [-1, 1]
    assert model.a.detach().tolist() == pytest.approx([-1.0, -1.0])
    assert model.b.detach().tolist() == pytest.approx([-0.3, 0.4])


def test_clip_by_norm_is_per_parameter() -> None:
    model = _TwoParams()
    opt = build_optimizer(_clip_cfg("norm", 1.0), model)
    _step_with_grads(opt, model)
    # a: norm 5 clipped to 1 -> [0.6, 0.8]; b: norm 0.5 < 1, unchanged
    assert model.a.detach().tolist() == pytest.approx([-0.6, -0.8], rel=1e-5)
    assert model.b.detach().tolist() == pytest.approx([-0.3, 0.4])


def test_clip_by_inf_norm() -> None:
    model = _TwoParams()
    opt = build_optimizer(_clip_cfg("norm", 2.0, norm_type=float("inf")), model)
    _step_with_grads(opt, model)
    # a: max |g| = 4 -> scaled by 2 / 4 -> [1.5, 2.0]
    assert model.a.detach().tolist() == pytest.approx([-1.5, -2.0], rel=1e-5)


def test_clip_full_model_norm() -> None:
    model = _TwoParams()
    opt = build_optimizer(_clip_cfg("full_model", 1.0), model)
    _step_with_grads(opt, model)
    # total norm sqrt(25 + 0.25) = 5.024937810560445; every grad scaled by 1 / 5.0249...
    scale = 1.0 / 5.024937810560445
    assert model.a.detach().tolist() == pytest.approx([-3 * scale, -4 * scale], rel=1e-5)
    assert model.b.detach().tolist() == pytest.approx([-0.3 * scale, 0.4 * scale], rel=1e-5)


def test_clipping_disabled_leaves_grads_alone() -> None:
    model = _TwoParams()
    cfg = _clip_cfg("value", 1.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.SGD
    _step_with_grads(opt, model)
    assert model.a.detach().tolist() == pytest.approx([-3.0, -4.0])


def test_clipping_with_closure_clips_the_grads_the_closure_computes() -> None:
    model = _TwoParams()
    opt = build_optimizer(_clip_cfg("value", 1.0), model)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model.a * torch.tensor([5.0, -5.0])).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert model.a.detach().tolist() == pytest.approx([-1.0, 1.0])


def test_clipped_optimizer_state_dict_pickle_and_hooks() -> None:
    model = _TwoParams()
    cfg = _clip_cfg("value", 1.0, MOMENTUM=0.9)
    opt = build_optimizer(cfg, model)
    calls: list[int] = []
    opt.register_step_pre_hook(lambda *_: calls.append(1))
    _step_with_grads(opt, model)
    assert calls == [1]  # the optimizer's hooks run once per step, not twice

    # its state_dict is a plain SGD state_dict, loadable both ways and weights_only-safe
    state = opt.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    plain = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    plain.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(plain.state_dict()["state"][0]["momentum_buffer"], torch.tensor([1.0, 1.0]))
    opt.load_state_dict(plain.state_dict())

    # pickling and deep copies keep the clipping class
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(clone) is type(opt)
        p = clone.param_groups[0]["params"][0]
        before = p.detach().clone()
        p.grad = torch.tensor([10.0, -10.0])
        clone.state.clear()
        clone.step()
        assert (p.detach() - before).tolist() == pytest.approx([-1.0, 1.0])


def test_maybe_add_gradient_clipping_on_instance_and_class() -> None:
    model = _TwoParams()
    cfg = _clip_cfg("value", 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    same = maybe_add_gradient_clipping(cfg, opt)
    assert same is opt and type(opt).__name__ == "SGDWithGradientClip"
    _step_with_grads(opt, model)
    assert model.a.detach().tolist() == pytest.approx([-1.0, -1.0])
    # re-applying with another setting replaces the clipping instead of stacking it
    cfg2 = _clip_cfg("value", 0.5)
    maybe_add_gradient_clipping(cfg2, opt)
    assert type(opt).__mro__[1] is torch.optim.SGD
    cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    assert isinstance(cls, type) and issubclass(cls, torch.optim.SGD)
    assert maybe_add_gradient_clipping(cfg, torch.optim.SGD) is cls  # generated once


def test_clipping_errors() -> None:
    opt = torch.optim.SGD(_TwoParams().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=r"CLIP_TYPE must be one of .*'value'.*got 'l2'"):
        maybe_add_gradient_clipping(_clip_cfg("l2"), opt)
    with pytest.raises(ValueError, match="CLIP_VALUE must be > 0"):
        maybe_add_gradient_clipping(_clip_cfg("value", 0.0), opt)
    with pytest.raises(ValueError, match="NORM_TYPE must be > 0"):
        maybe_add_gradient_clipping(_clip_cfg("norm", 1.0, norm_type=0.0), opt)
    with pytest.raises(TypeError, match="needs a torch Optimizer or Optimizer subclass"):
        maybe_add_gradient_clipping(_clip_cfg("value"), "SGD")  # type: ignore[arg-type]
    cfg = _clip_cfg("value", MAX_ITER=10, WARMUP_ITERS=0)
    build_lr_scheduler(cfg, opt)  # wraps the instance's step
    with pytest.raises(RuntimeError, match="before creating the lr scheduler"):
        maybe_add_gradient_clipping(cfg, opt)


def test_clipped_optimizer_works_with_lr_scheduler() -> None:
    model = _TwoParams()
    cfg = _clip_cfg("value", 1.0, MAX_ITER=10, WARMUP_ITERS=0, STEPS=(1,), GAMMA=0.5)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    _step_with_grads(opt, model)
    sched.step()
    _step_with_grads(opt, model)
    # step 1: lr 1 -> a = [-1, -1]; step 2: lr 0.5 -> a = [-1.5, -1.5] (still clipped)
    assert model.a.detach().tolist() == pytest.approx([-1.5, -1.5])
