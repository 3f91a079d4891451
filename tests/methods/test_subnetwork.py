"""Subnetwork inference: Jacobian columns, selection rules, estimators, laplace-torch oracle."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from skuq import LaplaceClassifier, LaplaceRegressor, SubnetworkLaplaceClassifier
from skuq.curvature import compute_curvature, jacobians, select_weights
from skuq.curvature.subnet_jacobians import subnetwork_jacobians
from skuq.laplace.subnetwork import (
    SELECTIONS,
    ByName,
    GivenIndices,
    LargestVariance,
    LargestVarianceSWAG,
    LastLayerSelection,
    RandomSelection,
    resolve_selection,
    select_subnetwork_indices,
)
from tests._helpers import assert_heldout_rule


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(digits):
    """A 705-weight MLP trained on 300 digits (float32)."""
    torch.manual_seed(0)
    X = torch.as_tensor(digits.X_train[:300])
    y = torch.as_tensor(digits.y_train[:300])
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    return model, X, y, torch.as_tensor(digits.X_test[:60])


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


class _Shared(nn.Module):
    """A LayerNorm (no layer route) and a Linear called twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.twice = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        return self.out(torch.tanh(self.twice(torch.tanh(self.twice(h)))))


class _Sequence(nn.Module):
    """A Linear on sequences (several positions per row) before the head."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Linear(3, 5)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.seq(x.reshape(len(x), 4, 3))).flatten(1))


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    return {
        "mlp": (mlp.double(), torch.randn(7, 4, dtype=torch.float64)),
        "cnn": (cnn.double(), torch.randn(7, 2, 6, 6, dtype=torch.float64)),
        "shared": (_Shared().double(), torch.randn(7, 3, dtype=torch.float64)),
        "sequence": (_Sequence().double(), torch.randn(7, 12, dtype=torch.float64)),
    }


# ------------------------------------------------------------------ J[:, S]
@pytest.mark.parametrize("name", ["mlp", "cnn", "shared", "sequence"])
@pytest.mark.parametrize("max_elements", [2**25, 40])
def test_subnetwork_jacobian_columns_equal_the_full_jacobian(name, max_elements):
    """Every route (dense, conv gather/matmul, sequences, LayerNorm, shared) and chunking."""
    model, x = _nets()[name]
    P = _n_params(model)
    J_all, f_all = jacobians(select_weights(model), x)
    gen = torch.Generator().manual_seed(1)
    for k in (1, 5, P // 2, P):
        idx = torch.sort(torch.randperm(P, generator=gen)[:k]).values
        w = select_weights(model, "subnetwork", subnetwork_indices=idx)
        J, f = subnetwork_jacobians(w, x, max_elements=max_elements)
        torch.testing.assert_close(J, J_all[:, :, idx], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f, f_all, rtol=1e-12, atol=1e-12)
    # a conv weight with one entry (gathered) and one with most (per-sample matmul)
    if name == "cnn":
        idx = torch.tensor([3, *range(54 + 3, 54 + 3 + 40)])
        w = select_weights(model, "subnetwork", subnetwork_indices=idx)
        J, _ = subnetwork_jacobians(w, x, max_elements=max_elements)
        torch.testing.assert_close(J, J_all[:, :, idx], rtol=1e-12, atol=1e-12)


class _LargestNew(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of existing ones do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view (e.g. the transpose of a weight)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_subnetwork_jacobian_never_forms_per_sample_gradients_of_all_weights():
    """A 1M-weight layer: no array beyond activations, J[:, S] and max_elements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))  # 1.01M
    x = torch.randn(64, 1000)
    idx = torch.sort(torch.randperm(_n_params(model))[:300]).values
    w = select_weights(model, "subnetwork", subnetwork_indices=idx)
    with _LargestNew() as mode:
        J, _ = subnetwork_jacobians(w, x)
    assert J.shape == (64, 10, 300)
    # an activation or J itself; one per-sample gradient of the big layer alone is 1M
    assert mode.largest <= max(64 * 1000, J.numel())
    # the conv route keeps its per-sample layer gradients within max_elements
    conv = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3),
        nn.Flatten(),
        nn.Linear(64 * 6 * 6, 2),
    )
    xc = torch.randn(32, 3, 8, 8)
    idx = torch.arange(1792, 1792 + 30000)  # most of the second conv's weight
    w = select_weights(conv, "subnetwork", subnetwork_indices=idx)
    with _LargestNew() as mode:
        subnetwork_jacobians(w, xc, max_elements=2**18)
    patches = 32 * 64 * 9 * 36
    assert mode.largest <= max(2**18 + 64 * 576, patches, 32 * 2 * 30000)


