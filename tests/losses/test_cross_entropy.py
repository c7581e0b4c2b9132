import itertools

import pytest
import torch
import torch.nn.functional as F

from polytask import losses
from polytask.core.data.batch import IGNORE_INDEX


def _case(n=7, c=5, dtype=torch.float64):
    logits = torch.randn(n, c, dtype=dtype, requires_grad=True)
    target = torch.randint(0, c, (n,))
    target[1] = IGNORE_INDEX
    target[4] = IGNORE_INDEX
    return logits, target


@pytest.mark.parametrize("smoothing,weighted,dtype", list(itertools.product(
    [0.0, 0.1, 0.35], [False, True], [torch.float32, torch.float64])))
def test_matches_torch_cross_entropy(smoothing, weighted, dtype):
    logits, target = _case(dtype=dtype)
    weight = torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0], dtype=dtype) if weighted else None
    ours = losses.get("ce")(weight=weight, label_smoothing=smoothing).to(dtype)(logits, target)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX,
                          label_smoothing=smoothing)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, atol=tol, rtol=tol)


def test_sum_reduction_matches_torch():
    logits, target = _case()
    ours = losses.get("ce")(label_smoothing=0.2, reduction="sum")(logits, target)
    ref = F.cross_entropy(logits, target, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(ours, ref)


def test_smoothing_spreads_eps_over_all_classes_including_the_true_one():
    # PyTorch convention: q_true = 1 - eps + eps / C (fairseq's would be 1 - eps).
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 2, 3])
    eps, c = 0.2, 4
    q = torch.full((3, c), eps / c, dtype=torch.float64)
    q[torch.arange(3), target] += 1 - eps
    expected = -(q * logits.log_softmax(-1)).sum(-1).mean()
    ours = losses.get("ce")(label_smoothing=eps)(logits, target)
    torch.testing.assert_close(ours, expected)


def test_all_ignored_gives_connected_zero_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3,), IGNORE_INDEX)
    loss = losses.get("ce")(label_smoothing=0.1)(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("options", [{"label_smoothing": 1.0}, {"label_smoothing": -0.1},
                                     {"reduction": "none"}, {"weight": [1.0, -1.0]}])
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        losses.get("ce")(**options)


def test_out_of_range_target_raises_with_values():
    with pytest.raises(ValueError, match=r"\[7\]"):
        losses.get("ce")()(torch.randn(2, 3), torch.tensor([0, 7]))
