"""Subnetwork inference: which k weights to give a full-covariance Laplace posterior.

Daxberger et al. (ICML 2021) report that a full-covariance Laplace over a small
subnetwork chosen by the 2-Wasserstein rule (largest marginal variance under a
diagonal Laplace) beats a diagonal Laplace over all weights. This script
checks that in kind on two offline tasks, at equal subnetwork size ``k``
(the size of the net's last layer, so that ``"last_layer"`` is one of the
rules compared):

* digits: the 8x8 digits 0-4 (MLP 64-128-128-5, 25k weights), OOD digits 5-9;
* images: synthetic 28x28 stripe images (``skuq.datasets.make_synthetic_images``,
  pixel noise 1.0), a CNN of 1.07M weights
  (conv 32, conv 64, dense 3136-320-128-10), OOD blob images; 500 test and
  500 OOD rows.

Rows: the bare net (MAP), a diagonal GGN Laplace over all weights, and
``SubnetworkLaplaceClassifier`` with each selection rule
(``largest_variance``, ``largest_variance_swag``, ``largest_magnitude``,
``random``, ``last_layer``). The net is trained once per task and shared
(``FrozenEstimator``); ``fit s`` is the post-hoc fit only (selection,
curvature, prior), ``predict s`` the test + OOD predictive.

Prior precision: ``"heldout"`` (the estimators' 33-value log grid 1e-4..1e4,
lowest NLL on a validation split of 20 % of the training rows, never the test
split), and ``"marglik"`` (the estimators' Laplace evidence; for a
subnetwork, that of the k-weight model). On images the diagonal posterior
over 1M weights is tuned on a 9-value grid (1e-2..1e6) by the benchmark
instead: there each value costs a predictive pass over the validation rows.
SWAG on images: 2 epochs, mini-batches of 64 (the defaults are 5 and 32).
``h = 0 in S``: the share of the chosen weights whose diagonal curvature on
the training data is zero (they never move the outputs there).

Metrics on the test split: accuracy, NLL, ECE (15 bins), OOD AUROC of the
predictive entropy. Peak memory: RSS above the level at the start, sampled
every 2 ms over fit + predict (``PeakMemory`` of ``benchmarks/_common.py``; on
CUDA the allocator's peak). A last table times one chunk of ``J[:, S]`` on
the CNN by skuq's route and by differentiating through a scatter into all
weights (the route that forms per-sample gradients of every weight).

Run: ``PYTHONPATH=. python benchmarks/subnetwork.py [--quick] [--device cpu]``;
writes ``benchmarks/results/subnetwork.{md,json}`` (``subnetwork_quick.*``
with ``--quick``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from torch import nn
from torch.func import jacrev, vmap

from skuq import LaplaceClassifier, MAPClassifier, SubnetworkLaplaceClassifier
from skuq.curvature import select_weights
from skuq.curvature.subnet_jacobians import subnetwork_jacobians
from skuq.datasets import load_digits_ood, make_synthetic_images
from skuq.laplace.subnetwork import LargestVarianceSWAG
from skuq.metrics import expected_calibration_error, negative_log_likelihood, ood_auroc
from skuq.nets import MLP

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, PeakMemory, classifier_net, write_results  # noqa: E402

#: pixel noise of the synthetic images; at 1.25-2.5 the CNN is still far from converged
#: after 4-6 epochs (accuracy 0.1-0.5), at 1.0 it reaches 0.97 in 6
NOISE = 1.0
RULES = ("largest_variance", "largest_variance_swag", "largest_magnitude", "random", "last_layer")

PROFILES = {
    "cpu": dict(
        digits=dict(hidden=(128, 128), epochs=50, lr=1e-3, priors=("heldout", "marglik")),
        images=dict(
            n=2000,
            epochs=6,
            lr=1e-3,
            noise=NOISE,
            priors=("heldout", "marglik"),
            diag_grid=True,
            swag=dict(n_epochs=2, batch_size=64),
        ),
    ),
    "quick": dict(
        digits=dict(hidden=(32, 32), epochs=5, lr=1e-2, priors=("heldout",)),
        images=dict(
            n=400,
            epochs=1,
            lr=1e-3,
            noise=NOISE,
            priors=("heldout",),
            diag_grid=True,
            swag=dict(n_epochs=1, batch_size=64),
        ),
    ),
}
#: the diagonal posterior over 1M weights has no cheap 33-value held-out grid (each value
#: is a pass over the validation rows); it is chosen on this grid by the benchmark
DIAG_GRID = tuple(float(v) for v in np.logspace(-2, 6, 9))
#: test and OOD rows of the images task
N_EVAL = 500


class WideCNN(nn.Sequential):
    """Two conv blocks and three dense layers: 1.07M weights, a 1290-weight last layer."""

    def __init__(self, n_outputs: int = 10):
        super().__init__(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 320),
            nn.ReLU(),
            nn.Linear(320, 128),
            nn.ReLU(),
            nn.Linear(128, n_outputs),
        )


def task(name: str, cfg: dict, seed: int) -> dict:
    if name == "digits":
        d = load_digits_ood(random_state=seed)
        X, y, X_test, y_test, X_ood = d.X_train, d.y_train, d.X_test, d.y_test, d.X_ood
        net = classifier_net(MLP, cfg, hidden=cfg["hidden"])
    else:
        d = make_synthetic_images(
            n_samples=cfg["n"], size=28, noise=cfg["noise"], random_state=seed
        )
        X, X_test, y, y_test = train_test_split(
            d.X, d.y, test_size=0.25, random_state=seed, stratify=d.y
        )
        X_test, y_test, X_ood = X_test[:N_EVAL], y_test[:N_EVAL], d.X_ood[:N_EVAL]
        net = classifier_net(WideCNN, cfg)
    X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    return dict(
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=X_test,
        y_test=y_test,
        X_ood=X_ood,
        net=net,
    )


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def evaluate(est, data, device, fit_kwargs=None) -> dict:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        if fit_kwargs is not None:
            est.fit(data["X_train"], data["y_train"], **fit_kwargs)
        t1 = time.perf_counter()
        p = est.predict_proba(data["X_test"])
        p_ood = est.predict_proba(data["X_ood"])
        t2 = time.perf_counter()
    y = data["y_test"]
    row = {
        "acc": float((est.classes_[p.argmax(1)] == y).mean()),
        "nll": negative_log_likelihood(y, p, labels=est.classes_),
        "ece": expected_calibration_error(y, p, labels=est.classes_),
        "auroc": ood_auroc(_entropy(p), _entropy(p_ood)),
        "fit_s": t1 - t0,
        "predict_s": t2 - t1,
        "peak_mb": mem.peak_mb,
    }
    for attr in ("n_params_", "prior_precision_"):
        if hasattr(est, attr):
            v = getattr(est, attr)
            row[attr.rstrip("_")] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(est, SubnetworkLaplaceClassifier):  # weights the training data never moves
        h = est.posterior_.H.diagonal()
        row["zero_curvature_share"] = float((h <= 1e-8 * h.max()).double().mean())
    return row


class GridDiagLaplace:
    """Diagonal Laplace over all weights, ``delta`` chosen on the validation split from a grid.

    Each grid value is a ``LaplaceClassifier`` fit (the curvature is computed once
    and cached) and a predictive pass over the validation rows; the fit time
    counts all of them.
    """

    def __init__(self, frozen, grid, X_val, y_val, **common):
        self.frozen, self.grid, self.X_val, self.y_val, self.common = (
            frozen,
            grid,
            X_val,
            y_val,
            common,
        )

    def fit(self, X, y):
        best = None
        for delta in self.grid:
            est = LaplaceClassifier(
                self.frozen,
                subset_of_weights="all",
                hessian_structure="diag",
                prior_precision=delta,
                **self.common,
            ).fit(X, y)
            nll = negative_log_likelihood(
                self.y_val, est.predict_proba(self.X_val), labels=est.classes_
            )
            if best is None or nll < best[0]:
                best = (nll, est)
        self.est_ = best[1]
        self.classes_, self.prior_precision_ = self.est_.classes_, self.est_.prior_precision_
        return self

    def predict_proba(self, X):
        return self.est_.predict_proba(X)


def run_task(name: str, cfg: dict, seed: int, device: torch.device) -> dict:
    data = task(name, cfg, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    bare = MAPClassifier(data["net"], random_state=seed, device=str(device))
    bare.fit(data["X_train"], data["y_train"])
    train_s = time.perf_counter() - t0
    model = bare.model_
    n_total = sum(p.numel() for p in model.parameters())
    k = int(sum(p.numel() for p in list(model.children())[-1].parameters()))
    frozen = FrozenEstimator(bare.net_)
    out = {
        "task": name,
        "n_params": n_total,
        "k": k,
        "train_s": train_s,
        "n_train": len(data["X_train"]),
        "rows": {},
    }
    print(f"[{name}] {n_total} weights, k = {k}, net trained in {train_s:.1f} s", flush=True)
    out["rows"]["MAP (bare net)"] = evaluate(bare, data, device)
    common = dict(random_state=seed, device=str(device))
    for prior in cfg["priors"]:
        cal = {"X_cal": data["X_val"], "y_cal": data["y_val"]} if prior == "heldout" else {}
        diag_label = f"diag Laplace, all {n_total} weights"
        if prior == "heldout" and cfg.get("diag_grid"):
            ests = {
                diag_label: (
                    GridDiagLaplace(frozen, DIAG_GRID, data["X_val"], data["y_val"], **common),
                    {},
                )
            }
        else:
            ests = {
                diag_label: (
                    LaplaceClassifier(
                        frozen,
                        subset_of_weights="all",
                        hessian_structure="diag",
                        prior_precision=prior,
                        **common,
                    ),
                    cal,
                )
            }
        for rule in RULES:
            sel = (
                LargestVarianceSWAG(**cfg["swag"])
                if rule.endswith("swag") and cfg.get("swag")
                else rule
            )
            ests[f"subnetwork {rule}"] = (
                SubnetworkLaplaceClassifier(
                    frozen,
                    subnetwork_size=k,
                    subnetwork_selection=sel,
                    prior_precision=prior,
                    **common,
                ),
                cal,
            )
        for label, (est, fit_kwargs) in ests.items():
            row = evaluate(est, data, device, fit_kwargs)
            row["prior_rule"] = prior
            out["rows"][f"{label} [{prior}]"] = row
            print(
                f"  {label} [{prior}]: nll {row['nll']:.3f} auroc {row['auroc']:.3f} "
                f"fit {row['fit_s']:.1f} s",
                flush=True,
            )
    return out


def jacobian_routes(device: torch.device, n_rows: int) -> list[dict]:
    """One chunk of J[:, S] on the CNN: skuq's route vs the scatter-into-all-weights route."""
    torch.manual_seed(0)
    model = WideCNN().to(device).eval()
    x = torch.randn(n_rows, 1, 28, 28, device=device)
    P = sum(p.numel() for p in model.parameters())
    idx = torch.sort(torch.randperm(P)[:1290]).values
    w = select_weights(model, "subnetwork", subnetwork_indices=idx)
    theta = w.vector()

    def scatter_route():
        def single(t, xi):
            return w.forward(t, xi.unsqueeze(0)).squeeze(0)

        return vmap(jacrev(single), in_dims=(None, 0))(theta, x)

    rows = []
    for label, fn in (
        ("skuq: layer outputs, selected columns only", lambda: subnetwork_jacobians(w, x)[0]),
        ("jacrev through a scatter into all weights", scatter_route),
    ):
        fn()  # warm-up
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            J = fn()
            dt = time.perf_counter() - t0
        rows.append(
            {
                "route": label,
                "rows": n_rows,
                "k": 1290,
                "n_params": P,
                "seconds": dt,
                "peak_mb": mem.peak_mb,
                "shape": list(J.shape),
            }
        )
        del J
    return rows


