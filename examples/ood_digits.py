"""OOD detection on digits: do unseen digits 5-9 look less certain than digits 0-4?

One MLP is trained on digits 0-4 (scikit-learn's bundled 8x8 digits). The bare
net (MAP) and a K-FAC Laplace approximation over all its weights, with the
marginal-likelihood prior, around that same trained net (``FrozenEstimator``:
never retrained) score every held-out row; a deep ensemble trains its own
members. (The default last-layer Laplace does not separate better than the bare
net on this net; see docs/comparison.md.) The figure overlays the histogram of each method's
uncertainty on held-out digits 0-4 and on digits 5-9; the better a method
separates the two, the higher its OOD AUROC.

Run: python examples/ood_digits.py [--quick] [--out ood_digits.png]
"""

import argparse

import torch
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier

from skuq import DeepEnsembleClassifier, LaplaceClassifier, MAPClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import fpr_at_95_tpr, ood_auroc
from skuq.nets import MLP


def make_net(epochs: int) -> NeuralNetClassifier:
    return NeuralNetClassifier(
        MLP,
        module__n_outputs=5,
        module__hidden=(128, 128),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=3e-3,
        max_epochs=epochs,
        batch_size=128,
        train_split=None,
        verbose=0,
    )


def main(quick: bool = False, out: str = "ood_digits.png") -> dict:
    torch.manual_seed(0)
    d = load_digits_ood()
    epochs = 6 if quick else 25
    net = make_net(epochs).fit(d.X_train, d.y_train)  # the user's one trained net

    estimators = {
        # (estimator, which uncertainty score to use)
        "MAP": (MAPClassifier(FrozenEstimator(net)), "entropy"),
        "Laplace (all weights)": (
            LaplaceClassifier(
                FrozenEstimator(net), subset_of_weights="all", prior_precision="marglik"
            ),
            "entropy",
        ),
        "Deep ensemble": (
            DeepEnsembleClassifier(
                make_net(epochs), n_estimators=3 if quick else 5, random_state=0
            ),
            "mutual_information",
        ),
    }
    results = {}
    for name, (est, kind) in estimators.items():
        est.fit(d.X_train, d.y_train)
        u_in = est.predict_uncertainty(d.X_test, kind=kind)
        u_out = est.predict_uncertainty(d.X_ood, kind=kind)
        results[name] = {
            "accuracy": est.score(d.X_test, d.y_test),
            "OOD AUROC": ood_auroc(u_in, u_out),
            "FPR@95": fpr_at_95_tpr(u_in, u_out),
            "score": kind,
            "u_in": u_in,
            "u_out": u_out,
        }
    print(f"{'method':22s} {'accuracy':>9s} {'OOD AUROC':>10s} {'FPR@95':>7s}  score")
    for name, r in results.items():
        print(
            f"{name:22s} {r['accuracy']:9.3f} {r['OOD AUROC']:10.3f} {r['FPR@95']:7.3f}  "
            f"{r['score']}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skuq.plotting import uncertainty_histogram

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6))
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        uncertainty_histogram(
            r["u_in"], r["u_out"], ax=ax, label=name, xlabel=r["score"].replace("_", " ")
        )
    fig.suptitle("uncertainty on held-out digits 0-4 (in-distribution) vs digits 5-9 (OOD)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and members")
    parser.add_argument("--out", default="ood_digits.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
