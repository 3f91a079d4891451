"""The layering rule: the engines never reach up into scikit-learn, skorch or the estimators.

The shared engines (curvature, posteriors, predictives, output distributions, CVP's moment
propagation) are plain torch code that a PyTorch user can call without scikit-learn. This
test reads each engine module's imports (every ``import`` statement, also those inside
functions) and fails on one that names a forbidden package or skuq's estimator layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SKUQ = Path(__file__).resolve().parents[2] / "skuq"

# The engine layer: what it may not import.
ENGINE_MODULES = [
    "outputs.py",
    "posterior",
    "predictive.py",
    "curvature",
    "cvp/registry.py",
    "cvp/graph.py",
    "cvp/propagator.py",
    "cvp/pooled.py",
    "cvp/rules",
    "cvp/moments",
    "cvp/calibration.py",
    "cvp/posterior.py",
    "regvar/core.py",
    "regvar/exact.py",
    "regvar/finetune.py",
    "regvar/hessian.py",
    "regvar/optim.py",
    "scalla/probes.py",
    "scalla/surrogate.py",
    "scalla/features.py",
]
FORBIDDEN_PACKAGES = ("sklearn", "skorch")
# skuq modules that hold estimators (the sklearn face) or their plumbing.
ESTIMATOR_MODULES = (
    "base",
    "_mixins",
    "_prior",
    "_skorch",
    "_persist",
    "baselines",
    "laplace",
    "regvar.base",
    "regvar.estimator",
    "scalla.estimator",
    "cvp.estimator",
    "cvp.sources",
    "cvp.ivon",
)


def _engine_files() -> list[Path]:
    files: list[Path] = []
    for entry in ENGINE_MODULES:
        path = SKUQ / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _imported_modules(path: Path, source: str) -> list[str]:
    """Absolute dotted names of every module ``source`` (at ``path``) imports."""
    package = ["skuq", *path.relative_to(SKUQ).parent.parts]
    names = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.append(module)
            # ``from . import x`` imports the module ``x`` itself
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _is_estimator_module(name: str) -> bool:
    inner = name.removeprefix("skuq.")
    return name.startswith("skuq.") and any(
        inner == m or inner.startswith(m + ".") for m in ESTIMATOR_MODULES
    )


def _violations(path: Path, source: str | None = None) -> list[str]:
    source = path.read_text() if source is None else source
    return [
        name
        for name in _imported_modules(path, source)
        if name.split(".")[0] in FORBIDDEN_PACKAGES or _is_estimator_module(name)
    ]


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(SKUQ)))
def test_engine_module_imports_no_sklearn_skorch_or_estimators(path):
    assert _violations(path) == [], f"{path.name} reaches above the engine layer"


def test_the_check_sees_a_violation():
    # the rule must be able to fail: sklearn, skorch and the base are caught, torch and
    # sibling engines are not, also inside a function
    probe = SKUQ / "curvature" / "probe.py"
    source = (
        "import torch\nfrom .weights import WeightSubset\nfrom sklearn.base import clone\n"
        "def f():\n    from ..base import BaseUQEstimator\n    import skorch\n"
    )
    assert _violations(probe, source) == [
        "sklearn.base",
        "sklearn.base.clone",
        "skuq.base",
        "skuq.base.BaseUQEstimator",
        "skorch",
    ]


# ------------------------------------------------------------------------ cycles
def _module_name(path: Path) -> str:
    parts = ["skuq", *path.relative_to(SKUQ).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """skuq module -> the skuq modules it imports (at any depth of its code)."""
    files = {_module_name(p): p for p in SKUQ.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in _imported_modules(path, path.read_text()):
            parts = imported.split(".")
            # the longest prefix that is a module: ``skuq.a.b.f`` names module ``skuq.a.b``
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in files:
                    break
            else:
                continue
            # a package importing its own submodules (re-exports) and a module importing its
            # parent package are the usual shape of a package, not a cycle between concerns
            if candidate != name and not (
                candidate.startswith(name + ".") or name.startswith(candidate + ".")
            ):
                targets.add(candidate)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    # also imports inside functions: a lazy import would only hide a cycle
    graph = _import_graph()
    graph.pop("skuq", None)  # the top-level package re-exports every method
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    graph = {"skuq.a": {"skuq.b"}, "skuq.b": {"skuq.c"}, "skuq.c": {"skuq.a"}, "skuq.d": set()}
    assert _cycles(graph) == [["skuq.a", "skuq.b", "skuq.c"]]
