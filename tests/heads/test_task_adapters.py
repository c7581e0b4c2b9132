"""Per-task / per-group LoRA on a shared backbone, and Polytropon skill routing.

The models are built by hand from the public pieces (the ``hard`` plan with its layer slots
split by adapter group, ``apply_transforms``, ``MultiTaskModel``), so these tests do not wait
for ``build_model`` to read ``sharing.adapters``; the end-to-end tests at the bottom run once it
does. Exactness claims run in fp64."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from polytask import heads
from polytask.core.data.tasks import TaskSpec
from polytask.core.model.transformer import EncoderDecoder
from polytask.heads import MultiTaskModel, SharingConfig, SharingPlan, make_plan
from polytask.heads import build as build_module
from polytask.heads.build import apply_transforms
from polytask.heads.classifier import ClassifierHead
from polytask.heads.forks import fork, shares_all
from polytask.heads.skills import Allocation, SkillBank, SkillLoRALinear
from polytask.heads.task_adapters import (TaskAdapterOptions, TaskLoRALinear, adapter_groups,
                                          adapter_parameters, adapter_slots, adapter_transform,
                                          allocation_table, freeze_backbone)
from heads_tiny import make_batch, three_tasks, tiny_config

ROOT = Path(__file__).parents[2]


def grouped_tasks() -> list[TaskSpec]:
    return [TaskSpec("a", group="g1"), TaskSpec("b", group="g1"), TaskSpec("c", group="g2")]


def build(tasks: list[TaskSpec], seed: int = 0, **adapters) -> MultiTaskModel:
    torch.manual_seed(seed)
    config = tiny_config()
    options = TaskAdapterOptions.from_dict(adapters)
    hard = make_plan(SharingConfig(strategy="hard"), config, tasks)   # + a fork per adapter group
    plan = SharingPlan("hard+adapters", hard.tasks,
                       adapter_slots(hard.slots, adapter_groups(tasks, options)))
    backbones = [EncoderDecoder(config) for _ in tasks]
    apply_transforms(backbones, plan, [adapter_transform(options, tasks)])
    head = {t.name: ClassifierHead(config.d_model, len(t.labels), None, "mean", 0.0)
            for t in tasks if t.head_kind == "classifier"}
    model = MultiTaskModel(backbones, tasks, plan, head).double()
    if options.freeze:
        freeze_backbone(model)
    return model


def adapted(model: MultiTaskModel, task: str) -> dict[str, torch.nn.Module]:
    """``slot/path`` -> the adapted linear of ``task``'s fork, for every slot it runs."""
    out = {}
    for slot in model.plan.slots:
        if slot[-1].isdigit() and model.uses(task, slot):
            layer = model.module(slot, model.plan.group_index(slot, task))
            for path, m in layer.named_modules():
                if isinstance(m, (TaskLoRALinear, SkillLoRALinear)):
                    out[f"{slot}/{path}"] = m
    return out


