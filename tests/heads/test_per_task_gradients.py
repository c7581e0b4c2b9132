"""One-pass per-task gradients (:mod:`polytask.losses.weighting.engine`) against the reference:
k ``autograd.grad`` calls on the joint graph of the mixed batch, in float64 (rtol 1e-10), for
every parameter kind the backbone has (embeddings, linear layers, norms, relative position
bias), every sharing strategy with shared parameters, cross-stitch units, LoRA and adapters,
rows with padding, and a task absent from the batch."""
from __future__ import annotations

import pytest
import torch

from polytask.core.peft import apply_peft
from polytask.heads import MultiTaskObjective, SharingConfig, build_model
from polytask.losses.weighting.base import GradientWeighting, task_gradients
from polytask.losses.weighting.engine import conflicts, split_backward
from heads_tiny import make_batch, three_tasks, tiny_config

NAMES = [t.name for t in three_tasks()]

CASES = {
    "hard": (SharingConfig(strategy="hard"), None),
    "hierarchical": (SharingConfig(strategy="hierarchical"), None),
    "soft": (SharingConfig(strategy="soft", soft_weight=0.5), None),
    "cross_stitch": (SharingConfig(strategy="soft", cross_stitch=True), None),
    "lora": (SharingConfig(strategy="hard"), {"method": "lora", "r": 2}),
    "adapter": (SharingConfig(strategy="hard"), {"method": "adapter"}),
}


def _model(case: str, device: str = "cpu", dtype=torch.float64):
    sharing, peft = CASES[case]
    torch.manual_seed(0)
    model = build_model(tiny_config(positions="relative", norm="rmsnorm"), three_tasks(), sharing)
    if peft:
        apply_peft(model, **peft)
    for p in model.parameters():   # move every weight off its initial value (LoRA B is zero)
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype).train(), MultiTaskObjective(three_tasks(), sharing)


def _shared_private(model):
    """The shared parameters, or every trainable one where the plan shares none (soft sharing,
    cross-stitch: the per-task gradients on every column are then checked)."""
    shared = [p for p in model.shared_parameters() if p.requires_grad] or \
        [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in shared}
    private = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return shared, private


def _reference(model, objective, batch, params):
    losses = objective(model, model(batch), batch).task_losses
    grads = task_gradients(losses, params)
    return losses, torch.stack([grads[n] for n in NAMES if n in losses])


def _one_pass(model, objective, batch, shared, private):
    def closure(i, name):
        def run():
            sub = batch.select((batch.task_ids == i).nonzero().flatten()).trimmed()
            return objective(model, model(sub), sub).task_losses.get(name)
        return run
    present = {n: closure(i, n) for i, n in enumerate(NAMES) if bool((batch.task_ids == i).any())}
    return split_backward(present, shared, private)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("task_ids", [[0, 1, 2, 2, 0, 1], [2, 0, 0, 2]], ids=["all", "absent"])
def test_one_pass_equals_k_autograd_calls(case, task_ids):
    model, objective = _model(case)
    batch = make_batch(task_ids)
    shared, private = _shared_private(model)
    assert shared, case
    losses, expected = _reference(model, objective, batch, shared)
    split = _one_pass(model, objective, batch, shared, private)
    assert split.task.names == [n for n in NAMES if n in losses]
    torch.testing.assert_close(split.task.losses, torch.stack(
        [losses[n].detach() for n in split.task.names]), rtol=1e-10, atol=0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(split.task.matrix, expected, rtol=1e-10, atol=1e-13)
    # the private parameters: each task's gradient on them, against the reference too
    for i, name in enumerate(split.task.names if private else []):
        ref = torch.autograd.grad(objective(model, model(batch), batch).task_losses[name],
                                  private, allow_unused=True)
        for got, want in zip(split.private_grads[i], ref):
            if want is None or not bool(want.any()):
                assert got is None or not bool(got.any())
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


class _Fixed(GradientWeighting):
    """A gradient weighting with fixed coefficients and a non-trivial update (half the plain
    sum plus the first task's gradient again), to check how updates and weights are applied."""

    def combine(self, grads):
        w = torch.linspace(0.5, 1.5, len(grads.names), dtype=grads.matrix.dtype)
        return w @ grads.matrix + grads.matrix[0], w


@pytest.mark.parametrize("case", ["hard", "cross_stitch", "lora"])
def test_engine_step_equals_reference_backward(case):
    """The same weighting through ``backward`` (the joint graph) and through the engine leaves
    the same ``.grad`` on every parameter, shared and private, plus the soft penalty."""
    batch = make_batch([0, 1, 2, 2, 0, 1], seed=3)
    grads = []
    for path in ("reference", "engine"):
        model, objective = _model(case)
        weighting = _Fixed(NAMES)
        shared, private = _shared_private(model)
        if path == "reference":
            result = objective(model, model(batch), batch)
            weighting.backward(result.task_losses, shared, extra=result.extra_total())
        else:
            split = _one_pass(model, objective, batch, shared, private)
            split.apply(*weighting.combine(split.task))
            extra = objective(model, model(batch.select(torch.tensor([0]))),
                              batch.select(torch.tensor([0]))).extra_total()
            if extra is not None:
                extra.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for ref, got in zip(*grads):
        if ref is None:
            assert got is None or not bool(got.any())
        else:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_non_finite_loss_accumulates_nothing():
    model, objective = _model("hard")
    shared, private = _shared_private(model)
    calls = {"gen": lambda: objective(model, model(make_batch([0])), make_batch([0]))
             .task_losses["gen"], "cls": lambda: torch.tensor(float("nan"), requires_grad=True)}
    assert split_backward(calls, shared, private) is None
    assert all(p.grad is None for p in model.parameters())


def test_conflicts_diagnostics():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    out = conflicts(g, ["a", "b", "c", "d"])
    cos = torch.tensor(out["cosine"])
    torch.testing.assert_close(cos[0, 1], torch.tensor(-2 ** -0.5, dtype=cos.dtype), atol=1e-6,
                               rtol=0)
    assert cos[0, 2] == 0 and cos[3, 0] == 0 and cos[1, 2] > 0
    assert out["conflict_fraction"] == pytest.approx(1 / 6)   # only (a, b) of the 6 pairs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_pass_equals_k_autograd_calls_cuda():
    model, objective = _model("hard", device="cuda", dtype=torch.float32)
    batch = make_batch([0, 1, 2, 2, 0, 1]).to("cuda")
    shared, private = _shared_private(model)
    _, expected = _reference(model, objective, batch, shared)
    split = _one_pass(model, objective, batch, shared, private)
    torch.testing.assert_close(split.task.matrix, expected, rtol=1e-4, atol=1e-6)


def test_a_task_that_reaches_only_frozen_parameters_gives_zeros():
    """With the classifier head and the encoder frozen, the classifier task's loss has no graph
    to the trainable parameters: its row is zero (``autograd.grad`` would raise)."""
    model, objective = _model("hard")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("slots.decoder") or "decoder" in name)
    shared, private = _shared_private(model)
    batch = make_batch([0, 1, 2, 1])
    split = _one_pass(model, objective, batch, shared, private)
    row = split.task.names.index("cls")
    assert not split.task.matrix[row].any() and split.task.matrix.abs().sum() > 0
