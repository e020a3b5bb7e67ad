"""The layers import one way: images -> models + probes -> analyses -> run store -> server -> views.

Read from the source (every ``import`` and ``from ... import``, also those inside functions), so a
lazy import that breaks the layering is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitscope"

#: package -> vitscope packages it must never import
_ABOVE_ANALYSIS = {"pipeline", "figures", "report", "cli", "server", "experiments"}
FORBIDDEN = {
    "core": {"models", "capture", "data", "store", "analysis", "training", *_ABOVE_ANALYSIS},
    "capture": {"models", "analysis", "training", "store", *_ABOVE_ANALYSIS},
    "models": {"analysis", "store", *_ABOVE_ANALYSIS},
    "data": {"models", "capture", "analysis", "training", "store", *_ABOVE_ANALYSIS},
    "store": {"analysis", "training", "models", "capture", *_ABOVE_ANALYSIS},
    "analysis": _ABOVE_ANALYSIS,
    "training": {"analysis", "store", *_ABOVE_ANALYSIS},
    "pipeline": {"figures", "report", "cli", "server", "experiments"},
    "report": {"pipeline", "cli", "server", "experiments"},
    "figures": {"pipeline", "report", "cli", "server", "experiments"},
    "server": {"cli", "report"},
}


def _vitscope_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "vitscope" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_lower_layer_never_imports_a_higher_one(package):
    folder = SRC / package
    assert folder.is_dir(), f"no package vitscope.{package}"
    bad = []
    for path in sorted(folder.rglob("*.py")):
        hit = _vitscope_imports(path) & FORBIDDEN[package]
        if hit:
            bad.append(f"{path.relative_to(SRC)} imports vitscope.{{{', '.join(sorted(hit))}}}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from vitscope.analysis.windows import window_keys\n    import vitscope.server.app\n")
    assert _vitscope_imports(probe) == {"analysis", "server"}
