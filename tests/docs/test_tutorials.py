"""Run every tutorial in ``docs/tutorials``: a tutorial is also a test.

The ```python blocks of one Markdown file are executed in order in one namespace, with the
working directory set to a temporary directory. Figures go to ``$POLYTASK_FIGURES``, which points
into the temporary directory, so the tests never rewrite the committed PNGs in ``docs/figures``.
To regenerate those, run ``python tests/docs/test_tutorials.py --write-figures`` from the repo root.
"""
from __future__ import annotations

import linecache
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The executable ```python blocks of a Markdown file, in order."""
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def run_tutorial(path: Path, workdir: Path, figures: Path) -> dict:
    """Execute the tutorial's blocks in one namespace; return the namespace."""
    import matplotlib
    matplotlib.use("Agg")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    old_cwd, old_fig = Path.cwd(), os.environ.get("POLYTASK_FIGURES")
    os.chdir(workdir)
    os.environ["POLYTASK_FIGURES"] = str(figures)
    namespace: dict = {"__name__": f"tutorial_{path.stem}"}
    try:
        for n, code in enumerate(python_blocks(path), start=1):
            filename = f"{path.name} [block {n}]"
            # Register the source so that tracebacks show the failing tutorial line.
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            exec(compile(code, filename, "exec"), namespace)
    finally:
        os.chdir(old_cwd)
        if old_fig is None:
            os.environ.pop("POLYTASK_FIGURES", None)
        else:
            os.environ["POLYTASK_FIGURES"] = old_fig
        import matplotlib.pyplot as plt
        plt.close("all")
    return namespace


def test_index_lists_every_tutorial():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for path in TUTORIALS:
        assert f"tutorials/{path.name}" in index, f"docs/README.md does not link {path.name}"


@pytest.mark.parametrize("path", [ROOT / "docs" / "README.md", *TUTORIALS],
                         ids=["README", *(p.stem for p in TUTORIALS)])
def test_relative_links_resolve(path: Path):
    text = BLOCK.sub("", path.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial(path: Path, tmp_path: Path):
    assert python_blocks(path), f"{path.name} has no ```python blocks"
    figures = tmp_path / "figures"
    figures.mkdir()
    run_tutorial(path, tmp_path, figures)
    # Every figure the Markdown shows must be one the code just produced.
    for name in re.findall(r"!\[[^\]]*\]\(\.\./figures/([^)]+)\)", path.read_text(encoding="utf-8")):
        assert (figures / name).is_file(), f"{path.name} shows {name} but did not write it"


if __name__ == "__main__":  # regenerate the committed figures
    import tempfile
    if "--write-figures" not in sys.argv:
        sys.exit("usage: python tests/docs/test_tutorials.py --write-figures [NAME ...]")
    wanted = [a for a in sys.argv[1:] if not a.startswith("--")]
    for path in TUTORIALS:
        if wanted and not any(w in path.stem for w in wanted):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run_tutorial(path, Path(tmp), ROOT / "docs" / "figures")
        print("ran", path.name)
