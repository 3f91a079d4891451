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
    "posterior.py",
    "predictive.py",
    "curvature",
    "cvp/engine.py",
    "cvp/rules.py",
    "cvp/moments.py",
    "cvp/calibration.py",
]
FORBIDDEN_PACKAGES = ("sklearn", "skorch")
# skuq modules that hold estimators (the sklearn face) or their plumbing.
ESTIMATOR_MODULES = (
    "base",
    "baselines",
    "ensembles",
    "laplace",
    "l2m",
    "regvar",
    "scalla",
    "subnetwork",
    "cvp.estimator",
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
