"""Amortized RegVar: cost as the network grows, and quality on the digits OOD split.

Scaling. MLPs 64-w-w-5 on the digits (0-4) training split, w doubling up to
1024 (1.1M weights). For each, the net is trained once (Adam) and every method
gets it frozen: amortized RegVar (defaults: two 5-epoch fine-tunes of all
weights), K-FAC Laplace over all weights (marginal-likelihood prior) and the
full GGN Laplace over all weights (only while P <= FULL_MAX_PARAMS: its P x P
matrix and eigendecomposition grow as P^2 and P^3). Timed: ``fit`` (the
post-hoc part; the net is already trained) and ``predict_proba`` on the test
and OOD rows. The paper claims linear scaling in network size: the slope of
log(fit time) against log(P) is fitted (least squares) over all sizes and over
the three largest, where fixed per-call costs (Python, skorch, small kernels) no
longer dominate.

Quality. MLP 64-64-64-5 (Adam lr 1e-3, batch 64, weight decay 1e-4) trained on
80 % of the training split; the other 20 % is the validation split that picks
Laplace's held-out prior and RegVar's ``variance_scale`` (log grid, NLL).
Nothing is tuned on the test split. Metrics: accuracy, NLL, ECE (15 bins), OOD
AUROC (test rows vs digits 5-9) of the predictive entropy and of the logit
variance (the bare net has none: 0.5).

Run: ``PYTHONPATH=. python benchmarks/regvar_scaling.py [--quick] [--seeds N]``;
writes ``benchmarks/results/regvar_scaling.{md,json,png}`` (``_quick`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split

from skuq import LaplaceClassifier, MAPClassifier, RegVarClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import expected_calibration_error, negative_log_likelihood, ood_auroc
from skuq.nets import MLP

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, classifier_net, timed, write_results  # noqa: E402

FULL_MAX_PARAMS = 4_000
WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_WIDTHS = (8, 16, 64, 128)
SCALE_GRID = np.logspace(-4, 6, 41)

#: scaling methods: label -> constructor around the frozen net (None: skipped for this P)
SCALING = {
    "RegVar amortized": lambda net, p: RegVarClassifier(net, mode="amortized", random_state=0),
    "K-FAC Laplace, all weights": lambda net, p: LaplaceClassifier(
        net,
        subset_of_weights="all",
        hessian_structure="kron",
        prior_precision="marglik",
        random_state=0,
    ),
    "full Laplace, all weights": lambda net, p: (
        None
        if p > FULL_MAX_PARAMS
        else LaplaceClassifier(
            net,
            subset_of_weights="all",
            hessian_structure="full",
            prior_precision="marglik",
            random_state=0,
        )
    ),
}


def _net(hidden, epochs, weight_decay=1e-4):
    return classifier_net(
        MLP, dict(lr=1e-3, epochs=epochs, weight_decay=weight_decay), hidden=hidden
    )


def scaling(widths, epochs, device) -> list[dict]:
    d = load_digits_ood()
    X_pred = np.concatenate([d.X_test, d.X_ood])
    rows = []
    for w in widths:
        bare, train_s = timed(
            lambda w=w: MAPClassifier(_net((w, w), epochs), random_state=0, device=device).fit(
                d.X_train, d.y_train
            )
        )
        n_params = sum(p.numel() for p in bare.model_.parameters())
        row = {"width": w, "n_params": n_params, "train_s": train_s}
        for label, make in SCALING.items():
            est = make(FrozenEstimator(bare.net_), n_params)
            if est is None:
                row[label] = None
                continue
            est.set_params(device=device)
            _, fit_s = timed(lambda est=est: est.fit(d.X_train, d.y_train))
            _, pred_s = timed(lambda est=est: est.predict_proba(X_pred))
            row[label] = {"fit_s": fit_s, "predict_s": pred_s}
        print(
            f"  width {w:5d}  P {n_params:9d}  train {train_s:6.2f}s  "
            + "  ".join(
                f"{k.split(',')[0]}: fit {v['fit_s']:.2f}s pred {v['predict_s']:.2f}s"
                for k, v in row.items()
                if isinstance(v, dict)
            ),
            flush=True,
        )
        rows.append(row)
    return rows


def slope(rows, label, key="fit_s", largest=None) -> float:
    """Least-squares slope of log(time) on log(P), over all sizes or the ``largest`` few."""
    pts = [(r["n_params"], r[label][key]) for r in rows if r[label] is not None]
    pts = pts[-largest:] if largest else pts
    if len(pts) < 2:
        return float("nan")
    p, t = np.log(np.array(pts)).T
    return float(np.polyfit(p, t, 1)[0])


def _metrics(est, d) -> dict:
    p = est.predict_proba(d.X_test)
    return {
        "acc": float((est.classes_[p.argmax(1)] == d.y_test).mean()),
        "nll": negative_log_likelihood(d.y_test, p),
        "ece": expected_calibration_error(d.y_test, p),
        "auroc": ood_auroc(est.predict_uncertainty(d.X_test), est.predict_uncertainty(d.X_ood)),
        "auroc_var": ood_auroc(
            est.predict_uncertainty(d.X_test, "variance"),
            est.predict_uncertainty(d.X_ood, "variance"),
        ),
    }


def _heldout_scale(est, X_val, y_val) -> float:
    """The ``variance_scale`` of the grid with the lowest validation NLL (read at predict
    time: no refit)."""
    nll = []
    for s in SCALE_GRID:
        est.set_params(variance_scale=float(s))
        nll.append(negative_log_likelihood(y_val, est.predict_proba(X_val)))
    best = float(SCALE_GRID[int(np.argmin(nll))])
    est.set_params(variance_scale=best)
    return best


def quality(seed, epochs, device) -> dict:
    d = load_digits_ood()
    X_tr, X_val, y_tr, y_val = train_test_split(
        d.X_train, d.y_train, test_size=0.2, random_state=seed, stratify=d.y_train
    )
    bare = MAPClassifier(_net((64, 64), epochs), random_state=seed, device=device).fit(X_tr, y_tr)
    frozen = FrozenEstimator(bare.net_)
    out = {"MAP (bare net)": {**_metrics(bare, d), "fit_s": 0.0}}
    rv, fit_s = timed(
        lambda: RegVarClassifier(frozen, mode="amortized", random_state=seed, device=device).fit(
            X_tr, y_tr
        )
    )
    out["RegVar amortized (defaults)"] = {**_metrics(rv, d), "fit_s": fit_s}
    scale = _heldout_scale(rv, X_val, y_val)
    out["RegVar amortized, held-out variance_scale"] = {
        **_metrics(rv, d),
        "fit_s": fit_s,
        "variance_scale": scale,
    }
    for label, kw in {
        "Laplace (defaults)": {},
        "K-FAC Laplace, all weights, marglik": dict(
            subset_of_weights="all", prior_precision="marglik"
        ),
    }.items():
        est, fit_s = timed(
            lambda kw=kw: LaplaceClassifier(frozen, random_state=seed, device=device, **kw).fit(
                X_tr, y_tr, **({} if kw else {"X_cal": X_val, "y_cal": y_val})
            )
        )
        out[label] = {**_metrics(est, d), "fit_s": fit_s}
    return out


def markdown(scal, runs, header) -> str:
    lines = [
        header,
        "",
        "## Cost as the network grows",
        "",
        "| width | weights P | train s | "
        + " | ".join(f"{k} fit s | {k} predict s" for k in SCALING)
        + " |",
        "|---|---|---|" + "---|---|" * len(SCALING),
    ]
    for r in scal:
        cells = []
        for k in SCALING:
            v = r[k]
            cells += ["n/a", "n/a"] if v is None else [f"{v['fit_s']:.2f}", f"{v['predict_s']:.2f}"]
        lines.append(
            f"| {r['width']} | {r['n_params']:,} | {r['train_s']:.2f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Slope of log(fit time) on log(P) (1 = linear):", ""]
    for k in SCALING:
        lines.append(
            f"- {k}: {slope(scal, k):.2f} over all sizes, "
            f"{slope(scal, k, largest=3):.2f} over the three largest"
        )
    lines.append(f"- training the net (reference): {_train_slope(scal):.2f} over all sizes")
    lines += [
        "",
        "## Quality on the digits OOD split",
        "",
        "| method | acc | NLL | ECE | OOD AUROC (entropy) | OOD AUROC (logit variance) | fit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in runs[0]:
        rows = [r[label] for r in runs]

        def cell(key, fmt, rows=rows):
            v = np.array([r[key] for r in rows])
            return f"{v.mean():{fmt}} ± {v.std():{fmt}}"

        lines.append(
            f"| {label} | {cell('acc', '.3f')} | {cell('nll', '.3f')} | "
            f"{cell('ece', '.3f')} | {cell('auroc', '.3f')} | "
            f"{cell('auroc_var', '.3f')} | {cell('fit_s', '.2f')} |"
        )
    scales = [r["RegVar amortized, held-out variance_scale"]["variance_scale"] for r in runs]
    lines += ["", "Held-out variance_scale per seed: " + ", ".join(f"{s:.3g}" for s in scales)]
    return "\n".join(lines) + "\n"


def _train_slope(scal) -> float:
    p, t = np.log(np.array([(r["n_params"], r["train_s"]) for r in scal])).T
    return float(np.polyfit(p, t, 1)[0])


def plot(scal, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes, ("fit_s", "predict_s"), ("fit (post-hoc)", "predict_proba"), strict=True
    ):
        for k in SCALING:
            pts = [(r["n_params"], r[k][key]) for r in scal if r[k] is not None]
            if pts:
                p, t = np.array(pts).T
                lab = (
                    f"{k} (slope {slope(scal, k, key):.2f} all, "
                    f"{slope(scal, k, key, largest=3):.2f} largest 3)"
                )
                ax.loglog(p, t, "o-", label=lab)
        p_all = np.array([r["n_params"] for r in scal], dtype=float)
        last = scal[-1]["RegVar amortized"][key]
        ax.loglog(p_all, last * p_all / p_all[-1], ":", color="grey", label="linear in P")
        if key == "fit_s":
            p = [r["n_params"] for r in scal]
            ax.loglog(
                p,
                [r["train_s"] for r in scal],
                "k--",
                alpha=0.5,
                label=f"training the net (slope {_train_slope(scal):.2f})",
            )
        ax.set_xlabel("weights P")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 small widths, 1 seed, 3 epochs (smoke run)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    widths, seeds, epochs = (
        (QUICK_WIDTHS, 1, 3) if args.quick else (WIDTHS, args.seeds, args.epochs)
    )
    scaling_epochs = 3 if args.quick else 10
    scaling((8,), 1, args.device)  # warm-up: first calls (imports, autograd) are not timed
    print("scaling:", flush=True)
    scal = scaling(widths, scaling_epochs, args.device)
    print("quality:", flush=True)
    runs = [quality(seed, epochs, args.device) for seed in range(seeds)]
    cmd = "PYTHONPATH=. python benchmarks/regvar_scaling.py" + (" --quick" if args.quick else "")
    header = (
        f"# Amortized RegVar: scaling and quality\n\n`{cmd}`: device {args.device}, torch "
        f"1 thread ({platform.processor() or platform.machine()}). Scaling: MLP 64-w-w-5, "
        f"{scaling_epochs} training epochs per width, digits 0-4 training split "
        f"({len(load_digits_ood().X_train)} rows), predict on test + OOD rows. Quality: "
        f"{seeds} seed(s), MLP 64-64-64-5, {epochs} epochs, mean ± std over seeds."
    )
    table = markdown(scal, runs, header)
    print(table)
    stem = "regvar_scaling_quick" if args.quick else "regvar_scaling"
    slopes = {
        k: {"all": slope(scal, k), "three_largest": slope(scal, k, largest=3)} for k in SCALING
    }
    write_results(
        args.out_dir,
        stem,
        table,
        {
            "command": cmd,
            "device": args.device,
            "scaling": scal,
            "fit_time_slopes": slopes,
            "quality": runs,
        },
    )
    png = args.out_dir / f"{stem}.png"
    try:
        plot(scal, png)
    except ImportError:  # matplotlib is an optional extra
        png = None
    return {"scaling": scal, "quality": runs, "slopes": slopes, "png": png}


if __name__ == "__main__":
    main()
