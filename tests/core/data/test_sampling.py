"""polytask.core.data.sampling.MixtureSampler: rates, determinism, epochs, resume and data-parallel shards."""
import json
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from polytask.core.data.sampling import MixtureSampler

SIZES = {"a": 400, "b": 100, "c": 25}


def test_rates_match_their_formulas():
    n = np.array([400, 100, 25], dtype=float)
    rates = lambda **kw: np.array(list(MixtureSampler(SIZES, **kw).rates().values()))
    np.testing.assert_allclose(rates(method="proportional"), n / n.sum())
    t = n ** (1 / 3)
    np.testing.assert_allclose(rates(method="temperature", temperature=3), t / t.sum())
    np.testing.assert_allclose(rates(method="uniform"), [1 / 3] * 3)
    capped = np.minimum(n, 100)  # T5: examples-proportional mixing with limit K
    np.testing.assert_allclose(rates(method="proportional", cap=100), capped / capped.sum())
    np.testing.assert_allclose(rates(method="proportional", cap={"a": 50}), [50 / 175, 100 / 175, 25 / 175])
    np.testing.assert_allclose(rates(method="temperature", temperature=1.0), n / n.sum())


def test_empirical_frequencies_follow_the_rates():
    sampler = MixtureSampler(SIZES, "temperature", temperature=2.0, seed=3)
    counts = Counter(t for t, _ in sampler.next_batch(20000))
    for task, p in sampler.rates().items():
        assert abs(counts[task] / 20000 - p) < 0.015


def test_round_robin_cycles_tasks():
    pairs = MixtureSampler(SIZES, "round_robin").next_batch(7)
    assert [t for t, _ in pairs] == ["a", "b", "c", "a", "b", "c", "a"]


def test_each_task_epoch_is_a_permutation_and_indices_are_in_range():
    sampler = MixtureSampler({"x": 7, "y": 5}, "round_robin", seed=1)
    pairs = sampler.next_batch(28)
    xs = [i for t, i in pairs if t == "x"]
    assert sorted(xs[:7]) == list(range(7)) and sorted(xs[7:14]) == list(range(7))
    assert xs[:7] != xs[7:14]  # reshuffled every epoch
    assert all(0 <= i < 5 for t, i in pairs if t == "y")


def test_deterministic_given_seed():
    one = MixtureSampler(SIZES, seed=5).next_batch(300)
    assert one == MixtureSampler(SIZES, seed=5).next_batch(300)
    assert one != MixtureSampler(SIZES, seed=6).next_batch(300)


@pytest.mark.parametrize("method", ["proportional", "round_robin"])
def test_resume_from_json_state_continues_exactly(method):
    reference = MixtureSampler(SIZES, method, seed=2)
    expected = reference.next_batch(5000)  # crosses a task-choice block and several epochs
    first = MixtureSampler(SIZES, method, seed=2)
    head = first.next_batch(1234)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MixtureSampler(SIZES, method, seed=2)
    resumed.load_state_dict(state)
    assert head + resumed.next_batch(5000 - 1234) == expected


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_single_process_batches(world_size):
    b, steps = 8, 40
    single = MixtureSampler(SIZES, seed=4)
    ranks = [MixtureSampler(SIZES, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(steps):
        full = single.next_batch(b)
        shards = [s.next_batch(b // world_size) for s in ranks]
        assert sorted(sum(shards, [])) == sorted(full)
        positions = [i for shard in shards for i in shard]
        assert len(positions) == b
    states = [s.state_dict() for s in ranks]
    assert all(st == single.state_dict() for st in states)  # one checkpoint serves every rank


def test_state_of_another_sampler_is_rejected():
    state = MixtureSampler(SIZES, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed = 1 but this sampler has 2"):
        MixtureSampler(SIZES, seed=2).load_state_dict(state)
    odd = MixtureSampler(SIZES, seed=1)
    odd.next_batch(3)
    with pytest.raises(ValueError, match="not a multiple of world_size"):
        MixtureSampler(SIZES, seed=1, world_size=2).load_state_dict(odd.state_dict())


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "zipf"}, "unknown sampling method 'zipf'; choose one of proportional, temperature"),
    ({"temperature": 0}, r"temperature \(0\) must be > 0"),
    ({"rank": 2, "world_size": 2}, r"rank \(2\) must be in \[0, world_size=2\)"),
    ({"cap": {"zz": 3}}, "cap for unknown task 'zz'"),
    ({"cap": 0}, r"cap for task 'a' \(0\) must be positive"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtureSampler(SIZES, **kwargs)
    with pytest.raises(ValueError, match="task 'e' has 0 examples"):
        MixtureSampler({"e": 0})


@settings(max_examples=25, deadline=None)
@given(world_size=st.sampled_from([1, 2, 3, 4]), per_rank=st.integers(1, 5), seed=st.integers(0, 99),
       method=st.sampled_from(["proportional", "temperature", "uniform", "round_robin"]),
       sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4))
def test_sharding_property(world_size, per_rank, seed, method, sizes):
    sizes = {f"t{k}": n for k, n in enumerate(sizes)}
    single = MixtureSampler(sizes, method, seed=seed).next_batch(world_size * per_rank * 3)
    ranks = [MixtureSampler(sizes, method, seed=seed, rank=r, world_size=world_size)
             for r in range(world_size)]
    for step in range(3):
        shards = [s.next_batch(per_rank) for s in ranks]
        full = single[step * world_size * per_rank:(step + 1) * world_size * per_rank]
        assert sorted(sum(shards, [])) == sorted(full)
