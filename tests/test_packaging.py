"""Packaging: the repository's folders install as the one ``polytask`` namespace.

setup.cfg maps the repository root onto ``polytask`` (``package_dir = polytask = .``) and lists
every package by hand, so these tests check that the list, the package data, the version and
the console script stay in step with the tree, that a wheel holds ``polytask`` and nothing
else, and that the CLI works from a directory full of files named like the repo's folders.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("attention", "core", "experiments", "heads", "losses")  # installed as polytask.<name>
NOT_PACKAGES = {"tests", "docs", "build", "dist", "runs"}
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
# Subprocesses get one torch/OpenMP thread, like the tests (conftest.py), on a 2-core machine.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _package_dirs() -> set[str]:
    """``polytask.<dotted path>`` for every folder under the five top folders that holds an
    ``__init__.py`` (the top folders themselves included)."""
    found = set()
    for top in TOP:
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            if "__init__.py" in filenames:
                rel = Path(dirpath).relative_to(ROOT)
                found.add(".".join(("polytask", *rel.parts)))
    return found


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------
# fast: setup.cfg against the tree, bare-name guards, version


def test_packages_list_is_exactly_the_folders_with_an_init():
    options = _setup_cfg()["options"]
    assert dict(line.replace(" ", "").split("=") for line in _lines(options["package_dir"])) \
        == {"polytask": "."}
    listed = _lines(options["packages"])
    assert len(listed) == len(set(listed)), "setup.cfg lists a package twice"
    expected = _package_dirs() | {"polytask"}
    missing, extra = expected - set(listed), set(listed) - expected
    assert not missing and not extra, (
        f"setup.cfg [options] packages is out of step with the tree: add {sorted(missing)}, "
        f"remove {sorted(extra)}")
    # a new top-level package folder would need a TOP entry here and a line in setup.cfg
    top_level = {p.name for p in ROOT.iterdir()
                 if p.is_dir() and (p / "__init__.py").exists() and p.name not in NOT_PACKAGES}
    assert top_level == set(TOP)


def test_package_data_patterns_and_entry_point_point_at_real_things():
    cfg = _setup_cfg()
    listed = set(_lines(cfg["options"]["packages"]))
    for package, patterns in cfg["options.package_data"].items():
        assert package in listed, f"package_data for unlisted package {package}"
        base = ROOT.joinpath(*package.split(".")[1:])
        for pattern in (p.strip() for p in patterns.split(",")):
            assert any(f.is_file() for f in base.glob(pattern)), \
                f"package_data {package}: {pattern} matches no file under {base}"
    scripts = dict(line.replace(" ", "").split("=")
                   for line in _lines(cfg["options.entry_points"]["console_scripts"]))
    assert scripts == {"polytask": "polytask.experiments.cli:main"}
    from polytask.experiments import cli
    assert callable(cli.main)
    assert cfg["metadata"]["version"].replace(" ", "") == "attr:polytask.__version__"


def test_bare_folder_names_refuse_to_import_from_the_repo_root():
    # `python -c` puts the cwd (the repo root) first on sys.path, so each folder is importable
    # by its bare name there: its guard must refuse, naming the polytask.<name> to import.
    code = ("import importlib\n"
            f"for name in {TOP!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as e:\n"
            "        print(name, '|', e)\n"
            "    else:\n"
            "        print(name, '|', 'IMPORTED')\n")
    proc = _run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    messages = dict(line.split(" | ", 1) for line in proc.stdout.splitlines())
    assert set(messages) == set(TOP)
    for name, message in messages.items():
        assert f"polytask.{name}" in message, f"import {name}: {message}"


def test_polytask_imports_from_the_repo_root_and_its_version_is_the_metadata_version():
    code = ("import importlib.metadata as md, polytask, polytask.core\n"
            "print(repr(polytask.__version__))\n"
            "print(md.version('polytask'))\n"
            "print(polytask.core.__name__)\n")
    proc = _run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    version_repr, metadata_version, core_name = proc.stdout.splitlines()
    assert core_name == "polytask.core"
    import polytask
    assert isinstance(polytask.__version__, str) and polytask.__version__
    assert version_repr == repr(polytask.__version__)
    assert metadata_version == polytask.__version__ == importlib.metadata.version("polytask")
    # From the repo root a stale in-tree polytask.egg-info (written by `pip install -e .`) can
    # shadow the installed dist-info: every polytask metadata found must agree.
    for dist in importlib.metadata.distributions(name="polytask"):
        assert dist.version == polytask.__version__, (
            f"{getattr(dist, '_path', dist)} says {dist.version}: reinstall (pip install -e .)")


# ------------------------------------------------------------------------------------------
# slow: a wheel, and the console script from a hostile working directory


def _copy_source_tree(dest: Path) -> Path:
    """The repository's files (tracked and untracked, not git-ignored) copied to ``dest``, so a
    build leaves no build/ or *.egg-info in the checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
        files = [f for f in out.stdout.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = None
    if files:
        for rel in files:
            src = ROOT / rel
            if src.is_file():  # tracked files deleted in the working tree are skipped
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
            ".hypothesis", "runs"), dirs_exist_ok=True)
    return dest


