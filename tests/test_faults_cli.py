"""Fault injection for the CLI's one error boundary (issue #23): every damaged input — a task
file, a run directory, a tokenizer, a Hugging Face checkpoint, an unwritable output — ends as
one line ``polytask: error: <file or key>: <problem>`` with exit status 2 and no traceback;
an interrupt exits 130; anything unanticipated is an honest one-line crash report (status 1)
whose traceback is in a file. Mistakes that used to pass silently are refused, and inputs
that used to be refused (a CSV with a byte-order mark, an empty ``--input``) work.

The cases fall in three classes (the report counts them): a traceback escaped, a message did
not name the file, a mistake was accepted.
"""
from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from safetensors import SafetensorError
from safetensors.torch import save_file
import torch

import polytask.experiments.runs as runs
from polytask.core.data.task_data import SPLITS, TaskData, load_task, read_records
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.interop import from_hf, weight_files
from polytask.experiments.cli import main

ROOT = Path(__file__).parents[1]
MODEL = {"d_model": 16, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1, "d_ff": 32,
         "dropout": 0.0}
GOOD = {"instruction": "Say it.", "input": "1 2", "output": "1 2"}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _config(path: Path, tasks: list[dict], **extra) -> Path:
    """A run config (JSON is YAML) for a tiny model (with ``init:``, the checkpoint's)."""
    model = {} if "init" in extra else {"model": MODEL}
    path.write_text(json.dumps({"tasks": tasks, **model, "data": {"vocab_size": 40},
                                "train": {"max_steps": 1, "batch_size": 4}, **extra}))
    return path


