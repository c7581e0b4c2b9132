"""``polytask pretrain``: self-supervised pretraining on a raw-text corpus written by the test.

Classes of checks (the report counts them): the run directory a run leaves (files, events,
summary, manifest); bit-exact resume; ``init:`` of a task run starting from the pretraining
run (step-0 logits equal the pretrained EncoderDecoder's); bad input refused in one line
naming the key or file (exit status 2 through the CLI).
"""
from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polytask.core.model.transformer import EncoderDecoder
from polytask.core.training.checkpoint import LATEST, load_weights
from polytask.experiments.cli import main
from polytask.experiments.config import RunConfig, init_kind, init_model_config
from polytask.experiments.pretrain import pretrain
from polytask.experiments.pretrain_config import (PretrainConfig, load_pretrain_config,
                                                  resume_pretrain_config)

WORDS = ("the cat dog bird sat ran flew on under over a mat tree house red green blue small big "
         "quick slow happy sad river hill stone light dark water fire wind").split()
MODEL = {"d_model": 16, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1, "d_ff": 32,
         "dropout": 0.1, "max_length": 40}


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(n)]


def _config(corpus: Path, **sections) -> dict:
    data = {"model": dict(MODEL),
            # 3 noise spans a chunk: the noise generator decides where (1 span would not)
            "pretrain": {"corpus": [str(corpus)], "chunk_tokens": 24, "sentinels": 8,
                         "noise_density": 0.25, "mean_span_length": 2.0,
                         "shuffle_buffer": 8, "validation_every": 5, "eval_batches": 2,
                         "tokenizer_documents": 200},
            "data": {"vocab_size": 80},
            "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2,
                      "warmup_steps": 1, "lr": 3e-3}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(d + "\n" for d in _documents(300)))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(PretrainConfig.from_dict(_config(corpus)), out, progress=False)
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the run directory ----------------------------------------------------------------------

def test_the_run_directory_holds_what_init_needs(run):
    for name in ("config.json", "tokenizer.model", "metrics.jsonl", "model.safetensors",
                 "best.safetensors", "summary.json", "manifest.json", f"checkpoints/{LATEST}"):
        assert (run / name).is_file(), name
    listed = json.loads((run / "manifest.json").read_text())["files"]
    assert {"config.json", "tokenizer.model", "best.safetensors", "model.safetensors"} <= \
        set(listed)
    assert init_kind(run) == "pretrain"
    assert json.loads((run / "config.json").read_text())["pretrain"]["objective"] == \
        "span_corruption"


def test_metrics_and_summary(run):
    records = _records(run)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "step_s"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    best = min(evals, key=lambda r: r["loss"])
    assert summary["status"] == "ok" and summary["steps"] == 4
    assert summary["best_validation_loss"] == best["loss"] and summary["best_step"] == best["step"]
    assert summary["final_validation_loss"] == evals[-1]["loss"]
    assert summary["tokens_seen"] == 4 * 4 * 24          # steps x batch x chunk_tokens
    assert summary["corpus"]["documents"] == 300 and summary["corpus"]["tokens"] > 300
    assert summary["objective"] == "span_corruption" and summary["train_seconds"] > 0


def test_best_weights_are_the_lowest_validation_loss(run, corpus):
    """``best.safetensors`` scores the best validation loss again (an oracle: re-evaluate)."""
    from polytask.experiments.pretrain import validation_loss
    from polytask.experiments.pretrain_data import noiser, validation_rows
    from polytask.experiments.build import load_run_tokenizer
    cfg = PretrainConfig.from_dict(_config(corpus))
    model = EncoderDecoder(init_model_config(run, None))
    load_weights(run / "best.safetensors", model)
    tokenizer = load_run_tokenizer(run)
    batches = validation_rows(cfg, cfg.pretrain.paths(), tokenizer, noiser(cfg, tokenizer))
    summary = json.loads((run / "summary.json").read_text())
    assert validation_loss(cfg, model, tokenizer, batches) == pytest.approx(
        summary["best_validation_loss"], rel=1e-5)


# --- resume ---------------------------------------------------------------------------------

