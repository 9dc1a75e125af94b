"""A setting's declared range (``option(min=, max=, choices=)``) is checked in one place: by ``check_settings``
when the config is built. No code repeats it afterwards with a check of its own, which could never fire (or,
drifting from the declaration, would contradict it). Checked on the source tree: every ``if ...: raise`` that
bounds a config field by a number, or tests it against a collection, where the field declares that rule."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning_env", "benchmarks")
_BOUNDS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _config_classes() -> dict[str, type]:
    """Every config dataclass of the packages (a field written with ``option``), by class name."""
    out: dict[str, type] = {}
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, f"{pkg}."):
            try:
                module = importlib.import_module(info.name)
            except ImportError as exc:  # a removed module (pruning_env.filter_pruning_v0) that names its successor
                if "was removed" in str(exc):
                    continue
                raise
            for obj in vars(module).values():
                if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ \
                        and any("help" in f.metadata for f in dataclasses.fields(obj)):
                    out[obj.__name__] = obj
    return out


CONFIGS = _config_classes()


def _field(cls: type, name: str) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if f.name == name), None)


def _class_of_annotation(node: ast.expr | None) -> type | None:
    if node is None:
        return None
    text = ast.unparse(node).strip("'\"")
    names = [part.strip() for part in text.split("|")]
    found = [CONFIGS[n] for n in names if n in CONFIGS]
    return found[0] if len(found) == 1 else None


def _class_of(node: ast.expr, env: dict[str, type]) -> type | None:
    """The config class ``node`` (a name or a chain of nested-config attributes) evaluates to, if known."""
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _class_of(node.value, env)
        f = _field(owner, node.attr) if owner else None
        return f.metadata.get("nested") if f is not None else None
    return None


def _declared(node: ast.expr, env: dict[str, type]) -> dataclasses.Field | None:
    """The field ``node`` reads (``cfg.x``, ``float(cfg.x)``), if it is a leaf setting of a known config."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("float", "int") \
            and len(node.args) == 1:
        node = node.args[0]
    if not isinstance(node, ast.Attribute):
        return None
    owner = _class_of(node.value, env)
    f = _field(owner, node.attr) if owner else None
    return f if f is not None and "nested" not in f.metadata else None


def _number(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def _repeats(test: ast.expr, env: dict[str, type]) -> list[str]:
    hits: dict[str, None] = {}  # a field once per check
    for cmp in (n for n in ast.walk(test) if isinstance(n, ast.Compare)):
        operands = [cmp.left, *cmp.comparators]
        for (a, b), op in zip(itertools.pairwise(operands), cmp.ops):
            for side, other in ((a, b), (b, a)):
                f = _declared(side, env)
                if f is None:
                    continue
                if isinstance(op, _BOUNDS) and _number(other) and ("min" in f.metadata or "max" in f.metadata):
                    hits[f.name] = None
                if isinstance(op, (ast.In, ast.NotIn)) and side is a and "choices" in f.metadata:
                    hits[f.name] = None
    return list(hits)


def _function_env(fn: ast.FunctionDef, owner: type | None) -> dict[str, type]:
    env: dict[str, type] = {}
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    for i, arg in enumerate(args):
        if i == 0 and arg.arg == "self" and owner is not None:
            env["self"] = owner
        elif (cls := _class_of_annotation(arg.annotation)) is not None:
            env[arg.arg] = cls
    for node in ast.walk(fn):  # sc = cfg.scoring
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            cls = _class_of(node.value, env)
            if cls is not None:
                env[node.targets[0].id] = cls
    return env


def repeated_range_checks(path: Path) -> list[str]:
    """``file:line: field`` of every check in ``path`` that repeats a declared range or choice."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, owner: type | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, CONFIGS.get(child.name))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                env = _function_env(child, owner)
                for n in ast.walk(child):
                    if isinstance(n, ast.If) and any(isinstance(s, ast.Raise) for s in n.body):
                        found.extend(f"{path.name}:{n.lineno}: {name}" for name in _repeats(n.test, env))
            else:
                visit(child, owner)

    visit(tree, None)
    return found


def test_no_code_repeats_a_declared_range():
    sources = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert [f"{path.parent.name}/{hit}" for path in sources for hit in repeated_range_checks(path)] == []


def test_the_scan_finds_a_repeated_range(tmp_path):
    """The scan itself: a config method or a function on a config re-checking a declared range is found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(cfg: 'SearchConfig | None', other: int) -> None:\n"
        "    if cfg.plans < 1:\n        raise ValueError('again')\n"
        "    if other < 1 or cfg.algo_config is None:\n        raise ValueError('fine: no declared range')\n"
        "class FinetuneConfig:\n"
        "    def check(self):\n"
        "        if not float(self.lr) > 0:\n            raise ValueError('again')\n"
        "        if self.optimizer not in ('sgd', 'adam'):\n            raise ValueError('again')\n")
    hits = [h.split(": ", 1)[1] for h in repeated_range_checks(sample)]
    assert hits == ["plans", "lr", "optimizer"]
