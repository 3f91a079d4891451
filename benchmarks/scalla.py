"""ScaLLA vs full / K-FAC / last-layer Laplace and laplace-torch's ELLA on the digits OOD split.

Two nets on the same data (sklearn digits 0-4; OOD: digits 5-9), each trained
once and shared by every method (``FrozenEstimator``):

* ``small``: MLP 64-32-32-5 (3.3k weights), where the full GGN Laplace over
  all weights is still possible;
* ``large``: MLP 64-1024-1024-5 (1.12M weights): full Laplace is out of
  reach (a 1.1M x 1.1M matrix), K-FAC, last-layer, ELLA and ScaLLA are not.

Protocol. 20 % of the training rows are held out (stratified) as the
validation split; the net is trained on the rest. To compare the kernels, not
the priors, the *shared tau* rows (full Laplace, ELLA, ScaLLA) all use one
prior precision: the marginal-likelihood value of the K-FAC Laplace over all
weights. Rows marked "own marglik" / "heldout" let ScaLLA choose its own
(feature-space evidence; lowest validation NLL on the log grid 1e-4..1e4).
The OOD digits are split in two halves by row parity: AUROC (predictive
entropy) is always measured on the odd half, and the even half may serve as
ScaLLA's context set. Two context sets:

* ``proxy``: the training digits with their pixels permuted (one permutation
  per row) -- an OOD proxy that never sees a digit 5-9;
* ``OOD half``: the even half of digits 5-9 -- the optimistic case of a
  context set drawn from the OOD distribution met at test time.

ELLA: laplace-torch 0.3 ``Laplace(model, "classification",
subset_of_weights="all", hessian_structure="gp",
functional_approximation="nystrom", subsample_size=M, n_eigenvalues=k)``,
``k`` eigenvalues (fewer than ScaLLA's ``m``: ELLA's predictive costs ``k``
JVPs per batch, ScaLLA's one surrogate pass). Its Gaussian over the logits
(``_glm_predictive_distribution``) goes through skuq's default link, the
centered probit, as every other row's does, so that the rows differ in their
posteriors and not in their links.

Memory: peak bytes of the torch tensors alive during fit + predict, counted by
:class:`LiveTensorBytes` (a ``TorchDispatchMode`` that adds each new storage
an op returns and subtracts it when the storage is freed; torch keeps one
Python object per storage, so storages held only by autograd or by C++ count
until they die). Tensors that existed before (the net's weights, the data)
are not counted. Times are wall clock on the CPU, torch with 1 thread.

Run: ``PYTHONPATH=. python benchmarks/scalla.py [--quick] [--seeds 0 1 2]``; writes
``benchmarks/results/scalla.{md,json}`` (``scalla_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from skuq import LaplaceClassifier, MAPClassifier, ScaLLAClassifier
from skuq.datasets import load_digits_ood
from skuq.metrics import expected_calibration_error, negative_log_likelihood, ood_auroc
from skuq.nets import MLP
from skuq.outputs import OutputDistribution

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, classifier_net, timed, write_results  # noqa: E402


# ------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the ``with`` block and still alive.

    Every op's outputs pass through ``__torch_dispatch__``; a storage not seen
    before and not one of the op's inputs' (views and in-place results are
    not allocations) is added once, and a finalizer subtracts it when torch
    frees it. ``peak`` is the maximum of the running
    sum, ``largest`` the largest single storage.

    Examples
    --------
    >>> import torch
    >>> with LiveTensorBytes() as mem:
    ...     a = torch.zeros(1000)
    ...     b = a + 1
    ...     del a
    >>> mem.peak, mem.largest
    (8000, 4000)
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in inputs:  # seen, or a view / in-place result
                continue
            n = storage.nbytes()
            self._sizes[key] = n
            self.live += n
            self.largest = max(self.largest, n)
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


# ------------------------------------------------------------------- data
def make_data(seed: int):
    d = load_digits_ood(random_state=seed)
    X_tr, X_val, y_tr, y_val = train_test_split(
        d.X_train, d.y_train, test_size=0.2, random_state=seed, stratify=d.y_train
    )
    rng = np.random.RandomState(seed)
    proxy = np.stack([row[rng.permutation(row.size)] for row in d.X_train]).astype(np.float32)
    return dict(
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=d.X_test,
        y_test=d.y_test,
        X_ood_eval=d.X_ood[1::2],
        X_ood_context=d.X_ood[0::2],
        proxy=proxy,
    )


def train_net(data, hidden, epochs, seed):
    torch.manual_seed(seed)
    net = classifier_net(MLP, dict(lr=1e-3, epochs=epochs), hidden=hidden)
    return timed(
        lambda: MAPClassifier(net, random_state=seed, device="cpu").fit(
            data["X_train"], data["y_train"]
        )
    )


# ------------------------------------------------------------------- methods
class ELLAWrapper:
    """laplace-torch's ELLA behind the two calls the benchmark makes."""

    def __init__(self, module, n_eigenvalues, subsample_size, prior_precision, seed):
        self.module, self.k, self.m = module, n_eigenvalues, subsample_size
        self.prior_precision_, self.seed = float(prior_precision), seed
        self._memo: dict = {}

    def fit(self, data):
        from laplace import Laplace
        from torch.utils.data import DataLoader, TensorDataset

        self.la = Laplace(
            self.module,
            "classification",
            subset_of_weights="all",
            hessian_structure="gp",
            functional_approximation="nystrom",
            subsample_size=self.m,
            n_eigenvalues=self.k,
            prior_precision=self.prior_precision_,
            seed=self.seed,
        )
        data_set = TensorDataset(
            torch.as_tensor(data["X_train"]), torch.as_tensor(data["y_train"]).long()
        )
        # small batches: ELLA forms full Jacobians (batch x C x P) for the Nystrom basis
        self.la.fit(DataLoader(data_set, batch_size=16))
        return self

    def _proba(self, X):
        key = (id(X), len(X))
        if key not in self._memo:  # ELLA's predictive costs k JVPs per batch: once per array
            out = []
            for i in range(0, len(X), 256):
                mean, cov = self.la._glm_predictive_distribution(torch.as_tensor(X[i : i + 256]))
                dist = OutputDistribution.gaussian(mean.detach().double(), cov.detach().double())
                out.append(dist.probabilities("centered_probit"))  # the skuq rows' link
            self._memo[key] = torch.cat(out).numpy()
        return self._memo[key]

    def predict_proba(self, X):
        return self._proba(X)

    def predict_uncertainty(self, X):
        p = self._proba(X)
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def methods(size: str, cfg: dict) -> dict:
    """label -> (builder(frozen_net, seed, tau) -> estimator, what fit gets).

    ``tau`` is the shared prior precision: the K-FAC (all weights) marginal
    likelihood value, fitted first.
    """
    sc = dict(
        n_features=cfg["m"],
        surrogate__epochs=cfg["surrogate_epochs"],
        n_probes=cfg["n_probes"],
        device="cpu",
    )

    def laplace(**kw):
        return lambda net, s, tau: LaplaceClassifier(net, random_state=s, device="cpu", **kw)

    def scalla(prior):
        def build(net, s, tau):
            pp = tau if prior == "shared" else prior
            return ScaLLAClassifier(net, prior_precision=pp, random_state=s, **sc)

        return build

    out = {
        "MAP (bare net)": (None, ""),
        "K-FAC Laplace, all weights (marglik)": (
            laplace(subset_of_weights="all", prior_precision="marglik"),
            "tau",
        ),
        "last-layer Laplace, K-FAC (marglik)": (laplace(prior_precision="marglik"), ""),
    }
    if size == "small":
        out["full Laplace, all weights (shared tau)"] = (
            lambda net, s, tau: LaplaceClassifier(
                net,
                subset_of_weights="all",
                hessian_structure="full",
                prior_precision=tau,
                random_state=s,
                device="cpu",
            ),
            "",
        )
    out["ELLA, laplace-torch (shared tau)"] = ("ella", "")
    out["ScaLLA (shared tau)"] = (scalla("shared"), "")
    out["ScaLLA + proxy context (shared tau)"] = (scalla("shared"), "proxy")
    out["ScaLLA + OOD-half context (shared tau)"] = (scalla("shared"), "ood")
    out["ScaLLA (own marglik)"] = (scalla("marglik"), "")
    out["ScaLLA (heldout)"] = (scalla("heldout"), "cal")
    out["ScaLLA + OOD-half context (heldout)"] = (scalla("heldout"), "cal ood")
    return out


