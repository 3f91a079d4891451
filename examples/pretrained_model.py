"""Uncertainty for a network you have already trained: two routes, no retraining.

* A plain ``torch.nn.Module`` trained with your own loop: pass the module itself.
  skuq takes it as trained and returning logits. L2M also needs the optimizer
  that trained it: ``fit(X, y, optimizer=opt)``.
* A fitted skorch net: wrap it in ``sklearn.frozen.FrozenEstimator`` (the
  scikit-learn >= 1.6 idiom that replaces ``cv="prefit"``). skuq never calls
  its ``fit``.

Either way ``fit`` only fits the method's own part (a posterior, a
temperature) and the weights are left as they were -- the example checks that.
The figure compares the test NLL and the OOD AUROC (digits 5-9 vs held-out
0-4) of each estimator with its bare net.

Run: python examples/pretrained_model.py [--quick] [--out pretrained_model.png]
"""

import argparse
import copy

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier
from torch import nn

from skuq import L2MClassifier, LaplaceClassifier, MAPClassifier, TemperatureScalingClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import negative_log_likelihood, ood_auroc
from skuq.nets import MLP


def train_plain_torch(X, y, epochs: int, batch_size: int = 64):
    """An ordinary PyTorch training loop: nothing skuq-specific."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), opt


def evaluate(est, d) -> dict:
    return {
        "NLL": negative_log_likelihood(d.y_test, est.predict_proba(d.X_test)),
        "OOD AUROC": ood_auroc(est.predict_uncertainty(d.X_test), est.predict_uncertainty(d.X_ood)),
    }


def main(quick: bool = False, out: str = "pretrained_model.png") -> dict:
    d = load_digits_ood()
    # keep a validation split that no net trains on (for the temperature and the prior)
    X_train, X_val, y_train, y_val = train_test_split(
        d.X_train, d.y_train, test_size=0.2, stratify=d.y_train, random_state=0
    )
    epochs = 8 if quick else 30
    results = {}

    # route 1: a plain torch.nn.Module and the optimizer that trained it
    module, opt = train_plain_torch(X_train, y_train, epochs)
    before = copy.deepcopy(module.state_dict())
    results["nn.Module"] = {
        "MAP": evaluate(MAPClassifier(module).fit(X_train, y_train), d),
        "Laplace": evaluate(
            LaplaceClassifier(module).fit(X_train, y_train, X_cal=X_val, y_cal=y_val), d
        ),
        "L2M": evaluate(
            L2MClassifier(module, train_batch_size=64).fit(X_train, y_train, optimizer=opt), d
        ),
    }
    unchanged = all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    # route 2: a skorch net trained by the user, wrapped in FrozenEstimator
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        MLP,
        module__n_outputs=5,
        module__hidden=(128,),
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=3e-3,
        max_epochs=epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    ).fit(X_train, y_train)
    before_net = copy.deepcopy(net.module_.state_dict())
    frozen = FrozenEstimator(net)
    results["FrozenEstimator"] = {
        "MAP": evaluate(MAPClassifier(frozen).fit(X_train, y_train), d),
        # a trained net calibrates on all of fit's rows: give it the validation rows
        "temperature": evaluate(TemperatureScalingClassifier(frozen).fit(X_val, y_val), d),
        "Laplace": evaluate(
            LaplaceClassifier(frozen).fit(X_train, y_train, X_cal=X_val, y_cal=y_val), d
        ),
    }
    unchanged = unchanged and all(
        torch.equal(before_net[k], v) for k, v in net.module_.state_dict().items()
    )
    results["weights unchanged"] = unchanged

    for route in ("nn.Module", "FrozenEstimator"):
        for name, r in results[route].items():
            print(f"{route:16s} {name:12s} NLL {r['NLL']:.3f}  OOD AUROC {r['OOD AUROC']:.3f}")
    print(f"weights unchanged by every fit: {unchanged}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"nn.Module": "module", "FrozenEstimator": "frozen"}
    labels = [
        f"{name}\n({short[route]})"
        for route in ("nn.Module", "FrozenEstimator")
        for name in results[route]
    ]
    values = [r for route in ("nn.Module", "FrozenEstimator") for r in results[route].values()]
    colors = ["C0" if "MAP" in label else "C1" for label in labels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("NLL", "OOD AUROC"), strict=True):
        heights = [v[key] for v in values]
        ax.bar(np.arange(len(labels)), heights, color=colors)
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
        ax.set_title(f"{key} ({'lower' if key == 'NLL' else 'higher'} is better)")
        if key == "OOD AUROC":
            ax.set_ylim(0.5, 1.0)
        for i, h in enumerate(heights):
            ax.text(i, h, f"{h:.3f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        "already-trained nets, digits 0-4: a plain nn.Module (module) and a skorch "
        "net in FrozenEstimator (frozen); blue: the bare net",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--out", default="pretrained_model.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
