"""Every skuq estimator at its defaults under dataset shift: the shift benchmark.

Per task: an in-distribution test split, shifted copies of it (corruption types
x 5 severities, in the style of MNIST-C / CIFAR-10-C) and an OOD set. The
question it answers: does a method at its defaults beat the bare net (MAP)
where uncertainty matters -- on shifted and OOD inputs -- without losing
accuracy or in-distribution calibration?

Tasks (classification unless said)

* ``digits_mlp`` / ``digits_cnn``: scikit-learn's 8x8 digits 0-4, as 64-vectors
  with an MLP and as 1x8x8 images with ``skuq.nets.SmallCNN``; OOD: digits 5-9.
* ``mnist1d_mlp`` / ``mnist1d_cnn``: MNIST-1D (``mnist1d.make_dataset`` with its
  default arguments, generated offline: 5000 signals of length 40), classes
  0-4, with an MLP and a small 1-D CNN; OOD: the test signals of classes 5-9.
* ``images``: the synthetic stripe images of ``skuq.datasets`` (16x16, pixel
  noise 1.0), SmallCNN; OOD: the blob images.
* ``wine`` / ``breast_cancer``: standardized tabular data, MLP; OOD as in
  ``benchmarks/compare.py`` (feature-shuffled / 5x far-shifted test rows).
* ``gap_regression``: 1-D regression with a gap in the data; in-distribution
  rows are the test grid inside the data's support, OOD rows the grid in the
  gap and beyond [-2, 2] (extrapolation). Reported: RMSE, Gaussian NLL and the
  coverage of the central 95 % interval on in-distribution rows, OOD AUROC of
  the predictive std.
* ``friedman_regression``: scikit-learn's ``make_friedman1`` (10 features
  uniform on [0, 1], 5 of them used, noise std 1; 600 rows, 30 % test),
  standardized X and y, MLP; in-distribution rows are the test split, OOD
  rows the test split's standardized features times 3 (extrapolation beyond
  the training range in almost every feature). Reported as ``gap_regression``.

Corruptions (severity 1-5; each applied to the whole in-distribution test split
with a fixed random stream per task, seed and corruption)

* images (8x8 digits, 16x16 synthetic): ``noise`` (Gaussian, std 0.2-1.0 x the
  training pixels' std), ``blur`` (Gaussian, 0.3-1.1 px at 8x8, scaled with
  the size), ``rotate`` (10-50 degrees, random sign; not on the stripe images,
  whose class *is* the orientation), ``translate`` (1/16-5/16 of the side, random
  direction), ``occlude`` (a zeroed square of 25-65 % of the side), ``contrast``
  (each image's deviation from its mean times 0.6 ... 0.1);
* 1-D signals: ``noise``, ``blur`` (0.5-2.5 samples), ``translate`` (circular, 2-10
  samples), ``occlude`` (a zeroed window of 4-20 samples), ``contrast``;
* tabular (standardized): ``noise`` (std 0.25-2), ``scale`` (each feature times
  ``exp(s z)``, z ~ N(0, 1) per feature, s = 0.2-1.0), ``shift`` (each feature
  plus ``s z``, s = 0.25-1.5), ``missing`` (10-50 % of each row's features set
  to the training mean, 0).

Methods: every registered skuq estimator at its DEFAULT options (no variants),
built and fitted with ``benchmarks/compare.py``'s helpers: the task's net is
trained once per task and seed and shared as ``FrozenEstimator``; MC dropout
and deep ensembles train their own (``METHOD_SETTINGS`` in compare.py). Estimators that
calibrate on held-out data get the 20 % validation split as ``X_cal, y_cal``.
Nothing is tuned on a test or shifted split.

Metrics: accuracy, NLL, ECE (15 bins) on the clean test split; NLL / ECE /
accuracy per corruption and severity (CSV ``shift_by_corruption.csv``) and,
per severity, their mean over corruption types; "shifted NLL" is the mean over
all corruptions and severities; OOD AUROC of the predictive entropy of
``predict_proba`` (identical to the default ``predict_uncertainty``),
in-distribution test rows against OOD rows; fit time (including the shared
net's training, as in compare.py) and the time of one ``predict_proba`` over
all clean, shifted and OOD rows. The targets of the defaults are checked per
task in the Markdown (see ``TARGETS``).

Usage::

    PYTHONPATH=. python benchmarks/shift.py            # full CPU run, 3 seeds
    PYTHONPATH=. python benchmarks/shift.py --quick    # smoke run (CI), seconds
    PYTHONPATH=. python benchmarks/shift.py --tasks digits_cnn,wine --seeds 1
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from sklearn.datasets import load_breast_cancer, load_wine, make_friedman1
from sklearn.utils import Bunch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  (the benchmarks' shared helpers)
    RESULTS,
    PeakMemory,
    classifier_net,
    entropy,
    regressor_net,
    write_results,
    write_runs_csv,
)
from compare import (  # noqa: E402  (the shared helpers of the comparison benchmark)
    BASELINE,
    _build,
    _fit,
    _own_net_note,
    _split_val,
    _tabular,
    _warm_up,
    method_rows,
    task_gap_regression,
    train_shared_net,
)

import skuq  # noqa: E402
from skuq.base import all_estimators  # noqa: E402
from skuq.datasets import load_digits_ood, make_synthetic_images  # noqa: E402
from skuq.metrics import (  # noqa: E402
    expected_calibration_error,
    gaussian_negative_log_likelihood,
    negative_log_likelihood,
    ood_auroc,
)
from skuq.nets import MLP, SmallCNN  # noqa: E402

SEVERITIES = (1, 2, 3, 4, 5)
#: rows of the test split that are corrupted (a fixed random subset per task and
#: seed): 25-30 shifted sets per task, so the shifted rows cost several times the
#: clean ones at prediction; the clean metrics use the whole test split
SHIFT_ROWS = 200
#: the methods whose defaults the targets apply to (the ensemble is the reference)
TARGET_METHODS = (
    "LaplaceClassifier",
    "SubnetworkLaplaceClassifier",
    "L2MClassifier",
    "RegVarClassifier",
    "CVPClassifier",
    "ScaLLAClassifier",
)
IMAGE_TASKS = ("digits_cnn", "images")


# ------------------------------------------------------------------- sizes
PROFILES = {
    "cpu": dict(
        digits_mlp=dict(hidden=(64, 64), epochs=50, lr=1e-3),
        digits_cnn=dict(channels=(8, 16), hidden=64, epochs=40, lr=2e-3),
        mnist1d_mlp=dict(hidden=(128, 128), epochs=60, lr=1e-3, n=5000),
        mnist1d_cnn=dict(channels=(16, 32), hidden=64, epochs=40, lr=2e-3, n=5000),
        images=dict(n=2000, size=16, channels=(8, 16), hidden=64, epochs=25, lr=2e-3),
        wine=dict(hidden=(32, 32), epochs=100, lr=3e-3),
        breast_cancer=dict(hidden=(64, 64), epochs=50, lr=1e-3),
        gap_regression=dict(hidden=(64, 64), epochs=300, lr=3e-3, n=300),
        friedman_regression=dict(hidden=(64, 64), epochs=200, lr=1e-3, n=600),
    ),
    "quick": dict(
        digits_mlp=dict(hidden=(32,), epochs=5, lr=1e-2),
        mnist1d_cnn=dict(channels=(4, 8), hidden=16, epochs=3, lr=1e-2, n=1000),
        wine=dict(hidden=(16,), epochs=20, lr=1e-2),
        gap_regression=dict(hidden=(32,), epochs=40, lr=1e-2, n=100),
        friedman_regression=dict(hidden=(32,), epochs=20, lr=1e-2, n=200),
    ),
}
NOISE_IMAGES = 1.0  # pixel noise of the synthetic images, as in compare.py


# ------------------------------------------------------------- corruptions
def _rng(seed: int, name: str, severity: int) -> np.random.RandomState:
    """A fixed stream per (seed, corruption, severity), independent of the others."""
    return np.random.RandomState([seed, sum(map(ord, name)), severity])


def corrupt_images(X: np.ndarray, name: str, severity: int, rng, *, pixel_std: float):
    """A corrupted copy of images ``X`` of shape (N, 1, H, W) (background 0)."""
    X = X.astype(np.float64)
    n, _, h, w = X.shape
    s = severity - 1
    size = min(h, w)
    if name == "noise":
        return X + pixel_std * (0.2, 0.4, 0.6, 0.8, 1.0)[s] * rng.randn(*X.shape)
    if name == "blur":
        sigma = (0.3, 0.5, 0.7, 0.9, 1.1)[s] * size / 8
        return ndimage.gaussian_filter(X, sigma=(0, 0, sigma, sigma), mode="constant")
    if name == "rotate":
        angle = (10, 20, 30, 40, 50)[s]
        signs = rng.choice([-1, 1], n)
        return np.stack(
            [
                ndimage.rotate(x[0], a * angle, reshape=False, order=1, mode="constant")[None]
                for x, a in zip(X, signs, strict=True)
            ]
        )
    if name == "translate":
        dist = (1, 2, 3, 4, 5)[s] * size / 16
        phi = rng.uniform(0, 2 * np.pi, n)
        return np.stack(
            [
                ndimage.shift(x[0], (dist * np.sin(p), dist * np.cos(p)), order=1, mode="constant")[
                    None
                ]
                for x, p in zip(X, phi, strict=True)
            ]
        )
    if name == "occlude":
        side = max(1, int(round((0.25, 0.35, 0.45, 0.55, 0.65)[s] * size)))
        out = X.copy()
        r0, c0 = rng.randint(0, h - side + 1, n), rng.randint(0, w - side + 1, n)
        for i in range(n):
            out[i, :, r0[i] : r0[i] + side, c0[i] : c0[i] + side] = 0.0
        return out
    if name == "contrast":
        m = X.mean(axis=(1, 2, 3), keepdims=True)
        return m + (0.6, 0.45, 0.3, 0.2, 0.1)[s] * (X - m)
    raise ValueError(f"unknown image corruption {name!r}")


def corrupt_signals(X: np.ndarray, name: str, severity: int, rng, *, signal_std: float):
    """A corrupted copy of 1-D signals ``X`` of shape (N, 1, L) (standardized)."""
    X = X.astype(np.float64)
    n, _, length = X.shape
    s = severity - 1
    if name == "noise":
        return X + signal_std * (0.2, 0.4, 0.6, 0.8, 1.0)[s] * rng.randn(*X.shape)
    if name == "blur":
        return ndimage.gaussian_filter1d(X, (0.5, 1.0, 1.5, 2.0, 2.5)[s], axis=-1, mode="nearest")
    if name == "translate":
        k = (2, 4, 6, 8, 10)[s] * rng.choice([-1, 1], n)
        return np.stack([np.roll(x, int(ki), axis=-1) for x, ki in zip(X, k, strict=True)])
    if name == "occlude":
        width = (4, 8, 12, 16, 20)[s]
        out = X.copy()
        start = rng.randint(0, length - width + 1, n)
        for i in range(n):
            out[i, :, start[i] : start[i] + width] = 0.0
        return out
    if name == "contrast":
        m = X.mean(axis=-1, keepdims=True)
        return m + (0.6, 0.45, 0.3, 0.2, 0.1)[s] * (X - m)
    raise ValueError(f"unknown signal corruption {name!r}")


def corrupt_tabular(X: np.ndarray, name: str, severity: int, rng):
    """A corrupted copy of standardized rows ``X`` of shape (N, D)."""
    X = X.astype(np.float64)
    n, d = X.shape
    s = severity - 1
    if name == "noise":
        return X + (0.25, 0.5, 1.0, 1.5, 2.0)[s] * rng.randn(n, d)
    if name == "scale":
        return X * np.exp((0.2, 0.4, 0.6, 0.8, 1.0)[s] * rng.randn(d))
    if name == "shift":
        return X + (0.25, 0.5, 0.75, 1.0, 1.5)[s] * rng.randn(d)
    if name == "missing":
        return np.where(rng.rand(n, d) < (0.1, 0.2, 0.3, 0.4, 0.5)[s], 0.0, X)
    raise ValueError(f"unknown tabular corruption {name!r}")


IMAGE_CORRUPTIONS = ("noise", "blur", "rotate", "translate", "occlude", "contrast")
SIGNAL_CORRUPTIONS = ("noise", "blur", "translate", "occlude", "contrast")
TABULAR_CORRUPTIONS = ("noise", "scale", "shift", "missing")


def _shifted_sets(X_test, corruptions, fn, seed, reshape=None):
    """``{(corruption, severity): X}`` in ``X_test``'s dtype and shape, and the rows used."""
    rows = np.arange(len(X_test))
    if len(rows) > SHIFT_ROWS:
        rows = np.sort(np.random.RandomState(seed).choice(len(X_test), SHIFT_ROWS, replace=False))
    X_test = X_test[rows]
    out = {}
    for name in corruptions:
        for sev in SEVERITIES:
            X = X_test if reshape is None else X_test.reshape(reshape)
            Xc = fn(X, name, sev, _rng(seed, name, sev))
            out[(name, sev)] = Xc.reshape(X_test.shape).astype(np.float32)
    return out, rows