def evaluate(est, data, fit_s, mem, predict_s):
    p = est.predict_proba(data["X_test"])
    pred = p.argmax(1) if not hasattr(est, "classes_") else est.classes_[p.argmax(1)]
    return {
        "acc": float((pred == data["y_test"]).mean()),
        "nll": negative_log_likelihood(data["y_test"], p, labels=np.arange(5)),
        "ece": expected_calibration_error(data["y_test"], p, labels=np.arange(5)),
        "auroc": ood_auroc(
            est.predict_uncertainty(data["X_test"]), est.predict_uncertainty(data["X_ood_eval"])
        ),
        "fit_s": fit_s,
        "predict_s": predict_s,
        "peak_mb": mem / 2**20,
        "prior_precision": float(np.mean(getattr(est, "prior_precision_", np.nan))),
    }


def run_size(size: str, cfg: dict, seed: int, log) -> dict:
    from skuq.scalla import clear_surrogate_cache

    clear_surrogate_cache()  # every ScaLLA surrogate is trained (and timed) the first time
    data = make_data(seed)
    bare, train_s = train_net(data, cfg["hidden"], cfg["epochs"], seed)
    n_params = sum(p.numel() for p in bare.net_.module_.parameters())
    log(f"[{size}] net {cfg['hidden']} with {n_params} weights trained in {train_s:.1f}s")
    rows, tau = {}, 1.0
    for label, (build, how) in methods(size, cfg).items():
        t0 = time.perf_counter()
        with LiveTensorBytes() as mem:
            if build is None:
                est = bare
            elif build == "ella":
                est = ELLAWrapper(
                    bare.net_.module_, cfg["ella_k"], cfg["ella_subsample"], tau, seed
                ).fit(data)
            else:
                est = build(FrozenEstimator(bare.net_), seed, tau)
                kw = {}
                if "cal" in how:
                    kw.update(X_cal=data["X_val"], y_cal=data["y_val"])
                if "proxy" in how:
                    kw["context"] = data["proxy"]
                if "ood" in how:
                    kw["context"] = data["X_ood_context"]
                est.fit(data["X_train"], data["y_train"], **kw)
            fit_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            est.predict_proba(data["X_test"])
            predict_s = time.perf_counter() - t1
        if "tau" in how:
            tau = float(est.prior_precision_)
        rows[label] = evaluate(est, data, fit_s, mem.peak, predict_s)
        r = rows[label]
        log(
            f"[{size}] {label:42s} nll {r['nll']:.3f} ece {r['ece']:.3f} auroc {r['auroc']:.3f} "
            f"fit {fit_s:.1f}s peak {r['peak_mb']:.1f}MB tau {r['prior_precision']:.3g}"
        )
    return {"n_params": n_params, "train_s": train_s, "shared_tau": tau, "rows": rows}


