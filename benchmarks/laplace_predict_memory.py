"""Peak memory of Laplace prediction against the number of rows predicted, per structure.

Every (subset_of_weights, hessian_structure) pair of ``LaplaceClassifier``
(glm predictive, probit link) is fitted on 1,000 rows of a small synthetic
task (MLP 8-16-16-5, 501 weights; last layer 85) and then predicts 1k, 10k, 30k and 100k
rows, each (configuration, rows) in a fresh process. Peak memory is the
kernel's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the fit and after the rows to predict are
drawn), above the resident set at that point: torch's allocations are invisible
to tracemalloc. Prediction runs in batches of ``batch_size`` rows, so the peak
should not grow with the rows, apart from the returned probabilities (8 bytes x
5 classes per row: 4 MB at 100k rows).

Run: ``PYTHONPATH=. python benchmarks/laplace_predict_memory.py [--rows 1000,10000]``;
writes ``benchmarks/results/laplace_predict_memory.{md,json}``.
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

CONFIGS = [
    ("all", "diag"),
    ("all", "kron"),
    ("all", "full"),
    ("all", "lowrank"),
    ("last_layer", "diag"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
]
ROWS = [1_000, 10_000, 30_000, 100_000]
N_TRAIN, N_IN, N_OUT, BATCH = 1_000, 8, 5, 256


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(N_IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, N_OUT)
    )


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows labelled by a fixed random teacher net (classes by its argmax)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_IN)).astype(np.float32)
    g = torch.Generator().manual_seed(123)
    W = torch.randn(N_IN, N_OUT, generator=g).numpy()
    y = (X @ W + 0.5 * rng.normal(size=(n, N_OUT))).argmax(1)
    return X, y


def child(subset: str, structure: str, rows: int) -> dict:
    torch.set_num_threads(1)
    from skuq import LaplaceClassifier

    X, y = make_data(N_TRAIN, 0)
    model = make_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y).long()
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(Xt), yt).backward()
        opt.step()
    est = LaplaceClassifier(
        model,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=1.0,
        pred_type="glm",
        link_approx="probit",
        batch_size=BATCH,
        random_state=0,
    )
    est.fit(X, y)
    est.predict_proba(X[:BATCH])  # first-call code paths and caches, before the baseline
    X_pred, _ = make_data(rows, 1)
    reset_hwm()
    base = rss_bytes()
    t = time.perf_counter()
    proba = est.predict_proba(X_pred)
    seconds = time.perf_counter() - t
    peak = hwm_bytes()
    return dict(
        subset=subset,
        structure=structure,
        rows=rows,
        peak_mb=(peak - base) / 2**20,
        output_mb=proba.nbytes / 2**20,
        predict_s=seconds,
        n_params=est.n_params_,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for subset, structure in CONFIGS:
        for n in rows:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                json.dumps([subset, structure, n]),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if res.returncode != 0:
                out = dict(
                    subset=subset,
                    structure=structure,
                    rows=n,
                    error=res.stderr.strip().splitlines()[-1][:300],
                )
            else:
                out = json.loads(res.stdout.strip().splitlines()[-1])
            print(out, flush=True)
            results.append(out)
    meta = dict(
        rows=rows,
        n_train=N_TRAIN,
        batch_size=BATCH,
        torch=torch.__version__,
        python=platform.python_version(),
        total_s=time.perf_counter() - t0,
        command="PYTHONPATH=. python benchmarks/laplace_predict_memory.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    )
    write(results, meta)


def write(results: list[dict], meta: dict) -> None:
    rows = meta["rows"]
    lines = [
        "# Laplace predict: peak memory against the rows predicted\n",
        f"Command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min), torch "
        f"{meta['torch']}, 1 torch thread. MLP 8-16-16-5 (501 weights; last layer 85) "
        f"fitted on {meta['n_train']:,} rows; glm/probit `predict_proba` in batches of "
        f"{meta['batch_size']} rows. *Peak MB*: the resident-set high-water mark (VmHWM) "
        "during prediction above the resident set before it, in a fresh process per cell; "
        "*out MB*: the returned probabilities themselves (part of the peak).\n",
        "| subset / structure | "
        + " | ".join(f"{n:,} rows: peak MB (s)" for n in rows)
        + " | out MB at the most rows |",
        "|---|" + "---|" * (len(rows) + 1),
    ]
    for subset, structure in CONFIGS:
        cells, out_mb = [], ""
        for n in rows:
            r = next(
                x
                for x in results
                if (x["subset"], x["structure"], x["rows"]) == (subset, structure, n)
            )
            if "error" in r:
                cells.append("error: " + r["error"].replace("|", "/"))
                continue
            cells.append(f"{r['peak_mb']:.1f} ({r['predict_s']:.1f})")
            out_mb = f"{r['output_mb']:.1f}"
        lines.append(f"| {subset} / {structure} | " + " | ".join(cells) + f" | {out_mb} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(
        RESULTS, "laplace_predict_memory", text, dict(meta=meta, results=results), json_end="\n"
    )


if __name__ == "__main__":
    main()
