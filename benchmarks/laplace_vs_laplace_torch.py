"""skuq's Laplace engine side by side with laplace-torch 0.3 on the same trained nets.

For every (subset_of_weights, hessian_structure) pair -- (all, diag), (all,
kron), (all, full), (last_layer, diag), (last_layer, kron), (last_layer,
full) -- each library runs in a fresh process of its own, on the same trained
weights and data, with the same number of torch threads (``--threads``, 1 by
default) and the same batch size:

* **fit**: the curvature over the training set and the posterior, at prior
  precision 1 (skuq: ``LaplaceClassifier(net, prior_precision=1.0).fit``;
  laplace-torch: ``Laplace(...).fit(loader)``, its default CurvlinopsGGN
  backend);
* **marglik**: the scalar marginal-likelihood prior precision, each library
  its own way (laplace-torch: ``optimize_prior_precision(method="marglik")``,
  100 Adam steps on log delta; skuq: ``posterior_.optimize_prior_precision()``,
  a bounded 1-D search), reported separately per library;
* **predict**: glm/probit class probabilities for the test rows, **at the same
  prior precision for both**: skuq's marglik value, given to laplace-torch
  (``la.prior_precision = delta``) before it predicts, so that the NLL and ECE
  compare the two engines and not the two optimizers;
* **peak memory** over fit + marglik + predict, above the level after the net,
  the data and the libraries are loaded: on the CPU the peak of the process's
  resident set size (the kernel's ``VmHWM``, reset through
  ``/proc/self/clear_refs`` at the start of each phase; torch's CPU tensors are
  invisible to tracemalloc, so RSS is the honest measure); on CUDA
  ``torch.cuda.max_memory_allocated`` above the allocation at the start;
* NLL and ECE (15 bins) of the predictions, on the test rows both libraries
  predicted.

Where laplace-torch would take an hour, the run does not wait for it: its
``fit`` stops after ``fit_budget_s`` (the loader checks the clock before each
batch) and the row reports the rows done and the time extrapolated to all
rows; prediction of either library stops after ``predict_budget_s`` (checked
after each batch) and its time is extrapolated to all test rows (†), the NLL
then being that of the rows both predicted (‡). A configuration that fails (an
error, a timeout, the memory cap ``--mem-cap-gb``) or that is not run because
it cannot fit (a dense P x P curvature over 25k or 1M weights) is a row of the
table with the reason.

Nets (trained once, in the parent process, and loaded by every child):

* ``digits``: MLP 64-128-128-5 (25,477 weights) on the digits 0-4
  (``load_digits_ood``: 630 training rows, 271 test rows), batch size 128;
* ``mlp``: MLP 784-256-256-10 (269,322 weights, last layer 2,570) on the
  synthetic images flattened to 784 pixels, 2,000 training rows and 500 test
  rows, batch size 128 (not in the default ``--tasks``: run it with
  ``--tasks mlp --threads 2``);
* ``images``: a CNN of 1,092,298 weights (conv 16, conv 32, each 3x3 + ReLU
  + 2x2 max-pool, dense 1568-640-128-10) on 28x28 synthetic stripe images
  (``make_synthetic_images``, pixel noise 2.0), 12,000 training rows and
  2,000 test rows, batch size 32 (at 64, laplace-torch's all-weights
  predictive passes 8 GB); ``--quick``: 1,000 and 100 rows, batch size 8.

Run: ``PYTHONPATH=. python benchmarks/laplace_vs_laplace_torch.py [--quick]
[--device cpu|cuda] [--threads 1]`` (about 10 minutes on 1 CPU thread, 5 with
``--quick``); writes ``benchmarks/results/laplace_vs_laplace_torch.{md,json}``
(``_quick`` with ``--quick``, ``_cuda`` on a GPU, where memory is the CUDA
allocator's peak). ``--tasks``, ``--configs``, ``--n-train``, ``--n-test``,
``--batch-size``, ``--fit-budget`` and ``--predict-budget`` change the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, hwm_bytes, reset_hwm, rss_bytes, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("skuq", "laplace-torch")
CONFIGS = [
    ("all", "diag"),
    ("all", "kron"),
    ("all", "full"),
    ("last_layer", "diag"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
]
#: laplace-torch forms a dense P x P GGN for "full" and factorizes it at every marglik step
LT_FULL_MAX_PARAMS = 20_000
PROFILES = {
    # the images task's rows, training epochs and batch size (both libraries); the seconds
    # of laplace-torch fit and of prediction before they stop and the rest is extrapolated
    "full": dict(
        n_train=12_000, n_test=2_000, epochs=4, batch_size=32, fit_budget_s=120, predict_budget_s=30
    ),
    "quick": dict(
        n_train=1_000, n_test=100, epochs=6, batch_size=8, fit_budget_s=15, predict_budget_s=10
    ),
}
DIGITS_BATCH = 128
#: the ``mlp`` task: training and test rows, batch size and epochs
MLP_ROWS = (2_000, 500)
MLP_BATCH = 128
MLP_EPOCHS = 10
TITLES = {
    "digits": "digits MLP 64-128-128-5",
    "images": "images CNN (conv 16, conv 32, dense 1568-640-128-10)",
    "mlp": "images MLP 784-256-256-10",
}
#: pixel noise of the synthetic images: at 2.0 the CNN reaches ~0.97 test accuracy in 4
#: epochs (at 1.0 it is perfect, and NLL comparisons lose their meaning)
NOISE = 2.0


# --------------------------------------------------------------------- tasks
def make_net(task: str) -> nn.Module:
    if task == "mlp":
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if task == "digits":
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5)
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1568, 640),
        nn.ReLU(),
        nn.Linear(640, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def load_task(task: str, profile: dict):
    if task == "digits":
        from skuq.datasets import load_digits_ood

        d = load_digits_ood()
        return d.X_train, d.y_train, d.X_test, d.y_test
    from skuq.datasets import make_synthetic_images

    if task == "mlp":  # the images, flattened to 784 pixels
        n_train, n_test = MLP_ROWS
        d = make_synthetic_images(n_train + n_test, noise=NOISE, random_state=1)
        X = d.X.reshape(len(d.X), -1)
        return X[:n_train], d.y[:n_train], X[n_train:], d.y[n_train:]
    n_train, n_test = profile["n_train"], profile["n_test"]
    d = make_synthetic_images(n_train + n_test, noise=NOISE, random_state=0)
    return d.X[:n_train], d.y[:n_train], d.X[n_train:], d.y[n_train:]


def save_task(task: str, profile: dict, path: str) -> None:
    """The task's arrays in one file, so that every child loads them instead of redrawing."""
    X, y, X_test, y_test = load_task(task, profile)
    np.savez(path, X=X, y=y, X_test=X_test, y_test=y_test)


