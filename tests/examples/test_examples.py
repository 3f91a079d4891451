"""The examples run and give the numbers they promise (quick mode, a few epochs)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_quick_mode_shows_the_defaults_beating_the_bare_net_under_shift(
    tmp_path, capsys
):
    quickstart = _load("quickstart")
    out = tmp_path / "quickstart.png"
    rows = quickstart.main(quick=True, out=str(out))
    printed = capsys.readouterr().out

    assert set(rows) == {"bare net (MAP)", "LaplaceClassifier", "L2MClassifier", "ScaLLAClassifier"}
    for name, r in rows.items():
        assert r["accuracy"] > 0.9, name  # digits 0-4 held out: easy for an MLP
        assert math.isfinite(r["NLL"]) and 0 < r["NLL"] < 0.5, name
        assert r["shifted NLL"] > r["NLL"], name  # corrupted digits are harder
        assert r["OOD AUROC"] > 0.7, name  # digits 5-9 look less certain than 0-4
        assert len(r["NLL by severity"]) == 6
        # the printed table is the returned numbers
        line = next(row for row in printed.splitlines() if row.startswith(name))
        assert f"{r['accuracy']:.3f}" in line and f"{r['shifted NLL']:.3f}" in line

    # what the demo shows: the default Laplace posterior keeps the bare net's fit on clean
    # digits and is less overconfident on corrupted ones
    bare, laplace = rows["bare net (MAP)"], rows["LaplaceClassifier"]
    assert laplace["NLL"] <= 1.1 * bare["NLL"] + 0.01
    assert laplace["shifted NLL"] < bare["shifted NLL"]
    if "matplotlib not installed" not in printed:
        assert out.stat().st_size > 0


@pytest.mark.slow
def test_ood_digits_separates_digits_5_to_9(tmp_path):
    ood = _load("ood_digits")
    out = tmp_path / "ood.png"
    results = ood.main(quick=True, out=str(out))

    assert set(results) == {"MAP", "Laplace (all weights)", "Deep ensemble"}
    for name, r in results.items():
        assert r["accuracy"] > 0.9, name
        assert r["OOD AUROC"] > 0.8, name  # digits 5-9 look less certain than 0-4
        assert 0 <= r["FPR@95"] <= 1, name
        assert r["u_in"].ndim == r["u_out"].ndim == 1 and len(r["u_in"]) > 200, name
    assert results["Deep ensemble"]["score"] == "mutual_information"
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_grid_search_prior_finds_a_prior_better_than_the_bare_net(tmp_path):
    gs = _load("grid_search_prior")
    out = tmp_path / "grid.png"
    r = gs.main(quick=True, out=str(out))

    grid = list(r["grid"])
    assert r["best_prior_precision"] in grid and r["best_prior_precision_frozen"] in grid
    for curve in r["cv_NLL"].values():
        assert curve.shape == (len(grid),) and np.isfinite(curve).all()
    # breast cancer: the bare net is overconfident, the searched posterior is not
    assert r["cv_NLL_best"] < r["cv_NLL_MAP"]
    assert r["test_NLL_best"] < r["test_NLL_MAP"]
    assert r["marglik_prior_precision"] > 0
    # CV on the rows a frozen net trained on rewards no posterior: a larger prior
    assert r["best_prior_precision_frozen"] >= r["best_prior_precision"]
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_regression_bands_grow_in_the_gap(tmp_path):
    rb = _load("regression_bands")
    out = tmp_path / "bands.png"
    results = rb.main(quick=True, out=str(out))

    bare = results.pop("MAP (noise only)")
    assert bare["std in gap"] == pytest.approx(bare["std on data"])  # noise only: flat
    for name, r in results.items():
        assert r["std in gap"] > r["std on data"], name
        assert r["std beyond data"] > r["std on data"], name
        assert r["RMSE on data"] < 0.5, name
        assert r["mean"].shape == r["std"].shape == (301,), name
    kfac = results["Laplace, all weights (K-FAC)"]
    assert kfac["std in gap"] > 2 * kfac["std on data"]
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_selective_prediction_reports_risk_coverage(tmp_path):
    sp = _load("selective_prediction")
    out = tmp_path / "rc.png"
    results = sp.main(quick=True, out=str(out))

    assert set(results) == {"MAP", "temperature scaling", "Laplace (last layer)", "deep ensemble"}
    for name, r in results.items():
        assert r["accuracy"] > 0.8, name
        assert 0 <= r["AURC"] < 1 - r["accuracy"], name  # abstaining lowers the risk
        assert 0 <= r["C@1%"] <= 1, name
        assert r["proba"].shape[1] == 10, name
    # the temperature is fitted on validation rows: it lowers the test NLL
    assert results["temperature scaling"]["NLL"] < results["MAP"]["NLL"]
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_cvp_vs_mc_one_pass_beats_one_sample(tmp_path):
    cvp = _load("cvp_vs_mc")
    out = tmp_path / "cvp.png"
    r = cvp.main(quick=True, out=str(out))

    rows = r["rows"]
    assert {"VP (uncalibrated)", "CVP", "MC-1", "MC-30"} <= set(rows)
    for name, row in rows.items():
        assert row["seconds"] > 0 and np.isfinite(row["NLL"]), name
        assert 0 <= row["TV"] < 0.2, name
    assert rows["MC-30"]["TV"] < rows["MC-1"]["TV"]  # more samples: closer to the reference
    assert rows["VP (uncalibrated)"]["TV"] < rows["MC-1"]["TV"]
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_pretrained_model_routes_never_touch_the_weights(tmp_path):
    pm = _load("pretrained_model")
    out = tmp_path / "pretrained.png"
    results = pm.main(quick=True, out=str(out))

    assert results["weights unchanged"] is True
    assert set(results["nn.Module"]) == {"MAP", "Laplace", "L2M"}
    assert set(results["FrozenEstimator"]) == {"MAP", "temperature", "Laplace"}
    for route in ("nn.Module", "FrozenEstimator"):
        for name, r in results[route].items():
            assert 0 < r["NLL"] < 1.0, (route, name)
            assert r["OOD AUROC"] > 0.75, (route, name)
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_gpu_example_resolves_the_device(tmp_path):
    gpu = _load("gpu")
    out = tmp_path / "gpu.png"
    results = gpu.main(quick=True, out=str(out))

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert len(results) == 3
    for name, r in results.items():
        assert r["device"].startswith(expected), name
        assert r["fit_s"] > 0 and r["predict_s"] > 0, name
        assert r["accuracy"] > 0.3, name  # 10 classes: chance is 0.1
        assert np.isfinite(r["NLL"]), name
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_conformal_example_covers_and_widens_in_the_gap(tmp_path):
    pytest.importorskip("mapie")
    ex = _load("conformal")
    out = tmp_path / "conformal.png"
    r = ex.main(quick=True, out=str(out))
    assert set(r) == {"absolute", "posterior"}
    for score, res in r.items():
        # 150 test rows at a 0.9 target: the binomial 99 % band is about +-0.065, and
        # calibration on 150 rows adds a spread of its own
        assert 0.8 <= res["coverage"] <= 1.0, score
        assert res["width"] > 0, score
    # the absolute score has one width; the posterior one widens where there is no data
    assert r["absolute"]["width in gap"] == pytest.approx(r["absolute"]["width"], rel=1e-6)
    assert r["posterior"]["width in gap"] > r["posterior"]["width"]
    assert out.stat().st_size > 0