# ------------------------------------------------------------------- nets
class CNN1D(nn.Sequential):
    """Two 1-D conv blocks and a linear head, for signals of shape (N, 1, L)."""

    def __init__(
        self,
        n_outputs: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = []
        for c in channels:
            layers += [nn.LazyConv1d(c, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool1d(2)]
        layers += [nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, n_outputs))
        super().__init__(*layers)


# ------------------------------------------------------------------- tasks
def _digits(seed, cfg, as_image):
    d = load_digits_ood(random_state=seed)
    X_tr, y_tr, X_val, y_val = _split_val(d.X_train, d.y_train, seed, True)
    std = float(X_tr.std())
    shifted, rows = _shifted_sets(
        d.X_test,
        IMAGE_CORRUPTIONS,
        lambda X, n, s, r: corrupt_images(X, n, s, r, pixel_std=std),
        seed,
        (-1, 1, 8, 8),
    )
    shape = (-1, 1, 8, 8) if as_image else (-1, 64)
    if as_image:
        net = classifier_net(SmallCNN, cfg, channels=cfg["channels"], hidden=cfg["hidden"])
    else:
        net = classifier_net(MLP, cfg, hidden=cfg["hidden"])
    r = lambda a: np.ascontiguousarray(a.reshape(shape))  # noqa: E731
    return Bunch(
        kind="classifier",
        X_train=r(X_tr),
        y_train=y_tr,
        X_val=r(X_val),
        y_val=y_val,
        X_test=r(d.X_test),
        y_test=d.y_test,
        X_ood=r(d.X_ood),
        shifted={k: r(v) for k, v in shifted.items()},
        y_shifted=d.y_test[rows],
        net=net,
    )


def task_digits_mlp(seed, cfg):
    return _digits(seed, cfg, as_image=False)


def task_digits_cnn(seed, cfg):
    return _digits(seed, cfg, as_image=True)


_MNIST1D_CACHE: dict = {}


def load_mnist1d(n_samples: int = 5000) -> dict:
    """MNIST-1D from its generator with its default arguments (offline, fixed seed)."""
    if n_samples not in _MNIST1D_CACHE:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:  # pragma: no cover - the benchmarks extra installs it
            raise ImportError("the MNIST-1D tasks need `pip install mnist1d`") from exc
        args = get_dataset_args()
        args.num_samples = n_samples
        state = np.random.get_state()  # noqa: NPY002  (make_dataset reseeds the global stream)
        try:
            _MNIST1D_CACHE[n_samples] = make_dataset(args)
        finally:
            np.random.set_state(state)  # noqa: NPY002
    return _MNIST1D_CACHE[n_samples]


def _mnist1d(seed, cfg, as_cnn):
    d = load_mnist1d(cfg["n"])
    X, y = d["x"].astype(np.float32), d["y"]
    X_te, y_te = d["x_test"].astype(np.float32), d["y_test"]
    X_tr, y_tr = X[y < 5], y[y < 5]
    X_ood = X_te[y_te >= 5]
    X_te, y_te = X_te[y_te < 5], y_te[y_te < 5]
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, True)
    std = float(X_tr.std())
    length = X.shape[1]
    shifted, rows = _shifted_sets(
        X_te,
        SIGNAL_CORRUPTIONS,
        lambda A, n, s, r: corrupt_signals(A, n, s, r, signal_std=std),
        seed,
        (-1, 1, length),
    )
    shape = (-1, 1, length) if as_cnn else (-1, length)
    if as_cnn:
        net = classifier_net(CNN1D, cfg, channels=cfg["channels"], hidden=cfg["hidden"])
    else:
        net = classifier_net(MLP, cfg, hidden=cfg["hidden"])
    r = lambda a: np.ascontiguousarray(a.reshape(shape))  # noqa: E731
    return Bunch(
        kind="classifier",
        X_train=r(X_tr),
        y_train=y_tr,
        X_val=r(X_val),
        y_val=y_val,
        X_test=r(X_te),
        y_test=y_te,
        X_ood=r(X_ood),
        shifted={k: r(v) for k, v in shifted.items()},
        y_shifted=y_te[rows],
        net=net,
    )


