"""The gradient-weighting methods the field compares, each checked against an outside reference.

1. torchjd (a test-only dependency; every test using it calls ``pytest.importorskip``): each
   aggregator it has is compared with ours on random ``(k, P)`` float64 matrices, several k and
   seeds. Where torchjd's definition differs, the comparable quantity is compared and the test
   says why (UPGrad's regularised Gramian, Frank-Wolfe's and Clarabel's stopping tolerances,
   Aligned-MTL's 1/k preferences, CAGrad's rescale).
2. Independent oracles transcribed from LibMTL's public code (``LibMTL/weighting/*.py``, cited at
   each oracle), run for several training steps of a toy network side by side with ours.
3. Properties the papers state (no conflicts -> PCGrad is the sum, UPGrad never conflicts, MGDA's
   KKT conditions, IMTL-G's equal projections, ...), seeds and resumption, and the reference
   path ``GradientWeighting.backward`` on a two-layer network with private heads.
"""
import copy
import inspect
import math

import pytest
import torch
from torch import nn

from polytask import losses
from polytask.losses.weighting import GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import min_norm_coefficients

f64 = torch.float64
NEW = ["mgda", "cagrad", "nash_mtl", "imtl", "gradvac", "graddrop", "rlw", "aligned_mtl",
       "upgrad", "db_mtl"]
GRADIENT_METHODS = ["mgda", "cagrad", "nash_mtl", "imtl", "gradvac", "graddrop", "aligned_mtl",
                    "upgrad", "db_mtl", "pcgrad", "gradnorm"]
CASES = [(k, seed) for k in (2, 3, 5) for seed in (0, 1, 2)]


def make(name, k, **options):
    return losses.get_weighting(name)([f"t{i}" for i in range(k)], **options)


def random_jacobian(k, seed, p=7):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(100 + seed), dtype=f64)


def task_grads(matrix, losses_=None):
    k = matrix.shape[0]
    param = torch.zeros(matrix.shape[1], dtype=f64)
    if losses_ is None:
        losses_ = torch.linspace(0.5, 2.0, k, dtype=f64)
    return TaskGradients([f"t{i}" for i in range(k)], matrix, [param], losses_)


def ours(name, matrix, losses_=None, **options):
    """``(update, weights)`` of a fresh weighting on one matrix."""
    return make(name, matrix.shape[0], **options).combine(task_grads(matrix, losses_))


@pytest.fixture
def tj():
    """torchjd's aggregation module; the whole reference section is skipped without it."""
    return pytest.importorskip("torchjd").aggregation


# --------------------------------------------------------------------------------- 1. torchjd

