"""Every skuq estimator side by side on offline tasks: the comparison table.

Estimators are discovered from the registry :func:`skuq.base.all_estimators`,
so a method exported from ``skuq`` gets its row with no change here. Each is
built with its DEFAULT options around the task's net, ``Cls(net,
random_state=seed, device=device)``.

Sharing the trained net
    Per task and seed the task's net is trained once (by ``MAPClassifier`` /
    ``MAPRegressor``) and every estimator gets it as
    ``FrozenEstimator(trained_net)``; its fit time then counts the net's
    training time plus its own post-hoc fit. Methods that must train their own
    net say so in ``METHOD_SETTINGS`` below.

The per-method settings (data, not code)
    ``METHOD_SETTINGS`` maps an estimator's name to a dict with the keys

    * ``"net_params"``: skorch ``set_params`` overrides for the task's net
      (e.g. ``{"module__dropout": 0.05}`` for MC dropout; the benchmark nets are
      ``skuq.nets.MLP`` / ``SmallCNN``, which take ``dropout``). Implies the
      method trains its own net.
    * ``"shared_net"``: ``False`` when the method cannot use a trained net
      (deep ensembles train their own members).
    * ``"init_params"``: extra constructor kwargs for this benchmark only
      (defaults are the product; RegVar sets its cheap `"amortized"` mode).
    * ``"variants"``: ``{label: settings}``, extra rows ``Cls[label]`` built with
      those settings (their own ``init_params`` / ``shared_net`` / ``net_params``),
      e.g. the Laplace structures a user would also try. The default row stays.

    An estimator without an entry runs at its defaults on the shared net.

Data: ``fit`` gets the training split; 20 % of it is held out as a validation
split that estimators with ``_uses_calibration_split`` receive as
``X_cal, y_cal`` (nothing is ever tuned on the test split). All methods
therefore train on the same rows. The OOD sets:

* digits: digits 5-9 (``skuq.datasets.load_digits_ood``);
* wine: "feature-shuffled" test rows -- every standardized feature column
  permuted independently across the test rows, so each marginal is
  in-distribution but the joint is not;
* breast cancer: "far-shifted" test rows -- the standardized test rows times 5,
  far out along the data's own directions, where ReLU nets grow overconfident;
* synthetic images: the blob images of ``skuq.datasets.make_synthetic_images``;
* gap regression: the test grid points outside the data's support (inside
  the gap or beyond [-2, 2]) against those inside, scored by predictive std.

Metrics come from :mod:`skuq.metrics` (ECE with 15 bins; coverage at 1 %
risk is 0 when no cut reaches it, as in ``skuq.metrics.get_scorer``). OOD scores
are each method's default ``predict_uncertainty`` (predictive entropy for
classifiers, predictive std for regressors). Times are wall clock (the CSV also
has ``fit_cpu_s``, the process CPU time, steadier on a shared machine). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over fit + predict; on the CPU the peak
resident set size above its level at the start, sampled every 2 ms from
``/proc/self/statm`` (tracemalloc does not see torch's CPU allocations; the
allocator may keep freed memory, so this is an approximate lower bound).

Usage::

    PYTHONPATH=. python benchmarks/compare.py              # full CPU run, 3 seeds
    PYTHONPATH=. python benchmarks/compare.py --quick      # smoke run, seconds
    PYTHONPATH=. python benchmarks/compare.py --device cuda  # larger sizes on a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Bunch

import skuq
from skuq import MAPClassifier, MAPRegressor
from skuq.base import all_estimators
from skuq.datasets import load_digits_ood, make_gap_regression, make_synthetic_images
from skuq.metrics import (
    aurc,
    brier_score,
    coverage_at_risk,
    expected_calibration_error,
    fpr_at_95_tpr,
    gaussian_negative_log_likelihood,
    negative_log_likelihood,
    ood_auroc,
)
from skuq.nets import MLP, SmallCNN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  (the benchmarks' shared helpers)
    RESULTS,
    PeakMemory,
    classifier_net,
    regressor_net,
    write_results,
    write_runs_csv,
)

BASELINE = {"classifier": "MAPClassifier", "regressor": "MAPRegressor"}


# ------------------------------------------------------------------- sizes
# profile -> task -> settings. "cpu" must finish within 20 min on 2 cores,
# "cuda" is the same run with larger nets and data, "quick" is a smoke test.
PROFILES = {
    "cpu": dict(
        digits=dict(hidden=(64, 64), epochs=50, lr=1e-3),
        wine=dict(hidden=(32, 32), epochs=100, lr=3e-3),
        breast_cancer=dict(hidden=(64, 64), epochs=50, lr=1e-3),
        images=dict(n=2000, size=16, channels=(8, 16), hidden=64, epochs=25, lr=2e-3),
        gap_regression=dict(hidden=(64, 64), epochs=300, lr=3e-3, n=300),
        diabetes=dict(hidden=(64, 64), epochs=100, lr=1e-3),
    ),
    "cuda": dict(
        digits=dict(hidden=(256, 256), epochs=100, lr=1e-3),
        wine=dict(hidden=(128, 128), epochs=200, lr=1e-3),
        breast_cancer=dict(hidden=(256, 256), epochs=100, lr=1e-3),
        images=dict(n=10000, size=28, channels=(32, 64), hidden=128, epochs=25, lr=1e-3),
        gap_regression=dict(hidden=(256, 256), epochs=600, lr=1e-3, n=1000),
        diabetes=dict(hidden=(256, 256), epochs=200, lr=5e-4),
    ),
    "quick": dict(
        digits=dict(hidden=(32,), epochs=5, lr=1e-2),
        gap_regression=dict(hidden=(32,), epochs=40, lr=1e-2, n=100),
    ),
}
NOISE_IMAGES = 1.0  # pixel noise of the synthetic images: a task that is not solved


# ------------------------------------------------------------------- tasks
def _split_val(X, y, seed, stratify):
    X_tr, X_val, y_tr, y_val = train_test_split(
        X, y, test_size=0.2, random_state=seed, stratify=y if stratify else None
    )
    return X_tr, y_tr, X_val, y_val


def _tabular(X, y, seed, cfg, ood):
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(X_tr)
    X_tr, X_te = (scaler.transform(a).astype(np.float32) for a in (X_tr, X_te))
    rng = np.random.RandomState(seed)
    if ood == "shuffled":
        X_ood = np.column_stack([rng.permutation(col) for col in X_te.T])
    else:  # far-shifted
        X_ood = 5.0 * X_te
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, True)
    return Bunch(
        kind="classifier",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=X_te,
        y_test=y_te,
        X_ood=X_ood.astype(np.float32),
        net=classifier_net(MLP, cfg, hidden=cfg["hidden"]),
    )


def task_digits(seed, cfg):
    d = load_digits_ood(random_state=seed)
    X_tr, y_tr, X_val, y_val = _split_val(d.X_train, d.y_train, seed, True)
    return Bunch(
        kind="classifier",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=d.X_test,
        y_test=d.y_test,
        X_ood=d.X_ood,
        net=classifier_net(MLP, cfg, hidden=cfg["hidden"]),
    )


def task_wine(seed, cfg):
    d = load_wine()
    return _tabular(d.data, d.target, seed, cfg, "shuffled")


def task_breast_cancer(seed, cfg):
    d = load_breast_cancer()
    return _tabular(d.data, d.target, seed, cfg, "far-shifted")


def task_images(seed, cfg):
    d = make_synthetic_images(
        n_samples=cfg["n"], size=cfg["size"], noise=NOISE_IMAGES, random_state=seed
    )
    X_tr, X_te, y_tr, y_te = train_test_split(
        d.X, d.y, test_size=0.25, random_state=seed, stratify=d.y
    )
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, True)
    net = classifier_net(SmallCNN, cfg, channels=cfg["channels"], hidden=cfg["hidden"])
    return Bunch(
        kind="classifier",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=X_te,
        y_test=y_te,
        X_ood=d.X_ood,
        net=net,
    )


def task_gap_regression(seed, cfg):
    d = make_gap_regression(n_samples=cfg["n"], random_state=seed)
    rng = np.random.RandomState(seed + 1000)
    y_test = (d.y_test + 0.1 * rng.randn(len(d.y_test))).astype(np.float32)  # same noise
    x = d.X_test[:, 0]
    inside = (np.abs(x) <= 2) & ~d.in_gap
    X_tr, y_tr, X_val, y_val = _split_val(d.X, d.y, seed, False)
    return Bunch(
        kind="regressor",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=d.X_test,
        y_test=y_test,
        ood_mask=~inside,
        net=regressor_net(MLP, cfg, hidden=cfg["hidden"]),
    )


def task_diabetes(seed, cfg):
    d = load_diabetes()
    X_tr, X_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.3, random_state=seed)
    xs = StandardScaler().fit(X_tr)
    mu, sd = y_tr.mean(), y_tr.std()
    X_tr, X_te = (xs.transform(a).astype(np.float32) for a in (X_tr, X_te))
    y_tr, y_te = (((a - mu) / sd).astype(np.float32) for a in (y_tr, y_te))
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, False)
    return Bunch(
        kind="regressor",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=X_te,
        y_test=y_te,
        ood_mask=None,
        net=regressor_net(MLP, cfg, hidden=cfg["hidden"]),
    )


TASKS = {
    "digits": (task_digits, "8x8 digits 0-4, MLP; OOD: digits 5-9"),
    "wine": (task_wine, "sklearn wine (standardized), MLP; OOD: feature-shuffled test rows"),
    "breast_cancer": (
        task_breast_cancer,
        "sklearn breast cancer (standardized), MLP; OOD: far-shifted (5 x) test rows",
    ),
    "images": (task_images, "synthetic stripe images, SmallCNN; OOD: blob images"),
    "gap_regression": (
        task_gap_regression,
        "1-D sin regression with a gap, MLP; OOD: grid points outside the data's support",
    ),
    "diabetes": (task_diabetes, "sklearn diabetes (standardized X and y), MLP; no OOD set"),
}


# ------------------------------------------------------------------ running
HINT_KEYS = {"net_params", "shared_net", "init_params"}

#: estimator name -> what the comparison does beyond ``Cls(net, random_state, device)``
#: (the keys are those of the module docstring); every other estimator runs at its
#: defaults on the shared net
METHOD_SETTINGS: dict[str, dict] = {
    # the IVON source trains its own net (an Adam-trained shared net has no IVON posterior)
    "CVPClassifier": {
        "variants": {
            "ivon": {"init_params": {"posterior": "ivon"}, "shared_net": False},
        }
    },
    # an ensemble trains its own members, it cannot share the one trained net
    "DeepEnsembleClassifier": {"shared_net": False},
    "DeepEnsembleRegressor": {"shared_net": False},
    # the structures a user would try next
    "LaplaceClassifier": {
        "variants": {
            "all,diag,marglik": {
                "init_params": {
                    "subset_of_weights": "all",
                    "hessian_structure": "diag",
                    "prior_precision": "marglik",
                }
            },
            "last_layer,kron,marglik": {
                "init_params": {
                    "subset_of_weights": "last_layer",
                    "hessian_structure": "kron",
                    "prior_precision": "marglik",
                }
            },
        }
    },
    "LaplaceRegressor": {
        "variants": {
            "all,diag": {"init_params": {"subset_of_weights": "all", "hessian_structure": "diag"}},
        }
    },
    # p = 0.05 had the lowest validation NLL on the digits split among
    # {0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5} (validation rows, never the test split)
    "MCDropoutClassifier": {"net_params": {"module__dropout": 0.05}},
    "MCDropoutRegressor": {"net_params": {"module__dropout": 0.05}},
    # the classification nets have too many weights for the exact mode's Hessian, so it
    # would fine-tune once per predicted row and class: the classifier rows are the
    # amortized score, and are labeled so in the docs
    "RegVarClassifier": {"init_params": {"mode": "amortized"}},
}


def _hints(cls, hints=None) -> dict:
    """The settings of ``cls`` (``METHOD_SETTINGS``, or ``hints`` where given), checked."""
    hints = dict(METHOD_SETTINGS.get(cls.__name__, {})) if hints is None else dict(hints)
    unknown = set(hints) - HINT_KEYS - {"variants"}
    if unknown:
        raise ValueError(f"{cls.__name__}: settings with unknown keys {sorted(unknown)}")
    for label, variant in hints.get("variants", {}).items():
        if set(variant) - HINT_KEYS:
            raise ValueError(
                f"{cls.__name__} variant {label!r} has unknown keys "
                f"{sorted(set(variant) - HINT_KEYS)}"
            )
    return hints


def method_rows(name, cls) -> list[tuple[str, type, dict]]:
    """``(row name, class, hints)``: the default row, then one per declared variant."""
    hints = _hints(cls)
    rows = [(name, cls, {k: v for k, v in hints.items() if k != "variants"})]
    rows += [
        (f"{name}[{label}]", cls, variant) for label, variant in hints.get("variants", {}).items()
    ]
    return rows


def _build(cls, data, frozen, seed, device, hints=None):
    """``(estimator, own_net)`` built with the class's defaults and its settings."""
    hints = _hints(cls, hints)
    net_params = hints.get("net_params", {})
    own = bool(net_params) or not hints.get("shared_net", True)
    net = clone(data.net).set_params(**net_params) if own else frozen
    params = {"random_state": seed, "device": str(device), **hints.get("init_params", {})}
    return cls(net, **params), own