def _error_line(capfd, rc: int, want_rc: int = 2) -> str:
    """The one line on stderr, checked to be an error report without a traceback."""
    _, err = capfd.readouterr()
    assert rc == want_rc, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two training steps on four tasks, one of each way a source is built from an input:
    ``echo`` (template ``{input}``: an empty input is an empty source), ``say`` (no templates,
    the records' instruction), ``bits`` (classifier head) and ``bits_rank`` (rank head); and
    ``held``, a held-out task with only a train file (read for demonstrations only)."""
    root = tmp_path_factory.mktemp("faults")
    say = root / "say.jsonl"
    say.write_bytes(_jsonl([{**GOOD, "input": x, "output": x}
                            for x in ("1 2", "3 4 5", "6", "7 8", "9 0 1", "2 2")]))
    bits = root / "bits.jsonl"
    bits.write_bytes(_jsonl([{"input": x, "output": "odd" if x.count("1") % 2 else "even"}
                             for x in ("1 0", "1 1", "0 0 1", "1 1 1", "0", "1 0 1")]))
    split = lambda path: {s: str(path) for s in SPLITS}
    parity = {"kind": "classification", "labels": ["even", "odd"],
              "templates": ["Odd or even? {input}"], "files": split(bits)}
    cfg = _config(root / "run.yaml", [
        {"name": "echo", "templates": ["{input}"], "files": split(say)},
        {"name": "say", "files": split(say)},
        {"name": "bits", **parity},
        {"name": "bits_rank", "head": "rank", "group": "generation", **parity},
        {"name": "held", "held_out": True, "files": {"train": str(say)}}],
        data={"vocab_size": 36},
        train={"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2,
               "generation_max_tokens": 4})
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A copy of the run, to damage."""
    return Path(shutil.copytree(run, tmp_path / "run",
                                ignore=shutil.ignore_patterns("checkpoints")))


# --- task files: damaged gzip, invalid UTF-8, nested JSON, a bad CSV cell ------------------

def _gz_truncated() -> bytes:
    data = gzip.compress(_jsonl([GOOD] * 200))
    return data[:len(data) // 2]


def _gz_corrupt() -> bytes:
    data = bytearray(gzip.compress(_jsonl([{**GOOD, "input": str(i)} for i in range(200)])))
    data[len(data) // 2] ^= 0xFF     # a flipped byte in the deflate stream: zlib.error
    return bytes(data)


DAMAGED_TASK_FILES = {  # case -> (file name, bytes, what the message says after "file[:line]: ")
    # traceback before
    "gz_not_gzip": ("t.jsonl.gz", _jsonl([GOOD]), r": not a readable gzip file"),
    "gz_truncated": ("t.jsonl.gz", _gz_truncated(), r": truncated gzip file"),
    "gz_corrupt": ("t.jsonl.gz", _gz_corrupt(), r": not a readable gzip file \(Error -3 "),
    "nested_json": ("t.jsonl", _jsonl([GOOD]) + b'{"input": ' + b"[" * 100_000 + b"]" * 100_000
                    + b"}\n", r":2: JSON nested too deeply"),
    "csv_field_too_large": ("t.csv", b"instruction,input,output\nSay,1,1\nSay," + b"1" * 200_000
                            + b",1\n", r":3: malformed CSV \(field larger than field limit"),
    # file not named before
    "utf8_jsonl": ("t.jsonl", _jsonl([GOOD, GOOD]) + b'{"instruction": "Say \xff"}\n',
                   r":3: invalid UTF-8 \(byte 0xff"),
    "utf8_csv": ("t.csv", b"instruction,input,output\nSay,1,1\nSay \xe9,2,2\n",
                 r":3: invalid UTF-8 \(byte 0xe9"),
    "utf8_gz": ("t.jsonl.gz", gzip.compress(_jsonl([GOOD]) + b'{"input": "\xc3"}\n'),
                r":2: invalid UTF-8"),
    "utf16": ("t.jsonl", json.dumps(GOOD).encode("utf-16"), r":1: invalid UTF-8"),
}


@pytest.mark.parametrize("case", DAMAGED_TASK_FILES)
def test_a_damaged_task_file_is_one_line_naming_it(case, tmp_path, capfd):
    name, content, problem = DAMAGED_TASK_FILES[case]
    data = tmp_path / name
    data.write_bytes(content)
    cfg = _config(tmp_path / "c.yaml", [{"name": "t", "files": {"train": str(data)}}])
    line = _error_line(capfd, main(["train", str(cfg), "--out", str(tmp_path / "r")]))
    assert re.match(rf"polytask: error: {re.escape(str(data))}{problem}", line), line


@pytest.mark.parametrize("case", ["gz_not_gzip", "gz_truncated", "utf8_csv", "nested_json"])
def test_library_callers_get_the_same_value_error(case, tmp_path):
    """Converted where the file is read, not only in the CLI."""
    name, content, problem = DAMAGED_TASK_FILES[case]
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(data)) + problem):
        list(read_records(data))


def test_subprocess_bad_config_prints_no_traceback(tmp_path):
    data = tmp_path / "t.jsonl.gz"
    data.write_bytes(b"not gzip\n")
    cfg = _config(tmp_path / "c.yaml", [{"name": "t", "files": {"train": str(data)}}])
    proc = subprocess.run([sys.executable, "-m", "polytask.experiments.cli", "train", str(cfg),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == f"polytask: error: {data}: not a readable gzip file (Not a gzipped " \
                          "file (b'no'))\n"


# --- accepted mistakes: unknown splits, BOM files -------------------------------------------

def test_an_unknown_split_key_is_refused_listing_the_splits(tmp_path, capfd):
    data = tmp_path / "t.jsonl"
    data.write_bytes(_jsonl([GOOD]))
    cfg = _config(tmp_path / "c.yaml", [{"name": "t", "files": {"train": str(data),
                                                                  "dev": str(data)}}])
    line = _error_line(capfd, main(["train", str(cfg), "--out", str(tmp_path / "r")]))
    assert line == ("polytask: error: tasks[t].files.dev: unknown split 'dev'; splits: train, "
                    "validation, test")
    spec = TaskSpec(name="t", files={"train": str(data)})
    with pytest.raises(ValueError, match="unknown split 'dev'; splits: train, validation, test"):
        load_task(spec, "dev")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        TaskData.load([spec], splits=("train", "valid"))


def test_eval_split_choices_are_the_split_names(run, capfd):
    line = _error_line(capfd, main(["eval", str(run), "--split", "bogus"]))
    assert "invalid choice: 'bogus'" in line and all(s in line for s in SPLITS)


@pytest.mark.parametrize("name, content, source, line", [
    ("t.csv", "\ufefftask,instruction,input,output\nt,Say,1,1\n", "Say [SEP] 1", 2),
    ("t.tsv", "\ufeffinstruction\tinput\toutput\nSay\t1\t1\n", "Say [SEP] 1", 2),
    ("t.jsonl", "\ufeff" + json.dumps(GOOD) + "\n", "Say it. [SEP] 1 2", 1),
], ids=["csv", "tsv", "jsonl"])
def test_a_utf8_file_with_a_byte_order_mark_is_read(name, content, source, line, tmp_path):
    """As spreadsheets save "CSV UTF-8": the mark is not part of the first column's name."""
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    [example] = load_task(TaskSpec(name="t", files={"train": str(path)}), "train")
    assert (example.source, example.meta["line"]) == (source, line)


def test_lines_still_end_at_a_lone_carriage_return(tmp_path):
    """Reading line by line (to name a bad byte's line) keeps text mode's line endings."""
    path = tmp_path / "t.csv"
    path.write_bytes(b"instruction,input,output\rSay,1,1\r\nSay,\"2\r3\",2\n")
    assert list(read_records(path)) == [
        (2, {"instruction": "Say", "input": "1", "output": "1"}),
        (4, {"instruction": "Say", "input": "2\r3", "output": "2"})]


# --- run directories: tokenizer, paths that are files, unwritable outputs --------------------

def _foreign_sentencepiece() -> bytes:
    """A valid sentencepiece model in sentencepiece's default layout (no pad id)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 20),
                                   model_writer=model, vocab_size=12, minloglevel=2,
                                   hard_vocab_limit=False, num_threads=1)
    return model.getvalue()


RUN_TOKENIZERS = {  # case -> (content, problem)
    "garbage": (lambda: b"\x0a\x99garbage", "not a sentencepiece model"),   # traceback before
    "empty": (lambda: b"", "empty file, not a sentencepiece model"),  # "pad id -1", unnamed
    "foreign_layout": (_foreign_sentencepiece, "sentencepiece model has pad id -1, polytask "
                       "needs 0"),                                          # unnamed before
}


@pytest.mark.parametrize("case", RUN_TOKENIZERS)
def test_a_damaged_run_tokenizer_is_named(run_copy, case, capfd):
    content, problem = RUN_TOKENIZERS[case]
    tokenizer = run_copy / "tokenizer.model"
    tokenizer.write_bytes(content())
    with pytest.raises(ValueError, match=re.escape(f"{tokenizer}: {problem}")):
        Tokenizer.load(tokenizer)
    # the CLI may notice the damage earlier (a run's checksums); either way it names the file
    line = _error_line(capfd, main(["eval", str(run_copy)]))
    assert line.startswith(f"polytask: error: {tokenizer}: "), line


def test_a_tokenizer_of_only_special_pieces_is_refused(tmp_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    model = pb.ModelProto()
    model.ParseFromString(Tokenizer.train(["a b c d e f g h"] * 10, 16,
                                          hard_vocab_limit=False).model_proto)
    del model.pieces[5:]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match=re.escape(f"{path}: sentencepiece model has 5 pieces, "
                                                   "only the special ones")):
        Tokenizer.load(path)


def test_a_run_directory_that_is_a_file(tmp_path, capfd):
    path = tmp_path / "run"
    path.write_text("not a directory")
    line = _error_line(capfd, main(["eval", str(path)]))
    assert line.startswith(f"polytask: error: {path / 'config.json'}: ")
    assert "Not a directory" in line
    line = _error_line(capfd, main(["train", str(ROOT / "experiments/configs/tiny.yaml"),
                                    "--out", str(path)]))
    assert line.startswith(f"polytask: error: {path}")


def test_generate_output_that_is_a_directory_fails_before_predicting(run, tmp_path, capfd):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl([{"input": "1"}]))
    line = _error_line(capfd, main(["generate", str(run), "--task", "echo", "--input-file",
                                    str(src), "--output", str(tmp_path)]))
    assert line == f"polytask: error: polytask generate: --output {tmp_path}: is a directory"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_file(run, tmp_path, capfd):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl([{"input": "1"}]))
    line = _error_line(capfd, main(["generate", str(run), "--task", "echo", "--input-file",
                                    str(src), "--output", "/dev/full"]))
    assert line == "polytask: error: /dev/full: No space left on device"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_directory_names_the_path(tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        line = _error_line(capfd, main(["train", str(ROOT / "experiments/configs/tiny.yaml"),
                                        "--out", str(ro / "run")]))
    finally:
        ro.chmod(0o700)
    assert line == f"polytask: error: {ro / 'run'}: Permission denied"


# --- generate --input "" is an input like any other -------------------------------------------

@pytest.mark.parametrize("task", ["echo", "say", "bits", "bits_rank", "held"])
def test_generate_an_empty_input(run, task, capfd):
    """``held`` crashed (StopIteration): its instruction is taken from records that only
    ``TaskData.held_out_train`` holds."""
    assert main(["generate", str(run), "--task", task, "--input", ""]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.endswith("\n")
    if task.startswith("bits"):
        assert out.strip() in ("even", "odd")


# --- Hugging Face checkpoints: config.json, shard index, shards, tokenizer files -------------

def _t5_dir(root: Path) -> Path:
    """A T5 directory as far as loading reads it before the weights: config.json and a
    sentencepiece model in T5's layout. The weights are written by each case."""
    path = root / "t5"
    path.mkdir()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["say it one two three four five six"] * 20), model_writer=model,
        vocab_size=24, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (path / "spiece.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 4}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "t5", "vocab_size": 64, "d_model": 8, "d_kv": 4, "num_heads": 2,
        "d_ff": 16, "num_layers": 1, "feed_forward_proj": "relu", "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0}))
    return path


def _index(path: Path, shard: object) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"shared.weight": shard}}))


