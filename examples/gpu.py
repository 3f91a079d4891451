"""Running on a GPU: ``device="auto"`` uses CUDA when there is one, else the CPU.

Every skuq estimator takes ``device``: ``"auto"`` (the default) picks CUDA when
``torch.cuda.is_available()``, ``"cuda"`` / ``"cuda:1"`` / ``"cpu"`` force one.
The wrapped skorch net is trained there, and the method's own work (curvature,
sampling, propagation) and every prediction run there too, in batches of
``batch_size`` rows. The fitted ``device_`` attribute says which one was used.
A net you trained yourself stays where it is; skuq works on a copy.

The example trains a small CNN on synthetic stripe images
(``skuq.datasets.make_synthetic_images``) once, fits two methods around it
(``FrozenEstimator``), and plots the fit and predict times on the device it
found, with test accuracy and NLL.

Run: python examples/gpu.py [--quick] [--device auto|cpu|cuda] [--out gpu.png]
"""

import argparse
import time

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

from skuq import CVPClassifier, LaplaceClassifier, MAPClassifier
from skuq.datasets import make_synthetic_images
from skuq.metrics import negative_log_likelihood
from skuq.nets import SmallCNN


def main(quick: bool = False, out: str = "gpu.png", device: str = "auto") -> dict:
    data = make_synthetic_images(
        n_samples=600 if quick else 2000, size=16, noise=0.6, random_state=0
    )
    X_train, X_test, y_train, y_test = train_test_split(
        data.X, data.y, test_size=0.25, stratify=data.y, random_state=0
    )
    # 150 rows that the net never trains on, for the methods' held-out fits
    X_train, X_val, y_train, y_val = train_test_split(
        X_train, y_train, test_size=150, stratify=y_train, random_state=0
    )
    net = NeuralNetClassifier(
        SmallCNN,
        module__channels=(8, 16),
        module__hidden=64,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=2e-3,
        max_epochs=6 if quick else 12,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    results = {}

    def timed(name, est, **fit_params):
        t0 = time.perf_counter()
        est.fit(X_train, y_train, **fit_params)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proba = est.predict_proba(X_test)
        results[name] = {
            "device": str(est.device_),
            "fit_s": fit_s,
            "predict_s": time.perf_counter() - t0,
            "accuracy": float((est.classes_[proba.argmax(1)] == y_test).mean()),
            "NLL": negative_log_likelihood(y_test, proba),
        }
        return est

    # the net is trained once, on the device, inside the first fit ...
    bare = timed("MAP (trains the net)", MAPClassifier(net, device=device, random_state=0))
    # ... and the methods reuse it through FrozenEstimator (net_ is the trained skorch net)
    trained = FrozenEstimator(bare.net_)
    held_out = {"X_cal": X_val, "y_cal": y_val}  # prior precision / variance scales
    timed("Laplace (last layer)", LaplaceClassifier(trained, device=device), **held_out)
    # CVP's default posterior trains the net with IVON (pip install 'skuq[ivon]');
    # "l2m" reads the Adam state that the trained skorch net kept: no pass over the data
    timed(
        "CVP (L2M posterior)",
        CVPClassifier(trained, posterior="l2m", device=device, random_state=0),
        **held_out,
    )
    used = next(iter(results.values()))["device"]
    gpu = torch.cuda.get_device_name(0) if used.startswith("cuda") else "no GPU: CPU"
    print(f"device={device!r} resolved to {used} ({gpu})")
    print(f"{'method':30s} {'fit s':>7s} {'predict s':>10s} {'accuracy':>9s} {'NLL':>6s}")
    for name, r in results.items():
        print(
            f"{name:30s} {r['fit_s']:7.2f} {r['predict_s']:10.3f} {r['accuracy']:9.3f} "
            f"{r['NLL']:6.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(pos - 0.2, [results[n]["fit_s"] for n in names], width=0.4, label="fit (incl. training)")
    ax.bar(
        pos + 0.2,
        [results[n]["predict_s"] for n in names],
        width=0.4,
        label=f"predict_proba, {len(X_test)} rows",
    )
    for i, n in enumerate(names):
        ax.text(
            i,
            results[n]["fit_s"],
            f"acc {results[n]['accuracy']:.2f}\nNLL {results[n]['NLL']:.2f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(pos, names, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_ylim(0, 1.3 * max(r["fit_s"] for r in results.values()))
    ax.set_title(f"device={device!r} -> {used} ({gpu})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs")
    parser.add_argument("--device", default="auto", help='"auto" (default), "cpu" or "cuda"')
    parser.add_argument("--out", default="gpu.png", help="where to save the figure")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out, device=args.device)
