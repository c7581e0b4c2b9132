"""The polytask CLI: user errors are one line on stderr with exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from polytask.experiments.cli import main

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"


@pytest.mark.parametrize("argv, message", [
    (["train", str(TINY), "train.max_step=3"], "unknown config key train.max_step"),
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", str(TINY), "model.activation=tanh"], "model.activation = 'tanh' is invalid"),
    (["train", str(TINY), "tasks=nosuchsuite"], "unknown suite 'nosuchsuite'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train"], "CONFIG is required"),
    (["eval", "/nonexistent/run"], "missing file: /nonexistent/run/config.json"),
])
def test_user_errors_are_one_clean_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytask: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    proc = subprocess.run([sys.executable, "-m", "polytask.experiments.cli", "train", str(TINY),
                           "train.max_step=3", "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "unknown config key train.max_step" in proc.stderr


def test_bad_task_file_line_and_too_long_sequence_are_one_line(tmp_path, capsys):
    data = tmp_path / "t.train.jsonl"
    data.write_text('{"task": "t", "instruction": "Say", "input": "a", "output": "b"}\n'
                    '{"task": "t", "instruction": "Say", "input": "a"\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tasks:\n  - name: t\n    files: {{train: {data}, validation: {data}}}\n"
                   "model: {d_model: 32, n_heads: 2, d_ff: 64}\n")
    assert main(["train", str(cfg), "train.max_steps=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and err.count("\n") == 1
    assert main(["train", str(TINY), "data.truncation=error", "data.max_source_len=3",
                 "train.max_steps=1", "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "max_source_len 3" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_fresh_run_never_overwrites_an_existing_one(tmp_path, capsys):
    args = ["train", str(TINY), "train.max_steps=1", "train.eval_every=1", "data.eval_examples=2",
            "model.d_model=32", "model.d_ff=64", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run; continue it with `polytask train --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