def _fit(est, data):
    if getattr(est, "_uses_calibration_split", False):
        return est.fit(data.X_train, data.y_train, X_cal=data.X_val, y_cal=data.y_val)
    return est.fit(data.X_train, data.y_train)


def _evaluate_classifier(est, data):
    t = time.perf_counter()
    proba = est.predict_proba(data.X_test)
    predict_s = time.perf_counter() - t
    labels = est.classes_
    cov = coverage_at_risk(data.y_test, proba, risk=0.01, labels=labels)
    u_in = est.predict_uncertainty(data.X_test)
    u_out = est.predict_uncertainty(data.X_ood)
    row = dict(
        accuracy=float(np.mean(labels[proba.argmax(1)] == data.y_test)),
        nll=negative_log_likelihood(data.y_test, proba, labels=labels),
        ece=expected_calibration_error(data.y_test, proba, labels=labels),
        brier=brier_score(data.y_test, proba, labels=labels),
        aurc=aurc(data.y_test, proba, labels=labels),
        cov_at_1pct=0.0 if math.isnan(cov) else cov,
        ood_auroc=ood_auroc(u_in, u_out),
        fpr95=fpr_at_95_tpr(u_in, u_out),
        predict_s=predict_s,
    )
    return row, dict(proba=proba, labels=labels, u_in=u_in, u_out=u_out)