def task_mnist1d_mlp(seed, cfg):
    return _mnist1d(seed, cfg, as_cnn=False)


def task_mnist1d_cnn(seed, cfg):
    return _mnist1d(seed, cfg, as_cnn=True)


def task_images(seed, cfg):
    from sklearn.model_selection import train_test_split

    d = make_synthetic_images(
        n_samples=cfg["n"], size=cfg["size"], noise=NOISE_IMAGES, random_state=seed
    )
    X_tr, X_te, y_tr, y_te = train_test_split(
        d.X, d.y, test_size=0.25, random_state=seed, stratify=d.y
    )
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, True)
    std = float(X_tr.std())
    corruptions = tuple(c for c in IMAGE_CORRUPTIONS if c != "rotate")
    shifted, rows = _shifted_sets(
        X_te,
        corruptions,
        lambda X, n, s, r: corrupt_images(X, n, s, r, pixel_std=std),
        seed,
    )
    net = classifier_net(SmallCNN, cfg, channels=cfg["channels"], hidden=cfg["hidden"])
    return Bunch(
        kind="classifier",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=X_te,
        y_test=y_te,
        X_ood=d.X_ood,
        shifted=shifted,
        y_shifted=y_te[rows],
        net=net,
    )


def _tabular_task(X, y, seed, cfg, ood):
    data = _tabular(X, y, seed, cfg, ood)
    data.shifted, rows = _shifted_sets(data.X_test, TABULAR_CORRUPTIONS, corrupt_tabular, seed)
    data.y_shifted = data.y_test[rows]
    return data


