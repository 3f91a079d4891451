"""Shared fixtures: small data and fast nets, so the whole suite stays quick on 2 CPUs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from skuq.datasets import load_digits_ood, make_gap_regression

torch.set_num_threads(1)  # the suite runs under xdist on 2 cores


def pytest_addoption(parser):
    parser.addoption(
        "--torch-threads",
        type=int,
        default=None,
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
