"""Offline data sets for examples, tests and benchmarks (nothing downloads)."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits, make_moons
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch

__all__ = ["load_digits_ood", "make_two_moons", "make_gap_regression", "make_synthetic_images"]


def load_digits_ood(*, test_size: float = 0.3, random_state: int = 0) -> Bunch:
    """scikit-learn's 8x8 digits split into in-distribution (0-4) and OOD (5-9).

    Pixels are scaled to [0, 1]. The in-distribution rows are split into a
    stratified train and test part; every digit 5-9 is an OOD row.

    Returns
    -------
    Bunch with ``X_train, y_train, X_test, y_test`` (in-distribution, labels
    0-4), ``X_ood`` (digits 5-9, shape (n, 64)) and ``y_ood`` (their digits).

    Examples
    --------
    >>> from skuq.datasets import load_digits_ood
    >>> d = load_digits_ood()
    >>> d.X_train.shape[1], sorted(set(d.y_train.tolist())), len(d.X_ood) > 800
    (64, [0, 1, 2, 3, 4], True)
    """
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    ind = y < 5
    X_tr, X_te, y_tr, y_te = train_test_split(
        X[ind], y[ind], test_size=test_size, random_state=random_state, stratify=y[ind]
    )
    return Bunch(X_train=X_tr, y_train=y_tr, X_test=X_te, y_test=y_te, X_ood=X[~ind], y_ood=y[~ind])


def make_two_moons(
    n_samples: int = 500, *, noise: float = 0.15, n_ood: int = 200, random_state: int = 0
) -> Bunch:
    """Two interleaving half circles, plus OOD points on a ring far around them.

    Returns
    -------
    Bunch with ``X`` (float32, shape (n_samples, 2)), ``y`` (0/1) and ``X_ood``.

    Examples
    --------
    >>> from skuq.datasets import make_two_moons
    >>> d = make_two_moons(40, n_ood=10, random_state=0)
    >>> d.X.shape, sorted(set(d.y.tolist())), d.X_ood.shape
    ((40, 2), [0, 1], (10, 2))
    """
    X, y = make_moons(n_samples=n_samples, noise=noise, random_state=random_state)
    rng = np.random.RandomState(random_state)
    angle = rng.uniform(0, 2 * np.pi, n_ood)
    radius = rng.uniform(3.0, 4.0, n_ood)
    X_ood = np.c_[0.5 + radius * np.cos(angle), 0.25 + radius * np.sin(angle)]
    return Bunch(X=X.astype(np.float32), y=y, X_ood=X_ood.astype(np.float32))


def make_gap_regression(
    n_samples: int = 300,
    *,
    noise: float = 0.1,
    gap: tuple[float, float] = (-0.5, 0.5),
    random_state: int = 0,
) -> Bunch:
    """Noisy 1-D regression ``y = sin(3x) + x/2 + noise`` with no data inside ``gap``.

    Inputs are drawn on [-2, 2] outside the gap; ``X_test`` is a grid over
    [-3, 3] that covers the gap and both sides beyond the data, where a good
    model's uncertainty should grow.

    Returns
    -------
    Bunch with ``X, y`` (training), ``X_test, y_test`` (noise-free targets on
    the grid) and ``in_gap`` (mask of grid points inside the gap).

    Examples
    --------
    >>> from skuq.datasets import make_gap_regression
    >>> d = make_gap_regression(50, random_state=0)
    >>> d.X.shape[0], d.y.shape[0]
    (50, 50)
    >>> bool(((d.X > -0.5) & (d.X < 0.5)).any())
    False
    """
    rng = np.random.RandomState(random_state)
    x = rng.uniform(-2, 2, 4 * n_samples)
    x = x[(x < gap[0]) | (x > gap[1])][:n_samples]

    def f(t):
        return np.sin(3 * t) + 0.5 * t

    y = f(x) + noise * rng.randn(len(x))
    grid = np.linspace(-3, 3, 301)
    return Bunch(
        X=x[:, None].astype(np.float32),
        y=y.astype(np.float32),
        X_test=grid[:, None].astype(np.float32),
        y_test=f(grid).astype(np.float32),
        in_gap=(grid > gap[0]) & (grid < gap[1]),
    )


def make_synthetic_images(
    n_samples: int = 2000,
    *,
    n_classes: int = 10,
    size: int = 28,
    noise: float = 0.3,
    random_state: int = 0,
) -> Bunch:
    """Grayscale ``size x size`` images of class-specific oriented stripe patterns.

    Each class has its own stripe frequency and orientation; every image gets a
    random phase, contrast and Gaussian pixel noise, so the task needs a real
    (convolutional) classifier but is learnable in a few epochs. ``X_ood`` holds
    images of random blobs, unlike any class.

    Returns
    -------
    Bunch with ``X`` (float32, shape (n_samples, 1, size, size)), ``y`` and
    ``X_ood`` (n_samples // 4 images).

    Examples
    --------
    >>> from skuq.datasets import make_synthetic_images
    >>> d = make_synthetic_images(20, n_classes=3, size=8, random_state=0)
    >>> d.X.shape, d.X.dtype, d.X_ood.shape[0]
    ((20, 1, 8, 8), dtype('float32'), 5)
    """
    rng = np.random.RandomState(random_state)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angles = np.linspace(0, np.pi, n_classes, endpoint=False)
    freqs = 2.0 + 3.0 * (np.arange(n_classes) % 3)
    y = rng.randint(0, n_classes, n_samples)
    phase = rng.uniform(0, 2 * np.pi, n_samples)[:, None, None]
    contrast = rng.uniform(0.6, 1.0, n_samples)[:, None, None]
    a, f = angles[y][:, None, None], freqs[y][:, None, None]
    proj = xx[None] * np.cos(a) + yy[None] * np.sin(a)
    X = contrast * np.sin(2 * np.pi * f * proj + phase) + noise * rng.randn(n_samples, size, size)
    n_ood = max(n_samples // 4, 1)
    cx, cy = rng.uniform(0.2, 0.8, (2, n_ood, 1, 1))
    blobs = np.exp(-((xx[None] - cx) ** 2 + (yy[None] - cy) ** 2) / 0.02)
    X_ood = 2 * blobs - 1 + noise * rng.randn(n_ood, size, size)
    return Bunch(X=X[:, None].astype(np.float32), y=y, X_ood=X_ood[:, None].astype(np.float32))
