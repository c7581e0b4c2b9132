"""``gradient_reducer``: the per-instance hook (the cross-rank average under data parallelism)
applied to the ``(k, P)`` per-task gradients before gradient surgery. It belongs to the
weighting object, never to module state, and is not part of the ``state_dict``."""
import inspect

import pytest
import torch

from polytask import losses
from polytask.losses.weighting import task_gradients

ALL = ["static", "uncertainty", "gradnorm", "dwa", "pcgrad", "famo"]


def f64(*rows):
    return torch.tensor(rows, dtype=torch.float64)


class Recorder:
    """A reducer that records each input and returns ``scale * input``."""

    def __init__(self, scale=2.0):
        self.scale, self.inputs = scale, []

    def __call__(self, grads):
        self.inputs.append(grads.detach().clone())
        return grads * self.scale


class Conflicting:
    """Shared theta (2,), one private head scalar per task, conflicting shared gradients:
    L_a = theta_0 + h_a^2        -> g_a = [ 1, 0], dL_a/dh_a = 2 h_a = 1
    L_b = -theta_0 + theta_1 + 2 h_b -> g_b = [-1, 1], dL_b/dh_b = 2
    PCGrad by hand (k = 2, so the order is fixed): g_a . g_b = -1 < 0,
    g_a^PC = g_a + 1/2 g_b = [0.5, 0.5], g_b^PC = g_b + g_a = [0, 1]; sum [0.5, 1.5]."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
        self.h = {n: torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)) for n in "ab"}

    def losses(self):
        return {"a": self.theta[0] + self.h["a"] ** 2,
                "b": -self.theta[0] + self.theta[1] + 2 * self.h["b"]}


def pcgrad_step(weighting):
    m = Conflicting()
    weighting.backward(m.losses(), [m.theta])
    return m


def test_pcgrad_without_reducer_matches_hand_computation():
    m = pcgrad_step(losses.get_weighting("pcgrad")(["a", "b"]))
    torch.testing.assert_close(m.theta.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_applies_reducer_to_stacked_task_gradients():
    rec = Recorder(2.0)
    m = pcgrad_step(losses.get_weighting("pcgrad")(["a", "b"], gradient_reducer=rec))
    # called once, on the (k, P) per-task gradients of the shared parameters, in run order
    assert len(rec.inputs) == 1
    torch.testing.assert_close(rec.inputs[0], f64([1.0, 0.0], [-1.0, 1.0]))
    # shared grad = plain sum (local backward) + PC(r) - sum(r) with r = 2 g:
    # [0, 1] + 2 [0.5, 1.5] - 2 [0, 1] = [1, 2]
    torch.testing.assert_close(m.theta.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))
    # private parameters get their plain gradient, untouched by the reducer
    assert m.h["a"].grad.item() == pytest.approx(1.0)
    assert m.h["b"].grad.item() == pytest.approx(2.0)


def test_pcgrad_reducer_as_cross_rank_average():
    """A reducer averaging with another rank's gradients [[1, 0], [1, 1]] removes the conflict:
    r = [[1, 0], [0, 1]], PC(r) = sum(r), so the shared grad is the plain local sum [0, 1]."""
    other = f64([1.0, 0.0], [1.0, 1.0])
    m = pcgrad_step(losses.get_weighting("pcgrad")(
        ["a", "b"], gradient_reducer=lambda g: (g + other) / 2))
    torch.testing.assert_close(m.theta.grad, torch.tensor([0.0, 1.0], dtype=torch.float64))


def gradnorm_step(weighting):
    """L_a = 3 theta_0 + 1 (||g_a|| = 3), L_b = theta_1 + 1 (||g_b|| = 1), weights start at 1."""
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    used = weighting.backward({"a": 3 * theta[0] + 1, "b": theta[1] + 1}, [theta])
    return theta, used


@pytest.mark.parametrize("scale, expected", [
    # no reducer: G = [3, 1], G_bar = 2, r = 1 at the first step, grad_w = sign(G - G_bar) ||g||
    # = [3, -1]; w = [1, 1] - 0.1 [3, -1] = [0.7, 1.1], renormalised to sum 2
    (None, [0.7 * 2 / 1.8, 1.1 * 2 / 1.8]),
    # reducer x2: norms [6, 2], grad_w = [6, -2]; w = [0.4, 1.2] -> [0.5, 1.5]
    (2.0, [0.5, 1.5]),
])
def test_gradnorm_takes_norms_of_reduced_gradients(scale, expected):
    rec = Recorder(scale) if scale is not None else None
    gn = losses.get_weighting("gradnorm")(["a", "b"], alpha=1.5, lr=0.1, gradient_reducer=rec)
    theta, used = gradnorm_step(gn)
    assert used == {"a": 1.0, "b": 1.0}
    # the network step uses the current weights and the local gradients either way
    torch.testing.assert_close(theta.grad, torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(gn.task_weights, torch.tensor(expected, dtype=torch.float64))
    if rec is not None:
        assert len(rec.inputs) == 1
        torch.testing.assert_close(rec.inputs[0], f64([3.0, 0.0], [0.0, 1.0]))


def test_two_weightings_with_different_reducers_do_not_interact():
    doubling, halving = Recorder(2.0), Recorder(0.5)
    a = losses.get_weighting("pcgrad")(["a", "b"], gradient_reducer=doubling)
    b = losses.get_weighting("pcgrad")(["a", "b"])
    c = losses.get_weighting("gradnorm")(["a", "b"], lr=0.1, gradient_reducer=halving)
    plain = losses.get_weighting("gradnorm")(["a", "b"], lr=0.1)
    assert a.gradient_reducer is doubling and b.gradient_reducer is None
    assert c.gradient_reducer is halving and plain.gradient_reducer is None
    for _ in range(2):  # interleaved, twice
        torch.testing.assert_close(pcgrad_step(a).theta.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))
        torch.testing.assert_close(pcgrad_step(b).theta.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))
        gradnorm_step(c)
        gradnorm_step(plain)
    assert len(doubling.inputs) == 2 and len(halving.inputs) == 2
    # halving: norms [1.5, 0.5], grad_w = [1.5, -0.5] -> w = [0.85, 1.05] / 0.95 at step 1;
    # the plain one follows the unreduced norms: both differ after the same steps
    assert not torch.allclose(c.task_weights, plain.task_weights)
    fresh = losses.get_weighting("gradnorm")(["a", "b"], lr=0.1)
    gradnorm_step(fresh)
    gradnorm_step(fresh)
    torch.testing.assert_close(plain.task_weights, fresh.task_weights)


def test_task_gradients_reduce_argument():
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    task_losses = {"a": 3 * theta[0], "b": theta[1]}
    plain = task_gradients(task_losses, [theta])
    rec = Recorder(2.0)
    reduced = task_gradients(task_losses, [theta], reduce=rec)
    for n in "ab":
        torch.testing.assert_close(reduced[n], 2 * plain[n])
    with pytest.raises(ValueError, match="shape \\(2, 2\\)"):
        task_gradients(task_losses, [theta], reduce=lambda g: g.sum(0))


@pytest.mark.parametrize("name", ALL)
def test_gradient_reducer_is_keyword_only_and_defaults_to_none(name):
    cls = losses.get_weighting(name)
    param = inspect.signature(cls).parameters["gradient_reducer"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
    assert cls(["a", "b"]).gradient_reducer is None
    with pytest.raises(TypeError, match="gradient_reducer must be a callable"):
        cls(["a", "b"], gradient_reducer="mean")


class ModuleReducer(torch.nn.Module):
    """An nn.Module reducer with a parameter and a buffer: still not weighting state."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, grads):
        return grads * self.scale.detach()