def task_wine(seed, cfg):
    d = load_wine()
    return _tabular_task(d.data, d.target, seed, cfg, "shuffled")


def task_breast_cancer(seed, cfg):
    d = load_breast_cancer()
    return _tabular_task(d.data, d.target, seed, cfg, "far-shifted")


def task_friedman_regression(seed, cfg):
    """Friedman #1 (standardized X and y); OOD rows: the test rows' features times 3."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = make_friedman1(n_samples=cfg["n"], noise=1.0, random_state=seed)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=seed)
    scaler = StandardScaler().fit(X_tr)
    mu, sd = y_tr.mean(), y_tr.std()
    X_tr, X_te = (scaler.transform(a).astype(np.float32) for a in (X_tr, X_te))
    y_tr, y_te = (((a - mu) / sd).astype(np.float32) for a in (y_tr, y_te))
    X_tr, y_tr, X_val, y_val = _split_val(X_tr, y_tr, seed, False)
    n_te = len(X_te)
    return Bunch(
        kind="regressor",
        X_train=X_tr,
        y_train=y_tr,
        X_val=X_val,
        y_val=y_val,
        X_test=np.concatenate([X_te, 3.0 * X_te]),
        # the OOD rows' targets enter no metric (only their predictive std does)
        y_test=np.concatenate([y_te, np.zeros(n_te, np.float32)]),
        ood_mask=np.arange(2 * n_te) >= n_te,
        net=regressor_net(MLP, cfg, hidden=cfg["hidden"]),
    )


TASKS = {
    "digits_mlp": (task_digits_mlp, "8x8 digits 0-4 as 64-vectors, MLP; OOD: digits 5-9"),
    "digits_cnn": (task_digits_cnn, "8x8 digits 0-4 as images, SmallCNN; OOD: digits 5-9"),
    "mnist1d_mlp": (task_mnist1d_mlp, "MNIST-1D classes 0-4, MLP; OOD: classes 5-9"),
    "mnist1d_cnn": (task_mnist1d_cnn, "MNIST-1D classes 0-4, 1-D CNN; OOD: classes 5-9"),
    "images": (task_images, "synthetic stripe images 16x16, SmallCNN; OOD: blob images"),
    "wine": (task_wine, "sklearn wine (standardized), MLP; OOD: feature-shuffled test rows"),
    "breast_cancer": (
        task_breast_cancer,
        "sklearn breast cancer (standardized), MLP; OOD: far-shifted (5 x) test rows",
    ),
    "gap_regression": (
        task_gap_regression,
        "1-D sin regression with a gap, MLP; in-distribution: grid inside the data's support; "
        "OOD: the gap and beyond [-2, 2]",
    ),
    "friedman_regression": (
        task_friedman_regression,
        "Friedman #1 (10 features, noise 1; standardized X and y), MLP; in-distribution: the "
        "test split; OOD: its standardized features times 3",
    ),
}


# ---------------------------------------------------------------- evaluate
def evaluate_classifier(est, data):
    """Metrics on the clean, shifted and OOD rows from one ``predict_proba`` call."""
    keys = list(data.shifted)
    parts = [data.X_test] + [data.shifted[k] for k in keys] + [data.X_ood]
    t = time.perf_counter()
    proba = est.predict_proba(np.concatenate(parts))
    predict_s = time.perf_counter() - t
    labels = est.classes_
    bounds = np.cumsum([0] + [len(p) for p in parts])
    chunks = [proba[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def scores(p, y):
        return dict(
            accuracy=float(np.mean(labels[p.argmax(1)] == y)),
            nll=negative_log_likelihood(y, p, labels=labels),
            ece=expected_calibration_error(y, p, labels=labels),
        )

    row = scores(chunks[0], data.y_test)
    per_set = {("clean", 0): row.copy()}
    for k, p in zip(keys, chunks[1:-1], strict=True):
        per_set[k] = scores(p, data.y_shifted)
    row["ood_auroc"] = ood_auroc(entropy(chunks[0]), entropy(chunks[-1]))
    for sev in SEVERITIES:
        at = [v for (c, s), v in per_set.items() if s == sev]
        for m in ("nll", "ece", "accuracy"):
            row[f"{m}_s{sev}"] = float(np.mean([v[m] for v in at]))
    shifted = [v for (c, s), v in per_set.items() if s > 0]
    for m in ("nll", "ece", "accuracy"):
        row[f"shift_{m}"] = float(np.mean([v[m] for v in shifted]))
    row["predict_s"] = predict_s
    return row, per_set


def evaluate_regressor(est, data):
    """In-distribution RMSE / NLL / 95 % coverage and the OOD AUROC of the std."""
    t = time.perf_counter()
    mean, std = est.predict(data.X_test, return_std=True)
    predict_s = time.perf_counter() - t
    inside = ~data.ood_mask
    y, m, s = data.y_test[inside], mean[inside], std[inside]
    row = dict(
        rmse=float(np.sqrt(np.mean((m - y) ** 2))),
        nll=gaussian_negative_log_likelihood(y, m, s),
        cov95=float(np.mean(np.abs(y - m) <= 1.959964 * s)),
        ood_auroc=ood_auroc(std[inside], std[data.ood_mask]),
        predict_s=predict_s,
    )
    return row, {}


# ------------------------------------------------------------------ running
@dataclass
class Run:
    task: str
    method: str
    seed: int
    metrics: dict
    per_set: dict = field(default_factory=dict)
    error: str = ""


def run_task(task, data, methods, seed, device, log):
    """All methods on one task and seed; the net is trained once and shared."""
    kind = data.kind
    frozen, net_s, net_cpu = train_shared_net(task, data, seed, device, log)
    evaluate = evaluate_classifier if kind == "classifier" else evaluate_regressor
    runs = []
    for name, cls, hints in methods:
        try:
            est, own = _build(cls, data, frozen, seed, device, hints)
            with PeakMemory(device) as mem:
                t, c = time.perf_counter(), time.process_time()
                _fit(est, data)
                fit_s = time.perf_counter() - t + (0.0 if own else net_s)
                fit_cpu_s = time.process_time() - c + (0.0 if own else net_cpu)
            row, per_set = evaluate(est, data)
            row.update(fit_s=fit_s, fit_cpu_s=fit_cpu_s, peak_mb=mem.peak_mb)
            runs.append(Run(task, name, seed, row, per_set))
            extra = (
                f"shifted nll {row['shift_nll']:.4f} "
                if "shift_nll" in row
                else f"cov95 {row['cov95']:.3f} "
            )
            log(
                f"  {task:14s} seed {seed} {name:30s} nll {row['nll']:.4f} {extra}"
                f"auroc {row['ood_auroc']:.3f} fit {fit_s:.1f}s pred {row['predict_s']:.2f}s"
            )
        except Exception as exc:  # one method's failure must not sink the table
            log(f"  {task:14s} seed {seed} {name:30s} FAILED: {exc!r}")
            traceback.print_exc(file=sys.stderr)
            runs.append(Run(task, name, seed, {}, error=f"{type(exc).__name__}: {exc}"))
    return runs


# ----------------------------------------------------------------- reporting
def aggregate(runs):
    """``{(task, method): {"n": seeds, "error": str, metric: (mean, std)}}``."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r.task, r.method)].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.error]
        agg = {"n": len(ok), "error": next((r.error for r in rs if r.error), "")}
        for k in sorted({k for r in ok for k in r.metrics}):
            vals = np.array([r.metrics[k] for r in ok if k in r.metrics], dtype=float)
            if len(vals) and not np.all(np.isnan(vals)):
                agg[k] = (float(np.nanmean(vals)), float(np.nanstd(vals)))
        out[key] = agg
    return out


