"""The examples run and give the numbers they promise (quick mode, a few epochs)."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_quick_mode_trains_calibrates_and_reports(tmp_path, capsys):
    quickstart = _load("quickstart")
    out = tmp_path / "reliability.png"
    rows = quickstart.main(quick=True, out=str(out))
    printed = capsys.readouterr().out

    assert set(rows) == {"MAPClassifier", *(c.__name__ for c in quickstart.UQ_ESTIMATORS)}
    for name, r in rows.items():
        assert r["accuracy"] > 0.9, name  # digits 0-4 held out: easy for an MLP
        assert math.isfinite(r["NLL"]) and 0 < r["NLL"] < 0.5, name
        assert 0 <= r["ECE"] < (0.4 if name == "L2MClassifier" else 0.15), name
        assert r["OOD AUROC"] > 0.7, name  # digits 5-9 look less certain than 0-4
        assert r["proba"].shape[1] == 5
        # the printed table is the returned numbers
        line = next(row for row in printed.splitlines() if row.startswith(name))
        assert f"{r['accuracy']:.3f}" in line and f"{r['NLL']:.3f}" in line

    # what the demo shows: the free L2M posterior tells digits 5-9 apart better than the bare
    # net (its price, under-confidence in distribution, is the ECE column)
    assert rows["L2MClassifier"]["OOD AUROC"] > rows["MAPClassifier"]["OOD AUROC"]

    if "matplotlib not installed" not in printed:
        assert out.stat().st_size > 0
