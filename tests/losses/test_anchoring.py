"""L2 / EWC anchoring (losses.anchoring) against direct computations: the penalty as an
explicit loop over anchors and elements, the empirical Fisher as one backward per example."""
import pytest
import torch
from torch import nn

from polytask.losses.anchoring import Anchor, anchor_penalty, diagonal_fisher


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
            "b": torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)}


def test_penalty_equals_direct_sum_over_anchors_and_elements():
    params = _params(0)
    theta1, theta2 = _params(1), _params(2)
    fisher = {k: v.detach().abs() for k, v in _params(3).items()}
    anchors = [Anchor({k: v.detach() for k, v in theta1.items()}, fisher),   # EWC
               Anchor({k: v.detach() for k, v in theta2.items()})]            # L2: F = 1
    got = anchor_penalty(params, anchors, weight=0.7)
    direct = 0.0
    for name, p in params.items():
        for idx in range(p.numel()):
            x = p.reshape(-1)[idx].item()
            direct += fisher[name].reshape(-1)[idx].item() * (
                x - theta1[name].reshape(-1)[idx].item()) ** 2
            direct += (x - theta2[name].reshape(-1)[idx].item()) ** 2
    assert got.item() == pytest.approx(0.7 / 2 * direct, rel=1e-12)
    got.backward()   # d/dp: lambda * (F (p - t1) + (p - t2))
    want = 0.7 * (fisher["a"] * (params["a"] - theta1["a"]) + (params["a"] - theta2["a"]))
    torch.testing.assert_close(params["a"].grad, want.detach())


def test_penalty_zero_at_the_anchor_and_none_without_one():
    params = _params(0)
    anchor = Anchor({k: v.detach().clone() for k, v in params.items()})
    assert anchor_penalty(params, [anchor], 5.0).item() == 0.0
    assert anchor_penalty(params, [], 5.0) is None
    assert anchor_penalty(params, [Anchor({"other": torch.zeros(1)})], 5.0) is None


def test_penalty_only_over_named_parameters():
    params = _params(0)
    anchor = Anchor({"a": torch.zeros(3, 4, dtype=torch.float64)})   # b not anchored
    want = 0.5 * params["a"].detach().square().sum()
    assert anchor_penalty(params, [anchor], 1.0).item() == pytest.approx(want.item())


def test_penalty_shape_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match=r"anchor tensor b has shape \(4,\).*\(5,\)") as err:
        anchor_penalty(_params(0), [Anchor({"b": torch.zeros(4)})], 1.0)
    assert "\n" not in str(err.value)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)   # no example reaches it: F = 0

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_fisher_equals_per_example_squared_gradients():
    torch.manual_seed(0)
    model = _Tiny().double()
    xs, ys = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    params = dict(model.named_parameters())

    def ll(n):
        return lambda: torch.log_softmax(model(xs[n]), -1)[ys[n]]

    fisher = diagonal_fisher(params, (ll(n) for n in range(6)))
    direct = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in range(6):   # the obvious way: zero grads, one backward, square, accumulate
        model.zero_grad()
        torch.log_softmax(model(xs[n]), -1)[ys[n]].backward()
        for k, p in params.items():
            if p.grad is not None:
                direct[k] += p.grad.square()
    for k in params:
        torch.testing.assert_close(fisher[k], (direct[k] / 6).float())
    assert fisher["unused.weight"].abs().sum() == 0
    assert fisher["hidden.weight"].abs().sum() > 0
    # per-example squares, not the square of the mean gradient (which would be smaller)
    model.zero_grad()
    sum(torch.log_softmax(model(xs[n]), -1)[ys[n]] for n in range(6)).backward()
    mean_sq = (params["out.weight"].grad / 6).square().float()
    assert not torch.allclose(fisher["out.weight"], mean_sq)


def test_fisher_needs_an_example():
    with pytest.raises(ValueError, match="at least one example"):
        diagonal_fisher(dict(_Tiny().named_parameters()), [])