@pytest.mark.slow
def test_wheel_holds_polytask_and_its_data_and_nothing_else(tmp_path):
    import polytask
    litter_before = {p.name for p in ROOT.iterdir()
                     if p.name in ("build", "dist") or p.name.endswith(".egg-info")}
    src = _copy_source_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--no-index", "--no-cache-dir",
                           "--disable-pip-version-check", "-q", "-w", str(wheels), str(src)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    litter_after = {p.name for p in ROOT.iterdir()
                    if p.name in ("build", "dist") or p.name.endswith(".egg-info")}
    assert litter_after == litter_before, "building the wheel wrote into the checkout"

    (wheel,) = wheels.glob("*.whl")
    version = polytask.__version__
    assert wheel.name == f"polytask-{version}-py3-none-any.whl"
    dist_info = f"polytask-{version}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        bad = [n for n in names if not n.startswith(("polytask/", f"{dist_info}/"))]
        assert not bad, f"entries outside polytask/ in the wheel: {bad[:10]}"
        if f"{dist_info}/top_level.txt" in names:
            assert zf.read(f"{dist_info}/top_level.txt").decode().split() == ["polytask"]
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        assert f"\nVersion: {version}\n" in metadata
        entry_points = configparser.ConfigParser(interpolation=None)
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
        assert dict(entry_points["console_scripts"]) == {
            "polytask": "polytask.experiments.cli:main"}
    names = set(names)

    # every module of the five folders (and the root __init__.py), and no other module
    modules = {"polytask/__init__.py"} | {
        "polytask/" + p.relative_to(src).as_posix()
        for top in TOP for p in (src / top).rglob("*.py") if "__pycache__" not in p.parts}
    in_wheel = {n for n in names if n.endswith(".py")}
    assert not modules - in_wheel, f"modules missing from the wheel: {sorted(modules - in_wheel)}"
    assert not in_wheel - modules, f"unexpected modules in the wheel: {sorted(in_wheel - modules)}"

    # the data files a run needs
    data = src / "experiments" / "suite" / "data"
    shipped = {"polytask/" + p.relative_to(src).as_posix() for p in data.rglob("*") if p.is_file()}
    assert any(n.endswith(".jsonl.gz") for n in shipped)
    assert "polytask/experiments/suite/data/WORDNET_LICENSE" in shipped
    assert not shipped - names, f"task data missing from the wheel: {sorted(shipped - names)}"
    configs = {"polytask/" + p.relative_to(src).as_posix()
               for p in (src / "experiments" / "configs").glob("*.yaml")}
    assert "polytask/experiments/configs/tiny.yaml" in configs and configs <= names
    assert "polytask/attention/native.cpp" in names
    # no tests, docs or build leftovers under polytask/
    for unwanted in ("tests/", "docs/", "build/", "dist/", "runs/", "polytask.egg-info/"):
        assert not any(n.startswith(("polytask/" + unwanted, unwanted)) for n in names), unwanted
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)

    # Unpacked (what an install puts in site-packages, minus the script), the wheel's own copy
    # imports away from the checkout and finds every built-in suite's files and native.cpp.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = ("import sys\n"
            "from pathlib import Path\n"
            "import polytask, polytask.attention.native as native, polytask.experiments.suite as s\n"
            "site = Path(sys.argv[1])\n"
            "assert Path(polytask.__file__).is_relative_to(site), polytask.__file__\n"
            "assert native.SOURCE.is_file() and native.SOURCE.is_relative_to(site)\n"
            "files = [Path(f) for suite in s.SUITES for spec in s.load_suite(suite)\n"
            "         for f in spec.files.values()]\n"
            "bad = [f for f in files if not (f.is_file() and f.is_relative_to(site))]\n"
            "assert files and not bad, bad[:5]\n"
            "print(len(files))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(ENV, PYTHONPATH=str(site))  # sys.path before the editable install's finder
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _hostile_dir(path: Path) -> Path:
    """A user's working directory holding files named like the repo's folders: importing any of
    them is a bug (a bare-name import somewhere, or the cwd shadowing the package)."""
    path.mkdir()
    (path / "losses.py").write_text('raise RuntimeError("user file imported: losses.py")\n')
    for name in ("core", "experiments"):
        (path / name).mkdir()
        (path / name / "__init__.py").write_text(
            f'raise RuntimeError("user file imported: {name}/__init__.py")\n')
    for name in ("heads", "attention"):
        (path / f"{name}.py").write_text(f'raise RuntimeError("user file imported: {name}.py")\n')
    return path


def _console_script() -> list[str]:
    exe = "polytask.exe" if os.name == "nt" else "polytask"
    script = Path(sysconfig.get_path("scripts")) / exe
    found = str(script) if script.exists() else shutil.which("polytask")
    assert found, "the polytask console script is not installed (pip install -e .)"
    return [found]


ENTRIES = {"script": _console_script, "module": lambda: [sys.executable, "-m",
                                                          "polytask.experiments.cli"]}
SMALL = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2", "data.eval_examples=2",
         "train.batch_size=8", "model.d_model=32", "model.d_ff=64",
         "train.generation_max_tokens=4"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["script", "module"])
def test_train_from_a_directory_with_lookalike_files(entry, tmp_path):
    cwd = _hostile_dir(tmp_path / "work")
    proc = _run([*ENTRIES[entry](), "train", str(TINY), *SMALL, "--out", "run", "--no-progress"],
                cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "user file imported" not in proc.stdout + proc.stderr
    assert (cwd / "run" / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("entry, jobs", [("script", []), ("module", ["--jobs", "2",
                                                                     "--threads", "1"])])
def test_ablate_from_a_directory_with_lookalike_files(entry, jobs, tmp_path):
    # with -m the cwd is sys.path[0] of the spawned --jobs workers too
    cwd = _hostile_dir(tmp_path / "work")
    proc = _run([*ENTRIES[entry](), "ablate", str(TINY), "grid.sharing.strategy=[none, hard]",
                 "seeds=[0]", *SMALL, "--out", "abl", "--no-progress", *jobs], cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "user file imported" not in proc.stdout + proc.stderr
    assert (cwd / "abl" / "results.csv").is_file()
    assert len(list((cwd / "abl" / "runs").glob("*/summary.json"))) == 2