PROFILES = {
    "full": {
        "small": dict(
            hidden=(32, 32),
            epochs=60,
            m=128,
            surrogate_epochs=50,
            n_probes=16,
            ella_k=64,
            ella_subsample=256,
        ),
        "large": dict(
            hidden=(1024, 1024),
            epochs=20,
            m=128,
            surrogate_epochs=10,
            n_probes=8,
            ella_k=32,
            ella_subsample=128,
        ),
    },
    "quick": {
        "small": dict(
            hidden=(32,),
            epochs=5,
            m=16,
            surrogate_epochs=2,
            n_probes=4,
            ella_k=16,
            ella_subsample=32,
        ),
        "large": dict(
            hidden=(256, 256),
            epochs=2,
            m=16,
            surrogate_epochs=1,
            n_probes=4,
            ella_k=8,
            ella_subsample=16,
        ),
    },
}


COLUMNS = (
    ("acc", 3),
    ("nll", 3),
    ("ece", 3),
    ("auroc", 3),
    ("prior_precision", 3),
    ("fit_s", 1),
    ("predict_s", 2),
    ("peak_mb", 1),
)


def _cell(values: list[float], digits: int) -> str:
    """``mean +- std`` over seeds (``g`` format for prior precisions, which span decades)."""
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "—"
    fmt = (
        (lambda x: f"{x:.3g}")
        if digits == 3 and np.nanmax(np.abs(v)) >= 100
        else (lambda x: f"{x:.{digits}f}")
    )
    return fmt(v.mean()) if len(v) == 1 else f"{fmt(v.mean())} ± {fmt(v.std())}"