def _evaluate_regressor(est, data):
    t = time.perf_counter()
    mean, std = est.predict(data.X_test, return_std=True)
    predict_s = time.perf_counter() - t
    y = data.y_test
    row = dict(
        rmse=float(np.sqrt(np.mean((mean - y) ** 2))),
        nll=gaussian_negative_log_likelihood(y, mean, std),
        cov95=float(np.mean(np.abs(y - mean) <= 1.959964 * std)),
        ood_auroc=float("nan"),
        fpr95=float("nan"),
        predict_s=predict_s,
    )
    if data.ood_mask is not None:
        row["ood_auroc"] = ood_auroc(std[~data.ood_mask], std[data.ood_mask])
        row["fpr95"] = fpr_at_95_tpr(std[~data.ood_mask], std[data.ood_mask])
    return row, dict(mean=mean, std=std)


@dataclass
class Run:
    task: str
    method: str
    seed: int
    metrics: dict
    arrays: dict | None
    error: str = ""


def train_shared_net(task, data, seed, device, log):
    """The task's net trained once for a seed, as a ``FrozenEstimator`` every method shares.

    Returns the frozen net and the wall and CPU seconds its training took (added to the
    fit time of the methods that reuse it).
    """
    base_cls = MAPClassifier if data.kind == "classifier" else MAPRegressor
    t, c = time.perf_counter(), time.process_time()
    trained = base_cls(clone(data.net), random_state=seed, device=str(device))
    trained.fit(data.X_train, data.y_train)
    net_s, net_cpu = time.perf_counter() - t, time.process_time() - c
    log(f"  {task:15s} seed {seed} shared net trained in {net_s:.2f}s")
    return FrozenEstimator(trained.net_), net_s, net_cpu


