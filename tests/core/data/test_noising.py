"""polytask.core.data.noising: T5 span corruption against a transcription of T5's reference,
exact reconstruction, and BART text infilling."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.core.data.noising import (NOISERS, random_spans_noise_mask, reconstruct,
                                        span_corruption, text_infilling)

# ---------------------------------------------------------------------------------------------
# Transcription of google-research/text-to-text-transfer-transformer, t5/data/preprocessors.py
# (random_spans_noise_mask with random_roll=False and no batch, its inner _random_segmentation,
# noise_span_to_unique_sentinel and nonnoise_span_to_unique_sentinel), TensorFlow -> numpy.
# seqio.stateless_shuffle(x, seeds[0]) and (..., seeds[1]) become rng.shuffle(x) twice, in the
# same order, so the library (which must consume its Generator in that order) can be compared
# on fixed seeds. tf.math.segment_sum / unsorted_segment_sum of ones become np.bincount.
# ---------------------------------------------------------------------------------------------


def t5_random_spans_noise_mask(length, noise_density, rng, mean_noise_span_length=3.0):
    if noise_density == 0.0:
        return np.zeros(length, bool)
    orig_length = length
    # increase length to avoid degeneracy
    length = max(length, 2)

    def to_int(x):
        return np.int32(x)

    def to_float(x):
        return np.float32(x)
    num_noise_tokens = to_int(np.round(to_float(length) * np.float32(noise_density)))
    # avoid degeneracy by ensuring positive numbers of noise and nonnoise tokens.
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = to_int(
        np.round(to_float(num_noise_tokens) / np.float32(mean_noise_span_length)))
    # avoid degeneracy by ensuring positive number of noise spans
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        flags = (np.arange(num_items - 1) < num_segments - 1).astype(np.int32)
        rng.shuffle(flags)                                   # seqio.stateless_shuffle
        first_in_segment = np.pad(flags, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        segment_length = np.bincount(segment_id)             # segment_sum(ones, segment_id)
        return segment_length
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(
        np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.bincount(span_starts, minlength=length)  # unsorted_segment_sum
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def t5_noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    # sentinel_id(vocabulary) = vocabulary.vocab_size - 1
    prev_token_is_noise = np.pad(noise_mask[:-1], [[1, 0]])
    first_noise_tokens = np.logical_and(noise_mask, np.logical_not(prev_token_is_noise))
    subsequent_noise_tokens = np.logical_and(noise_mask, prev_token_is_noise)
    sentinel = (vocab_size - 1) + 1 - np.cumsum(first_noise_tokens.astype(tokens.dtype))
    tokens = np.where(first_noise_tokens, sentinel, tokens)
    return tokens[np.logical_not(subsequent_noise_tokens)]


def t5_nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    return t5_noise_span_to_unique_sentinel(tokens, np.logical_not(noise_mask), vocab_size)


def t5_span_corruption(tokens, seed, vocab_size, noise_density=0.15, mean_noise_span_length=3.0):
    """(inputs, targets) as T5's denoise(inputs_fn=noise_span_to_unique_sentinel,
    targets_fn=nonnoise_span_to_unique_sentinel) builds them, before eos."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = t5_random_spans_noise_mask(len(tokens), noise_density, np.random.default_rng(seed),
                                      mean_noise_span_length)
    return (t5_noise_span_to_unique_sentinel(tokens, mask, vocab_size).tolist(),
            t5_nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size).tolist())


# T5 takes its sentinels from the top of the vocabulary downwards: extra_id_0 = vocab_size - 1.
VOCAB = 32100
T5_SENTINELS = [VOCAB - 1 - k for k in range(400)]