def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_resume_from_an_earlier_checkpoint_ends_bit_identical(run, tmp_path):
    """The kill is simulated by putting the directory back to its step-2 checkpoint."""
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / LATEST).write_text("step-00000002")
    (cut / "summary.json").unlink()
    assert main(["pretrain", "--resume", str(cut), "--no-progress"]) == 0
    a, b = _weights(run), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")}
                        for r in rs]
    assert strip(_records(run)) == strip(_records(cut))
    assert torch.equal(load_file(str(run / "best.safetensors"))["embed_tokens.weight"],
                       load_file(str(cut / "best.safetensors"))["embed_tokens.weight"])


def test_resume_refuses_settings_its_state_depends_on(run):
    with pytest.raises(ValueError, match=r"pretrain.noise_density cannot change .* only train.lr"):
        resume_pretrain_config(run, ["pretrain.noise_density=0.3"])
    cfg = resume_pretrain_config(run, ["train.max_steps=6"])
    assert cfg.train.max_steps == 6 and cfg.pretrain.chunk_tokens == 24


def test_resume_may_train_longer(run, tmp_path):
    """``--resume RUN_DIR train.max_steps=6`` continues a finished run from its last
    checkpoint, and ``metrics.jsonl`` records what changed."""
    more = tmp_path / "more"
    shutil.copytree(run, more)
    assert main(["pretrain", "--resume", str(more), "train.max_steps=6", "--no-progress"]) == 0
    records = _records(more)
    assert {"event": "resume", "step": 4, "changed": {"train.max_steps": 6},
            "previous": {"train.max_steps": 4}} in records
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert json.loads((more / "summary.json").read_text())["steps"] == 6
    assert json.loads((more / "config.json").read_text())["train"]["max_steps"] == 6


def test_a_fresh_run_never_mixes_into_a_finished_one(run, corpus, tmp_path, capsys):
    """The same config again reuses the complete run (a lifecycle job's slow step), touching
    nothing; another config there, or a fresh run over an unfinished one, is refused."""
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
    summary = pretrain(PretrainConfig.from_dict(_config(corpus)), run, progress=False)
    assert summary == json.loads((run / "summary.json").read_text())
    assert "already holds this pretraining run, complete (4 steps): reused" in \
        capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()} == before
    with pytest.raises(ValueError, match=r"already holds another pretraining run "
                                         r"\(train.max_steps = 4 there, 5 here\)"):
        pretrain(PretrainConfig.from_dict(_config(corpus, train={"max_steps": 5})), run,
                 progress=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"already holds a run; continue it with `polytask "
                                         r"pretrain --resume"):
        pretrain(PretrainConfig.from_dict(_config(corpus)), unfinished, progress=False)


# --- init: ----------------------------------------------------------------------------------

def test_train_with_init_starts_from_the_pretrained_weights(run, tmp_path):
    """``polytask train`` with ``init:`` the pretraining run and ``max_steps: 0``: a task's
    step-0 logits equal the pretrained EncoderDecoder's on the same batch (fp32, exactly)."""
    from polytask.experiments.train import train
    from polytask.experiments.runs import load_run
    cfg = RunConfig.from_dict({
        "init": str(run), "tasks": "tiny", "model": {"dropout": 0.0},
        "data": {"max_source_len": 32, "max_target_len": 16, "eval_examples": 4,
                 "test_examples": 4},
        "train": {"max_steps": 0, "batch_size": 4, "generation_max_tokens": 8}})
    assert cfg.model.d_model == 16 and cfg.model.max_length == 40
    train(cfg, cfg.specs(), tmp_path / "task", progress=False)
    _, _, tokenizer, model = load_run(tmp_path / "task", weights="last")
    pretrained = EncoderDecoder(init_model_config(run, {"dropout": 0.0}))
    load_weights(run / "best.safetensors", pretrained)
    assert tokenizer.vocab_size == pretrained.config.vocab_size
    src = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    tgt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("a red tree")])
    model.eval(), pretrained.eval()
    with torch.no_grad():
        want = pretrained(src, tgt)
        for task in model.tasks:   # hard sharing: every task's column is the pretrained one
            assert torch.equal(model.for_column(task.name)(src, tgt), want), task.name