def run_task(task, data, methods, seed, device, log):
    """All methods on one task and seed; the net is trained once and shared."""
    kind = data.kind
    frozen, net_s, net_cpu = train_shared_net(task, data, seed, device, log)
    evaluate = _evaluate_classifier if kind == "classifier" else _evaluate_regressor
    runs = []
    for method in methods:
        name, cls, hints = method if len(method) == 3 else (*method, None)
        try:
            est, own = _build(cls, data, frozen, seed, device, hints)
            with PeakMemory(device) as mem:
                t, c = time.perf_counter(), time.process_time()
                _fit(est, data)
                fit_s = time.perf_counter() - t + (0.0 if own else net_s)
                fit_cpu_s = time.process_time() - c + (0.0 if own else net_cpu)
                row, arrays = evaluate(est, data)
            row.update(fit_s=fit_s, fit_cpu_s=fit_cpu_s, peak_mb=mem.peak_mb, own_net=own)
            runs.append(Run(task, name, seed, row, arrays))
            log(
                f"  {task:15s} seed {seed} {name:30s} nll {row['nll']:.4f} "
                f"auroc {row['ood_auroc']:.3f} fit {fit_s:.1f}s"
            )
        except Exception as exc:  # one method's failure must not sink the table
            log(f"  {task:15s} seed {seed} {name:30s} FAILED: {exc!r}")
            traceback.print_exc(file=sys.stderr)
            runs.append(Run(task, name, seed, {}, None, error=f"{type(exc).__name__}: {exc}"))
    return runs


