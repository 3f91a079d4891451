"""CVP vs Monte Carlo sampling: the same posterior, one forward pass instead of many.

``CVPClassifier`` trains an MLP on digits 0-4 with the IVON optimizer, which
leaves a diagonal Gaussian over the weights. There are two ways to predict with
that posterior:

* Monte Carlo: draw S weight vectors, run the net S times, average the softmax.
  Exact as S grows; the cost grows with S.
* variance propagation (VP): one pass that carries a mean and a variance per
  unit, then the probit approximation. CVP adds per-layer variance scales
  fitted on held-out rows.

The figure plots, against the time of one pass over the test set, the total
variation distance of each predictive to a many-sample MC reference (left) and
the test NLL (right). CVP's scales are fitted to the held-out NLL, not to
agree with MC, so CVP may sit farther from the MC reference than plain VP.
Without ``ivon-opt`` installed, the example falls back to a diagonal Laplace
posterior (``posterior="laplace_diag"``) and says so.

Run: python examples/cvp_vs_mc.py [--quick] [--out cvp_vs_mc.png]
"""

import argparse
import importlib.util
import time

import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch.func import functional_call

from skuq import CVPClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import negative_log_likelihood
from skuq.nets import MLP
from skuq.outputs import probit_probabilities


def mc_probabilities(model, variances, x, n_samples, generator):
    """Average softmax over ``n_samples`` nets drawn from the diagonal posterior."""
    params = dict(model.named_parameters())
    total = 0.0
    with torch.no_grad():
        for _ in range(n_samples):
            drawn = {
                name: p + variances[name].sqrt() * torch.randn(p.shape, generator=generator)
                if name in variances
                else p
                for name, p in params.items()
            }
            total = total + torch.softmax(functional_call(model, drawn, (x,)), dim=-1)
    return total / n_samples


def seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(quick: bool = False, out: str = "cvp_vs_mc.png") -> dict:
    d = load_digits_ood()
    has_ivon = importlib.util.find_spec("ivon") is not None
    net_kw = {} if has_ivon else {"optimizer": torch.optim.Adam, "lr": 3e-3}
    net = NeuralNetClassifier(
        MLP,
        module__hidden=(64, 64),
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=8 if quick else 30,
        batch_size=64,
        train_split=None,
        verbose=0,
        **net_kw,
    )
    posterior = "ivon" if has_ivon else "laplace_diag"
    if not has_ivon:
        print(
            "ivon-opt is not installed (pip install 'skuq[ivon]'): using posterior="
            "'laplace_diag' instead"
        )
    torch.manual_seed(0)
    est = CVPClassifier(net, posterior=posterior, random_state=0).fit(d.X_train, d.y_train)
    model, prop = est.model_, est.propagator_
    variances, scales = prop.variances, est.layer_scales_
    x, y = torch.as_tensor(d.X_test), d.y_test
    gen = torch.Generator().manual_seed(0)

    n_ref = 300 if quick else 2000
    p_ref = mc_probabilities(model, variances, x, n_ref, gen)

    def tv(p):  # mean total-variation distance to the MC reference
        return float(0.5 * (p - p_ref).abs().sum(-1).mean())

    def vp(layer_scales):
        with torch.no_grad():
            m = prop(x, layer_scales=layer_scales)
        return probit_probabilities(m.mean, m.variance)

    rows = {}
    for name, layer_scales in (("VP (uncalibrated)", None), ("CVP", scales)):
        p = vp(layer_scales)
        rows[name] = {
            "seconds": seconds(lambda s=layer_scales: vp(s)),
            "TV": tv(p),
            "NLL": negative_log_likelihood(y, p.double().numpy()),
        }
    mc_sizes = (1, 3, 10, 30) if quick else (1, 3, 10, 30, 100)
    for s in mc_sizes:
        p = mc_probabilities(model, variances, x, s, gen)
        rows[f"MC-{s}"] = {
            "seconds": seconds(
                lambda s=s: mc_probabilities(model, variances, x, s, gen),
                repeats=1 if s > 10 else 3,
            ),
            "TV": tv(p),
            "NLL": negative_log_likelihood(y, p.double().numpy()),
        }
    with torch.no_grad():
        forward = seconds(lambda: model(x))
    results = {
        "posterior": posterior,
        "forward_seconds": forward,
        "rows": rows,
        "mc_reference_samples": n_ref,
    }
    print(
        f"posterior: {posterior}; MC reference: {n_ref} samples; "
        f"one plain forward pass: {forward * 1e3:.2f} ms"
    )
    print(f"{'predictive':18s} {'ms / pass':>10s} {'TV to ref':>10s} {'NLL':>7s}")
    for name, r in rows.items():
        print(f"{name:18s} {r['seconds'] * 1e3:10.2f} {r['TV']:10.4f} {r['NLL']:7.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    mc = [rows[f"MC-{s}"] for s in mc_sizes]
    for ax, key in zip(axes, ("TV", "NLL"), strict=True):
        ax.plot(
            [r["seconds"] for r in mc],
            [r[key] for r in mc],
            marker="o",
            label="MC sampling (S nets)",
        )
        for s, r in zip(mc_sizes, mc, strict=True):
            ax.annotate(
                f"S={s}",
                (r["seconds"], r[key]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        for name, marker in (("VP (uncalibrated)", "s"), ("CVP", "*")):
            ax.plot(
                rows[name]["seconds"], rows[name][key], marker=marker, ms=11, ls="none", label=name
            )
        ax.axvline(forward, color="grey", ls=":", lw=1, label="one plain forward pass")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per pass over the test set")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"TV distance to MC-{n_ref}")
    axes[1].set_ylabel("test NLL")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"digits 0-4, MLP, {posterior} posterior")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and samples")
    parser.add_argument("--out", default="cvp_vs_mc.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
