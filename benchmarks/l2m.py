"""L2M vs the diagonal GGN Laplace and the bare net, on the digits OOD split.

What L2M promises is a posterior for free: its fit reads the optimizer state,
so its cost is compared with the training it rides on, and with the diagonal
GGN Laplace over all weights (one pass over the training data with
per-layer gradients), with the marginal-likelihood prior, and with each
method's default prior (the held-out rule: the predictive NLL of each value of
a grid on a validation split, 20 % of the training rows that the net does not
train on). Quality on the test split:
accuracy, NLL, ECE, OOD AUROC (predictive entropy, digits 5-9). Nothing is
tuned on the test split.

Run: ``PYTHONPATH=. python benchmarks/l2m.py [--quick] [--seeds N]``; writes
``benchmarks/results/l2m.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split

from skuq import L2MClassifier, LaplaceClassifier, MAPClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import expected_calibration_error, negative_log_likelihood, ood_auroc
from skuq.nets import MLP

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, classifier_net, timed, write_results  # noqa: E402

#: label -> constructor of the estimator around the trained (frozen) net
METHODS = {
    "MAP (bare net)": None,
    "L2M (defaults: held-out prior)": lambda net: L2MClassifier(net, random_state=0),
    "L2M, marglik prior": lambda net: L2MClassifier(net, prior_precision="marglik", random_state=0),
    "diag GGN Laplace, all weights, marglik": lambda net: LaplaceClassifier(
        net,
        subset_of_weights="all",
        hessian_structure="diag",
        prior_precision="marglik",
        random_state=0,
    ),
    "LaplaceClassifier (defaults: all weights, diag, held-out prior)": lambda net: (
        LaplaceClassifier(net, random_state=0)
    ),
}


def run(seed: int, epochs: int) -> dict[str, dict]:
    d = load_digits_ood()
    # the net never sees the validation rows: the held-out prior is chosen on them
    X_tr, X_val, y_tr, y_val = train_test_split(
        d.X_train, d.y_train, test_size=0.2, random_state=seed, stratify=d.y_train
    )
    torch.manual_seed(seed)
    net = classifier_net(MLP, dict(lr=1e-3, epochs=epochs), hidden=(64, 64))
    bare, train_s = timed(
        lambda: MAPClassifier(net, random_state=seed, device="cpu").fit(X_tr, y_tr)
    )
    out = {}
    for label, make in METHODS.items():
        if make is None:
            est, fit_s = bare, 0.0
        else:
            est = make(FrozenEstimator(bare.net_)).set_params(device="cpu")
            cal = dict(X_cal=X_val, y_cal=y_val) if est._uses_calibration_split else {}
            _, fit_s = timed(lambda est=est, cal=cal: est.fit(X_tr, y_tr, **cal))
        p = est.predict_proba(d.X_test)
        out[label] = {
            "acc": float((est.classes_[p.argmax(1)] == d.y_test).mean()),
            "nll": negative_log_likelihood(d.y_test, p),
            "ece": expected_calibration_error(d.y_test, p),
            "auroc": ood_auroc(est.predict_uncertainty(d.X_test), est.predict_uncertainty(d.X_ood)),
            "fit_s": fit_s,
            "fit_over_train": fit_s / train_s,
            "train_s": train_s,
        }
    return out


def markdown(runs: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| method | acc | NLL | ECE | OOD AUROC | posterior fit s | fit / training |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in METHODS:
        rows = [r[label] for r in runs]

        def cell(key, fmt, rows=rows):
            v = np.array([r[key] for r in rows])
            return f"{v.mean():{fmt}} ± {v.std():{fmt}}"

        frac = np.array([r["fit_over_train"] for r in rows]) * 100
        frac_cell = "—" if label.startswith("MAP") else f"{frac.mean():.2f} % ± {frac.std():.2f}"
        lines.append(
            f"| {label} | {cell('acc', '.3f')} | {cell('nll', '.3f')} | {cell('ece', '.3f')} | "
            f"{cell('auroc', '.3f')} | {cell('fit_s', '.3f')} | {frac_cell} |"
        )
    train = np.array([r["MAP (bare net)"]["train_s"] for r in runs])
    lines += ["", f"Training the net (the denominator): {train.mean():.1f} ± {train.std():.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs (smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds, epochs = (1, 5) if args.quick else (args.seeds, args.epochs)
    run(0, 1)  # warm-up: first calls (imports, autograd, L-BFGS set-up) are not timed
    load = os.getloadavg()[0]
    runs = [run(seed, epochs) for seed in range(seeds)]
    cmd = "PYTHONPATH=. python benchmarks/l2m.py" + (" --quick" if args.quick else "")
    header = (
        f"# L2M on the digits OOD split\n\n`{cmd}`: {seeds} seed(s), MLP 64-64-64-5, "
        f"Adam lr 1e-3, batch 64, {epochs} epochs; CPU, torch 1 thread "
        f"({platform.processor() or platform.machine()}), 1-minute load average {load:.1f} "
        "at the start (seconds inflate with it; the fractions of the training time less so). "
        "Mean ± std over seeds."
    )
    table = markdown(runs, header)
    print(table)
    stem = "l2m_quick" if args.quick else "l2m"
    write_results(
        args.out_dir, stem, table, {"command": cmd, "seeds": seeds, "epochs": epochs, "runs": runs}
    )
    return {"runs": runs}


if __name__ == "__main__":
    main()
