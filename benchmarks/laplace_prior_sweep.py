"""Is there a prior precision at which Laplace beats the bare net on NLL *and* OOD AUROC?

The question behind ``LaplaceClassifier``'s default. For the comparison's
tasks (``benchmarks/compare.py``: same data, nets, training and validation
split), each Laplace structure is fitted once on a trained net and its GLM
predictive evaluated over a log grid of prior precisions ``delta``, with three
ways of turning the Gaussian over the logits into probabilities:

* ``probit``: laplace-torch's link, ``softmax(kappa * mean)`` with
  ``kappa_k = (1 + pi/8 Sigma_kk)^(-1/2)``;
* ``centered``: the same probit applied to ``P f ~ N(P m, P Sigma P)`` with
  ``P = I - 11^T/C`` (``link_approx="centered_probit"``, skuq's default, from
  the predictive's ``centered_covariance``). Softmax ignores a shift shared
  by all logits, so ``f`` and ``Pf`` give the same distribution of
  probabilities; the probit does not, and counts the shared-shift variance
  (which only the prior bounds: the likelihood has no curvature along it)
  as uncertainty;
* ``mc``: 2,000 draws from the Gaussian, the ground truth the two links
  approximate.

Per task and structure the table gives the bare net's test NLL and AUROC,
the ``delta`` a held-out choice makes (lowest validation NLL, centered link, as
``prior_precision="heldout"`` does),
the best test NLL over the grid, and whether *any* grid value beats the bare
net on both test metrics (read off the test split, so an upper bound on what
a prior choice could do; nothing here tunes a default).

Run: ``PYTHONPATH=. python benchmarks/laplace_prior_sweep.py [--quick]``;
writes ``benchmarks/results/laplace_prior_sweep.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the comparison's tasks, nets and splits)
from _common import RESULTS, entropy, write_results  # noqa: E402

from skuq import LaplaceClassifier, MAPClassifier  # noqa: E402
from skuq.metrics import negative_log_likelihood, ood_auroc  # noqa: E402
from skuq.outputs import probit_probabilities  # noqa: E402

STRUCTURES = (("last_layer", "kron"), ("all", "diag"), ("all", "kron"))
LINKS = ("probit", "centered", "mc")
N_MC = 2000


def link_probabilities(dist, seed: int) -> dict:
    """``{link: probabilities}`` for a Gaussian predictive over logits (rows, C)."""
    dist = dist.to(torch.float64)
    mean, cov = dist.mean, dist.covariance
    centered = dist.centered_covariance
    eigvals, Q = torch.linalg.eigh(centered)
    root = Q * eigvals.clamp_min(0).sqrt().unsqueeze(-2)  # P Sigma P = root root^T
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N_MC, *mean.shape, generator=gen, dtype=mean.dtype)
    draws = mean + torch.einsum("bij,sbj->sbi", root, z)  # softmax(f) = softmax(P f)
    return {
        "probit": probit_probabilities(mean, torch.diagonal(cov, dim1=1, dim2=2)).numpy(),
        "centered": dist.probabilities("centered_probit").numpy(),
        "mc": torch.softmax(draws, -1).mean(0).numpy(),
    }


def sweep(task: str, seed: int, cfg: dict, grid: np.ndarray, log) -> dict:
    data = getattr(compare, f"task_{task}")(seed, cfg)
    bare = MAPClassifier(clone(data.net), random_state=seed).fit(data.X_train, data.y_train)
    labels = bare.classes_
    base = {
        "nll": negative_log_likelihood(data.y_test, bare.predict_proba(data.X_test), labels=labels),
        "auroc": ood_auroc(
            bare.predict_uncertainty(data.X_test), bare.predict_uncertainty(data.X_ood)
        ),
    }
    out = {"bare": base, "structures": {}}
    for subset, structure in STRUCTURES:
        t = time.perf_counter()
        est = LaplaceClassifier(
            FrozenEstimator(bare.net_),
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=1.0,
            random_state=seed,
        ).fit(data.X_train, data.y_train)
        rows = []
        for delta in grid:
            est.posterior_.set_hyperparameters(prior_precision=float(delta))
            val = link_probabilities(est.predict_distribution(data.X_val), seed)
            test = link_probabilities(est.predict_distribution(data.X_test), seed)
            ood = link_probabilities(est.predict_distribution(data.X_ood), seed)
            row = {"delta": float(delta)}
            for link in LINKS:
                row[link] = {
                    "val_nll": negative_log_likelihood(data.y_val, val[link], labels=labels),
                    "nll": negative_log_likelihood(data.y_test, test[link], labels=labels),
                    "auroc": ood_auroc(entropy(test[link]), entropy(ood[link])),
                }
            rows.append(row)
        out["structures"][f"{subset},{structure}"] = rows
        log(f"  {task} seed {seed} {subset},{structure}: {time.perf_counter() - t:.1f}s")
    return out


def summarize(runs: dict) -> dict:
    """Per task, structure and link: what the grid offers against the bare net."""
    summary = {}
    for task, per_seed in runs.items():
        for key in per_seed[0]["structures"]:
            for link in LINKS:
                cells = []
                for run in per_seed:
                    base, rows = run["bare"], run["structures"][key]
                    held = min(rows, key=lambda r: r["centered"]["val_nll"])
                    best = min(rows, key=lambda r: r[link]["nll"])
                    both = [
                        r["delta"]
                        for r in rows
                        if r[link]["nll"] < base["nll"] and r[link]["auroc"] > base["auroc"]
                    ]
                    cells.append(
                        dict(
                            bare_nll=base["nll"],
                            bare_auroc=base["auroc"],
                            heldout_delta=held["delta"],
                            best_nll=best[link]["nll"],
                            best_nll_delta=best["delta"],
                            auroc_at_best=best[link]["auroc"],
                            max_auroc=max(r[link]["auroc"] for r in rows),
                            n_both=len(both),
                            # distance to the ground truth (MC), averaged over the grid
                            nll_gap_to_mc=float(
                                np.mean([abs(r[link]["nll"] - r["mc"]["nll"]) for r in rows])
                            ),
                            auroc_gap_to_mc=float(
                                np.mean([abs(r[link]["auroc"] - r["mc"]["auroc"]) for r in rows])
                            ),
                        )
                    )
                summary[(task, key, link)] = cells
    return summary


def markdown(summary: dict, grid: np.ndarray, header: str) -> str:
    lines = [
        header,
        "",
        f"Grid: {len(grid)} values of delta from {grid[0]:.0e} to {grid[-1]:.0e}. "
        "Cells are means over seeds; 'seeds with a delta beating both' counts the seeds "
        "where at least one grid value has test NLL below and OOD AUROC above the bare "
        "net's; 'gap to MC' is the mean over the grid of |metric(link) - metric(MC)|.",
        "",
        "| task | structure | link | bare NLL | bare AUROC | held-out delta | best NLL "
        "(delta) | AUROC there | max AUROC | seeds with a delta beating both "
        "| NLL gap to MC | AUROC gap to MC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, key, link), cells in summary.items():

        def mean(name, cells=cells):
            return float(np.mean([c[name] for c in cells]))

        held = float(np.exp(np.mean([np.log(c["heldout_delta"]) for c in cells])))
        best_delta = float(np.exp(np.mean([np.log(c["best_nll_delta"]) for c in cells])))
        n_both = sum(c["n_both"] > 0 for c in cells)
        lines.append(
            f"| {task} | {key} | {link} | {mean('bare_nll'):.3f} | {mean('bare_auroc'):.3f} | "
            f"{held:.2g} | {mean('best_nll'):.3f} ({best_delta:.2g}) | "
            f"{mean('auroc_at_best'):.3f} | {mean('max_auroc'):.3f} | {n_both}/{len(cells)} | "
            f"{mean('nll_gap_to_mc'):.3f} | {mean('auroc_gap_to_mc'):.3f} |"
        )
    return "\n".join(lines) + "\n"


PROFILES = {
    "full": dict(
        tasks={"digits": 3, "breast_cancer": 3, "wine": 3, "images": 2}, grid=np.logspace(-3, 4, 15)
    ),
    "quick": dict(tasks={"digits": 1}, grid=np.logspace(-1, 3, 3)),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one task, one seed, 3 values")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    profile = PROFILES["quick" if args.quick else "full"]
    cfgs = compare.PROFILES["quick" if args.quick else "cpu"]
    grid = profile["grid"]
    t0 = time.perf_counter()
    runs = {
        task: [sweep(task, seed, cfgs[task], grid, print) for seed in range(n_seeds)]
        for task, n_seeds in profile["tasks"].items()
    }
    cmd = "PYTHONPATH=. python benchmarks/laplace_prior_sweep.py" + (
        " --quick" if args.quick else ""
    )
    header = (
        "# Laplace over a grid of prior precisions: NLL and OOD AUROC against the bare net\n\n"
        f"`{cmd}`: the comparison's tasks and nets (cpu profile), torch 1 thread; "
        f"{time.perf_counter() - t0:.0f} s. See the module docstring for the three links."
    )
    summary = summarize(runs)
    table = markdown(summary, grid, header)
    print(table)
    stem = "laplace_prior_sweep" + ("_quick" if args.quick else "")
    write_results(args.out_dir, stem, table, {"command": cmd, "grid": grid.tolist(), "runs": runs})
    return {"runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
