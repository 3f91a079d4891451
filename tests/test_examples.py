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

    assert set(rows) == {"MAPClassifier", quickstart.UQ_ESTIMATOR.__name__}
    for name, r in rows.items():
        assert r["accuracy"] > 0.9, name  # digits 0-4 held out: easy for an MLP
        assert math.isfinite(r["NLL"]) and 0 < r["NLL"] < 0.5, name
        assert 0 <= r["ECE"] < 0.15, name
        assert r["OOD AUROC"] > 0.7, name  # digits 5-9 look less certain than 0-4
        assert r["proba"].shape[1] == 5
        # the printed table is the returned numbers
        line = next(row for row in printed.splitlines() if row.startswith(name))
        assert f"{r['accuracy']:.3f}" in line and f"{r['NLL']:.3f}" in line

    if "matplotlib not installed" not in printed:
        assert out.stat().st_size > 0
