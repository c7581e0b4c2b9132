"""PEFT on the multi-task model and through the real training loop: heads stay trainable, the
frozen base stays bit-identical, runs reload for eval / generate / export, prompt tuning's two
paths (mixed batch, task view) agree, freezing options only narrow what PEFT trains,
contradictory combinations are refused, parameter counts match a hand count."""
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polytask.core.data.batch import IGNORE_INDEX, Batch
from polytask.core.decoding.generation import generate
from polytask.core.export import onnx_greedy
from polytask.core.model.transformer import count_parameters
from polytask.core.peft import LoRALinear, apply_peft, describe_counts, parameter_counts
from polytask.core.peft.prompt import extend_mask
from polytask.core.training.checkpoint import LATEST, model_state
from polytask.experiments.adapt import adapt
from polytask.experiments.build import build_parts, build_run
from polytask.experiments.config import load_config
from polytask.experiments.runs import (evaluate_run, export_run, generate_text, load_run,
                                       resolve_tasks, train_run)
from polytask.heads import build_model

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
# eval_every > max_steps: one validation at the last step, so the best weights (which the
# summary's test metrics use) are the final ones (which eval loads)
FAST = ["train.max_steps=4", "train.eval_every=100", "train.save_every=4", "data.eval_examples=8",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=6"]
METHODS = {"lora": "{method: lora, r: 2}", "adapter": "{method: adapter, bottleneck: 4}",
           "prompt": "{method: prompt, n_tokens: 3}", "bitfit": "{method: bitfit}"}


def _config(*overrides: str):
    return load_config(TINY, FAST + list(overrides))


def _initial(cfg, tmp_path):
    """The adapted model a run starts from (the loop's own setup, same seed): its state and
    which tensors are trainable."""
    (tmp_path / "init").mkdir()
    _, _, model = build_run(cfg, resolve_tasks(cfg), tmp_path / "init", fresh_tokenizer=True)
    adapt(model, cfg)
    grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    state = {k: v.clone() for k, v in model_state(model).items()}
    return state, {k: grad[k] for k in state}


def _tiny_model(**sharing):
    cfg = _config()
    sharing_cfg = replace(cfg.sharing, **sharing)
    return build_model(replace(cfg.model, vocab_size=40), resolve_tasks(cfg), sharing_cfg)


def _mixed_batch(model, n_rows: int = 6) -> Batch:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 40, (n_rows, 7), generator=g)
    src[0, 5:] = 0  # a padded row
    tgt = torch.randint(4, 40, (n_rows, 4), generator=g)
    return Batch(task_ids=torch.arange(n_rows) % len(model.tasks), src=src, src_mask=src != 0,
                 tgt_in=tgt, tgt_mask=torch.ones_like(tgt, dtype=torch.bool),
                 labels=torch.full_like(tgt, IGNORE_INDEX),
                 class_ids=torch.full((n_rows,), IGNORE_INDEX))


@pytest.mark.parametrize("method", METHODS)
def test_a_peft_run_trains_its_heads_keeps_its_base_and_reloads(tmp_path, method):
    cfg = _config(f"train.peft={METHODS[method]}")
    before, trainable = _initial(cfg, tmp_path)
    run = tmp_path / "run"
    summary = train_run(cfg, run, progress=False)
    after = load_file(str(run / "model.safetensors"))
    assert after.keys() == before.keys()
    heads = [k for k in before if k.startswith("heads.")]  # parity's classifier head
    assert heads and all(trainable[k] for k in heads)
    assert all(not torch.equal(before[k], after[k]) for k in heads)
    frozen = [k for k in before if not trainable[k]]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    added = [k for k in before if trainable[k] and k not in heads]
    assert added and any(not torch.equal(before[k], after[k]) for k in added)
    assert evaluate_run(run) == summary["test"]
    assert generate_text(run, "reverse", "1 2 3") == generate_text(run, "reverse", "1 2 3")


