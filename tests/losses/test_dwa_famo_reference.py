"""DWA and FAMO against independent reference implementations, in fp64 on a toy problem.

The references below are written from the published equations, not from polytask's code:
- DWA: LibMTL's ``DWA`` / Liu, Johns & Davison 2019 eq. 7, w = K softmax(r / T),
  r_k = L_k(t-1) / L_k(t-2), with L_k(t) the mean loss over "epoch" t (here: a window of steps).
- FAMO: the authors' ``famo.py`` (github.com/Cranial-XIX/FAMO): logits w, z = softmax(w),
  objective sum(z * log(L - min + 1e-8)) / c with c = sum(z / (L - min + 1e-8)) detached, and
  ``update(curr_loss)``: the gradient of softmax(w) with grad_outputs = the change in log-losses,
  stepped by ``torch.optim.Adam([w], lr=w_lr, weight_decay=gamma)``.
Each test trains two copies of the same model, one under polytask, one under the reference,
and compares the weights and the parameters step by step.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytask import losses

f64 = torch.float64
TASKS = ["a", "b", "c"]


class Toy(nn.Module):
    """A shared linear layer and one linear head per task; targets on very different scales."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 4, generator=g, dtype=f64)
        scale = {"a": 0.1, "b": 1.0, "c": 5.0}
        self.y = {t: scale[t] * (self.x @ torch.randn(4, 1, generator=g, dtype=f64)
                                 + 0.3 * torch.randn(32, 1, generator=g, dtype=f64))
                  for t in TASKS}
        self.shared = nn.Linear(4, 6).to(f64)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1).to(f64) for t in TASKS})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=f64))

    def losses(self):
        h = torch.tanh(self.shared(self.x))
        return {t: (self.heads[t](h) - self.y[t]).pow(2).mean() for t in TASKS}


# --------------------------------------------------------------------------- references
def dwa_reference_weights(epoch_means: list[torch.Tensor], K: int, T: float) -> torch.Tensor:
    """LibMTL's DWA: ones for the first two epochs, then K * softmax(r / T)."""
    if len(epoch_means) < 2:
        return torch.ones(K, dtype=f64)
    r = epoch_means[-1] / epoch_means[-2]
    return K * F.softmax(r / T, dim=-1)


