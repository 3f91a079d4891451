"""LaplaceClassifier / LaplaceRegressor: laplace-torch as an oracle, caching, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from torch import nn

import skuq.laplace.base as skuq_laplace
from skuq import LaplaceClassifier, LaplaceRegressor, MAPClassifier
from skuq.curvature import compute_curvature, select_weights
from skuq.metrics import ood_auroc
from skuq.posterior import posterior_from_curvature
from tests._helpers import assert_centered_predictive, make_classifier_net

laplace = pytest.importorskip("laplace")


@pytest.fixture(scope="module")
def trained(digits):
    """A small MLP trained on 300 digits (float32), shared by the oracle tests."""
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
    return model, X, y, torch.as_tensor(digits.X_test[:60]), torch.as_tensor(digits.X_ood[:60])


@pytest.fixture(scope="module")
def tiny():
    """A 67-weight MLP on 200 synthetic rows: small enough for laplace-torch's full GGN."""
    torch.manual_seed(0)
    X = torch.randn(200, 4)
    with torch.no_grad():
        y = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))(3 * X).argmax(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    return model, X, y


def _oracle(model, X, y, subset, structure, prior):
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=prior,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=100)
    la.fit(loader)
    return la


def _ours(model, X, y, subset, structure, prior, **kw):
    kw.setdefault("link_approx", "probit")  # laplace-torch's link, for the oracle tests
    est = LaplaceClassifier(
        copy.deepcopy(model),
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=prior,
        batch_size=100,
        random_state=0,
        **kw,
    )
    return est.fit(X.numpy(), y.numpy())


@pytest.mark.parametrize(
    "subset,structure",
    [
        ("all", "full"),
        ("all", "diag"),
        ("last_layer", "full"),
        ("last_layer", "kron"),
        ("all", "kron"),
        ("last_layer", "diag"),
    ],
)
def test_probabilities_match_laplace_torch(trained, subset, structure):
    """glm/probit probabilities agree to 1e-5 for every structure.

    K-FAC convention shared with laplace-torch 0.3 (curvlinops backend): "expand"
    K-FAC with the exact class expectation, separate weight and bias blocks,
    A averaged and G summed over rows -- so kron agrees as tightly as diag/full
    (for Linear layers; Conv2d biases differ, see test_cnn_kron_factors_against_laplace_torch).
    """
    model, X, y, X_test, X_ood = trained
    la = _oracle(model, X, y, subset, structure, 2.0)
    est = _ours(model, X, y, subset, structure, 2.0)
    for Z in (X_test, X_ood):
        expected = la(Z, pred_type="glm", link_approx="probit").detach().numpy()
        np.testing.assert_allclose(est.predict_proba(Z.numpy()), expected, atol=1e-5, rtol=0)
        mean, var = la._glm_predictive_distribution(Z)
        ours = est.predict_distribution(Z.numpy())
        np.testing.assert_allclose(
            ours.covariance.numpy(), var.detach().numpy(), atol=1e-5, rtol=1e-4
        )
    np.testing.assert_allclose(
        float(est.posterior_.log_marginal_likelihood()),
        float(la.log_marginal_likelihood()),
        rtol=1e-5,
    )


