"""Mixtures of experts (``mmoe`` / ``ple``): oracles in fp64 — hard sharing, private FFNs, the
dense twin of sparse dispatch, a direct balance loss, each task run alone — and training."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from heads_tiny import make_batch, three_tasks, tiny_config
from polytask.core.model.feedforward import build_feedforward, feedforward_parameters
from polytask.core.model.transformer import EncoderDecoder
from polytask.experiments.gates import gate_matrix, plot_gates, read_gates, write_gates
from polytask.heads import MultiTaskObjective, SharingConfig, build_model
from polytask.heads.experts import (Gate, GatedExperts, balance_loss, gate_table, gate_weights,
                                    gated_layers)

TASKS = ["gen", "cls", "rnk"]
D, L = 16, 4   # tiny_config's d_model; encoder + decoder layers


def _model(seed=0, **sharing):
    torch.manual_seed(seed)
    model = build_model(tiny_config(), three_tasks(), SharingConfig(**sharing)).double()
    return model.eval()


def _randomise_gates(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, gated in gated_layers(model):
            gated.gate.weight.copy_(torch.randn(gated.gate.weight.shape, generator=g,
                                                dtype=torch.float64))


def _loss(model, batch, sharing):
    result = MultiTaskObjective(three_tasks(), sharing)(model, model(batch), batch)
    return result.total()


def numel(params):
    return sum(p.numel() for p in params)


# --- oracles ----------------------------------------------------------------------------------
def test_mmoe_with_one_expert_equals_hard_sharing():
    hard, mmoe = _model(strategy="hard"), _model(strategy="mmoe", experts=1)
    batch = make_batch([0, 1, 2, 0, 1, 2])
    out_h, out_m = hard(batch), mmoe(batch)
    for name in TASKS:
        assert torch.allclose(out_h.tasks[name].logits, out_m.tasks[name].logits,
                              atol=1e-12, rtol=0), name
    _loss(hard, batch, SharingConfig()).backward()
    _loss(mmoe, batch, SharingConfig(strategy="mmoe", experts=1)).backward()
    for name in TASKS:   # every task's view: same tensors, same gradients
        theirs = dict(hard.for_task(name).named_parameters())
        mine = [(k, q) for k, q in mmoe.for_task(name).named_parameters() if ".gate." not in k]
        assert len(mine) == len([k for k in theirs if name != "cls" or "decoder.layers" not in k])
        for key, q in mine:   # (cls runs no decoder: mmoe gives it none)
            p = theirs[key.replace(".ffn.shared.0.", ".ffn.")]
            assert torch.equal(p, q), key
            assert (p.grad is None) == (q.grad is None), key
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, atol=1e-12, rtol=0), key


def test_ple_without_shared_experts_is_a_private_ffn_per_task():
    model = _model(strategy="ple", shared_experts=0, task_experts=1)
    batch = make_batch([0, 1, 2, 0, 2, 1])
    out = model(batch)
    for k, name in enumerate(TASKS):
        dense = copy.deepcopy(model.for_task(name))   # its expert as a plain FFN, no gate
        for layer in [*dense.encoder.layers, *dense.decoder.layers]:
            if isinstance(getattr(layer, "ffn", None), GatedExperts):
                layer.ffn = layer.ffn.own[0]
        rows = (batch.task_ids == k).nonzero(as_tuple=True)[0]
        src, src_mask = batch.src[rows], batch.src_mask[rows]
        if name == "cls":
            alone = model.head("cls")(dense.encode(src, src_mask), src_mask)
        else:
            alone = dense(src, batch.tgt_in[rows], src_mask, batch.tgt_mask[rows])
        assert torch.allclose(out.tasks[name].logits, alone, atol=1e-12, rtol=0), name
    experts = {n: {id(p) for p in model.for_task(n).encoder.layers[0].ffn.own.parameters()}
               for n in TASKS}
    assert not experts["gen"] & experts["cls"]   # private: no tensor in common


def test_a_tasks_loss_gives_no_gradient_to_other_tasks_experts_and_gates():
    model = _model(strategy="ple", shared_experts=1, task_experts=2, top_k=2)
    _randomise_gates(model)
    batch = make_batch([0, 1, 2, 0, 2, 1])
    out = model(batch)
    criterion = MultiTaskObjective(three_tasks(), SharingConfig(strategy="ple"))
    criterion(model, out, batch).task_losses["gen"].backward()
    touched = 0
    for slot, _, name, gated in gated_layers(model):
        private = [*gated.own.parameters(), *gated.gate.parameters()]
        grads = [p.grad for p in private]
        if name == "gen":
            touched += sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
        else:
            assert all(g is None or not bool(g.any()) for g in grads), (slot, name)
    assert touched > 0   # the check can fail: gen's own parts do get gradients


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_gates_sum_to_one(top_k):
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    weights, probs, selected = gate_weights(logits, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert torch.allclose(probs.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert (selected.sum(-1) == (top_k or 4)).all()
    assert bool((weights[~selected] == 0).all()) and bool((weights[selected] > 0).all())
    kept = logits.sort(-1, descending=True).values[..., :top_k or 4]   # the k largest
    assert torch.allclose(weights.sort(-1, descending=True).values[..., :top_k or 4],
                          torch.softmax(kept, -1))


@pytest.mark.parametrize("top_k,activation", [(1, "gelu"), (2, "swiglu"), (3, "gelu")])
def test_sparse_dispatch_equals_dense_masked_twin(top_k, activation):
    torch.manual_seed(0)
    config = tiny_config(activation=activation)
    experts = [build_feedforward(config).double() for _ in range(4)]
    gate = Gate(D, 4).double()
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    results = []
    for dispatch in ("sparse", "dense"):
        layer = GatedExperts(torch.nn.ModuleList(experts[:2]), torch.nn.ModuleList(experts[2:]),
                             gate, top_k, dispatch=dispatch)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
        layer.zero_grad()
    (out_s, gx_s, gp_s), (out_d, gx_d, gp_d) = results
    assert torch.allclose(out_s, out_d, atol=1e-12)
    assert torch.allclose(gx_s, gx_d, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gp_s, gp_d))


@pytest.mark.parametrize("top_k", [None, 2])
def test_balance_loss_against_a_direct_computation(top_k):
    model = _model(strategy="mmoe", experts=3, top_k=top_k)
    _randomise_gates(model)
    inputs = {}   # gate module id -> its input h on the last call
    for _, _, _, gated in gated_layers(model):
        gated.gate.register_forward_hook(lambda m, a, o: inputs.__setitem__(id(m), a[0]))
    batch = make_batch([0, 1, 2, 0, 2, 1])
    model(batch)
    got = balance_loss(model, batch)
    terms = []
    for slot, k, name, gated in gated_layers(model):
        rows = (batch.task_ids == k).nonzero(as_tuple=True)[0].tolist()
        mask = batch.src_mask if slot.startswith("encoder") else batch.tgt_mask
        h = inputs[id(gated.gate)]
        f, p, n_tokens = [0.0] * 3, [0.0] * 3, 0
        for i, row in enumerate(rows):
            for t in range(h.shape[1]):
                if not mask[row, t]:
                    continue
                n_tokens += 1
                logits = [float(h[i, t] @ gated.gate.weight[e].detach()) for e in range(3)]
                z = sum(torch.tensor(logits).exp().tolist())
                order = sorted(range(3), key=lambda e: -logits[e])[:top_k or 1]
                for e in range(3):
                    p[e] += float(torch.tensor(logits[e]).exp()) / z
                    f[e] += (e in order) / (top_k or 1)
        terms.append(3 * sum(f[e] / n_tokens * p[e] / n_tokens for e in range(3)))
    assert len(terms) == 2 * 2 + 2 * 2 + 2   # gen, rnk: 4 layers; cls: 2 encoder layers
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    assert got.requires_grad
    sharing = SharingConfig(strategy="mmoe", experts=3, top_k=top_k, balance_weight=0.5)
    result = MultiTaskObjective(three_tasks(), sharing)(model, model(batch), batch)
    assert result.extra["balance"].item() == pytest.approx(0.5 * got.item(), rel=1e-9)
    with pytest.raises(RuntimeError, match="run model\\(batch\\) on this batch first"):
        balance_loss(model, make_batch([0, 0, 0, 1, 2, 1]))


@pytest.mark.parametrize("sharing", [dict(strategy="mmoe", experts=3, top_k=2),
                                     dict(strategy="ple", shared_experts=2, task_experts=2)])
def test_mixed_batch_equals_each_task_alone(sharing):
    model = _model(**sharing)
    _randomise_gates(model)
    batch = make_batch([0, 1, 2, 0, 2, 1, 0])
    out = model(batch)
    for k, name in enumerate(TASKS):
        rows = (batch.task_ids == k).nonzero(as_tuple=True)[0]
        sub = batch.select(rows)
        assert torch.allclose(model(sub).tasks[name].logits, out.tasks[name].logits, atol=1e-12)
        view, src, src_mask = model.for_task(name), batch.src[rows], batch.src_mask[rows]
        if name == "cls":
            alone = model.head("cls")(view.encode(src, src_mask), src_mask)
        else:
            alone = view(src, batch.tgt_in[rows], src_mask, batch.tgt_mask[rows])
        assert isinstance(view, EncoderDecoder)
        assert torch.allclose(alone, out.tasks[name].logits, atol=1e-12), name


def test_a_task_view_decodes_step_by_step_as_in_one_pass():
    model = _model(strategy="ple", shared_experts=2, task_experts=1, top_k=2)
    _randomise_gates(model)
    batch = make_batch([0, 0, 0])
    view, tgt = model.for_task("gen"), batch.tgt_in
    memory = view.encode(batch.src, batch.src_mask)
    full = view.logits(view.decode(tgt, memory, batch.src_mask))
    cache = view.new_cache()
    steps = [view.logits(view.decode(tgt[:, i:i + 1], memory, batch.src_mask, cache=cache))
             for i in range(tgt.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


@pytest.mark.slow
def test_a_top_k_view_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from polytask.core.export import export_model

    model = _model(strategy="mmoe", experts=3, top_k=2).float()
    _randomise_gates(model)   # tracing takes the dense twin; check_onnx runs other shapes
    assert len(export_model(model.for_task("gen"), tmp_path, atol=1e-4)) == 4


# --- ownership by identity --------------------------------------------------------------------
@pytest.mark.parametrize("sharing", [dict(strategy="mmoe", experts=3),
                                     dict(strategy="ple", shared_experts=2, task_experts=2),
                                     dict(strategy="ple", shared_experts=0, task_experts=1)])
def test_shared_and_task_parameters_by_identity(sharing):
    config = tiny_config()
    hard, model = _model(strategy="hard"), _model(**sharing)
    backbone, ffn = numel(hard.shared_parameters()), feedforward_parameters(config)
    head = numel(model.head("cls").parameters())
    n_shared = sharing.get("experts", sharing.get("shared_experts"))
    n_own = sharing.get("task_experts", 0) if sharing["strategy"] == "ple" else 0
    per_layer = n_own * ffn + (n_shared + n_own) * D   # own experts + gate
    extra_shared = (n_shared - 1) * ffn * L             # expert 0 is the backbone's FFN
    if n_shared == 0:   # the backbone's FFN became the first task's (gen's) own expert
        assert numel(model.shared_parameters()) == backbone - ffn * L
        assert numel(model.task_parameters("gen")) == per_layer * L
    else:
        assert numel(model.shared_parameters()) == backbone + extra_shared
    assert numel(model.task_parameters("rnk")) == per_layer * L
    assert numel(model.task_parameters("cls")) == per_layer * 2 + head   # no decoder
    total = numel(model.shared_parameters()) + sum(numel(model.task_parameters(n)) for n in TASKS)
    assert numel(model.parameters()) == total
    gen = {id(p) for p in model.parameters_of("gen")}
    assert gen == {id(p) for p in model.shared_parameters() + model.task_parameters("gen")}
    last = {id(p) for p in model.last_shared_parameters()}
    layer = model.for_task("gen").encoder.layers[1]
    assert id(layer.self_attn.q_proj.weight) in last and id(layer.ffn.gate.weight) not in last
    other = model.for_task("cls").encoder.layers[1].self_attn
    assert layer.self_attn is not other and layer.self_attn.q_proj.weight is other.q_proj.weight


def test_experts_upcycle_a_pretrained_ffn_and_gates_start_uniform():
    torch.manual_seed(0)
    pretrained = EncoderDecoder(tiny_config())
    sharing = SharingConfig(strategy="ple", shared_experts=2, task_experts=1)
    model = build_model(tiny_config(), three_tasks(), sharing, pretrained=pretrained)
    fresh = build_model(tiny_config(), three_tasks(), sharing)
    want = pretrained.encoder.layers[1].ffn.wi.weight
    gated = model.for_task("cls").encoder.layers[1].ffn
    assert all(torch.equal(e.wi.weight, want) for e in gated.experts())
    assert len({id(e.wi.weight) for e in gated.experts()}) == 3          # copies, not one tensor
    other = fresh.for_task("cls").encoder.layers[1].ffn.experts()
    assert not torch.equal(other[0].wi.weight, other[1].wi.weight)       # fresh experts
    assert not gated.gate.weight.any()
    table = gate_table(model, make_batch([0, 1, 2]))
    assert table["layers"]["encoder.1"]["cls"] == pytest.approx({"s0": 1 / 3, "s1": 1 / 3,
                                                                 "cls.0": 1 / 3})


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    (dict(strategy="mmoe", experts=2, top_k=3), "sharing.top_k = 3 exceeds the 2 experts"),
    (dict(strategy="ple", shared_experts=1, task_experts=1, top_k=3),
     "sharing.top_k = 3 exceeds the 2 experts .*sharing.shared_experts \\+ sharing.task_experts"),
    (dict(strategy="hard", top_k=1), "sharing.top_k = 1 gates experts, but sharing.strategy = "
                                     "'hard' has none"),
    (dict(strategy="soft", balance_weight=0.1), "sharing.balance_weight = 0.1 gates experts"),
    (dict(strategy="mmoe", experts=0), "sharing.experts = 0 must be >= 1"),
    (dict(strategy="ple", task_experts=0), "sharing.task_experts = 0 must be >= 1"),
    (dict(strategy="ple", shared_experts=-1), "sharing.shared_experts = -1 must be >= 0"),
    (dict(strategy="mmoe", balance_weight=-1.0), "sharing.balance_weight = -1.0 must be >= 0"),
    (dict(strategy="mmoe", adapters=[1]), "sharing.adapters = \\[1\\] is invalid"),
])
def test_impossible_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SharingConfig.from_dict(options)


def test_mixture_plans_share_everything_but_the_layers():
    plan = _model(strategy="mmoe").plan
    for slot, groups in plan.slots.items():
        layer = slot.split(".")[-1].isdigit()
        assert len(groups) == (3 if layer else 1), slot


# --- gates table, plot, training --------------------------------------------------------------
def test_gate_table_and_plot(tmp_path):
    model = _model(strategy="ple", shared_experts=1, task_experts=2, top_k=2)
    _randomise_gates(model)
    model.train()
    table = gate_table(model, make_batch([0, 1, 2, 1]))
    assert model.training   # restored
    assert set(table["layers"]) == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}
    assert set(table["layers"]["decoder.0"]) == {"gen", "rnk"}   # cls runs no decoder
    for layer in table["layers"].values():
        for weights in layer.values():
            assert sum(weights.values()) == pytest.approx(1.0)
    assert gate_table(_model(strategy="hard"), make_batch([0])) is None
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (2, 4):
            f.write(json.dumps({"event": "gates", "step": step, **table}) + "\n")
    assert [e["step"] for e in read_gates(tmp_path / "metrics.jsonl")] == [2, 4]
    tasks, experts, grid = gate_matrix(table["layers"]["encoder.0"])
    assert experts == ["s0", "gen.0", "gen.1", "cls.0", "cls.1", "rnk.0", "rnk.1"]
    assert torch.tensor(grid).isnan().sum() == 3 * 4   # others' own experts
    assert plot_gates(tmp_path).stat().st_size > 0
    other = tmp_path / "hard"   # an ablation draws the first run of each setting with gates
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 2}) + "\n")
    (tmp_path / "out").mkdir()
    drawn = write_gates(tmp_path / "out", [("ple", tmp_path), ("ple", tmp_path), ("hard", other)])
    assert list(drawn) == ["gates ple"] and drawn["gates ple"].name == "gates_1.png"
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl: no 'gates' event"):
        plot_gates(tmp_path)


ROOT = Path(__file__).parents[2]
FAST = ["train.max_steps=3", "train.eval_every=2", "train.save_every=2", "data.eval_examples=4",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=4",
        "sharing.strategy=ple", "sharing.shared_experts=1", "sharing.task_experts=1",
        "sharing.top_k=1", "sharing.balance_weight=0.01"]


@pytest.mark.parametrize("method", ["static", "pcgrad"])
def test_training_and_resume(tmp_path, method):
    from safetensors.torch import load_file

    from polytask.core.training.checkpoint import LATEST
    from polytask.experiments.config import load_config
    from polytask.experiments.runs import train_run

    cfg = load_config(ROOT / "experiments" / "configs" / "tiny.yaml",
                      FAST + [f"weighting.method={method}"])
    full = tmp_path / "full"
    summary = train_run(cfg, full, progress=False)
    assert summary["steps"] == 3
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert all(r["finite"] and r["balance_loss"] >= 1.0 - 1e-6 for r in train)
    part = tmp_path / "part"   # rewind to step 2 and resume: step 3 recomputed
    shutil.copytree(full, part)
    (part / "checkpoints" / LATEST).write_text("step-00000002")
    (part / "summary.json").unlink()
    shutil.copy(full / "checkpoints" / "step-00000002" / "model.safetensors",
                part / "model.safetensors")
    train_run(cfg, part, resume=True, progress=False)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".gate." in k for k in a)
