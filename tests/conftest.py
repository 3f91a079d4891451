"""Shared fixtures: small data and fast nets, so the whole suite stays quick on 2 CPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor

from skuq.datasets import load_digits_ood, make_gap_regression
from skuq.nets import MLP

torch.set_num_threads(1)  # the suite runs under xdist on 2 cores


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
