"""What several benchmark scripts share: the results folder and its writers, the skorch
nets, a timer, memory readings and the predictive entropy.

Scripts import it after putting ``benchmarks/`` on ``sys.path`` (they run as
``PYTHONPATH=. python benchmarks/<script>.py``).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor

#: where every script writes its tables and numbers (quoted by the docs)
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------- writers
def write_results(
    out_dir, stem: str, markdown: str, data=None, *, json_end: str = "", json_default=None
) -> None:
    """``<stem>.md`` with ``markdown`` as given and, with ``data``, ``<stem>.json``.

    The JSON is indented by one space, followed by ``json_end`` (the scripts' files
    differ in a final newline; each keeps its own); ``json_default`` converts what
    JSON cannot hold (e.g. ``float`` for numpy scalars).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(markdown)
    if data is not None:
        text = json.dumps(data, indent=1, default=json_default)
        (out_dir / f"{stem}.json").write_text(text + json_end)


def write_runs_csv(path, runs, columns: list[str]) -> None:
    """One CSV row per run: ``task, method, seed, error`` and the metric ``columns``.

    ``runs`` hold ``task``, ``method``, ``seed``, ``error`` and a ``metrics`` dict;
    metrics not in ``columns`` are left out, missing ones left empty.
    """
    keys = ["task", "method", "seed", "error", *columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in runs:
            row = {"task": r.task, "method": r.method, "seed": r.seed, "error": r.error}
            row.update({k: v for k, v in r.metrics.items() if k in keys})
            w.writerow(row)


# -------------------------------------------------------------------- nets
def _module_params(module_params: dict) -> dict:
    return {f"module__{k}": v for k, v in module_params.items()}


def classifier_net(module, cfg: dict, **module_params) -> NeuralNetClassifier:
    """An unfitted skorch classifier: Adam at ``cfg["lr"]`` for ``cfg["epochs"]`` epochs,
    batches of 64, no internal validation split, silent.

    ``module_params`` go to the module (``hidden=...`` becomes ``module__hidden``);
    ``cfg["weight_decay"]``, where given, to Adam.
    """
    extra = {}
    if "weight_decay" in cfg:
        extra["optimizer__weight_decay"] = cfg["weight_decay"]
    return NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=cfg["lr"],
        max_epochs=cfg["epochs"],
        batch_size=64,
        train_split=None,
        verbose=0,
        **extra,
        **_module_params(module_params),
    )


def regressor_net(module, cfg: dict, **module_params) -> NeuralNetRegressor:
    """The regression counterpart of :func:`classifier_net` (skorch's MSE loss)."""
    return NeuralNetRegressor(
        module,
        optimizer=torch.optim.Adam,
        lr=cfg["lr"],
        max_epochs=cfg["epochs"],
        batch_size=64,
        train_split=None,
        verbose=0,
        **_module_params(module_params),
    )


# ------------------------------------------------------------- time, memory
def timed(fn):
    """``(fn(), wall seconds it took)``."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rss_bytes() -> int:
    """The resident set size now (``/proc/self/statm``, Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """The kernel's resident-set high-water mark since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or sampled peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = float("nan")

    @staticmethod
    def _rss() -> int:
        try:
            return rss_bytes()
        except OSError:  # not Linux: max RSS so far (KiB on Linux, bytes on macOS)
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, self._rss())

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss()) - self._start
        self.peak_mb = max(peak, 0) / 2**20
        return False


# ---------------------------------------------------------------- metrics
def entropy(p: np.ndarray) -> np.ndarray:
    """Per-row entropy of class probabilities ``p`` (N, C), in nats."""
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