def read_task(path: str):
    d = np.load(path)
    return d["X"], d["y"], d["X_test"], d["y_test"]


def batch_size(task: str, profile: dict) -> int:
    return {"digits": DIGITS_BATCH, "mlp": MLP_BATCH}.get(task, profile["batch_size"])


def train(task: str, data: str, epochs: int, path: str, device: torch.device) -> dict:
    """Train the task's net with Adam, save its weights; returns its test metrics."""
    from skuq.metrics import expected_calibration_error, negative_log_likelihood

    X, y, X_test, y_test = read_task(data)
    torch.manual_seed(0)
    model = make_net(task).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y).long()
    t = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt))
        for i in range(0, len(Xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            out = model(Xt[idx].to(device))
            nn.functional.cross_entropy(out, yt[idx].to(device)).backward()
            opt.step()
    train_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        proba = torch.cat(
            [
                torch.softmax(model(torch.as_tensor(X_test[i : i + 256]).to(device)), -1).cpu()
                for i in range(0, len(X_test), 256)
            ]
        )
    proba = proba.double().numpy()
    torch.save(model.cpu().state_dict(), path)
    labels = np.unique(y)
    return dict(
        n_params=sum(p.numel() for p in model.parameters()),
        n_train=len(X),
        n_test=len(X_test),
        epochs=epochs,
        train_s=train_s,
        map_accuracy=float((proba.argmax(1) == y_test).mean()),
        map_nll=negative_log_likelihood(y_test, proba, labels=labels),
        map_ece=expected_calibration_error(y_test, proba, labels=labels),
    )


# ------------------------------------------------------------------- memory
def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; ``False`` where the kernel does not allow it."""
    try:
        reset_hwm()
        hwm_bytes()
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory above the level at ``start()``, per phase and overall.

    CPU: the kernel's own high-water mark of the resident set (``VmHWM``), reset
    at the start of each phase through ``/proc/self/clear_refs`` -- exact, no
    spike between two samples is missed; where that reset is not allowed, the
    RSS sampled every 2 ms. A thread samples the RSS every 2 ms in any case, and
    a process passing ``cap_bytes`` ends itself (exit code 3), so that one
    configuration cannot take the machine down. CUDA: the caching allocator's
    peak above the allocation at the start.
    """

    def __init__(self, device: torch.device, cap_bytes: float):
        self.cuda = device.type == "cuda"
        self.cap = cap_bytes
        self.phases: dict[str, float] = {}

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.exact = _reset_hwm()
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            if rss > self.cap:
                sys.stderr.write(
                    f"MEMORY CAP: RSS {rss / 2**30:.1f} GB above the cap of "
                    f"{self.cap / 2**30:.1f} GB\n"
                )
                sys.stderr.flush()
                os._exit(3)

    def phase(self, name: str) -> None:
        """Close a phase: its peak above the start (MB); the next phase starts now."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = max(self.peak, rss_bytes())
            if self.exact:
                peak = max(peak, hwm_bytes())
                _reset_hwm()
            self.peak = rss_bytes()
        self.phases[name] = max(peak - self.base, 0) / 2**20

    def stop(self) -> float:
        if not self.phases:
            self.phase("unfinished")
        if not self.cuda:
            self._stop.set()
            self._thread.join()
        return max(self.phases.values())


# ------------------------------------------------------------------ one child
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FitBudgetExceeded(RuntimeError):
    pass


class BudgetLoader:
    """A DataLoader stand-in that stops a fit after ``budget_s`` seconds, with the progress.

    laplace-torch reads ``dataset`` and ``batch_size`` and iterates; each new batch
    first checks the clock, so a fit that would take an hour stops at the budget
    and reports how many rows it did in how long.
    """

    def __init__(self, loader, budget_s: float):
        self.loader, self.budget_s = loader, budget_s
        self.dataset, self.batch_size = loader.dataset, loader.batch_size
        self.t0 = None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.t0 = self.t0 or time.perf_counter()
        done = 0
        for batch in self.loader:
            elapsed = time.perf_counter() - self.t0
            if elapsed > self.budget_s and done:
                raise FitBudgetExceeded(done, elapsed)
            yield batch
            done += len(batch[0])


def child(spec: dict) -> dict:
    """One library on one (task, subset, structure), in this fresh process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    task, subset, structure = spec["task"], spec["subset"], spec["structure"]
    X, y, X_test, _ = read_task(spec["data"])
    bs = spec["batch_size"]
    model = make_net(task)
    model.load_state_dict(torch.load(spec["weights"]))
    model.to(device).eval()
    if spec["lib"] == "laplace-torch":
        from laplace import Laplace

        loader = BudgetLoader(
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y).long()),
                batch_size=bs,
            ),
            spec["fit_budget_s"],
        )
        Xs = torch.as_tensor(X_test)
    else:
        from skuq import LaplaceClassifier
    # modules imported lazily on first use -- torch._dynamo by torch.func's first call
    # (~100 MB of code), skorch by skuq's first check of the estimator (~20 MB) -- are
    # imported here, before the baseline: peak memory and time count the work only
    for module in ("torch._dynamo", "skorch"):
        importlib.import_module(module)

    out: dict = {}
    mem = PeakMemory(device, spec["mem_cap_gb"] * 2**30)
    mem.start()
    t = time.perf_counter()
    if spec["lib"] == "skuq":
        est = LaplaceClassifier(
            model,
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=1.0,
            pred_type="glm",
            link_approx="probit",
            batch_size=bs,
            device=str(device),
        )
        est.fit(X, y)
        post = est.posterior_
    else:
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=1.0,
        )
        try:
            la.fit(loader)
        except FitBudgetExceeded as stop:
            done, elapsed = stop.args
            return dict(
                error=f"fit stopped at the {spec['fit_budget_s']:.0f} s budget after "
                f"{done:,} of {len(X):,} rows ({elapsed:.0f} s): ~"
                f"{elapsed * len(X) / done / 60:.0f} min for all rows",
                fit_rows_done=done,
                fit_s_measured=elapsed,
                fit_s_extrapolated=elapsed * len(X) / done,
                peak_mb_fit=mem.stop(),
            )
    _sync(device)
    out["fit_s"] = time.perf_counter() - t
    mem.phase("fit")

    t = time.perf_counter()
    if spec["lib"] == "skuq":
        post.optimize_prior_precision()
        out["marglik_delta"] = float(post.prior_precision)
    else:
        la.optimize_prior_precision(method="marglik", pred_type="glm")
        out["marglik_delta"] = float(la.prior_precision)
    _sync(device)
    out["marglik_s"] = time.perf_counter() - t
    mem.phase("marglik")

    # predict, batch by batch, until the test rows or the time budget run out
    delta = spec["delta"] if spec["delta"] is not None else out["marglik_delta"]
    out["predict_delta"] = delta
    if spec["lib"] == "skuq":
        post.set_hyperparameters(prior_precision=delta)
    else:
        la.prior_precision = delta
    parts = []
    t = time.perf_counter()
    for i in range(0, len(X_test), bs):
        if spec["lib"] == "skuq":
            parts.append(est.predict_proba(X_test[i : i + bs]))
        else:
            p = la(Xs[i : i + bs].to(device), pred_type="glm", link_approx="probit")
            parts.append(p.detach().cpu().double().numpy())
        _sync(device)
        if time.perf_counter() - t > spec["predict_budget_s"]:
            break
    out["predict_s"] = time.perf_counter() - t
    proba = np.concatenate(parts).astype(np.float64)
    out["predict_rows"] = len(proba)
    if len(proba) < len(X_test):  # the time for all test rows, at the rate measured
        out["predict_s_measured"] = out["predict_s"]
        out["predict_s"] = out["predict_s"] * len(X_test) / len(proba)
    mem.phase("predict")
    out["peak_mb"] = mem.stop()
    out["peak_mb_phases"] = dict(mem.phases)
    np.save(spec["proba"], proba / proba.sum(1, keepdims=True))
    return out


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        if res.returncode == 3 and lines and lines[-1].startswith("MEMORY CAP"):
            return {"error": "stopped: " + lines[-1].split(": ", 1)[1]}
        if res.returncode < 0:
            return {"error": f"killed by signal {-res.returncode}"}
        return {"error": (lines[-1] if lines else f"exit code {res.returncode}")[:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def timed_child(spec: dict, timeout: float) -> dict:
    load = os.getloadavg()[0]
    t = time.perf_counter()
    res = run_child(spec, timeout)
    res["loadavg_1min_before"] = load
    res["wall_s"] = time.perf_counter() - t
    return res


def merge_runs(runs: list[dict]) -> dict:
    """One result from repeated runs of a (library, config).

    The machine is shared, so a short run's time is noisy: the run with the least
    fit + predict time is kept (timings are the minimum). Peak RSS varies between
    identical runs too (the allocator's heap, code pages touched first): the
    median of the runs' peaks is reported, and all of them are kept.
    """
    runs = [r for r in runs if "error" not in r] or runs[:1]
    if "error" in runs[0]:
        return runs[0]
    best = dict(min(runs, key=lambda r: r["fit_s"] + r["predict_s"]))
    best["runs"] = len(runs)
    best["fit_predict_s_runs"] = [r["fit_s"] + r["predict_s"] for r in runs]
    best["peak_mb_runs"] = [r["peak_mb"] for r in runs]
    best["peak_mb"] = float(np.median(best["peak_mb_runs"]))
    return best


def run_config(specs: dict, timeout: float, repeats: int, below_s: float) -> dict:
    """Both libraries on one config: skuq, then laplace-torch at skuq's marglik delta.

    Runs shorter than ``below_s`` are repeated, the two libraries alternating
    (skuq, laplace-torch, skuq, ...) so that both see the same load on a shared
    machine, up to ``repeats`` runs each.
    """
    runs = {lib: [] for lib in specs}
    for _ in range(repeats):
        for lib, spec in specs.items():
            if runs[lib] and (runs[lib][-1]["wall_s"] > below_s or "error" in runs[lib][-1]):
                continue
            if lib == "laplace-torch" and "skuq" in runs:
                first = runs["skuq"][0]
                spec["delta"] = first.get("marglik_delta")  # predict at skuq's delta
            runs[lib].append(timed_child(spec, timeout))
        if all(r[-1]["wall_s"] > below_s or "error" in r[-1] for r in runs.values()):
            break
    return {lib: merge_runs(r) for lib, r in runs.items()}


def score(row: dict, y_test: np.ndarray, labels: np.ndarray, probas: dict) -> None:
    """NLL, ECE and accuracy of each library on the test rows that both predicted."""
    from skuq.metrics import expected_calibration_error, negative_log_likelihood

    done = [len(p) for p in probas.values()]
    if not done:
        return
    n = min(done)
    row["scored_rows"] = n
    for lib, p in probas.items():
        p, yt = p[:n], y_test[:n]
        row[lib].update(
            nll=negative_log_likelihood(yt, p, labels=labels),
            ece=expected_calibration_error(yt, p, labels=labels),
            accuracy=float((p.argmax(1) == yt).mean()),
        )
    if len(probas) == 2:
        a, b = probas.values()
        row["max_abs_proba_diff"] = float(np.abs(a[:n] - b[:n]).max())


def forward_floor(task: str, data: str, weights: str, bs: int, device: torch.device) -> dict:
    """Seconds of one no-grad forward pass over the training rows and over the test rows.

    Any last-layer Laplace needs the features of every training row (fit) and of
    every test row (predict): this is the floor of its fit + predict time.
    """
    X, _, X_test, _ = read_task(data)
    model = make_net(task)
    model.load_state_dict(torch.load(weights))
    model.to(device).eval()
    out = {}
    for key, arr in (("forward_train_s", X), ("forward_test_s", X_test)):
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(arr), bs):
                model(torch.as_tensor(arr[i : i + bs]).to(device))
        _sync(device)
        out[key] = time.perf_counter() - t
    return out


def _git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "skuq",
                "benchmarks",
                ":(exclude)benchmarks/results",
            ],
            cwd=ROOT,
            text=True,
            capture_output=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def skip_reason(lib: str, subset: str, structure: str, n_params: int, n_last: int):
    """Why a configuration is not run at all (None: run it)."""
    p = n_params if subset == "all" else n_last
    if lib == "laplace-torch" and structure == "full" and p > LT_FULL_MAX_PARAMS:
        gb = p * p * 4 / 2**30
        return (
            f"not run: a dense {p:,} x {p:,} GGN ({gb:,.1f} GB in float32), "
            "factorized at each of its 100 marglik steps"
        )
    return None