# ------------------------------------------------------------------ selection rules
@pytest.mark.parametrize("selection", [*SELECTIONS, "names", "indices"])
def test_every_rule_returns_k_unique_in_range_indices(trained, selection):
    model, X, y, _ = trained
    P = _n_params(model)  # 705; the last layer has 55
    data = [(X[:150], y[:150]), (X[150:], y[150:])]
    rule = {
        "names": ByName(["2"]),
        "indices": GivenIndices(np.arange(650, 705)[::-1].copy()),
        "largest_variance_swag": LargestVarianceSWAG(n_epochs=2),
    }.get(selection, selection)
    k = 55
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    idx = select_subnetwork_indices(model, data, rule, k, generator=gen)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert len(torch.unique(idx)) == k and int(idx.min()) >= 0 and int(idx.max()) < P
    assert torch.equal(idx, torch.sort(idx).values)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if selection in ("last_layer", "names", "indices"):
        np.testing.assert_array_equal(idx.numpy(), np.arange(650, 705))


def test_seeded_rules_are_reproducible(trained):
    model, X, y, _ = trained
    data = [(X, y)]

    def run(rule, seed):
        return rule.select(model, data, 30, generator=torch.Generator().manual_seed(seed))

    for rule in (RandomSelection(), LargestVarianceSWAG(n_epochs=1)):
        assert torch.equal(run(rule, 0), run(rule, 0))
        assert not torch.equal(run(rule, 0), run(rule, 1))