def test_pretraining_continues_from_init_with_its_tokenizer(run, corpus, tmp_path):
    data = _config(corpus, train={"max_steps": 1}, pretrain={"objective": "text_infilling"})
    data.pop("model"), data.pop("data")
    data["init"] = str(run)
    out = tmp_path / "more"
    summary = pretrain(PretrainConfig.from_dict(data), out, progress=False)
    assert summary["steps"] == 1 and summary["objective"] == "text_infilling"
    assert (out / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match=r"model.d_model = 32 contradicts the init checkpoint"):
        PretrainConfig.from_dict({**data, "model": {"d_model": 32}})
    more = {**data, "pretrain": {**data["pretrain"], "sentinels": 9}}
    with pytest.raises(ValueError, match=rf"pretrain.sentinels = 9 but the tokenizer of init: "
                                         rf"{run} has 8 sentinel pieces"):
        pretrain(PretrainConfig.from_dict(more), tmp_path / "fewer", progress=False)


def test_non_finite_losses_stop_the_run_and_say_so(corpus, tmp_path, monkeypatch):
    import polytask.experiments.pretrain as loop
    real = loop._loss_sum
    monkeypatch.setattr(loop, "_loss_sum", lambda *a: real(*a) * float("nan"))
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps with non-finite loss .* "
                                                 r"stopped at step 2; .* status non-finite"):
        pretrain(PretrainConfig.from_dict(_config(corpus, train={"max_bad_steps": 2})), out,
                 progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "non-finite" and summary["bad_steps"] == 2
    assert [r["finite"] for r in _records(out) if r["event"] == "train"] == [False]


# --- bad input: one line naming the key or the file, exit status 2 --------------------------

def _cli_error(capfd, config: dict, path: Path, *overrides: str) -> str:
    path.write_text(json.dumps(config))
    rc = main(["pretrain", str(path), *overrides, "--out", str(path.parent / "out"),
               "--no-progress"])
    _, err = capfd.readouterr()
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("change, message", [
    ({"pretrain": {"objective": "mlm"}},
     r"pretrain.objective = 'mlm' is invalid: expected one of 'span_corruption', 'text_inf"),
    ({"pretrain": {"sentinels": 0}}, r"pretrain.sentinels = 0 but pretrain.objective"),
    ({"pretrain": {"sentinels": 2, "noise_density": 0.5}},
     r"pretrain.sentinels = 2 but a chunk of pretrain.chunk_tokens = 24 has 6 noise spans"),
    ({"pretrain": {"chunk_tokens": 40}},
     r"pretrain.chunk_tokens = 40 needs 41 positions .* model.max_length = 40"),
    ({"data": {"vocab_size": 12}}, r"data.vocab_size = 12 leaves no pieces .*sentinels = 8"),
    ({"train": {"peft": {"method": "lora"}}}, r"train.peft = .* has no meaning in pretraining"),
    ({"pretrain": {"colour": 1}}, r"unknown config key pretrain.colour; known keys: corpus"),
    ({"tasks": "tiny"}, r"unknown pretrain config section 'tasks'; known: model, pretrain"),
])
def test_bad_config_values_are_one_line(capfd, tmp_path, corpus, change, message):
    err = _cli_error(capfd, _config(corpus, **change), tmp_path / "c.yaml")
    assert __import__("re").search(message, err), err


def test_missing_corpus_file(capfd, tmp_path, corpus):
    err = _cli_error(capfd, _config(corpus), tmp_path / "c.yaml",
                     f"pretrain.corpus=[{tmp_path / 'nope.txt'}]")
    assert f"pretrain.corpus: {tmp_path / 'nope.txt'}: no such file" in err


def test_empty_corpus(capfd, tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    err = _cli_error(capfd, _config(corpus, pretrain={"corpus": [str(tmp_path / "empty.txt")]}),
                     tmp_path / "c.yaml")
    assert f"pretrain.corpus: {tmp_path / 'empty.txt'}: no training documents" in err


def test_jsonl_without_the_field(capfd, tmp_path, corpus):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in _documents(20)))
    err = _cli_error(capfd, _config(corpus, pretrain={"corpus": [str(path)]}), tmp_path / "c.yaml")
    assert f"pretrain.field = 'text'): {path}:1: no 'text' key (keys: body)" in err


def test_init_that_is_not_a_pretraining_run(capfd, tmp_path, corpus):
    other = tmp_path / "task-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": {}, "tasks": "tiny"}))
    err = _cli_error(capfd, {**_config(corpus), "init": str(other)}, tmp_path / "c.yaml")
    assert f"init: {other} is not a pretraining run directory" in err