def last_layer_size(task: str) -> int:
    layer = [m for m in make_net(task).modules() if isinstance(m, nn.Linear)][-1]
    return sum(p.numel() for p in layer.parameters())


# --------------------------------------------------------------------- main
def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (fewer image rows)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both libraries")
    parser.add_argument("--tasks", default="digits,images")
    parser.add_argument("--configs", default=None, help="subset:structure,... (default: all six)")
    parser.add_argument("--n-train", type=int, help="images: training rows")
    parser.add_argument("--n-test", type=int, help="images: test rows")
    parser.add_argument("--batch-size", type=int, help="images: batch size of both libraries")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per child")
    parser.add_argument(
        "--predict-budget",
        type=float,
        default=None,
        help="seconds of prediction per child; beyond, the time for all "
        "test rows is extrapolated from the rows done",
    )
    parser.add_argument(
        "--fit-budget",
        type=float,
        default=None,
        help="seconds of laplace-torch fit per child; beyond, the fit stops "
        "and its time for all rows is extrapolated",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of a (library, config) whose run is shorter than "
        "--repeat-below seconds; the fastest is kept",
    )
    parser.add_argument("--repeat-below", type=float, default=20.0)
    parser.add_argument(
        "--mem-cap-gb",
        type=float,
        default=8.0,
        help="a child whose RSS passes this ends itself (CPU)",
    )
    parser.add_argument("--out-name", default=None, help="results file stem")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    profile_name = "quick" if args.quick else "full"
    profile = dict(PROFILES[profile_name])
    for key, value in (
        ("n_train", args.n_train),
        ("n_test", args.n_test),
        ("batch_size", args.batch_size),
        ("fit_budget_s", args.fit_budget),
        ("predict_budget_s", args.predict_budget),
    ):
        if value is not None:
            profile[key] = value
            profile_name += "+custom"
    configs = (
        CONFIGS if args.configs is None else [tuple(c.split(":")) for c in args.configs.split(",")]
    )
    t_all = time.perf_counter()
    rows, tasks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            data = os.path.join(tmp, f"{task}.npz")
            save_task(task, profile, data)
            _, y, _, y_test = read_task(data)
            labels = np.unique(y)
            path = os.path.join(tmp, f"{task}.pt")
            epochs = {"digits": 30, "mlp": MLP_EPOCHS}.get(task, profile["epochs"])
            info = train(task, data, epochs, path, device)
            info["batch_size"] = batch_size(task, profile)
            info.update(forward_floor(task, data, path, info["batch_size"], device))
            info["n_last_layer"] = last_layer_size(task)
            tasks[task] = info
            print(task, info, flush=True)
            for subset, structure in configs:
                row = dict(task=task, subset=subset, structure=structure)
                specs, probas = {}, {}
                for lib in LIBS:
                    reason = skip_reason(
                        lib, subset, structure, info["n_params"], info["n_last_layer"]
                    )
                    if reason:
                        row[lib] = {"error": reason}
                        continue
                    specs[lib] = dict(
                        lib=lib,
                        task=task,
                        subset=subset,
                        structure=structure,
                        data=data,
                        weights=path,
                        proba=os.path.join(tmp, f"proba-{lib}.npy"),
                        batch_size=info["batch_size"],
                        device=args.device,
                        threads=args.threads,
                        delta=None,
                        mem_cap_gb=args.mem_cap_gb,
                        predict_budget_s=profile["predict_budget_s"],
                        fit_budget_s=profile["fit_budget_s"],
                    )
                for lib, res in run_config(
                    specs, args.timeout, args.repeats, args.repeat_below
                ).items():
                    row[lib] = res
                    if "error" not in res:
                        probas[lib] = np.load(specs[lib]["proba"])
                        os.remove(specs[lib]["proba"])
                score(row, y_test, labels, probas)
                for lib in LIBS:
                    print(task, subset, structure, lib, row[lib], flush=True)
                rows.append(row)
    meta = dict(
        device=args.device,
        threads=args.threads,
        profile=profile_name,
        images=dict(profile, noise=NOISE),
        mem_cap_gb=args.mem_cap_gb,
        timeout_s=args.timeout,
        repeats=args.repeats,
        repeat_below_s=args.repeat_below,
        torch=torch.__version__,
        laplace_torch=_version("laplace-torch"),
        cpu=_cpu_name(),
        python=platform.python_version(),
        tasks=tasks,
        git=_git_state(),
        total_s=time.perf_counter() - t_all,
        command="PYTHONPATH=. python benchmarks/laplace_vs_laplace_torch.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    )
    name = args.out_name or (
        "laplace_vs_laplace_torch"
        + ("_quick" if args.quick else "")
        + ("_cuda" if device.type == "cuda" else "")
    )
    write(rows, meta, name)
    return rows


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------- tables
def summarize(row: dict) -> dict:
    """One row's comparison: speed-up of skuq in fit + predict, memory ratio, NLL gap."""
    s, lt = row["skuq"], row["laplace-torch"]
    if "error" in s or "error" in lt:
        return {}
    a = s["fit_s"] + s["predict_s"]
    b = lt["fit_s"] + lt["predict_s"]
    out = dict(
        fit_predict_s=[a, b],
        speedup=b / a,
        memory_ratio=s["peak_mb"] / max(lt["peak_mb"], 1e-9),
        nll_rel_diff=abs(s["nll"] - lt["nll"]) / max(lt["nll"], 1e-12),
    )
    out["target_met"] = bool(
        out["speedup"] >= 2 and s["peak_mb"] <= lt["peak_mb"] and out["nll_rel_diff"] <= 0.01
    )
    return out


def _predict_cell(r: dict) -> str:
    if "predict_s_measured" in r:
        return f"{r['predict_s']:.1f}†"
    return f"{r['predict_s']:.2f}"


def _error_cell(msg: str) -> str:
    return msg.replace("|", "/")


def table(rows: list[dict], task: str, n_test: int) -> str:
    lines = [
        "| subset / structure | fit s skuq / l-t | predict s skuq / l-t | fit+predict "
        "speed-up | marglik s skuq / l-t | peak MB skuq / l-t | NLL skuq / l-t | ECE skuq / l-t "
        "| marglik δ skuq / l-t | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if r["task"] != task:
            continue
        s, lt = r["skuq"], r["laplace-torch"]
        name = f"{r['subset']} / {r['structure']}"
        if "error" not in s and "fit_s_extrapolated" in lt:
            a = s["fit_s"] + s["predict_s"]
            bound = lt["fit_s_extrapolated"] / a
            r["summary"] = dict(
                speedup_at_least=bound, laplace_torch_fit_s_extrapolated=(lt["fit_s_extrapolated"])
            )
            met = bound >= 2 and s["peak_mb"] <= lt["peak_mb_fit"]
            lines.append(
                f"| {name} | {s['fit_s']:.2f} / ~{lt['fit_s_extrapolated']:,.0f}§ | "
                f"{_predict_cell(s)} / – | **≥ {bound:,.0f}×** | {s['marglik_s']:.2f} / – | "
                f"{s['peak_mb']:.0f} / ≥ {lt['peak_mb_fit']:.0f} | {s['nll']:.4f} / – | "
                f"{s['ece']:.4f} / – | {s['marglik_delta']:.3g} / – | "
                f"{'met on time and memory; NLL not comparable' if met else 'missed'} |"
            )
            notes.append(
                f"§ {name}, l-t: {lt['error']}; the speed-up counts its fit alone, "
                "its peak memory is that of the rows done."
            )
            continue
        if "error" in s or "error" in lt:
            cells = []
            for lib, short in (("skuq", "skuq"), ("laplace-torch", "l-t")):
                res = r[lib]
                if "error" in res:
                    cells.append(f"{short}: {_error_cell(res['error'])}")
                else:
                    cells.append(
                        f"{short}: fit {res['fit_s']:.2f} s, predict "
                        f"{_predict_cell(res)} s, {res['peak_mb']:.0f} MB, NLL "
                        f"{res['nll']:.4f}, marglik δ {res['marglik_delta']:.3g}"
                    )
            lines.append(f"| {name} | {'; '.join(cells)} | | | | | | | | not comparable |")
            continue
        m = summarize(r)
        r["summary"] = m
        nll = f"{s['nll']:.4f} / {lt['nll']:.4f}"
        if r["scored_rows"] < n_test:
            nll += f" ‡{r['scored_rows']}"
        lines.append(
            f"| {name} | {s['fit_s']:.2f} / {lt['fit_s']:.2f} | {_predict_cell(s)} / "
            f"{_predict_cell(lt)} | **{m['speedup']:.1f}×** | {s['marglik_s']:.2f} / "
            f"{lt['marglik_s']:.2f} | {s['peak_mb']:.0f} / {lt['peak_mb']:.0f} | "
            f"{nll} | {s['ece']:.4f} / {lt['ece']:.4f} | "
            f"{s['marglik_delta']:.3g} / {lt['marglik_delta']:.3g} | "
            f"{'met' if m['target_met'] else 'missed'} |"
        )
        for lib, short in (("skuq", "skuq"), ("laplace-torch", "l-t")):
            if "predict_s_measured" in r[lib]:
                notes.append(
                    f"† {name}, {short}: {r[lib]['predict_rows']:,} of {n_test:,} test rows "
                    f"predicted in {r[lib]['predict_s_measured']:.1f} s (the time budget); "
                    "the time shown is for all rows at that rate."
                )
        if r["scored_rows"] < n_test:
            notes.append(
                f"‡ {name}: NLL and ECE on the {r['scored_rows']:,} test rows both "
                "libraries predicted."
            )
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def write(rows: list[dict], meta: dict, name: str) -> None:
    cpu = meta["device"] == "cpu"
    parts = [
        f"# skuq vs laplace-torch {meta['laplace_torch']}: Laplace fit, marglik and predict\n",
        f"Device: {meta['device']} ({meta['cpu'] if cpu else 'GPU'}), {meta['threads']} torch "
        f"thread(s) for both libraries, torch {meta['torch']}, Python {meta['python']}, skuq "
        f"at {meta['git']}. "
        f"Command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min in all).\n",
        "Each library in a fresh process per configuration, on the same trained weights and "
        "data and the same batch size; a run shorter than "
        f"{meta['repeat_below_s']:.0f} s is repeated up to {meta['repeats']} times and the "
        "fastest kept (with the median of the peak memories). *fit*: curvature and "
        "posterior; *marglik*: each "
        "library's own scalar marginal-likelihood prior precision (its δ in the last "
        "column); *predict*: glm/probit probabilities of the test rows, both at skuq's "
        "marglik δ, so that NLL and ECE compare the engines at an equal prior "
        f"(prediction stops after {meta['images']['predict_budget_s']:.0f} s and the time for "
        "all rows is extrapolated, †); *peak MB*: "
        + ("the peak CUDA allocation" if not cpu else "the peak resident set size")
        + " over fit + marglik + predict above the level after loading the net and the "
        f"data (a child passing {meta['mem_cap_gb']:.0f} GB is stopped). *target*: skuq at "
        "least 2× faster in fit + predict, no more memory, NLL within 1 %.\n",
    ]
    for task, info in meta["tasks"].items():
        title = TITLES[task]
        data = (
            "the digits 0-4 of `load_digits_ood`"
            if task == "digits"
            else f"`make_synthetic_images` (28x28, noise {meta['images']['noise']}"
            + (", flattened)" if task == "mlp" else ")")
        )
        parts.append(
            f"## {title}: {info['n_params']:,} weights, last layer {info['n_last_layer']:,}\n\n"
            f"{data}: {info['n_train']:,} training rows, {info['n_test']:,} test rows, batch "
            f"size {info['batch_size']}; the net (Adam, {info['epochs']} epochs, "
            f"{info['train_s']:.1f} s): accuracy {info['map_accuracy']:.3f}, NLL "
            f"{info['map_nll']:.4f}, ECE {info['map_ece']:.4f}. One forward pass without "
            f"gradients takes {info['forward_train_s']:.3f} s over the training rows and "
            f"{info['forward_test_s']:.3f} s over the test rows: "
            f"{info['forward_train_s'] + info['forward_test_s']:.3f} s, the floor of any "
            "last-layer fit + predict.\n\n" + table(rows, task, info["n_test"]) + "\n"
        )
    text = "\n".join(parts)
    print(text)
    write_results(RESULTS, name, text, dict(meta=meta, rows=rows), json_end="\n")


if __name__ == "__main__":
    main()