def markdown(results: dict, header: str) -> str:
    """One table per net size, each cell the mean ± std over the seeds of ``results``."""
    lines = [header]
    seeds = list(results)
    for size in results[seeds[0]]:
        per_seed = [results[s][size] for s in seeds]
        taus = ", ".join(f"{r['shared_tau']:.3g}" for r in per_seed)
        train = np.mean([r["train_s"] for r in per_seed])
        lines += [
            "",
            f"## {size} net: {per_seed[0]['n_params']:,} weights "
            f"(training {train:.1f} s; shared tau per seed {taus})",
            "",
            "| method | acc | NLL | ECE | OOD AUROC | prior prec. | fit s | predict s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label in per_seed[0]["rows"]:
            cells = [
                _cell([r["rows"][label][key] for r in per_seed], digits) for key, digits in COLUMNS
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header_text(cmd: str, seeds: list[int], profile: dict) -> str:
    """The table's preamble: the command and every setting that shapes the numbers."""
    small, large = profile["small"], profile["large"]
    return (
        f"# ScaLLA on the digits OOD split\n\n`{cmd}`: seeds {', '.join(map(str, seeds))} "
        "(mean ± std over seeds; each seed its own split, net and surrogate); CPU, torch 1 thread "
        f"({platform.processor() or platform.machine()}). ScaLLA: m = {small['m']} features, "
        f"default surrogate (MLP 256-256), {small['surrogate_epochs']} / "
        f"{large['surrogate_epochs']} surrogate epochs and {small['n_probes']} / "
        f"{large['n_probes']} Rademacher probes per step (small / large net). ELLA: "
        f"k = {small['ella_k']} / {large['ella_k']} eigenvalues from "
        f"{small['ella_subsample']} / {large['ella_subsample']} rows. OOD AUROC on the odd half of "
        "digits 5-9 (the even half is the 'OOD-half' context set). Peak MB: torch tensors "
        "alive during fit + predict (see the module docstring). ScaLLA rows after the first "
        "with the same context reuse its trained surrogate (skuq.scalla's cache): their "
        "fit s is the feature-space posterior only."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny nets and loops (smoke run)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one split, net and surrogate per seed (default: 0 1 2)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    profile = PROFILES["quick" if args.quick else "full"]
    results = {
        seed: {size: run_size(size, cfg, seed, print) for size, cfg in profile.items()}
        for seed in args.seeds
    }
    cmd = "PYTHONPATH=. python benchmarks/scalla.py" + (" --quick" if args.quick else "")
    if args.seeds != [0, 1, 2]:
        cmd += " --seeds " + " ".join(map(str, args.seeds))
    header = header_text(cmd, args.seeds, profile)
    table = markdown(results, header)
    print(table)
    stem = "scalla_quick" if args.quick else "scalla"
    write_results(
        args.out_dir,
        stem,
        table,
        {
            "command": cmd,
            "seeds": args.seeds,
            "profile": {
                k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in c.items()}
                for k, c in profile.items()
            },
            "results": results,
        },
    )
    return results


if __name__ == "__main__":
    main()
