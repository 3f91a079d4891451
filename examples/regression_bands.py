"""Regression with predictive bands: does the uncertainty grow where there is no data?

1-D data ``y = sin(3x) + x/2 + noise`` on [-2, 2] with a gap at (-0.5, 0.5)
(``skuq.datasets.make_gap_regression``). One MLP is trained; the bare net
(MAP: noise only), a last-layer Laplace and an all-weights K-FAC Laplace are
fitted around it (``FrozenEstimator``: never retrained), and MC dropout trains
its own dropout net. The figure shows each predictive mean with a band of
±2 standard deviations (epistemic and noise together) over [-3, 3]; the
printed table gives the mean std on the data's support, in the gap and beyond
[-2, 2], and the RMSE of the mean against the noise-free curve on the support.

Run: python examples/regression_bands.py [--quick] [--out regression_bands.png]
"""

import argparse

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetRegressor

from skuq import LaplaceRegressor, MAPRegressor, MCDropoutRegressor
from skuq.datasets import make_gap_regression
from skuq.nets import MLP


def make_net(epochs: int, dropout: float = 0.0) -> NeuralNetRegressor:
    return NeuralNetRegressor(
        MLP,
        module__n_outputs=1,
        module__hidden=(64, 64),
        module__dropout=dropout,
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=epochs,
        batch_size=-1,
        train_split=None,
        verbose=0,  # full batch: 300 rows
    )


def main(quick: bool = False, out: str = "regression_bands.png") -> dict:
    d = make_gap_regression()
    epochs = 80 if quick else 300
    torch.manual_seed(0)
    net = make_net(epochs).fit(d.X, d.y.reshape(-1, 1))

    estimators = {
        "MAP (noise only)": MAPRegressor(FrozenEstimator(net)),
        "Laplace, last layer": LaplaceRegressor(FrozenEstimator(net)),
        "Laplace, all weights (K-FAC)": LaplaceRegressor(
            FrozenEstimator(net), subset_of_weights="all", hessian_structure="kron"
        ),
        "MC dropout (p=0.1)": MCDropoutRegressor(make_net(epochs, dropout=0.1), random_state=0),
    }
    x = d.X_test[:, 0]
    on_data = (np.abs(x) <= 2) & ~d.in_gap
    results = {}
    for name, est in estimators.items():
        est.fit(d.X, d.y)
        mean, std = est.predict(d.X_test, return_std=True)
        results[name] = {
            "std on data": float(std[on_data].mean()),
            "std in gap": float(std[d.in_gap].mean()),
            "std beyond data": float(std[np.abs(x) > 2].mean()),
            "RMSE on data": float(np.sqrt(np.mean((mean - d.y_test)[on_data] ** 2))),
            "mean": mean,
            "std": std,
        }
    print(f"{'method':30s} {'std data':>9s} {'std gap':>8s} {'std out':>8s} {'RMSE':>6s}")
    for name, r in results.items():
        print(
            f"{name:30s} {r['std on data']:9.3f} {r['std in gap']:8.3f} "
            f"{r['std beyond data']:8.3f} {r['RMSE on data']:6.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True, sharey=True)
    for ax, (name, r) in zip(axes.flat, results.items(), strict=True):
        ax.axvspan(-0.5, 0.5, color="0.93", lw=0)
        ax.fill_between(
            x, r["mean"] - 2 * r["std"], r["mean"] + 2 * r["std"], alpha=0.3, label="±2 std"
        )
        ax.plot(x, d.y_test, color="black", lw=1, ls="--", label="truth")
        ax.plot(x, r["mean"], lw=1.5, label="mean")
        ax.scatter(d.X[:, 0], d.y, s=4, color="0.4", label="data")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-4, 4)
    for ax in axes[1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    axes[0, 0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--out", default="regression_bands.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
