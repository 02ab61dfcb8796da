"""d2engine.data.samplers: TrainingSampler and InferenceSampler."""

from __future__ import annotations

import itertools

import pytest

from d2engine.data import InferenceSampler, TrainingSampler


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
    with pytest.raises(
        ValueError, match="saved for a dataset of 6 samples, but this sampler has size 5"
    ):
        sampler.load_state_dict({"seed": 1, "position": 0, "size": 6})
    with pytest.raises(ValueError, match="saved with shuffle=False"):
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