def markdown(results: list[dict], routes: list[dict], header: str) -> str:
    lines = [header]
    for res in results:
        lines += [
            "",
            f"## {res['task']}: {res['n_params']} weights, k = {res['k']}, "
            f"{res['n_train']} training rows (net trained in {res['train_s']:.1f} s)",
            "",
            "| method [prior] | acc | NLL | ECE | OOD AUROC | delta | h = 0 in S | fit s "
            "| predict s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in res["rows"].items():
            delta = r.get("prior_precision", float("nan"))
            delta = f"{delta:.3g}" if isinstance(delta, float) else "per layer"
            dead = r.get("zero_curvature_share")
            dead = "" if dead is None else f"{100 * dead:.0f} %"
            lines.append(
                f"| {label} | {r['acc']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} | "
                f"{r['auroc']:.3f} | {delta} | {dead} | {r['fit_s']:.2f} | "
                f"{r['predict_s']:.2f} | {r['peak_mb']:.0f} |"
            )
    lines += [
        "",
        "## One chunk of J[:, S] on the 1.07M-weight CNN (k = 1290)",
        "",
        "| route | rows | seconds | peak MB |",
        "|---|---|---|---|",
    ]
    for r in routes:
        lines.append(f"| {r['route']} | {r['rows']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    profile = PROFILES["quick" if args.quick else "cpu"]
    t0 = time.perf_counter()
    results = [run_task(name, cfg, args.seed, device) for name, cfg in profile.items()]
    routes = jacobian_routes(device, 4 if args.quick else 8)
    total = time.perf_counter() - t0
    cmd = "PYTHONPATH=. python benchmarks/subnetwork.py" + (" --quick" if args.quick else "")
    cpu = platform.processor() or platform.machine()
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {args.threads} torch threads ({cpu})"
    )
    header = (
        f"# Subnetwork inference vs diagonal Laplace over all weights\n\n`{cmd}`: seed "
        f"{args.seed}, {where}, total {total:.0f} s. Subnetworks: full-covariance GGN "
        "Laplace over k weights, GLM predictive with the centered-probit link (the "
        "default); the diagonal Laplace uses the same predictive."
    )
    table = markdown(results, routes, header)
    print(table)
    stem = "subnetwork_quick" if args.quick else "subnetwork"
    write_results(
        args.out_dir,
        stem,
        table,
        {
            "command": cmd,
            "seed": args.seed,
            "device": str(device),
            "total_s": total,
            "tasks": results,
            "jacobian_routes": routes,
        },
    )
    return {"tasks": results, "jacobian_routes": routes}


if __name__ == "__main__":
    main()