def test_a_prompt_tuned_run_resumes_bit_identically(tmp_path):
    cfg = _config("train.peft={method: prompt, n_tokens: 3}", "train.max_steps=6",
                  "train.save_every=3")
    full, part = tmp_path / "full", tmp_path / "part"
    summary = train_run(cfg, full, progress=False)
    shutil.copytree(full, part)  # rewound to its step-3 checkpoint, as if killed after step 3
    (part / "checkpoints" / LATEST).write_text("step-00000003")
    (part / "summary.json").unlink()
    assert train_run(cfg, part, resume=True, progress=False)["test"] == summary["test"]
    a, b = (load_file(str(d / "model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_loaded_run_has_its_peft_back(tmp_path):
    for method in ("lora", "prompt"):
        train_run(_config(f"train.peft={METHODS[method]}"), tmp_path / method, progress=False)
    _, _, _, merged = load_run(tmp_path / "lora")
    _, _, _, separate = load_run(tmp_path / "lora", merge=False)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert sum(isinstance(m, LoRALinear) for m in separate.modules()) == 12  # q, v of 6 attentions
    src = torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(merged.for_task("copy")(src, src),
                                   separate.for_task("copy")(src, src), atol=1e-5, rtol=1e-5)
    _, _, _, prompted = load_run(tmp_path / "prompt")
    assert prompted.for_task("reverse").encode(src).shape[1] == 3 + 5


@pytest.mark.parametrize("per_task", [True, False])
def test_prompt_tuned_mixed_batch_equals_each_task_view(per_task):
    """Training and classifier evaluation go through forward(batch), generation and rank
    classification through the task views: both must see the same virtual tokens."""
    model = _tiny_model()
    apply_peft(model, "prompt", n_tokens=3, per_task=per_task)
    model.eval()
    batch = _mixed_batch(model)
    with torch.no_grad():
        out = model(batch)
        for name in ("copy", "reverse"):
            rows = out.tasks[name].rows
            expected = model.for_task(name)(batch.src[rows], batch.tgt_in[rows],
                                            batch.src_mask[rows], batch.tgt_mask[rows])
            torch.testing.assert_close(out.tasks[name].logits, expected, atol=1e-5, rtol=1e-5)
        rows = out.tasks["parity"].rows
        memory = model.for_task("parity").encode(batch.src[rows], batch.src_mask[rows])
        expected = model.head("parity")(memory, extend_mask(batch.src_mask[rows], 3))
        torch.testing.assert_close(out.tasks["parity"].logits, expected, atol=1e-5, rtol=1e-5)
        copy, reverse = (model.for_task(n).encode(batch.src[:1]) for n in ("copy", "reverse"))
    embedding = model.module("embedding", 0).embed_tokens
    assert embedding.prompt.shape[0] == (3 * 3 if per_task else 3)
    assert torch.equal(copy, reverse) != per_task  # one prompt per task, or one for all


def test_every_task_view_holds_the_peft_wrapper():
    """LoRA on the LM head: a slot module held by the plan slot and by every task view."""
    model = _tiny_model()
    apply_peft(model, "lora", targets=["slots.lm_head.*"], r=2)
    assert isinstance(model.module("lm_head", 0), LoRALinear)
    assert all(model.for_task(t.name).lm_head is model.module("lm_head", 0) for t in model.tasks)


@pytest.mark.parametrize("strategy, cross_stitch", [("hard", False), ("none", True)])
def test_peft_keeps_new_modules_trainable(strategy, cross_stitch):
    model = _tiny_model(strategy=strategy, cross_stitch=cross_stitch,
                        adversarial=strategy == "hard")
    new = [p for m in (model.heads, model.discriminator, model.cross_stitch) if m is not None
           for p in m.parameters()]
    assert len(new) >= 4
    for method in ("lora", "bitfit"):
        apply_peft(model, method)
        assert all(p.requires_grad for p in new), method


def test_freezing_options_only_narrow_what_peft_trains():
    lora = "train.peft={method: lora, r: 2}"
    model = _tiny_model()
    adapt(model, _config(lora, "train.train_top_layers=1"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if not n.startswith("heads.")] == [
        n for n, _ in model.named_parameters() if "lora_" in n and ("_1." in n)]
    assert any(n.startswith("heads.") for n in trainable)  # heads: "top" parts, still trained
    model = _tiny_model()
    adapt(model, _config(lora, "train.train_only=[decoder]"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("decoder" in n and "lora_" in n for n in trainable)


@pytest.mark.parametrize("overrides, match", [
    (["train.peft={method: prompt}", "train.train_top_layers=1"],
     "train.peft \\(method 'prompt'\\) and train.train_top_layers = 1 contradict: .*freezes "
     "every parameter prompt trains"),
    (["train.peft={method: lora}", "train.train_only=[heads]"], "never unfreeze base weights"),
    (["train.peft={r: 4}"], "needs a method: one of lora, adapter, prompt, bitfit, full"),
    (["train.peft={method: prompt, n_token: 5}"],
     "train.peft.n_token .*options: n_tokens, init_from_vocab, per_task"),
    (["train.peft={method: lora, r: -1}"], "train.peft.r = -1 is invalid"),
    (["train.peft={method: prompt, n_tokens: 70}"], "make 134 positions, more than "
     "model.max_length = 128"),
    (["train.peft={method: prompt}", "sharing.strategy=none", "sharing.cross_stitch=true"],
     "does not support cross-stitch units"),
])
def test_contradictory_or_invalid_peft_configs_are_refused(overrides, match):
    cfg = _config(*overrides)
    model = _tiny_model(strategy=cfg.sharing.strategy, cross_stitch=cfg.sharing.cross_stitch)
    with pytest.raises(ValueError, match=match):
        adapt(model, cfg)


def test_parameter_counts_are_announced_and_recorded_as_counted_by_hand(tmp_path, capsys):
    cfg = _config("train.peft={method: lora, r: 2}")
    specs = resolve_tasks(cfg)
    (tmp_path / "init").mkdir()
    data, _, model = build_run(cfg, specs, tmp_path / "init", fresh_tokenizer=True)
    d, n_labels = cfg.model.d_model, len(next(s for s in specs if s.name == "parity").labels)
    lora = 2 * 6 * 2 * (d + d)               # q and v of 6 attentions, r (in + out) each
    head = d * d + d + d * n_labels + n_labels  # the classifier MLP (hidden = d_model)
    hand = {"trainable": lora + head, "total": count_parameters(model.config) + lora + head}
    build_parts(cfg, specs, data, model, announce=True)
    assert capsys.readouterr().err == describe_counts(hand) + "\n"
    assert parameter_counts(model) == hand
    assert train_run(cfg, tmp_path / "run", progress=False)["parameters"] == hand


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_export_matches_the_peft_model(tmp_path, method):
    """The ONNX graphs of a LoRA run hold the merged weights (no LoRA tensors) and compute what
    the unmerged PEFT model computes; a prompt-tuned run exports its virtual tokens."""
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (extra [onnx])")
    ort = pytest.importorskip("onnxruntime", reason="the check runs onnxruntime (extra [onnx])")
    run, out = tmp_path / "run", tmp_path / "onnx"
    train_run(_config(f"train.peft={METHODS[method]}"), run, progress=False)
    export_run(run, out, tasks=["reverse"])
    _, _, tokenizer, model = load_run(run, merge=False)
    view = model.for_task("reverse")
    src = torch.randint(4, view.config.vocab_size, (2, 6))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 4:] = False
    tgt = torch.full((2, 1), tokenizer.bos_id)
    encoder = ort.InferenceSession(str(out / "reverse" / "encoder.onnx"))
    decoder = ort.InferenceSession(str(out / "reverse" / "decoder.onnx"))
    (memory,) = encoder.run(None, {"src_ids": src.numpy(), "src_mask": mask.numpy()})
    logits = decoder.run(None, {"tgt_ids": tgt.numpy(), "memory": memory,
                                "src_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected_memory = view.encode(src, mask)
        expected = view.logits(view.decode(tgt, expected_memory, mask))
    torch.testing.assert_close(torch.from_numpy(memory), expected_memory, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
    ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    assert torch.equal(onnx_greedy(out / "reverse", src, mask, max_new_tokens=6, **ids),
                       generate(view, src, mask, max_new_tokens=6, **ids))
    names = [i.name for i in onnx.load(str(out / "reverse" / "encoder.onnx")).graph.initializer]
    assert not any("lora" in n for n in names)