def _cnn(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, stride=2, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def test_cnn_kron_factors_against_laplace_torch():
    """Conv2d + Linear K-FAC factors (float64) against laplace-torch 0.3 (curvlinops).

    Weight factors G, A and the Linear bias block agree to 1e-10 (relative). The
    Conv2d bias blocks are the stated exception (see skuq.curvature.ggn): ours is the
    exact GGN block, laplace-torch's is the weight's G (no cross-position terms).
    """
    from tests._helpers import brute_ggn

    model = _cnn().double()
    torch.manual_seed(1)
    x, y = torch.randn(20, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    la = _oracle(model, x, y, "all", "kron", 1.0)  # batches of 100: one here
    la7 = laplace.Laplace(
        copy.deepcopy(model), "classification", subset_of_weights="all", hessian_structure="kron"
    )
    la7.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7))
    w = select_weights(model)
    ours = compute_curvature(
        w, [(x[i : i + 7], y[i : i + 7]) for i in range(0, 20, 7)], structure="kron"
    ).kron
    H = brute_ggn(model, x)
    names = [n for n, _ in model.named_parameters()]
    for oracle in (la, la7):
        kfacs = oracle.H_facs.kfacs
        assert len(kfacs) == len(ours) == len(names)
        for name, theirs, block in zip(names, kfacs, ours, strict=True):
            assert len(theirs) == len(block.factors)
            if name in ("0.bias", "2.bias"):
                G = ours[names.index(name.replace("bias", "weight"))].factors[0]
                torch.testing.assert_close(theirs[0], G, rtol=1e-10, atol=1e-12)
                exact = H[block.index, block.index]
                torch.testing.assert_close(block.factors[0], exact, rtol=1e-10, atol=1e-12)
                assert (exact - G).abs().max() > 0.1 * exact.abs().max()  # a real difference
                continue
            for t, o in zip(theirs, block.factors, strict=True):
                torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12)


def test_cnn_kron_probabilities_match_laplace_torch():
    """A trained Conv2d (no bias) + Linear net: every K-FAC block is shared, so the
    glm/probit probabilities agree to 1e-5 (float32), as for the MLPs."""
    torch.manual_seed(2)
    x = torch.randn(120, 2, 4, 4)
    with torch.no_grad():  # three balanced classes from a random teacher's score
        score = _cnn(seed=3)(x)[:, 0].contiguous()
    y = torch.bucketize(score, score.quantile(torch.tensor([1 / 3, 2 / 3])))
    model = _cnn(bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    la = _oracle(model, x, y, "all", "kron", 2.0)
    est = _ours(model, x, y, "all", "kron", 2.0)
    X_test = torch.randn(50, 2, 4, 4)
    expected = la(X_test, pred_type="glm", link_approx="probit").detach().numpy()
    np.testing.assert_allclose(est.predict_proba(X_test.numpy()), expected, atol=1e-5, rtol=0)
    _, var = la._glm_predictive_distribution(X_test)
    np.testing.assert_allclose(
        est.predict_distribution(X_test.numpy()).covariance.numpy(),
        var.detach().numpy(),
        atol=1e-4,
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        float(est.posterior_.log_marginal_likelihood()),
        float(la.log_marginal_likelihood()),
        rtol=1e-5,
    )


def _laplace_torch_optimum64(model, X, y, subset, structure, n_groups=1):
    """laplace-torch's evidence-maximizing prior precision(s), converged in float64.

    Its curvature of the net converted to float64, and its own ``log_marginal_likelihood``
    maximized in ``log delta`` by scipy to a gradient of 1e-12 (or a Brent search to
    1e-11), not by its Adam loop (which stops at a fixed number of steps).
    """
    import scipy.optimize

    la = laplace.Laplace(
        copy.deepcopy(model).double(),
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=1.0,
    )
    la.fit(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X.double(), y), batch_size=100)
    )
    if n_groups == 1:

        def neg(z):
            d = torch.tensor([np.exp(z)], dtype=torch.float64)
            return -float(la.log_marginal_likelihood(d))

        res = scipy.optimize.minimize_scalar(
            neg, bounds=(-15, 15), method="bounded", options={"xatol": 1e-11}
        )
        return float(np.exp(res.x))

    def neg_grad(z, f0=0.0):  # f0: L-BFGS-B's ftol is relative to |f|, shift the constant out
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        value = -la.log_marginal_likelihood(zt.exp())
        (g,) = torch.autograd.grad(value, zt)
        return float(value) - f0, g.detach().numpy()

    f0 = neg_grad(np.zeros(n_groups))[0]
    res = scipy.optimize.minimize(
        neg_grad,
        np.zeros(n_groups),
        args=(f0,),
        jac=True,
        method="L-BFGS-B",
        options=dict(ftol=1e-15, gtol=1e-12, maxiter=1000),
    )
    z = torch.tensor(res.x, dtype=torch.float64)
    for _ in range(3):  # polished by Newton on its autograd Hessian
        hess = torch.autograd.functional.hessian(lambda t: -la.log_marginal_likelihood(t.exp()), z)
        z = z - torch.linalg.solve(hess, torch.as_tensor(neg_grad(z.numpy())[1]))
    assert np.abs(neg_grad(z.numpy())[1]).max() < 1e-9 * len(la.mean), res
    return np.exp(z.numpy())


