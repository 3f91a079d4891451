"""How right CVP's moments are: each rule against deterministic quadrature or Monte
Carlo, and each source of variance of three trained nets against weight sampling.

1. **Elementwise rules** against adaptive quadrature (``scipy.integrate.quad``) on a
   grid of input means and variances (1e-6 to 1e4): worst error of the mean (relative
   to the output RMS) and of the variance (relative, where it is above 1e-7 of the
   input variance).
2. **Layer rules** against Monte Carlo (``--layer-draws`` draws of inputs and weights;
   independent inputs, so that rules exact under independence show their exactness)
   and the pooling of a shared-weight layer (convolution or per-token Linear, weights
   random, input fixed), where independence fails.
3. **Per-source variance ratios** on a trained MLP, a CNN with global average
   pooling and a Transformer encoder with mean pooling (digits 0-4): the diagonal
   Laplace posterior (GGN, marginal-likelihood prior) restricted to one layer at a
   time, CVP's logit variance against ``--draws`` weight samples of that layer
   (ratio of the means over test rows and classes; the two halves of the draws give
   its spread), before and after the per-layer calibration (fitted on one half of
   the test rows, scored on the other), with the NLL of the MC predictive, of
   uncalibrated and of calibrated CVP.

Run: ``PYTHONPATH=. python benchmarks/cvp_moments.py [--quick]``; writes
``benchmarks/results/cvp_moments.{md,json}`` (``--quick`` writes nothing unless given
``--out``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from skuq.cvp import MomentPropagator, Moments, fit_layer_scales, probit_nll
from skuq.cvp import moments as mom
from skuq.cvp.sources import laplace_diag_posterior
from skuq.datasets import load_digits_ood

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402


# ------------------------------------------------------------- elementwise rules
def _quad(f, mu, var, kinks):
    from scipy import integrate

    sd = math.sqrt(var)
    lo, hi = mu - 40 * sd, mu + 40 * sd
    pts = sorted({p for p in (*kinks, mu) if lo < p < hi})

    def dens(x):
        return math.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    kw = dict(points=pts or None, limit=400, epsabs=0.0, epsrel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean = integrate.quad(lambda x: f(x) * dens(x), lo, hi, **kw)[0]
        v = integrate.quad(lambda x: (f(x) - mean) ** 2 * dens(x), lo, hi, **kw)[0]
    return mean, v


def _sig(x):
    return 0.5 * (1.0 + math.tanh(0.5 * x))


ELEMENTWISE = {  # name: (rule, f, kinks, kind)
    "ReLU": (mom.relu_moments, lambda x: max(x, 0.0), (0.0,), "exact"),
    "LeakyReLU(0.2)": (
        lambda m, v: mom.leaky_relu_moments(m, v, 0.2),
        lambda x: x if x > 0 else 0.2 * x,
        (0.0,),
        "exact",
    ),
    "clamp(-1, 0.5)": (
        lambda m, v: mom.clamp_moments(m, v, -1.0, 0.5),
        lambda x: min(max(x, -1.0), 0.5),
        (-1.0, 0.5),
        "exact",
    ),
    "GELU": (
        mom.gelu_moments,
        lambda x: x * 0.5 * math.erfc(-x / math.sqrt(2)),
        (),
        "exact mean; variance series (v <= 0.5) / closed form",
    ),
    "SiLU": (
        mom.silu_moments,
        lambda x: x * _sig(x),
        (),
        "quadrature (v <= 0.5) / closed-form proxy + residual",
    ),
    "sigmoid": (mom.sigmoid_moments, _sig, (), "quadrature / closed-form proxy + residual"),
    "tanh": (mom.tanh_moments, math.tanh, (), "as sigmoid"),
    "Softplus": (
        lambda m, v: mom.quadrature_moments(F.softplus, m, v),
        lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))),
        (),
        "32-node Gauss-Hermite",
    ),
    "ELU": (
        lambda m, v: mom.quadrature_moments(F.elu, m, v),
        lambda x: x if x > 0 else math.expm1(x),
        (0.0,),
        "32-node Gauss-Hermite",
    ),
}
MUS = (-5.0, -3.0, -1.0, -0.3, 0.0, 0.5, 2.0, 4.0)
VAR_BANDS = {
    "v <= 0.5": (1e-6, 1e-3, 0.1, 0.5),
    "0.5 < v <= 4": (0.6, 1.0, 4.0),
    "v > 4": (25.0, 100.0, 1e4),
}


def elementwise_table():
    rows = []
    for name, (rule, f, kinks, kind) in ELEMENTWISE.items():
        row = {"rule": name, "kind": kind}
        for band, variances in VAR_BANDS.items():
            em = ev = 0.0
            for var in variances:
                mu = torch.tensor(MUS, dtype=torch.float64)
                mean, out_var = rule(mu, torch.full_like(mu, var))
                for i, m in enumerate(MUS):
                    qm, qv = _quad(f, m, var, kinks)
                    em = max(em, abs(float(mean[i]) - qm) / max(math.sqrt(qm * qm + qv), 1e-300))
                    if qv > 1e-7 * var:
                        ev = max(ev, abs(float(out_var[i]) - qv) / qv)
            row[band] = (em, ev)
        rows.append(row)
    return rows


# ------------------------------------------------------------------- layer rules
def _mc_layer(model, x_mean, x_var, variances, n, seed=0, chunk=20_000):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def one(p, x):
        return functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))[0]

    run = torch.func.vmap(one)
    acc = acc2 = 0
    with torch.no_grad():
        for _ in range(n // chunk):
            p = {
                k: t
                + variances[k].sqrt() * torch.randn(chunk, *t.shape, generator=g, dtype=t.dtype)
                if k in variances
                else t.expand(chunk, *t.shape)
                for k, t in params.items()
            }
            x = x_mean[0] + x_var[0].sqrt() * torch.randn(
                chunk, *x_mean.shape[1:], generator=g, dtype=x_mean.dtype
            )
            y = run(p, x)
            acc, acc2 = acc + y.sum(0), acc2 + (y * y).sum(0)
    mean = acc / (n // chunk * chunk)
    return mean, acc2 / (n // chunk * chunk) - mean**2


class _TokenMLP(nn.Module):
    """A per-token Linear and ReLU, mean over the tokens."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.lin = nn.Linear(d, h)

    def forward(self, x):
        return torch.relu(self.lin(x)).mean(dim=1)


