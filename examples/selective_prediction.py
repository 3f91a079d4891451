"""Selective prediction: answer only the rows a model is sure of, and see the error drop.

A classifier that may abstain answers the rows with the highest confidence
(max p) first. The risk-coverage curve plots the error rate on the answered
rows (selective risk) against the fraction answered (coverage); a lower curve
is better, its area is the AURC, and "coverage at 1 % risk" is how much can
be answered with at most 1 % errors.

All ten of scikit-learn's 8x8 digits, with a deliberately small training split
so that the net makes mistakes to rank. One MLP is trained; the bare net
(MAP), temperature scaling and a last-layer Laplace (prior precision chosen on
a validation split) share it through ``FrozenEstimator``; a deep ensemble
trains its own members.

What it shows on this task: the curves nearly coincide. A temperature rescales
every row's confidence alike and so never reorders rows; the posteriors here
reorder few. Where these methods differ is calibration (the NLL column), and
out-of-distribution inputs (see ood_digits.py), more than the ranking of
in-distribution rows.

Run: python examples/selective_prediction.py [--quick] [--out selective_prediction.png]
"""

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from skuq import (
    DeepEnsembleClassifier,
    LaplaceClassifier,
    MAPClassifier,
    TemperatureScalingClassifier,
)
from skuq.metrics import aurc, coverage_at_risk, negative_log_likelihood
from skuq.nets import MLP


def make_net(epochs: int) -> NeuralNetClassifier:
    return NeuralNetClassifier(
        MLP,
        module__n_outputs=10,
        module__hidden=(64,),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=3e-3,
        max_epochs=epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )


def main(quick: bool = False, out: str = "selective_prediction.png") -> dict:
    digits = load_digits()
    X, y = (digits.data / 16.0).astype(np.float32), digits.target
    # 300 training rows, 300 validation rows (for temperature and prior), the rest test
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, train_size=300, stratify=y, random_state=0
    )
    X_val, X_test, y_val, y_test = train_test_split(
        X_rest, y_rest, train_size=300, stratify=y_rest, random_state=0
    )

    epochs = 15 if quick else 40
    torch.manual_seed(0)
    net = make_net(epochs).fit(X_train, y_train)
    estimators = {
        "MAP": MAPClassifier(FrozenEstimator(net)),
        "temperature scaling": TemperatureScalingClassifier(FrozenEstimator(net)),
        "Laplace (last layer)": LaplaceClassifier(FrozenEstimator(net)),
        "deep ensemble": DeepEnsembleClassifier(
            make_net(epochs), n_estimators=3 if quick else 5, random_state=0
        ),
    }
    calibrates = ("temperature scaling", "Laplace (last layer)")
    results = {}
    for name, est in estimators.items():
        if name in calibrates:  # a split the net never trained on
            est.fit(X_train, y_train, X_cal=X_val, y_cal=y_val)
        else:
            est.fit(X_train, y_train)
        proba = est.predict_proba(X_test)
        results[name] = {
            "accuracy": float((est.classes_[proba.argmax(1)] == y_test).mean()),
            "NLL": negative_log_likelihood(y_test, proba),
            "AURC": aurc(y_test, proba),
            "C@1%": float(np.nan_to_num(coverage_at_risk(y_test, proba, risk=0.01))),
            "proba": proba,
        }
    print(f"{'method':22s} {'accuracy':>9s} {'NLL':>6s} {'AURC':>7s} {'C@1%':>6s}")
    for name, r in results.items():
        print(f"{name:22s} {r['accuracy']:9.3f} {r['NLL']:6.3f} {r['AURC']:7.4f} {r['C@1%']:6.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skuq.plotting import risk_coverage_plot

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        errors = r["proba"].argmax(1) != y_test  # classes_ are 0..9 here
        risk_coverage_plot(errors, r["proba"].max(1), ax=ax, label=f"{name} (AURC {r['AURC']:.4f})")
    ax.axhline(0.01, color="grey", ls=":", lw=1)
    ax.text(0.02, 0.011, "1 % risk", color="grey", fontsize=8, va="bottom")
    ax.set_title(f"digits, {len(X_train)} training rows: abstain on the least confident")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and members")
    parser.add_argument(
        "--out", default="selective_prediction.png", help="where to save the figure"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
