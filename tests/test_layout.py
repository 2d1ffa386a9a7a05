"""The house rules the code keeps (issue 22), checked over the tree with the AST:

* no module uses another's private name (``_x``): neither ``from m import _x`` nor ``m._x`` nor
  ``obj._x`` where ``_x`` is defined in another of the project's files (the standard library's and
  third-party privates, such as ``argparse._SubParsersAction``, are not the project's);
* no module of ``models/``, ``pipeline/`` or ``jobs/`` over :data:`MAX_MODULE_LINES` lines, no
  function there over :data:`MAX_FUNCTION_LINES`;
* no file of ``tests/`` (its sub-folders too: they mirror the packages) over :data:`MAX_MODULE_LINES`
  lines either (a test file mirrors one module; one that outgrows the limit is split by what it tests),
  and no function there over :data:`MAX_FUNCTION_LINES`.

``python tests/test_layout.py`` prints every finding (and the third-party privates used) and exits 1
if there is one.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "jobs", "tests")
SIZED = ("models", "pipeline", "jobs")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
OWN = {"self", "cls"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def project_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for top in PACKAGES for p in (root / top).rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_project_module(name: str, local: set[str]) -> bool:
    """Whether ``name`` (absolute, e.g. ``pipeline.gallery.store``) is one of the project's modules;
    ``local`` holds the test helpers imported by bare name (``conftest``, ``s3server``)."""
    return name.split(".")[0] in PACKAGES or name.split(".")[0] in local


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a file defines: functions, classes, assigned names and attributes, arguments."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return out


def _imports(tree: ast.AST, module: str) -> Iterator[tuple[int, str, str | None, str]]:
    """(line, module imported from, name or None for ``import m``, bound name) of a file."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield n.lineno, a.name, None, a.asname or a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolve against this module's package
                pkg = module.split(".")[: -n.level] if not module.endswith("__init__") else module.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            for a in n.names:
                yield n.lineno, base, a.name, a.asname or a.name


def private_crossings(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """-> (findings: the project's private names used outside their module, third-party privates used)."""
    files = project_files(root)
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    defined = {p: defined_names(t) for p, t in trees.items()}
    everywhere: dict[str, set[Path]] = {}
    for p, names in defined.items():
        for name in names:
            if is_private(name):
                everywhere.setdefault(name, set()).add(p)
    local = {"conftest", "s3server", "pushgateway_stub", "operator_world", "chromium", "planted_waves", "flaky_proxy"}
    findings, external = [], []
    for p, tree in trees.items():
        rel, module = p.relative_to(root), _module_name(p, root)
        bound: dict[str, str] = {}  # name bound by an import -> the module it is (or comes from)
        for line, mod, name, as_ in _imports(tree, module):
            full = mod if name is None else f"{mod}.{name}"
            bound[as_] = full
            private_part = next((x for x in full.split(".") if is_private(x)), None)
            if private_part is None:
                continue
            where = f"{rel}:{line}: import {full}"
            (findings if is_project_module(full, local) else external).append(where)
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and is_private(n.attr)):
                continue
            base = n.value
            if isinstance(base, ast.Name) and base.id in OWN:
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            where = f"{rel}:{n.lineno}: {ast.unparse(n)}"
            if isinstance(base, ast.Name) and base.id in bound:  # m._x with m an imported module or name
                (findings if is_project_module(bound[base.id], local) else external).append(where)
            elif n.attr in defined[p]:
                continue  # this file's own private, used in this file
            elif n.attr in everywhere:
                findings.append(f"{where} (defined in {', '.join(sorted(str(q.relative_to(root)) for q in everywhere[n.attr]))})")
            else:
                external.append(where)
    return findings, external


def oversize_tests(root: Path = ROOT) -> list[str]:
    """Files of ``tests/`` (all its folders) over :data:`MAX_MODULE_LINES` lines, functions there over
    :data:`MAX_FUNCTION_LINES`."""
    return _oversize(root, ("tests",))


def oversize(root: Path = ROOT) -> list[str]:
    """Modules of :data:`SIZED` over :data:`MAX_MODULE_LINES` lines, functions over :data:`MAX_FUNCTION_LINES`."""
    return _oversize(root, SIZED)


def _oversize(root: Path, tops: tuple[str, ...]) -> list[str]:
    out = []
    for top in tops:
        for p in sorted((root / top).rglob("*.py")):
            text = p.read_text()
            rel = p.relative_to(root)
            if (n := len(text.splitlines())) > MAX_MODULE_LINES:
                out.append(f"{rel}: {n} lines")
            for f in ast.walk(ast.parse(text)):
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = f.end_lineno - f.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        out.append(f"{rel}:{f.lineno}: {f.name}() {n} lines")
    return out


def test_no_module_uses_another_modules_private_names() -> None:
    findings, _ = private_crossings()
    assert not findings, "\n".join(findings)


def test_modules_and_functions_keep_their_size() -> None:
    found = oversize()
    assert not found, "\n".join(found)


def test_test_files_keep_their_size(tmp_path: Path) -> None:
    assert not (found := oversize_tests()), "\n".join(found)
    (tmp_path / "tests").mkdir()  # the check itself: a file one line over the limit is found
    (tmp_path / "tests" / "test_big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "tests" / "test_ok.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert oversize_tests(tmp_path) == [f"tests/test_big.py: {MAX_MODULE_LINES + 1} lines"]
    (tmp_path / "tests" / "test_big.py").unlink()  # and a function one line over, in a sub-folder
    (tmp_path / "tests" / "pipeline").mkdir()
    (tmp_path / "tests" / "pipeline" / "test_long.py").write_text(
        "def ok():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1) + "\n\ndef long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversize_tests(tmp_path) == [f"tests/pipeline/test_long.py:{MAX_FUNCTION_LINES + 3}: long() {MAX_FUNCTION_LINES + 1} lines"]


if __name__ == "__main__":
    findings, external = private_crossings()
    sizes = oversize() + oversize_tests()
    print(f"private names used across the project's modules: {len(findings)}")
    print("".join(f"  {f}\n" for f in findings), end="")
    print(f"third-party/stdlib privates used (allowed): {len(external)}")
    print("".join(f"  {f}\n" for f in external), end="")
    print(f"modules over {MAX_MODULE_LINES} lines / functions over {MAX_FUNCTION_LINES} in {', '.join(SIZED)} and tests: {len(sizes)}")
    print("".join(f"  {f}\n" for f in sizes), end="")
    sys.exit(1 if findings or sizes else 0)