def _drop_key(path: Path, key: str) -> None:
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))


def _safetensors(path: Path) -> bytes:
    save_file({"shared.weight": torch.zeros(64, 8)}, str(path))
    return path.read_bytes()


HF_FAULTS = {  # case -> (damage(dir), file the message names, problem)
    # traceback before
    "shard_garbage": (lambda d: (_index(d, "model-1.safetensors"),
                                 (d / "model-1.safetensors").write_bytes(b"garbage")),
                      "model-1.safetensors", "not a readable safetensors file"),
    "shard_truncated": (lambda d: (_index(d, "model-1.safetensors"),
                                   (d / "model-1.safetensors").write_bytes(
                                       _safetensors(d / "model-1.safetensors")[:100])),
                        "model-1.safetensors", "not a readable safetensors file"),
    "single_garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7),
                       "model.safetensors", "not a readable safetensors file"),
    "shard_missing": (lambda d: _index(d, "model-1.safetensors"), "model-1.safetensors",
                      "missing"),
    # file not named before
    "index_no_weight_map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"),
                            "model.safetensors.index.json", "no 'weight_map' object"),
    "index_not_json": (lambda d: (d / "model.safetensors.index.json").write_text("{oops"),
                       "model.safetensors.index.json", "not a JSON file"),
    "config_missing_key": (lambda d: _drop_key(d / "config.json", "num_heads"), "config.json",
                           "missing key 'num_heads'"),
    "tokenizer_config_not_json": (lambda d: (d / "tokenizer_config.json").write_text("{,"),
                                  "tokenizer_config.json", "not a JSON file"),
    "spiece_garbage": (lambda d: (d / "spiece.model").write_bytes(b"\x0a\x99garbage"),
                       "spiece.model", "not a sentencepiece model"),
    # accepted before: shards outside the directory
    "shard_dotdot": (lambda d: (_index(d, "../outside.safetensors"),
                                _safetensors(d.parent / "outside.safetensors")),
                     "model.safetensors.index.json", "which is not a file inside"),
    "shard_absolute": (lambda d: (_index(d, str(d.parent / "outside.safetensors")),
                                  _safetensors(d.parent / "outside.safetensors")),
                       "model.safetensors.index.json", "which is not a file inside"),
}


