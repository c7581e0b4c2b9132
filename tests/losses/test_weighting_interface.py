"""Behaviour every weighting shares: registry construction, missing tasks, extra terms, and
"the update equals the gradient of sum_i w_i L_i with the weights it reports"."""
import pytest
import torch

from polytask import losses

ALL = ["static", "uncertainty", "gradnorm", "dwa", "pcgrad", "famo"]


class Tiny:
    """Shared theta (2,) and one private head scalar per task:
    L_a = 3 theta_0 + h_a^2 + 1,  L_b = theta_1 + 2 h_b + 1 (positive, for FAMO's log)."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
        self.h = {n: torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)) for n in "ab"}

    def losses(self, tasks="ab"):
        out = {"a": 3 * self.theta[0] + self.h["a"] ** 2 + 1,
               "b": self.theta[1] + 2 * self.h["b"] + 1}
        return {n: out[n] for n in tasks}

    # closed-form gradients of each task loss
    grad_theta = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64),
                  "b": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    grad_h = {"a": 1.0, "b": 2.0}  # d L_a / d h_a = 2 h_a = 1, d L_b / d h_b = 2


@pytest.mark.parametrize("name", ALL)
def test_update_is_gradient_of_reported_weighted_sum(name):
    m = Tiny()
    weighting = losses.get_weighting(name)(["a", "b"])
    w = weighting.backward(m.losses(), [m.theta])
    assert set(w) == {"a", "b"}
    # PCGrad: these two gradients do not conflict, so it must reduce to the plain sum
    expected = w["a"] * Tiny.grad_theta["a"] + w["b"] * Tiny.grad_theta["b"]
    torch.testing.assert_close(m.theta.grad, expected)
    for n in "ab":
        assert m.h[n].grad.item() == pytest.approx(w[n] * Tiny.grad_h[n])


@pytest.mark.parametrize("name", ALL)
def test_missing_task_contributes_nothing_and_keeps_state(name):
    m = Tiny()
    weighting = losses.get_weighting(name)(["a", "b"])
    state_b = {k: v.clone() for k, v in weighting.state_dict().items() if torch.is_tensor(v)}
    w = weighting.backward(m.losses("a"), [m.theta])
    assert set(w) == {"a"}
    assert m.h["b"].grad is None
    torch.testing.assert_close(m.theta.grad, w["a"] * Tiny.grad_theta["a"])
    weighting.after_step({"a": m.losses("a")["a"].detach() - 0.5})
    weighting.backward(m.losses("a"), [m.theta])       # a second step must not break either
    assert m.h["b"].grad is None and m.theta.grad[1] == 0
    if name == "uncertainty":
        assert weighting.log_vars[1].grad is None
    if name == "famo":
        assert weighting.logits[1] == state_b["logits"][1]
    if name == "gradnorm":
        assert torch.isnan(weighting.initial_losses[1])


@pytest.mark.parametrize("name", ALL)
def test_extra_term_is_added_unweighted(name):
    m = Tiny()
    weighting = losses.get_weighting(name)(["a", "b"])
    extra = 5 * m.theta[0] + m.h["b"]
    w = weighting.backward(m.losses(), [m.theta], extra=extra)
    expected = w["a"] * Tiny.grad_theta["a"] + w["b"] * Tiny.grad_theta["b"] + torch.tensor(
        [5.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(m.theta.grad, expected)
    assert m.h["b"].grad.item() == pytest.approx(w["b"] * 2.0 + 1.0)


@pytest.mark.parametrize("name", ALL)
def test_unknown_task_and_empty_step(name):
    m = Tiny()
    weighting = losses.get_weighting(name)(["a", "b"])
    with pytest.raises(ValueError, match="unknown tasks \\['c'\\].*a, b"):
        weighting.backward({"c": m.losses()["a"]}, [m.theta])
    assert weighting.backward({}, [m.theta]) == {}
    weighting.end_epoch({"a": 1.0})          # partial epochs are allowed
    with pytest.raises(ValueError):
        weighting.end_epoch({"zzz": 1.0})


def test_only_uncertainty_exposes_optimizer_parameters():
    for name in ALL:
        n_params = len(list(losses.get_weighting(name)(["a", "b"]).parameters()))
        assert n_params == (2 if name == "uncertainty" else 0), name


def test_static_weights_sum_and_validation():
    m = Tiny()
    weighting = losses.get_weighting("static")(["a", "b"], weights={"a": 0.25})
    total, used = weighting.objective(m.losses())
    values = {n: v.item() for n, v in m.losses().items()}
    assert used == {"a": 0.25, "b": 1.0}
    assert total.item() == pytest.approx(0.25 * values["a"] + 1.0 * values["b"])
    with pytest.raises(ValueError, match="unknown tasks \\['c'\\]"):
        losses.get_weighting("static")(["a", "b"], weights={"c": 1.0})
    with pytest.raises(ValueError, match="duplicates"):
        losses.get_weighting("static")(["a", "a"])


def test_uncertainty_objective_and_gradient_wrt_log_variance():
    # L = sum_i exp(-s_i) L_i + s_i;  dL/ds_i = 1 - exp(-s_i) L_i
    weighting = losses.get_weighting("uncertainty")(["a", "b"])
    with torch.no_grad():
        weighting.log_vars[1].fill_(torch.log(torch.tensor(2.0)).item())
    l_a = torch.tensor(2.0, requires_grad=True)
    l_b = torch.tensor(0.5, requires_grad=True)
    total, used = weighting.objective({"a": l_a, "b": l_b})
    assert total.item() == pytest.approx(2.0 + 0.25 + torch.log(torch.tensor(2.0)).item())
    assert used == pytest.approx({"a": 1.0, "b": 0.5})
    total.backward()
    assert weighting.log_vars[0].grad.item() == pytest.approx(1 - 2.0)
    assert weighting.log_vars[1].grad.item() == pytest.approx(1 - 0.25)
    assert l_b.grad.item() == pytest.approx(0.5)


def _dwa_epoch(weighting, means):
    """One DWA window of 2 steps whose per-task mean is ``means`` (values mean +- 0.1)."""
    for sign in (1, -1):
        weighting.backward({n: torch.tensor(v + sign * 0.1, dtype=torch.float64)
                            for n, v in means.items()}, [])


def test_dwa_weights_over_three_windows():
    weighting = losses.get_weighting("dwa")(["a", "b", "c"], window=2)   # K = 3, T = 2
    assert weighting.weights().tolist() == [1.0, 1.0, 1.0]         # window 1
    _dwa_epoch(weighting, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert weighting.weights().tolist() == [1.0, 1.0, 1.0]         # window 2
    _dwa_epoch(weighting, {"a": 0.5, "b": 1.0, "c": 2.0})
    # window 3: r = L(2) / L(1) = (0.5, 1, 2); w = 3 exp(r/2) / sum exp(r/2)
    e = [torch.tensor(x, dtype=torch.float64).exp() for x in (0.25, 0.5, 1.0)]
    torch.testing.assert_close(weighting.weights(), torch.stack([3 * x / sum(e) for x in e]))
    _dwa_epoch(weighting, {"a": 0.25, "b": 0.5, "c": 2.0})
    e = [torch.tensor(x, dtype=torch.float64).exp() for x in (0.25, 0.25, 0.5)]  # r = (.5, .5, 1)
    torch.testing.assert_close(weighting.weights(), torch.stack([3 * x / sum(e) for x in e]))
    assert weighting.weights().sum().item() == pytest.approx(3.0)
    weighting.end_epoch({"a": 9.0})                                # a no-op now
    torch.testing.assert_close(weighting.weights(), torch.stack([3 * x / sum(e) for x in e]))


def test_dwa_task_missing_from_a_window_gets_neutral_ratio():
    weighting = losses.get_weighting("dwa")(["a", "b"], window=2)
    _dwa_epoch(weighting, {"a": 1.0, "b": 1.0})
    _dwa_epoch(weighting, {"a": 2.0})              # b unseen: its window stays open, r_b = 1
    e = [torch.tensor(1.0, dtype=torch.float64).exp(), torch.tensor(0.5, dtype=torch.float64).exp()]
    torch.testing.assert_close(weighting.weights(), torch.stack([2 * x / sum(e) for x in e]))
    assert weighting.window_count.tolist() == [0, 0]
