"""Cross-stitch units (Misra et al. 2016) between private task columns."""
from __future__ import annotations

import pytest
import torch

from polytask.heads import MultiTaskObjective, SharingConfig, build_model
from heads_tiny import make_batch, three_tasks, tiny_config

SHARING = SharingConfig(strategy="soft", cross_stitch=True)


def stitched():
    return build_model(tiny_config(positions="relative"), three_tasks(), SHARING).double().eval()


def test_alpha_starts_at_the_papers_values_and_config_rejects_shared_plans():
    alpha = stitched().cross_stitch.encoder[0]
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.9, dtype=alpha.dtype))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3, dtype=alpha.dtype))
    with pytest.raises(ValueError, match="cross_stitch.*'hard'"):
        SharingConfig(strategy="hard", cross_stitch=True)


def test_identity_stitch_is_each_task_column_alone():
    model = stitched()
    with torch.no_grad():
        for alpha in (model.cross_stitch.encoder, model.cross_stitch.decoder):
            alpha.copy_(torch.eye(3).expand_as(alpha))
    batch = make_batch([0, 1, 2, 2, 0])
    for name, out in model(batch).tasks.items():
        column, rows = model.for_column(name), out.rows
        memory = column.encode(batch.src[rows], batch.src_mask[rows])
        ref = (model.head(name)(memory, batch.src_mask[rows]) if out.head == "classifier" else
               column.logits(column.decode(batch.tgt_in[rows], memory, batch.src_mask[rows],
                                           batch.tgt_mask[rows])))
        torch.testing.assert_close(out.logits, ref, atol=1e-9, rtol=0)


def test_a_tasks_loss_reaches_the_other_columns_through_alpha():
    model = stitched()
    batch = make_batch([0, 1, 2, 0])
    result = MultiTaskObjective(model.tasks, SHARING)(model, model(batch), batch)
    result.task_losses["gen"].backward()
    assert model.cross_stitch.encoder.grad.abs().sum() > 0
    other = model.for_column("cls").encoder.layers[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    assert {id(p) for p in model.cross_stitch.parameters()} <= {id(p) for p in model.shared_parameters()}


def test_task_view_matches_the_mixed_batch_and_decodes_incrementally():
    model = stitched()
    batch = make_batch([0, 2, 1, 0])
    mixed = model(batch)
    for name in ("gen", "rnk"):
        out, view = mixed.tasks[name], model.for_task(name)
        rows = out.rows
        memory = view.encode(batch.src[rows], batch.src_mask[rows])
        full = view.logits(view.decode(batch.tgt_in[rows], memory, batch.src_mask[rows],
                                       batch.tgt_mask[rows]))
        torch.testing.assert_close(full, out.logits, atol=1e-9, rtol=0)
    view = model.for_task("gen")
    memory = view.encode(batch.src, batch.src_mask)
    tgt = batch.tgt_in
    ones = torch.ones_like(tgt, dtype=torch.bool)
    full = view.logits(view.decode(tgt, memory, batch.src_mask, ones))
    cache = view.new_cache()
    steps = [view.logits(view.decode(tgt[:, i:i + 1], memory, batch.src_mask, ones[:, i:i + 1],
                                     cache)) for i in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-9, rtol=0)
    cls = mixed.tasks["cls"]
    pred = model.predict_class("cls", batch.src[cls.rows], batch.src_mask[cls.rows])
    assert torch.equal(pred, cls.logits.argmax(-1))
