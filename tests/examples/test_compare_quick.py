"""benchmarks/compare.py runs end to end in --quick mode (MAP and one other method)."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_compare():
    spec = importlib.util.spec_from_file_location(
        "skuq_bench_compare", os.path.join(ROOT, "benchmarks", "compare.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compare_quick_runs_and_writes_table_csv_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    compare = _load_compare()
    out = compare.main(
        [
            "--quick",
            "--methods",
            "MAPClassifier,TemperatureScalingClassifier,MAPRegressor",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert not [r.error for r in out["runs"] if r.error]
    md = (tmp_path / "compare_quick.md").read_text()
    for name in ("MAPClassifier", "TemperatureScalingClassifier", "MAPRegressor"):
        assert f"| {name} |" in md
    assert (
        "| TemperatureScalingClassifier | yes / " in md
        or "| TemperatureScalingClassifier | no / " in md
    )
    with open(tmp_path / "compare_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"digits", "gap_regression"}
    digits = {r["method"]: r for r in rows if r["task"] == "digits"}
    assert 0.5 < float(digits["MAPClassifier"]["accuracy"]) <= 1
    assert 0 <= float(digits["TemperatureScalingClassifier"]["ood_auroc"]) <= 1
    for png in out["pngs"]:
        assert os.path.getsize(png) > 1000
    assert any(p.endswith("digits_uncertainty_hist.png") for p in out["pngs"])


def test_compare_hints_and_bad_method_name(tmp_path):
    compare = _load_compare()

    class Bad:
        pass

    with pytest.raises(ValueError, match="unknown keys"):
        compare._hints(Bad, {"net_parms": {}})
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--methods", "NoSuchClassifier", "--out-dir", str(tmp_path)])


def test_a_failing_method_becomes_a_failed_row_not_a_crash():
    from skuq import MAPClassifier

    compare = _load_compare()

    class BrokenClassifier(MAPClassifier):
        def _fit_uq(self, X, y, X_cal=None, y_cal=None):
            raise RuntimeError("boom")

    data = compare.task_digits(0, compare.PROFILES["quick"]["digits"])
    methods = [("MAPClassifier", MAPClassifier), ("BrokenClassifier", BrokenClassifier)]
    runs = compare.run_task(
        "digits", data, methods, 0, compare.torch.device("cpu"), lambda *a: None
    )
    assert [r.error for r in runs] == ["", "RuntimeError: boom"]
    md = compare.markdown(
        compare.aggregate(runs),
        {"digits": "classifier"},
        {"classifier": ["MAPClassifier", "BrokenClassifier"]},
        "",
    )
    assert "| BrokenClassifier | failed: RuntimeError: boom |" in md


def test_every_registered_method_and_variant_runs_in_the_quick_table(tmp_path):
    """No estimator of the registry may fail at its defaults on the quick tasks."""
    compare = _load_compare()
    out = compare.main(["--quick", "--no-plots", "--out-dir", str(tmp_path)])
    failed = {r.method: r.error for r in out["runs"] if r.error}
    assert not failed
    from skuq.base import all_estimators

    methods = {r.method for r in out["runs"]}
    assert {n for n, _ in all_estimators()} <= methods
    assert "LaplaceClassifier[all,diag,marglik]" in methods
    assert "CVPClassifier[ivon]" in methods


def test_variant_hints_are_checked():
    compare = _load_compare()

    class Bad:
        pass

    with pytest.raises(ValueError, match="variant 'x' has unknown keys"):
        compare._hints(Bad, {"variants": {"x": {"init_parms": {}}}})


def test_method_settings_name_registered_estimators_with_known_keys():
    """A renamed estimator must not silently lose its benchmark settings."""
    from skuq.base import all_estimators

    compare = _load_compare()
    registered = {name: cls for name, cls in all_estimators()}
    assert set(compare.METHOD_SETTINGS) <= set(registered)
    for name, settings in compare.METHOD_SETTINGS.items():
        assert compare._hints(registered[name]) == settings