def _ours_float64(model, X, y, subset, structure, prior_structure="scalar"):
    """skuq's posterior on the net converted to float64, its evidence maximized."""
    model = copy.deepcopy(model).double()
    w = select_weights(model, subset, example_input=X[:2].double())
    curv = compute_curvature(w, [(X.double(), y)], structure=structure)
    post = posterior_from_curvature(
        curv, w.vector(), prior_precision=1.0, group_sizes=w.group_sizes()
    )
    post.optimize_prior_precision(prior_structure)
    return post.prior_precision.numpy()


# The evidence is float64 and its optimum is resolved to ~1e-7 (relative; see
# WeightPosterior.optimize_prior_precision): against an optimum converged to ~1e-10
# of the same curvature, 1e-6 holds with a margin of 10 on any CPU.
@pytest.mark.parametrize(
    "data,subset,structure",
    [
        ("trained", "all", "diag"),
        ("trained", "last_layer", "kron"),
        ("trained", "last_layer", "full"),
        ("trained", "all", "kron"),
        ("tiny", "all", "full"),
    ],
)
def test_marglik_prior_precision_matches_laplace_torch(request, data, subset, structure):
    """The same net in float64 on both sides: laplace-torch's converged optimum at 1e-6."""
    model, X, y = request.getfixturevalue(data)[:3]
    expected = _laplace_torch_optimum64(model, X, y, subset, structure)
    np.testing.assert_allclose(_ours_float64(model, X, y, subset, structure), expected, rtol=1e-6)


def _dense_curvature64(post) -> np.ndarray:
    """The (float32) curvature a posterior holds, as a dense float64 matrix."""
    if post.structure == "diag":
        return np.diag(post.h.double().numpy())
    if post.structure == "full":
        return post.H.double().numpy()
    if post.structure == "lowrank":
        U = post.eigvecs.double().numpy()
        return (U * post.eigvals.double().numpy()) @ U.T
    out = np.zeros((post.n_params, post.n_params))
    for b in post.blocks:
        f = [F.double().numpy() for F in b.factors]
        out[b.index, b.index] = f[0] if len(f) == 1 else np.kron(f[0], f[1])
    return out


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "lowrank"])
def test_marglik_of_a_float32_net_against_float64_brute_force(trained, structure):
    """A float32 net: the optimum of the evidence of its own (float32) curvature within
    1e-6 of a dense float64 maximization (an objective evaluated in float32 missed it by
    up to 1.5e-3)."""
    from tests._helpers import brute_layerwise_marglik_optimum

    model, X, y = trained[:3]
    est = _ours(model, X, y, "all", structure, "marglik", rank=40)
    post = est.posterior_
    assert post.mean.dtype == torch.float32
    expected = brute_layerwise_marglik_optimum(
        _dense_curvature64(post), post.mean.double().numpy(), [post.n_params]
    )
    np.testing.assert_allclose(est.prior_precision_, expected[0], rtol=1e-6)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_layerwise_marglik_against_brute_force(tiny, structure):
    """prior_structure="layerwise": one precision per parameter tensor. A float32 net
    against a dense float64 maximization of the evidence of its own curvature, and the
    net in float64 against laplace-torch's float64 optimum; both at 1e-6 (see above)."""
    from tests._helpers import brute_layerwise_marglik_optimum

    model, X, y = tiny
    sizes = [p.numel() for p in model.parameters()]
    est = _ours(model, X, y, "all", structure, "marglik", prior_structure="layerwise")
    post = est.posterior_
    expected = brute_layerwise_marglik_optimum(
        _dense_curvature64(post), post.mean.double().numpy(), sizes
    )
    assert est.prior_precision_.shape == (4,)
    np.testing.assert_allclose(est.prior_precision_, expected, rtol=1e-6)
    oracle = _laplace_torch_optimum64(model, X, y, "all", structure, n_groups=4)
    np.testing.assert_allclose(
        _ours_float64(model, X, y, "all", structure, "layerwise"), oracle, rtol=1e-6
    )
    scalar = _ours(model, X, y, "all", structure, "marglik").prior_precision_
    assert np.abs(expected / scalar - 1).max() > 0.2  # the per-layer optimum is another one