@pytest.mark.parametrize("reducer", [Recorder(2.0), ModuleReducer()], ids=["function", "module"])
@pytest.mark.parametrize("name", ALL)
def test_gradient_reducer_not_in_state_dict(name, reducer):
    with_reducer = losses.get_weighting(name)(["a", "b"], gradient_reducer=reducer)
    without = losses.get_weighting(name)(["a", "b"])
    state = with_reducer.state_dict()
    assert not any("gradient_reducer" in k or "reducer" in k for k in state)
    assert list(state) == list(without.state_dict())
    assert [n for n, _ in with_reducer.named_parameters()] == [n for n, _ in without.named_parameters()]
    assert [n for n, _ in with_reducer.named_buffers()] == [n for n, _ in without.named_buffers()]
    # a checkpoint saved without a reducer loads into a weighting that has one, and it stays
    with_reducer.load_state_dict(without.state_dict())
    assert with_reducer.gradient_reducer is reducer


def test_run_config_rejects_gradient_reducer_option():
    from polytask.experiments.config import RunConfig

    with pytest.raises(ValueError, match="weighting.options.gradient_reducer cannot be set in a config"):
        RunConfig.from_dict({"weighting": {"method": "pcgrad",
                                           "options": {"gradient_reducer": "mean"}}})
    cfg = RunConfig.from_dict({"weighting": {"method": "pcgrad", "options": {"seed": 3}}})
    assert cfg.weighting.options == {"seed": 3}
