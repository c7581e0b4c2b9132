"""Fault injection into run directories: every fault either recovers without losing or mixing
work (the resumed run ends bit-identical to an uninterrupted one) or stops with one line that
names the file; nothing loads silently wrong.

One tiny run (4 steps, a checkpoint every 2) is trained once per module; each case damages a
copy of it, then resumes, evaluates or trains through the CLI (``main`` returns the exit
status; stderr holds the one-line message). Classes, as counted in the report: ``lost`` (lost
or mixed work), ``traceback`` (an unexplained crash), ``silent`` (a silently wrong result).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polytask.core.training.checkpoint import LATEST, latest_checkpoint
from polytask.core.training.manifest import record_files
from polytask.experiments.cli import main
from polytask.experiments.config import load_config
from polytask.experiments.runs import train_run

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
ARGS = ["train.max_steps=4", "train.eval_every=2", "train.save_every=2", "data.eval_examples=2",
        "data.test_examples=2", "train.batch_size=4", "model.d_model=16", "model.n_heads=2",
        "model.d_ff=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
        "train.generation_max_tokens=4"]
CKPT = "checkpoints/step-{:08d}"
ENV = {**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"}
TIMING = ("step_s", "tokens_per_s", "max_rss_mb")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every recovered one must equal."""
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", str(TINY), *ARGS, "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    return run


@pytest.fixture
def run(full, tmp_path):
    """A copy of the finished run, as if killed after its last checkpoint (no summary)."""
    copy = tmp_path / "run"
    shutil.copytree(full, copy)
    (copy / "summary.json").unlink()
    return copy


def _ckpt(run, step):
    return run / CKPT.format(step)


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in lines]


def _resume(run, *overrides):
    return main(["train", "--resume", str(run), *overrides, "--no-progress"])


def _error(capsys):
    return _error_line(capsys.readouterr().err)


def _error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("polytask: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_as_full(run, full):
    for name in ("model.safetensors", "best.safetensors"):
        assert (run / name).read_bytes() == (full / name).read_bytes(), name
    assert _records(run) == _records(full)
    assert (json.loads((run / "summary.json").read_text())["test"]
            == json.loads((full / "summary.json").read_text())["test"])


# --- lost or mixed work ----------------------------------------------------------------------

@pytest.mark.parametrize("latest, note", [
    (None, "checkpoints/LATEST is missing"),
    ("step-00000009", "checkpoints/step-00000009 (named by LATEST) is missing"),
    ("../../elsewhere/checkpoints/step-00000004", "not a checkpoint of this run"),
    (str(Path("/") / "tmp" / "step-00000004"), "not a checkpoint of this run"),
    (b"\xff\xfe", "checkpoints/LATEST is unreadable"),
])
def test_bad_latest_resumes_from_the_newest_intact_checkpoint(run, full, latest, note, capsys):
    pointer = run / "checkpoints" / LATEST
    if latest is None:
        pointer.unlink()
    elif isinstance(latest, bytes):
        pointer.write_bytes(latest)
    else:
        pointer.write_text(latest)
    assert latest_checkpoint(run) == _ckpt(run, 4)
    assert _resume(run) == 0
    err = capsys.readouterr().err
    assert note in err and "resuming from checkpoints/step-00000004" in err
    _same_as_full(run, full)   # never a fresh start: the history of steps 1-4 is kept


def test_damaged_newest_checkpoint_falls_back_bit_identically(run, full, capsys):
    _flip(_ckpt(run, 4) / "model.safetensors")
    assert latest_checkpoint(run) == _ckpt(run, 2)
    assert _resume(run) == 0
    assert ("polytask: note: checkpoints/step-00000004 (named by LATEST) is damaged "
            "(model.safetensors: SHA-256 mismatch); resuming from checkpoints/step-00000002"
            in capsys.readouterr().err)
    _same_as_full(run, full)
    assert latest_checkpoint(run) == _ckpt(run, 4)   # rewritten, intact, and nothing else lost
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        LATEST, "step-00000002", "step-00000004"]


