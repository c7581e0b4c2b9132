import math

import pytest
import torch
import torch.nn.functional as F

from polytask import losses
from polytask.losses.adversarial import GradientReversal, TaskDiscriminator, ganin_lambda, grad_reverse


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_is_identity_forward_and_multiplies_grad_by_minus_lambda(lam):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, dtype=torch.float64)
    y = GradientReversal(lam)(x)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, -lam * upstream)


def test_ganin_schedule_values():
    assert ganin_lambda(0.0) == 0.0
    assert ganin_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert ganin_lambda(0.25, gamma=4.0) == pytest.approx(2 / (1 + math.exp(-1.0)) - 1)
    with pytest.raises(ValueError):
        ganin_lambda(1.5)


def test_grl_module_follows_the_schedule():
    grl = GradientReversal(0.5, schedule="ganin")
    grl.set_progress(0.3)
    expected = 0.5 * (2 / (1 + math.exp(-3.0)) - 1)
    assert grl.lambda_ == pytest.approx(expected)
    x = torch.ones(2, requires_grad=True)
    grl(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), -expected))
    with pytest.raises(ValueError):
        GradientReversal(1.0, schedule="linear")


def test_discriminator_pools_real_tokens_and_reverses_the_gradient():
    torch.manual_seed(0)
    disc = TaskDiscriminator(d_model=6, n_tasks=3, hidden=5, grl=GradientReversal(0.7)).double()
    feats = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    task_ids = torch.tensor([0, 2])
    loss = losses.get("adversarial")()(disc(feats, mask), task_ids)

    # Oracle: the same MLP on a hand-pooled mean, without reversal.
    feats2 = feats.detach().clone().requires_grad_(True)
    pooled = torch.stack([feats2[0, :2].mean(0), feats2[1].mean(0)])
    ref = F.cross_entropy(disc.mlp(pooled), task_ids)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(feats.grad, -0.7 * feats2.grad)
    assert torch.all(feats.grad[0, 2:] == 0)           # padding gets nothing


def test_adversarial_loss_is_task_cross_entropy():
    logits, ids = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(losses.get("adversarial")()(logits, ids), F.cross_entropy(logits, ids))


def test_functional_grad_reverse():
    x = torch.randn(3, requires_grad=True)
    grad_reverse(x, 2.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))