def runs(mask):
    """Lengths of the noise runs of a boolean mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


# ------------------------------------------------------------------ span corruption vs T5


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 10, 20, 30, 64, 100, 511])
@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.3, 2.0), (0.4, 1.0), (0.15, 8.0)])
def test_mask_equals_t5_on_fixed_seeds(length, density, span):
    for seed in range(20):
        ours = random_spans_noise_mask(length, np.random.default_rng(seed),
                                       noise_density=density, mean_noise_span_length=span)
        ref = t5_random_spans_noise_mask(length, density, np.random.default_rng(seed), span)
        assert ours.dtype == bool and ours.shape == (length,)
        np.testing.assert_array_equal(ours, ref, err_msg=f"seed {seed}")


@pytest.mark.parametrize("length", [1, 2, 3, 5, 11, 30, 57, 200])
def test_span_corruption_equals_t5_on_fixed_seeds(length):
    tokens = np.random.default_rng(1000 + length).integers(5, 30000, size=length).tolist()
    for seed in range(20):
        ours = span_corruption(tokens, np.random.default_rng(seed), sentinel_ids=T5_SENTINELS)
        assert ours == t5_span_corruption(tokens, seed, VOCAB), f"seed {seed}"


def test_span_count_is_lowered_where_t5_fails():
    # 3 tokens at density 0.5, spans of 1: 2 noise spans need 2 non-noise spans, 1 token is left
    with pytest.raises(ValueError):
        t5_random_spans_noise_mask(3, 0.5, np.random.default_rng(0), 1.0)
    for seed in range(10):
        mask = random_spans_noise_mask(3, np.random.default_rng(seed), noise_density=0.5,
                                       mean_noise_span_length=1.0)
        assert mask.tolist() == [False, True, True]


def test_float32_rounding_tie_goes_as_in_t5():
    # 30 * 0.15 is a tie (4.5) in float32 and rounds to even; float64 math would agree here but
    # not at every length: check a spread of lengths where the two precisions disagree.
    lengths = [n for n in range(2, 400)
               if int(np.round(np.float32(n) * np.float32(0.15))) != int(np.round(n * 0.15))]
    assert lengths, "no length where float32 and float64 rounding differ"
    for n in lengths[:10]:
        ours = random_spans_noise_mask(n, np.random.default_rng(0))
        assert ours.sum() == int(np.round(np.float32(n) * np.float32(0.15)))


def test_noise_density_and_mean_span_length():
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(int(n), rng) for n in rng.integers(100, 600, size=300)]
    density = np.mean([m.mean() for m in masks])
    span = np.mean(np.concatenate([runs(m) for m in masks]))
    assert abs(density - 0.15) < 0.005, density
    assert abs(span - 3.0) < 0.1, span
    # the spans move: the noise positions differ from seed to seed
    first = {tuple(np.flatnonzero(random_spans_noise_mask(100, np.random.default_rng(s))))
             for s in range(20)}
    assert len(first) == 20


def test_layout_and_sentinel_order():
    tokens = list(range(100, 200))
    sentinels = list(range(10, 50))
    for seed in range(20):
        inputs, targets = span_corruption(tokens, np.random.default_rng(seed),
                                          sentinel_ids=sentinels)
        in_s = [t for t in inputs if t in sentinels]
        out_s = [t for t in targets if t in sentinels]
        assert in_s == sentinels[:len(in_s)] and out_s == in_s     # extra_id_0 first, in order
        assert targets[0] == sentinels[0] and inputs[-1] == in_s[-1]  # T5: ends in noise
        assert len(inputs) + len(targets) == len(tokens) + 2 * len(in_s)


def test_no_noise_gives_t5_trailing_sentinel():
    assert span_corruption([7], np.random.default_rng(0), sentinel_ids=[1, 2]) == ([7], [1])
    assert t5_span_corruption([7], 0, VOCAB) == ([7], [VOCAB - 1])
    got = span_corruption([7, 8, 9], np.random.default_rng(0), sentinel_ids=[1],
                          noise_density=0.0)
    assert got == ([7, 8, 9], [1]) and reconstruct(*got, [1]) == [7, 8, 9]
    assert span_corruption([], np.random.default_rng(0), sentinel_ids=[1]) == ([], [])


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(5, 999), max_size=300),
       density=st.floats(0.0, 1.0), span=st.floats(1.0, 10.0), seed=st.integers(0, 2**32 - 1))
def test_reconstruct_is_exact(tokens, density, span, seed):
    sentinels = list(range(1000, 1000 + len(tokens) + 1))
    inputs, targets = span_corruption(tokens, np.random.default_rng(seed), sentinel_ids=sentinels,
                                      noise_density=density, mean_noise_span_length=span)
    assert reconstruct(inputs, targets, sentinels) == tokens


@pytest.mark.parametrize("call,match", [
    (lambda r: span_corruption([5, 6, 1], r, sentinel_ids=[1, 2]), "position 2 is a sentinel"),
    (lambda r: span_corruption(list(range(5, 105)), r, sentinel_ids=[1]), "need .* sentinels"),
    (lambda r: random_spans_noise_mask(10, r, noise_density=1.5), r"noise_density \(1.5\)"),
    (lambda r: random_spans_noise_mask(10, r, mean_noise_span_length=0.5), "must be >= 1"),
    (lambda r: reconstruct([1], [5, 1], [1]), "start with 5"),
    (lambda r: reconstruct([2], [1, 5], [1, 2]), "sentinel 2 of the inputs"),
])
def test_errors_are_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(np.random.default_rng(0))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ text infilling (BART)

MASK = 4


def spans_of(inputs, tokens):
    """Lengths hidden by each mask, recovered from the kept tokens around it (tokens distinct)."""
    index = {t: i for i, t in enumerate(tokens)}
    lengths, previous = [], -1
    pending = False
    for t in inputs + [None]:
        if t == MASK:
            assert not pending, "two masks side by side"
            pending = True
            continue
        at = len(tokens) if t is None else index[t]
        if pending:
            lengths.append(at - previous - 1)
            pending = False
        else:
            assert at == previous + 1, "tokens vanished without a mask"
        previous = at
    return lengths


def test_infilling_ratio_order_and_targets():
    tokens = list(range(100, 300))
    for seed in range(30):
        inputs, targets = text_infilling(tokens, np.random.default_rng(seed), mask_id=MASK)
        kept = [t for t in inputs if t != MASK]
        assert targets == tokens
        assert kept == sorted(kept) and set(kept) <= set(tokens)      # in order, none invented
        assert len(tokens) - len(kept) == round(0.3 * len(tokens))
        assert sum(spans_of(inputs, tokens)) == 60


def test_infilling_span_lengths_are_poisson_with_zero_length_insertions():
    tokens = list(range(100, 1100))
    lengths = []
    for seed in range(40):
        inputs, _ = text_infilling(tokens, np.random.default_rng(seed), mask_id=MASK)
        lengths += spans_of(inputs, tokens)
    lengths = np.array(lengths)
    assert 2.7 < lengths.mean() < 3.1, lengths.mean()           # Poisson(3), last span cut
    assert 0.03 < (lengths == 0).mean() < 0.08                  # P(0) = e^-3 = 0.0498
    inserted = text_infilling([10, 11, 12], np.random.default_rng(0), mask_id=MASK,
                              mask_ratio=0.0)
    assert inserted == ([10, 11, 12], [10, 11, 12])              # no budget, no span


def test_infilling_is_deterministic_per_seed_and_handles_edges():
    tokens = list(range(10, 60))
    a = text_infilling(tokens, np.random.default_rng(3), mask_id=MASK)
    assert a == text_infilling(tokens, np.random.default_rng(3), mask_id=MASK)
    assert a != text_infilling(tokens, np.random.default_rng(4), mask_id=MASK)
    assert text_infilling(tokens, np.random.default_rng(0), mask_id=MASK,
                          mask_ratio=1.0)[0] == [MASK]
    assert text_infilling([], np.random.default_rng(0), mask_id=MASK) == ([], [])
    for seed in range(20):   # more spans than gaps: surplus merges, the budget still holds
        inputs, _ = text_infilling([10, 11, 12], np.random.default_rng(seed), mask_id=MASK,
                                   mask_ratio=0.67, poisson_lambda=0.3)
        assert len([t for t in inputs if t != MASK]) == 1


@pytest.mark.parametrize("kwargs,match", [({"mask_ratio": -0.1}, "mask_ratio"),
                                          ({"poisson_lambda": 0.0}, "poisson_lambda")])
def test_infilling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        text_infilling([1, 2], np.random.default_rng(0), mask_id=MASK, **kwargs)


def test_noisers_table():
    assert NOISERS == {"span_corruption": span_corruption, "text_infilling": text_infilling}
