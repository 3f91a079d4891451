"""Temperature scaling fitted on a frozen net's own training rows vs on held-out rows.

Per task of ``benchmarks/shift.py`` (its data, corruptions and nets): the net is
trained once on the training split, then ``TemperatureScalingClassifier(
FrozenEstimator(net))`` is fitted (a) on the training rows themselves (the
mistake) and (b) on the validation split (held out). Reported: both
temperatures, the test NLL, the mean NLL over the corrupted test sets, the OOD
AUROC, the net's loss on each calibration set relative to its last training
epoch's loss (``net.history``: what the fitted-rows check reads), and whether
``fit`` warned.

Usage::

    PYTHONPATH=. python benchmarks/temperature_fitted_rows.py            # 3 seeds
    PYTHONPATH=. python benchmarks/temperature_fitted_rows.py --seeds 1 --tasks wine
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shift  # noqa: E402
from _common import RESULTS, write_results  # noqa: E402

from skuq import MAPClassifier, TemperatureScalingClassifier  # noqa: E402
from skuq.baselines.map_temperature import _criterion_loss, _last_training_loss  # noqa: E402

TASKS = [
    "digits_mlp",
    "digits_cnn",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "images",
    "wine",
    "breast_cancer",
]


def _fit_ts(frozen, X, y):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = TemperatureScalingClassifier(frozen).fit(X, y)
    warned = any(
        "look like rows the net was trained on" in str(w.message)
        or "classifies every calibration row correctly" in str(w.message)
        for w in caught
    )
    return est, warned


def _loss_ratio(est, X, y):
    with torch.no_grad():
        logits = est.model_(torch.as_tensor(X)).float()
    return _criterion_loss(est.net_, logits, torch.as_tensor(y)) / _last_training_loss(est.net_)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for task in args.tasks.split(","):
        for seed in range(args.seeds):
            d = shift.TASKS[task][0](seed, shift.PROFILES["cpu"][task])
            bare = MAPClassifier(d.net, random_state=seed, device="cpu").fit(d.X_train, d.y_train)
            frozen = FrozenEstimator(bare.net_)
            on_train, warn_train = _fit_ts(frozen, d.X_train, d.y_train)
            on_val, warn_val = _fit_ts(frozen, d.X_val, d.y_val)
            res = [shift.evaluate_classifier(e, d)[0] for e in (bare, on_train, on_val)]
            rows.append(
                dict(
                    task=task,
                    seed=seed,
                    t_train=on_train.temperature_,
                    t_val=on_val.temperature_,
                    nll=[r["nll"] for r in res],
                    shift_nll=[r["shift_nll"] for r in res],
                    auroc=[r["ood_auroc"] for r in res],
                    ratio_train=_loss_ratio(on_train, d.X_train, d.y_train),
                    ratio_val=_loss_ratio(on_val, d.X_val, d.y_val),
                    warn_train=warn_train,
                    warn_val=warn_val,
                )
            )
            r = rows[-1]
            print(
                f"{task:14s} seed {seed}: T train {r['t_train']:.3f} val {r['t_val']:.3f}; "
                f"NLL {r['nll'][0]:.3f} / {r['nll'][1]:.3f} / {r['nll'][2]:.3f}; warned "
                f"{warn_train} / {warn_val}",
                flush=True,
            )
    head = (
        "| task | seed | T (train rows) | T (held out) | test NLL: MAP / TS train / TS "
        "held out | shifted NLL: MAP / TS train / TS held out | OOD AUROC: MAP / TS train "
        "/ TS held out | loss / last train loss: train rows / held out | warned: train rows "
        "/ held out |"
    )
    lines = [
        "## Temperature scaling on the net's own training rows vs held-out rows",
        "",
        f"`PYTHONPATH=. python benchmarks/temperature_fitted_rows.py "
        f"{' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
        "",
        "Tasks, nets and corruptions of `benchmarks/shift.py`; the held-out rows are its "
        "validation split. Shifted NLL: mean over all corruptions and severities.",
        "",
        head,
        "|" + "---|" * head.count(" | ") + "---|",
    ]
    for r in rows:

        def f3(v):
            return " / ".join(f"{x:.3f}" for x in v)

        lines.append(
            f"| {r['task']} | {r['seed']} | {r['t_train']:.3f} | {r['t_val']:.3f} | "
            f"{f3(r['nll'])} | {f3(r['shift_nll'])} | {f3(r['auroc'])} | "
            f"{r['ratio_train']:.2f} / {r['ratio_val']:.2f} | "
            f"{'yes' if r['warn_train'] else 'no'} / {'yes' if r['warn_val'] else 'no'} |"
        )
    n = len(rows)
    worse = sum(r["nll"][1] > r["nll"][0] for r in rows)
    lines += [
        "",
        f"Fitted on the training rows, temperature scaling made the test NLL worse than the "
        f"bare net's in {worse} of {n} runs (median ratio "
        f"{np.median([r['nll'][1] / r['nll'][0] for r in rows]):.2f}, max "
        f"{max(r['nll'][1] / r['nll'][0] for r in rows):.2f}) and the shifted NLL worse in "
        f"{sum(r['shift_nll'][1] > r['shift_nll'][0] for r in rows)} of {n} (median ratio "
        f"{np.median([r['shift_nll'][1] / r['shift_nll'][0] for r in rows]):.2f}). "
        f"The check warned on {sum(r['warn_train'] for r in rows)} of {n} training-row fits "
        f"and on {sum(r['warn_val'] for r in rows)} of {n} held-out fits.",
    ]
    md = "\n".join(lines)
    write_results(args.out_dir, "temperature_fitted_rows", md + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
