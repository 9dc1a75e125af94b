"""Docstrings and ``--help`` texts quote no benchmark results (they go stale at the next re-run): results live in
the README's "Results" and ``benchmarks/results/``, and the docs point there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(p for d in ("pruning_env", "agents", "benchmarks") for p in (ROOT / d).rglob("*.py")),
                  ROOT / "train_marl.py"])
# What a measured result looks like in prose: a speed-up or cost factor, a timing of a run, a measured delta of
# the objective, a "measured on <network>" summary. Definitions and defaults (rates, widths, MAC counts) are fine.
RESULT = re.compile(r"\d+(\.\d+)?(-\d+(\.\d+)?)? ?x (faster|slower|the cost|cheaper)"
                    r"|about \d+ (minutes|hours) for"
                    r"|[-+]\d\.\d+ objective"
                    r"|measured on (vgg|resnet|alexnet)", re.IGNORECASE)


def _texts(path: Path) -> list[tuple[int, str]]:
    """Docstrings and the help strings of ``option(...)`` / ``nested(...)`` fields, with their line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append((getattr(node, "lineno", 1), doc))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append((node.lineno, node.value.value))  # attribute docstrings
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("option", "nested"):
            out += [(node.lineno, a.value) for a in node.args[1:2] if isinstance(a, ast.Constant)
                    and isinstance(a.value, str)]
    return out


def test_docstrings_and_help_texts_quote_no_measured_results():
    hits = [f"{p.relative_to(ROOT)}:{line}: {m.group(0)!r}" for p in SOURCES for line, text in _texts(p)
            if (m := RESULT.search(" ".join(text.split())))]
    assert hits == [], "move these numbers to README 'Results' / benchmarks/results and point there"


def test_the_pattern_finds_the_kinds_of_results_it_is_for():
    for text in ("acc ranks better at both for 1.6-1.8x the cost", "channels-last (about 1.3x faster on CPU)",
                 "about 20 minutes for VGG-16", "radius 1 found worse plans (-0.026 objective)",
                 "Measured on VGG-16 w0.25 at exact MACs budgets"):
        assert RESULT.search(text), text
    for text in ("FLOPs = 2 x MACs", "default: 2 x --workers", "width 0.25", "decay 0.999", "313.46 M MACs"):
        assert not RESULT.search(text), text
