"""The polytask CLI: user errors are one line on stderr with exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main

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
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "train", str(TINY),
                           "train.max_step=3", "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "unknown config key train.max_step" in proc.stderr