# ----------------------------------------------------------------- reporting
CLS_COLS = [
    ("accuracy", "acc", 3),
    ("nll", "NLL", 3),
    ("ece", "ECE", 3),
    ("brier", "Brier", 3),
    ("aurc", "AURC", 4),
    ("cov_at_1pct", "C@1%", 3),
    ("ood_auroc", "OOD AUROC", 3),
    ("fpr95", "FPR@95", 3),
    ("fit_s", "fit s", 1),
    ("predict_s", "pred s", 2),
    ("peak_mb", "peak MB", 0),
]
REG_COLS = [
    ("rmse", "RMSE", 3),
    ("nll", "NLL", 3),
    ("cov95", "cov 95%", 3),
    ("ood_auroc", "OOD AUROC", 3),
    ("fpr95", "FPR@95", 3),
    ("fit_s", "fit s", 1),
    ("predict_s", "pred s", 2),
    ("peak_mb", "peak MB", 0),
]
METRIC_KEYS = sorted({k for k, _, _ in CLS_COLS + REG_COLS} | {"fit_cpu_s"})


def aggregate(runs):
    """``{(task, method): {"n": seeds, "error": str, metric: (mean, std)}}``."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r.task, r.method)].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.error]
        agg = {"n": len(ok), "error": next((r.error for r in rs if r.error), "")}
        for k in METRIC_KEYS:
            vals = np.array([r.metrics[k] for r in ok if k in r.metrics], dtype=float)
            if len(vals) and not np.all(np.isnan(vals)):
                agg[k] = (float(np.nanmean(vals)), float(np.nanstd(vals)))
        out[key] = agg
    return out


def _beats(agg, task, method, kind, metric):
    base = agg.get((task, BASELINE[kind]), {})
    mine = agg.get((task, method), {})
    if method == BASELINE[kind] or metric not in base or metric not in mine:
        return "—"
    better = (
        mine[metric][0] < base[metric][0] if metric == "nll" else mine[metric][0] > base[metric][0]
    )
    return "yes" if better else "no"


def markdown(agg, task_kinds, methods_by_kind, header):
    lines = [header, ""]
    for task, kind in task_kinds.items():
        cols = CLS_COLS if kind == "classifier" else REG_COLS
        lines += [f"### {task}", "", f"{TASKS[task][1]}.", ""]
        head = ["method"] + [c[1] for c in cols] + ["NLL < MAP", "AUROC > MAP"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in methods_by_kind[kind]:
            a = agg.get((task, name))
            if a is None:
                continue
            if a["n"] == 0:
                lines.append(f"| {name} | failed: {a['error'][:120]} |" + " |" * (len(head) - 2))
                continue
            cells = [name]
            for key, _, digits in cols:
                if key in a:
                    m, s = a[key]
                    cells.append(f"{m:.{digits}f} ± {s:.{digits}f}")
                else:
                    cells.append("n/a")
            cells += [
                _beats(agg, task, name, kind, "nll"),
                _beats(agg, task, name, kind, "ood_auroc"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    # summary: does each method beat the bare net?
    lines += [
        "### Does the method at its defaults beat MAP? (NLL / OOD AUROC, mean over seeds)",
        "",
    ]
    for kind, names in methods_by_kind.items():
        tasks = [t for t, k in task_kinds.items() if k == kind]
        if not tasks or len(names) < 2:
            continue
        lines += ["| method | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for name in names:
            if name == BASELINE[kind]:
                continue
            cells = [
                f"{_beats(agg, t, name, kind, 'nll')} / {_beats(agg, t, name, kind, 'ood_auroc')}"
                for t in tasks
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(runs, task_kinds, out_dir, stem, seed):
    """Reliability diagrams, risk-coverage curves, uncertainty histograms (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skuq.plotting import reliability_diagram, risk_coverage_plot, uncertainty_histogram

    written = []
    for task, kind in task_kinds.items():
        rs = [r for r in runs if r.task == task and r.seed == seed and r.arrays]
        if not rs:
            continue
        n = len(rs)
        ncol = min(n, 4)
        nrow = -(-n // ncol)
        data = task_data[(task, seed)]
        if kind == "classifier":
            fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.6 * nrow), squeeze=False)
            for ax, r in zip(axes.flat, rs, strict=False):
                reliability_diagram(
                    data.y_test,
                    r.arrays["proba"],
                    labels=r.arrays["labels"],
                    ax=ax,
                    label=r.method.replace("Classifier", ""),
                )
                ax.legend(loc="upper left", fontsize=7)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            fig.suptitle(f"{task}: reliability diagrams")
            written.append(_save(fig, out_dir, f"{stem}_{task}_reliability.png"))

            fig, ax = plt.subplots(figsize=(5, 4))
            for r in rs:
                p, labels = r.arrays["proba"], r.arrays["labels"]
                errors = (labels[p.argmax(1)] != data.y_test).astype(float)
                risk_coverage_plot(
                    errors, p.max(1), ax=ax, label=r.method.replace("Classifier", "")
                )
            ax.legend(fontsize=7)
            ax.set_title(f"{task}: risk-coverage")
            written.append(_save(fig, out_dir, f"{stem}_{task}_risk_coverage.png"))
            scores = [(r, r.arrays["u_in"], r.arrays["u_out"], "predictive entropy") for r in rs]
        else:
            x = data.X_test[:, 0] if data.X_test.shape[1] == 1 else None
            if x is not None:
                fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
                for ax, r in zip(axes.flat, rs, strict=True):
                    m, s = r.arrays["mean"], r.arrays["std"]
                    ax.fill_between(x, m - 2 * s, m + 2 * s, alpha=0.3)
                    ax.plot(x, m, lw=1)
                    ax.scatter(data.X_train[:, 0], data.y_train, s=3, c="k")
                    ax.set_title(r.method.replace("Regressor", ""), fontsize=9)
                fig.suptitle(f"{task}: mean ± 2 std")
                written.append(_save(fig, out_dir, f"{stem}_{task}_bands.png"))
            if data.ood_mask is None:
                continue
            scores = [
                (
                    r,
                    r.arrays["std"][~data.ood_mask],
                    r.arrays["std"][data.ood_mask],
                    "predictive std",
                )
                for r in rs
            ]
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow), squeeze=False)
        for ax, (r, s_in, s_out, what) in zip(axes.flat, scores, strict=False):
            uncertainty_histogram(
                s_in,
                s_out,
                ax=ax,
                xlabel=what,
                label=r.method.replace("Classifier", "").replace("Regressor", ""),
            )
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{task}: uncertainty, in-distribution vs OOD")
        written.append(_save(fig, out_dir, f"{stem}_{task}_uncertainty_hist.png"))
    return written


