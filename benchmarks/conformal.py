"""Conformal sets on top of the posterior against MAPIE's own scores.

Per task and seed, one net is trained on the task's training split (the
comparison benchmark's tasks and nets, ``benchmarks/compare.py``) with the
default Laplace posterior around it. The remaining rows of the training
distribution (the validation and test splits) are the pool: split conformal
calibrates on a random half of it and is scored on the other half, ``--splits``
times per seed. Cross conformal (CV+, MAPIE's ``CrossConformal*``, 5 folds)
fits 5 clones on the training split and is scored on the whole pool (on the
small tasks only: diabetes, gap regression, wine).

Scores (``skuq.conformal``; target coverage 0.9):

* regression: ``absolute`` (MAPIE: ``|y - mean|``, one width everywhere) and
  ``posterior`` (``|y - mean| / std`` with the Laplace predictive std, MAPIE's
  ``std_normalized``); the bare Laplace band ``mean +- 1.645 std`` (no
  conformal step) for reference;
* classification: ``lac`` on the bare net's softmax (MAP), ``lac`` and ``aps``
  on the Laplace predictive, and ``posterior`` (the posterior margin).

Gap regression: calibrated on rows of the training distribution, then also
scored on the grid points outside the data's support (in the gap or beyond
[-2, 2]): a covariate shift, where no conformal guarantee holds.

Usage::

    PYTHONPATH=. python benchmarks/conformal.py                 # compare.py's CPU nets
    PYTHONPATH=. python benchmarks/conformal.py --small --seeds 2  # results/conformal.md
    PYTHONPATH=. python benchmarks/conformal.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.frozen import FrozenEstimator
from sklearn.utils import Bunch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the comparison benchmark's tasks and nets)
from _common import RESULTS, regressor_net, write_results  # noqa: E402

from skuq import LaplaceClassifier, LaplaceRegressor, MAPClassifier  # noqa: E402
from skuq.conformal import cross_conformal, split_conformal  # noqa: E402
from skuq.datasets import make_gap_regression  # noqa: E402
from skuq.nets import MLP  # noqa: E402

LEVEL = 0.9
Z90 = 1.6448536269514722  # the two-sided 90 % normal quantile

#: cross conformal trains 5 nets per score: on the small tasks only
CROSS_TASKS = ("diabetes", "gap_regression", "wine")
TASKS = {
    "diabetes": ("regressor", compare.task_diabetes),
    "gap_regression": ("regressor", None),
    "digits": ("classifier", compare.task_digits),
    "wine": ("classifier", compare.task_wine),
    "breast_cancer": ("classifier", compare.task_breast_cancer),
}


def task_gap(seed, cfg):
    """Gap regression with a larger in-distribution pool than compare's (for calibration)."""
    d = make_gap_regression(n_samples=2 * cfg["n"], random_state=seed)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(d.X))
    tr, pool = order[: cfg["n"]], order[cfg["n"] :]
    x = d.X_test[:, 0]
    shifted = ~((np.abs(x) <= 2) & ~d.in_gap)
    noise = 0.1 * np.random.RandomState(seed + 1000).randn(len(x))
    return Bunch(
        X_train=d.X[tr],
        y_train=d.y[tr],
        X_pool=d.X[pool],
        y_pool=d.y[pool],
        X_shift=d.X_test[shifted],
        y_shift=(d.y_test[shifted] + noise[shifted]).astype(np.float32),
        net=regressor_net(MLP, cfg, hidden=cfg["hidden"]),
    )


def load_task(name, seed, cfg):
    if name == "gap_regression":
        return task_gap(seed, cfg)
    d = TASKS[name][1](seed, cfg)
    return Bunch(
        X_train=d.X_train,
        y_train=d.y_train,
        X_pool=np.concatenate([d.X_val, d.X_test]),
        y_pool=np.concatenate([d.y_val, d.y_test]),
        net=d.net,
    )


def _interval_stats(bounds, y):
    lo, hi = bounds[:, 0, 0], bounds[:, 1, 0]
    return float(np.mean((y >= lo) & (y <= hi))), float(np.mean(hi - lo))


def _set_stats(sets, y, classes):
    sets = sets[:, :, 0]
    idx = np.searchsorted(classes, y)
    return float(np.mean(sets[np.arange(len(y)), idx])), float(np.mean(sets.sum(axis=1)))


