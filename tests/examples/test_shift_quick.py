"""benchmarks/shift.py: corruptions, target checks, and an end-to-end --quick run."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_shift():
    spec = importlib.util.spec_from_file_location(
        "skuq_bench_shift", os.path.join(ROOT, "benchmarks", "shift.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shift = _load_shift()


def _images(n=40, size=8, seed=0):
    rng = np.random.RandomState(seed)
    X = np.zeros((n, 1, size, size))
    X[:, :, 2:6, 3:5] = 1.0  # a bar on a zero background
    return X + 0.05 * rng.rand(n, 1, size, size)


@pytest.mark.parametrize("name", shift.IMAGE_CORRUPTIONS)
def test_image_corruptions_keep_shape_and_grow_with_severity(name):
    X = _images()
    change = []
    for sev in shift.SEVERITIES:
        Xc = shift.corrupt_images(X, name, sev, np.random.RandomState(sev), pixel_std=0.4)
        assert Xc.shape == X.shape and np.all(np.isfinite(Xc))
        change.append(np.abs(Xc - X).mean())
    assert change[0] > 0
    assert change[-1] > 1.5 * change[0]
    # the same stream gives the same corruption
    a = shift.corrupt_images(X, name, 3, np.random.RandomState(7), pixel_std=0.4)
    b = shift.corrupt_images(X, name, 3, np.random.RandomState(7), pixel_std=0.4)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", shift.SIGNAL_CORRUPTIONS)
def test_signal_corruptions_keep_shape_and_grow_with_severity(name):
    t = np.linspace(0, 4 * np.pi, 40)
    X = np.stack([np.sin(t + p) for p in np.linspace(0, 1, 30)])[:, None]
    change = [
        np.abs(
            shift.corrupt_signals(X, name, s, np.random.RandomState(s), signal_std=1.0) - X
        ).mean()
        for s in shift.SEVERITIES
    ]
    assert change[0] > 0 and change[-1] > 1.5 * change[0]


@pytest.mark.parametrize("name", shift.TABULAR_CORRUPTIONS)
def test_tabular_corruptions_keep_shape_and_grow_with_severity(name):
    X = np.random.RandomState(0).randn(200, 6)
    change = [
        np.abs(shift.corrupt_tabular(X, name, s, np.random.RandomState(0)) - X).mean()
        for s in shift.SEVERITIES
    ]
    assert change[0] > 0 and change[-1] > 1.5 * change[0]


def test_contrast_and_occlusion_do_what_they_say():
    X = _images()
    c = shift.corrupt_images(X, "contrast", 5, np.random.RandomState(0), pixel_std=0.4)
    np.testing.assert_allclose(c.std(axis=(1, 2, 3)), 0.1 * X.std(axis=(1, 2, 3)), rtol=1e-10)
    o = shift.corrupt_images(X, "occlude", 5, np.random.RandomState(0), pixel_std=0.4)
    side = int(round(0.65 * 8))
    assert np.all((o == 0).sum(axis=(1, 2, 3)) >= side * side)


def test_targets_are_checked_as_stated():
    base = {"accuracy": (0.90, 0), "nll": (0.30, 0), "shift_nll": (1.00, 0), "ood_auroc": (0.80, 0)}
    good = {
        "accuracy": (0.897, 0),
        "nll": (0.32, 0),
        "shift_nll": (0.95, 0),
        "ood_auroc": (0.795, 0),
    }
    bad = {"accuracy": (0.89, 0), "nll": (0.34, 0), "shift_nll": (1.01, 0), "ood_auroc": (0.785, 0)}
    agg = {
        ("wine", "MAPClassifier"): base,
        ("wine", "L2MClassifier"): good,
        ("wine", "CVPClassifier"): bad,
        ("images", "MAPClassifier"): base,
        ("images", "LaplaceClassifier"): good,
    }
    assert shift.target_checks(agg, "wine", "L2MClassifier") == {
        "acc": True,
        "NLL": True,
        "shift NLL": True,
        "AUROC": True,
    }
    assert shift.target_checks(agg, "wine", "CVPClassifier") == {
        "acc": False,
        "NLL": False,
        "shift NLL": False,
        "AUROC": False,
    }
    # Laplace on an image task: 10 % below MAP's shifted NLL and AUROC at least MAP's
    checks = shift.target_checks(agg, "images", "LaplaceClassifier")
    assert checks["shift NLL"] and not checks["shift NLL -10%"] and not checks["AUROC"]


def test_shift_quick_runs_and_writes_table_csvs_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("mnist1d")
    out = shift.main(
        [
            "--quick",
            "--methods",
            "LaplaceClassifier,TemperatureScalingClassifier,MAPRegressor",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert not [r.error for r in out["runs"] if r.error]
    md = (tmp_path / "shift_quick.md").read_text()
    for name in (
        "MAPClassifier",
        "LaplaceClassifier",
        "TemperatureScalingClassifier",
        "MAPRegressor",
    ):
        assert f"| {name} |" in md
    assert "| LaplaceClassifier | " in md.split("### Targets")[1]
    with open(tmp_path / "shift_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == set(shift.PROFILES["quick"])
    for r in rows:
        if r["task"] not in ("gap_regression", "friedman_regression"):
            assert 0 < float(r["accuracy"]) <= 1 and 0 <= float(r["ood_auroc"]) <= 1
            assert float(r["shift_nll"]) > 0
        else:
            assert 0 <= float(r["cov95"]) <= 1
    with open(tmp_path / "shift_quick_by_corruption.csv") as f:
        sets = list(csv.DictReader(f))
    wine = {
        (r["corruption"], r["severity"])
        for r in sets
        if r["task"] == "wine" and r["method"] == "MAPClassifier"
    }
    assert len(wine) == 1 + len(shift.TABULAR_CORRUPTIONS) * len(shift.SEVERITIES)
    assert os.path.getsize(out["png"]) > 1000
    # the table re-renders from the CSV alone
    again = shift.main(
        [
            "--from-csv",
            str(tmp_path / "shift_quick.csv"),
            "--out-dir",
            str(tmp_path / "again"),
            "--no-plots",
        ]
    )
    tables = [m.split("### digits_mlp")[1].strip() for m in (again["markdown"], md)]
    assert tables[0] == tables[1]
