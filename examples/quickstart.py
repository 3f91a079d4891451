"""Quickstart: one trained net, skuq's defaults around it, and where they pay off.

Trains a small MLP (skorch) once on the bundled scikit-learn digits (classes
0-4) and wraps the trained net, never retrained (``FrozenEstimator``), in
skuq's estimators at their defaults: ``LaplaceClassifier`` (a diagonal Laplace
posterior over all weights), ``L2MClassifier`` (the same from Adam's second
moment, no pass over the data) and ``ScaLLAClassifier`` (linearized Laplace
through a learned surrogate kernel). Each chooses its prior precision on a
validation split of the training rows (the test rows are never used to tune).
Then compares them with the bare net on held-out digits 0-4, on the same
digits corrupted (pixel noise and rotation, five severities) and on digits 5-9,
which the net has never seen: NLL per severity and the OOD AUROC of the
predictive entropy. Saves a figure (NLL against severity; entropy histograms
of the bare net and of Laplace) when matplotlib is installed.

Run: python examples/quickstart.py [--quick]
"""

import argparse
import sys

import numpy as np
import torch
from scipy import ndimage
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from skuq import L2MClassifier, LaplaceClassifier, MAPClassifier, ScaLLAClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import negative_log_likelihood, ood_auroc
from skuq.nets import MLP

SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(X: np.ndarray, severity: int, seed: int = 0) -> list[np.ndarray]:
    """Noisy and rotated copies of the 8x8 digit rows ``X`` at one severity (1-5)."""
    rng = np.random.default_rng(seed + severity)
    noisy = X + 0.08 * severity * rng.normal(size=X.shape)
    angles = 10.0 * severity * rng.choice([-1.0, 1.0], len(X))
    rotated = np.stack(
        [
            ndimage.rotate(x.reshape(8, 8), a, reshape=False, order=1).ravel()
            for x, a in zip(X, angles, strict=True)
        ]
    )
    return [noisy.astype(np.float32), rotated.astype(np.float32)]


def entropy(proba: np.ndarray) -> np.ndarray:
    return -(proba * np.log(np.clip(proba, 1e-12, None))).sum(axis=1)


def main(quick: bool = False, out: str = "quickstart.png") -> dict:
    data = load_digits_ood()
    X_train, X_val, y_train, y_val = train_test_split(
        data.X_train, data.y_train, test_size=0.2, random_state=0, stratify=data.y_train
    )
    net = NeuralNetClassifier(
        MLP,
        module__hidden=(128, 128),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=30 if quick else 60,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    bare = MAPClassifier(net, random_state=0).fit(X_train, y_train)
    trained = FrozenEstimator(bare.net_)  # trained once, shared, never retrained
    fitted = {"bare net (MAP)": bare}
    for cls, options in (
        (LaplaceClassifier, {}),
        (L2MClassifier, {}),
        (ScaLLAClassifier, {"surrogate__epochs": 10} if quick else {}),
    ):
        est = cls(trained, random_state=0, **options)
        # the validation rows choose the prior precision: rows the net did not train on
        fitted[cls.__name__] = est.fit(X_train, y_train, X_cal=X_val, y_cal=y_val)

    shifted = {s: corrupt(data.X_test, s) for s in SEVERITIES}
    rows = {}
    for name, est in fitted.items():
        proba = est.predict_proba(data.X_test)
        nll = [negative_log_likelihood(data.y_test, proba)]
        shifted_proba = {}
        for s in SEVERITIES:
            parts = [est.predict_proba(X) for X in shifted[s]]
            shifted_proba[s] = np.concatenate(parts)
            nll.append(float(np.mean([negative_log_likelihood(data.y_test, p) for p in parts])))
        proba_ood = est.predict_proba(data.X_ood)
        rows[name] = {
            "accuracy": float((proba.argmax(1) == data.y_test).mean()),
            "NLL": nll[0],
            "shifted NLL": float(np.mean(nll[1:])),
            "OOD AUROC": ood_auroc(entropy(proba), entropy(proba_ood)),
            "NLL by severity": nll,
            "entropy": (entropy(proba), entropy(shifted_proba[3]), entropy(proba_ood)),
        }
    print(f"{'estimator':20s} {'accuracy':>9s} {'NLL':>7s} {'shifted NLL':>12s} {'OOD AUROC':>10s}")
    for name, r in rows.items():
        print(
            f"{name:20s} {r['accuracy']:9.3f} {r['NLL']:7.3f} {r['shifted NLL']:12.3f} "
            f"{r['OOD AUROC']:10.3f}"
        )
    print("(NLL on held-out digits 0-4; shifted: the mean over noise and rotation at 5 severities;")
    print(" OOD AUROC: digits 5-9 told apart from 0-4 by the predictive entropy)")
    _plot(rows, out)
    return rows


def _plot(rows: dict, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure (pip install 'skuq[plot]')")
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, r in rows.items():
        style = "k--" if name.startswith("bare") else "-o"
        axes[0].plot((0, *SEVERITIES), r["NLL by severity"], style, label=name, ms=4)
    axes[0].set(xlabel="corruption severity (0 = clean)", ylabel="NLL (lower is better)")
    axes[0].set_title("NLL as the inputs shift")
    axes[0].legend(frameon=False, fontsize=8)
    bins = np.linspace(0, np.log(5), 30)
    for ax, name in zip(axes[1:], ("bare net (MAP)", "LaplaceClassifier"), strict=True):
        for values, label, color in zip(
            rows[name]["entropy"],
            ("digits 0-4", "shifted (severity 3)", "digits 5-9 (OOD)"),
            ("tab:blue", "tab:orange", "tab:red"),
            strict=True,
        ):
            ax.hist(values, bins=bins, density=True, alpha=0.45, color=color, label=label)
        ax.set(xlabel="predictive entropy", title=name, yscale="log")
        ax.legend(frameon=False, fontsize=8)
    axes[1].set_ylabel("density (log scale)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs only")
    parser.add_argument("--out", default="quickstart.png")
    args = parser.parse_args()
    main(quick=args.quick, out=args.out)
    sys.exit(0)
