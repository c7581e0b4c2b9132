import pytest
import torch
import torch.nn.functional as F

from polytask import losses
from polytask.core.data.batch import IGNORE_INDEX


def _case(dtype=torch.float64):
    n, t, v = 4, 6, 11
    logits = torch.randn(n, t, v, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    labels[0, 4:] = IGNORE_INDEX     # padding
    labels[2, :] = IGNORE_INDEX      # a row without a text target (classification row)
    labels[3, 1:] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_mean_matches_flattened_torch_cross_entropy(smoothing):
    logits, labels = _case()
    ours = losses.get("generative")(label_smoothing=smoothing)(logits, labels)
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sequence_sum_then_mean_over_rows_with_targets(smoothing):
    logits, labels = _case()
    ours = losses.get("generative")(reduction="sequence", label_smoothing=smoothing)(logits, labels)
    per_row = [F.cross_entropy(logits[i], labels[i], ignore_index=IGNORE_INDEX,
                               label_smoothing=smoothing, reduction="sum")
               for i in (0, 1, 3)]       # row 2 has no target tokens and must not count
    torch.testing.assert_close(ours, torch.stack(per_row).mean())


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_no_target_tokens_gives_connected_zero(reduction):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = losses.get("generative")(reduction=reduction)(logits, labels)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shape_mismatch_and_bad_reduction_raise():
    with pytest.raises(ValueError, match="reduction"):
        losses.get("generative")(reduction="mean")
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        losses.get("generative")()(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def _lm(**overrides):
    from polytask.core.model.config import ModelConfig
    from polytask.core.model.transformer import EncoderDecoder
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=23, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                         n_decoder_layers=1, **overrides)
    return EncoderDecoder(config).double()


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("overrides", [{}, {"rescale_tied_output": True, "lm_head_bias": True}])
def test_from_hidden_equals_the_loss_of_the_logits(reduction, smoothing, overrides):
    lm = _lm(**overrides)
    hidden = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 23, (4, 6))
    labels[0, 4:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    loss = losses.get("generative")(reduction=reduction, label_smoothing=smoothing)
    fused = loss.from_hidden(hidden, lm, labels)
    twin = loss(lm.logits(hidden), labels)
    torch.testing.assert_close(fused, twin)
    params = [hidden, lm.lm_head.weight] + ([lm.lm_head.bias] if lm.lm_head.bias is not None else [])
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(twin, params)):
        torch.testing.assert_close(a, b)


def test_from_hidden_falls_back_to_the_logits_for_a_wrapped_head():
    from polytask.core.peft.lora import LoRALinear
    lm = _lm()
    lm.lm_head = LoRALinear(lm.lm_head, r=2)
    torch.nn.init.normal_(lm.lm_head.lora_B)     # a head whose output differs from its base's
    hidden = torch.randn(2, 3, 16, dtype=torch.float64)
    labels = torch.randint(0, 23, (2, 3))
    loss = losses.get("generative")()
    from polytask.losses.generative import fusable_head
    assert fusable_head(lm) is None and fusable_head(_lm()) is not None
    torch.testing.assert_close(loss.from_hidden(hidden, lm, labels), loss(lm.logits(hidden), labels))