def run_regression(name, d, seed, n_splits, cross, rows):
    est = LaplaceRegressor(d.net, random_state=seed).fit(d.X_train, d.y_train)
    rng = np.random.RandomState(seed)
    n = len(d.X_pool)
    for _ in range(n_splits):
        perm = rng.permutation(n)
        cal, test = perm[: n // 2], perm[n // 2 :]
        mean, std = est.predict(d.X_pool[test], return_std=True)
        y = d.y_pool[test]
        rows.append(
            dict(
                task=name,
                seed=seed,
                mode="none",
                score="Laplace band",
                coverage=float(np.mean(np.abs(y - mean) <= Z90 * std)),
                size=float(np.mean(2 * Z90 * std)),
            )
        )
        for score in ("absolute", "posterior"):
            cp = split_conformal(
                est, d.X_pool[cal], d.y_pool[cal], confidence_level=LEVEL, score=score
            )
            cov, width = _interval_stats(cp.predict_interval(d.X_pool[test])[1], y)
            row = dict(task=name, seed=seed, mode="split", score=score, coverage=cov, size=width)
            if "X_shift" in d:
                row["shift_coverage"], row["shift_size"] = _interval_stats(
                    cp.predict_interval(d.X_shift)[1], d.y_shift
                )
            rows.append(row)
    if cross:
        base = LaplaceRegressor(d.net, random_state=seed)
        for score in ("absolute", "posterior"):
            cp = cross_conformal(
                base,
                d.X_train,
                d.y_train,
                confidence_level=LEVEL,
                score=score,
                cv=5,
                random_state=seed,
            )
            cov, width = _interval_stats(cp.predict_interval(d.X_pool)[1], d.y_pool)
            rows.append(
                dict(task=name, seed=seed, mode="cross", score=score, coverage=cov, size=width)
            )


def run_classification(name, d, seed, n_splits, cross, rows):
    est = LaplaceClassifier(d.net, random_state=seed).fit(d.X_train, d.y_train)
    bare = MAPClassifier(FrozenEstimator(est.net_), random_state=seed).fit(d.X_train, d.y_train)
    rng = np.random.RandomState(seed)
    n = len(d.X_pool)
    variants = [
        ("lac (MAP)", bare, "lac"),
        ("lac", est, "lac"),
        ("aps", est, "aps"),
        ("posterior", est, "posterior"),
    ]
    if len(est.classes_) == 2:  # MAPIE takes only lac for two classes
        variants = [v for v in variants if v[2] != "aps"]
    for _ in range(n_splits):
        perm = rng.permutation(n)
        cal, test = perm[: n // 2], perm[n // 2 :]
        for label, model, score in variants:
            cp = split_conformal(
                model, d.X_pool[cal], d.y_pool[cal], confidence_level=LEVEL, score=score
            )
            cov, size = _set_stats(cp.predict_set(d.X_pool[test])[1], d.y_pool[test], est.classes_)
            rows.append(
                dict(task=name, seed=seed, mode="split", score=label, coverage=cov, size=size)
            )
    if cross:
        for label, score in (("lac", "lac"), ("posterior", "posterior")):
            base = LaplaceClassifier(d.net, random_state=seed)
            cp = cross_conformal(
                base,
                d.X_train,
                d.y_train,
                confidence_level=LEVEL,
                score=score,
                cv=5,
                random_state=seed,
            )
            cov, size = _set_stats(cp.predict_set(d.X_pool)[1], d.y_pool, est.classes_)
            rows.append(
                dict(task=name, seed=seed, mode="cross", score=label, coverage=cov, size=size)
            )


def summarize(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["mode"], r["score"]), []).append(r)
    out = []
    for (task, mode, score), rs in groups.items():
        entry = dict(task=task, mode=mode, score=score, n=len(rs))
        for key in ("coverage", "size", "shift_coverage", "shift_size"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                entry[key] = float(np.mean(vals))
                entry[key + "_sd"] = float(np.std(vals))
        out.append(entry)
    return out


def markdown(summary, command, seconds):
    lines = [
        "# Conformal sets on top of the posterior",
        "",
        f"Target coverage {LEVEL}. Produced by `{command}` in {seconds:.0f} s. Mean "
        "(sd) over seeds x random calibration/test halves of the pool (split) or over "
        "seeds (cross, 5 folds). Width: mean interval length (standardized targets); "
        "size: mean number of classes in a set. See the docstring of "
        "`benchmarks/conformal.py` for the protocol.",
        "",
        "| task | conformal | score | coverage | width / set size | shifted rows: "
        "coverage | shifted rows: width |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        shift = (
            "| {:.3f} | {:.3f} |".format(e["shift_coverage"], e["shift_size"])
            if "shift_coverage" in e
            else "| | |"
        )
        lines.append(
            f"| {e['task']} | {e['mode']} | {e['score']} | {e['coverage']:.3f} "
            f"({e['coverage_sd']:.3f}) | {e['size']:.3f} ({e['size_sd']:.3f}) {shift}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small nets, one seed, 2 splits")
    parser.add_argument(
        "--small",
        action="store_true",
        help="the small nets of --quick (one hidden layer of 32, 10-40 epochs)",
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--splits", type=int, default=None, help="cal/test halves per seed")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--no-cross", action="store_true")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    profile = compare.PROFILES["cpu"]
    quick = dict(hidden=(32,), epochs=10, lr=1e-2)
    seeds = range(args.seeds or (1 if args.quick else 3))
    n_splits = args.splits or (2 if args.quick else 10)
    rows, start = [], time.perf_counter()
    for name in args.tasks.split(","):
        kind = TASKS[name][0]
        cfg = dict(profile[name])
        if args.quick or args.small:
            cfg.update(quick, **({"epochs": 40, "n": 100} if name == "gap_regression" else {}))
        for seed in seeds:
            d = load_task(name, seed, cfg)
            run = run_regression if kind == "regressor" else run_classification
            run(name, d, seed, n_splits, not args.no_cross and name in CROSS_TASKS, rows)
            print(f"{name} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    command = "PYTHONPATH=. python benchmarks/conformal.py" + (
        " " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    )
    md = markdown(summary, command.strip(), seconds)
    print(md)
    stem = "conformal_quick" if args.quick else "conformal"
    write_results(args.out_dir, stem, md, dict(rows=rows, summary=summary))
    return dict(rows=rows, summary=summary, markdown=md)


if __name__ == "__main__":
    main()
