"""``polytask generate`` / ``eval`` / ``export`` and their weights: generate predicts on
evaluation's input path (every head kind reproduces ``experiments.evaluate.predict``), its
decoding options work and are checked, and ``--weights best|last`` loads the file it names."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytask.core.accelerate import accelerated
from polytask.core.training.checkpoint import model_state
from polytask.core.training.manifest import record_files, remove_file
from polytask.experiments.cli import main
from polytask.experiments.config import RunConfig
from polytask.experiments.evaluate import eval_options, predict
from polytask.experiments.runs import (Decoding, generate_text, load_run, predict_records,
                                       source_example, train_run)
from polytask.experiments.suite import load_suite

N = 6  # examples compared with evaluation's predictions


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A few steps on copy (lm, templates), parity (classifier head), a parity task with a
    rank head, and ``say``: a template-less task whose records all carry the instruction "Say it."."""
    root = tmp_path_factory.mktemp("gen")
    say = root / "say.jsonl"
    say.write_text("".join(json.dumps({"instruction": "Say it.", "input": x, "output": x}) + "\n"
                           for x in ("1 2", "3 4 5", "6", "7 8", "9 0 1", "2 2")))
    bits = root / "bits.jsonl"
    bits.write_text("".join(json.dumps({"input": x, "output": "odd" if x.count("1") % 2 else "even"})
                            + "\n" for x in ("1 0", "1 1", "0 0 1", "1 1 1", "0", "1 0 1")))
    split = lambda path: {s: str(path) for s in ("train", "validation", "test")}
    copy, parity = load_suite("tiny")[0], load_suite("tiny")[2]
    tasks = [copy, parity, {"name": "parity_rank", "kind": "classification", "head": "rank",
                            "labels": ["even", "odd"], "group": "generation",
                            "templates": ["Odd or even? {input}"], "files": split(bits)},
             {"name": "say", "files": split(say)}]
    cfg = RunConfig.from_dict({
        "tasks": tasks, "model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1,
                                  "n_decoder_layers": 1, "d_ff": 64, "dropout": 0.0},
        "data": {"vocab_size": 64, "max_source_len": 48, "max_target_len": 16,
                 "eval_examples": N},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 3, "save_every": 6, "generation_max_tokens": 8}})
    train_run(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run)


def _records(data, task, split="test"):
    return [{"input": ex.meta["input"]} for ex in data.examples[task][split][:N]]


@pytest.mark.parametrize("task", ["copy", "parity", "parity_rank", "say"])
def test_generate_reproduces_evaluation_predictions(loaded, task):
    cfg, data, tokenizer, model = loaded
    with accelerated(model):
        want, _ = predict(model, data, tokenizer, task, "test", **{**eval_options(cfg), "limit": N})
    got = predict_records(*loaded, task, _records(data, task), Decoding())
    assert [r["prediction"] for r in got] == want
    if task != "copy" and task != "say":
        assert set(want) <= set(data.specs[task].labels)


@pytest.mark.parametrize("task", ["copy", "parity", "say"])
def test_sources_are_evaluations_sources(loaded, task):
    _, data, _, _ = loaded
    for i, ex in enumerate(data.examples[task]["test"][:N]):
        assert source_example(data, task, {"input": ex.meta["input"]}).source == \
            data.get(task, "test", i).source


def test_template_less_task_uses_the_given_or_shared_instruction(loaded):
    _, data, _, _ = loaded
    assert source_example(data, "say", {"input": "4"}).source == "Say it. [SEP] 4"
    assert source_example(data, "say", {"input": "4", "instruction": "Echo."}).source == \
        "Echo. [SEP] 4"


def test_no_shared_instruction_needs_one(loaded):
    _, data, _, _ = loaded
    mixed = replace(data, examples={**data.examples, "say": {"train": [
        replace(e, meta={**e.meta, "instruction": f"Say {i}."})
        for i, e in enumerate(data.examples["say"]["train"])]}})
    with pytest.raises(ValueError, match="6 different instructions .*--instruction"):
        source_example(mixed, "say", {"input": "4"})


@pytest.mark.parametrize("task, head", [("parity", "classifier"), ("parity_rank", "rank")])
def test_scores_give_every_label_and_pick_the_best(loaded, task, head):
    _, data, _, _ = loaded
    for r in predict_records(*loaded, task, _records(data, task), Decoding(scores=True)):
        assert set(r["scores"]) == set(data.specs[task].labels)
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)


def test_sampling_repeats_for_a_seed_and_differs_between_seeds(loaded):
    _, data, _, _ = loaded
    recs = _records(data, "copy")[:2]
    sample = lambda seed: [r["predictions"] for r in predict_records(
        *loaded, "copy", recs, Decoding("sample", temperature=3.0, seed=seed, num_sequences=3))]
    first = sample(1)
    assert first == sample(1)
    assert all(len(p) == 3 for p in first)
    assert any(sample(s) != first for s in (2, 3, 4))