def randomise(model: MultiTaskModel, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def loss_of(model: MultiTaskModel, batch, task: str) -> torch.Tensor:
    return model(batch).tasks[task].logits.pow(2).mean()


# --- options -----------------------------------------------------------------------------
def test_options_defaults_and_round_trip():
    o = TaskAdapterOptions.from_dict({})
    assert (o.method, o.per, o.r, o.alpha, o.targets, o.freeze, o.skills) == (
        "lora", "task", 8, 16.0, ["q_proj", "v_proj"], True, 0)
    assert TaskAdapterOptions.from_dict({"targets": "wo", "alpha": 4}).targets == ["wo"]


@pytest.mark.parametrize("data, message", [
    ({"rank": 4}, r"unknown config key sharing\.adapters\.rank; known keys: method, per, r"),
    ({"r": 0}, r"sharing\.adapters\.r = 0 must be positive"),
    ({"alpha": 0.0}, r"sharing\.adapters\.alpha = 0\.0 must be positive"),
    ({"alpha": float("nan")}, r"sharing\.adapters\.alpha = nan must be finite"),
    ({"dropout": 1.0}, r"sharing\.adapters\.dropout = 1\.0 must be in \[0, 1\)"),
    ({"skills": -1}, r"sharing\.adapters\.skills = -1 must be >= 0"),
    ({"per": "layer"}, r"sharing\.adapters\.per = 'layer' is invalid: expected one of 'task', "
                       r"'group'"),
    ({"method": "ia3"}, r"sharing\.adapters\.method = 'ia3' is invalid: expected one of 'lora'"),
    ({"allocation": "soft"}, r"sharing\.adapters\.allocation = 'soft' is invalid"),
    ({"targets": []}, r"sharing\.adapters\.targets = \[\] is invalid"),
    ({"r": 2.5}, r"sharing\.adapters\.r = 2\.5 is invalid: expected int"),
    ({"allocation": "identity"}, r"sharing\.adapters\.allocation = 'identity' .*\.skills = 0"),
])
def test_bad_options_name_the_key_and_the_choices(data, message):
    with pytest.raises(ValueError, match=message) as err:
        TaskAdapterOptions.from_dict(data)
    assert "\n" not in str(err.value)


def test_bad_wiring_is_refused_at_build_time():
    tasks = grouped_tasks()
    with pytest.raises(ValueError, match=r"sharing\.adapters\.targets: 'q_prj' names no linear "
                                         r"layer of slot 'encoder\.0'; .*q_proj"):
        build(tasks, targets=["q_prj"])
    with pytest.raises(ValueError, match=r"sharing\.adapters\.skills = 2 with allocation "
                                         r"'identity' needs one skill per adapter group \(3"):
        build(tasks, skills=2, allocation="identity")
    transform = adapter_transform(TaskAdapterOptions(), tasks)   # per task, but a shared group:
    layer = EncoderDecoder(tiny_config()).encoder.layers[0]
    with pytest.raises(ValueError, match=r"plan group \['a', 'b'\] at slot 'encoder\.0' spans"):
        transform("encoder.0", layer, frozenset({"a", "b"}))
    with pytest.raises(ValueError, match="has no sharing.adapters adapters"):
        freeze_backbone(EncoderDecoder(tiny_config()))
    with pytest.raises(ValueError, match=r"slot 'encoder\.0' of task 'a' has no skill-routed"):
        allocation_table(build(tasks), "encoder.0")


def test_peft_merging_leaves_per_task_adapters_alone():
    """LoRA's merge folds B A into W; W is every task's here, so unwrap_lora must skip these."""
    from polytask.core.peft import unwrap_lora
    model = build(three_tasks())
    randomise(model)
    batch = make_batch([0, 1, 2])
    before = model(batch).tasks["gen"].logits
    assert unwrap_lora(model) == []
    torch.testing.assert_close(model(batch).tasks["gen"].logits, before, rtol=0, atol=0)


# --- the partition ------------------------------------------------------------------------
def test_adapter_groups_and_the_refined_plan():
    tasks = grouped_tasks()
    assert adapter_groups(tasks, TaskAdapterOptions(per="task")) == [["a"], ["b"], ["c"]]
    assert adapter_groups(tasks, TaskAdapterOptions(per="group")) == [["a", "b"], ["c"]]
    abc, ab, c = frozenset("abc"), frozenset("ab"), frozenset("c")
    slots = {"embedding": (abc,), "encoder.0": (abc,), "encoder.1": (ab, c),
             "encoder.norm": (abc,)}
    refined = adapter_slots(slots, [["a"], ["b", "c"]])
    assert refined["embedding"] == (abc,) and refined["encoder.norm"] == (abc,)
    assert refined["encoder.0"] == (frozenset("a"), frozenset("bc"))
    assert refined["encoder.1"] == (frozenset("a"), frozenset("b"), c)


# --- per-task LoRA --------------------------------------------------------------------------
def test_a_fork_with_zero_B_equals_the_base_layer():
    torch.manual_seed(0)
    layer = EncoderDecoder(tiny_config()).encoder.layers[0].double()
    transform = adapter_transform(TaskAdapterOptions(targets=["q_proj", "v_proj", "wo"]),
                                  grouped_tasks())
    mine = transform("encoder.0", layer, frozenset({"a"}))
    assert isinstance(mine.self_attn.q_proj, TaskLoRALinear) and isinstance(mine.ffn.wo,
                                                                              TaskLoRALinear)
    assert mine.self_attn.q_proj.weight is layer.self_attn.q_proj.weight   # the shared tensor
    assert type(layer.self_attn.q_proj) is torch.nn.Linear                 # base left alone
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(mine(x), layer(x), rtol=0, atol=0)
    with torch.no_grad():
        mine.ffn.wo.lora.lora_B.fill_(0.1)
    assert not torch.allclose(mine(x), layer(x))             # the check can fail


def test_one_tasks_loss_moves_only_its_own_adapter():
    model = build(three_tasks())
    randomise(model)
    batch = make_batch([0, 1, 2, 0, 2])
    loss_of(model, batch, "gen").backward()
    own = {id(p) for m in adapted(model, "gen").values() for p in m.lora.parameters()}
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in adapter_parameters(model) if id(p) in own)
    for name in ("cls", "rnk"):
        for key, m in adapted(model, name).items():
            for p in m.lora.parameters():
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, (name, key)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)} | {
        id(p) for p in model.heads.parameters()}


def test_without_freeze_the_shared_backbone_trains_too():
    model = build(three_tasks(), freeze=False)
    randomise(model)
    loss_of(model, make_batch([0, 2]), "gen").backward()
    q = model.module("encoder.0", 0).self_attn.q_proj.base.weight
    assert q.requires_grad and q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())