def test_regressor_matches_laplace_torch(gap_data):
    torch.manual_seed(0)
    X, y = torch.as_tensor(gap_data.X), torch.as_tensor(gap_data.y)[:, None]
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    for subset, structure in [("all", "full"), ("last_layer", "kron")]:
        # the oracle on the net converted to float64: what remains is skuq's float32 rounding
        la = laplace.Laplace(
            copy.deepcopy(model).double(),
            "regression",
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=0.5,
            sigma_noise=0.2,
        )
        la.fit(
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(X.double(), y.double()), batch_size=64
            )
        )
        est = LaplaceRegressor(
            copy.deepcopy(model),
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=0.5,
            sigma_noise=0.2,
        ).fit(X.numpy(), y.numpy()[:, 0])
        mean, var = la(torch.as_tensor(gap_data.X_test).double(), pred_type="glm")
        m, s = est.predict(gap_data.X_test, return_std=True)
        np.testing.assert_allclose(m, mean[:, 0].detach().numpy(), atol=1e-5)
        # float32 posterior of an ill-conditioned curvature (H / sigma^2 reaches 1e5 delta):
        # 3.1e-4 relative against float64 on both CPU code paths (default and AVX2); the
        # float32 oracle used before added its own rounding and reached 6.4e-4
        np.testing.assert_allclose(s**2, var[:, 0, 0].detach().numpy() + 0.04, rtol=5e-4)
        # sigma and prior jointly by marglik, as laplace-torch's evidence
        est = LaplaceRegressor(
            copy.deepcopy(model), subset_of_weights=subset, hessian_structure=structure
        ).fit(X.numpy(), y.numpy()[:, 0])
        la.prior_precision = torch.tensor(est.prior_precision_, dtype=torch.float64)
        la.sigma_noise = torch.tensor(est.sigma_noise_, dtype=torch.float64)
        # the two libraries' float32 GGNs differ by rounding (~2.5e-7 of the largest
        # entry), which moves log det(H / sigma^2 + delta) of this ill-conditioned problem
        # by ~1e-3 relative even with both evaluated in float64; the optimum itself is
        # checked against laplace-torch in float64 at 1e-6 above
        np.testing.assert_allclose(
            float(est.posterior_.log_marginal_likelihood()),
            float(la.log_marginal_likelihood()),
            rtol=2e-3,
        )


