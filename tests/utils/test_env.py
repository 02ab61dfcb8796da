"""d2engine.utils.env.seed_all_rng seeds python, numpy and torch together."""

from __future__ import annotations

import random

import numpy as np
import torch

from d2engine.utils.env import TORCH_VERSION, seed_all_rng


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_all_rng_repeats_every_generator() -> None:
    assert seed_all_rng(123) == 123
    first = _draws()
    seed_all_rng(123)
    assert _draws() == first
    seed_all_rng(124)
    assert _draws() != first


def test_seed_all_rng_without_a_seed_draws_and_returns_one() -> None:
    seed = seed_all_rng()
    drawn = _draws()
    seed_all_rng(seed)
    assert _draws() == drawn
    assert TORCH_VERSION >= (2, 4)
