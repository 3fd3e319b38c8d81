"""The layout: every module imports and every import of ours names something that exists, the
package has no import circles, entry folders stay on top, nothing edits sys.path, model code knows
nothing of distribution, every module says what it does.

Imports are read with `ast` from each file (module level and inside functions alike), so a
circle hidden in a function-level import is found too.

    python -m pytest tests/test_layout.py -q
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm_dist", "preprocess")     # importable packages: every module is checked
SCANNED = ("vlm_dist", "preprocess", "launch", "tests")   # folders checked for sys.path edits


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in python_files(*PACKAGES)}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, wherever it is; relative imports resolved.

    `from a.b import c` gives a.b.c, except when a.b is ours and c is not a module of ours
    (then c is a name defined in a.b, and the import is of a.b).
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                ours = base.split(".")[0] in PACKAGES
                out.append((node.lineno, sub if sub in MODULES or not ours else base))
    return out


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports."""
    return {mod: {n for _, n in imported_names(path) if n in MODULES and n != mod}
            for mod, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def from_imports_of_ours(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from <our module> import name` in the file, wherever it is."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES:
            out += [(node.lineno, node.module, a.name) for a in node.names if a.name != "*"]
    return out


IMPORT_CHECK = """
import importlib, json, sys, traceback
modules, imports = json.load(sys.stdin)
failed = []
for name in modules:
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ': ' + traceback.format_exc(limit=-2))
for where, module, name in imports:     # function-level imports run only when called: check them here
    try:
        m = importlib.import_module(module)
        if not hasattr(m, name):
            importlib.import_module(module + '.' + name)
    except BaseException as e:
        failed.append(f'{where}: from {module} import {name}: {type(e).__name__}: {e}')
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_and_every_import_of_ours_resolves_in_a_fresh_interpreter():
    """Each module of vlm_dist and preprocess imports, and every `from vlm_dist... import x` in the
    repository (tests and launch included, inside functions too) names something that exists."""
    imports = [(f"{path.relative_to(REPO)}:{line}", module, name) for path in python_files(*SCANNED)
               for line, module, name in from_imports_of_ours(path)]
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=REPO, capture_output=True, text=True,
                          input=json.dumps([sorted(MODULES), imports]), timeout=600)
    assert proc.returncode == 0, f"imports that fail:\n{proc.stdout}{proc.stderr[-3000:]}"


def test_no_import_circles_in_the_package():
    graph = {m: deps for m, deps in import_graph().items() if m.startswith("vlm_dist")}
    cycle = find_cycle(graph)
    assert cycle is None, ("import circle: " + " -> ".join(cycle) + "\n  files: "
                           + ", ".join(str(MODULES[m].relative_to(REPO)) for m in cycle[:-1])
                           + "\n  move what both sides need into a module below them")


def test_package_and_preprocess_never_import_launch():
    launch_names = {"launch"} | {p.stem for p in (REPO / "launch").glob("*.py")}
    bad = [f"{path.relative_to(REPO)}:{line}: imports {name}"
           for path in MODULES.values() for line, name in imported_names(path)
           if name.split(".")[0] in launch_names]
    assert not bad, "launch/ holds entry points; nothing imports them:\n  " + "\n  ".join(bad)


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def sys_path_edits(path: Path) -> list[int]:
    """Lines that change sys.path: a call of one of its methods, an assignment to it or into it."""
    lines = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value):
            if node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear"):
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                    lines.append(node.lineno)
    return lines


def test_nothing_edits_sys_path():
    bad = [f"{path.relative_to(REPO)}:{line}" for path in python_files(*SCANNED)
           for line in sys_path_edits(path)]
    assert not bad, ("sys.path is edited at " + ", ".join(bad)
                     + "; import from the installed package (pip install -e .) instead")


def test_the_sys_path_check_sees_every_form(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("import sys\nsys.path.insert(0, 'a')\nsys.path.append('b')\nsys.path = []\n"
                 "sys.path[0:0] = ['c']\nsys.path += ['d']\nprint(sys.path, sys.path[0])\n")
    assert sorted(sys_path_edits(f)) == [2, 3, 4, 5, 6]


def test_model_code_imports_no_distribution():
    bad = [f"{path.relative_to(REPO)}:{line}: imports {name}"
           for mod, path in MODULES.items() if mod.startswith("vlm_dist.model")
           for line, name in imported_names(path)
           if name.split(".")[0] == "deepspeed" or name == "torch.distributed"
           or name.startswith("torch.distributed.")]
    assert not bad, ("model code knows nothing of distribution (vlm_dist.dist does):\n  "
                     + "\n  ".join(bad))


def test_the_cycle_finder_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_docstring():
    bare = [str(path.relative_to(REPO)) for path in MODULES.values() if not ast.get_docstring(parse(path))]
    assert not bare, "modules without a docstring saying what they do:\n  " + "\n  ".join(bare)
