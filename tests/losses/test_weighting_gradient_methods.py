"""GradNorm, PCGrad and FAMO against their papers' equations on hand-worked two-task cases."""
import math

import pytest
import torch

from polytask import losses
from polytask.losses.weighting.pcgrad import project_conflicting

f64 = torch.float64


def _linear_losses(theta):
    # L_a = 3 theta_0, L_b = theta_1: grad_W L_a = (3, 0), grad_W L_b = (0, 1), norms 3 and 1
    return {"a": 3 * theta[0], "b": theta[1]}


def test_gradnorm_update_and_renormalisation_by_hand():
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=f64))
    other = torch.nn.Parameter(torch.tensor(1.0, dtype=f64))   # not W: GradNorm ignores it
    gn = losses.get_weighting("gradnorm")(["a", "b"], alpha=1.5, lr=0.1)

    # Step 0: L(0) = (3, 2), r = (1, 1), w = (1, 1), G = (3, 1), G_bar = 2, target = (2, 2).
    # dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i|| = (+3, -1)
    used = gn.backward(_linear_losses(theta), [theta, other], last_shared=[theta])
    assert used == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(theta.grad, torch.tensor([3.0, 1.0], dtype=f64))  # uses w(t)
    w1 = torch.tensor([1 - 0.1 * 3, 1 + 0.1 * 1], dtype=f64)
    w1 = w1 * 2 / w1.sum()                                      # renormalise to sum K = 2
    torch.testing.assert_close(gn.task_weights, w1)
    assert gn.task_weights.sum().item() == pytest.approx(2.0)

    # Step 1: theta_0 halves, so L = (1.5, 2), L~ = (0.5, 1), r = (2/3, 4/3).
    theta.grad = None
    with torch.no_grad():
        theta[0] = 0.5
    G = w1 * torch.tensor([3.0, 1.0], dtype=f64)
    target = G.mean() * torch.tensor([2 / 3, 4 / 3], dtype=f64) ** 1.5
    torch.testing.assert_close(target, torch.tensor([0.96770, 2.73706], dtype=f64), atol=1e-4, rtol=0)
    assert G[0] > target[0] and G[1] < target[1]               # signs (+, -) again
    used = gn.backward(_linear_losses(theta), [theta])          # default W = shared_params[-1]
    assert used == pytest.approx({"a": w1[0].item(), "b": w1[1].item()})
    torch.testing.assert_close(theta.grad, w1 * torch.tensor([3.0, 1.0], dtype=f64))
    w2 = w1 - 0.1 * torch.tensor([3.0, -1.0], dtype=f64)
    torch.testing.assert_close(gn.task_weights, w2 * 2 / w2.sum())


def test_gradnorm_alpha_moves_the_target():
    # Equal gradient norms, unequal training rates: with alpha = 0 the target is G_bar
    # (no update); with alpha > 0 the slower task (larger r) must gain weight.
    for alpha, expect_change in ((0.0, False), (1.0, True)):
        theta = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=f64))
        gn = losses.get_weighting("gradnorm")(["a", "b"], alpha=alpha, lr=0.1)
        gn.backward({"a": theta[0] * 1, "b": theta[1] * 1}, [theta])
        with torch.no_grad():
            theta.copy_(torch.tensor([1.0, 1.0]))
        # losses (0.5, 1) with unchanged gradients (1, 0) and (0, 1): L~ = (0.5, 1)
        gn.backward({"a": theta[0] * 1 - 0.5, "b": theta[1] * 1}, [theta])
        w = gn.task_weights
        if expect_change:
            # r = (2/3, 4/3); G = (1, 1) > target_a, < target_b: grad = (+1, -1)
            torch.testing.assert_close(w, torch.tensor([0.9, 1.1], dtype=f64))
        else:
            torch.testing.assert_close(w, torch.ones(2, dtype=f64))


def test_gradnorm_rejects_bad_options():
    with pytest.raises(ValueError, match="alpha=-1"):
        losses.get_weighting("gradnorm")(["a", "b"], alpha=-1)


def _pcgrad_step(grad_a, grad_b):
    theta = torch.nn.Parameter(torch.zeros(2, dtype=f64))
    h = torch.nn.Parameter(torch.ones(2, dtype=f64))        # private heads
    ga, gb = torch.tensor(grad_a, dtype=f64), torch.tensor(grad_b, dtype=f64)
    task_losses = {"a": ga @ theta + h[0], "b": gb @ theta + 2 * h[1]}
    losses.get_weighting("pcgrad")(["a", "b"]).backward(task_losses, [theta])
    return theta.grad, h.grad


