"""Parameter sharing: module identity, ownership, gradient isolation, mixed batches, soft copies."""
from __future__ import annotations

import pytest
import torch

from polytask.heads import MultiTaskObjective, SharingConfig, build_model
from polytask.heads.build import copies_equal
from polytask.heads.slots import get_slot
from heads_tiny import make_batch, three_tasks, tiny_config

PLANS = {
    "none": SharingConfig(strategy="none"),
    "hard": SharingConfig(strategy="hard"),
    "soft": SharingConfig(strategy="soft"),
    # 3 layers: shared / group / private in each stack
    "hierarchical": SharingConfig(strategy="hierarchical", shared_layers=1, group_layers=1),
}
CONFIG = dict(n_encoder_layers=3, n_decoder_layers=3)


def build(name: str, **config):
    layers = CONFIG if name == "hierarchical" else {}  # 2 layers suffice for the others
    return build_model(tiny_config(**{**layers, **config}), three_tasks(), PLANS[name])


def slot_module(model, task: str, slot: str):
    view = model.for_task(task)
    return view.embed_tokens if slot == "embedding" else get_slot(view, slot)


@pytest.mark.parametrize("strategy", list(PLANS))
def test_shared_slots_are_one_module_object(strategy):
    model = build(strategy)
    names = [t.name for t in model.tasks]
    for slot in model.plan.slots:
        for a in names:
            for b in names:
                same_group = model.plan.group_index(slot, a) == model.plan.group_index(slot, b)
                assert (slot_module(model, a, slot) is slot_module(model, b, slot)) == same_group, \
                    (strategy, slot, a, b)
    # a tied LM head stays tied inside every view that has one (a classifier task's may not)
    for n in names:
        view = model.for_task(n)
        if model.uses(n, "lm_head") or hasattr(view.lm_head, "weight"):
            assert view.lm_head.weight is view.embed_tokens.weight


@pytest.mark.parametrize("strategy", list(PLANS))
def test_shared_and_task_parameters_partition_the_model(strategy):
    model = build(strategy)
    names = [t.name for t in model.tasks]
    shared = {id(p) for p in model.shared_parameters()}
    owned = {n: {id(p) for p in model.task_parameters(n)} for n in names}
    everything = {id(p) for p in model.parameters()}
    parts = [shared] + list(owned.values())
    assert sum(len(p) for p in parts) == len(set().union(*parts))          # disjoint
    assert set().union(*parts) == everything                               # and complete
    for n in names:  # what a task uses = the shared modules of its groups + what it owns
        uses = {id(p) for p in model.parameters_of(n)}
        assert owned[n] <= uses and uses <= owned[n] | shared
        view = model.for_task(n)
        runs = {id(p) for p in view.parameters()}
        if model.tasks[model.task_index[n]].head_kind == "classifier":  # no decoder, no LM head
            embedding = model.module("embedding", model.plan.group_index("embedding", n))
            runs -= {id(p) for m in (view.decoder.layers, view.decoder.norm, view.lm_head)
                     for p in m.parameters()} - {id(p) for p in embedding.parameters()}
        assert uses == runs | {id(p) for p in model.head(n).parameters()}
    # the classifier task "cls" never runs a decoder: it owns none, whatever the plan gives it,
    # and a decoder copy that no task of its group runs is not built at all
    view = model.for_task("cls")  # (decoder positions belong to the embedding slot)
    cls_decoder = {id(p) for m in (view.decoder.layers, view.decoder.norm) for p in m.parameters()}
    assert not cls_decoder & owned["cls"]
    if strategy in ("none", "soft"):
        assert not cls_decoder
        with pytest.raises(ValueError, match="is not built for task\\(s\\) cls"):
            view.decoder.layers[0](None, None)
    else:
        assert cls_decoder <= shared
    head_only = {n: {id(p) for p in model.head(n).parameters()} for n in names}
    if strategy == "hard":
        assert owned == head_only
    if strategy in ("none", "soft"):
        assert not shared
    if strategy == "hierarchical":  # top layers private: more than the head
        assert all(owned[n] > head_only[n] for n in names)


@pytest.mark.parametrize("strategy", list(PLANS))  # under "hard" only the heads are private
def test_a_tasks_loss_leaves_other_tasks_private_parameters_without_gradient(strategy):
    model = build(strategy)
    batch = make_batch([0, 1, 2, 0, 1, 2])
    result = MultiTaskObjective(model.tasks, PLANS[strategy])(model, model(batch), batch)
    for name in ("gen", "cls", "rnk"):
        model.zero_grad(set_to_none=True)
        result.task_losses[name].backward(retain_graph=True)
        mine = model.task_parameters(name)
        if mine:  # under "hard" a rank task owns nothing: its head is the shared LM head
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mine)
        for other in {"gen", "cls", "rnk"} - {name}:
            for p in model.task_parameters(other):
                assert p.grad is None or not p.grad.any(), (strategy, name, other)


