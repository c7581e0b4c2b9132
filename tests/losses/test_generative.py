import pytest
import torch
import torch.nn.functional as F

import losses
from core.batch import IGNORE_INDEX


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
