"""From outputs to per-task losses: targets per head kind, partial labels, extras."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytask import losses

from polytask.core.data.batch import IGNORE_INDEX
from polytask.heads import MultiTaskObjective, SharingConfig, build_model
from heads_tiny import make_batch, three_tasks, tiny_config


def setup(task_ids):
    sharing = SharingConfig(strategy="hard")
    model = build_model(tiny_config(), three_tasks(), sharing).double()
    return model, MultiTaskObjective(model.tasks, sharing), make_batch(task_ids)


def test_each_task_uses_its_targets_and_its_registered_loss():
    model, objective, batch = setup([0, 1, 2, 1, 0, 2])
    out = model(batch)
    result = objective(model, out, batch)
    assert set(result.task_losses) == {"gen", "cls", "rnk"}
    cls = out.tasks["cls"]
    torch.testing.assert_close(result.task_losses["cls"],
                               F.cross_entropy(cls.logits, batch.class_ids[cls.rows]))
    for name in ("gen", "rnk"):  # lm and rank heads: token-level NLL of batch.labels
        o = out.tasks[name]
        ref = F.cross_entropy(o.logits.flatten(0, 1), batch.labels[o.rows].flatten(),
                              ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(result.task_losses[name], ref)
    assert result.extra == {}
    total = sum(w * result.task_losses[n] for n, w in {"gen": 1.0, "cls": 2.0, "rnk": 0.5}.items())
    torch.testing.assert_close(result.total({"cls": 2.0, "rnk": 0.5}), total)


def test_unlabelled_rows_give_no_loss_and_no_gradient():
    model, objective, batch = setup([1, 1, 1, 0, 0])
    batch.class_ids[1] = IGNORE_INDEX          # partial labels: row 1 has none
    batch.labels[4] = IGNORE_INDEX             # a generation row without a target
    out = model(batch)
    cls, gen = out.tasks["cls"], out.tasks["gen"]
    cls.logits.retain_grad()
    gen.hidden.retain_grad()   # the generative loss works from the decoder states
    result = objective(model, out, batch)
    sum(result.task_losses.values()).backward()
    assert cls.logits.grad[cls.rows.tolist().index(1)].abs().sum() == 0
    assert cls.logits.grad[cls.rows.tolist().index(0)].abs().sum() > 0
    assert gen.hidden.grad[gen.rows.tolist().index(4)].abs().sum() == 0
    assert gen.hidden.grad[gen.rows.tolist().index(3)].abs().sum() > 0
    labelled = cls.rows != 1
    torch.testing.assert_close(result.task_losses["cls"], F.cross_entropy(
        cls.logits[labelled], batch.class_ids[cls.rows][labelled]))


def test_a_task_without_labelled_rows_contributes_nothing():
    model, objective, batch = setup([0, 1, 0])
    batch.labels[[0, 2]] = IGNORE_INDEX
    result = objective(model, model(batch), batch)
    assert set(result.task_losses) == {"cls"}       # gen has rows but no labels; rnk no rows
    assert "loss/gen" not in result.logs


def test_loss_options_reach_the_losses_and_unknown_tasks_are_rejected():
    model, _, batch = setup([1, 1, 1])
    smooth = MultiTaskObjective(model.tasks, SharingConfig(), {"cls": {"label_smoothing": 0.2}})
    out = model(batch)
    o = out.tasks["cls"]
    torch.testing.assert_close(smooth(model, out, batch).task_losses["cls"],
                               F.cross_entropy(o.logits, batch.class_ids, label_smoothing=0.2))
    with pytest.raises(ValueError, match="unknown tasks \\['nope'\\]"):
        MultiTaskObjective(model.tasks, SharingConfig(), {"nope": {}})


def test_weighting_backward_on_the_objective_equals_the_plain_total():
    """The training loop's call: a static weighting over task_losses plus extra_total()."""
    sharing = SharingConfig(strategy="hierarchical", shared_layers=1, group_layers=0,
                            adversarial=True, orthogonality_weight=0.01)
    model = build_model(tiny_config(), three_tasks(), sharing).double()
    batch = make_batch([0, 1, 2, 1])
    objective = MultiTaskObjective(model.tasks, sharing)
    weights = {"gen": 1.0, "cls": 0.5, "rnk": 2.0}
    weighting = losses.get_weighting("static")([t.name for t in model.tasks], weights=weights)
    result = objective(model, model(batch), batch)
    assert set(result.extra) == {"adversarial", "orthogonality"}
    used = weighting.backward(result.task_losses, model.shared_parameters(),
                              extra=result.extra_total(), last_shared=model.last_shared_parameters())
    assert used == weights
    via_weighting = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    objective(model, model(batch), batch).total(weights).backward()
    for a, p in zip(via_weighting, model.parameters()):  # None: unused (cls's private decoder)
        assert (a is None) == (p.grad is None)
        if a is not None:
            torch.testing.assert_close(a, p.grad)
    layer0 = {id(p) for p in model.for_task("gen").encoder.layers[0].parameters()}
    assert {id(p) for p in model.last_shared_parameters()} == layer0