@pytest.mark.parametrize("case", HF_FAULTS)
def test_a_damaged_hugging_face_checkpoint_is_named(case, tmp_path, capfd):
    damage, file, problem = HF_FAULTS[case]
    path = _t5_dir(tmp_path)
    damage(path)
    data = tmp_path / "t.jsonl"
    data.write_bytes(_jsonl([GOOD]))
    cfg = _config(tmp_path / "c.yaml", [{"name": "t", "files": {"train": str(data)}}],
                  init=str(path))
    line = _error_line(capfd, main(["train", str(cfg), "--out", str(tmp_path / "r")]))
    assert line.startswith("polytask: error: ") and f"{path / file}: " in line, line
    assert problem in line, line


@pytest.mark.parametrize("case", ["shard_garbage", "index_no_weight_map", "shard_dotdot",
                                  "config_missing_key"])
def test_from_hf_raises_the_named_value_error_too(case, tmp_path):
    damage, file, problem = HF_FAULTS[case]
    path = _t5_dir(tmp_path)
    damage(path)
    if not any((path / n).exists() for n in ("model.safetensors", "model.safetensors.index.json")):
        _safetensors(path / "model.safetensors")  # a config damage: weights to get that far
    with pytest.raises(ValueError, match=re.escape(str(path / file)) + ".*" + re.escape(problem)):
        from_hf(path)


def test_config_json_that_is_not_json_is_named(tmp_path):
    path = _t5_dir(tmp_path)
    (path / "config.json").write_text("{not json")
    _safetensors(path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: not a JSON file")):
        from_hf(path)


@pytest.mark.parametrize("files, named", [
    ({"tokenizer.json": "{not json"}, "tokenizer.json"),
    ({"vocab.json": "[oops", "merges.txt": "#version: 0.2\n"}, "vocab.json + merges.txt"),
    ({"tokenizer.json": "{}", "config.json": "{,"}, "tokenizer.json"),
], ids=["tokenizer_json", "vocab_merges", "empty_tokenizer_json"])
def test_a_damaged_bart_tokenizer_is_named(files, named, tmp_path):
    """The ``tokenizers`` package raises a bare ``Exception`` without the file's name."""
    pytest.importorskip("tokenizers")
    from polytask.core.data.pretrained_tokenizers import load_tokenizer
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / named}: not a readable "
                                                   "tokenizer file")):
        load_tokenizer(tmp_path)