#: target name -> (metric, test(mine, base)); means over seeds
TARGETS = {
    "acc": ("accuracy", lambda m, b: m >= b - 0.005),
    "NLL": ("nll", lambda m, b: m <= 1.10 * b),
    "shift NLL": ("shift_nll", lambda m, b: m <= b),
    "AUROC": ("ood_auroc", lambda m, b: m >= b - 0.01),
}
#: the stronger targets of LaplaceClassifier's default on the image tasks
LAPLACE_IMAGE_TARGETS = {
    "shift NLL -10%": ("shift_nll", lambda m, b: m <= 0.9 * b),
    "AUROC": ("ood_auroc", lambda m, b: m >= b),
}


def target_checks(agg, task, method) -> dict[str, bool | None]:
    """Each target -> met (True / False), None where a number is missing."""
    base = agg.get((task, BASELINE["classifier"]), {})
    mine = agg.get((task, method), {})
    targets = dict(TARGETS)
    if method == "LaplaceClassifier" and task in IMAGE_TASKS:
        targets.update(LAPLACE_IMAGE_TARGETS)
        targets["AUROC"] = LAPLACE_IMAGE_TARGETS["AUROC"]
    out = {}
    for label, (metric, test) in targets.items():
        if metric in base and metric in mine:
            out[label] = bool(test(mine[metric][0], base[metric][0]))
        else:
            out[label] = None
    return out