def test_per_group_tasks_share_one_adapter_object():
    model = build(grouped_tasks(), per="group")
    for slot in ("encoder.0", "decoder.1"):
        a, b, c = (model.module(slot, model.plan.group_index(slot, t)) for t in "abc")
        assert a is b and a is not c and shares_all(a.self_attn.q_proj.base,
                                                    c.self_attn.q_proj.base)
        assert a.self_attn.q_proj.lora is not c.self_attn.q_proj.lora
    ownership = {id(p) for p in model.task_parameters("c")}
    assert {id(p) for m in adapted(model, "c").values() for p in m.lora.parameters()} <= ownership
    assert not {id(p) for m in adapted(model, "a").values()
                for p in m.lora.parameters()} & ownership


@pytest.mark.parametrize("adapters", [dict(), dict(per="group"), dict(skills=3),
                                      dict(skills=2, per="group", targets=["*attn.*_proj"])])
def test_a_mixed_batch_equals_each_task_alone(adapters):
    model = build(three_tasks(), **adapters)
    randomise(model, scale=0.3)
    batch = make_batch([0, 1, 2, 0, 2, 1])
    out = model(batch)
    for k, name in enumerate(t.name for t in model.tasks):
        rows = (batch.task_ids == k).nonzero(as_tuple=True)[0]
        alone = model(batch.select(rows)).tasks[name].logits
        torch.testing.assert_close(out.tasks[name].logits, alone, rtol=1e-12, atol=1e-12)


