import pytest
import torch

from polytask import losses
from polytask.losses.penalties import orthogonality_penalty, soft_sharing_penalty


def test_orthogonality_zero_for_orthogonal_feature_spaces():
    # shared features live in columns that the private ones never use row-wise: S^T P = 0
    shared = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    private = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    assert orthogonality_penalty(shared, private).item() == 0.0


def test_orthogonality_equals_frobenius_formula():
    shared = torch.randn(7, 4, dtype=torch.float64)
    private = torch.randn(7, 3, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(shared.T @ private, ord="fro") ** 2
    torch.testing.assert_close(orthogonality_penalty(shared, private), expected)
    # elementwise: sum_{a,b} (sum_n S[n,a] P[n,b])^2
    by_hand = sum(float((shared[:, a] * private[:, b]).sum()) ** 2 for a in range(4) for b in range(3))
    assert orthogonality_penalty(shared, private).item() == pytest.approx(by_hand)


def test_orthogonality_sums_over_tasks_and_registered_module():
    s, p = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    expected = orthogonality_penalty(s[0], p[0]) + orthogonality_penalty(s[1], p[1])
    torch.testing.assert_close(losses.get("orthogonality")()(s, p), expected)
    with pytest.raises(ValueError):
        orthogonality_penalty(torch.randn(5, 3), torch.randn(4, 3))


def test_soft_sharing_zero_for_equal_copies_and_grows_with_divergence():
    base = [torch.randn(3, 2), torch.randn(2)]
    assert soft_sharing_penalty([base, [p.clone() for p in base]]).item() == 0.0
    direction = [torch.randn(3, 2), torch.randn(2)]
    values = [soft_sharing_penalty([base, [p + s * d for p, d in zip(base, direction)]]).item()
              for s in (0.5, 1.0, 2.0)]
    norm2 = sum(float(d.pow(2).sum()) for d in direction)
    assert values == pytest.approx([0.25 * norm2, norm2, 4 * norm2])   # quadratic growth


def test_soft_sharing_sums_all_pairs_and_has_the_l2_gradient():
    a = torch.tensor([1.0, 0.0], requires_grad=True)
    b = torch.tensor([0.0, 2.0], requires_grad=True)
    c = torch.tensor([1.0, 1.0], requires_grad=True)
    pen = losses.get("soft_sharing")()([[a], [b], [c]])
    # ||a-b||^2 + ||a-c||^2 + ||b-c||^2 = 5 + 1 + 2
    assert pen.item() == pytest.approx(8.0)
    pen.backward()
    torch.testing.assert_close(a.grad, 2 * (a - b) + 2 * (a - c))


def test_soft_sharing_rejects_mismatched_copies():
    with pytest.raises(ValueError, match="copy 1"):
        soft_sharing_penalty([[torch.zeros(2)], [torch.zeros(3)]])
    with pytest.raises(ValueError, match=">= 2 copies"):
        soft_sharing_penalty([[torch.zeros(2)]])
