"""Shared fixtures: small data and fast nets, so the whole suite stays quick on 2 CPUs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor

from skuq.datasets import load_digits_ood, make_gap_regression
from skuq.nets import MLP
from skuq.outputs import centered_probit_probabilities

torch.set_num_threads(1)  # the suite runs under xdist on 2 cores


def pytest_addoption(parser):
    parser.addoption(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads for the run (default 1); other thread counts "
        "change the blocking of float32 reductions, which the numerics tests must survive",
    )


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads is not None:
        torch.set_num_threads(threads)


#: test names that compare numbers against a reference (brute force, laplace-torch,
#: float64, another batch or unit) to a tolerance set by float32 accuracy or an
#: optimizer's stopping rule: they get the ``numerics`` marker, and CI runs them
#: again as another CPU would compute them (non-vectorized kernels, 1 and 4 threads)
NUMERICS = re.compile(
    r"brute|laplace_torch|float(32|64)|units_of_y|marglik|invariance|neighbours|batch_size"
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if NUMERICS.search(getattr(item, "originalname", item.name)):
            item.add_marker(pytest.mark.numerics)


def make_classifier_net(max_epochs: int = 20, hidden=(32,), lr: float = 1e-2, **kwargs):
    """An unfitted skorch classifier over skuq's lazy MLP (logit outputs)."""
    params = dict(
        module=MLP,
        module__hidden=hidden,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=lr,
        max_epochs=max_epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetClassifier(**params)


def make_regressor_net(max_epochs: int = 100, hidden=(32,), lr: float = 1e-2, **kwargs):
    """An unfitted skorch regressor over skuq's lazy MLP."""
    params = dict(
        module=MLP,
        module__hidden=hidden,
        optimizer=torch.optim.Adam,
        lr=lr,
        max_epochs=max_epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetRegressor(**params)


@pytest.fixture(scope="session")
def digits():
    """The digits OOD split (train/test on 0-4, OOD 5-9)."""
    return load_digits_ood()


@pytest.fixture(scope="session")
def gap_data():
    return make_gap_regression(n_samples=200)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


def assert_centered_predictive(est, X) -> None:
    """The default link's inputs: ``centered_covariance`` is ``P Cov[f] P``, and the
    probabilities are the centered probit of it."""
    dist = est.predict_distribution(X)
    C = dist.mean.shape[1]
    P = torch.eye(C, dtype=torch.float64) - 1.0 / C
    cov, centered = dist.covariance.double(), dist.centered_covariance.double()
    scale = float(centered.diagonal(dim1=1, dim2=2).abs().max())
    torch.testing.assert_close(centered, P @ cov @ P, atol=1e-4 * scale, rtol=0)
    expected = centered_probit_probabilities(dist.mean.double(), centered).numpy()
    np.testing.assert_allclose(est.predict_proba(X), expected, atol=1e-6)
