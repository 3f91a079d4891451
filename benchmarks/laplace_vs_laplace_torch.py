"""skuq's Laplace engine side by side with laplace-torch 0.3 on the same trained nets.

For every (subset_of_weights, hessian_structure) that both libraries support,
each library, in a fresh process, on the same trained weights and data:

* fit: curvature over the training set and the posterior (prior precision 1);
* prior optimization: the scalar marginal-likelihood prior precision
  (laplace-torch: its default Adam, 100 steps on log delta; skuq: L-BFGS);
* predict: glm/probit class probabilities on the test set;
* peak memory: the growth of the process's peak resident set size
  (``resource.getrusage(...).ru_maxrss``) over fit + prior + predict, measured
  in a fresh process after loading the net and the data (torch's CPU
  allocations are invisible to tracemalloc, so RSS is the honest measure);
* NLL and ECE of the predictions.

Nets: the digits MLP 64-128-128-5 (``load_digits_ood``) and a 1.07M-parameter
MLP 784-1024-256-10 on 28x28 synthetic images (``make_synthetic_images``,
12,000 training rows; 3,000 with ``--quick``).

Run: ``PYTHONPATH=. python benchmarks/laplace_vs_laplace_torch.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "digits": [("all", "diag"), ("all", "kron"), ("last_layer", "kron"),
               ("last_layer", "full"), ("last_layer", "diag")],
    "images": [("all", "diag"), ("all", "kron"), ("last_layer", "kron"),
               ("last_layer", "full"), ("last_layer", "diag")],
}


def make_net(task: str) -> nn.Module:
    if task == "digits":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 5))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def load_task(task: str, quick: bool):
    if task == "digits":
        from skuq.datasets import load_digits_ood

        d = load_digits_ood()
        return d.X_train, d.y_train, d.X_test, d.y_test
    from skuq.datasets import make_synthetic_images

    n_train = 3000 if quick else 12000
    n_test = 500 if quick else 1000
    d = make_synthetic_images(n_train + n_test, noise=1.0, random_state=0)
    return d.X[:n_train], d.y[:n_train], d.X[n_train:], d.y[n_train:]


def train(task: str, quick: bool, path: str) -> None:
    X, y, _, _ = load_task(task, quick)
    torch.manual_seed(0)
    model = make_net(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    epochs = 30 if task == "digits" else (2 if quick else 4)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)


# ------------------------------------------------------------------ one child run
def child(lib: str, task: str, subset: str, structure: str, quick: bool, path: str) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from skuq.metrics import expected_calibration_error, negative_log_likelihood

    X, y, X_test, y_test = load_task(task, quick)
    model = make_net(task)
    model.load_state_dict(torch.load(path))
    model.eval()
    Xt, yt, Xs = torch.as_tensor(X), torch.as_tensor(y), torch.as_tensor(X_test)
    bs = 128
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    if lib == "skuq":
        from skuq import LaplaceClassifier

        est = LaplaceClassifier(model, subset_of_weights=subset, hessian_structure=structure,
                                prior_precision=1.0, batch_size=bs, device="cpu")
        t = time.perf_counter()
        est.fit(X, y)
        out["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        est.posterior_.optimize_prior_precision()
        out["prior_s"] = time.perf_counter() - t
        out["prior_precision"] = float(est.posterior_.prior_precision)
        t = time.perf_counter()
        proba = est.predict_proba(X_test)
        out["predict_s"] = time.perf_counter() - t
    else:
        from laplace import Laplace

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt, yt),
                                             batch_size=bs)
        t = time.perf_counter()
        la = Laplace(model, "classification", subset_of_weights=subset,
                     hessian_structure=structure, prior_precision=1.0)
        la.fit(loader)
        out["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        la.optimize_prior_precision(method="marglik", pred_type="glm")
        out["prior_s"] = time.perf_counter() - t
        out["prior_precision"] = float(la.prior_precision)
        t = time.perf_counter()
        parts = [la(Xs[i : i + bs], pred_type="glm", link_approx="probit").detach()
                 for i in range(0, len(Xs), bs)]
        proba = torch.cat(parts).double().numpy()
        out["predict_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    proba = proba / proba.sum(1, keepdims=True)
    out["nll"] = negative_log_likelihood(y_test, proba, labels=np.unique(y))
    out["ece"] = expected_calibration_error(y_test, proba, labels=np.unique(y))
    return out


def run_child(args, timeout) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout}s"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1][:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=6)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--tasks", default="digits,images")
    args = parser.parse_args()
    if args.child:
        lib, task, subset, structure, quick, path = args.child
        print(json.dumps(child(lib, task, subset, structure, quick == "1", path)))
        return
    tasks = args.tasks.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            path = os.path.join(tmp, f"{task}.pt")
            train(task, args.quick, path)
            n_params = sum(p.numel() for p in make_net(task).parameters())
            configs = CONFIGS[task][:2] + CONFIGS[task][2:3] if args.quick else CONFIGS[task]
            for subset, structure in configs:
                res = {}
                for lib in ("skuq", "laplace-torch"):
                    res[lib] = run_child([lib, task, subset, structure, str(int(args.quick)),
                                          path], args.timeout)
                    print(task, subset, structure, lib, res[lib], flush=True)
                rows.append(dict(task=task, n_params=n_params, subset=subset,
                                 structure=structure, **{f"{k}_{lib}": v for lib, r in res.items()
                                                          for k, v in r.items()}))
    write(rows, args.quick)


def _fmt(v, spec=".3f"):
    return "-" if v is None else (v if isinstance(v, str) else format(v, spec))


def write(rows, quick) -> None:
    lines = [
        "| task (P) | subset / structure | fit+predict s skuq / l-t (speed-up) | prior s skuq / "
        "l-t | peak RSS MB skuq / l-t | NLL skuq / l-t | ECE skuq / l-t | delta skuq / l-t |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, l = "skuq", "laplace-torch"
        if f"error_{s}" in r or f"error_{l}" in r:
            lines.append(f"| {r['task']} ({r['n_params']:,}) | {r['subset']} / {r['structure']} "
                         f"| skuq: {r.get('error_' + s, 'ok')}; l-t: {r.get('error_' + l, 'ok')} "
                         "| | | | | |")
            continue
        a = r[f"fit_s_{s}"] + r[f"predict_s_{s}"]
        b = r[f"fit_s_{l}"] + r[f"predict_s_{l}"]
        r["speedup_fit_predict"] = b / a
        lines.append(
            f"| {r['task']} ({r['n_params']:,}) | {r['subset']} / {r['structure']} | "
            f"{a:.2f} / {b:.2f} ({b / a:.1f}x) | {r[f'prior_s_{s}']:.2f} / "
            f"{r[f'prior_s_{l}']:.2f} | {r[f'peak_rss_mb_{s}']:.0f} / "
            f"{r[f'peak_rss_mb_{l}']:.0f} | {r[f'nll_{s}']:.4f} / {r[f'nll_{l}']:.4f} | "
            f"{r[f'ece_{s}']:.4f} / {r[f'ece_{l}']:.4f} | {r[f'prior_precision_{s}']:.3g} / "
            f"{r[f'prior_precision_{l}']:.3g} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    name = "laplace_vs_laplace_torch" + ("_quick" if quick else "")
    threads = os.environ.get("BENCH_THREADS", "2")
    header = (f"# skuq vs laplace-torch 0.3 (CPU, {threads} threads, torch "
              f"{torch.__version__})\n\nPeak memory: growth of ru_maxrss in a fresh process. "
              "Both libraries: same trained weights, data, glm/probit predictive, marglik "
              "prior.\n\n")
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
