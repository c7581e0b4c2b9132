"""The import floors run one way: attention (1) -> core (2) -> losses (3) -> heads (4) ->
experiments (5). A module imports from its own floor or lower ones, never higher, and no set of
modules imports itself round in a circle. Every import counts: at module level, inside a
function, under ``TYPE_CHECKING``. The checker is tried on planted trees too, so it is known to
fail when it should."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"attention": 1, "core": 2, "losses": 3, "heads": 4, "experiments": 5}


def module_names(root: Path) -> dict[str, Path]:
    """``polytask.<folder>.<...>`` -> file, for every .py file under the floors' folders."""
    names = {}
    for top in FLOORS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(["polytask", *parts])] = path
    return names


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, resolved to known modules.
    ``from a.b import c`` imports ``a.b.c`` when that is a module, else ``a.b``; a bare top name
    (``import core``) is reported as itself."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.append((node.lineno, full if full in known else base))
    return [(line, m) for line, m in found
            if m in known or m.split(".")[0] in FLOORS or m == "polytask"]


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if parts[0] == "polytask" and len(parts) > 1 else None


def check(root: Path) -> list[str]:
    """Every violation, one line each: bare imports, upward imports, cycles."""
    names = module_names(root)
    known = set(names)
    problems: list[str] = []
    graph: dict[str, set[str]] = {n: set() for n in names}
    for name, path in names.items():
        where = path.relative_to(root)
        for line, target in imports_of(path, name, known):
            if target.split(".")[0] in FLOORS:
                problems.append(f"{where}:{line} imports {target!r} by its bare name; use "
                                f"polytask.{target}")
                continue
            if target == "polytask" or target == name:
                continue
            if floor(target) is not None and floor(target) > floor(name):
                problems.append(f"{where}:{line} imports {target} from floor {floor(target)} "
                                f"into floor {floor(name)} ({name})")
            if target in graph:
                graph[name].add(target)
    problems += [f"import cycle among {', '.join(c)} (each imports another, in a circle)"
                 for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_repository_keeps_its_floors():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for top in FLOORS:
        (root / top).mkdir(parents=True, exist_ok=True)
        (root / top / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    root = _plant(tmp_path, {
        "core/train.py": "def f():\n    from polytask.heads.model import M\n",
        "heads/model.py": "M = 1\n"})
    assert check(root) == ["core/train.py:2 imports polytask.heads.model from floor 4 into "
                           "floor 2 (polytask.core.train)"]


def test_an_upward_import_under_type_checking_is_found(tmp_path):
    root = _plant(tmp_path, {
        "attention/mha.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from polytask.core import layers\n",
        "core/layers.py": ""})
    assert check(root) == ["attention/mha.py:3 imports polytask.core.layers from floor 2 into "
                           "floor 1 (polytask.attention.mha)"]


def test_a_cycle_on_one_floor_is_found(tmp_path):
    root = _plant(tmp_path, {
        "heads/a.py": "from polytask.heads.b import x\n",
        "heads/b.py": "def g():\n    from polytask.heads import c\n",
        "heads/c.py": "import polytask.heads.a\n"})
    assert check(root) == ["import cycle among polytask.heads.a, polytask.heads.b, "
                           "polytask.heads.c (each imports another, in a circle)"]


def test_a_bare_name_and_a_relative_upward_import_are_found(tmp_path):
    root = _plant(tmp_path, {
        "losses/a.py": "import core.x\nfrom ..heads import plan\n",
        "core/x.py": "", "heads/plan.py": ""})
    assert check(root) == [
        "losses/a.py:1 imports 'core.x' by its bare name; use polytask.core.x",
        "losses/a.py:2 imports polytask.heads.plan from floor 4 into floor 3 (polytask.losses.a)"]


def test_downward_and_same_floor_imports_pass(tmp_path):
    root = _plant(tmp_path, {
        "heads/a.py": "from polytask.heads.b import x\nfrom polytask.core import y\n"
                      "from polytask import losses\n",
        "heads/b.py": "x = 1\n", "core/y.py": ""})
    assert check(root) == []