def _layer_cases():
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    ln.weight.data.normal_(1.0, 0.2)
    rms = nn.RMSNorm(64)
    rms.weight.data.normal_(1.0, 0.2)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    spread = (0.1, 2.0)
    return {  # name: (module, input shape, input variance spread, kind)
        "Linear": (nn.Linear(16, 8), (16,), spread, "exact under independence"),
        "Conv2d (3x3, padding 1)": (
            nn.Conv2d(2, 3, 3, padding=1),
            (2, 5, 5),
            spread,
            "exact under independence",
        ),
        "BatchNorm2d (eval)": (bn, (3, 2, 2), spread, "exact"),
        "AvgPool2d(2)": (nn.AvgPool2d(2), (2, 4, 4), spread, "exact under independence"),
        "MaxPool2d(2)": (
            nn.MaxPool2d(2),
            (2, 4, 4),
            spread,
            "approximate (Clark folded over the window)",
        ),
        "LayerNorm (D = 64)": (ln, (64,), spread, "approximate (expected statistic)"),
        "RMSNorm (D = 64)": (rms, (64,), spread, "approximate (expected statistic)"),
        "Conv2d -> global average pool (weights random)": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
            (2, 6, 6),
            (1e-12, 1e-11),
            "exact under independence (pooled rule)",
        ),
        "Conv2d -> ReLU -> global average pool (weights random)": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
            (2, 6, 6),
            (1e-12, 1e-11),
            "approximate (pooled rule, Hermite series)",
        ),
        "per-token Linear -> ReLU -> mean over 16 tokens (weights random)": (
            _TokenMLP(),
            (16, 8),
            (1e-12, 1e-11),
            "approximate (pooled rule, Hermite series)",
        ),
    }


def layer_table(n_draws):
    rows = []
    for name, (m, shape, spread, kind) in _layer_cases().items():
        m = m.double().eval()
        g = torch.Generator().manual_seed(1)
        x_mean = torch.randn(1, *shape, generator=g, dtype=torch.float64)
        if "pool" in name or "token" in name:
            x_mean = x_mean.abs() + 0.5  # post-ReLU-like inputs
        lo, hi = math.log(spread[0]), math.log(spread[1])
        x_var = torch.exp(lo + (hi - lo) * torch.rand(1, *shape, generator=g, dtype=torch.float64))
        variances = {
            n: 0.05 * torch.rand(p.shape, generator=g, dtype=p.dtype)
            for n, p in m.named_parameters()
        }
        with torch.no_grad():
            out = MomentPropagator(m, variances)(Moments(x_mean, x_var))
        mc_mean, mc_var = _mc_layer(m, x_mean, x_var, variances, n_draws)
        rel = ((out.var[0] - mc_var).abs() / mc_var).flatten()
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "ratio": float(out.var[0].mean() / mc_var.mean()),
                "median": float(rel.median()),
                "max": float(rel.max()),
            }
        )
    return rows


