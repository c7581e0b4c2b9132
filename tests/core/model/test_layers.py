"""Encoder and decoder layers against PyTorch's nn.TransformerEncoderLayer/DecoderLayer."""
import math

import pytest
import torch
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.model.layers import DecoderLayer, EncoderLayer

D, H, FF = 16, 4, 24


def _cfg(**kw):
    base = dict(d_model=D, n_heads=H, d_ff=FF, dropout=0.0, attention_dropout=0.0,
                norm="layernorm", positions="none", attention_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def _copy_attention(ours, theirs, q_scale=1.0):
    """nn.MultiheadAttention packs q, k, v in in_proj; ours keeps q_proj, k_proj, v_proj."""
    wq, wk, wv = ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight
    bq, bk, bv = ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias
    theirs.in_proj_weight.copy_(torch.cat([wq * q_scale, wk, wv]))
    theirs.in_proj_bias.copy_(torch.cat([bq * q_scale, bk, bv]))
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def _copy_common(ours, theirs, attn_pairs, norm_pairs, q_scale=1.0):
    with torch.no_grad():
        for p in ours.parameters():  # random non-trivial values everywhere, also norms and biases
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))
        for a, b in attn_pairs:
            _copy_attention(a, b, q_scale)
        theirs.linear1.weight.copy_(ours.ffn.wi.weight)
        theirs.linear1.bias.copy_(ours.ffn.wi.bias)
        theirs.linear2.weight.copy_(ours.ffn.wo.weight)
        theirs.linear2.bias.copy_(ours.ffn.wo.bias)
        for a, b in norm_pairs:
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def _padding(b, s, lengths):
    return torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (b, s) True = real


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("scale_attention", [True, False])
def test_encoder_layer_matches_torch(norm_position, activation, scale_attention):
    cfg = _cfg(norm_position=norm_position, activation=activation, scale_attention=scale_attention)
    ours = EncoderLayer(cfg).double()
    theirs = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=activation,
                                        batch_first=True, norm_first=norm_position == "pre",
                                        layer_norm_eps=cfg.norm_eps).double()
    # Unscaled scores (T5) equal PyTorch's scaled ones when its queries are sqrt(d_head) larger.
    q_scale = 1.0 if scale_attention else math.sqrt(D // H)
    _copy_common(ours, theirs, [(ours.self_attn, theirs.self_attn)],
                 [(ours.self_attn_norm, theirs.norm1), (ours.ffn_norm, theirs.norm2)], q_scale)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    real = _padding(3, 7, [7, 4, 1])
    got = ours(x, real[:, None, None, :])
    want = theirs(x, src_key_padding_mask=~real)
    torch.testing.assert_close(got[real], want[real])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_layer_matches_torch(norm_position):
    cfg = _cfg(norm_position=norm_position, activation="relu")
    ours = DecoderLayer(cfg).double()
    theirs = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, activation="relu", batch_first=True,
                                        norm_first=norm_position == "pre",
                                        layer_norm_eps=cfg.norm_eps).double()
    _copy_common(ours, theirs, [(ours.self_attn, theirs.self_attn),
                                (ours.cross_attn, theirs.multihead_attn)],
                 [(ours.self_attn_norm, theirs.norm1), (ours.cross_attn_norm, theirs.norm2),
                  (ours.ffn_norm, theirs.norm3)])
    x, memory = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 6, D, dtype=torch.float64)
    src = _padding(2, 6, [6, 3])
    tgt = torch.ones(2, 5, dtype=torch.bool)
    got = ours(x, memory, tgt[:, None, None, :], src[:, None, None, :])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    want = theirs(x, memory, tgt_mask=causal, memory_key_padding_mask=~src)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_layers_are_row_sliceable(positions):
    """Rows routed through a layer alone give the same result as in the full batch."""
    from polytask.core.model.positions import build_positions
    cfg = _cfg(positions=positions, norm="rmsnorm", activation="swiglu")
    enc, dec = EncoderLayer(cfg).double().eval(), DecoderLayer(cfg).double().eval()
    pos_e = build_positions(cfg, bidirectional=True).double()
    pos_d = build_positions(cfg, bidirectional=False).double()
    bias_e = pos_e(6, 6) if positions == "relative" else None
    bias_d = pos_d(4, 4) if positions == "relative" else None
    rope_e = pos_e if positions == "rope" else None
    rope_d = pos_d if positions == "rope" else None
    x, y = torch.randn(3, 6, D, dtype=torch.float64), torch.randn(3, 4, D, dtype=torch.float64)
    src = _padding(3, 6, [6, 2, 4])[:, None, None, :]
    tgt = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    rows = torch.tensor([2, 0])
    full = enc(x, src, bias_e, rope_e)
    torch.testing.assert_close(enc(x[rows], src[rows], bias_e, rope_e), full[rows])
    full_d = dec(y, full, tgt, src, bias_d, rope_d)
    torch.testing.assert_close(dec(y[rows], full[rows], tgt[rows], src[rows], bias_d, rope_d),
                               full_d[rows])
