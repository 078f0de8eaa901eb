"""The package's layers: the core (trainer, config, strategies, SFT data) never imports `evaluation/` or
`compare/`, nor what only the rewards need; and no two modules import each other.

Imports are read from the source (module level, inside functions and in `if TYPE_CHECKING:` blocks), so a lazy
import inside a function counts too; one runtime check imports the trainer in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "amft_trl"
CORE = ("amft_trl.trainer", "amft_trl.config", "amft_trl.balancing", "amft_trl.sft_data")
OUTER = ("amft_trl.evaluation", "amft_trl.compare")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The amft_trl modules `name` imports (its package's `__init__` included, as Python runs it)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(module: str) -> None:
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        if module.startswith("amft_trl"):
            found.add(module)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    parent = name.rpartition(".")[0]
    while parent:  # importing a.b.c runs a and a.b first
        found.add(parent)
        parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("core", sorted(m for m in MODULES if _in(m, CORE)))
def test_the_core_never_imports_evaluation_or_compare(core):
    outer = sorted(m for m in _reachable(core) if _in(m, OUTER))
    assert outer == [], f"{core} imports {outer} (directly or through other modules)"


def test_the_layer_check_sees_a_lazy_import(tmp_path, monkeypatch):
    """It can fail: a function-level import of `compare` from a core module is found."""
    MODULES["amft_trl.fake_core"] = tmp_path / "fake_core.py"
    (tmp_path / "fake_core.py").write_text("def f():\n    from amft_trl.compare.runs import run_grid\n")
    try:
        assert "amft_trl.compare.runs" in _imports("amft_trl.fake_core")
    finally:
        del MODULES["amft_trl.fake_core"]


def test_no_two_modules_import_each_other():
    """A module and a package's `__init__` re-exporting it are not a cycle (the `__init__` is only an index);
    among the modules themselves, imports go one way (`evaluation.results` <- `tables`,
    `model_evaluation`; `compare.configs` <- `grid`, `runs`)."""
    plain = {m: {t for t in GRAPH[m] if not MODULES[t].name == "__init__.py"} for m in MODULES}
    plain = {m: targets for m, targets in plain.items() if MODULES[m].name != "__init__.py"}
    cycles = []
    for module, targets in plain.items():
        for target in targets:
            seen, todo = set(), [target]
            while todo:
                current = todo.pop()
                for nxt in plain.get(current, ()):
                    if nxt == module:
                        cycles.append((module, target))
                        todo = []
                        break
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
    assert cycles == [], f"import cycles (module -> a module that leads back to it): {sorted(set(cycles))}"


def test_importing_the_trainer_loads_neither_evaluation_compare_nor_math_verify():
    code = (
        "import sys, amft_trl.trainer\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('amft_trl.evaluation', 'amft_trl.compare', "
        "'math_verify')))\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