def test_pcgrad_projects_conflicting_gradients():
    # g_a = (1, 0), g_b = (-1, 1): g_a . g_b = -1 < 0
    # g_a^PC = g_a - (-1 / 2) g_b = (0.5, 0.5);  g_b^PC = g_b - (-1 / 1) g_a = (0, 1)
    shared, private = _pcgrad_step([1.0, 0.0], [-1.0, 1.0])
    torch.testing.assert_close(shared, torch.tensor([0.5, 1.5], dtype=f64))
    torch.testing.assert_close(private, torch.tensor([1.0, 2.0], dtype=f64))   # plain sum


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    shared, private = _pcgrad_step([1.0, 0.0], [1.0, 1.0])
    torch.testing.assert_close(shared, torch.tensor([2.0, 1.0], dtype=f64))
    torch.testing.assert_close(private, torch.tensor([1.0, 2.0], dtype=f64))


def test_pcgrad_three_tasks_and_invariants():
    g = torch.tensor([[1.0, 0, 0], [-1.0, 1, 0], [0.0, 0, 1]], dtype=f64)  # only (1, 2) conflict
    torch.testing.assert_close(project_conflicting(g), torch.tensor([0.5, 1.5, 1.0], dtype=f64))
    g = torch.randn(4, 6, dtype=f64)
    a = project_conflicting(g, torch.Generator().manual_seed(3))
    b = project_conflicting(g, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)                                              # seeded order
    two = torch.randn(2, 5, dtype=f64)
    two[1] = -two[0] + 0.1 * torch.randn(5, dtype=f64)                   # strongly conflicting
    combined = project_conflicting(two)
    # for two tasks each projected gradient is orthogonal to the other's: sum . g_j >= 0
    assert (combined @ two[0]) >= -1e-12 and (combined @ two[1]) >= -1e-12


def test_famo_weights_after_one_update_and_gamma_decay():
    # Algorithm 1's plain step (optimizer="sgd"); the default Adam step is checked against the
    # authors' code in test_dwa_famo_reference.py
    beta, gamma = 0.5, 0.1
    famo = losses.get_weighting("famo")(["a", "b"], lr=beta, gamma=gamma, eps=0.0, optimizer="sgd")
    la = torch.tensor(1.0, dtype=f64, requires_grad=True)
    lb = torch.tensor(2.0, dtype=f64, requires_grad=True)
    # xi = 0: z = (1/2, 1/2), c = 1 / (0.5/1 + 0.5/2) = 4/3, weight on grad l_i = c z_i / l_i
    used = famo.backward({"a": la, "b": lb}, [])
    assert used == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert la.grad.item() == pytest.approx(2 / 3) and lb.grad.item() == pytest.approx(1 / 3)

    # after the step: l = (0.5, 2); log-loss change = (ln 2, 0)
    # delta = J_z^T change = z * (change - z . change) = (ln2 / 4, -ln2 / 4)
    famo.after_step({"a": 0.5, "b": 2.0})
    xi = torch.tensor([-beta * math.log(2) / 4, beta * math.log(2) / 4], dtype=f64)
    torch.testing.assert_close(famo.logits, xi)
    torch.testing.assert_close(famo.z(), torch.softmax(xi, 0))
    assert famo.z()[0] < 0.5                     # the task that improved faster loses weight

    # route (b): no after_step; the next backward's losses are l(theta_t+1). Equal log-changes
    # give delta = 0, so only the regulariser acts: xi <- xi - beta * gamma * xi.
    famo.backward({"a": torch.tensor(0.5, dtype=f64), "b": torch.tensor(2.0, dtype=f64)}, [])
    torch.testing.assert_close(famo.logits, xi)  # after_step consumed the pending losses
    famo.backward({"a": torch.tensor(0.25, dtype=f64), "b": torch.tensor(1.0, dtype=f64)}, [])
    torch.testing.assert_close(famo.logits, xi * (1 - beta * gamma))


def test_famo_min_losses_validated():
    with pytest.raises(ValueError, match="unknown tasks"):
        losses.get_weighting("famo")(["a", "b"], min_losses={"x": 0.1})
    famo = losses.get_weighting("famo")(["a", "b"], min_losses={"a": 1.0})
    with pytest.raises(ValueError, match="above their min_losses"):
        famo.backward({"a": torch.tensor(0.5, requires_grad=True)}, [])


def test_weighting_state_round_trips_through_state_dict():
    # checkpoints: GradNorm weights, DWA history, FAMO logits, PCGrad's generator all restore
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=f64))
    for name in ("gradnorm", "famo", "pcgrad", "dwa"):
        w = losses.get_weighting(name)(["a", "b"])
        w.end_epoch({"a": 2.0, "b": 1.0})
        for _ in range(2):
            w.backward(_linear_losses(theta), [theta])
        theta.grad = None
        copy = losses.get_weighting(name)(["a", "b"])
        copy.load_state_dict(w.state_dict())
        for key, value in w.state_dict().items():
            if torch.is_tensor(value):
                restored = copy.state_dict()[key]
                assert torch.allclose(value, restored, rtol=0, atol=0, equal_nan=True), key
        if name == "pcgrad":
            assert torch.equal(torch.randperm(5, generator=w.generator),
                               torch.randperm(5, generator=copy.generator))