def test_upgrad_documented_example(tj):
    # torchjd documents [0.2929, 1.9004, 1.9004]; it solves on G / tr(G) + 1e-4 I. The exact
    # projections by hand: g1 + 22/38 g2 = (-0.5263, 1.5789, 1.5789), g2 + 22/18 g1 =
    # (1.1111, 2.2222, 2.2222); their mean is ours.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=f64)
    update, weights = ours("upgrad", J)
    exact = (J[0] + 22 / 38 * J[1] + J[1] + 22 / 18 * J[0]) / 2
    torch.testing.assert_close(update, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(update, torch.tensor([0.2924, 1.9006, 1.9006], dtype=f64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(update, tj.UPGrad()(J), rtol=0, atol=1e-3)
    assert weights.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("k, seed", CASES + [(6, 0), (6, 1)])  # k = 6 > P = 4: singular Gramian
def test_upgrad_matches_torchjd_without_regularisation(tj, k, seed):
    pytest.importorskip("quadprog")
    from torchjd.linalg import QuadprogProjector

    J = random_jacobian(k, seed, p=4 if k == 6 else 7)
    exact = tj.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12 if k == 6 else 0.0))
    torch.testing.assert_close(ours("upgrad", J)[0], exact(J), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k, seed", CASES)
def test_mgda_matches_torchjd_frank_wolfe(tj, k, seed):
    # The min-norm point x* is unique; for any x of the hull ||x - x*||^2 <= ||x||^2 - ||x*||^2.
    # Frank-Wolfe stops early, so compare through that inequality (k = 2: exact in one step).
    J = random_jacobian(k, seed)
    update, weights = ours("mgda", J)
    ref = tj.MGDA(epsilon=1e-10, max_iters=2000)(J)
    assert update.norm() <= ref.norm() + 1e-12
    assert (ref - update).pow(2).sum() <= ref.pow(2).sum() - update.pow(2).sum() + 1e-12
    # Frank-Wolfe's objective converges at rate O(1/t): within 1% of ours after 2000 steps
    assert ref.pow(2).sum() <= (1 + (1e-12 if k == 2 else 1e-2)) * update.pow(2).sum()
    torch.testing.assert_close(weights @ J, update)          # weights are the coefficients


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mgda_normalization_is_the_authors_gradient_normalizers(tj, normalization, seed):
    # isl-org/MultiObjectiveOptimization train_multi_task.py: divide g_i by gn_i, solve, then
    # train on sum_i sol_i L_i (raw losses): coefficients from the normalised rows, applied raw.
    J, L = random_jacobian(3, seed), torch.tensor([0.5, 2.0, 4.0], dtype=f64)
    norms = J.norm(dim=1)
    gn = {"l2": norms, "loss": L, "loss+": L * norms}[normalization]
    sol = tj.MGDAWeighting(epsilon=1e-12, max_iters=5000)((J / gn[:, None]) @ (J / gn[:, None]).T)
    update, weights = ours("mgda", J, L, normalization=normalization)
    torch.testing.assert_close(weights, sol, rtol=0, atol=1e-3)
    torch.testing.assert_close(update, weights @ J)
    scaled = J / gn[:, None]                                  # the inequality, on the scaled hull
    x, x_ref = weights @ scaled, sol @ scaled
    assert (x_ref - x).pow(2).sum() <= x_ref.pow(2).sum() - x.pow(2).sum() + 1e-12


def _cagrad_dual(gramian, w, c):
    k = len(w)
    g = gramian / gramian.trace()
    b = torch.full((k,), 1 / k, dtype=f64)
    return w @ g @ b + c * (b @ g @ b).sqrt() * (w @ g @ w).sqrt()


@pytest.mark.parametrize("c", [0.5, 0.2])
@pytest.mark.parametrize("k, seed", CASES)
def test_cagrad_matches_torchjd(tj, k, seed, c):
    # torchjd solves eq. 3 with cvxpy/Clarabel (tolerance ~1e-8 on the objective, so ~1e-4 on
    # w), and has no rescale: ours with rescale 0 equals it, rescale 1 is it / (1 + c^2).
    pytest.importorskip("cvxpy")
    J = random_jacobian(k, seed)
    G = J @ J.T
    ref = tj.CAGradWeighting(c=c)(G)
    plain = ours("cagrad", J, c=c, rescale=0)[0]
    assert (plain - ref @ J).norm() <= 1e-3 * plain.norm()
    update, weights = ours("cagrad", J, c=c)
    torch.testing.assert_close(update, plain / (1 + c ** 2))
    assert weights.tolist() == [1.0] * k
    # our dual solution is at least as good as Clarabel's (w = normalised weights - 1/k)
    w_ref = (ref - 1 / k) / (ref - 1 / k).sum()
    w_ours = torch.linalg.lstsq(J.T, plain.unsqueeze(1)).solution.squeeze(1) - 1 / k
    w_ours = w_ours / w_ours.sum()
    assert _cagrad_dual(G, w_ours, c) <= _cagrad_dual(G, w_ref, c) + 1e-12


@pytest.mark.parametrize("k, seed", CASES + [(4, 3)])
def test_imtl_g_matches_torchjd(tj, k, seed):
    J = random_jacobian(k, seed)
    if seed == 3:
        J[3] = J[0] + J[1]                                   # linearly dependent rows: pinv
    update, weights = ours("imtl", J, mode="g")
    torch.testing.assert_close(update, tj.IMTLG()(J), rtol=1e-9, atol=1e-10)
    assert weights.tolist() == [1.0] * k


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("k, seed", CASES)
def test_aligned_mtl_matches_torchjd(tj, k, seed, scale_mode):
    # torchjd's preference vector is 1/k (the mean); the authors' code and LibMTL sum (ones).
    J = random_jacobian(k, seed)
    update, _ = ours("aligned_mtl", J, scale_mode=scale_mode)
    torch.testing.assert_close(update / k, tj.AlignedMTL(scale_mode=scale_mode)(J),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("k, seed", CASES)
def test_pcgrad_matches_torchjd_same_random_order(tj, k, seed):
    # both draw torch.randperm(k) per task i; torchjd from the global generator
    mats = [random_jacobian(k, seed + 10 * s) for s in range(3)]
    w = make("pcgrad", k, seed=seed)
    torch.manual_seed(seed)
    for J in mats:                                            # three consecutive steps
        torch.testing.assert_close(w.combine(task_grads(J))[0], tj.PCGrad()(J),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("k, seed", CASES)
def test_graddrop_matches_torchjd_same_draws(tj, k, seed, leak):
    mats = [random_jacobian(k, seed + 10 * s, p=50) for s in range(3)]
    w = make("graddrop", k, leak=leak, seed=seed)
    ref = tj.GradDrop(leak=torch.full((k,), leak, dtype=f64))
    torch.manual_seed(seed)
    for J in mats:
        torch.testing.assert_close(w.combine(task_grads(J))[0], ref(J), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("k, seed", CASES)
def test_gradvac_matches_torchjd_over_steps(tj, k, seed, beta):
    mats = [random_jacobian(k, seed + 10 * s) for s in range(4)]
    mats[2] = -mats[1]            # a step of strong conflicts, so the corrections fire
    w = make("gradvac", k, beta=beta, seed=seed)
    ref = tj.GradVac(beta=beta)
    torch.manual_seed(seed)
    for J in mats:
        torch.testing.assert_close(w.combine(task_grads(J))[0], ref(J), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("k, seed", CASES)
def test_rlw_matches_torchjd_random(tj, k, seed):
    w = make("rlw", k, seed=seed)
    torch.manual_seed(seed)
    for s in range(3):
        J = random_jacobian(k, seed + 10 * s)
        expected = tj.Random()(J)              # softmax(randn(k)) @ J, the global generator
        _, used = w.objective({f"t{i}": torch.tensor(1.0, dtype=f64) for i in range(k)})
        torch.testing.assert_close(torch.tensor(list(used.values()), dtype=f64) @ J, expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")   # cvxpy: "problem is not DPP"
@pytest.mark.parametrize("k, seed", CASES)
def test_nash_mtl_matches_torchjd(tj, k, seed):
    # torchjd's is the authors' (and LibMTL's) cvxpy/ECOS sequence; both solve G a = 1/a.
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    J = random_jacobian(k, seed)
    ref = tj.NashMTL(n_tasks=k, max_norm=0.0)
    alpha_ref = ref.weighting(J)
    update, alpha = ours("nash_mtl", J, max_norm=0.0)
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(update, alpha @ J)
    clipped, _ = ours("nash_mtl", J, max_norm=0.5)          # the authors' norm clipping
    torch.testing.assert_close(clipped, tj.NashMTL(n_tasks=k, max_norm=0.5)(J),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nash_mtl_update_weights_every_matches_torchjd(tj):
    # Solves at steps 0 and 2, reuses alpha at 1 and 3. Each solve is compared with a fresh
    # torchjd solve: a warm-started torchjd (the authors' sequence) keeps its previous alpha when
    # the solution moves far, as it does at step 2 here (its ECOS step fails from that start).
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    schedule = tj.NashMTL(n_tasks=3, max_norm=0.0, update_weights_every=2)
    w = make("nash_mtl", 3, max_norm=0.0, update_weights_every=2)
    previous = None
    for s in range(4):
        J = random_jacobian(3, s)
        update, alpha = w.combine(task_grads(J))
        if s % 2 == 0:
            torch.testing.assert_close(alpha, tj.NashMTL(n_tasks=3, max_norm=0.0).weighting(J),
                                       rtol=1e-6, atol=0)
        else:
            assert torch.equal(alpha, previous)
        torch.testing.assert_close(update, alpha @ J)
        if s < 2:
            torch.testing.assert_close(update, schedule(J), rtol=1e-6, atol=1e-9)
        previous = alpha
    assert int(w.steps) == 4


# ------------------------------------------------------------ 2. oracles transcribed from LibMTL

class TwoLayer(nn.Module):
    """x (6, 3) -> z = tanh(x W^T + b) (6, 4), shared -> one linear head per task;
    L_i = mean (z h_i - y_i)^2 + 0.1 (positive, for the log-loss methods)."""

    def __init__(self, k=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, 3, generator=g, dtype=f64))
        self.b = nn.Parameter(torch.randn(4, generator=g, dtype=f64))
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.randn(4, generator=g, dtype=f64)) for _ in range(k)])
        self.x = torch.randn(6, 3, generator=g, dtype=f64)
        self.y = torch.randn(k, 6, generator=g, dtype=f64) * torch.arange(1, k + 1)[:, None]
        self.names = [f"t{i}" for i in range(k)]

    def shared(self):
        return [self.w, self.b]

    def representation(self):
        return torch.tanh(self.x @ self.w.T + self.b)

    def losses(self, z=None):
        z = self.representation() if z is None else z
        return {n: ((z @ h - y) ** 2).mean() + 0.1
                for n, h, y in zip(self.names, self.heads, self.y)}


def jacobian_of(model):
    """(k, P_shared) per-task gradients and (k, 4) each head's gradient of its own loss."""
    task_losses = model.losses()
    rows, heads = [], []
    for n, h in zip(model.names, model.heads):
        gw, gb, gh = torch.autograd.grad(task_losses[n], [model.w, model.b, h], retain_graph=True)
        rows.append(torch.cat([gw.reshape(-1), gb]))
        heads.append(gh)
    return torch.stack(rows), torch.stack(heads), torch.stack(list(task_losses.values())).detach()


def sgd(params, lr):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
            p.grad = None


def train_ours(weighting, model, steps=4, lr=0.1):
    for _ in range(steps):
        weighting.backward(model.losses(), model.shared())
        sgd(list(model.parameters()) + list(weighting.parameters()), lr)
    return model


def train_oracle(oracle, model, steps=4, lr=0.1):
    """``oracle(J, heads_grads, losses) -> (shared update, head weights)``, LibMTL-style."""
    for _ in range(steps):
        J, head_grads, task_losses = jacobian_of(model)
        update, weights = oracle(J, task_losses)
        model.w.grad = update[:12].reshape(4, 3).clone()
        model.b.grad = update[12:].clone()
        for h, g, wt in zip(model.heads, head_grads, weights):
            h.grad = wt * g
        sgd(model.parameters(), lr)
    return model


def assert_same_model(a, b, rtol=1e-9, atol=1e-12):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def orders(generator, k):
    """The visiting order GradVac uses (ours and torchjd's): randperm(k - 1) of the others."""
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        out.append([others[p] for p in torch.randperm(k - 1, generator=generator).tolist()])
    return out


class LibMTLGradVac:
    """LibMTL/weighting/GradVac.py, group_type 0 (whole model), on the flat gradients."""

    def __init__(self, k, beta, seed):
        self.rho, self.beta = torch.zeros(k, k, dtype=f64), beta
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, grads, task_losses):
        k = grads.shape[0]
        pc = grads.clone()
        for i, order in enumerate(orders(self.generator, k)):
            for j in order:
                rho = pc[i] @ grads[j] / (pc[i].norm() * grads[j].norm() + 1e-8)
                if rho < self.rho[i, j]:
                    t = self.rho[i, j]
                    w = pc[i].norm() * (t * (1 - rho ** 2).sqrt() - rho * (1 - t ** 2).sqrt()) / (
                        grads[j].norm() * (1 - t ** 2).sqrt() + 1e-8)
                    pc[i] = pc[i] + grads[j] * w
                self.rho[i, j] = (1 - self.beta) * self.rho[i, j] + self.beta * rho
        return pc.sum(0), torch.ones(k, dtype=f64)


class LibMTLDBMTL:
    """LibMTL/weighting/DB_MTL.py: EMA of the log-loss gradients, rescaled to the largest norm;
    the heads get the gradient of log(L + 1e-8)."""

    def __init__(self, k, p, beta, beta_sigma):
        self.step, self.beta, self.sigma = 0, beta, beta_sigma
        self.buffer = torch.zeros(k, p, dtype=f64)

    def __call__(self, grads, task_losses):
        self.step += 1
        batch = grads / (task_losses + 1e-8)[:, None]
        self.buffer = batch + (self.beta / self.step ** self.sigma) * (self.buffer - batch)
        u = self.buffer.norm(dim=-1)
        alpha = u.max() / (u + 1e-8)
        return sum(alpha[i] * self.buffer[i] for i in range(len(u))), 1 / (task_losses + 1e-8)


class LibMTLIMTL:
    """LibMTL/weighting/IMTL.py (hybrid): scaled losses e^s L - s; the paper's D/U closed form on
    the scaled gradients; heads get their scaled loss's gradient; s is trained by the same SGD."""

    def __init__(self, k, lr):
        self.s, self.lr = torch.zeros(k, dtype=f64), lr

    def __call__(self, grads, task_losses):
        scale = self.s.exp()
        g = grads * scale[:, None]
        unit = g / g.norm(dim=-1, keepdim=True)
        D = g[0:1] - g[1:]
        U = unit[0:1] - unit[1:]
        alpha = g[0] @ U.T @ torch.inverse(D @ U.T)
        alpha = torch.cat([1 - alpha.sum().unsqueeze(0), alpha])
        self.s = self.s - self.lr * (scale * task_losses - 1)
        return alpha @ g, scale


class LibMTLRLW:
    """LibMTL/weighting/RLW.py: softmax of a standard normal draw (float64, seeded)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, grads, task_losses):
        w = torch.softmax(torch.randn(len(task_losses), generator=self.generator, dtype=f64), -1)
        return w @ grads, w


def test_gradvac_against_libmtl_oracle_over_training_steps():
    for k, beta, seed in ((3, 0.5, 0), (4, 0.9, 1)):
        ours_model = train_ours(make("gradvac", k, beta=beta, seed=seed), TwoLayer(k, seed))
        oracle = LibMTLGradVac(k, beta, seed)
        ref_model = train_oracle(oracle, TwoLayer(k, seed))
        assert_same_model(ours_model, ref_model)
        assert bool((oracle.rho != 0).any())                  # the targets did move


@pytest.mark.parametrize("beta_sigma", [0.0, 0.5])
def test_db_mtl_against_libmtl_oracle_over_training_steps(beta_sigma):
    k = 3
    weighting = make("db_mtl", k, beta=0.9, beta_sigma=beta_sigma)
    ours_model = train_ours(weighting, TwoLayer(k, 2), steps=5)
    ref_model = train_oracle(LibMTLDBMTL(k, 16, 0.9, beta_sigma), TwoLayer(k, 2), steps=5)
    assert_same_model(ours_model, ref_model)
    assert weighting.steps.tolist() == [5, 5, 5]


def test_imtl_hybrid_against_libmtl_oracle_over_training_steps():
    k, lr = 3, 0.05
    weighting = make("imtl", k).double()
    ours_model = train_ours(weighting, TwoLayer(k, 3), steps=5, lr=lr)
    oracle = LibMTLIMTL(k, lr)
    ref_model = train_oracle(oracle, TwoLayer(k, 3), steps=5, lr=lr)
    assert_same_model(ours_model, ref_model)
    learned = torch.stack([s.detach() for s in weighting.log_scales])
    torch.testing.assert_close(learned, oracle.s, rtol=1e-9, atol=1e-12)
    assert bool((learned != 0).all())


def test_imtl_l_alone_is_the_scaled_loss_objective():
    # IMTL-L only: sum_i e^{s_i} L_i - s_i, the s_i trained with the model (LibMTL's scaled losses
    # with alpha = 1 everywhere).
    k, lr = 3, 0.05

    class Oracle(LibMTLIMTL):
        def __call__(self, grads, task_losses):
            scale = self.s.exp()
            self.s = self.s - self.lr * (scale * task_losses - 1)
            return scale @ grads, scale

    weighting = make("imtl", k, mode="l").double()
    ours_model = train_ours(weighting, TwoLayer(k, 4), steps=4, lr=lr)
    oracle = Oracle(k, lr)
    assert_same_model(ours_model, train_oracle(oracle, TwoLayer(k, 4), steps=4, lr=lr))
    torch.testing.assert_close(torch.stack([s.detach() for s in weighting.log_scales]), oracle.s)


def test_rlw_against_libmtl_oracle_over_training_steps():
    ours_model = train_ours(make("rlw", 3, seed=5), TwoLayer(3, 5))
    assert_same_model(ours_model, train_oracle(LibMTLRLW(5), TwoLayer(3, 5)))


def libmtl_cagrad(grads, calpha, rescale):
    """LibMTL/weighting/CAGrad.py (the authors' ``cagrad``): scipy's default SLSQP."""
    import numpy as np
    from scipy.optimize import minimize

    k = grads.shape[0]
    GG = grads @ grads.T
    g0_norm = (GG.mean() + 1e-8).sqrt()
    x_start = np.ones(k) / k
    A, b, c = GG.numpy(), x_start.copy(), (calpha * g0_norm + 1e-8).item()

    def objfn(x):
        return (x.reshape(1, -1).dot(A).dot(b.reshape(-1, 1))
                + c * np.sqrt(x.reshape(1, -1).dot(A).dot(x.reshape(-1, 1)) + 1e-8)).sum()

    res = minimize(objfn, x_start, bounds=tuple((0, 1) for _ in x_start),
                   constraints=({"type": "eq", "fun": lambda x: 1 - sum(x)}))
    ww = torch.tensor(res.x, dtype=f64)
    gw = ww @ grads
    g = grads.mean(0) + c / (gw.norm() + 1e-8) * gw
    return g / (1, 1 + calpha ** 2, 1 + calpha)[rescale], ww


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("k, seed", [(2, 0), (3, 1), (5, 2)])
def test_cagrad_against_libmtl_oracle(k, seed, rescale):
    # LibMTL's SLSQP runs with the default tolerance (1e-6 on the objective): compare loosely,
    # and check that our dual objective is no worse than its.
    J = random_jacobian(k, seed)
    expected, w_ref = libmtl_cagrad(J, 0.5, rescale)
    update, _ = ours("cagrad", J, c=0.5, rescale=rescale)
    assert (update - expected).norm() <= 5e-3 * expected.norm()
    plain = ours("cagrad", J, c=0.5, rescale=0)[0]
    w_ours = torch.linalg.lstsq(J.T, plain.unsqueeze(1)).solution.squeeze(1) - 1 / k
    assert _cagrad_dual(J @ J.T, w_ours / w_ours.sum(), 0.5) <= _cagrad_dual(J @ J.T, w_ref, 0.5) \
        + 1e-12


@pytest.mark.parametrize("k, seed", CASES)
def test_aligned_mtl_against_libmtl_oracle(k, seed):
    # LibMTL/weighting/Aligned_MTL.py: B = sqrt(lambda_min) V Lambda^-1/2 V^T, alpha = B.sum(0)
    J = random_jacobian(k, seed)
    M = J @ J.T
    lmbda, V = torch.linalg.eigh(M)
    rank = int((lmbda > lmbda.max() * k * torch.finfo(f64).eps).sum())
    order = torch.argsort(lmbda, descending=True)
    lmbda, V = lmbda[order][:rank], V[:, order][:, :rank]
    B = lmbda[-1].sqrt() * ((V @ torch.diag(1 / lmbda.sqrt())) @ V.T)
    update, weights = ours("aligned_mtl", J)
    torch.testing.assert_close(update, B.sum(0) @ J, rtol=1e-9, atol=1e-10)
    assert weights.tolist() == [1.0] * k


# --------------------------------------------------------------------- 3. properties from papers

def test_pcgrad_is_the_plain_sum_without_conflicts():
    for seed in range(4):
        J = random_jacobian(4, seed).abs()                    # every pairwise dot product > 0
        update, weights = ours("pcgrad", J, seed=seed)
        torch.testing.assert_close(update, J.sum(0))
        assert weights.tolist() == [1.0] * 4


@pytest.mark.parametrize("k, p", [(2, 3), (3, 7), (5, 7), (6, 4), (8, 3)])
def test_upgrad_never_conflicts_with_any_task(k, p):
    for seed in range(3):
        J = random_jacobian(k, seed, p)
        update, _ = ours("upgrad", J)
        assert bool((J @ update >= -1e-12 * J.norm() ** 2).all()), (J @ update)


@pytest.mark.parametrize("k, seed", CASES + [(7, 0)])
def test_mgda_is_the_min_norm_point_kkt(k, seed):
    J = random_jacobian(k, seed, p=5)                         # k = 7 > P = 5 too
    G = J @ J.T
    c = min_norm_coefficients(G)
    assert bool((c >= 0).all()) and abs(float(c.sum()) - 1) < 1e-12
    slack = G @ c - c @ G @ c                # KKT: >= 0 everywhere, = 0 where c_i > 0
    scale = float(G.diagonal().max())
    assert bool((slack >= -1e-10 * scale).all())
    assert bool((slack[c > 1e-9].abs() <= 1e-10 * scale).all())


def test_mgda_gives_less_weight_to_the_task_whose_gradient_is_scaled_up():
    for k, seed in ((2, 0), (3, 1), (4, 2)):
        J = random_jacobian(k, seed, p=k + 3)
        _, before = ours("mgda", J)
        scaled = J.clone()
        scaled[0] *= 3.0
        _, after = ours("mgda", scaled)
        assert after[0] < before[0], (before, after)


def test_imtl_g_update_has_equal_projections_on_every_task():
    for k, seed in CASES:
        J = random_jacobian(k, seed)
        update, _ = ours("imtl", J, mode="g")
        projections = J @ update / J.norm(dim=1)
        torch.testing.assert_close(projections, projections.mean().expand(k))
        # hybrid: the loss scales change the magnitude, never the direction (scale invariance)
        w = make("imtl", k).double()
        with torch.no_grad():
            for i, s in enumerate(w.log_scales):
                s.fill_(0.3 * i - 0.2)
        hybrid, _ = w.combine(task_grads(J))
        torch.testing.assert_close(hybrid / hybrid.norm(), update / update.norm())


def test_cagrad_update_lies_on_the_ball_around_the_mean_gradient():
    for c in (0.0, 0.4, 1.0):
        for k, seed in CASES:
            J = random_jacobian(k, seed)
            d, _ = ours("cagrad", J, c=c, rescale=0)
            g0 = J.mean(0)
            torch.testing.assert_close((d - g0).norm(), c * g0.norm(), rtol=1e-6, atol=1e-12)


def test_aligned_mtl_rows_are_orthogonal_with_equal_norms():
    for k, seed in CASES:
        J = random_jacobian(k, seed)
        from polytask.losses.weighting.aligned_mtl import balance_transformation
        aligned = balance_transformation(J @ J.T) @ J         # B is symmetric: rows B_i J
        lmin = torch.linalg.eigvalsh(J @ J.T).min()
        torch.testing.assert_close(aligned @ aligned.T, lmin * torch.eye(k, dtype=f64))


def test_nash_mtl_solves_the_bargaining_equation_and_keeps_alpha_when_it_cannot():
    for k, seed in CASES:
        J = random_jacobian(k, seed)
        _, alpha = ours("nash_mtl", J, max_norm=0.0)
        torch.testing.assert_close(alpha * (J @ J.T @ alpha), torch.ones(k, dtype=f64))
    w = make("nash_mtl", 2, max_norm=0.0)
    g = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=f64)   # 0 in the hull: no solution
    update, alpha = w.combine(task_grads(g))
    assert alpha.tolist() == [1.0, 1.0] and update.abs().max() == 0      # ones at first
    J = random_jacobian(2, 0, p=2)
    _, solved = w.combine(task_grads(J))
    _, kept = w.combine(task_grads(g))
    torch.testing.assert_close(kept, solved)                  # the previous alpha is kept


def test_db_mtl_is_invariant_to_loss_scale():
    # log L: multiplying a task's loss by a constant leaves the whole update unchanged
    J = random_jacobian(3, 0)
    L = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    update, weights = ours("db_mtl", J, L, eps=0.0)
    factor = torch.tensor([10.0, 1.0, 0.1], dtype=f64)[:, None]
    scaled, scaled_weights = ours("db_mtl", J * factor, L * factor[:, 0], eps=0.0)
    torch.testing.assert_close(scaled, update)
    torch.testing.assert_close(scaled_weights, weights / factor[:, 0])


# ------------------------------------------------------------- seeds, state, partial steps

STATEFUL = {"pcgrad": {}, "graddrop": {}, "gradvac": {}, "nash_mtl": {"update_weights_every": 2},
            "db_mtl": {}, "gradnorm": {}}


def _combine_steps(weighting, mats, names=None):
    out = []
    for J in mats:
        grads = task_grads(J)
        if names is not None:
            grads = TaskGradients(names, J, grads.params, grads.losses)
        out.append(weighting.combine(grads)[0])
    return out


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_seeded_and_resumable_from_state_dict(name):
    mats = [random_jacobian(3, s, p=9) for s in range(5)]
    a = make(name, 3, **STATEFUL[name])
    b = make(name, 3, **STATEFUL[name])
    assert all(torch.equal(x, y) for x, y in zip(_combine_steps(a, mats), _combine_steps(b, mats)))
    run = make(name, 3, **STATEFUL[name])
    _combine_steps(run, mats[:2])
    saved = copy.deepcopy(run.state_dict())
    resumed = make(name, 3, **STATEFUL[name])
    resumed.load_state_dict(saved)
    rest = _combine_steps(run, mats[2:])
    assert all(torch.equal(x, y) for x, y in zip(rest, _combine_steps(resumed, mats[2:])))
    fresh = make(name, 3, **STATEFUL[name])
    if name in ("pcgrad", "graddrop", "gradvac"):   # the draws differ without the saved state
        assert not all(torch.equal(x, y) for x, y in zip(rest, _combine_steps(fresh, mats[2:])))


def test_rlw_seeded_and_resumable_and_partial():
    task_losses = {f"t{i}": torch.tensor(float(i + 1), dtype=f64) for i in range(3)}
    a, b = make("rlw", 3, seed=4), make("rlw", 3, seed=4)
    assert [a.objective(task_losses)[1] for _ in range(2)] == \
        [b.objective(task_losses)[1] for _ in range(2)]
    resumed = make("rlw", 3)
    resumed.load_state_dict(copy.deepcopy(a.state_dict()))
    assert a.objective(task_losses)[1] == resumed.objective(task_losses)[1]
    assert make("rlw", 3, seed=5).objective(task_losses)[1] != make("rlw", 3, seed=4).objective(
        task_losses)[1]
    _, used = a.objective({"t2": task_losses["t2"], "t0": task_losses["t0"]})
    assert set(used) == {"t0", "t2"} and math.isclose(sum(used.values()), 1.0)


def test_partial_steps_leave_absent_tasks_state_alone():
    J3 = random_jacobian(3, 0)
    for name, key in (("gradvac", "targets"), ("db_mtl", "momentum"), ("nash_mtl", "alpha")):
        w = make(name, 3)
        w.combine(task_grads(J3))
        before = getattr(w, key).clone()
        w.combine(TaskGradients(["t0", "t2"], J3[[0, 2]], [torch.zeros(7)],
                                torch.ones(2, dtype=f64)))
        after = getattr(w, key)
        if name == "gradvac":                  # pairs with t1 untouched
            assert torch.equal(after[1], before[1]) and torch.equal(after[:, 1], before[:, 1])
            assert not torch.equal(after, before)
        else:
            assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])
    imtl = make("imtl", 3)
    imtl.combine(TaskGradients(["t1"], J3[1:2], [torch.zeros(7)], torch.ones(1, dtype=f64)))
    assert [s.grad is None for s in imtl.log_scales] == [True, False, True]


def test_db_mtl_state_dict_restores_the_lazily_sized_ema():
    w = make("db_mtl", 2)
    w.combine(task_grads(random_jacobian(2, 0)))
    restored = make("db_mtl", 2)
    restored.load_state_dict(w.state_dict())
    assert torch.equal(restored.momentum, w.momentum) and restored.momentum.dtype == f64
    with pytest.raises(ValueError, match="from 7 to 5"):
        w.combine(task_grads(random_jacobian(2, 0, p=5)))


# ------------------------------------------------- the reference path on a two-layer network

@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_reference_backward_on_two_layer_network(name):
    """Shared parameters get the method's update, private heads sum_i w_i grad L_i with the
    weights it reports; the update is what ``combine`` gives on independently formed gradients."""
    model = TwoLayer(3, 7)
    weighting = make(name, 3).double()
    twin = copy.deepcopy(weighting)
    J, head_grads, task_losses = jacobian_of(model)
    used = weighting.backward(model.losses(), model.shared())
    update, weights = twin.combine(TaskGradients(model.names, J, model.shared(), task_losses))
    assert list(used) == model.names
    torch.testing.assert_close(torch.tensor(list(used.values()), dtype=f64), weights.to(f64))
    torch.testing.assert_close(torch.cat([model.w.grad.reshape(-1), model.b.grad]), update,
                               rtol=1e-7, atol=1e-10)
    for h, g, w in zip(model.heads, head_grads, weights):
        torch.testing.assert_close(h.grad, w * g)
    for key, value in weighting.state_dict().items():          # same state after both paths
        if torch.is_tensor(value):
            torch.testing.assert_close(value, twin.state_dict()[key], equal_nan=True)


@pytest.mark.parametrize("name", ["rlw", "imtl"])
def test_objective_style_paths_on_two_layer_network(name):
    model = TwoLayer(3, 8)
    options = {"mode": "l"} if name == "imtl" else {}
    weighting = make(name, 3, **options).double()
    J, head_grads, _ = jacobian_of(model)
    used = weighting.backward(model.losses(), model.shared())
    w = torch.tensor(list(used.values()), dtype=f64)
    torch.testing.assert_close(torch.cat([model.w.grad.reshape(-1), model.b.grad]), w @ J)
    for h, g, wi in zip(model.heads, head_grads, w):
        torch.testing.assert_close(h.grad, wi * g)


def test_gradnorm_own_backward_equals_the_generic_reference_path():
    model_a, model_b = TwoLayer(3, 9), TwoLayer(3, 9)
    a, b = make("gradnorm", 3, lr=0.1), make("gradnorm", 3, lr=0.1)
    for _ in range(3):
        ua = a.backward(model_a.losses(), model_a.shared(), last_shared=[model_a.w])
        ub = GradientWeighting.backward(b, model_b.losses(), model_b.shared(),
                                        last_shared=[model_b.w])
        assert ua == pytest.approx(ub, rel=1e-12)
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        sgd(model_a.parameters(), 0.1)
        sgd(model_b.parameters(), 0.1)
    torch.testing.assert_close(a.task_weights, b.task_weights, rtol=1e-12, atol=0)
    assert not torch.allclose(a.task_weights, torch.ones(3, dtype=f64))


def test_mgda_ub_weights_from_the_representation():
    # MGDA-UB (Sec. 3.3): gradients w.r.t. z = tanh(x W^T + b), whole tensor flattened as the
    # authors' rep_variable.grad; two tasks: the closed form of the min-norm point on a segment.
    model = TwoLayer(2, 10)
    z = model.representation()
    task_losses = model.losses(z)
    weights = make("mgda", 2).representation_weights(task_losses, z)
    g1, g2 = (torch.autograd.grad(task_losses[n], z, retain_graph=True)[0].reshape(-1)
              for n in model.names)
    c1 = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
    assert weights == pytest.approx({"t0": c1, "t1": 1 - c1}, rel=1e-9)
    assert model.w.grad is None                              # nothing backpropagated


# ------------------------------------------------------------------- construction and interface

@pytest.mark.parametrize("name", NEW)
def test_explicit_keyword_options_and_interface(name):
    cls = losses.get_weighting(name)
    params = inspect.signature(cls).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert params["gradient_reducer"].kind is inspect.Parameter.KEYWORD_ONLY
    assert (name == "rlw") != issubclass(cls, GradientWeighting)
    model = TwoLayer(2, 11)
    weighting = cls(model.names).double()
    with pytest.raises(ValueError, match="unknown tasks \\['c'\\]"):
        weighting.backward({"c": model.losses()["t0"]}, model.shared())
    assert weighting.backward({}, model.shared()) == {}
    extra = 5 * model.w.sum()                                 # added unweighted, unprojected
    used = weighting.backward({"t1": model.losses()["t1"]}, model.shared(), extra=extra)
    assert set(used) == {"t1"} and model.heads[0].grad is None


@pytest.mark.parametrize("name, options, message", [
    ("mgda", {"normalization": "l1"}, "none, l2, loss, loss\\+; got 'l1'"),
    ("cagrad", {"c": -1.0}, "c must be >= 0, got -1.0"),
    ("cagrad", {"rescale": 3}, "rescale must be 0, 1 or 2, got 3"),
    ("nash_mtl", {"max_norm": -1.0}, "max_norm must be >= 0"),
    ("nash_mtl", {"update_weights_every": 0}, "integer >= 1, got 0"),
    ("imtl", {"mode": "gl"}, "hybrid, g, l; got 'gl'"),
    ("gradvac", {"beta": 1.5}, "beta=1.5"),
    ("graddrop", {"leak": 2.0}, "leak must be in \\[0, 1\\], got 2.0"),
    ("aligned_mtl", {"scale_mode": "max"}, "min, median, rmse; got 'max'"),
    ("db_mtl", {"beta": 1.0}, "beta=1.0"),
])
def test_bad_options_raise_one_line_value_errors(name, options, message):
    with pytest.raises(ValueError, match=message) as info:
        make(name, 2, **options)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_gradient_reducer_is_applied_before_every_gradient_method():
    calls = []

    def double(grads):
        calls.append(tuple(grads.shape))
        return 2 * grads

    for name in GRADIENT_METHODS:
        model = TwoLayer(3, 12)
        make(name, 3, gradient_reducer=double).double().backward(model.losses(), model.shared())
    # GradNorm's own backward takes the gradients on W only (default: the last shared tensor, b)
    assert calls.count((3, 16)) == len(GRADIENT_METHODS) - 1 and calls.count((3, 4)) == 1


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_float32_single_task_and_zero_gradients_stay_finite(name):
    # the engine hands over float32 gradients, possibly under no_grad; a step may hold one task,
    # and every gradient may vanish (a converged or dead batch)
    for matrix in (torch.randn(1, 6), torch.randn(3, 6), torch.zeros(3, 6)):
        k = matrix.shape[0]
        with torch.no_grad():
            update, weights = make(name, k).combine(task_grads(matrix))
        assert update.dtype == torch.float32 and update.shape == (6,) and weights.shape == (k,)
        assert bool(torch.isfinite(update).all()) and bool(torch.isfinite(weights).all())
        if not matrix.any():
            assert not update.any()


def test_only_imtl_l_scales_are_optimizer_parameters():
    assert len(list(make("imtl", 3).parameters())) == 3
    assert len(list(make("imtl", 3, mode="l").parameters())) == 3
    assert len(list(make("imtl", 3, mode="g").parameters())) == 0
    for name in set(NEW) - {"imtl"}:
        assert len(list(make(name, 3).parameters())) == 0, name


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_on_the_gramian_equals_pcgrad_on_the_vectors(k, seed):
    """PCGrad's weighting runs on the Gramian (k^2 numbers); the vector form is the paper's
    Algorithm 1. Same generator state, same update; a zero gradient row included."""
    from polytask.losses.weighting.pcgrad import pcgrad_coefficients, project_conflicting
    g = torch.randn(k, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g[-1] = 0.0 if seed == 2 else g[-1]
    c = pcgrad_coefficients(g @ g.T, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(c @ g, project_conflicting(g, torch.Generator().manual_seed(seed)),
                               rtol=1e-10, atol=1e-12)
    # where two gradients conflict, some projection acted (c is not all ones)
    assert bool(((g @ g.T) < 0).any()) == (not torch.allclose(c, torch.ones_like(c)))
