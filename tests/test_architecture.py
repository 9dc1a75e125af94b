"""The layering rules of the README's "Architecture" section, checked on the source tree.

* ``agents/`` imports nothing from ``pruning_env`` (it knows the env only through the API it is handed);
* inside ``pruning_env`` a layer imports only its own layer or the layers below it;
* nothing outside the env's module reads an underscore attribute of an env;
* benchmarks import the package, never a script (``train_marl.py``, a CLI's internals);
* no config dataclass re-declares a setting of the shared configs: it nests them;
* no module is over 600 lines.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from pruning_env.core.config import flat_names
from pruning_env.envs.config import EnvConfig
from pruning_env.search import SearchConfig
from pruning_env.training.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top; criteria and engine are siblings (neither imports the other).
LAYERS = {"core": 0, "criteria": 1, "engine": 1, "training": 2, "envs": 3, "search": 4, "cli": 5}
SOURCES = sorted(p for d in ("pruning_env", "agents", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def test_agents_never_import_pruning_env():
    offenders = {p.name: m for p in (ROOT / "agents").rglob("*.py") for m in _imports(p)
                 if m == "pruning_env" or m.startswith("pruning_env.")}
    assert offenders == {}


def test_each_layer_imports_only_its_own_layer_or_below():
    bad = []
    for path in (ROOT / "pruning_env").rglob("*.py"):
        parts = path.relative_to(ROOT / "pruning_env").parts
        if len(parts) == 1:  # the package's __init__ and the entry points sit on top of everything
            continue
        layer = parts[0]
        for module in _imports(path):
            names = module.split(".")
            if names[0] == "agents" and layer != "cli":
                bad.append((str(path.relative_to(ROOT)), module))
            if names[0] != "pruning_env" or len(names) < 2 or names[1] not in LAYERS:
                continue
            target = names[1]
            if target != layer and LAYERS[target] >= LAYERS[layer]:
                bad.append((str(path.relative_to(ROOT)), module))
    assert bad == []


def test_nothing_outside_the_env_module_reads_its_private_attributes():
    pattern = re.compile(r"\b(env|par|self\.env|base_env|\w+_env)\._[a-z]\w*")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES if p != ROOT / "pruning_env/envs/env.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_benchmarks_import_the_package_not_scripts():
    def script(module: str) -> bool:
        return module.startswith("train_marl") or (module.startswith("pruning_env.cli")
                                                   and not module.startswith("pruning_env.cli.options"))

    bad = [(p.name, m) for p in (ROOT / "benchmarks").rglob("*.py") for m in _imports(p) if script(m)]
    assert bad == []


SHARED = {"EnvConfig": set(flat_names(EnvConfig)), "SearchConfig": set(flat_names(SearchConfig)),
          "FinetuneConfig": {f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata.get("cli") is not False}}
CONFIG_MODULES = ["pruning_env.cli.prune", "pruning_env.cli.marl", "benchmarks.marl", "benchmarks.criteria",
                  "benchmarks.env_step", "benchmarks.latency", "benchmarks.surgery_speed", "benchmarks.kl_speed",
                  "benchmarks.paper_scale"]


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_configs_nest_the_shared_settings_instead_of_copying_them(module):
    mod = importlib.import_module(module)
    copies = {}
    for name, obj in vars(mod).items():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module:
            direct = {f.name for f in dataclasses.fields(obj) if "nested" not in f.metadata}
            for shared, names in SHARED.items():
                if direct & names:
                    copies[f"{name} re-declares {shared}"] = sorted(direct & names)
    assert copies == {}


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*SOURCES, ROOT / "train_marl.py"]
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
