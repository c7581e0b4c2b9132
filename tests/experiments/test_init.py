"""``init:`` — a run that starts from a pretrained Hugging Face T5 or BART checkpoint (built and
saved in the test, nothing downloaded): the run takes the checkpoint's model config and
tokenizer, every sharing strategy starts every task from the pretrained weights (step-0
logits equal Hugging Face's), and with ``train.max_steps: 0`` the saved run generates exactly
what Hugging Face's greedy ``generate`` produces."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_checkpoints import bart_dir, hf_greedy, t5_dir  # noqa: E402

from polytask.core.data.tasks import TaskSpec  # noqa: E402
from polytask.core.decoding.generation import generate  # noqa: E402
from polytask.experiments.build import build_run, init_backbone  # noqa: E402
from polytask.experiments.config import RunConfig  # noqa: E402
from polytask.experiments.runs import generate_text, load_run, train_run  # noqa: E402

INPUTS = ["the quick brown fox", "summarize: the cat sat", "reverse the digits 3 1 4",
          "question: what is two plus two?", "the answer is yes", "café naïve"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"t5": t5_dir(root), "t5-v1.1": t5_dir(root, tied=False), "bart": bart_dir(root)}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """An echo task (template "{input}"), a classification task and a rank task, as JSONL."""
    root = tmp_path_factory.mktemp("tasks")
    answers = [(x, "yes" if i % 2 else "no") for i, x in enumerate(INPUTS)]
    rows = {"echo": [(x, x) for x in INPUTS], "cls": answers, "rank": answers}
    for name, pairs in rows.items():
        for split in ("train", "validation", "test"):
            with open(root / f"{name}.{split}.jsonl", "w") as f:
                for x, y in pairs:
                    f.write(json.dumps({"task": name, "instruction": "", "input": x,
                                        "output": y}) + "\n")
    return root


def specs(root: Path) -> list[dict]:
    files = lambda name: {s: str(root / f"{name}.{s}.jsonl") for s in ("train", "validation", "test")}
    return [
        {"name": "echo", "templates": ["{input}"], "files": files("echo")},
        {"name": "cls", "kind": "classification", "labels": ["no", "yes"], "head": "classifier",
         "templates": ["{input}"], "files": files("cls")},
        {"name": "rank", "kind": "classification", "labels": ["no", "yes"], "head": "rank",
         "group": "generation", "templates": ["{input}"], "files": files("rank")},
    ]


def run_config(init: Path, tasks: list[dict], **sections) -> RunConfig:
    data = {"init": str(init), "tasks": tasks,
            "data": {"max_source_len": 32, "max_target_len": 24, "eval_examples": 6},
            "train": {"max_steps": 0, "batch_size": 4, "eval_every": 1, "save_every": 1,
                      "generation_max_tokens": 12}}
    data.update(sections)
    return RunConfig.from_dict(data)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_the_model_section_comes_from_the_checkpoint(checkpoints, task_files, family):
    path, hf, _ = checkpoints[family]
    cfg = run_config(path, specs(task_files), model={"dropout": 0.3})
    assert (cfg.model.d_model, cfg.model.vocab_size) == (16, hf.config.vocab_size)
    assert cfg.model.dropout == 0.3                          # may differ from the checkpoint
    with pytest.raises(ValueError, match=r"model.d_model = 32 contradicts the init checkpoint "
                                         r".* \(d_model = 16\)"):
        run_config(path, specs(task_files), model={"d_model": 32})
    run_config(path, specs(task_files), model={"d_model": 16})   # repeating it is fine


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    hf = tmp_path / "pickled"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 10, "d_model": 8,
                                                "num_heads": 2, "num_layers": 1, "d_ff": 8}))
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle, which polytask never loads"):
        init_backbone(str(hf))
    assert not marker.exists()


def _hf_logits(hf, tokenizer, texts, targets):
    src = tokenizer(texts, padding=True, return_tensors="pt")
    start = hf.config.decoder_start_token_id
    tgt = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    width = max(map(len, tgt))
    tgt = torch.tensor([t + [hf.config.pad_token_id] * (width - len(t)) for t in tgt])
    with torch.no_grad():
        logits = hf(input_ids=src.input_ids, attention_mask=src.attention_mask,
                    decoder_input_ids=tgt).logits
    return src.input_ids, src.attention_mask.bool(), tgt, logits


@pytest.mark.parametrize("strategy", ["none", "hard", "soft", "hierarchical"])
@pytest.mark.parametrize("family", ["t5", "t5-v1.1", "bart"])
def test_every_strategy_starts_every_task_from_the_pretrained_weights(
        checkpoints, task_files, tmp_path, family, strategy):
    path, hf, tokenizer = checkpoints[family]
    cfg = run_config(path, specs(task_files), sharing={"strategy": strategy})
    tasks = [TaskSpec.from_dict(t) for t in specs(task_files)]
    _, ours_tok, model = build_run(cfg, tasks, tmp_path, fresh_tokenizer=True)
    model.eval()
    assert (tmp_path / "tokenizer").is_dir() and not (tmp_path / "tokenizer.model").exists()
    assert ours_tok.encode_source(INPUTS[0]) == tokenizer(INPUTS[0])["input_ids"]
    src, src_mask, tgt, want = _hf_logits(hf, tokenizer, INPUTS[:4], INPUTS[2:6])
    for name in ("echo", "rank"):                 # the tasks that run the decoder
        with torch.no_grad():
            got = model.for_task(name)(src, tgt, src_mask, torch.ones_like(tgt, dtype=torch.bool))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in model.head("cls").parameters())   # new, to be trained


@pytest.mark.parametrize("family", ["t5", "t5-v1.1", "bart"])
def test_zero_steps_then_generate_equals_hugging_face(checkpoints, task_files, tmp_path, family):
    """``train.max_steps: 0`` evaluates and saves the pretrained model; ``polytask generate``
    on that run gives Hugging Face's greedy tokens for the same input (fp64 on both sides, so
    no argmax near-tie is decided by rounding)."""
    path, hf, tokenizer = checkpoints[family]
    cfg = run_config(path, specs(task_files)[:1], sharing={"strategy": "hard"},
                     train={"max_steps": 0, "batch_size": 4, "eval_every": 1, "save_every": 1,
                            "generation_max_tokens": 12, "dtype": "float64"})
    run = tmp_path / "run"
    summary = train_run(cfg, run, progress=False)
    assert summary["steps"] == 0 and "echo" in summary["test"]
    assert (run / "model.safetensors").is_file() and (run / "best.safetensors").is_file()
    hf64 = hf.to(torch.float64)
    try:
        _, _, _, model = load_run(run)
        src = tokenizer(INPUTS, padding=True, return_tensors="pt")
        want = hf_greedy(hf64, src.input_ids, src.attention_mask, 12)
        got = generate(model.for_task("echo"), src.input_ids, src.attention_mask.bool(),
                       max_new_tokens=12)
        assert torch.equal(got, want)
        assert len({tuple(r) for r in got.tolist()}) > 1      # the inputs steer the output
        for i, text in enumerate(INPUTS[:3]):
            one = hf_greedy(hf64, *tokenizer([text], return_tensors="pt").values(), 48)
            assert generate_text(run, "echo", text) == tokenizer.decode(
                one[0], skip_special_tokens=True)
    finally:
        hf.to(torch.float32)


@pytest.mark.slow
def test_init_from_a_polytask_run(checkpoints, task_files, tmp_path):
    """A run directory as ``init:``: its tokenizer and its (best) weights; the new run's tasks,
    sharing and heads are its own."""
    path, _, _ = checkpoints["t5"]
    first = tmp_path / "first"
    train_run(run_config(path, specs(task_files)[:1], train={
        "max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "lr": 1e-2,
        "generation_max_tokens": 4}), first, progress=False)
    cfg = run_config(first, specs(task_files), sharing={"strategy": "none"})
    assert cfg.model == RunConfig.from_dict(
        json.loads((first / "config.json").read_text()), resolve_init=False).model
    with pytest.raises(ValueError, match="model.n_heads = 2 contradicts"):
        run_config(first, specs(task_files), model={"n_heads": 2})
    tasks = [TaskSpec.from_dict(t) for t in specs(task_files)]
    _, tokenizer, model = build_run(cfg, tasks, tmp_path / "second", fresh_tokenizer=True)
    _, _, _, source = load_run(first)
    from polytask.core.training.checkpoint import load_weights
    load_weights(first / "best.safetensors", source)
    src = torch.tensor([tokenizer.encode_source(x) for x in INPUTS[:1]])
    tgt = torch.tensor([[tokenizer.bos_id, 5, 6]])
    with torch.no_grad():
        want = source.for_task("echo")(src, tgt)
        for name in ("echo", "rank"):
            torch.testing.assert_close(model.eval().for_task(name)(src, tgt), want)
    assert (tmp_path / "second" / "tokenizer").is_dir()


def test_init_from_a_run_that_trained_its_own_tokenizer(tmp_path):
    """A from-scratch run builds its model with its trained tokenizer's vocabulary, whatever its
    config's ``model.vocab_size`` says; ``init:`` from it takes the tokenizer's ids (this failed
    with "the weights have vocab_size = 64 where its config.json gives 8000")."""
    tiny = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.yaml"
    from polytask.experiments.config import load_config
    small = ["data.eval_examples=2", "train.eval_every=1", "train.save_every=1",
             "train.max_steps=1"]
    first = tmp_path / "first"
    train_run(load_config(tiny, small), first, progress=False)
    cfg = load_config(tiny, small + [f"init={first}"])   # tiny's model: the checkpoint's
    assert cfg.model.vocab_size == 64 != RunConfig().model.vocab_size
    train_run(cfg, tmp_path / "second", progress=False)
    assert (tmp_path / "second" / "summary.json").is_file()


@pytest.mark.parametrize("sharing", [["sharing.strategy=mmoe"],
                                     ["sharing.adapters={per: task, r: 2}"]])
def test_init_from_a_run_with_gates_or_adapters_is_refused(tmp_path, sharing):
    """Such a run's columns hold per-task gates or adapters, not a plain backbone: one line,
    never a state-dict mismatch from deep inside loading."""
    tiny = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.yaml"
    from polytask.experiments.config import load_config
    small = ["data.eval_examples=2", "train.eval_every=1", "train.save_every=1",
             "train.max_steps=1"]
    first = tmp_path / "first"
    train_run(load_config(tiny, small + sharing), first, progress=False)
    cfg = load_config(tiny, small + [f"init={first}"])
    with pytest.raises(ValueError, match=r"init: .*first was trained with sharing\.(strategy "
                                         r"'mmoe'|adapters): its layers hold per-task gates"):
        train_run(cfg, tmp_path / "second", progress=False)
