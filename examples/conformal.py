"""Conformal intervals on top of the posterior: a coverage guarantee with the Bayesian width.

1-D data with a gap (``skuq.datasets.make_gap_regression``, 600 rows). A
last-layer Laplace regressor is fitted on 300 of them; the other 300, from the
same distribution, are split into calibration and test halves. Split conformal
(MAPIE, through ``skuq.conformal.split_conformal``) then gives 90 % intervals
with two scores: ``absolute`` (``|y - mean|``: one width everywhere) and
``posterior`` (``|y - mean| / std``: a conformal multiple of the predictive
std, wide where the posterior is). Both cover the test half at the target;
the posterior intervals are narrower where the data are dense and widen in
the gap, where the absolute ones keep the same width. The printed table gives
coverage and mean width on the test half, and the mean width in the gap.

Run: python examples/conformal.py [--quick] [--out conformal.png]
"""

import argparse

import numpy as np
import torch
from skorch import NeuralNetRegressor

from skuq import LaplaceRegressor
from skuq.conformal import split_conformal
from skuq.datasets import make_gap_regression
from skuq.nets import MLP


def main(quick: bool = False, out: str = "conformal.png") -> dict:
    d = make_gap_regression(n_samples=600, random_state=0)
    rng = np.random.RandomState(0)
    order = rng.permutation(len(d.X))
    train, cal, test = order[:300], order[300:450], order[450:]
    net = NeuralNetRegressor(
        MLP,
        module__hidden=(64, 64),
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=80 if quick else 300,
        batch_size=-1,
        train_split=None,
        verbose=0,
    )
    est = LaplaceRegressor(net, random_state=0).fit(d.X[train], d.y[train])

    x = d.X_test[:, 0]
    results = {}
    for score in ("absolute", "posterior"):
        cp = split_conformal(est, d.X[cal], d.y[cal], confidence_level=0.9, score=score)
        bounds = cp.predict_interval(d.X[test])[1][:, :, 0]
        y = d.y[test]
        grid = cp.predict_interval(d.X_test)[1][:, :, 0]
        results[score] = {
            "coverage": float(np.mean((y >= bounds[:, 0]) & (y <= bounds[:, 1]))),
            "width": float(np.mean(bounds[:, 1] - bounds[:, 0])),
            "width in gap": float(np.mean((grid[:, 1] - grid[:, 0])[d.in_gap])),
            "grid": grid,
        }
    print(f"{'score':10s} {'coverage':>9s} {'width':>7s} {'width in gap':>13s}  (target 0.9)")
    for score, r in results.items():
        print(f"{score:10s} {r['coverage']:9.3f} {r['width']:7.3f} {r['width in gap']:13.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = est.predict(d.X_test)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (score, r) in zip(axes, results.items(), strict=True):
        ax.axvspan(-0.5, 0.5, color="0.93", lw=0)
        ax.fill_between(x, r["grid"][:, 0], r["grid"][:, 1], alpha=0.3, label="90 % interval")
        ax.plot(x, mean, lw=1.5, label="mean")
        ax.scatter(d.X[train, 0], d.y[train], s=3, color="0.4", label="training rows")
        ax.set_title(f"{score}: coverage {r['coverage']:.2f}, width {r['width']:.2f}", fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylim(-4, 4)
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--out", default="conformal.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