def test_beam_with_one_beam_and_no_penalty_is_greedy(loaded):
    _, data, _, _ = loaded
    recs = _records(data, "copy")
    greedy = predict_records(*loaded, "copy", recs, Decoding())
    assert predict_records(*loaded, "copy", recs,
                           Decoding("beam", num_beams=1, length_penalty=0.0)) == greedy


@pytest.mark.parametrize("options, message", [
    (dict(method="nucleus"), "unknown method 'nucleus'; choices: greedy, beam, sample"),
    (dict(temperature=0.5), "--temperature only apply to --method sample, not greedy"),
    (dict(method="sample", num_beams=3), "--num-beams only apply to --method beam"),
    (dict(method="beam", num_sequences=2), "num_sequences (2) > 1 needs --method sample"),
    (dict(num_sequences=0), "num_sequences (0) must be >= 1"),
])
def test_bad_decoding_options(options, message):
    with pytest.raises(ValueError) as err:
        Decoding(**options)
    assert message in str(err.value)


def test_weights_choose_the_file(run, tmp_path):
    """A copy whose best.safetensors holds other weights: default and ``best`` load it,
    ``last`` loads model.safetensors; without best, ``best`` falls back to model."""
    other = tmp_path / "run"
    shutil.copytree(run, other)
    last = load_file(str(other / "model.safetensors"))
    save_file({k: v + 1.0 for k, v in last.items()}, str(other / "best.safetensors"))
    record_files(other, ["best.safetensors"])   # the run's manifest: the new file is meant
    for weights, want in ((None, "best"), ("best", "best"), ("last", "model")):
        kw = {} if weights is None else {"weights": weights}
        state = model_state(load_run(other, **kw)[3])
        expected = load_file(str(other / f"{want}.safetensors"))
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    # a run that never validated (no best file, no summary naming a best step)
    remove_file(other / "best.safetensors")
    (other / "summary.json").unlink()
    state = model_state(load_run(other)[3])
    assert all(torch.equal(state[k], v) for k, v in last.items())


def test_eval_default_is_the_summary_score(run, capsys):
    assert main(["eval", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out) == pytest.approx(summary["test"])


def test_cli_notes_a_missing_best(run, tmp_path, capsys):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    remove_file(other / "best.safetensors")   # a run that never validated
    (other / "summary.json").unlink()
    assert main(["generate", str(other), "--task", "parity", "--input", "1 0 1"]) == 0
    captured = capsys.readouterr()
    assert "has no best.safetensors (it never validated); using model.safetensors" in captured.err
    assert captured.out.strip() in ("odd", "even")


def test_cli_single_input_matches_generate_text(run, capsys):
    assert main(["generate", str(run), "--task", "copy", "--input", "1 2 3"]) == 0
    want = generate_text(run, "copy", "1 2 3", max_new_tokens=None)  # the run's, as the CLI
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", str(run), "--task", "parity_rank", "--input", "1 1", "--scores"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["scores"]) == {"odd", "even"} and out["prediction"] in out["scores"]
    assert generate_text(run, "parity_rank", "1 1") == out["prediction"]


def test_cli_batch_jsonl(run, loaded, tmp_path, capsys):
    _, data, _, _ = loaded
    src = tmp_path / "in.jsonl"
    recs = _records(data, "say") + [{"input": "5 5", "instruction": "Echo."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(run), "--task", "say", "--input-file", str(src),
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == predict_records(*loaded, "say", recs, Decoding())
    assert [r["input"] for r in rows] == [r["input"] for r in recs]
    assert main(["generate", str(run), "--task", "say", "--input-file", str(src)]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope", "--input", "1"], "unknown task 'nope'; tasks: copy, parity, parity_rank, say"),
    (["--task", "parity", "--input", "1", "--method", "beam"],
     "task 'parity' has a classifier head: its label is chosen by scoring"),
    (["--task", "parity_rank", "--input", "1", "--max-new-tokens", "3"], "drop --max-new-tokens"),
    (["--task", "copy", "--input", "1", "--scores"], "--scores needs a classification task"),
    (["--task", "copy", "--input", "1", "--instruction", "x"], "task 'copy' has templates"),
    (["--task", "copy", "--input", "1", "--top-k", "5"], "--top-k only apply to --method sample"),
    (["--task", "copy", "--input", "1", "--method", "sample", "--top-p", "2"], "top_p (2.0) must be in (0, 1]"),
    (["--task", "copy", "--input", "1", "--output", "o.jsonl"], "--output needs --input-file"),
    (["--task", "copy"], "one of the arguments --input --input-file is required"),
    (["--task", "copy", "--input", "1", "--weights", "first"], "invalid choice: 'first'"),
    (["--task", "copy", "--input", "1", "--max-new-tokens", "100000"],
     "--max-new-tokens 100000 exceeds model.max_length = 512 of the run's learned positions"),
])
def test_cli_errors_are_one_line(run, extra, message, capsys):
    assert main(["generate", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytask: error: ") and message in err and err.count("\n") == 1


def test_bad_input_file_record_is_one_line(run, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "1"}) + "\n")
    assert main(["generate", str(run), "--task", "copy", "--input-file", str(src)]) == 2
    err = capsys.readouterr().err
    assert "needs a string 'input'" in err and err.count("\n") == 1
