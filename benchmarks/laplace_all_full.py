"""All-weights full-covariance Laplace of an MLP: time and peak memory per phase.

``LaplaceClassifier(subset_of_weights="all", hessian_structure="full")`` on an
MLP 64-h-h-10 (``--hidden``; h = 165 gives 39,775 weights, h = 60 gives 8,170)
trained on synthetic rows labelled by a random teacher net:

* **fit**: the dense GGN (``P x P``) and the posterior (nothing factorized yet:
  a fixed prior precision never needs the eigenvalues);
* **marglik**: ``H``'s eigenvalues, computed once without eigenvectors and
  cached, then the scalar prior precision maximizing the evidence, every
  evaluation from those eigenvalues (no factorization). When the training rows
  give fewer gradient rows (rows x classes) than a quarter of the weights, the
  fit already has the eigenvalues, from the Gram matrix of those rows
  (``skuq.curvature.gram``), and the column *eigenvalues* says so;
* **predict**: glm/probit probabilities of 500 rows at that prior precision --
  the Cholesky factor of the posterior precision, then ``J A`` per chunk.

Peak memory is the resident-set high-water mark (``VmHWM``, reset at the start
of each phase) above the resident set after the net and the data are loaded,
also as a multiple of the float32 covariance's own size ``4 P^2`` bytes. Each
size runs in a fresh process.

Run: ``PYTHONPATH=. python benchmarks/laplace_all_full.py --hidden 60 [--threads 2]
[--n-train 1000]``; writes ``benchmarks/results/laplace_all_full.{md,json}``
(results of earlier sizes in the JSON are kept, one row per size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, hwm_bytes, reset_hwm, rss_bytes, write_results  # noqa: E402

N_IN, N_OUT, N_TEST, BATCH = 64, 10, 500, 128


def make_net(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(N_IN, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, N_OUT),
    )


def make_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_IN)).astype(np.float32)
    W = np.random.default_rng(123).normal(size=(N_IN, N_OUT))
    y = (np.tanh(X @ W) + 0.3 * rng.normal(size=(n, N_OUT))).argmax(1)
    return X, y


def child(hidden: int, n_train: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from skuq import LaplaceClassifier
    from skuq.curvature.memory import available_memory, full_memory_bytes

    X, y = make_data(n_train, 0)
    X_test, y_test = make_data(N_TEST, 1)
    model = make_net(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y).long()
    for _ in range(30):
        for i in range(0, n_train, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    model.eval()
    P = sum(p.numel() for p in model.parameters())
    out = dict(
        hidden=hidden,
        n_params=P,
        n_train=n_train,
        n_test=N_TEST,
        threads=threads,
        covariance_mb=4 * P * P / 2**20,
        planned_mb=full_memory_bytes(P) / 2**20,
        available_mb_before=(available_memory("cpu") or 0) / 2**20,
        loadavg_before=os.getloadavg()[0],
    )
    est = LaplaceClassifier(
        model,
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=1.0,
        pred_type="glm",
        link_approx="probit",
        batch_size=BATCH,
    )
    phases = {}

    def run(name, fn):
        reset_hwm()
        base = rss_bytes()
        t = time.perf_counter()
        fn()
        out[f"{name}_s"] = time.perf_counter() - t
        phases[name] = (hwm_bytes() - base) / 2**20

    run("fit", lambda: est.fit(X, y))
    # eigenvalues at hand after fit: the curvature's, from the Gram matrix of its rows
    out["gram_rows"] = est.posterior_._eigvals is not None
    run("marglik", lambda: est.posterior_.optimize_prior_precision())
    proba = []
    run("predict", lambda: proba.append(est.predict_proba(X_test)))
    p = proba[0].astype(np.float64)
    out.update(
        prior_precision=float(est.posterior_.prior_precision),
        nll=float(-np.log(np.clip(p[np.arange(N_TEST), y_test], 1e-12, None)).mean()),
        accuracy=float((p.argmax(1) == y_test).mean()),
        peak_mb=phases,
        peak_over_covariance={k: v / out["covariance_mb"] for k, v in phases.items()},
        loadavg_after=os.getloadavg()[0],
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", default="60", help="hidden widths, comma-separated")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10800)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    path = RESULTS / "laplace_all_full.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = (
        "PYTHONPATH=. python benchmarks/laplace_all_full.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    for h in [int(v) for v in args.hidden.split(",")]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            json.dumps([h, args.n_train, args.threads]),
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            if res.returncode != 0:
                row = dict(hidden=h, error=res.stderr.strip().splitlines()[-1][:400])
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = dict(hidden=h, error=f"timed out after {args.timeout:.0f} s")
        row.update(command=command, torch=torch.__version__, python=platform.python_version())
        print(row, flush=True)
        rows = [r for r in rows if r.get("hidden") != h or r.get("n_train") != args.n_train]
        rows.append(row)
    write(rows)


def write(rows: list[dict]) -> None:
    lines = [
        "# All-weights full-covariance Laplace: time and peak memory\n",
        "MLP 64-h-h-10 on synthetic rows (random teacher), glm/probit predictive of 500 "
        "rows; each size in a fresh process, on a machine shared with other jobs (the "
        "1-minute load average is given; timings are noisy, memory is not). *Peak MB*: "
        "VmHWM during the phase above the resident set at its start; *× cov*: that peak "
        "over the float32 covariance's own size, 4 P² bytes. *fit*: the dense GGN; "
        "*marglik*: its eigenvalues (once, cached) and the evidence's scalar prior "
        "precision from them; *eigenvalues*: computed from H in the marglik phase, or "
        "already in the fit from the Gram matrix of the gradient rows (training rows x "
        "10 classes, when that is under a quarter of the weights); *predict*: the "
        "Cholesky factor at that prior precision and the predictive of the rows.\n",
        "| weights | train rows | threads | load avg | eigenvalues | fit s | marglik s | "
        "predict s | "
        "peak MB fit / marglik / predict | × cov fit / marglik / predict | cov MB | δ | "
        "NLL | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.get("n_params", 0)):
        if "error" in r:
            lines.append(
                f"| h={r['hidden']} | | | | | {r['error'].replace('|', '/')} | | | | | "
                f"| | | `{r['command']}` |"
            )
            continue
        pk, ratio = r["peak_mb"], r["peak_over_covariance"]
        eig = "Gram (fit)" if r.get("gram_rows") else "H (marglik)"
        lines.append(
            f"| {r['n_params']:,} | {r['n_train']:,} | {r['threads']} | "
            f"{r['loadavg_before']:.1f} | {eig} | {r['fit_s']:.1f} | {r['marglik_s']:.2f} | "
            f"{r['predict_s']:.1f} | {pk['fit']:.0f} / {pk['marglik']:.0f} / "
            f"{pk['predict']:.0f} | {ratio['fit']:.2f} / {ratio['marglik']:.2f} / "
            f"{ratio['predict']:.2f} | {r['covariance_mb']:.0f} | {r['prior_precision']:.3g} | "
            f"{r['nll']:.4f} | `{r['command']}` |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(RESULTS, "laplace_all_full", text, dict(rows=rows), json_end="\n")


if __name__ == "__main__":
    main()
