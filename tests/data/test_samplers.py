"""d2engine.data.samplers: the resumable training samplers and InferenceSampler."""

from __future__ import annotations

import collections
import itertools

import pytest

from d2engine.data import (
    InferenceSampler,
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)


def take(sampler: TrainingSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


def test_every_pass_is_a_permutation_and_passes_differ() -> None:
    sampler = TrainingSampler(10, seed=3)
    stream = take(sampler, 40)
    passes = [stream[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4  # reshuffled every pass
    assert passes[2] == sampler.permutation(2)  # any pass is computable directly


def test_same_seed_same_stream_and_no_shuffle() -> None:
    assert take(TrainingSampler(7, seed=5), 20) == take(TrainingSampler(7, seed=5), 20)
    assert take(TrainingSampler(7, seed=5), 20) != take(TrainingSampler(7, seed=6), 20)
    assert take(TrainingSampler(4, shuffle=False, seed=0), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_seed_none_draws_a_shared_seed() -> None:
    seeds = {TrainingSampler(5).seed for _ in range(4)}
    assert len(seeds) > 1  # comm.shared_random_seed draws a fresh seed (rank 0's, in a job)


@pytest.mark.parametrize("size", [10, 7, 1])
def test_sharding_over_two_ranks(size: int) -> None:
    world = 2
    ranks = [TrainingSampler(size, seed=11, rank=r, world_size=world) for r in range(world)]
    full = take(TrainingSampler(size, seed=11), 6 * size)
    shards = [take(s, 3 * size) for s in ranks]
    # Rank r takes global positions r, r + 2, r + 4, ...: together the ranks consume the stream.
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    if size % world == 0:  # within each pass the ranks never share an index
        for p in range(3):
            per_pass = (
                shards[0][p * size // 2 : (p + 1) * size // 2]
                + shards[1][p * size // 2 : (p + 1) * size // 2]
            )
            assert sorted(per_pass) == list(range(size))


def test_resume_continues_exactly() -> None:
    original = TrainingSampler(13, seed=42, rank=1, world_size=3)
    it = iter(original)
    head = [next(it) for _ in range(17)]
    state = original.state_dict()
    assert state["position"] == 17 * 3
    continuation = [next(it) for _ in range(30)]

    resumed = TrainingSampler(13, seed=0, rank=1, world_size=3)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.start_position == 51
    assert take(resumed, 30) == continuation
    assert head + continuation == take(TrainingSampler(13, seed=42, rank=1, world_size=3), 47)


def test_resume_with_other_world_size_continues_global_stream() -> None:
    single = TrainingSampler(9, seed=1)
    it = iter(single)
    for _ in range(8):
        next(it)
    state = single.state_dict()
    rest = [next(it) for _ in range(20)]
    ranks = [TrainingSampler(9, seed=1, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert take(ranks[0], 10) == rest[0::2] and take(ranks[1], 10) == rest[1::2]


def test_huge_position_is_computed_directly() -> None:
    sampler = TrainingSampler(1000, seed=7)
    position = 10**15 + 123  # replaying this many indices would never finish
    sampler.load_state_dict({"seed": 7, "position": position})
    epoch, offset = divmod(position, 1000)
    assert take(sampler, 3) == sampler.permutation(epoch)[offset : offset + 3]
    assert sampler.state_dict()["position"] == position + 3


def test_bad_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"TrainingSampler\(size=0\) needs a dataset with at least one"
    ):
        TrainingSampler(0, seed=0)
    with pytest.raises(TypeError, match=r"expects an int, got float 3.0"):
        TrainingSampler(3.0, seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed=...\\) expects an int or None"):
        TrainingSampler(3, seed="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        TrainingSampler(3, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        InferenceSampler(3, rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"InferenceSampler\(size=-1\)"):
        InferenceSampler(-1)


def test_load_state_errors() -> None:
    sampler = TrainingSampler(5, seed=0)
    with pytest.raises(KeyError, match=r"lacks \['position'\]"):
        sampler.load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="saved with size=6, but this sampler has size=5"):
        sampler.load_state_dict({"seed": 1, "position": 0, "size": 6})
    with pytest.raises(
        ValueError, match="saved with shuffle=False, but this sampler has shuffle=True"
    ):
        sampler.load_state_dict({"seed": 1, "position": 0, "size": 5, "shuffle": False})
    with pytest.raises(ValueError, match="negative position -1"):
        sampler.load_state_dict({"seed": 1, "position": -1})


@pytest.mark.parametrize(("size", "world"), [(10, 2), (11, 2), (7, 3), (2, 3)])
def test_inference_sampler_every_index_once(size: int, world: int) -> None:
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert sum(shards, []) == list(range(size))  # contiguous shards, in rank order
    lengths = [len(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert lengths == [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1


def test_inference_sampler_single_process() -> None:
    assert list(InferenceSampler(4)) == [0, 1, 2, 3]


# ------------------------------------------------------------------ RepeatFactorTrainingSampler
def test_repeat_factor_passes_repeat_samples_by_their_factor() -> None:
    factors = [1.0, 2.0, 0.5, 3.0]
    sampler = RepeatFactorTrainingSampler(factors, seed=3)
    for epoch in range(20):
        counts = collections.Counter(sampler.epoch_indices(epoch))
        assert counts[0] == 1 and counts[1] == 2 and counts[3] == 3 and counts[2] in (0, 1)
    # stochastic rounding: sample 2 appears in about half of the passes
    appearances = sum(2 in sampler.epoch_indices(e) for e in range(400))
    assert 150 < appearances < 250
    assert sampler.epoch_indices(5) == RepeatFactorTrainingSampler(factors, seed=3).epoch_indices(5)


def test_repeat_factor_resume_continues_exactly_and_elastically() -> None:
    factors = [1.0, 2.5, 1.2, 0.3, 4.0]
    head_sampler = RepeatFactorTrainingSampler(factors, seed=11)
    it = iter(head_sampler)
    head = [next(it) for _ in range(37)]
    state = head_sampler.state_dict()
    rest = [next(it) for _ in range(40)]
    assert state["position"] == 37 and {"epoch", "epoch_start"} <= set(state)
    resumed = RepeatFactorTrainingSampler(factors, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert take(resumed, 40) == rest
    # another number of processes continues the same global stream
    ranks = [RepeatFactorTrainingSampler(factors, seed=0, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.load_state_dict(state)
    assert [take(r, 13) for r in ranks] == [rest[0:39:3], rest[1:39:3], rest[2:39:3]]
    assert head + rest == take(RepeatFactorTrainingSampler(factors, seed=11), 77)


def test_repeat_factor_resume_computes_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = RepeatFactorTrainingSampler([1.0] * 50 + [3.0] * 50, seed=2)
    state = sampler.state_at(0)
    computed: list[int] = []
    original = RepeatFactorTrainingSampler._compute_epoch

    def counting(self: RepeatFactorTrainingSampler, epoch: int) -> list[int]:
        computed.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(RepeatFactorTrainingSampler, "_compute_epoch", counting)
    far = {**state, "position": 10**9 + 5, "epoch": 5 * 10**6, "epoch_start": 10**9}
    sampler.load_state_dict(far)
    first = take(sampler, 3)
    assert computed == [5 * 10**6]  # only the pass of the position, whatever its number
    assert first == sampler.epoch_indices(5 * 10**6)[5:8]


def test_repeat_factors_from_category_frequency() -> None:
    dicts = [
        {"annotations": [{"category_id": 0}, {"category_id": 1}]},
        {"annotations": [{"category_id": 0}]},
        {"annotations": [{"category_id": 0}]},
        {"annotations": [{"category_id": 0}]},
        {"label": 7},  # classification dicts: the label is the category
        {"annotations": []},
    ]
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dicts, repeat_thresh=0.5, sqrt=False
    )
    # f(0)=4/6 -> 1; f(1)=1/6 -> 3; f(7)=1/6 -> 3; no category -> 1
    assert factors.tolist() == pytest.approx([3.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    sqrt = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.5)
    assert sqrt[0] == pytest.approx(3**0.5)
    with pytest.raises(
        ValueError, match="no sample has 'annotations'.*RepeatFactorTrainingSampler"
    ):
        RepeatFactorTrainingSampler.repeat_factors_from_category_frequency([{"x": 1}], 0.5)
    with pytest.raises(ValueError, match="not all 0"):
        RepeatFactorTrainingSampler([0.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        RepeatFactorTrainingSampler([1.0, float("nan")], seed=0)


# ----------------------------------------------------------------- RandomSubsetTrainingSampler
def test_random_subset_draws_from_a_fixed_subset_and_resumes() -> None:
    sampler = RandomSubsetTrainingSampler(20, 0.3, seed_shuffle=1, seed_subset=2)
    assert len(sampler.subset) == 6 and sampler.size == 6
    stream = take(sampler, 18)
    assert set(stream) == set(sampler.subset)
    for k in range(3):  # each pass is a permutation of the subset
        assert sorted(stream[6 * k : 6 * k + 6]) == sampler.subset
    again = RandomSubsetTrainingSampler(20, 0.3, seed_shuffle=1, seed_subset=2)
    it = iter(again)
    _ = [next(it) for _ in range(7)]
    resumed = RandomSubsetTrainingSampler(20, 0.3, seed_shuffle=9, seed_subset=2)
    resumed.load_state_dict(again.state_dict())
    assert take(resumed, 11) == stream[7:18]
    other_subset = RandomSubsetTrainingSampler(20, 0.3, seed_shuffle=1, seed_subset=3)
    with pytest.raises(ValueError, match="saved with seed_subset=2"):
        other_subset.load_state_dict(again.state_dict())
    with pytest.raises(ValueError, match=r"subset_ratio=0.01\) must be in \(0, 1\]"):
        RandomSubsetTrainingSampler(20, 0.01, seed_shuffle=1, seed_subset=2)
