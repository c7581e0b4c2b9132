"""``train.save_base: false``: a run from a pretrained checkpoint (``init:``, here a tiny Hugging
Face T5 built in the test) keeps only what it trained — LoRA and head tensors — in every
weights file, names its base in ``base.json`` with the base's SHA-256, and rebuilds the base on
load. Oracles: an otherwise identical run with ``train.save_base: true`` (same seed) and an
uninterrupted run; the digest is recomputed here with ``hashlib``."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from hf_checkpoints import t5_dir  # noqa: E402

from polytask.core.data.tasks import TaskSpec  # noqa: E402
from polytask.core.model.config import ModelConfig  # noqa: E402
from polytask.core.peft import apply_peft  # noqa: E402
from polytask.core.training.checkpoint import LATEST, model_state, save_weights  # noqa: E402
from polytask.experiments.adapt import adapt, trained_names  # noqa: E402
from polytask.experiments.build import base_weight_files, build_run, init_backbone  # noqa: E402
from polytask.experiments.config import RunConfig  # noqa: E402
from polytask.experiments.runs import evaluate_run, generate_text, load_run, train_run  # noqa: E402
from polytask.heads import build_model  # noqa: E402

INPUTS = ["the quick brown fox", "summarize: the cat sat", "reverse the digits 3 1 4",
          "question: what is two plus two?", "the answer is yes", "café naïve"]
TIMING = ("tokens_per_s", "max_rss_mb", "step_s")   # wall-clock and memory: may differ
LORA = {"method": "lora", "r": 2}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return t5_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def base(hf_base):
    return hf_base[0]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[dict]:
    """An echo task (the LM head) and a classification task (a new classifier head)."""
    root = tmp_path_factory.mktemp("tasks")
    splits = ("train", "validation", "test")
    rows = {"echo": [(x, x) for x in INPUTS],
            "cls": [(x, "yes" if i % 2 else "no") for i, x in enumerate(INPUTS)]}
    for name, pairs in rows.items():
        for split in splits:
            (root / f"{name}.{split}.jsonl").write_text("".join(
                json.dumps({"task": name, "instruction": "", "input": x, "output": y}) + "\n"
                for x, y in pairs))
    files = lambda name: {s: str(root / f"{name}.{s}.jsonl") for s in splits}
    return [{"name": "echo", "templates": ["{input}"], "files": files("echo")},
            {"name": "cls", "kind": "classification", "labels": ["no", "yes"],
             "head": "classifier", "templates": ["{input}"], "files": files("cls")}]


def run_config(init: Path, tasks: list[dict], **train) -> RunConfig:
    return RunConfig.from_dict({
        "init": str(init), "tasks": tasks, "sharing": {"strategy": "hard"},
        "data": {"max_source_len": 32, "max_target_len": 24, "eval_examples": 6},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2,
                  "lr": 1e-2, "generation_max_tokens": 8, "peft": LORA, **train}})


@pytest.fixture(scope="module")
def runs(base, tasks, tmp_path_factory):
    """The same LoRA run twice, with the whole model saved and with the trained tensors only."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, save_base in (("full", True), ("small", False)):
        out[name] = root / name
        out[f"{name}-summary"] = train_run(run_config(base, tasks, save_base=save_base),
                                           out[name], progress=False)
    return out


