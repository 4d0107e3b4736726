"""The code base's layout rules (docs/architecture.md): no import cycle among catgrad's modules,
small modules, product-only prose, and every ``python -m`` command the docs give exists and
answers ``--help``."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGES = ("estimators", "models", "datamodules", "experiments")
MAX_LINES = 400
DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m (experiments(?:\.\w+)+)")


def module_files() -> dict[str, Path]:
    """Every catgrad module by dotted name (``experiments.report.runs`` -> its file)."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """catgrad modules that ``name`` imports anywhere in its file (function-level imports and
    ``TYPE_CHECKING`` blocks included: a cycle hidden in a function is still a cycle)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle_among_catgrad_modules() -> None:
    files = module_files()
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    # A package importing its own submodules (re-exports in __init__) is not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 40  # the walk saw the whole code base


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by subject): {too_long}"


def test_product_prose_names_no_issue_or_team_guide() -> None:
    pattern = re.compile(r"issue [0-9]|GUIDE|this session|next session")
    hits = []
    roots = [*PACKAGES, "conf", "tests", "docs"]
    files = [PROJECT_ROOT / "README.md"]
    for root in roots:
        for suffix in ("*.py", "*.md", "*.yaml"):
            files += sorted((PROJECT_ROOT / root).rglob(suffix))
    for path in files:
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def documented_commands() -> list[str]:
    commands = {match for doc in DOCUMENTS for match in COMMAND.findall(doc.read_text())}
    return sorted(commands)


def test_every_documented_command_is_a_module() -> None:
    commands = documented_commands()
    assert "experiments.train" in commands and "experiments.report" in commands
    missing = [name for name in commands if importlib.util.find_spec(name) is None]
    assert not missing, f"README/docs name modules that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("module", documented_commands())
def test_documented_command_answers_help(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=300, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "== Config ==" in result.stdout, result.stdout
