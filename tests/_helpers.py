"""Helpers shared by test modules: fast nets, tiny models and data, brute-force references.

Fixtures, hooks and command-line options live in ``tests/conftest.py``; what a test
module imports from another lives here.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from torch import nn

from skuq.base import UQClassifierMixin
from skuq.nets import MLP
from skuq.outputs import centered_probit_probabilities

# --- skorch nets and the estimators' contract-check instances ---


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


#: constructor kwargs for the check instances (speed, or what the method needs)
NET_KWARGS: dict[str, dict] = {
    "MCDropoutClassifier": {"module__dropout": 0.1},
    "MCDropoutRegressor": {"module__dropout": 0.1},
}
EST_KWARGS: dict[str, dict] = {
    "DeepEnsembleClassifier": {"n_estimators": 2},
    "DeepEnsembleRegressor": {"n_estimators": 2},
    # the contract checks train their nets for a few epochs without weight decay: no strict
    # minimum of a regularized loss for the exact mode (the default) to fine-tune from, so
    # they run the amortized mode; tests/methods/test_regvar.py checks the exact mode's values
    "RegVarClassifier": {"finetune_epochs": 2, "mode": "amortized"},
    "RegVarRegressor": {"finetune_epochs": 2, "mode": "amortized"},
    "ScaLLAClassifier": {"surrogate__epochs": 3, "n_features": 8, "surrogate__width": 32},
}


def make_check_instance(name: str, cls: type):
    """The estimator ``cls`` (registry name ``name``) as the contract checks build it."""
    is_clf = issubclass(cls, UQClassifierMixin)
    factory = make_classifier_net if is_clf else make_regressor_net
    net = factory(max_epochs=30, hidden=(16,), lr=3e-2, **NET_KWARGS.get(name, {}))
    return cls(net, random_state=0, **EST_KWARGS.get(name, {}))


class CountingMLP(MLP):
    """An MLP that counts how often a net is built (= trained, for skorch)."""

    n_built = 0

    def __init__(self, **kwargs):
        type(self).n_built += 1
        super().__init__(**kwargs)


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


# --- tiny float models and brute-force references for the engines ---


def _mlp(seed=0):
    """A 4-6-5-3 MLP (Tanh, ReLU) in the default dtype."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _cnn(seed=0):
    """Two Conv2d layers and a Linear head over 2x4x4 images, 3 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _data(model, n=7, seed=1):
    """``n`` random inputs shaped for ``_mlp`` or ``_cnn``, and 3-class labels."""
    torch.manual_seed(seed)
    x = torch.randn(n, 4) if isinstance(model[0], nn.Linear) else torch.randn(n, 2, 4, 4)
    return x, torch.randint(0, 3, (n,))


def brute_jacobian(model, x):
    """J[n, c, :] by one autograd backward per sample and output (no torch.func)."""
    params = [p for p in model.parameters()]
    rows = []
    for n in range(len(x)):
        out = model(x[n : n + 1])[0]
        per = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], params, retain_graph=True)
            per.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


def brute_ggn(model, x, y=None, likelihood="classification"):
    """The dense GGN: ``sum_n J_n^T Lambda_n J_n`` from ``brute_jacobian``."""
    J = brute_jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    H = 0
    for n in range(len(x)):
        if likelihood == "classification":
            p = torch.softmax(f[n], 0)
            lam = torch.diag(p) - torch.outer(p, p)
        else:
            lam = torch.eye(f.shape[1])
        H = H + J[n].T @ lam @ J[n]
    return H


def batches(x, y, size=3):
    """``(x, y)`` as a list of batches of ``size`` rows."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def brute_layerwise_marglik_optimum(H, theta, group_sizes):
    """Per-group prior precisions maximizing the Laplace evidence, in float64 numpy.

    ``-log p(D) + const = 0.5 (logdet(H + D) - sum_g P_g log d_g + sum_g d_g |theta_g|^2)``
    with ``D = diag(d_g per weight)``; its gradient in ``d_g`` is
    ``0.5 (tr_g (H + D)^-1 - P_g / d_g + |theta_g|^2)``. Independent of skuq's posteriors.
    """
    H = np.asarray(H, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    sizes = np.asarray(group_sizes)
    group = np.repeat(np.arange(len(sizes)), sizes)
    t2 = np.bincount(group, theta**2)

    def objective(z):
        d = np.exp(z)
        M = H + np.diag(d[group])
        sign, logdet = np.linalg.slogdet(M)
        assert sign > 0
        value = 0.5 * (logdet - sizes @ z + d @ t2)
        grad = 0.5 * (np.bincount(group, np.diag(np.linalg.inv(M))) - sizes / d + t2)
        return value, grad * d

    def newton_step(z):
        """Exact gradient and Hessian in ``z = log d``; the Newton step."""
        d = np.exp(z)
        S = np.linalg.inv(H + np.diag(d[group]))
        tr = np.bincount(group, np.diag(S))
        grad = 0.5 * (d * (tr + t2) - sizes)
        G = np.zeros((len(sizes), len(sizes)))  # sum_{i in g, j in h} S_ij^2
        for g in range(len(sizes)):
            G[g] = np.bincount(group, (S[group == g] ** 2).sum(0), minlength=len(sizes))
        hess = 0.5 * (np.diag(d * (tr + t2)) - np.outer(d, d) * G)
        return grad, np.linalg.solve(hess, grad)

    res = scipy.optimize.minimize(
        objective,
        np.zeros(len(sizes)),
        jac=True,
        method="L-BFGS-B",
        options=dict(ftol=1e-15, gtol=1e-12, maxiter=1000),
    )
    z = res.x
    for _ in range(5):  # polished by Newton: quadratic convergence to the float64 floor
        grad, step = newton_step(z)
        z = z - step
    assert np.abs(newton_step(z)[0]).max() < 1e-9 * sizes.sum(), res  # stationary in log d
    return np.exp(z)


def assert_heldout_rule(est, tolerance: float = 0.05) -> None:
    """``est.prior_precision_`` is what the held-out rule asks of ``est.heldout_nll_``.

    The widest posterior (smallest precision) reached from the grid's best value
    through values whose held-out NLL is within ``tolerance`` of the best, and
    no further: the next smaller value is outside (or the grid ends).
    """
    grid = sorted(est.heldout_nll_)
    nll = np.array([est.heldout_nll_[g] for g in grid])
    best = int(np.argmin(nll))
    # prior_precision_ comes back from the posterior's float32 tensor
    chosen = int(np.argmin(np.abs(np.log(grid) - np.log(est.prior_precision_))))
    assert np.isclose(grid[chosen], est.prior_precision_, rtol=1e-6)
    limit = nll[best] + tolerance * abs(nll[best])
    assert chosen <= best
    assert np.all(nll[chosen : best + 1] <= limit)
    assert chosen == 0 or nll[chosen - 1] > limit