def _save(fig, out_dir, name):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _warm_up(device):
    """One untimed tiny fit: the first skorch/torch fit in a process pays a few
    seconds of one-off set-up that would otherwise land on the first method."""
    rng = np.random.RandomState(0)
    X = rng.randn(32, 4).astype(np.float32)
    net = classifier_net(MLP, dict(lr=1e-2, epochs=2), hidden=(8,))
    MAPClassifier(net, random_state=0, device=str(device)).fit(X, (X[:, 0] > 0).astype(int))


def _own_net_note(methods_by_kind) -> str:
    notes = []
    for ms in methods_by_kind.values():
        for name, _cls, hints in ms:
            if hints.get("net_params"):
                notes.append(f"{name} trains its own net with {hints['net_params']}")
            elif not hints.get("shared_net", True):
                notes.append(f"{name} trains its own net(s)")
            if hints.get("init_params") and "[" not in name:  # a variant's label says it
                notes.append(f"{name} is built with {hints['init_params']}")
    return "; ".join(notes) or "none"


task_data: dict = {}  # (task, seed) -> data, kept for the plots


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny tasks, few epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (larger sizes on cuda)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    parser.add_argument(
        "--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS)
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated estimator names (MAP always runs)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these small nets on a shared machine)",
    )
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    profile = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    sizes = PROFILES[profile]
    tasks = list(sizes) if args.tasks is None else args.tasks.split(",")
    for t in tasks:
        if t not in sizes:
            parser.error(f"unknown task {t!r} for profile {profile}; choose from {list(sizes)}")
    n_seeds = args.seeds or (1 if args.quick else 3)
    seeds = list(range(n_seeds))
    wanted = None if args.methods is None else set(args.methods.split(","))
    methods_by_kind = {}
    for kind in ("classifier", "regressor"):
        found = [
            row
            for n, c in all_estimators(kind)
            for row in method_rows(n, c)
            if wanted is None or n in wanted or row[0] in wanted or n == BASELINE[kind]
        ]
        found.sort(key=lambda row: (row[0] != BASELINE[kind], row[0]))  # MAP first
        methods_by_kind[kind] = found
    if wanted:
        missing = (
            wanted
            - {n for ms in methods_by_kind.values() for n, *_ in ms}
            - {c.__name__ for ms in methods_by_kind.values() for _, c, _ in ms}
        )
        if missing:
            parser.error(f"no skuq estimator named {sorted(missing)}")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = {"quick": "compare_quick", "cuda": "compare_cuda", "cpu": "compare"}[profile]

    log = print
    _warm_up(device)
    start = time.perf_counter()
    runs, task_kinds = [], {}
    for task in tasks:
        for seed in seeds:
            data = TASKS[task][0](seed, sizes[task])
            task_data[(task, seed)] = data
            task_kinds[task] = data.kind
            runs += run_task(task, data, methods_by_kind[data.kind], seed, device, log)
    total = time.perf_counter() - start

    agg = aggregate(runs)
    names = {k: [n for n, *_ in ms] for k, ms in methods_by_kind.items()}
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch threads {args.threads})"
    )
    header = (
        f"## skuq comparison ({profile} profile)\n\n"
        f"`{' '.join(['PYTHONPATH=. python benchmarks/compare.py', *(argv or sys.argv[1:])])}`\n\n"
        f"skuq {skuq.__version__}, torch {torch.__version__}, device: {dev}; "
        f"{n_seeds} seed(s), mean ± std over seeds; total wall time {total / 60:.1f} min.\n"
        "Every estimator at its default options; the net is trained once per task and seed "
        "and shared (fit s includes that training), except: "
        + _own_net_note(methods_by_kind)
        + ". Peak MB: "
        + (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak RSS increase, sampled (approximate lower bound)"
        )
        + ". Times: wall clock (CPU time in the CSV). OOD scores: default "
        "predict_uncertainty (entropy / predictive std). "
        "NLL < MAP and AUROC > MAP compare means over seeds."
    )
    md = markdown(agg, task_kinds, names, header)
    write_results(args.out_dir, stem, md + "\n")
    write_runs_csv(os.path.join(args.out_dir, f"{stem}.csv"), runs, ["own_net", *METRIC_KEYS])
    pngs = [] if args.no_plots else plots(runs, task_kinds, args.out_dir, stem, seeds[0])
    print(md)
    return {"runs": runs, "aggregate": agg, "markdown": md, "pngs": pngs, "seconds": total}


if __name__ == "__main__":
    main()
