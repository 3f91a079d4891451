"""Same ``random_state``, same numbers, under every joblib backend.

Fits, for each joblib backend, a deep ensemble (``DeepEnsembleClassifier``,
4 members, ``n_jobs=2``) and a grid search over a Laplace classifier
(``GridSearchCV(LaplaceClassifier(...), n_jobs=2)``, 2 learning rates x 2
ways to set the prior precision, 3 folds) on the digits split, with ``random_state=0``, and
prints the largest absolute difference from the serial run of

* the ensemble's test probabilities,
* the grid search's mean CV scores and its best estimator's test probabilities.

Backends: serial (``"sequential"``), ``loky`` (processes, joblib's default),
``"threading"``, ``parallel_config(prefer="threads")`` (threads chosen by the
caller's preference), Dask with two one-thread worker processes, Dask with one
worker process of two threads, and Ray (two CPUs), the last three only where
``dask[distributed]`` / ``ray`` are installed (neither is a skuq dependency).
Each run also records whether the caller's torch and numpy global RNG states
were left as they were. Every number must be 0: the members train on a
privately seeded copy of torch's generator, one at a time within a process.

Run: ``PYTHONPATH=. python benchmarks/reproducibility.py [--quick]``; writes
``benchmarks/results/reproducibility.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from joblib import parallel_config
from sklearn.model_selection import GridSearchCV

from skuq import DeepEnsembleClassifier, LaplaceClassifier
from skuq.datasets import load_digits_ood
from skuq.nets import MLP

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, classifier_net, write_results  # noqa: E402


def make_net(epochs: int):
    return classifier_net(MLP, dict(lr=1e-2, epochs=epochs), hidden=(64,))


def run_estimators(d, epochs: int) -> dict[str, np.ndarray]:
    ensemble = DeepEnsembleClassifier(
        make_net(epochs), n_estimators=4, n_jobs=2, random_state=0
    ).fit(d.X_train, d.y_train)
    grid = GridSearchCV(
        LaplaceClassifier(make_net(epochs), random_state=0),
        {"estimator__lr": [1e-2, 3e-2], "prior_precision": ["heldout", "marglik"]},
        cv=3,
        n_jobs=2,
        scoring="neg_log_loss",
    ).fit(d.X_train, d.y_train)
    return {
        "ensemble proba": ensemble.predict_proba(d.X_test),
        "grid mean CV score": grid.cv_results_["mean_test_score"],
        "grid best proba": grid.best_estimator_.predict_proba(d.X_test),
    }


@contextlib.contextmanager
def backend(name: str):
    if name == "serial":
        with parallel_config(backend="sequential"):
            yield
    elif name in ("loky", "threading"):
        with parallel_config(backend=name):
            yield
    elif name == "threads preference":
        with parallel_config(prefer="threads"):
            yield
    elif name.startswith("dask"):
        from distributed import Client, LocalCluster

        threads = name == "dask threads"
        with (
            LocalCluster(
                n_workers=1 if threads else 2,
                threads_per_worker=2 if threads else 1,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster),
            parallel_config(backend="dask"),
        ):
            yield
    elif name == "ray":
        import ray
        from ray.util.joblib import register_ray

        register_ray()
        path = os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        try:
            with parallel_config(backend="ray"):
                yield
        finally:
            ray.shutdown()
    else:
        raise ValueError(name)


def available(name: str) -> bool:
    module = {"dask": "distributed", "ray": "ray"}.get(name.split()[0])
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per net")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=[
            "serial",
            "loky",
            "threading",
            "threads preference",
            "dask processes",
            "dask threads",
            "ray",
        ],
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # workers of every backend run one torch thread each
    epochs = 2 if args.quick else 20
    d = load_digits_ood()
    serial = None
    rows = []
    for name in args.backends:
        if not available(name):
            rows.append(f"| {name} | not installed | | | |")
            continue
        torch.manual_seed(1)
        np.random.seed(1)  # noqa: NPY002 - the caller's global RNGs, checked below
        before = torch.get_rng_state(), np.random.get_state()[1].copy()  # noqa: NPY002
        start = time.perf_counter()
        with backend(name):
            out = run_estimators(d, epochs)
        seconds = time.perf_counter() - start
        numpy_state = np.random.get_state()[1]  # noqa: NPY002
        untouched = torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(
            numpy_state, before[1]
        )
        if serial is None:
            serial = out
        diffs = [float(np.abs(out[k] - serial[k]).max()) for k in serial]
        rows.append(
            f"| {name} | "
            + " | ".join(f"{v:.3g}" for v in diffs)
            + f" | {'yes' if untouched else 'no'} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)
    header = (
        "| backend | ensemble max abs diff proba | grid search max abs diff mean CV score "
        "| grid search max abs diff best proba | global RNGs untouched | seconds |\n"
        "|---|---|---|---|---|---|"
    )
    table = "\n".join([header, *rows])
    note = (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {epochs} epochs per net, "
        "random_state=0; differences from the serial run. Seconds: wall time of each "
        "run on a shared machine, not a speed comparison.\n\n"
    )
    print(table)
    suffix = "_quick" if args.quick else ""
    write_results(RESULTS, f"reproducibility{suffix}", note + table + "\n")


if __name__ == "__main__":
    main()