def test_all_checkpoints_damaged_is_an_error_and_deletes_nothing(run, capsys):
    _flip(_ckpt(run, 4) / "optim.pt")
    (_ckpt(run, 2) / "state.json").write_text("{}")
    before = _snapshot(run)
    assert _resume(run) == 2
    line = _error(capsys)
    assert "no intact checkpoint to resume from" in line and "nothing was deleted" in line
    assert "step-00000004 (named by LATEST) is damaged (optim.pt: SHA-256 mismatch)" in line
    assert "step-00000002 is damaged (state.json: SHA-256 mismatch)" in line
    assert _snapshot(run) == before


def test_resume_without_any_checkpoint_is_an_error(run, capsys):
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    assert _resume(run) == 2
    assert "nothing to resume (no checkpoint was saved)" in _error(capsys)
    assert _snapshot(run) == before


HOLDER = """
import sys, time
from polytask.core.training.lock import hold
with hold(sys.argv[1], "fault-test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(run):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=ENV,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(run, capsys):
    proc = _holder(run)
    try:
        before = _snapshot(run)
        assert _resume(run) == 2
        line = _error(capsys)
        assert f"{run} is in use by pid {proc.pid} on host " in line
        assert "(fault-test holder, started " in line and "wait for it or use another --out" in line
        assert main(["train", str(TINY), *ARGS, "--out", str(run), "--no-progress"]) == 2
        assert f"pid {proc.pid}" in _error(capsys)
        assert _snapshot(run) == before   # nothing written, nothing pruned
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_no_obstacle(run, full):
    proc = _holder(run)
    proc.kill()        # SIGKILL: no clean-up runs; the kernel drops the flock
    proc.wait()
    assert (run / ".lock").exists()
    assert _resume(run) == 0
    _same_as_full(run, full)


def test_temporary_files_of_killed_writes_are_removed(run, full, capsys):
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"x" * 1000)
    (run / "checkpoints" / ".LATEST.def456.tmp").write_bytes(b"x" * 500)
    unfinished = run / "checkpoints" / ".step-00000006.ghi789"
    unfinished.mkdir()
    (unfinished / "optim.pt").write_bytes(b"x" * 2500)
    (run / ".keep.me").write_text("not ours")
    assert _resume(run) == 0
    assert "removed 3 temporary file(s) of interrupted writes" in capsys.readouterr().err
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or ".step-" in p.name]
    assert (run / ".keep.me").exists()
    _same_as_full(run, full)


def test_best_weights_written_after_the_checkpoint_are_not_mixed_in(run, full, capsys):
    shutil.rmtree(_ckpt(run, 4))   # killed after step 4's best was saved, before its checkpoint
    (run / "best.safetensors").unlink()
    shutil.copy(full / "model.safetensors", run / "best.safetensors")   # some later weights
    record_files(run, ["best.safetensors"])                              # ... recorded intact
    assert _resume(run) == 0
    assert "restored" in capsys.readouterr().err
    _same_as_full(run, full)


def test_missing_best_is_restored_from_the_checkpoint(run, full, capsys):
    (run / "best.safetensors").unlink()
    assert _resume(run) == 0
    assert f"restored {run / 'best.safetensors'}" in capsys.readouterr().err
    _same_as_full(run, full)


@pytest.mark.parametrize("damage", ["truncated", "nul-padded", "garbage-line"])
def test_damaged_metrics_never_grow_and_stay_valid(run, full, damage, capsys):
    shutil.rmtree(_ckpt(run, 4))
    metrics = run / "metrics.jsonl"
    data = metrics.read_bytes()
    if damage == "truncated":   # ends inside the line of step 1
        metrics.write_bytes(data[:data.index(b"\n") + 20])
    elif damage == "nul-padded":   # what truncate-to-larger used to leave
        metrics.write_bytes(data[:50] + b"\0" * 4000)
    else:
        lines = data.splitlines(keepends=True)
        metrics.write_bytes(b"".join(lines[:1] + [b"\xff{not json\n"] + lines[1:]))
    size = metrics.stat().st_size
    assert _resume(run) == 0
    assert f"{metrics}: kept its " in capsys.readouterr().err
    text = metrics.read_bytes()
    assert b"\0" not in text and all(json.loads(l) for l in text.splitlines())
    records, theirs = _records(run), _records(full)
    assert all(r in theirs for r in records)     # nothing foreign, nothing from a NUL run
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-2:] == [3, 4]   # nothing logged twice
    assert records[-1] == theirs[-1] and records[-1]["split"] == "test"
    assert metrics.stat().st_size <= size + len((full / "metrics.jsonl").read_bytes())


def test_a_huge_metrics_bytes_neither_grows_the_file_nor_loses_lines(run, full, capsys):
    shutil.rmtree(_ckpt(run, 4))
    state = _ckpt(run, 2) / "state.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "metrics_bytes": 10 ** 12}))
    record_files(state.parent, ["state.json"])   # a valid manifest: only the value is wrong
    assert _resume(run) == 0
    assert "line(s) of later steps dropped" in capsys.readouterr().err
    metrics = run / "metrics.jsonl"
    assert metrics.stat().st_size < 10 ** 6 and b"\0" not in metrics.read_bytes()
    _same_as_full(run, full)


def test_a_kill_inside_a_tracked_write_never_looks_like_damage(tmp_path, monkeypatch):
    """Between the manifest's two phases either content of the file counts as intact."""
    from polytask.core.training import manifest as checkpoint   # tracked writes live there
    target = tmp_path / "config.json"
    checkpoint.write_json(target, {"v": 1}, track=True)
    real_replace, real_write = os.replace, checkpoint._write_manifest

    def killed_rename(src, dst):   # phase 1 written, then a kill before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", killed_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_json(target, {"v": 2}, track=True)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert checkpoint.read_json(target) == {"v": 1}
    calls = []

    def killed_phase_two(directory, files):   # renamed, then a kill before phase 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(directory, files)

    monkeypatch.setattr(checkpoint, "_write_manifest", killed_phase_two)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_json(target, {"v": 3}, track=True)
    monkeypatch.setattr(checkpoint, "_write_manifest", real_write)
    assert checkpoint.read_json(target) == {"v": 3}
    target.write_text('{"v": 4}')   # changed behind the manifest's back: named
    with pytest.raises(checkpoint.IntegrityError, match="config.json: SHA-256 mismatch"):
        checkpoint.read_json(target)