class FamoReference:
    """The authors' FAMO class (famo.py), minus gradient clipping (the training loop's job)."""

    def __init__(self, n_tasks, gamma, w_lr, min_losses=None):
        self.min_losses = torch.zeros(n_tasks, dtype=f64) if min_losses is None else min_losses
        self.w = torch.zeros(n_tasks, dtype=f64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + 1e-8
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - \
                (curr_loss - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


# --------------------------------------------------------------------------- DWA
def test_dwa_matches_libmtl_reference_with_window_epochs():
    window, steps, lr = 3, 15, 0.05
    ours, ref = Toy(), Toy()
    dwa = losses.get_weighting("dwa")(TASKS, window=window)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    epoch_means, current = [], []
    for step in range(steps):
        opt_ours.zero_grad()
        used = dwa.backward(ours.losses(), list(ours.shared.parameters()))
        opt_ours.step()

        opt_ref.zero_grad()
        l = ref.losses()
        w = dwa_reference_weights(epoch_means, len(TASKS), 2.0)
        sum(w[i] * l[t] for i, t in enumerate(TASKS)).backward()
        opt_ref.step()
        current.append(torch.stack([l[t].detach() for t in TASKS]))
        if len(current) == window:
            epoch_means.append(torch.stack(current).mean(0))
            current = []

        torch.testing.assert_close(torch.tensor([used[t] for t in TASKS], dtype=f64), w)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    assert not torch.allclose(w, torch.ones(3, dtype=f64))     # it did adapt


def test_dwa_default_adapts_within_about_20_steps():
    model = Toy()
    dwa = losses.get_weighting("dwa")(TASKS)                    # default window = 10 steps
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(21):
        opt.zero_grad()
        used = dwa.backward(model.losses(), list(model.shared.parameters()))
        opt.step()
        if step < 20:                                          # two windows not yet finished
            assert used == {t: 1.0 for t in TASKS}
    assert max(abs(w - 1.0) for w in used.values()) > 1e-3, used
    assert abs(sum(used.values()) - 3.0) < 1e-12


# --------------------------------------------------------------------------- FAMO
def _famo_pair(steps, **options):
    ours, ref = Toy(), Toy()
    famo = losses.get_weighting("famo")(TASKS, **options)
    reference = FamoReference(3, gamma=famo.gamma, w_lr=famo.lr, min_losses=famo.min_losses)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(steps):
        opt_ours.zero_grad()
        famo.backward(ours.losses(), list(ours.shared.parameters()))
        opt_ours.step()
        with torch.no_grad():
            famo.after_step(ours.losses())

        opt_ref.zero_grad()
        reference.get_weighted_loss(torch.stack(list(ref.losses().values()))).backward()
        opt_ref.step()
        with torch.no_grad():
            reference.update(torch.stack(list(ref.losses().values())))

        torch.testing.assert_close(famo.logits, reference.w.detach())
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    return famo


def test_famo_default_matches_authors_code():
    famo = _famo_pair(12)
    assert famo.optimizer == "adam" and famo.lr == 0.025 and famo.gamma == 1e-3
    assert not torch.allclose(famo.z(), torch.full((3,), 1 / 3, dtype=f64))


def test_famo_matches_authors_code_with_min_losses_and_other_hyperparameters():
    _famo_pair(8, lr=0.1, gamma=0.01, min_losses={"a": 1e-3, "c": 0.05})


def test_famo_default_weights_do_not_collapse_and_favour_the_lagging_task():
    """z = softmax(xi) (the weights the authors log) stays spread out; Adam moves it towards
    the task whose log-loss falls slowest (c, the large-scale one) far more than the plain step
    does. (The effective weights c z_i / l_i that ``backward`` reports are ∝ 1 / l_i by design,
    so they do favour the small-loss task.)"""
    z = {}
    for optimizer in ("adam", "sgd"):
        model = Toy()
        famo = losses.get_weighting("famo")(TASKS, optimizer=optimizer)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(150):
            opt.zero_grad()
            famo.backward(model.losses(), list(model.shared.parameters()))
            opt.step()
            with torch.no_grad():
                famo.after_step(model.losses())
        z[optimizer] = famo.z()
    assert z["adam"].min() > 0.1 and z["adam"].max() < 0.8, z["adam"]
    assert z["adam"][2] == z["adam"].max()                        # c lags: it gains weight
    assert z["adam"][2] - 1 / 3 > 5 * (z["sgd"][2] - 1 / 3), z


# --------------------------------------------------------------------------- resume
def _run(name, model, weighting, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        weighting.backward(model.losses(), list(model.shared.parameters()))
        opt.step()
        if name == "famo":
            with torch.no_grad():
                weighting.after_step(model.losses())


def test_resume_from_state_dict_is_bit_identical():
    for name, options in (("dwa", {"window": 3}), ("famo", {})):
        straight = Toy()
        w = losses.get_weighting(name)(TASKS, **options)
        opt = torch.optim.SGD(straight.parameters(), lr=0.05)
        _run(name, straight, w, opt, 14)

        first = Toy()
        w1 = losses.get_weighting(name)(TASKS, **options)
        opt1 = torch.optim.SGD(first.parameters(), lr=0.05)
        _run(name, first, w1, opt1, 7)                         # stop mid-window
        resumed = Toy()
        resumed.load_state_dict(first.state_dict())
        w2 = losses.get_weighting(name)(TASKS, **options)
        w2.load_state_dict(w1.state_dict())
        opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05)
        _run(name, resumed, w2, opt2, 7)

        for key, value in w.state_dict().items():
            assert torch.equal(value.nan_to_num(-1.0), w2.state_dict()[key].nan_to_num(-1.0)), \
                (name, key)
        for p, q in zip(straight.parameters(), resumed.parameters()):
            assert torch.equal(p, q), name


def test_options_are_validated():
    with pytest.raises(ValueError, match="window = 0"):
        losses.get_weighting("dwa")(TASKS, window=0)
    with pytest.raises(ValueError, match="'adamw'"):
        losses.get_weighting("famo")(TASKS, optimizer="adamw")