def _weight_files(run: Path) -> list[Path]:
    files = [run / "model.safetensors", run / "best.safetensors",
             *sorted((run / "checkpoints").glob("step-*/model.safetensors"))]
    assert len(files) == 4     # the steps 2 and 4 checkpoints
    return files


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_small_files_hold_only_lora_and_head_tensors(runs, base):
    full, small = runs["full"], runs["small"]
    whole = load_file(str(full / "model.safetensors"))
    for path in _weight_files(small):
        names = set(load_file(str(path)))
        lora = {n for n in names if n.endswith((".lora_A", ".lora_B"))}
        heads = {n for n in names if n.startswith("heads.")}
        assert lora and heads and names == lora | heads, path
        assert names < set(whole)
    for path in _weight_files(full):
        assert set(load_file(str(path))) == set(whole)
    # 61,696 bytes and 7,072 bytes on 2026-12-05 (d_model 16; LoRA r 2 on q, v; one head)
    sizes = {name: (runs[name] / "model.safetensors").stat().st_size for name in ("full", "small")}
    assert sizes["small"] * 5 < sizes["full"]
    manifest = json.loads((small / "base.json").read_text())
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert manifest == {"init": str(base), "path": str(base.resolve()), "kind": "hf",
                        "sha256": {"model.safetensors": digest}}
    assert not (full / "base.json").exists()


def test_a_small_run_evaluates_and_generates_as_the_full_run(runs):
    full, small = runs["full"], runs["small"]
    assert _records(full) == _records(small)      # training itself is the same
    assert runs["full-summary"]["test"] == runs["small-summary"]["test"]   # test: best weights
    assert evaluate_run(full) == evaluate_run(small)
    for text in INPUTS[:3]:
        assert generate_text(full, "echo", text) == generate_text(small, "echo", text)
    for merge in (True, False):
        a, b = (model_state(load_run(r, merge=merge)[3]) for r in (full, small))
        assert _same_tensors(a, b)


def test_a_small_run_resumes_bit_identically(runs, base, tasks, tmp_path):
    small = runs["small"]
    part = tmp_path / "part"          # rewound to its step-2 checkpoint, as if killed there
    shutil.copytree(small, part)
    (part / "checkpoints" / LATEST).write_text("step-00000002")
    (part / "summary.json").unlink()
    shutil.copy(small / "checkpoints" / "step-00000002" / "model.safetensors", part)
    summary = train_run(run_config(base, tasks, save_base=False), part, resume=True,
                        progress=False)
    assert summary["test"] == runs["small-summary"]["test"]
    assert _records(part) == _records(small)
    for name in ("model.safetensors", "best.safetensors"):
        assert _same_tensors(load_file(str(part / name)), load_file(str(small / name)))


@pytest.mark.parametrize("peft, theirs", [({"method": "adapter", "bottleneck": 2}, ".adapter."),
                                         ({"method": "prompt", "n_tokens": 2}, ".prompt")])
def test_adapter_and_prompt_runs_save_small_and_reload(base, tasks, tmp_path, peft, theirs):
    run = tmp_path / "run"
    summary = train_run(run_config(base, tasks, save_base=False, peft=peft, max_steps=2), run,
                        progress=False)
    names = list(load_file(str(run / "model.safetensors")))
    assert all(theirs in f"{n}." or n.startswith("heads.") for n in names)
    assert any(theirs in f"{n}." for n in names)
    assert evaluate_run(run) == summary["test"]   # one validation (step 2): best = final


def test_init_from_a_small_run_equals_init_from_the_full_run(runs):
    a, b = (init_backbone(str(runs[name])) for name in ("full", "small"))
    assert _same_tensors(model_state(a), model_state(b))


