"""CVP vs Monte Carlo sampling from the same (IVON) posterior, on three architectures.

For an MLP, a small CNN with BatchNorm and a small Transformer encoder (LayerNorm,
multi-head attention, GELU, residuals) trained with IVON on the digits OOD split:

* quality: total-variation distance of CVP's probabilities to MC with 1,000 weight
  samples, NLL / ECE / coverage at 0.5 % and 1 % risk / AURC of uncalibrated
  propagation, CVP (per-layer calibration) and MC-1000; OOD AUROC (entropy);
  the bare net (MAP, Adam, same epochs) for reference;
* per-layer variance ratio CVP / MC-1000 (mean over units and rows) before and
  after calibration;
* time of one pass over the test set: deterministic forward, CVP, MC with
  10 / 30 / 100 samples (CPU).

Run: ``PYTHONPATH=. python benchmarks/cvp_vs_sampling.py [--quick]``; writes
``benchmarks/results/cvp_vs_sampling.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch import nn
from torch.func import functional_call

from skuq import CVPClassifier, MAPClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import (
    aurc,
    coverage_at_risk,
    expected_calibration_error,
    negative_log_likelihood,
    ood_auroc,
)
from skuq.nets import MLP, SmallCNN
from skuq.outputs import entropy, probit_probabilities

RESULTS = Path(__file__).parent / "results"


class Encoder(nn.Module):
    """A small Transformer encoder: the 8 rows of a digit are the tokens."""

    def __init__(self, n_outputs: int = 5, d: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d))
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, n_outputs)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff(self.ln2(h))
        return self.head(self.ln3(h.mean(dim=1)))


def make_net(kind: str, epochs: int, **kw):
    module = {"mlp": MLP, "cnn": SmallCNN, "transformer": Encoder}[kind]
    extra = {"mlp": {"module__hidden": (64, 64)},
             "cnn": {"module__channels": (8, 16), "module__hidden": 32,
                     "module__batch_norm": True},
             "transformer": {}}[kind]
    return NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, max_epochs=epochs,
                               batch_size=64, train_split=None, verbose=0, **extra, **kw)


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def mc_logits(model, variances, x, n, gen, hooks_on=None):
    params = dict(model.named_parameters())
    outs, layer_acc = [], {}
    handles = []
    if hooks_on:
        for name in hooks_on:
            def hook(mod, inp, out, name=name):
                o = out[0] if isinstance(out, tuple) else out
                s, sq = layer_acc.get(name, (0, 0))
                layer_acc[name] = (s + o.double(), sq + o.double() ** 2)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for _ in range(n):
            p = {k: t + variances[k].sqrt() * torch.randn(t.shape, generator=gen)
                 if k in variances else t for k, t in params.items()}
            outs.append(functional_call(model, p, (x,)))
    for h in handles:
        h.remove()
    layer_var = {k: sq / n - (s / n) ** 2 for k, (s, sq) in layer_acc.items()}
    return torch.stack(outs), layer_var


def selective(y, p):
    return {"NLL": negative_log_likelihood(y, p), "ECE": expected_calibration_error(y, p),
            "C@0.5%": coverage_at_risk(y, p, risk=0.005),
            "C@1%": coverage_at_risk(y, p, risk=0.01), "AURC": aurc(y, p)}


def run(kind: str, d, epochs: int, n_mc: int) -> dict:
    X_tr, X_te, X_ood = d.X_train, d.X_test, d.X_ood
    if kind == "cnn":
        X_tr, X_te, X_ood = (a.reshape(-1, 1, 8, 8) for a in (X_tr, X_te, X_ood))
    torch.manual_seed(0)
    est = CVPClassifier(make_net(kind, epochs), posterior="ivon", random_state=0).fit(
        X_tr, d.y_train)
    torch.manual_seed(0)
    map_est = MAPClassifier(make_net(kind, epochs, optimizer=torch.optim.Adam, lr=1e-2),
                            random_state=0).fit(X_tr, d.y_train)
    model, prop, scales = est.model_, est.propagator_, est.layer_scales_
    variances = prop.variances
    x, x_ood = torch.as_tensor(X_te), torch.as_tensor(X_ood)
    y = d.y_test
    gen = torch.Generator().manual_seed(0)

    with torch.no_grad():
        rec_u, rec_c = {}, {}
        out_u = prop(x, record=rec_u)
        out_c = prop(x, layer_scales=scales, record=rec_c)
    samples, mc_layer = mc_logits(model, variances, x, n_mc, gen, hooks_on=prop.layer_names)
    p_mc = torch.softmax(samples, -1).mean(0)
    p_u = probit_probabilities(out_u.mean, out_u.var)
    p_c = probit_probabilities(out_c.mean, out_c.var)

    def tv(p):
        return float(0.5 * (p - p_mc).abs().sum(-1).mean())

    rows = {}
    for name, p in (("uncalibrated VP", p_u), ("CVP", p_c), (f"MC-{n_mc}", p_mc)):
        rows[name] = selective(y, p.double().numpy())
        rows[name]["TV to MC"] = tv(p) if not name.startswith("MC") else 0.0
    rows["MAP (Adam)"] = selective(y, map_est.predict_proba(X_te))
    rows["MAP (Adam)"]["TV to MC"] = float("nan")
    # OOD AUROC by predictive entropy
    with torch.no_grad():
        o_u = prop(x_ood)
        o_c = prop(x_ood, layer_scales=scales)
    s_mc, _ = mc_logits(model, variances, x_ood, min(n_mc, 300), gen)
    ent = {"uncalibrated VP": (entropy(p_u), entropy(probit_probabilities(o_u.mean, o_u.var))),
           "CVP": (entropy(p_c), entropy(probit_probabilities(o_c.mean, o_c.var))),
           f"MC-{n_mc}": (entropy(p_mc), entropy(torch.softmax(s_mc, -1).mean(0)))}
    for name, (a, b) in ent.items():
        rows[name]["OOD AUROC"] = ood_auroc(a.numpy(), b.numpy())
    rows["MAP (Adam)"]["OOD AUROC"] = ood_auroc(map_est.predict_uncertainty(X_te),
                                                map_est.predict_uncertainty(X_ood))

    ratios = {}
    for name in prop.layer_names:
        mv = mc_layer[name].mean().item()
        ratios[name] = {"before": rec_u[name].variance.double().mean().item() / mv,
                        "after": rec_c[name].variance.double().mean().item() / mv,
                        "scale": scales.get(name, 1.0)}

    # timings: one pass over the test set
    def det():
        with torch.no_grad():
            model(x)

    def cvp():
        with torch.no_grad():
            prop(x, layer_scales=scales)

    t = {"forward": timed(det), "CVP": timed(cvp)}
    for s in (10, 30, 100):
        t[f"MC-{s}"] = timed(lambda s=s: mc_logits(model, variances, x, s, gen), repeats=2)
    return {"metrics": rows, "layer_variance_ratio": ratios, "time_s": t,
            "accuracy_cvp": float((p_c.argmax(1).numpy() == y).mean())}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = load_digits_ood()
    epochs, n_mc = (3, 50) if args.quick else (30, 1000)
    kinds = ["mlp"] if args.quick else ["mlp", "cnn", "transformer"]
    results = {k: run(k, d, epochs, n_mc) for k in kinds}

    lines = [f"# CVP vs sampling (digits 0-4, IVON posterior, {epochs} epochs, CPU 1 thread)",
             ""]
    for kind, r in results.items():
        lines += [f"## {kind} (CVP accuracy {r['accuracy_cvp']:.3f})", "",
                  "| predictive | TV to MC | NLL | ECE | C@0.5% | C@1% | AURC | OOD AUROC |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            lines.append(f"| {name} | {m['TV to MC']:.4f} | {m['NLL']:.4f} | {m['ECE']:.4f} | "
                         f"{m['C@0.5%']:.3f} | {m['C@1%']:.3f} | {m['AURC']:.4f} | "
                         f"{m['OOD AUROC']:.3f} |")
        mc_name = f"MC-{n_mc}"
        gap = r["metrics"]["CVP"]["NLL"] / r["metrics"][mc_name]["NLL"] - 1
        t = r["time_s"]
        lines += ["", f"CVP NLL vs {mc_name}: {100 * gap:+.1f} %", "",
                  "| time per test-set pass | seconds | x forward |", "|---|---|---|"]
        for name, sec in t.items():
            lines.append(f"| {name} | {sec:.5f} | {sec / t['forward']:.1f} |")
        lines += ["", f"CVP is {t['MC-100'] / t['CVP']:.1f}x faster than MC-100.", "",
                  "| layer | var ratio CVP/MC before | after calibration | scale c |",
                  "|---|---|---|---|"]
        for name, rr in r["layer_variance_ratio"].items():
            lines.append(f"| {name} | {rr['before']:.3f} | {rr['after']:.3f} | "
                         f"{rr['scale']:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cvp_vs_sampling.md").write_text(text + "\n")
        (RESULTS / "cvp_vs_sampling.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