def test_the_shipped_config_loads():
    cfg = load_pretrain_config(Path(__file__).parents[2] / "experiments/configs/pretrain.yaml")
    quick = RunConfig.from_dict({"model": __import__("yaml").safe_load(
        (Path(__file__).parents[2] / "experiments/configs/quick.yaml").read_text())["model"]})
    assert cfg.model == quick.model and cfg.pretrain.corpus == "builtin"


@pytest.mark.parametrize("length, density, mean", [(24, 0.25, 2.0), (30, 0.15, 3.0),
                                                   (64, 0.15, 3.0), (7, 0.9, 1.0), (2, 0.5, 3.0)])
def test_the_sentinel_check_counts_the_spans_the_noiser_draws(length, density, mean):
    """The config's span count (its sentinel check) is the noising module's, drawn."""
    from polytask.core.data.noising import random_spans_noise_mask
    from polytask.experiments.pretrain_config import PretrainSection
    mask = random_spans_noise_mask(length, np.random.default_rng(0), noise_density=density,
                                   mean_noise_span_length=mean)
    drawn = int(mask[0]) + int(np.sum(mask[1:] & ~mask[:-1]))   # runs of noise
    section = PretrainSection(chunk_tokens=length, noise_density=density, mean_span_length=mean,
                              sentinels=100)
    assert section.noise_spans() == drawn


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, corpus):
    """Under torchrun each rank takes its rows of the same noised global batch; the averaged
    gradients are the global batch's (float64, no dropout: the same numbers either way)."""
    import os
    import subprocess
    import sys
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(_config(corpus, model={"dropout": 0.0},
                                         train={"max_steps": 3, "dtype": "float64"})))
    cli = ["-m", "polytask.experiments.cli", "pretrain", str(config), "--no-progress"]
    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for cmd in ([torchrun, "--standalone", "--nproc_per_node=2", *cli, "--out", "ddp"],
                [sys.executable, *cli, "--out", "single"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert ddp.keys() == single.keys()
    for name in ddp:
        # atol: a key projection's bias has a zero gradient (softmax ignores it); its
        # round-off, ~1e-12, differs with the order of the sums
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-7, atol=1e-9, msg=name)
    losses = [[r["loss"] for r in _records(tmp_path / d) if r["event"] == "train"]
              for d in ("ddp", "single")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-9)
    earlier = load_file(str(tmp_path / "ddp/checkpoints/step-00000002/model.safetensors"))
    assert not torch.equal(earlier["embed_tokens.weight"], ddp["embed_tokens.weight"])  # moved


def test_collated_rows_frame_the_decoder_and_padding_changes_no_loss(run):
    """``[bos] + targets`` in, ``targets + [eos]`` out; a row's loss is the same alone as in a
    padded batch (the masks hide the padding)."""
    from polytask.experiments.build import load_run_tokenizer
    from polytask.experiments.pretrain import _loss_sum
    from polytask.experiments.pretrain_config import read_pretrain_config
    from polytask.experiments.pretrain_data import collate_rows
    tok = load_run_tokenizer(run)
    rows = [([7, 8, 9, 10, 11], [12, 13]), ([14, 15], [16, 17, 18, 19])]
    batch = collate_rows(rows, tok, "cpu")
    assert batch["tgt_ids"].tolist() == [[tok.bos_id, 12, 13, 0, 0], [tok.bos_id, 16, 17, 18, 19]]
    assert batch["labels"].tolist() == [[12, 13, tok.eos_id, -100, -100],
                                        [16, 17, 18, 19, tok.eos_id]]
    assert batch["src_mask"].sum(1).tolist() == [5, 2]
    assert batch["tgt_mask"].sum(1).tolist() == [3, 5]
    cfg = read_pretrain_config(run)
    model = EncoderDecoder(init_model_config(run, {"dropout": 0.0})).eval()
    load_weights(run / "model.safetensors", model)
    with torch.no_grad():
        alone = sum(float(_loss_sum(cfg, model, collate_rows([r], tok, "cpu"))) for r in rows)
        together = float(_loss_sum(cfg, model, batch))
    assert together == pytest.approx(alone, rel=1e-5)