def test_a_small_file_must_hold_exactly_the_trained_tensors(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["small"], run)
    state = load_file(str(run / "model.safetensors"))
    dropped = sorted(n for n in state if n.endswith(".lora_B"))[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(run / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"trained tensors only\): .*missing tensors: "
                                         rf"{re.escape(dropped)}$"):
        load_run(run, weights="last")
    shutil.copy(runs["full"] / "model.safetensors", run)     # the whole model: too much
    with pytest.raises(ValueError, match=r"unexpected tensors: .*slots\.encoder.*\.q_proj\.base"):
        load_run(run, weights="last")


def test_a_changed_or_missing_base_is_refused(base, tasks, tmp_path):
    copy = tmp_path / "t5"
    shutil.copytree(base, copy)
    run = tmp_path / "run"
    train_run(run_config(copy, tasks, save_base=False, max_steps=0), run, progress=False)
    load_run(run)                                                  # the base as recorded
    weights = copy / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 1.0                                # one tensor rewritten
    save_file(state, str(weights), metadata={"format": "pt"})
    after = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: the base checkpoint "
                                         rf"changed .* expected SHA-256 {before} .* found {after};"
                                         r" .* put the original base checkpoint back at "):
        load_run(run)
    with pytest.raises(ValueError, match=f"found {after}"):        # resuming checks it too
        train_run(run_config(copy, tasks, save_base=False, max_steps=0), run, resume=True,
                  progress=False)
    shutil.rmtree(copy)
    with pytest.raises(ValueError, match=rf"{re.escape(str(copy.resolve()))}: the base "
                                         rf"checkpoint of .* is missing \(expected "
                                         rf"model.safetensors with SHA-256 {before}\)"):
        load_run(run)


def test_the_base_weights_are_the_files_init_loads(hf_base, runs, tmp_path):
    """A Hugging Face directory: model.safetensors, else every shard of its index; a run: its
    best.safetensors if kept, else its model.safetensors."""
    _, hf, _ = hf_base
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert base_weight_files(tmp_path / "sharded") == [tmp_path / "sharded" / s for s in shards]
    run = tmp_path / "run"
    shutil.copytree(runs["small"], run)
    assert base_weight_files(run) == [run / "best.safetensors"]
    (run / "best.safetensors").unlink()
    assert base_weight_files(run) == [run / "model.safetensors"]


def test_save_base_false_is_refused_without_init_or_frozen_parameters(base, tasks, tmp_path):
    no_init = RunConfig.from_dict({"tasks": tasks, "train": {"save_base": False}})
    with pytest.raises(ValueError, match="train.save_base = false .* this run has no init:"):
        build_run(no_init, [], tmp_path, fresh_tokenizer=True)
    assert not any(tmp_path.iterdir())                             # refused before any file
    specs = [TaskSpec.from_dict(t) for t in tasks]
    for peft in ({}, {"method": "full"}):
        cfg = run_config(base, tasks, save_base=False, peft=peft)
        _, _, model = build_run(cfg, specs, tmp_path / str(bool(peft)), fresh_tokenizer=True)
        with pytest.raises(ValueError, match=r"train.save_base = false .* nothing of the "
                                             r"backbone is frozen .* every tensor anyway"):
            adapt(model, cfg)
    with pytest.raises(ValueError, match="train.save_base = 'no' is invalid: expected bool"):
        run_config(base, tasks, save_base="no")


def test_trained_names_are_what_the_base_lacks(tasks):
    """Trainable parameters, all of the new modules (a frozen head too) and the buffers PEFT's
    modules add; never the frozen backbone, nor a buffer of a wrapped base layer."""
    config = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                         n_decoder_layers=1)
    model = build_model(config, [TaskSpec.from_dict(t) for t in tasks], {"strategy": "hard"})
    apply_peft(model, "lora", r=2)
    lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
    lora.register_buffer("peft_buffer", torch.zeros(2))
    lora.base.register_buffer("base_buffer", torch.zeros(2))
    for p in model.head("cls").parameters():
        p.requires_grad_(False)
    names = trained_names(model)
    assert all(n.endswith((".lora_A", ".lora_B", ".peft_buffer")) or n.startswith("heads.")
               for n in names)
    assert sum(n.endswith(".peft_buffer") for n in names) == 1
    heads = {n for n in model_state(model) if n.startswith("heads.")}
    assert heads and heads <= set(names)                           # the frozen head too
    assert not any(n.endswith(".base_buffer") for n in names)
    assert len(names) < len(model_state(model))
    with pytest.raises(ValueError, match="not tensors of the model: nope"):
        save_weights("unused.safetensors", model, names + ["nope"])
