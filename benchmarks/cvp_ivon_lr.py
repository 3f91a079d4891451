"""The learning rate of CVP's IVON posterior source (``IVON_DEFAULTS["lr"]``), chosen on data.

``CVPClassifier(posterior="ivon")`` trains the net with IVON, whose learning
rate has nothing to do with the Adam one of the wrapped net. This script
chooses it the way a default should be chosen: on every classification task
of the comparison (``benchmarks/compare.py``: same data, nets, epochs and
training split), 3 seeds, it trains on 75 % of the *training* rows and scores
the uncalibrated IVON predictive's NLL on the other 25 % -- never on the
comparison's validation or test rows. The default is the minimax choice: the
learning rate whose worst ratio to a task's best NLL is smallest.

Run: ``PYTHONPATH=. python benchmarks/cvp_ivon_lr.py [--quick]`` (about a
minute); writes ``benchmarks/results/cvp_ivon_lr.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the comparison's tasks, nets and splits)
from _common import RESULTS, write_results  # noqa: E402

from skuq import CVPClassifier  # noqa: E402
from skuq.cvp.ivon import IVON_DEFAULTS  # noqa: E402
from skuq.metrics import negative_log_likelihood  # noqa: E402

LRS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
TASKS = ("digits", "wine", "breast_cancer", "images")


def inner_nll(task: str, seed: int, lrs, cfg: dict) -> dict:
    """``{lr: NLL}`` on a held-out quarter of the training rows, IVON at each ``lr``.

    The task's data and split are built once; only the IVON training repeats.
    """
    data = getattr(compare, f"task_{task}")(seed, cfg)
    X_fit, X_held, y_fit, y_held = train_test_split(
        data.X_train, data.y_train, test_size=0.25, random_state=100 + seed, stratify=data.y_train
    )
    out = {}
    for lr in lrs:
        est = CVPClassifier(
            clone(data.net), posterior="ivon", posterior__lr=lr, calibration=None, random_state=seed
        ).fit(X_fit, y_fit)
        out[lr] = negative_log_likelihood(y_held, est.predict_proba(X_held), labels=est.classes_)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 1 seed, 2 rates")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    tasks, seeds, lrs = (("digits",), 1, (1.0, 0.2)) if args.quick else (TASKS, 3, LRS)
    cfgs = compare.PROFILES["quick" if args.quick else "cpu"]
    t0 = time.perf_counter()
    per_seed = {t: [inner_nll(t, s, lrs, cfgs[t]) for s in range(seeds)] for t in tasks}
    nll = {t: {lr: [run[lr] for run in runs] for lr in lrs} for t, runs in per_seed.items()}
    mean = {t: {lr: float(np.mean(v)) for lr, v in per.items()} for t, per in nll.items()}
    ratio = {lr: [mean[t][lr] / min(mean[t].values()) for t in tasks] for lr in lrs}
    best = min(lrs, key=lambda lr: max(ratio[lr]))
    cmd = "PYTHONPATH=. python benchmarks/cvp_ivon_lr.py" + (" --quick" if args.quick else "")
    lines = [
        "# CVP's IVON source: the learning rate, chosen on held-out training rows",
        "",
        f"`{cmd}`: the comparison's tasks (cpu profile), {seeds} seed(s); IVON trains on 75 % "
        "of each task's training rows, the uncalibrated predictive is scored on the other "
        f"25 % (never the validation or test rows); torch 1 thread; "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        "| lr | " + " | ".join(f"{t} NLL (x best)" for t in tasks) + " | worst ratio |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for lr in lrs:
        cells = [f"{mean[t][lr]:.4f} ({r:.2f})" for t, r in zip(tasks, ratio[lr], strict=True)]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {max(ratio[lr]):.2f} |")
    lines += [
        "",
        f"Minimax choice of this run: lr = {best:g}; "
        f"`skuq.cvp.ivon.IVON_DEFAULTS['lr']` is {IVON_DEFAULTS['lr']:g}.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = "cvp_ivon_lr_quick" if args.quick else "cvp_ivon_lr"
    write_results(
        args.out_dir,
        stem,
        table,
        {
            "command": cmd,
            "nll": {t: {str(lr): v for lr, v in per.items()} for t, per in nll.items()},
            "choice": best,
        },
    )
    return {"nll": nll, "choice": best}


if __name__ == "__main__":
    main()
