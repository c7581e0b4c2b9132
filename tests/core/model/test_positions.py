"""Position schemes against closed forms, loops, invariants and Hugging Face's T5."""
import math

import pytest
import torch

from polytask.core.model.config import ModelConfig
from polytask.core.model.positions import (LearnedPositions, RelativePositionBias, RotaryEmbedding,
                            SinusoidalPositions, build_positions, relative_position_bucket)


def test_sinusoidal_matches_vaswani_formula():
    d, pe = 6, SinusoidalPositions(6, max_length=20)
    table = pe(5, start=3, dtype=torch.float64)
    for row, p in enumerate(range(3, 8)):
        for k in range(d // 2):
            angle = p / 10000 ** (2 * k / d)
            assert table[row, 2 * k].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert table[row, 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_sinusoidal_start_offset_is_a_slice_and_odd_width_works():
    pe = SinusoidalPositions(7, max_length=10)
    torch.testing.assert_close(pe(4, start=6), pe(10)[6:])
    assert pe(3).shape == (3, 7)


def test_learned_positions_use_offset_rows():
    pe = LearnedPositions(4, max_length=8, offset=2)
    torch.nn.init.normal_(pe.weight)
    assert pe.weight.shape == (10, 4)  # BART: max_position_embeddings + 2 rows
    torch.testing.assert_close(pe(3, start=1), pe.weight[3:6])


@pytest.mark.parametrize("cls_args", [(SinusoidalPositions, (4, 5)), (LearnedPositions, (4, 5))])
def test_absolute_positions_beyond_max_length_raise(cls_args):
    cls, args = cls_args
    with pytest.raises(ValueError, match="max_length = 5"):
        cls(*args)(3, start=4)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20), (10, 16)])
def test_relative_buckets_match_hugging_face_t5(bidirectional, buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 301)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    ours = relative_position_bucket(rel, bidirectional, buckets, max_distance)
    theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional, buckets, max_distance)
    assert torch.equal(ours, theirs)


def test_relative_bias_shape_and_offset_rows():
    bias = RelativePositionBias(3, 8, 20, bidirectional=False)
    torch.nn.init.normal_(bias.relative_attention_bias.weight)
    full = bias(6, 6)
    assert full.shape == (1, 3, 6, 6)
    # decoding query 4 against keys 0..4 equals row 4 of the full table
    torch.testing.assert_close(bias(1, 5, offset=4), full[:, :, 4:5, :5])
    # bias depends on (key - query) only: it is constant along diagonals
    torch.testing.assert_close(full[:, :, 1:, 1:], full[:, :, :-1, :-1])


def _rope_loop(x, offset, base=10000.0):
    """Slow twin: an explicit 2x2 rotation per position and feature pair (k, k + d/2)."""
    out = x.clone()
    d = x.shape[-1]
    for t in range(x.shape[-2]):
        for k in range(d // 2):
            theta = (offset + t) * base ** (-2 * k / d)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[..., t, k], x[..., t, k + d // 2]
            out[..., t, k] = c * a - s * b
            out[..., t, k + d // 2] = s * a + c * b
    return out


def test_rope_matches_rotation_loop_and_preserves_norm():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    y = rope(x, offset=4)
    torch.testing.assert_close(y, _rope_loop(x, 4))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_matches_hugging_face_llama_rotation():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    d, t = 8, 6
    q, k = torch.randn(1, 2, t, d, dtype=torch.float64), torch.randn(1, 2, t, d, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.arange(t, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    hq, hk = llama.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    rope = RotaryEmbedding(d)
    torch.testing.assert_close(rope(q, 0), hq)
    torch.testing.assert_close(rope(k, 0), hk)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(6)
    q, k = torch.randn(1, 1, 1, 6, dtype=torch.float64), torch.randn(1, 1, 1, 6, dtype=torch.float64)
    s1 = (rope(q, 7) * rope(k, 3)).sum()
    s2 = (rope(q, 12) * rope(k, 8)).sum()
    torch.testing.assert_close(s1, s2)


def test_rope_rejects_odd_head_size():
    with pytest.raises(ValueError, match="d_head = 5"):
        RotaryEmbedding(5)


@pytest.mark.parametrize("kind, cls", [("sinusoidal", SinusoidalPositions),
                                       ("learned", LearnedPositions),
                                       ("relative", RelativePositionBias),
                                       ("rope", RotaryEmbedding), ("none", type(None))])
def test_build_positions(kind, cls):
    cfg = ModelConfig(d_model=8, n_heads=2, positions=kind)
    enc, dec = build_positions(cfg, bidirectional=True), build_positions(cfg, bidirectional=False)
    assert isinstance(enc, cls) and isinstance(dec, cls)
    if kind == "relative":
        assert enc.bidirectional and not dec.bidirectional