# ---------------------------------------------------------------- trained nets
class _GapCNN(nn.Module):
    def __init__(self, n_outputs=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, n_outputs)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class _Encoder(nn.Module):
    """Rows as 8 tokens of 8 features; one pre-norm encoder block; mean pooling."""

    def __init__(self, n_outputs=5, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d))
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, n_outputs)

    def forward(self, x):
        h = self.embed(x.view(x.shape[0], 8, 8)) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(self.ln3(h.mean(dim=1)))


def _mlp(n_outputs=5):
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, n_outputs)
    )


NETS = {
    "MLP": (_mlp, 60),
    "CNN (global average pool)": (_GapCNN, 60),
    "Transformer (mean pool)": (_Encoder, 80),
}


def _train(model, X, y, epochs, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _sources(model, prop):
    """{layer name: [parameter names]} for the propagator's calibratable layers."""
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for layer in prop.layer_names:
        own = [n for n in names if n == layer or n.startswith(layer + ".")]
        if own:
            out[layer] = own
    return out


def _noise(model, names, n, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return [{k: torch.randn(params[k].shape, generator=g) for k in names} for _ in range(n)]


def _mc_logits(model, variances, x, noise, tau=1.0):
    """Logits of the weight draws ``mean + sqrt(tau var) eps`` (one per ``noise`` entry)."""
    params = dict(model.named_parameters())
    outs = []
    with torch.no_grad():
        for eps in noise:
            p = {
                k: t + (tau * variances[k]).sqrt() * eps[k] if k in variances else t
                for k, t in params.items()
            }
            outs.append(functional_call(model, p, (x,)).double())
    return torch.stack(outs)


def _nll_mc(samples, y):
    p = torch.softmax(samples, -1).mean(0)
    return float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean())


#: grid of posterior temperatures for the MC predictive (common random numbers)
TAUS = tuple(10.0 ** np.linspace(-3.0, 1.0, 9))


def source_table(n_draws, n_tau_draws, seed=0, quick=False):
    """Per source: the posterior restricted to that layer, scaled by the temperature
    ``tau`` that minimizes the MC predictive's NLL on the calibration half (so that the
    MC predictive is the well-scaled target); CVP against MC at that posterior, before
    and after CVP's own per-layer calibration on the same half."""
    d = load_digits_ood()
    X, y = torch.as_tensor(d.X_train), torch.as_tensor(d.y_train)
    Xt, yt = torch.as_tensor(d.X_test), torch.as_tensor(d.y_test)
    half = len(Xt) // 2
    X_cal, y_cal, X_ev, y_ev = Xt[:half], yt[:half], Xt[half:], yt[half:]
    rows = []
    for net_name, (make, epochs) in NETS.items():
        torch.manual_seed(seed)
        model = _train(make(), X, y, 5 if quick else epochs, seed)
        with torch.no_grad():
            acc = float((model(X_ev).argmax(1) == y_ev).float().mean())
        post = laplace_diag_posterior(
            model, model, d.X_train, d.y_train, device="cpu", batch_size=256
        ).variances
        sources = _sources(model, MomentPropagator(model, post))
        for src, pnames in [*sources.items(), ("all", [n for n, _ in model.named_parameters()])]:
            base = {n: post[n] for n in pnames}
            fit_noise = _noise(model, pnames, n_tau_draws, seed + 2)
            nll_tau = [_nll_mc(_mc_logits(model, base, X_cal, fit_noise, t), y_cal) for t in TAUS]
            tau = TAUS[int(np.argmin(nll_tau))]
            var = {n: tau * v for n, v in base.items()}
            prop = MomentPropagator(model, var)
            with torch.no_grad():
                out = prop(X_ev)
            samples = _mc_logits(model, var, X_ev, _noise(model, pnames, n_draws, seed + 1))
            mc_var = samples.var(0)
            halves = [samples[: n_draws // 2].var(0).mean(), samples[n_draws // 2 :].var(0).mean()]
            ratio = float(out.var.mean() / mc_var.mean())
            spread = [float(out.var.mean() / h) for h in halves]
            scales = fit_layer_scales(prop, [(X_cal, y_cal)], "per_layer")
            with torch.no_grad():
                cal = prop(X_ev, layer_scales=scales)
            rows.append(
                {
                    "net": net_name,
                    "source": src,
                    "accuracy": acc,
                    "n_params": int(sum(post[n].numel() for n in pnames)),
                    "tau": tau,
                    "ratio": ratio,
                    "ratio_halves": spread,
                    "median_entry_ratio": float((out.var / mc_var).median()),
                    "scales": scales,
                    "ratio_calibrated": float(cal.var.mean() / mc_var.mean()),
                    "nll_mc": _nll_mc(samples, y_ev),
                    "nll_cvp": float(probit_nll(out.mean.double(), out.var.double(), y_ev)),
                    "nll_cvp_calibrated": float(
                        probit_nll(cal.mean.double(), cal.var.double(), y_ev)
                    ),
                }
            )
            r = rows[-1]
            print(
                f"  {net_name:26s} {src:6s} tau {tau:.3g} ratio {ratio:.3f} ({spread[0]:.3f}-"
                f"{spread[1]:.3f}) calibrated {r['ratio_calibrated']:.3f} NLL MC "
                f"{r['nll_mc']:.4f} CVP {r['nll_cvp']:.4f} cal {r['nll_cvp_calibrated']:.4f}",
                flush=True,
            )
    return rows


# ----------------------------------------------------- calibration rows (prefit net)
def calibration_rows_table(seed=0, quick=False):
    """CVP around a prefit net (``FrozenEstimator``), default Laplace posterior: where
    the posterior and the variance scales are fitted."""
    from sklearn.frozen import FrozenEstimator
    from skorch import NeuralNetClassifier

    from skuq import CVPClassifier
    from skuq.metrics import expected_calibration_error, negative_log_likelihood, ood_auroc
    from skuq.outputs import entropy

    d = load_digits_ood()
    half = len(d.X_test) // 2
    X_val, y_val = d.X_test[:half], d.y_test[:half]
    X_ev, y_ev = d.X_test[half:], d.y_test[half:]
    rows = []
    for net_name, (make, epochs) in (
        ("MLP", NETS["MLP"]),
        ("CNN (global average pool)", NETS["CNN (global average pool)"]),
    ):
        torch.manual_seed(seed)
        net = NeuralNetClassifier(
            make,
            criterion=nn.CrossEntropyLoss,
            optimizer=torch.optim.Adam,
            lr=3e-3,
            optimizer__weight_decay=1e-4,
            batch_size=64,
            max_epochs=5 if quick else epochs,
            train_split=None,
            verbose=0,
        ).fit(d.X_train, d.y_train)
        variants = {
            "posterior and scales on the training rows (before)": (
                d.X_train,
                d.y_train,
                dict(X_cal=d.X_train, y_cal=d.y_train),
            ),
            "posterior and scales on held-out rows (before, X = held-out)": (
                X_val,
                y_val,
                dict(X_cal=X_val, y_cal=y_val),
            ),
            "default now: split of the training rows (80 % posterior, 20 % scales)": (
                d.X_train,
                d.y_train,
                {},
            ),
            "posterior on the training rows, scales on held-out X_cal": (
                d.X_train,
                d.y_train,
                dict(X_cal=X_val, y_cal=y_val),
            ),
        }
        for name, (Xf, yf, kw) in variants.items():
            est = CVPClassifier(FrozenEstimator(net), random_state=seed).fit(Xf, yf, **kw)
            p = est.predict_proba(X_ev)
            u_in = entropy(torch.as_tensor(p)).numpy()
            u_out = entropy(torch.as_tensor(est.predict_proba(d.X_ood))).numpy()
            rows.append(
                {
                    "net": net_name,
                    "variant": name,
                    "nll": negative_log_likelihood(y_ev, p),
                    "ece": expected_calibration_error(y_ev, p),
                    "ood_auroc": ood_auroc(u_in, u_out),
                    "scales": est.layer_scales_,
                }
            )
            print(
                f"  {net_name:26s} {name:70s} NLL {rows[-1]['nll']:.4f} ECE "
                f"{rows[-1]['ece']:.4f} AUROC {rows[-1]['ood_auroc']:.3f}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------ report
def _fmt(x):
    return f"{x:.1e}" if x >= 1e-3 or x == 0 else f"{x:.0e}"


def markdown(res) -> str:
    lines = [
        "# CVP: how right are the moments",
        "",
        f"`PYTHONPATH=. python benchmarks/cvp_moments.py` ({res['seconds']:.0f} s, "
        f"torch {torch.__version__}, {res['threads']} thread(s)).",
        "",
        "## Elementwise rules against adaptive quadrature",
        "",
        "Worst error over input means "
        + ", ".join(f"{m:g}" for m in MUS)
        + ": mean relative to the output RMS / variance relative (where it is above "
        "1e-7 of the input variance).",
        "",
        "| rule | how | " + " | ".join(VAR_BANDS) + " |",
        "|---|---|" + "---|" * len(VAR_BANDS),
    ]
    for r in res["elementwise"]:
        cells = [f"{_fmt(r[b][0])} / {_fmt(r[b][1])}" for b in VAR_BANDS]
        lines.append(f"| {r['rule']} | {r['kind']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Layer rules against Monte Carlo ({res['layer_draws']:,} draws)",
        "",
        "Random weights (variances up to 0.05) and, for the single layers, "
        "independent random inputs; the pooled cases have a fixed input, so all "
        "their variance comes from the shared weights. Ratio: CVP variance / MC "
        "variance, averaged over the outputs; error: per output, relative.",
        "",
        "| layer | kind | ratio | median error | worst error |",
        "|---|---|---|---|---|",
    ]
    for r in res["layers"]:
        lines.append(
            f"| {r['layer']} | {r['kind']} | {r['ratio']:.3f} | {r['median']:.3f} "
            f"| {r['max']:.3f} |"
        )
    lines += [
        "",
        f"## Per-source variance ratios on trained nets ({res['draws']:,} weight draws)",
        "",
        "Diagonal Laplace posterior (GGN, marginal-likelihood prior) restricted to one "
        "layer (`all`: every layer), times the temperature tau (grid 1e-3 to 10) that "
        f"minimizes the NLL of the MC predictive ({res['tau_draws']} draws) on one half "
        "of the test rows: MC at that posterior is the target. Ratio: CVP logit "
        "variance / MC logit variance on the other half, averaged over rows and "
        "classes (in brackets: against each half of the draws); calibrated: CVP with "
        "its per-layer scales fitted on the first half.",
        "",
        "| net | source | params | tau | ratio | median entry | scale | ratio calibrated "
        "| NLL MC | NLL CVP | NLL CVP calibrated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["sources"]:
        sc = ", ".join(f"{v:.2g}" for v in r["scales"].values())
        lines.append(
            f"| {r['net']} | {r['source']} | {r['n_params']} | {r['tau']:.2g} | {r['ratio']:.3f} "
            f"({r['ratio_halves'][0]:.3f}-{r['ratio_halves'][1]:.3f}) | "
            f"{r['median_entry_ratio']:.3f} | {sc} | {r['ratio_calibrated']:.3f} | "
            f"{r['nll_mc']:.4f} | {r['nll_cvp']:.4f} | {r['nll_cvp_calibrated']:.4f} |"
        )
    lines += [
        "",
        "## Where a prefit net's calibration is fitted",
        "",
        "`CVPClassifier(FrozenEstimator(net))`, default posterior (`laplace_diag`), "
        "per-layer calibration; scored on the half of the test rows no variant "
        "saw; OOD: digits 5-9 against it (entropy).",
        "",
        "| net | posterior / scales fitted on | NLL | ECE | OOD AUROC | scales |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["calibration_rows"]:
        sc = ", ".join(f"{v:.2g}" for v in r["scales"].values())
        lines.append(
            f"| {r['net']} | {r['variant']} | {r['nll']:.4f} | {r['ece']:.4f} | "
            f"{r['ood_auroc']:.3f} | {sc} |"
        )
    accs = {r["net"]: r["accuracy"] for r in res["sources"]}
    lines += [
        "",
        "Test accuracy of the nets: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--tau-draws", type=int, default=40)
    ap.add_argument("--layer-draws", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.draws, args.tau_draws, args.layer_draws = 100, 20, 40_000
    t0 = time.perf_counter()
    print("elementwise rules vs quadrature", flush=True)
    elementwise = elementwise_table()
    print("layer rules vs MC", flush=True)
    layers = layer_table(args.layer_draws)
    for r in layers:
        print(
            f"  {r['layer']:50s} ratio {r['ratio']:.3f} median {r['median']:.3f} "
            f"max {r['max']:.3f}",
            flush=True,
        )
    print("per-source ratios", flush=True)
    sources = source_table(args.draws, args.tau_draws, quick=args.quick)
    print("calibration rows of a prefit net", flush=True)
    cal_rows = calibration_rows_table(quick=args.quick)
    res = {
        "elementwise": elementwise,
        "layers": layers,
        "sources": sources,
        "calibration_rows": cal_rows,
        "tau_draws": args.tau_draws,
        "draws": args.draws,
        "layer_draws": args.layer_draws,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        write_results(out, "cvp_moments", markdown(res), res, json_default=float)
        print(f"wrote {out / 'cvp_moments.md'}")
    print((out / "cvp_moments.md").read_text() if out is not None else "")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