def test_a_shard_in_a_subdirectory_is_still_accepted(tmp_path):
    """The refusal is of paths leaving the directory, not of every path with a slash."""
    _index(tmp_path, "sub/model-1.safetensors")
    assert weight_files(tmp_path) == [tmp_path / "sub" / "model-1.safetensors"]


# --- the boundary itself: every anticipated type, interrupts, bugs, --debug ------------------

ANTICIPATED = {  # case -> (exception raised by the command, the expected line after "error: ")
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/x/run/config.json"),
                   "/x/run/config.json: Permission denied"),
    "is_a_directory": (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/out"),
                       "/x/out: Is a directory"),
    "not_a_directory": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/f/config.json"),
                        "/x/f/config.json: Not a directory"),
    "not_found": (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/nope"),
                  "/x/nope: No such file or directory"),
    "rename": (OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/run"),
               "/a/tmp -> /b/run: Invalid cross-device link"),
    "enospc_unnamed": (OSError(errno.ENOSPC, "No space left on device"),
                       "No space left on device"),
    "key": (KeyError("weight_map"), "missing key 'weight_map'"),
    "floating_point": (FloatingPointError("loss is nan at step 3"), "loss is nan at step 3"),
    "recursion": (RecursionError("maximum recursion depth exceeded"),
                  "input nested too deeply (maximum recursion depth exceeded)"),
    "safetensors": (SafetensorError("Error while deserializing header: header too small"),
                    "Error while deserializing header: header too small"),
    "unicode": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    "json": (json.JSONDecodeError("Expecting value", "x", 0),
             "Expecting value: line 1 column 1 (char 0)"),
    "multi_line": (ValueError("first line\n  second line\r\nthird"),
                   "first line second line third"),
}


@pytest.mark.parametrize("case", ANTICIPATED)
def test_every_anticipated_error_is_one_line(case, monkeypatch, capfd):
    exc, want = ANTICIPATED[case]

    def fail(*args, **kwargs):
        raise exc
    monkeypatch.setattr(runs, "evaluate_run", fail)
    assert _error_line(capfd, main(["eval", "somewhere"])) == f"polytask: error: {want}"


def test_a_full_disk_without_a_file_name_names_the_run_directory(monkeypatch, tmp_path, capfd):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs, "train_run", fail)
    line = _error_line(capfd, main(["train", str(ROOT / "experiments/configs/tiny.yaml"),
                                    "--out", str(tmp_path / "r")]))
    assert line == (f"polytask: error: {tmp_path / 'r'}: No space left on device (while "
                    "writing there)")


def test_an_interrupt_is_one_line_and_status_130(monkeypatch, capfd):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "evaluate_run", interrupt)
    assert main(["eval", "somewhere"]) == 130
    assert capfd.readouterr().err == "polytask: interrupted\n"


def test_a_bug_is_an_honest_crash_report_with_its_traceback_in_a_file(monkeypatch, capfd):
    def bug(*args, **kwargs):
        return 1 / 0
    monkeypatch.setattr(runs, "evaluate_run", bug)
    assert main(["eval", "somewhere"]) == 1
    err = capfd.readouterr().err
    m = re.fullmatch(r"polytask: internal error: ZeroDivisionError: division by zero \(this is a "
                     r"bug; the traceback is in (\S+); --debug prints it\)\n", err)
    assert m, err
    report = Path(m.group(1))
    try:
        text = report.read_text()
        assert text.startswith("Traceback") and "in bug" in text and "1 / 0" in text
    finally:
        report.unlink()


@pytest.mark.parametrize("where", [0, 1, 3])
def test_debug_anywhere_raises_instead(monkeypatch, where):
    def bug(*args, **kwargs):
        return 1 / 0
    monkeypatch.setattr(runs, "evaluate_run", bug)
    argv = ["eval", "somewhere", "--split", "test"]
    with pytest.raises(ZeroDivisionError):
        main(argv[:where] + ["--debug"] + argv[where:])
    with pytest.raises(KeyError):
        monkeypatch.setattr(runs, "evaluate_run", lambda *a, **k: {}["x"])
        main(["--debug", "eval", "somewhere"])