def _least_squares_line(k: float):
    """A linear model fitted exactly to ``k * y``, and that data."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = k * (
        X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        + 0.3
        + 0.4 * torch.randn(60, generator=gen, dtype=torch.float64)
    )
    A = torch.cat([X, torch.ones(60, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(coef[:3][None])
        model.bias.copy_(coef[3:])
    return model, X.float().numpy(), y.float().numpy()


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_regression_posterior_follows_the_units_of_y(curvature, structure):
    """y in other units (x 100): the same evidence up to a constant, so sigma and the
    predictive std scale by 100 and the prior precision by 1 / 100^2. An empirical Fisher
    squares loss gradients that carry 1 / sigma^2 each: scaled like the GGN (by
    1 / sigma^2), its posterior kept the std of y = 1 on y = 100."""
    fits = []
    for k in (1.0, 100.0):
        model, X, y = _least_squares_line(k)
        est = LaplaceRegressor(
            model,
            subset_of_weights="all",
            hessian_structure=structure,
            curvature=curvature,
            prior_precision="marglik",
            sigma_noise="marglik",
        ).fit(X, y)
        fits.append((est, est.predict(X, return_std=True)[1]))
    (one, std_one), (hundred, std_hundred) = fits
    np.testing.assert_allclose(hundred.sigma_noise_, 100 * one.sigma_noise_, rtol=1e-4)
    np.testing.assert_allclose(hundred.prior_precision_, one.prior_precision_ / 1e4, rtol=1e-3)
    np.testing.assert_allclose(std_hundred, 100 * std_one, rtol=1e-4)
    # and the epistemic part, not only the noise, follows
    epistemic = [np.sqrt(s**2 - e.sigma_noise_**2) for e, s in fits]
    np.testing.assert_allclose(epistemic[1], 100 * epistemic[0], rtol=1e-3)


def test_regression_empirical_fisher_is_that_of_the_gaussian_likelihood():
    """The posterior precision of an EF Laplace is sum_n g_n g_n^T + delta with g_n the
    gradient of the negative log-likelihood at noise sigma, built here by hand."""
    model, X, y = _least_squares_line(3.0)
    sigma, delta = 2.5, 0.7
    est = LaplaceRegressor(
        model,
        subset_of_weights="all",
        hessian_structure="full",
        curvature="ef",
        prior_precision=delta,
        sigma_noise=sigma,
    ).fit(X, y)
    A = np.column_stack([X, np.ones(len(X))])
    r = y - A @ np.r_[model.weight.detach().numpy()[0], model.bias.detach().numpy()]
    g = A * (r / sigma**2)[:, None]  # d/d theta of 0.5 r^2 / sigma^2
    precision = g.T @ g + delta * np.eye(4)
    x_new = np.array([[0.3, -1.0, 2.0]])
    a_new = np.r_[x_new[0], 1.0]
    var = a_new @ np.linalg.solve(precision, a_new) + sigma**2
    np.testing.assert_allclose(est.predict(x_new, return_std=True)[1] ** 2, var, rtol=1e-6)


@pytest.mark.parametrize("structure", ["kron", "lowrank"])
def test_grid_search_computes_curvature_once_per_fold(digits, monkeypatch, structure):
    """Only posterior parameters change: one curvature per fold (lowrank too: its
    generator enters the cache key by its seed state, not by its address)."""
    calls = []
    original = skuq_laplace.compute_curvature

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(skuq_laplace, "compute_curvature", counting)
    skuq_laplace.clear_curvature_cache()
    net = make_classifier_net(max_epochs=3, hidden=(16,), module__n_outputs=5)
    net.fit(digits.X_train, digits.y_train)
    est = LaplaceClassifier(
        FrozenEstimator(net), hessian_structure=structure, prior_precision=1.0, random_state=0
    )
    grid = {"prior_precision": list(np.logspace(-2, 3, 8))}
    search = GridSearchCV(est, grid, cv=5, scoring="neg_log_loss").fit(
        digits.X_train[:300], digits.y_train[:300]
    )
    assert len(calls) == 5 + 1  # one per fold, plus the refit on all rows
    assert search.best_estimator_.prior_precision_ == search.best_params_["prior_precision"]


def test_cache_tells_architectures_apart(trained):
    """A Tanh and a ReLU net with the same weights have different curvatures."""
    model, X, y, _, _ = trained
    relu = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 5))
    relu.load_state_dict(model.state_dict())
    skuq_laplace.clear_curvature_cache()
    curvs = []
    for net in (model, relu):
        est = _ours(net, X, y, "all", "diag", 1.0)
        direct = compute_curvature(est.weights_, [(X, y)], structure="diag").diag
        torch.testing.assert_close(est.posterior_.h, direct, rtol=1e-5, atol=1e-6)
        curvs.append(direct)
    assert (curvs[0] - curvs[1]).abs().max() > 1e-2 * curvs[0].abs().max()


def test_nll_loss_net_gets_uncertainty(digits):
    """skorch's default NLLLoss: the module outputs probabilities; we use their logits.

    The Laplace predictive of the NLLLoss net is that of the same weights without the
    softmax (a logit net), and not that of its probabilities taken as logits.
    """

    class SoftmaxMLP(nn.Sequential):
        def __init__(self, n_outputs=5, hidden=None):
            super().__init__(
                nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, n_outputs), nn.Softmax(dim=-1)
            )

    net = make_classifier_net(max_epochs=10, module=SoftmaxMLP, criterion=nn.NLLLoss)
    net.fit(digits.X_train, digits.y_train)
    logit_net = nn.Sequential(*copy.deepcopy(list(net.module_.children())[:-1]))
    prob_net = copy.deepcopy(net.module_)  # a bare module: its outputs are taken as logits
    X, y, X_test = digits.X_train, digits.y_train, digits.X_test
    kw = dict(subset_of_weights="all", prior_precision=1.0, random_state=0)
    lap = LaplaceClassifier(FrozenEstimator(net), **kw).fit(X, y)
    p = lap.predict_proba(X_test)
    p_logit = LaplaceClassifier(logit_net, **kw).fit(X, y).predict_proba(X_test)
    np.testing.assert_allclose(p, p_logit, atol=1e-5, rtol=0)
    p_wrong = LaplaceClassifier(prob_net, **kw).fit(X, y).predict_proba(X_test)
    assert np.abs(p - p_wrong).max() > 0.1
    # and end to end, the net trained inside fit
    lap = LaplaceClassifier(net, random_state=0).fit(X, y)
    base = MAPClassifier(net, random_state=0).fit(X, y)
    auroc = ood_auroc(lap.predict_uncertainty(X_test), lap.predict_uncertainty(digits.X_ood))
    assert auroc > 0.85
    assert lap.score(X_test, digits.y_test) > 0.95
    assert base.score(X_test, digits.y_test) > 0.95


def test_subnetwork_uses_given_indices(trained):
    model, X, y, X_test, _ = trained
    idx = np.arange(650, 705)  # the last layer's 55 weights
    sub = _ours(model, X, y, "subnetwork", "full", 2.0, subnetwork_indices=idx)
    last = _ours(model, X, y, "last_layer", "full", 2.0)
    assert sub.n_params_ == 55
    np.testing.assert_allclose(
        sub.predict_proba(X_test.numpy()), last.predict_proba(X_test.numpy()), atol=1e-6
    )


def test_nn_predictive_and_links_run(trained):
    model, X, y, X_test, _ = trained
    est = _ours(model, X, y, "last_layer", "kron", 2.0, pred_type="nn", n_samples=50)
    p1, p2 = est.predict_proba(X_test.numpy()), est.predict_proba(X_test.numpy())
    np.testing.assert_array_equal(p1, p2)  # the same draws each call
    for link in ("mc", "bridge"):
        p = _ours(model, X, y, "last_layer", "kron", 2.0, link_approx=link).predict_proba(
            X_test.numpy()
        )
        np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize(
    "subset, structure",
    [
        ("last_layer", "diag"),
        ("last_layer", "kron"),
        ("last_layer", "full"),
        ("all", "diag"),
        ("all", "kron"),
        ("all", "full"),
        ("all", "lowrank"),
    ],
)
def test_default_link_reads_the_centered_covariance_of_every_route(trained, subset, structure):
    """Feature, layer and Jacobian routes all hand the centered probit ``P Cov[f] P``."""
    model, X, y, X_test, _ = trained
    assert LaplaceClassifier(model).link_approx == "centered_probit"  # the default
    est = _ours(model, X, y, subset, structure, 2.0, rank=20, link_approx="centered_probit")
    assert_centered_predictive(est, X_test.numpy())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "params,message",
    [
        (dict(hessian_structure="block"), "hessian_structure must be one of"),
        (dict(subset_of_weights="first"), "subset_of_weights must be one of"),
        (dict(prior_precision=0.0), "prior_precision must be a finite number > 0"),
        (dict(prior_precision="evidence"), "prior_precision must be one of"),
        (dict(pred_type="mean"), "pred_type must be one of"),
        (dict(link_approx="logit"), "link_approx must be one of"),
        (
            dict(subset_of_weights="subnetwork", hessian_structure="diag", subnetwork_indices=[0]),
            "subnetwork' needs hessian_structure='full'",
        ),
        (
            dict(subset_of_weights="subnetwork", hessian_structure="full"),
            "needs subnetwork_indices",
        ),
        (
            dict(subset_of_weights="subnetwork", hessian_structure="full", subnetwork_indices=[]),
            "selects no parameters",
        ),
        (dict(subnetwork_indices=[1, 2]), "only used with subset_of_weights='subnetwork'"),
        (dict(hessian_structure="lowrank", prior_structure="layerwise"), "scalar' only"),
    ],
)
def test_bad_options(trained, params, message):
    model, X, y, _, _ = trained
    with pytest.raises(ValueError, match=message):
        LaplaceClassifier(model, **params).fit(X.numpy(), y.numpy())


def test_bad_networks(trained):
    _, X, y, _, _ = trained
    frozen = nn.Sequential(nn.Linear(64, 5)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        LaplaceClassifier(frozen).fit(X.numpy(), y.numpy())
    torch.manual_seed(0)
    norm_net = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="supports Linear and Conv2d layers only"):
        LaplaceClassifier(norm_net, subset_of_weights="all", hessian_structure="kron").fit(
            X.numpy(), y.numpy()
        )
    broken = nn.Sequential(nn.Linear(64, 5))
    with torch.no_grad():
        broken[0].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        LaplaceClassifier(broken, prior_precision=1.0).fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="per-layer floats"):
        LaplaceClassifier(nn.Linear(64, 5), prior_precision=[1.0, -1.0]).fit(X.numpy(), y.numpy())


def test_residual_noise_is_the_rms_residual_on_fits_rows_and_marglik_moves_it():
    """A trained module never saw ``fit``'s rows: ``"residual"`` (the default) reads the
    noise there; the evidence moves it."""
    model, X, y = _least_squares_line(2.0)
    with torch.no_grad():
        rms = float(
            torch.sqrt(((model(torch.as_tensor(X))[:, 0] - torch.as_tensor(y)) ** 2).mean())
        )
    kept = LaplaceRegressor(
        copy.deepcopy(model),
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision="marglik",
        sigma_noise="residual",
    ).fit(X, y)
    assert kept.sigma_noise_ == pytest.approx(rms, rel=1e-5)
    assert LaplaceRegressor(
        copy.deepcopy(model),
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision="marglik",
    ).fit(X, y).sigma_noise_ == pytest.approx(rms, rel=1e-5)
    fitted = LaplaceRegressor(
        copy.deepcopy(model),
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision="marglik",
        sigma_noise="marglik",
    ).fit(X, y)
    assert abs(fitted.sigma_noise_ / rms - 1) > 1e-3  # the evidence's own optimum
    with pytest.raises(ValueError, match="sigma_noise must be one of"):
        LaplaceRegressor(model, sigma_noise="rms").fit(X, y)


def test_auto_noise_is_the_evidence_over_few_weights_and_the_residual_over_many():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(60, 3, generator=gen)
    y = torch.sin(X.sum(1)) + 0.2 * torch.randn(60, generator=gen)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))  # 81 weights
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((model(X)[:, 0] - y) ** 2).mean().backward()
        opt.step()
    X, y = X.numpy(), y.numpy()

    def sigma(**kw):
        return (
            LaplaceRegressor(copy.deepcopy(model), prior_precision="marglik", **kw)
            .fit(X, y)
            .sigma_noise_
        )

    # last layer: 17 weights <= 60 targets, so the evidence decides
    assert sigma(sigma_noise="auto") == pytest.approx(sigma(sigma_noise="marglik"), rel=1e-6)
    assert sigma(sigma_noise="auto") != pytest.approx(sigma(sigma_noise="residual"), rel=1e-3)
    # all 81 weights > 60 targets: the residual
    assert sigma(
        subset_of_weights="all", hessian_structure="full", sigma_noise="auto"
    ) == pytest.approx(
        sigma(subset_of_weights="all", hessian_structure="full", sigma_noise="residual"), rel=1e-6
    )