def _fmt(a, key, digits, std=True):
    if key not in a:
        return "n/a"
    m, s = a[key]
    return f"{m:.{digits}f} ± {s:.{digits}f}" if std else f"{m:.{digits}f}"


def markdown(agg, task_kinds, methods_by_kind, header):
    lines = [header, ""]
    for task, kind in task_kinds.items():
        lines += [f"### {task}", "", f"{TASKS[task][1]}.", ""]
        names = methods_by_kind[kind]
        if kind == "classifier":
            head = (
                ["method", "acc", "NLL", "ECE"]
                + [f"NLL s{s}" for s in SEVERITIES]
                + ["shifted NLL", "shifted ECE", "shifted acc", "OOD AUROC", "fit s", "pred s"]
            )
            cols = (
                [("accuracy", 3, True), ("nll", 3, True), ("ece", 3, True)]
                + [(f"nll_s{s}", 3, False) for s in SEVERITIES]
                + [
                    ("shift_nll", 3, True),
                    ("shift_ece", 3, True),
                    ("shift_accuracy", 3, False),
                    ("ood_auroc", 3, True),
                    ("fit_s", 1, False),
                    ("predict_s", 2, False),
                ]
            )
        else:
            head = ["method", "RMSE", "NLL", "cov 95%", "OOD AUROC", "fit s", "pred s"]
            cols = [
                ("rmse", 3, True),
                ("nll", 3, True),
                ("cov95", 3, True),
                ("ood_auroc", 3, True),
                ("fit_s", 1, False),
                ("predict_s", 2, False),
            ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in names:
            a = agg.get((task, name))
            if a is None:
                continue
            if a["n"] == 0:
                lines.append(f"| {name} | failed: {a['error'][:120]} |" + " |" * (len(head) - 2))
                continue
            lines.append("| " + " | ".join([name] + [_fmt(a, k, d, s) for k, d, s in cols]) + " |")
        lines.append("")
    cls_tasks = [t for t, k in task_kinds.items() if k == "classifier"]
    if cls_tasks:
        lines += [
            "### Targets: does each default beat the bare net?",
            "",
            "Per task: accuracy ≥ MAP − 0.005 / in-distribution NLL ≤ 1.10 × MAP / shifted "
            "NLL ≤ MAP / OOD AUROC ≥ MAP − 0.01 (means over seeds); ✓ met, ✗ missed. "
            "LaplaceClassifier on the image tasks (" + ", ".join(IMAGE_TASKS) + ") must "
            "also have shifted NLL ≥ 10 % below MAP's and OOD AUROC ≥ MAP's (a fifth mark, "
            "and the AUROC mark is the strict one there).",
            "",
            "| method | " + " | ".join(cls_tasks) + " | targets met |",
            "|" + "---|" * (len(cls_tasks) + 2),
        ]
        for name in methods_by_kind.get("classifier", []):
            if name == BASELINE["classifier"]:
                continue
            cells, met, total = [], 0, 0
            for t in cls_tasks:
                checks = target_checks(agg, t, name)
                marks = "".join("?" if v is None else ("✓" if v else "✗") for v in checks.values())
                cells.append(marks)
                met += sum(bool(v) for v in checks.values())
                total += len(checks)
            ref = (
                ""
                if name in TARGET_METHODS
                else (" (reference)" if "Ensemble" in name else " (baseline)")
            )
            lines.append(f"| {name}{ref} | " + " | ".join(cells) + f" | {met}/{total} |")
        lines += [
            "",
            "Marks in the order acc, NLL, shifted NLL, AUROC (then shifted NLL −10 % "
            "for Laplace on images).",
            "",
        ]
        lines += [
            "### In-distribution NLL / shifted NLL / OOD AUROC (means over seeds)",
            "",
            "| method | " + " | ".join(cls_tasks) + " |",
            "|" + "---|" * (len(cls_tasks) + 1),
        ]
        for name in methods_by_kind.get("classifier", []):
            cells = []
            for t in cls_tasks:
                a = agg.get((t, name), {})
                cells.append(
                    " / ".join(_fmt(a, k, 3, False) for k in ("nll", "shift_nll", "ood_auroc"))
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    reg_tasks = [t for t, k in task_kinds.items() if k == "regressor"]
    if reg_tasks:
        lines += [
            "### Regression targets: 95 % interval covers 90-97 % in-distribution; OOD AUROC ≥ 0.9",
            "",
            "| method | " + " | ".join(reg_tasks) + " |",
            "|" + "---|" * (len(reg_tasks) + 1),
        ]
        for name in methods_by_kind.get("regressor", []):
            cells = []
            for t in reg_tasks:
                a = agg.get((t, name), {})
                if "cov95" not in a:
                    cells.append("n/a")
                    continue
                cov, auc = a["cov95"][0], a["ood_auroc"][0]
                ok_cov, ok_auc = 0.90 <= cov <= 0.97, auc >= 0.9
                cells.append(
                    f"cov {cov:.3f} {'✓' if ok_cov else '✗'} / "
                    f"AUROC {auc:.3f} {'✓' if ok_auc else '✗'}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


SUMMARY_KEYS = [
    "accuracy",
    "nll",
    "ece",
    "shift_nll",
    "shift_ece",
    "shift_accuracy",
    "ood_auroc",
    "rmse",
    "cov95",
    "fit_s",
    "fit_cpu_s",
    "predict_s",
    "peak_mb",
] + [f"{m}_s{s}" for m in ("nll", "ece", "accuracy") for s in SEVERITIES]


def write_csvs(out_dir, stem, runs):
    write_runs_csv(os.path.join(out_dir, f"{stem}.csv"), runs, SUMMARY_KEYS)
    with open(os.path.join(out_dir, f"{stem}_by_corruption.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", "corruption", "severity", "accuracy", "nll", "ece"])
        for r in runs:
            for (corr, sev), v in r.per_set.items():
                w.writerow(
                    [
                        r.task,
                        r.method,
                        r.seed,
                        corr,
                        sev,
                        f"{v['accuracy']:.6g}",
                        f"{v['nll']:.6g}",
                        f"{v['ece']:.6g}",
                    ]
                )


def plot_nll_vs_severity(agg, task_kinds, names, path):
    """One panel per classification task: NLL (mean over corruptions and seeds) by severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, k in task_kinds.items() if k == "classifier"]
    if not tasks:
        return None
    ncol = min(len(tasks), 4)
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.3 * nrow + 0.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    handles = {}
    for ax, task in zip(axes.flat, tasks, strict=False):
        for i, name in enumerate(names):
            a = agg.get((task, name), {})
            keys = ["nll"] + [f"nll_s{s}" for s in SEVERITIES]
            if not all(k in a for k in keys):
                continue
            style = (
                dict(color="k", lw=2.2)
                if name == BASELINE["classifier"]
                else dict(color=cmap(i % 10), lw=1.2, ls="--" if "Ensemble" in name else "-")
            )
            (h,) = ax.plot(range(6), [a[k][0] for k in keys], marker="o", ms=3, **style)
            handles[name.replace("Classifier", "")] = h
        ax.set_title(task, fontsize=10)
        ax.set_xticks(range(6))
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("NLL")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(len(handles), 5),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        "NLL against corruption severity (mean over corruption types and seeds; MAP in black)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.09 if nrow == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def read_runs(path) -> list[Run]:
    """The runs of a summary CSV written by :func:`write_csvs` (no per-set numbers)."""
    runs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            metrics = {k: float(row[k]) for k in SUMMARY_KEYS if row.get(k) not in (None, "")}
            runs.append(
                Run(row["task"], row["method"], int(row["seed"]), metrics, error=row["error"])
            )
    return runs


def render(runs, out_dir, stem, header, plot=True):
    """Markdown table, summary CSVs and the plot of ``runs``; returns (markdown, png)."""
    kinds = {"classifier": BASELINE["classifier"], "regressor": BASELINE["regressor"]}
    task_kinds, names = {}, {k: [] for k in kinds}
    for r in runs:
        kind = "regressor" if r.method.endswith("Regressor") else "classifier"
        task_kinds.setdefault(r.task, kind)
        if r.method not in names[kind]:
            names[kind].append(r.method)
    for kind, base in kinds.items():  # MAP first, then by name
        names[kind].sort(key=lambda n: (n != base, n))
    agg = aggregate(runs)
    md = markdown(agg, task_kinds, names, header)
    write_results(out_dir, stem, md + "\n")
    png = None
    if plot:
        png = plot_nll_vs_severity(
            agg,
            task_kinds,
            names["classifier"],
            os.path.join(out_dir, f"{stem}_nll_vs_severity.png"),
        )
    return md, png, agg


def _header(profile, command, n_seeds, minutes, dev, own, stem):
    return (
        f"## skuq under dataset shift ({profile} profile)\n\n`{command}`\n\n"
        f"skuq {skuq.__version__}, torch {torch.__version__}, device: {dev}; "
        f"{n_seeds} seed(s), mean ± std over seeds; total wall time {minutes:.1f} min.\n"
        "Every estimator at its default options; the net is trained once per task and seed "
        "and shared as FrozenEstimator (fit s includes that training), except: "
        + own
        + ". Held-out calibrators get the 20 % validation "
        "split. NLL sN: mean NLL over the corruption types at severity N; shifted NLL / ECE "
        f"/ acc: mean over all corruptions and severities (on {SHIFT_ROWS} test rows per "
        "task and seed). OOD AUROC: predictive entropy, in-distribution test rows vs OOD "
        "rows. pred s: one predict_proba over all clean, shifted and OOD rows. Per "
        f"corruption and severity: `{stem}_by_corruption.csv`."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny tasks, few epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    parser.add_argument(
        "--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS)
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated estimator names (MAP always runs)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--from-csv",
        default=None,
        help="comma-separated summary CSVs of earlier runs (e.g. tasks run "
        "in parts): re-render their table and plot, run nothing",
    )
    args = parser.parse_args(argv)
    command = " ".join(["PYTHONPATH=. python benchmarks/shift.py", *(argv or sys.argv[1:])])
    if args.from_csv:
        runs = [r for p in args.from_csv.split(",") for r in read_runs(p)]
        meta = [p[: -len(".csv")] + "_meta.txt" for p in args.from_csv.split(",")]
        lines = [open(m).read().strip() for m in meta if os.path.exists(m)]
        header = "\n\n".join(lines) if lines else f"`{command}`"
        os.makedirs(args.out_dir, exist_ok=True)
        for suffix in (".csv", "_by_corruption.csv"):  # the parts' rows, one file each
            parts = [p[: -len(".csv")] + suffix for p in args.from_csv.split(",")]
            parts = [p for p in parts if os.path.exists(p)]
            target = os.path.join(args.out_dir, "shift" + suffix)
            if parts and all(os.path.abspath(p) != os.path.abspath(target) for p in parts):
                with open(target, "w") as out:
                    for k, p in enumerate(parts):
                        with open(p) as f:
                            lines_p = f.readlines()
                        out.writelines(lines_p if k == 0 else lines_p[1:])
        md, png, agg = render(runs, args.out_dir, "shift", header, not args.no_plots)
        print(md)
        return {"runs": runs, "aggregate": agg, "markdown": md, "png": png}

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    profile = "quick" if args.quick else "cpu"
    sizes = PROFILES[profile]
    tasks = list(sizes) if args.tasks is None else args.tasks.split(",")
    for t in tasks:
        if t not in sizes:
            parser.error(f"unknown task {t!r} for profile {profile}; choose from {list(sizes)}")
    n_seeds = args.seeds or (1 if args.quick else 3)
    seeds = list(range(n_seeds))
    wanted = None if args.methods is None else set(args.methods.split(","))
    methods_by_kind = {}
    for kind in ("classifier", "regressor"):
        found = [
            method_rows(n, c)[0]
            for n, c in all_estimators(kind)
            if wanted is None or n in wanted or n == BASELINE[kind]
        ]
        found.sort(key=lambda row: (row[0] != BASELINE[kind], row[0]))  # MAP first
        methods_by_kind[kind] = found
    if wanted:
        missing = wanted - {n for ms in methods_by_kind.values() for n, *_ in ms}
        if missing:
            parser.error(f"no skuq estimator named {sorted(missing)}")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = "shift_quick" if args.quick else ("shift" if device.type == "cpu" else "shift_cuda")

    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch threads {args.threads})"
    )
    own = _own_net_note(methods_by_kind)

    log = print
    _warm_up(device)
    start = time.perf_counter()
    runs = []
    for task in tasks:
        for seed in seeds:
            data = TASKS[task][0](seed, sizes[task])
            if data.kind == "regressor":
                data.ood_mask = np.asarray(data.ood_mask, dtype=bool)
            runs += run_task(task, data, methods_by_kind[data.kind], seed, device, log)
            write_csvs(args.out_dir, stem, runs)  # a killed run keeps what it finished
    total = time.perf_counter() - start
    header = _header(profile, command, n_seeds, total / 60, dev, own, stem)
    with open(os.path.join(args.out_dir, f"{stem}_meta.txt"), "w") as f:
        f.write(header + "\n")
    md, png, agg = render(runs, args.out_dir, stem, header, not args.no_plots)
    print(md)
    return {"runs": runs, "aggregate": agg, "markdown": md, "png": png, "seconds": total}


if __name__ == "__main__":
    main()
