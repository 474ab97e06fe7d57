"""The package import rules of lit-cf (see the architecture notes): dependencies point down.

``metrics``, ``data`` and ``attribution`` read explain runs through :mod:`lit_cf.runs`, never
through :mod:`lit_cf.explainers`; the run format depends on nothing but :mod:`lit_cf.errors`;
the report draws without knowing methods or metrics. Imports are read with :mod:`ast`, so an
import inside a function counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_cf"

#: package -> modules (prefixes) it must not import
FORBIDDEN = {
    "metrics": ("lit_cf.explainers", "lit_cf.cli", "lit_cf.trainer", "lit_cf.studies"),
    "data": ("lit_cf.explainers", "lit_cf.metrics", "lit_cf.cli", "lit_cf.trainer", "lit_cf.studies"),
    "attribution": ("lit_cf.explainers", "lit_cf.metrics", "lit_cf.cli", "lit_cf.trainer", "lit_cf.studies"),
    "report": ("lit_cf.explainers", "lit_cf.metrics", "lit_cf.cli", "lit_cf.trainer", "lit_cf.studies"),
}
#: lit_cf modules the run format may import (nothing else of lit_cf)
RUNS_ALLOWED = ("lit_cf.errors", "lit_cf.runs")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a file; ``from a import b`` gives ``a.b`` too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"lit_cf/{package} has no modules"
    bad = [
        f"{f.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for f in files
        for line, module in imported_modules(f)
        if any(_matches(module, p) for p in FORBIDDEN[package]) or module.startswith(".")
    ]
    assert not bad, "\n".join(bad)


def test_run_format_depends_only_on_errors():
    bad = [
        f"{f.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for f in sorted((PACKAGE / "runs").rglob("*.py"))
        for line, module in imported_modules(f)
        if (module.startswith(".") or _matches(module, "lit_cf")) and not any(_matches(module, a) for a in RUNS_ALLOWED)
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: an import inside a function is found, with its line."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef load():\n    from lit_cf.explainers.rundir import ExplainRun\n")
    assert (4, "lit_cf.explainers.rundir") in imported_modules(f)
    assert any(_matches(m, "lit_cf.explainers") for _, m in imported_modules(f))