def test_largest_variance_minimizes_the_wasserstein_criterion_by_brute_force():
    """argmin over all masks with sum(m) = k of sum_d sigma_d^2 (1 - m_d), per-layer prior."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # 26 weights
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    # the diagonal GGN by brute force: full per-sample Jacobians
    J, f = jacobians(select_weights(model), x)
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    h = torch.einsum("bcp,bcd,bdp->p", J, Lam, J)
    delta = torch.tensor([0.5, 3.0, 1.0, 8.0], dtype=torch.float64)  # per tensor
    sizes = [p.numel() for p in model.parameters()]
    var = (1.0 / (h + torch.repeat_interleave(delta, torch.tensor(sizes)))).numpy()
    rule = LargestVariance(prior_precision=delta.numpy())
    for k in (1, 3, 5):
        best = min(
            itertools.combinations(range(26), k), key=lambda s: var.sum() - var[list(s)].sum()
        )
        idx = rule.select(model, [(x, y)], k)
        assert idx.tolist() == list(best)
    # a scalar prior ranks by the smallest curvature, whatever its value
    a = LargestVariance(prior_precision=0.01).select(model, [(x, y)], 7)
    b = LargestVariance(prior_precision=100.0).select(model, [(x, y)], 7)
    assert torch.equal(a, b)
    assert a.tolist() == sorted(torch.argsort(h, stable=True)[:7].tolist())


def test_largest_variance_matches_laplace_torch_mask(trained):
    laplace = pytest.importorskip("laplace")
    from laplace.utils.subnetmask import LargestVarianceDiagLaplaceSubnetMask

    model, X, y, _ = trained
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=100)
    diag = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        prior_precision=1.0,
    )
    mask = LargestVarianceDiagLaplaceSubnetMask(copy.deepcopy(model), 100, diag)
    theirs = mask.select(loader)
    ours = LargestVariance().select(model, [(X, y)], 100)
    assert len(set(theirs.tolist()) & set(ours.tolist())) >= 98  # float32 near-ties only


# ------------------------------------------------------------------ estimators
def _subnet(model, X, y, **kw):
    params = dict(prior_precision=2.0, batch_size=100, random_state=0, link_approx="probit")
    params.update(kw)
    return SubnetworkLaplaceClassifier(copy.deepcopy(model), **params).fit(X.numpy(), y.numpy())


def test_all_weights_as_subnetwork_is_the_full_laplace(trained):
    model, X, y, X_test = trained
    P = _n_params(model)
    full = LaplaceClassifier(
        copy.deepcopy(model),
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=2.0,
        batch_size=100,
        random_state=0,
        link_approx="probit",
    ).fit(X.numpy(), y.numpy())
    sub = _subnet(model, X, y, subnetwork_size=P)
    np.testing.assert_array_equal(sub.subnetwork_indices_, np.arange(P))
    torch.testing.assert_close(
        sub.posterior_.covariance(), full.posterior_.covariance(), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        sub.predict_proba(X_test.numpy()), full.predict_proba(X_test.numpy()), atol=1e-6
    )
    # exactly, in float64: the curvature over S = all positions is the full GGN
    m64 = copy.deepcopy(model).double()
    batches = [(X.double(), y)]
    sub_w = select_weights(m64, "subnetwork", subnetwork_indices=np.arange(P))
    H_sub = compute_curvature(sub_w, batches, structure="full").full
    H_all = compute_curvature(select_weights(m64), batches, structure="full").full
    torch.testing.assert_close(H_sub, H_all, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection", ["largest_variance", "random"])
def test_predictive_matches_laplace_torch_full_subnet(trained, selection):
    laplace = pytest.importorskip("laplace")
    model, X, y, X_test = trained
    ours = _subnet(model, X, y, subnetwork_size=80, subnetwork_selection=selection)
    idx = torch.as_tensor(ours.subnetwork_indices_)
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_indices=idx,
        prior_precision=2.0,
    )
    assert type(la).__name__ == "FullSubnetLaplace"
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=100))
    torch.testing.assert_close(
        ours.posterior_.covariance(), la.posterior_covariance, rtol=1e-4, atol=1e-6
    )
    theirs = la(X_test, pred_type="glm", link_approx="probit").detach().numpy()
    np.testing.assert_allclose(ours.predict_proba(X_test.numpy()), theirs, atol=1e-5)


def test_grid_search_over_subnetwork_size(trained):
    model, X, y, _ = trained
    est = SubnetworkLaplaceClassifier(model, prior_precision=1.0, random_state=0)
    grid = GridSearchCV(est, {"subnetwork_size": [10, 60]}, cv=2, scoring="neg_log_loss")
    grid.fit(X.numpy(), y.numpy())
    k = grid.best_params_["subnetwork_size"]
    assert grid.best_estimator_.subnetwork_indices_.shape == (k,)
    assert grid.best_estimator_.n_params_ == k


def test_laplace_estimators_take_the_subnetwork_options(trained, gap_data):
    model, X, y, X_test = trained
    common = dict(
        subset_of_weights="subnetwork",
        hessian_structure="full",
        prior_precision=1.0,
        random_state=0,
    )
    est = LaplaceClassifier(
        copy.deepcopy(model), subnetwork_size=20, subnetwork_selection="largest_magnitude", **common
    )
    est.fit(X.numpy(), y.numpy())
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).abs()
    assert set(est.subnetwork_indices_) == set(torch.argsort(w, descending=True)[:20].tolist())
    by_name = LaplaceClassifier(copy.deepcopy(model), subnetwork_selection=["2.bias"], **common)
    np.testing.assert_array_equal(
        by_name.fit(X.numpy(), y.numpy()).subnetwork_indices_, np.arange(700, 705)
    )
    torch.manual_seed(0)
    reg_net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    reg = LaplaceRegressor(
        reg_net,
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_size=10,
        random_state=0,
    ).fit(gap_data.X, gap_data.y)
    mean, std = reg.predict(gap_data.X_test, return_std=True)
    assert reg.subnetwork_indices_.shape == (10,) and np.all(std > 0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "params,message",
    [
        (dict(subnetwork_size=706), r"larger than the network's 705 trainable parameters"),
        (dict(subnetwork_size=0), r"subnetwork_size must be an int >= 1"),
        (dict(subnetwork_size=-3), r"subnetwork_size must be an int >= 1"),
        (dict(subnetwork_size=2.5), r"subnetwork_size must be an int >= 1"),
        (dict(subnetwork_size=None), r"needs subnetwork_indices .* or subnetwork_size"),
        (dict(subnetwork_selection=[0, 705]), r"must lie in \[0, 705\)"),
        (dict(subnetwork_selection=[-1, 3]), r"must lie in \[0, 705\)"),
        (dict(subnetwork_selection=[3, 3, 4]), "repeated"),
        (dict(subnetwork_selection=[]), "selects no parameters"),
        (dict(subnetwork_selection=[0.5, 1.0]), "integer positions"),
        (dict(subnetwork_selection="largest"), "subnetwork_selection must be one of"),
        (dict(subnetwork_selection="2"), r"to select by name, pass a list: \['2'\]"),
        (dict(subnetwork_selection=["fc"]), "names no trainable parameter or module"),
        (dict(subnetwork_selection="last_layer", subnetwork_size=10), "selects 55 weights"),
    ],
)
def test_bad_subnetwork_input(trained, params, message):
    model, X, y, _ = trained
    kw = dict(subnetwork_size=10, prior_precision=1.0)
    kw.update(params)
    with pytest.raises(ValueError, match=message):
        SubnetworkLaplaceClassifier(model, **kw).fit(X.numpy(), y.numpy())


def test_bad_laplace_subnetwork_options(trained):
    model, X, y, _ = trained
    with pytest.raises(ValueError, match="not both"):
        LaplaceClassifier(
            model,
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=[1, 2],
            subnetwork_selection="random",
        ).fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="subnetwork_size is only used with"):
        LaplaceClassifier(model, subnetwork_size=10).fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="larger than"):
        RandomSelection().select(model, None, 10_000)
    with pytest.raises(ValueError, match="needs data"):
        LastLayerSelection().select(model)
    with pytest.raises(ValueError, match="subnetwork_selection must be one of"):
        resolve_selection(3.0)


def test_heldout_grid_shortcut_equals_the_posterior(trained):
    """The eigenbasis shortcut of the held-out grid gives the posterior's own J Sigma J^T."""
    model, X, y, X_test = trained
    est = _subnet(
        model,
        X[:200],
        y[:200],
        subnetwork_size=40,
        prior_precision="heldout",
        subnetwork_selection="random",
    )
    post = est.posterior_
    J, _ = jacobians(est.weights_, X_test[:10])
    J = J.to(post.mean.dtype)
    fast = post.functional_variance_grid(J)
    for delta in (1e-3, 1.0, 1e3):
        post.set_hyperparameters(prior_precision=delta)
        torch.testing.assert_close(fast(delta), post.functional_variance(J), rtol=1e-4, atol=1e-6)
    assert_heldout_rule(est)


def test_diag_glm_layer_route_takes_conv_layers():
    """The diagonal GLM predictive of a CNN without the Jacobian of all weights, exactly."""
    from skuq.posterior import DiagPosterior
    from skuq.predictive import glm_predictive, needs_jacobians

    model, x = _nets()["cnn"]
    w = select_weights(model)
    post = DiagPosterior(
        w.vector(), torch.rand(w.n_params, dtype=torch.float64) * 10, prior_precision=0.5
    )
    assert not needs_jacobians(w, post, x)
    fast = glm_predictive(w, post, x)
    slow = glm_predictive(w, post, x, use_features=False)
    torch.testing.assert_close(fast.covariance, slow.covariance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.mean, slow.mean, rtol=1e-12, atol=1e-12)