@pytest.mark.parametrize("strategy,positions", [(s, "relative") for s in PLANS]
                         + [("hard", "sinusoidal"), ("hierarchical", "rope")])
def test_mixed_batch_equals_each_task_run_alone(strategy, positions):
    model = build(strategy, positions=positions).double().eval()
    assert not model.for_task("gen").encoder.dropout.training  # eval() reaches the views
    batch = make_batch([2, 0, 1, 1, 0, 2, 0])
    mixed = model(batch)
    for name, out in mixed.tasks.items():
        alone = model(batch.select(out.rows)).tasks[name]                     # one-task batch
        torch.testing.assert_close(alone.logits, out.logits, atol=1e-6, rtol=0)
        # and through the task's EncoderDecoder view
        view, rows = model.for_task(name), out.rows
        memory = view.encode(batch.src[rows], batch.src_mask[rows])
        if out.head == "classifier":
            ref = model.head(name)(memory, batch.src_mask[rows])
        else:
            ref = view.logits(view.decode(batch.tgt_in[rows], memory, batch.src_mask[rows],
                                          batch.tgt_mask[rows]))
        torch.testing.assert_close(ref, out.logits, atol=1e-6, rtol=0)


def test_task_view_decodes_incrementally_like_the_full_pass():
    """Generation code written against EncoderDecoder works per task, KV cache included."""
    model = build("hierarchical").double().eval()
    batch = make_batch([0, 0, 2])
    view = model.for_task("gen")
    memory = view.encode(batch.src, batch.src_mask)
    tgt = batch.tgt_in.clone()
    tgt[:, 0] = model.config.bos_id
    tgt_mask = torch.ones_like(tgt, dtype=torch.bool)
    full = view.logits(view.decode(tgt, memory, batch.src_mask, tgt_mask))
    cache = view.new_cache()
    steps = [view.logits(view.decode(tgt[:, i:i + 1], memory, batch.src_mask,
                                     tgt_mask[:, i:i + 1], cache)) for i in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=0)


def test_unknown_task_is_a_value_error_listing_the_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: gen, cls, rnk"):
        build("hard").for_task("nope")


def test_soft_copies_start_equal_and_the_penalty_grows_as_they_diverge():
    model = build("soft")
    slots = list(model.plan.slots)
    assert all(copies_equal(model, s) for s in slots)
    assert model.for_task("gen").encoder.layers[0] is not model.for_task("cls").encoder.layers[0]
    assert model.coupling_penalty().item() == 0.0
    w = model.for_task("gen").encoder.layers[1].ffn.wo.weight if hasattr(
        model.for_task("gen").encoder.layers[1].ffn, "wo") else next(
        model.for_task("gen").encoder.layers[1].parameters())
    delta = torch.randn_like(w) * 0.1
    penalties = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            w.add_(delta * (scale - (1.0 if scale == 2.0 else 0.0)))   # total offset = scale * delta
        penalties.append(model.coupling_penalty().item())
    # copy "gen" differs from the other two by scale * delta: 2 pairs * ||scale * delta||^2
    expected = [2 * (s * delta).pow(2).sum().item() for s in (1.0, 2.0)]
    assert penalties == pytest.approx(expected, rel=1e-5)
    assert penalties[1] == pytest.approx(4 * penalties[0], rel=1e-5)
    assert not copies_equal(model, "encoder.1") and copies_equal(model, "encoder.0")


def test_soft_penalty_enters_the_objective_times_its_weight():
    sharing = SharingConfig(strategy="soft", soft_weight=0.5)
    model = build_model(tiny_config(), three_tasks(), sharing)
    with torch.no_grad():
        next(model.for_task("cls").encoder.layers[0].parameters()).add_(0.3)
    batch = make_batch([0, 1, 2])
    result = MultiTaskObjective(model.tasks, sharing)(model, model(batch), batch)
    assert result.extra["soft"].item() == pytest.approx(0.5 * model.coupling_penalty().item())
    assert result.extra["soft"].item() > 0


def test_build_model_accepts_a_run_config_object():
    class Run:
        model = tiny_config()
        tasks = three_tasks()
        sharing = {"strategy": "none"}
    model = build_model(Run())
    assert model.plan.strategy == "none" and not model.shared_parameters()
    with pytest.raises(ValueError, match=".model, .tasks and .sharing"):
        build_model(object())


@pytest.mark.parametrize("strategy", ["hard", "hierarchical"])
def test_state_dict_round_trip_restores_every_task(strategy):
    source = build(strategy).double()
    torch.manual_seed(123)
    target = build(strategy).double()
    target.load_state_dict(source.state_dict())
    batch = make_batch([0, 1, 2, 0])
    a, b = source(batch), target(batch)
    for name in a.tasks:
        torch.testing.assert_close(a.tasks[name].logits, b.tasks[name].logits, atol=0, rtol=0)
    # tying and sharing survive loading: still one object per group
    assert target.for_task("gen").encoder.layers[0] is target.for_task("cls").encoder.layers[0]
