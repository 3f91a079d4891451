"""CVP vs Monte Carlo sampling from the same weight posterior, on three architectures.

For an MLP, a small CNN with BatchNorm and a small Transformer encoder (LayerNorm,
multi-head attention, GELU, residuals), each at the digits size and wider, trained on
the digits OOD split with the posterior source ``--posterior`` (default ``ivon``: the
net is trained with IVON and its variances are read from the optimizer; this is not
the estimator's default ``laplace_diag``, which you can pass instead):

* quality, on the test set: total-variation distance of CVP's probabilities to MC
  with 1,000 weight samples from the same posterior; NLL / ECE / coverage at 0.5 %
  and 1 % risk / AURC of uncalibrated propagation, CVP (per-layer calibration) and
  MC-1000; OOD AUROC (entropy); the bare net (MAP, Adam, same epochs) for reference;
* per-layer variance ratio CVP / MC-1000 (mean over units and rows) before and
  after calibration;
* time of one pass over a batch of ``--rows`` rows (the test set tiled, so that a
  forward pass is compute-bound rather than call overhead; 4096 by default, and a
  sweep of CVP / forward over ``--sweep`` rows): deterministic forward,
  one CVP pass, MC with 10 / 30 / 100 weight samples (each sample: draw the weights,
  one forward). Two warm-up calls (MC: one), then the median of ``--repeats`` timed
  calls (MC: at most 3); the forward and CVP calls alternate, and CVP's cost in forward passes
  is the median of the per-pair ratios. On CPU the ratios use the thread's CPU time
  (robust to other jobs on the machine; page faults included), wall-clock time is
  reported next to it; on CUDA they use wall-clock time with synchronization.

Targets: CVP costs <= 3 deterministic forward passes, is >= 20x faster
than MC-100, at NLL within 2 % of MC-1000.

Run: ``PYTHONPATH=. python benchmarks/cvp_vs_sampling.py [--quick] [--device cuda]``;
writes ``benchmarks/results/cvp_vs_sampling.{md,json}`` (``--out`` for another folder;
``--quick`` writes nothing unless given ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

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

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

TARGET_FORWARDS, TARGET_SPEEDUP, TARGET_NLL_GAP = 3.0, 20.0, 0.02


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


#: name -> (module, module options, input is an image, size in words)
MODELS = {
    "mlp": (MLP, {"module__hidden": (64, 64)}, False, "64-64-64-5"),
    "cnn": (
        SmallCNN,
        {"module__channels": (8, 16), "module__hidden": 32, "module__batch_norm": True},
        True,
        "conv 8, 16 (BN, max-pool), fc 32",
    ),
    "transformer": (Encoder, {}, False, "d 32, 4 heads, ff 64, 8 tokens"),
    "mlp-wide": (MLP, {"module__hidden": (512, 512)}, False, "64-512-512-5"),
    "cnn-wide": (
        SmallCNN,
        {"module__channels": (32, 64), "module__hidden": 128, "module__batch_norm": True},
        True,
        "conv 32, 64 (BN, max-pool), fc 128",
    ),
    "transformer-wide": (Encoder, {"module__d": 64}, False, "d 64, 4 heads, ff 128, 8 tokens"),
}


def make_net(kind: str, epochs: int, device: str, **kw):
    module, extra, _, _ = MODELS[kind]
    return NeuralNetClassifier(
        module,
        criterion=nn.CrossEntropyLoss,
        max_epochs=epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
        device=device,
        **extra,
        **kw,
    )


def _clock(fn, device: torch.device) -> tuple[float, float]:
    """(wall, thread CPU) seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.thread_time() - c0


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """``warmup`` calls, then the median wall-clock and thread CPU seconds of ``repeats``."""
    for _ in range(warmup):
        _clock(fn, device)
    wall, cpu = zip(*(_clock(fn, device) for _ in range(repeats)), strict=True)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "repeats": repeats}


def timed_pair(base, other, device: torch.device, repeats: int) -> tuple[dict, dict, dict]:
    """``base`` and ``other`` timed alternately (two warm-up calls each), so that both see
    the same machine load; also the median of the per-pair ratios ``other / base``."""
    for _ in range(2):
        _clock(base, device)
        _clock(other, device)
    pairs = [(_clock(base, device), _clock(other, device)) for _ in range(repeats)]
    out = []
    for i in (0, 1):
        wall = [p[i][0] for p in pairs]
        cpu = [p[i][1] for p in pairs]
        out.append(
            {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "repeats": repeats}
        )
    ratio = {
        "wall": statistics.median(o[0] / b[0] for b, o in pairs),
        "cpu": statistics.median(o[1] / b[1] for b, o in pairs),
    }
    return out[0], out[1], ratio