# --- skill routing ---------------------------------------------------------------------------
def test_identity_skills_equal_per_task_lora_in_values_and_gradients():
    tasks = three_tasks()
    lora = build(tasks, freeze=False)
    skills = build(tasks, freeze=False, skills=3, allocation="identity")
    randomise(lora, scale=0.2)
    common = lora.state_dict().keys() & skills.state_dict().keys()   # the backbone and heads
    assert "slots.embedding.0.embed_tokens.weight" in common
    assert all(torch.equal(lora.state_dict()[k], skills.state_dict()[k]) for k in common)
    with torch.no_grad():   # bank skill k := task k's A, B
        for k, t in enumerate(tasks):
            for key, mine in adapted(lora, t.name).items():
                routed = adapted(skills, t.name)[key]
                routed.bank.A[k].copy_(mine.lora.lora_A)
                routed.bank.B[k].copy_(mine.lora.lora_B)
    batch = make_batch([0, 1, 2, 2, 0])
    outs = [m(batch) for m in (lora, skills)]
    for t in tasks:
        torch.testing.assert_close(outs[1].tasks[t.name].logits, outs[0].tasks[t.name].logits,
                                   rtol=1e-12, atol=1e-12)
    for m, out in zip((lora, skills), outs):
        sum(o.logits.pow(2).mean() for o in out.tasks.values()).backward()
    for k, t in enumerate(tasks):
        for key, mine in adapted(lora, t.name).items():
            routed = adapted(skills, t.name)[key]
            torch.testing.assert_close(routed.bank.A.grad[k], mine.lora.lora_A.grad,
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(routed.bank.B.grad[k], mine.lora.lora_B.grad,
                                       rtol=1e-10, atol=1e-12)
    base = [m.module("encoder.1", 0).self_attn.v_proj.base.weight.grad for m in (lora, skills)]
    torch.testing.assert_close(base[1], base[0], rtol=1e-10, atol=1e-12)


def test_skill_combination_mixes_parameters_with_normalised_sigmoid_weights():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    bank = SkillBank(3, 6, 5, r=2, dtype=torch.float64)
    row = Allocation(3).double()
    with torch.no_grad():
        bank.B.normal_()
        row.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer = SkillLoRALinear(base, bank, row, alpha=4.0)
    x = torch.randn(4, 6, dtype=torch.float64)
    s = torch.sigmoid(row.logits.detach())
    w = s / s.sum()
    a = sum(w[i] * bank.A[i] for i in range(3))
    b = sum(w[i] * bank.B[i] for i in range(3))
    expected = base(x) + x @ a.T @ b.T * (4.0 / 2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    mixed_outputs = base(x) + sum(w[i] * (x @ bank.A[i].T @ bank.B[i].T) for i in range(3)) * 2
    assert not torch.allclose(layer(x), mixed_outputs)     # parameters, not outputs, are mixed
    layer(x).sum().backward()
    assert row.logits.grad is not None and row.logits.grad.abs().sum() > 0


def test_skill_banks_are_shared_and_allocations_are_per_group():
    model = build(grouped_tasks(), skills=4, per="group")
    a, c = adapted(model, "a"), adapted(model, "c")
    assert a.keys() == c.keys()
    for key in a:
        assert a[key].bank is c[key].bank and a[key].allocation is not c[key].allocation
    q, v = a["encoder.0/self_attn.q_proj"], a["encoder.0/self_attn.v_proj"]
    assert q.allocation is v.allocation and q.bank is not v.bank
    banks = {id(p) for m in a.values() for p in m.bank.parameters()}
    assert banks <= {id(p) for p in model.shared_parameters()}
    randomise(model)   # B = 0 would give the allocations no gradient
    loss_of(model, make_batch([0, 2, 1]), "c").backward()
    for m in a.values():   # group g1's allocation: untouched by task c's loss
        assert m.allocation.logits.grad is None or not m.allocation.logits.grad.any()
    assert any(m.allocation.logits.grad.abs().sum() > 0 for m in c.values())
    table = allocation_table(model, "decoder.0")
    assert table.shape == (3, 4) and torch.allclose(table.sum(1), torch.ones(3, dtype=table.dtype))


def test_allocation_table_marks_tasks_that_skip_the_slot():
    model = build(three_tasks(), skills=3, allocation="identity")
    torch.testing.assert_close(allocation_table(model, "encoder.1"), torch.eye(3))
    table = allocation_table(model, "decoder.0")      # cls has no decoder
    assert torch.isnan(table[1]).all() and torch.equal(table[[0, 2]], torch.eye(3)[[0, 2]])


def test_forks_hold_one_copy_of_the_backbone():
    model = build(three_tasks())
    plain = sum(p.numel() for p in EncoderDecoder(tiny_config()).parameters())
    extra = sum(p.numel() for p in adapter_parameters(model))
    heads_n = sum(p.numel() for p in model.heads.parameters())
    assert sum(p.numel() for p in model.parameters()) == plain + extra + heads_n
    assert shares_all(fork(model.module("encoder.0", 0).self_attn.k_proj),
                      model.module("encoder.0", 2).self_attn.k_proj)


# --- end to end, once build_model reads sharing.adapters -------------------------------------
def _wired() -> bool:
    """Whether ``build_model`` applies ``sharing.adapters`` yet, tried on a tiny model (an
    error counts as wired, so that the tests below report it instead of skipping)."""
    try:
        model = build_module.build_model(tiny_config(), three_tasks(),
                                         {"strategy": "hard", "adapters": {"r": 2}})
    except Exception:
        return True
    return any(isinstance(m, TaskLoRALinear) for m in model.modules())


needs_wiring = pytest.mark.skipif(not _wired(), reason="build_model does not apply "
                                  "sharing.adapters yet (heads.build: adapter_transform)")
ADAPTERS = {"per": "task", "r": 4, "targets": ["q_proj", "v_proj"], "skills": 0}


@needs_wiring
@pytest.mark.parametrize("adapters", [ADAPTERS, {**ADAPTERS, "skills": 2}])
def test_build_model_with_adapters(adapters):
    model = heads.build_model(tiny_config(), three_tasks(),
                              {"strategy": "hard", "adapters": adapters})
    layers = [model.module("encoder.0", model.plan.group_index("encoder.0", t.name))
              for t in model.tasks]
    assert len({id(m) for m in layers}) == 3 and shares_all(layers[0].ffn, layers[1].ffn)
    assert adapted(model, "gen") and all(p.requires_grad for p in adapter_parameters(model))
    assert not model.module("embedding", 0).embed_tokens.weight.requires_grad


@needs_wiring
def test_three_training_steps_with_adapters(tmp_path):
    from polytask.experiments.config import load_config
    from polytask.experiments.runs import train_run
    raw = yaml.safe_load((ROOT / "experiments" / "configs" / "tiny.yaml").read_text())
    raw["sharing"] = {"strategy": "hard", "adapters": {**ADAPTERS, "skills": 2}}
    raw["model"].update(d_model=32, d_ff=64)
    raw["train"].update(max_steps=3, eval_every=3, save_every=3, batch_size=8)
    raw["data"]["eval_examples"] = 2
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(raw))
    summary = train_run(load_config(path), tmp_path / "run", progress=False)
    assert summary["steps"] == 3


@needs_wiring
@pytest.mark.parametrize("strategy", ["none", "hierarchical"])
def test_adapters_never_silently_share_private_layers(strategy):
    """Forking task 0's layer for every group would turn private layers into shared ones:
    the wiring must refuse such a strategy, or fork each group's own layer."""
    try:
        model = heads.build_model(tiny_config(), three_tasks(),
                                  {"strategy": strategy, "adapters": {"r": 2}})
    except ValueError as err:
        assert "sharing.adapters" in str(err) and "\n" not in str(err)
        return
    top = "encoder.1"
    weights = [model.module(top, model.plan.group_index(top, t.name)).self_attn.k_proj.weight
               for t in model.tasks]
    assert weights[0] is not weights[1]