def test_a_run_without_manifests_loads_with_a_note(run, full, capsys):
    for path in run.rglob("manifest.json"):
        path.unlink()
    for path in (run / "checkpoints").rglob("best.safetensors"):
        path.unlink()   # an older polytask kept no copy in its checkpoints
    assert main(["eval", str(run)]) == 0
    assert "has no manifest.json (written by an older polytask)" in capsys.readouterr().err
    assert _resume(run) == 0
    assert "has no manifest.json" in capsys.readouterr().err
    _same_as_full(run, full)
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert {"config.json", "tokenizer.model", "best.safetensors", "model.safetensors"} <= set(files)
    _flip(run / "tokenizer.model")   # adopted: checked from now on
    assert main(["eval", str(run)]) == 2
    assert "tokenizer.model: SHA-256 mismatch" in _error(capsys)


# --- tracebacks: now one line naming the file ---------------------------------------------------

def _unmanifest(run):
    """The run as an older polytask wrote it: no manifests (nothing can be verified)."""
    for path in run.rglob("manifest.json"):
        path.unlink()


@pytest.mark.parametrize("target, content, message", [
    ("model.safetensors", b"", "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", b"\x08" + b"\x00" * 7 + b"{garbage", "not a readable safetensors"),
    ("config.json", b"\xff\xfe{}", "config.json: not UTF-8 text"),
    ("config.json", b'{"model": ', "config.json:1: invalid JSON"),
    ("config.json", b"[1, 2]", "config.json: holds a JSON list, not a run config"),
    ("tokenizer.model", b"garbage", "tokenizer.model: not a sentencepiece model"),
    ("manifest.json", b"{}", "manifest.json: not a manifest"),
])
def test_unreadable_run_files_on_eval(run, target, content, message, capsys):
    if target != "manifest.json":
        _unmanifest(run)
    (run / target).write_bytes(content)
    assert main(["eval", str(run), "--weights", "last"]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("target, content, message", [
    ("optim.pt", b"PK\x03\x04garbage", "optim.pt: not a readable torch file"),
    ("optim.pt", b"", "optim.pt: not a readable torch file"),
    ("state.json", b"\xff", "state.json: not UTF-8 text"),
    ("state.json", b"{", "state.json:1: invalid JSON"),
    ("model.safetensors", b"\x00" * 7, "model.safetensors: not a readable safetensors file"),
])
def test_unreadable_checkpoint_files_on_resume(run, target, content, message, capsys):
    _unmanifest(run)
    (_ckpt(run, 4) / target).write_bytes(content)
    assert _resume(run) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("change, message", [
    ({"step": "four"}, "state.json: step = \"four\" does not match its checkpoint directory"),
    ({"step": 2}, "step = 2 does not match its checkpoint directory step-00000004"),
    ({"metrics_bytes": -5}, "metrics_bytes = -5 must be an integer >= 0"),
    ({"best_step": 99}, "best_step = 99 must be a step in 0..4"),
    ({"bad_steps": 9}, "bad_steps = 9 (consecutive 0) exceeds the steps taken (4)"),
    ({"template_rng": [3, "x", None]}, "state.json: sampler or template_rng does not fit"),
    ({"sampler": {"method": "nope"}}, "state.json: sampler or template_rng does not fit"),
    (None, "state.json: holds a JSON list, not the loop's state"),
])
def test_invalid_state_values_are_named(run, change, message, capsys):
    state = _ckpt(run, 4) / "state.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps([1, 2] if change is None else {**saved, **change}))
    record_files(state.parent, ["state.json"])   # a valid manifest: only the values are wrong
    before = _snapshot(run)
    assert _resume(run) == 2
    assert message in _error(capsys)
    assert _snapshot(run) == before


def test_an_optimizer_state_of_another_run_is_named(run, capsys):
    optim = _ckpt(run, 4) / "optim.pt"
    torch.save({"optimizer": {"state": {}, "param_groups": []}}, optim)
    record_files(optim.parent, ["optim.pt"])
    assert _resume(run) == 2
    assert "optim.pt: does not fit this run's optimiser" in _error(capsys)


def test_out_or_run_dir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", str(TINY), *ARGS, "--out", str(afile), "--no-progress"]) == 2
    assert f"{afile}: is a file, not a run directory" in _error(capsys)
    assert main(["eval", str(afile)]) == 2
    assert f"{afile}/config.json: cannot read" in _error(capsys)
    assert _resume(afile) == 2
    assert str(afile) in _error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_run_dir(run, capsys):
    run.chmod(0o555)
    try:
        assert _resume(run) == 2
        assert str(run) in _error(capsys)
    finally:
        run.chmod(0o755)


# --- silently wrong results: now refused, naming the file or key -------------------------------

@pytest.mark.parametrize("target", ["model.safetensors", "best.safetensors", "tokenizer.model",
                                    "config.json"])
def test_a_flipped_byte_is_named_on_eval(run, target, capsys):
    _flip(run / target, 0.9 if target == "config.json" else 0.5)
    weights = "last" if target == "model.safetensors" else "best"
    assert main(["eval", str(run), "--weights", weights]) == 2
    assert (f"{run / target}: SHA-256 mismatch (file damaged or changed since it was written)"
            in _error(capsys))


def test_a_flipped_byte_in_an_init_run_is_named(run, tmp_path, capsys):
    _flip(run / "best.safetensors")
    out = tmp_path / "derived"
    assert main(["train", str(TINY), *ARGS, f"init={run}", "--out", str(out),
                 "--no-progress"]) == 2
    assert f"{run / 'best.safetensors'}: SHA-256 mismatch" in _error(capsys)


def test_a_missing_best_is_an_error_on_eval_and_at_the_final_test(run, capsys):
    (run / "best.safetensors").unlink()
    assert main(["eval", str(run)]) == 2
    assert f"{run / 'best.safetensors'}: missing (listed in" in _error(capsys)
    # a checkpoint of an older polytask keeps no copy of the best weights
    (_ckpt(run, 4) / "best.safetensors").unlink()
    manifest = _ckpt(run, 4) / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    del files["best.safetensors"]
    manifest.write_text(json.dumps({"files": files}))
    assert _resume(run) == 2
    line = _error(capsys)
    assert f"{run / 'best.safetensors'}: missing, but" in line and "best validation at step" in line
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("max_bad_steps, reason", [
    (100, "none of the 4 steps had a finite loss and gradient"),
    (2, "2 consecutive steps with non-finite loss or gradient"),
])
def test_a_run_without_finite_steps_fails_and_says_so(tmp_path, monkeypatch, capsys,
                                                      max_bad_steps, reason):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: torch.tensor(float("nan")))
    out = tmp_path / "run"
    assert main(["train", str(TINY), *ARGS, f"train.max_bad_steps={max_bad_steps}",
                 "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert reason in _error_line(captured.err)
    assert captured.out == ""   # no test metrics printed as if trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "non-finite" and summary["finite_steps"] == 0
    assert summary["bad_steps"] == summary["steps"] == (4 if max_bad_steps > 4 else 2)
    assert "test" not in summary


def test_a_lowered_lr_takes_effect_on_resume(run, full, capsys):
    shutil.rmtree(_ckpt(run, 4))
    assert _resume(run, "train.lr=3.0e-4") == 0
    capsys.readouterr()
    ours = {r["step"]: r["lr"] for r in _records(run) if r["event"] == "train"}
    theirs = {r["step"]: r["lr"] for r in _records(full) if r["event"] == "train"}
    assert ours[2] == theirs[2]                                 # before the resume: as run
    for step in (3, 4):                                         # after: a tenth (lr 3e-3 before)
        assert ours[step] == pytest.approx(theirs[step] / 10, rel=1e-9)
    assert (run / "model.safetensors").read_bytes() != (full / "model.safetensors").read_bytes()
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 3.0e-4
    event = [r for r in _records(run) if r["event"] == "resume"]
    assert event == [{"event": "resume", "step": 2, "changed": {"train.lr": 3.0e-4},
                      "previous": {"train.lr": 3.0e-3}}]
    assert main(["eval", str(run)]) == 0   # the rewritten config.json is recorded intact


def test_more_steps_on_resume(run):
    assert _resume(run, "train.max_steps=6") == 0
    steps = [r["step"] for r in _records(run) if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("override", ["train.seed=5", "model.d_model=64", "data.sampling=uniform"])
def test_a_setting_that_cannot_change_on_resume_is_refused(run, override, capsys):
    before = _snapshot(run)
    assert _resume(run, override) == 2
    line = _error(capsys)
    assert f"{override.split('=')[0]} cannot change when a run resumes" in line
    assert "only train.lr, train.max_steps, train.eval_every" in line
    assert _snapshot(run) == before


def test_a_changed_config_from_python_is_refused_on_resume(run):
    cfg = load_config(TINY, ARGS + ["train.seed=5"])
    with pytest.raises(ValueError, match=r"train.seed = 5 differs from the run's 0 .*config.json"):
        train_run(cfg, run, resume=True, progress=False)