def mc_logits(model, variances, x, n, gen, hooks_on=None):
    """``n`` forward passes, each with weights drawn from ``N(theta, variances)``."""
    params = dict(model.named_parameters())
    std = {k: v.sqrt() for k, v in variances.items()}
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
            p = {
                k: t + std[k] * torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
                if k in std
                else t
                for k, t in params.items()
            }
            outs.append(functional_call(model, p, (x,)))
    for h in handles:
        h.remove()
    layer_var = {k: sq / n - (s / n) ** 2 for k, (s, sq) in layer_acc.items()}
    return torch.stack(outs), layer_var


def selective(y, p):
    return {
        "NLL": negative_log_likelihood(y, p),
        "ECE": expected_calibration_error(y, p),
        "C@0.5%": coverage_at_risk(y, p, risk=0.005),
        "C@1%": coverage_at_risk(y, p, risk=0.01),
        "AURC": aurc(y, p),
    }


def tiled(x: torch.Tensor, rows: int) -> torch.Tensor:
    reps = -(-rows // len(x))
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:rows].contiguous()


def run(kind: str, d, args, device: torch.device) -> dict:
    _, _, image, size = MODELS[kind]
    X_tr, X_te, X_ood = d.X_train, d.X_test, d.X_ood
    if image:
        X_tr, X_te, X_ood = (a.reshape(-1, 1, 8, 8) for a in (X_tr, X_te, X_ood))
    dev = str(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    est = CVPClassifier(
        make_net(kind, args.epochs, dev), posterior=args.posterior, device=dev, random_state=0
    ).fit(X_tr, d.y_train)
    fit_s = time.perf_counter() - t0
    torch.manual_seed(0)
    map_est = MAPClassifier(
        make_net(kind, args.epochs, dev, optimizer=torch.optim.Adam, lr=1e-2),
        device=dev,
        random_state=0,
    ).fit(X_tr, d.y_train)
    # the estimator's own propagator: traced once in fit, weight-side tensors cached
    model, prop, scales = est.model_.eval(), est.propagator_, est.layer_scales_
    variances = {k: v.to(device) for k, v in prop.variances.items()}
    x, x_ood = torch.as_tensor(X_te).to(device), torch.as_tensor(X_ood).to(device)
    y = d.y_test
    gen = torch.Generator(device=device).manual_seed(0)

    # ------------------------------------------------------------ quality
    with torch.no_grad():
        rec_u, rec_c = {}, {}
        out_u = prop(x, record=rec_u)
        out_c = prop(x, layer_scales=scales, record=rec_c)
    modules = dict(model.named_modules())
    # calibrated layers that are modules (a free parameter such as ``pos`` has no output)
    layers = [name for name in prop.layer_names if name in modules]
    samples, mc_layer = mc_logits(model, variances, x, args.n_mc, gen, hooks_on=layers)
    p_mc = torch.softmax(samples, -1).mean(0).cpu()
    p_u = probit_probabilities(out_u.mean, out_u.var).cpu()
    p_c = probit_probabilities(out_c.mean, out_c.var).cpu()

    def tv(p):
        return float(0.5 * (p - p_mc).abs().sum(-1).mean())

    mc_name = f"MC-{args.n_mc}"
    rows = {}
    for name, p in (("uncalibrated VP", p_u), ("CVP", p_c), (mc_name, p_mc)):
        rows[name] = selective(y, p.double().numpy())
        rows[name]["TV to MC"] = tv(p) if name != mc_name else 0.0
    rows["MAP (Adam)"] = selective(y, map_est.predict_proba(X_te))
    rows["MAP (Adam)"]["TV to MC"] = float("nan")
    with torch.no_grad():
        o_u = prop(x_ood)
        o_c = prop(x_ood, layer_scales=scales)
    s_mc, _ = mc_logits(model, variances, x_ood, min(args.n_mc, 300), gen)
    ent = {
        "uncalibrated VP": (entropy(p_u), entropy(probit_probabilities(o_u.mean, o_u.var))),
        "CVP": (entropy(p_c), entropy(probit_probabilities(o_c.mean, o_c.var))),
        mc_name: (entropy(p_mc), entropy(torch.softmax(s_mc, -1).mean(0))),
    }
    for name, (a, b) in ent.items():
        rows[name]["OOD AUROC"] = ood_auroc(a.cpu().numpy(), b.cpu().numpy())
    rows["MAP (Adam)"]["OOD AUROC"] = ood_auroc(
        map_est.predict_uncertainty(X_te), map_est.predict_uncertainty(X_ood)
    )
    ratios = {}
    for name in layers:
        mv = mc_layer[name].mean().item()
        ratios[name] = {
            "before": rec_u[name].variance.double().mean().item() / mv,
            "after": rec_c[name].variance.double().mean().item() / mv,
            "scale": scales.get(name, 1.0),
        }

    # ------------------------------------------------------------- timing
    xb = tiled(x, args.rows)

    def det():
        with torch.no_grad():
            model(xb)

    def cvp():
        with torch.no_grad():
            prop(xb, layer_scales=scales)

    t_fwd, t_cvp, paired = timed_pair(det, cvp, device, args.repeats)
    t = {"forward": t_fwd, "CVP": t_cvp}
    for s in (10, 30, 100):
        t[f"MC-{s}"] = timed(
            lambda s=s: mc_logits(model, variances, xb, s, gen),
            device,
            min(args.repeats, 3),
            warmup=1,
        )
    key = "cpu_s" if device.type == "cpu" else "wall_s"
    fwd = t["forward"][key]
    for v in t.values():
        v["x_forward"] = v[key] / fwd
    # CVP against the forward calls it alternated with (robust to drifting machine load)
    t["CVP"]["x_forward"] = paired["cpu" if key == "cpu_s" else "wall"]
    t["CVP"]["x_forward_of_medians"] = t["CVP"][key] / fwd
    # CVP's cost in forward passes by batch size: call overhead at a few hundred rows,
    # memory traffic (tensors beyond the caches, fresh pages) at tens of thousands
    sweep = {}
    for n_rows in args.sweep:
        xs = tiled(x, n_rows)

        def det_s(xs=xs):
            with torch.no_grad():
                model(xs)

        def cvp_s(xs=xs):
            with torch.no_grad():
                prop(xs, layer_scales=scales)

        f_s, c_s, r_s = timed_pair(det_s, cvp_s, device, args.repeats)
        sweep[n_rows] = {
            "forward": f_s,
            "CVP": c_s,
            "x_forward": r_s["cpu" if key == "cpu_s" else "wall"],
        }
        del xs
    gap = rows["CVP"]["NLL"] / rows[mc_name]["NLL"] - 1
    gap_u = rows["uncalibrated VP"]["NLL"] / rows[mc_name]["NLL"] - 1
    speedup = t["MC-100"][key] / t["CVP"][key]
    return {
        "size": size,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "rows_timed": args.rows,
        "fit_s": fit_s,
        "metrics": rows,
        "layer_variance_ratio": ratios,
        "time": t,
        "timing_clock": key,
        "cvp_x_forward_by_rows": sweep,
        "cvp_forward_equivalents": t["CVP"]["x_forward"],
        "cvp_speedup_vs_mc100": speedup,
        "nll_gap_cvp_vs_mc": gap,
        "nll_gap_uncalibrated_vs_mc": gap_u,
        "accuracy_cvp": float((p_c.argmax(1).numpy() == y).mean()),
        "targets_met": {
            "forwards<=3": t["CVP"]["x_forward"] <= TARGET_FORWARDS,
            "speedup>=20": speedup >= TARGET_SPEEDUP,
            "nll_gap<=2%": abs(gap) <= TARGET_NLL_GAP,
        },
    }


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            cpu = [
                ln
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ]
            env["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else env["machine"]
        except OSError:
            env["cpu"] = env["machine"]
        if hasattr(os, "getloadavg"):
            env["load_average_at_start"] = os.getloadavg()[0]
    return env


def markdown(results: dict, config: dict, env: dict) -> str:
    clock = "thread CPU time" if env["device"].startswith("cpu") else "wall-clock time"
    where = (
        f"CPU ({env.get('cpu', '')}), {env['threads']} thread"
        if env["device"].startswith("cpu")
        else f"CUDA ({env.get('gpu', '')})"
    )
    lines = [
        f"# CVP vs sampling (digits 0-4, posterior `{config['posterior']}`, "
        f"{config['epochs']} epochs, {where})",
        "",
        f'Posterior: `posterior="{config["posterior"]}"` for CVP and for Monte Carlo alike '
        "(the same variances; MC draws the weights from them). Timing: one pass over "
        f"{config['rows']} rows (the test set tiled), 2 warm-up calls (MC: 1), median of "
        f"{config['repeats']} calls (MC: at most 3), forward and CVP alternating (CVP's "
        f"x forward: median of the per-pair ratios); ratios by {clock}. "
        f"torch {env['torch']}.",
        "",
        "## Summary",
        "",
        "| model | size | parameters | forward (s) | CVP (x forward) | MC-10 | MC-30 "
        "| MC-100 (x forward) | CVP vs MC-100 | CVP NLL vs MC-1000 | uncal. VP NLL vs MC-1000 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mc_name = f"MC-{config['n_mc']}"
    for kind, r in results.items():
        t = r["time"]
        key = r["timing_clock"]
        lines.append(
            f"| {kind} | {r['size']} | {r['n_parameters']:,} | {t['forward'][key]:.4f} | "
            f"{t['CVP']['x_forward']:.2f} | {t['MC-10']['x_forward']:.1f} | "
            f"{t['MC-30']['x_forward']:.1f} | {t['MC-100']['x_forward']:.1f} | "
            f"{r['cvp_speedup_vs_mc100']:.1f}x faster | {100 * r['nll_gap_cvp_vs_mc']:+.1f} % | "
            f"{100 * r['nll_gap_uncalibrated_vs_mc']:+.1f} % |"
        )
    lines += [
        "",
        f"Targets: CVP <= {TARGET_FORWARDS:g} forward passes, >= {TARGET_SPEEDUP:g}x "
        f"faster than MC-100, NLL within {100 * TARGET_NLL_GAP:g} % of {mc_name}.",
        "",
        "| model | <= 3 forwards | >= 20x vs MC-100 | NLL within 2 % |",
        "|---|---|---|---|",
    ]
    for kind, r in results.items():
        m = r["targets_met"]
        lines.append(
            f"| {kind} | {'yes' if m['forwards<=3'] else 'no'} | "
            f"{'yes' if m['speedup>=20'] else 'no'} | "
            f"{'yes' if m['nll_gap<=2%'] else 'no'} |"
        )
    lines.append("")
    sweep_rows = sorted({int(n) for r in results.values() for n in r["cvp_x_forward_by_rows"]})
    if sweep_rows:
        lines += [
            "CVP cost in forward passes by rows per pass (forward seconds in brackets):",
            "",
            "| model | " + " | ".join(f"{n} rows" for n in sweep_rows) + " |",
            "|---|" + "---|" * len(sweep_rows),
        ]
        for kind, r in results.items():
            cells = []
            for n in sweep_rows:
                v = r["cvp_x_forward_by_rows"].get(n) or r["cvp_x_forward_by_rows"].get(str(n))
                cells.append(
                    ""
                    if v is None
                    else f"{v['x_forward']:.2f} ({v['forward'][r['timing_clock']]:.4f})"
                )
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    for kind, r in results.items():
        lines += [
            f"## {kind} ({r['size']}; CVP accuracy {r['accuracy_cvp']:.3f})",
            "",
            "| predictive | TV to MC | NLL | ECE | C@0.5% | C@1% | AURC | OOD AUROC |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in r["metrics"].items():
            lines.append(
                f"| {name} | {m['TV to MC']:.4f} | {m['NLL']:.4f} | {m['ECE']:.4f} | "
                f"{m['C@0.5%']:.3f} | {m['C@1%']:.3f} | {m['AURC']:.4f} | "
                f"{m['OOD AUROC']:.3f} |"
            )
        lines += [
            "",
            f"| time per pass over {r['rows_timed']} rows | CPU s | wall s | x forward |",
            "|---|---|---|---|",
        ]
        for name, v in r["time"].items():
            lines.append(
                f"| {name} | {v['cpu_s']:.5f} | {v['wall_s']:.5f} | {v['x_forward']:.2f} |"
            )
        lines += [
            "",
            "| layer | var ratio CVP/MC before | after calibration | scale c |",
            "|---|---|---|---|",
        ]
        for name, rr in r["layer_variance_ratio"].items():
            lines.append(f"| {name} | {rr['before']:.3f} | {rr['after']:.3f} | {rr['scale']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one small model, few samples")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--posterior", default="ivon", help="posterior source (same for CVP and MC)")
    ap.add_argument("--rows", type=int, default=None, help="rows per timed pass (default 4096)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method")
    ap.add_argument(
        "--sweep",
        default=None,
        help="comma-separated rows per pass for the CVP / forward sweep "
        "(default 256,1024,4096,16384)",
    )
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--out", type=Path, default=None, help="folder for the md/json results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    args.epochs, args.n_mc = (3, 50) if args.quick else (30, 1000)
    args.rows = args.rows or (512 if args.quick else 4096)
    args.sweep = [
        int(n)
        for n in (args.sweep or ("256,2048" if args.quick else "256,1024,4096,16384")).split(",")
        if n
    ]
    args.repeats = args.repeats or (2 if args.quick else 9)
    kinds = args.models.split(",") if args.models else ["mlp"] if args.quick else list(MODELS)
    d = load_digits_ood()
    env = environment(device)
    results = {k: run(k, d, args, device) for k in kinds}
    if hasattr(os, "getloadavg"):
        env["load_average_at_end"] = os.getloadavg()[0]
    config = {
        "posterior": args.posterior,
        "epochs": args.epochs,
        "n_mc": args.n_mc,
        "rows": args.rows,
        "repeats": args.repeats,
        "sweep_rows": args.sweep,
    }
    text = markdown(results, config, env)
    print(text)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        write_results(
            out,
            "cvp_vs_sampling",
            text + "\n",
            {"config": config, "environment": env, "models": results},
        )


if __name__ == "__main__":
    main()
