"""Fault injection, processes (issue #23): an interrupted ablation leaves no process behind and
resumes; a killed native-kernel build leaves nothing that makes later builds hang.

* ablate --jobs 2: ``kill -9`` of the parent takes its workers along (and nothing holds its
  pipes); Ctrl-C (SIGINT to the process group) and SIGTERM stop the workers and exit with one
  line; a KeyboardInterrupt inside the pool stops the workers; a later ablate resumes the runs
  with a checkpoint and moves aside, then restarts, those without one.
* The native build: our flock waits with a message and times out (PyTorch's kernels then);
  a holder killed with ``kill -9`` releases it; PyTorch's baton left by a killed build is
  removed; a subprocess finishes instead of hanging on such a baton, and after a ``kill -9``
  in the middle of a build (a stand-in compiler keeps these fast; one real build, ``slow``);
  two checkouts get different extension names.
"""
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from polytask.attention import native
from polytask.experiments import ablate
from polytask.experiments.cli import main

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
# tests/experiments/test_ablate.py's smallest run; 100000 steps keep the workers busy until the
# test interrupts them, and a checkpoint every step gives the interrupted runs one to resume.
BUSY = ["grid.sharing.strategy=[hard]", "seeds=[0, 1]", "train.max_steps=100000",
        "train.eval_every=100000", "train.save_every=1", "data.eval_examples=4",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64",
        "train.generation_max_tokens=6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LINUX = sys.platform.startswith("linux")


# ----------------------------------------------------------------------------- processes

def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (after the command's parenthesis), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> dict[int, str]:
    """Child pid -> start time (to tell a pid that was reused later from the child)."""
    kids = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids[int(entry.name)] = fields[19]
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(kids: dict[int, str]) -> list[int]:
    """Those still running: not gone, not a zombie (dead, waiting to be reaped), not reused."""
    out = []
    for pid, start in kids.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == start:
            out.append(pid)
    return out


def _wait_gone(kids: dict[int, str], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while _running(kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(kids)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``, until none is left: ninja starts each compile
    in a process group of its own, which ``killpg`` would miss."""
    for _ in range(50):
        members = []
        for entry in Path("/proc").iterdir():
            fields = _stat(int(entry.name)) if entry.name.isdigit() else None
            if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s flock, as a build or a run in progress does."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        f = open({str(path)!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{{os.getpid()}}\\n"); f.flush()
        print("held", flush=True)
        time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _start_ablate(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "polytask.experiments.cli", "ablate", str(TINY),
                             *BUSY, "--jobs", "2", "--threads", "1", "--out", str(out),
                             "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _wait_until_busy(proc: subprocess.Popen, out: Path, timeout: float = 180) -> dict[int, str]:
    """The parent's children once two workers train and both runs hold a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ablate exited early ({proc.returncode}): {proc.stderr.read().decode()}")
        kids = _children(proc.pid)
        workers = [pid for pid in kids if "multiprocessing.spawn" in _cmdline(pid)]
        if len(workers) == 2 and len(list(out.glob("runs/*/checkpoints/LATEST"))) == 2:
            return kids
        time.sleep(0.05)
    _kill_session(proc.pid)
    pytest.fail(f"the workers never got busy: {proc.communicate()[1].decode()[-2000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="parent-death signal and /proc are Linux's")
def test_kill_9_of_ablate_takes_its_workers_along(tmp_path):
    proc = _start_ablate(tmp_path / "abl")
    try:
        kids = _wait_until_busy(proc, tmp_path / "abl")
        assert len(kids) >= 2
        proc.kill()
        proc.communicate(timeout=30)   # EOF on its pipes: no survivor holds them
        assert _wait_gone(kids, within=10) == []
    finally:
        _kill_session(proc.pid)   # a failed test leaves no process behind either


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="/proc is Linux's")
def test_ctrl_c_stops_the_workers_with_one_line_and_a_later_ablate_resumes(tmp_path, capsys):
    out = tmp_path / "abl"
    proc = _start_ablate(out)
    try:
        kids = _wait_until_busy(proc, out)
        os.killpg(proc.pid, signal.SIGINT)   # a terminal's Ctrl-C reaches the whole group
        _, err = proc.communicate(timeout=60)
        assert _wait_gone(kids, within=10) == []
    finally:
        _kill_session(proc.pid)   # a failed test leaves no process behind either
    assert proc.returncode == 128 + signal.SIGINT
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polytask: ablation interrupted by SIGINT")
    assert str(out) in lines[0]

    runs = sorted(p for p in (out / "runs").iterdir())
    steps = [int((r / "checkpoints" / "LATEST").read_text().split("-")[1]) for r in runs]
    # the second run as if killed before its first checkpoint: files, but nothing to resume
    shutil.rmtree(runs[1] / "checkpoints")
    stale = sorted(p.name for p in runs[1].iterdir())
    assert "metrics.jsonl" in stale
    args = [a for a in BUSY if not a.startswith("train.max_steps")]
    target = max(steps) + 2
    assert main(["ablate", str(TINY), *args, f"train.max_steps={target}", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{runs[0].name}: resuming" in printed
    assert f"{runs[1].name}: interrupted before its first intact checkpoint" in printed
    assert f"{runs[1].name}: training" in printed
    aside = list((out / "runs").glob(f"{runs[1].name}.interrupted-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == stale
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test"]
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged if r.get("event") == "train"] == \
            list(range(1, target + 1))
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in rows} == {run.name for run in runs}


def _touch_and_sleep(path: str) -> None:
    Path(path).touch()
    time.sleep(120)


def test_keyboard_interrupt_in_the_parent_stops_the_workers(tmp_path):
    before = set(multiprocessing.active_children())
    marks = [tmp_path / "a", tmp_path / "b"]
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with ablate._worker_pool(2, 1) as pool:
            for mark in marks:
                pool.submit(_touch_and_sleep, str(mark))
            while not all(m.exists() for m in marks) and time.monotonic() - start < 120:
                time.sleep(0.05)
            assert all(m.exists() for m in marks), "the workers never started"
            raise KeyboardInterrupt
    workers = set(multiprocessing.active_children()) - before
    assert not [w for w in workers if w.is_alive()]
    assert time.monotonic() - start < 100   # stopped, not waited for (120 s each)


def test_sigterm_interrupts_once_and_the_handlers_come_back():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as caught:
        with ablate._signals_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert caught.value.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_an_interrupted_ablation_exits_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, run_dir, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    monkeypatch.setattr(ablate, "train_run", interrupted)
    with pytest.raises(SystemExit) as caught:
        ablate.ablate(TINY, tmp_path / "abl", ["grid.sharing.strategy=[hard]"])
    assert caught.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablation interrupted by SIGTERM" in err[0]
    assert "run the same command again to resume" in err[0]


def test_a_run_without_intact_checkpoint_is_moved_aside_and_restarted(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "abl"
    names = [name for name, *_ in ablate.plan(TINY, ["seeds=[0, 1, 2]"])]
    stale, empty, done = (out / "runs" / n for n in names)
    stale.mkdir(parents=True)
    for name in ("metrics.jsonl", "tokenizer.model", "config.json"):
        (stale / name).write_text(name)
    empty.mkdir()
    done.mkdir()
    (done / "summary.json").write_text("{}")
    calls = []
    monkeypatch.setattr(ablate, "train_run",
                        lambda cfg, run_dir, resume, progress: calls.append((run_dir, resume)))
    monkeypatch.setattr(ablate, "write_reports", lambda out, runs, merged=None: {})
    ablate.ablate(TINY, out, ["seeds=[0, 1, 2]"])
    assert calls == [(stale, False), (empty, False)]
    aside = [p for p in (out / "runs").iterdir() if p.name.startswith(stale.name + ".interrupted-")]
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir() if p.name != ".lock") == \
        ["config.json", "metrics.jsonl", "tokenizer.model"]
    assert not stale.exists() and empty.exists()   # nothing in it: nothing to move
    printed = capsys.readouterr().out
    assert f"its files moved to {aside[0].name}, starting afresh" in printed


def test_a_run_directory_in_use_is_not_moved_aside(tmp_path, monkeypatch):
    run_dir = tmp_path / "abl" / "runs" / ablate.plan(TINY)[0][0]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    monkeypatch.setattr(ablate, "train_run", lambda *a, **kw: pytest.fail("trained"))
    holder = _hold_lock(run_dir / ".lock")   # a process still writing this run (no checkpoint yet)
    try:
        with pytest.raises(ValueError, match=f"{run_dir} is in use by"):
            ablate.ablate(TINY, tmp_path / "abl")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]


@pytest.mark.skipif(not LINUX, reason="prctl is Linux's")
def test_a_worker_asks_to_die_with_its_parent_and_leaves_if_it_already_has():
    script = textwrap.dedent("""
        import ctypes, os
        from polytask.experiments.ablate import _die_with_parent
        _die_with_parent(os.getppid())
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)   # PR_GET_PDEATHSIG
        print(sig.value, flush=True)
        _die_with_parent(os.getppid() + 1)   # the parent died before prctl took effect
        print("still here")
    """)
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == [str(int(signal.SIGKILL))], done.stderr
    assert done.returncode == 1


# ----------------------------------------------------------------------------- native build

@pytest.mark.skipif(native.fcntl is None, reason="no flock here")
def test_build_lock_waits_with_a_message_times_out_and_never_goes_stale(tmp_path, capsys):
    build_dir = tmp_path / "polytask_native_x"
    build_dir.parent.mkdir(exist_ok=True)
    holder = _hold_lock(tmp_path / "polytask_native_x.lock")
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"waited 0.5 s .*{build_dir}.*pid {holder.pid}"):
            with native.build_lock(build_dir, timeout=0.5, poll=0.05):
                pass
        assert 0.5 <= time.monotonic() - start < 10
        err = capsys.readouterr().err
        assert err == (f"polytask: waiting for the native-kernel build in {build_dir} "
                       f"(pid {holder.pid}) ...\n")   # said once, not once per poll
        holder.kill()   # kill -9 of the holder: the kernel drops its lock
        holder.wait()
        with native.build_lock(build_dir, timeout=5, poll=0.05):
            assert (tmp_path / "polytask_native_x.lock").read_text() == f"{os.getpid()}\n"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(native.fcntl is None, reason="no flock here")
def test_build_lock_removes_the_baton_of_a_killed_build(tmp_path, capsys):
    build_dir = tmp_path / "polytask_native_x"
    build_dir.mkdir()
    (build_dir / "lock").touch()            # PyTorch's FileBaton, left by a killed build
    (build_dir / "main.o").write_text("half")
    with native.build_lock(build_dir, timeout=5):
        assert not (build_dir / "lock").exists() and not (build_dir / "main.o").exists()
    assert "killed process" in capsys.readouterr().err
    build_dir.mkdir()   # a normal build: nothing removed
    (build_dir / "x.so").touch()
    with native.build_lock(build_dir, timeout=5):
        assert (build_dir / "x.so").exists()


@pytest.mark.skipif(native.fcntl is None, reason="no flock here")
def test_kernels_fall_back_when_another_build_outlasts_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("POLYTASK_NATIVE_BUILD_TIMEOUT", "0.3")
    monkeypatch.delenv("POLYTASK_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    build_dir = native.build_directory()
    assert build_dir.parent == tmp_path
    holder = _hold_lock(build_dir.with_name(build_dir.name + ".lock"))
    try:
        with pytest.warns(RuntimeWarning, match="unavailable.*TimeoutError: waited 0.3 s"):
            assert native.kernels() is None
    finally:
        holder.kill()
        holder.wait()
    assert not build_dir.exists()   # it never started a build of its own


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_malformed_build_timeout_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv("POLYTASK_NATIVE_BUILD_TIMEOUT", value)
    monkeypatch.delenv("POLYTASK_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    with pytest.raises(ValueError, match=f"POLYTASK_NATIVE_BUILD_TIMEOUT='{value}': expected"):
        native.kernels()


def test_two_checkouts_get_different_extension_names(tmp_path):
    flags = ["-O3"]
    a, b = tmp_path / "a" / "native.cpp", tmp_path / "b" / "native.cpp"
    for path in (a, b):
        path.parent.mkdir()
        shutil.copy(native.SOURCE, path)
    assert native.extension_name(flags, a) != native.extension_name(flags, b)
    assert native.extension_name(flags, a) == native.extension_name(flags, a)
    assert native.extension_name(flags, a).isidentifier()   # it names the module PyInit_...
    before = native.extension_name(flags, a)
    a.write_text(a.read_text() + "\n// changed\n")
    assert native.extension_name(flags, a) != before
    assert native.extension_name(["-O2"], b) != native.extension_name(flags, b)


# A stand-in for g++: PyTorch's version queries go to the real one; a compile (-c) leaves a
# marker, then fails at once (FAKE_CXX=fail) or hangs (FAKE_CXX=hang) like a long build.
FAKE_CXX = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "-c" ]; then
    touch "$FAKE_CXX_MARK"
    if [ "$FAKE_CXX" = hang ]; then exec sleep 300; fi
    echo "fake compiler: no" >&2; exit 1
  fi
done
exec g++ "$@"
"""

KERNELS = """
import warnings
from polytask.attention import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = native.kernels()
print("module" if module is not None else "fallback", flush=True)
for w in caught:
    print(w.message, flush=True)
"""


def _native_env(tmp_path: Path, mode: str | None) -> dict[str, str]:
    env = {k: v for k, v in ENV.items() if k not in ("POLYTASK_NATIVE", "CXX")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), POLYTASK_NATIVE_BUILD_TIMEOUT="600")
    if mode is not None:
        fake = tmp_path / "bin" / "g++"   # PyTorch accepts a compiler by its name
        fake.parent.mkdir(exist_ok=True)
        fake.write_text(FAKE_CXX)
        fake.chmod(0o755)
        env.update(CXX=str(fake), FAKE_CXX=mode, FAKE_CXX_MARK=str(tmp_path / f"{mode}.mark"))
    return env


def _build_dir(env: dict[str, str]) -> Path:
    name = native.extension_name(native._cflags())
    return Path(env["TORCH_EXTENSIONS_DIR"]) / name


def _kernels_in_subprocess(env: dict[str, str], timeout: float) -> list[str]:
    done = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True,
                          text=True, timeout=timeout)   # TimeoutExpired: it hung
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(native.fcntl is None or not LINUX, reason="flock and /proc")
def test_a_baton_left_behind_does_not_hang_the_next_process(tmp_path):
    env = _native_env(tmp_path, "fail")
    build_dir = _build_dir(env)
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()   # PyTorch's FileBaton; its load() would wait for it forever
    lines = _kernels_in_subprocess(env, timeout=120)
    assert lines[0] == "fallback" and "fake compiler: no" in "\n".join(lines)
    assert (tmp_path / "fail.mark").exists()   # it got as far as compiling
    assert not (build_dir / "lock").exists()


def _start_build(env: dict[str, str], mark: Path, timeout: float = 180) -> subprocess.Popen:
    """A process in the middle of building the kernels (PyTorch's baton taken, compiling)."""
    proc = subprocess.Popen([sys.executable, "-c", KERNELS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (mark.exists() and (_build_dir(env) / "lock").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_session(proc.pid)
            pytest.fail(f"the build never started (exit {proc.poll()})")
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(native.fcntl is None or not LINUX, reason="flock and /proc")
def test_kill_9_in_the_middle_of_a_build_then_the_next_process_finishes(tmp_path):
    killed = _start_build(_native_env(tmp_path, "hang"), tmp_path / "hang.mark")
    try:
        killed.kill()   # kill -9 of Python alone, as in the report: ninja and the compiler live on
        killed.wait()
        assert (_build_dir(_native_env(tmp_path, "fail")) / "lock").exists()
        lines = _kernels_in_subprocess(_native_env(tmp_path, "fail"), timeout=120)
        assert lines[0] == "fallback" and "fake compiler: no" in "\n".join(lines)
    finally:
        _kill_session(killed.pid)   # the orphaned ninja and stand-in compiler


@pytest.mark.slow
@pytest.mark.skipif(native.fcntl is None or not LINUX, reason="flock and /proc")
def test_kill_9_in_the_middle_of_a_real_build_then_a_real_build(tmp_path):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        if os.environ.get("POLYTASK_REQUIRE_NATIVE") == "1":
            pytest.fail("POLYTASK_REQUIRE_NATIVE=1 but there is no C++ compiler")
        pytest.skip("no C++ compiler")
    env = _native_env(tmp_path, None)
    proc = subprocess.Popen([sys.executable, "-c", KERNELS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (_build_dir(env) / "lock").exists():   # PyTorch's baton: building now
            assert proc.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.05)
        time.sleep(1.0)   # into the compile
    finally:
        _kill_session(proc.pid)   # Python, ninja and the compiler: no writer left
        proc.wait()
    assert (_build_dir(env) / "lock").exists()
    check = KERNELS + textwrap.dedent("""
        import torch, torch.nn.functional as F
        w, x = torch.randn(33, 20), torch.randn(5, 20)
        with torch.no_grad():
            lin = native.small_rows_linear(w, None, None, lambda: None)
            torch.testing.assert_close(lin(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        print("agrees", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["module", "agrees"], done.stdout + done.stderr
