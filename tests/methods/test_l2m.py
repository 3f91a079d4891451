"""L2M: the optimizer's second moment as a diagonal Laplace curvature.

Ground truth: per-row gradients by brute force (torch.func) for the empirical
Fisher, hand-computed optimizer moments, laplace-torch's diagonal GLM
predictive fed the same precision, and Monte Carlo over the same Gaussian.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from torch import nn
from torch.func import functional_call, grad, vmap

from skuq import L2MClassifier, L2MRegressor, LaplaceClassifier, LaplaceRegressor
from skuq.curvature.optimizer import second_moments
from skuq.cvp import CVPClassifier
from tests._helpers import CountingMLP, make_classifier_net, make_regressor_net


def _noisy_problem(n=512, d=5, c=3, seed=0):
    """Labels drawn from a softmax model: the loss cannot reach zero, so training settles."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.multinomial(torch.softmax(X @ torch.randn(d, c, generator=g), 1), 1, generator=g)
    return X, y[:, 0]


def _train(model, opt, X, y, epochs, batch_size, seed=0):
    torch.manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model


def _empirical_fisher(model, X, y):
    """sum_n g_n^2 of the per-row cross-entropy, by brute-force per-row gradients."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([(g[k] ** 2).sum(0).reshape(-1) for k in params])


@pytest.mark.parametrize(
    "opt_cls,lr",
    [(torch.optim.Adam, 1e-3), (torch.optim.RMSprop, 3e-4), (torch.optim.Adagrad, 3e-2)],
)
def test_precision_tracks_the_empirical_fisher(opt_cls, lr):
    """Converged on a noisy problem, N * B * v_hat is the diagonal empirical Fisher.

    Measured (512 rows, batch 32, 200 epochs, a 5-16-3 tanh MLP): median ratio
    0.96 (Adam), 0.99 (RMSprop), 0.95 (Adagrad); Pearson correlation 0.99,
    0.98, 0.99. ``scale="n_train"`` (N * v_hat) is B = 32 times too small.
    """
    X, y = _noisy_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = opt_cls(model.parameters(), lr=lr)
    _train(model, opt, X, y, epochs=200, batch_size=32)
    ef = _empirical_fisher(model, X, y)

    est = L2MClassifier(model, train_batch_size=32, prior_precision=1.0).fit(
        X.numpy(), y.numpy(), optimizer=opt
    )
    ratio = est.posterior_.h / ef
    assert 0.85 < float(ratio.median()) < 1.15
    assert np.corrcoef(est.posterior_.h.numpy(), ef.numpy())[0, 1] > 0.97

    plain = L2MClassifier(model, scale="n_train", prior_precision=1.0).fit(
        X.numpy(), y.numpy(), optimizer=opt
    )
    np.testing.assert_allclose(plain.posterior_.h.numpy() * 32, est.posterior_.h.numpy(), rtol=1e-6)


def _two_steps(opt_cls, **kw):
    w = nn.Parameter(torch.zeros(3))
    opt = opt_cls([w], **kw)
    grads = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0])]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w, opt, grads


def test_bias_correction_matches_a_hand_computation():
    b2 = 0.9
    w, opt, (g1, g2) = _two_steps(torch.optim.Adam, lr=0.1, betas=(0.5, b2))
    v = (1 - b2) * (b2 * g1**2 + g2**2)  # EMA from zero after two steps
    torch.testing.assert_close(second_moments(opt, [w], bias_correction=False)[0], v)
    torch.testing.assert_close(second_moments(opt, [w])[0], v / (1 - b2**2))

    a = 0.8
    w, opt, (g1, g2) = _two_steps(torch.optim.RMSprop, lr=0.1, alpha=a)
    torch.testing.assert_close(
        second_moments(opt, [w])[0], (1 - a) * (a * g1**2 + g2**2) / (1 - a**2)
    )

    w, opt, (g1, g2) = _two_steps(torch.optim.Adagrad, lr=0.1, initial_accumulator_value=0.3)
    torch.testing.assert_close(second_moments(opt, [w])[0], (g1**2 + g2**2) / 2)


def test_weight_decay_of_adam_is_inside_the_moment():
    """Adam's (coupled) L2 term is part of the gradient the moment averages."""
    w = nn.Parameter(torch.tensor([2.0]))
    opt = torch.optim.Adam([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.tensor([1.0])
    opt.step()
    torch.testing.assert_close(second_moments(opt, [w])[0], torch.tensor([(1.0 + 0.5 * 2.0) ** 2]))


@pytest.fixture(scope="module")
def trained(digits):
    """A small digits MLP trained with Adam, batch 50, and its optimizer."""
    torch.manual_seed(0)
    X, y = torch.as_tensor(digits.X_train[:300]), torch.as_tensor(digits.y_train[:300])
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    _train(model, opt, X, y, epochs=60, batch_size=50)
    return model.eval(), opt, X, y, torch.as_tensor(digits.X_test[:50])


def test_glm_predictive_matches_laplace_torch_with_the_same_precision(trained):
    laplace = pytest.importorskip("laplace")
    model, opt, X, y, X_test = trained
    est = L2MClassifier(model, train_batch_size=50, prior_precision=2.0, link_approx="probit").fit(
        X.numpy(), y.numpy(), optimizer=opt
    )
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        prior_precision=2.0,
    )
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=100))
    la.H = est.posterior_.h.clone()  # laplace-torch's own predictive, L2M's curvature
    expected = la(X_test, pred_type="glm", link_approx="probit").detach().numpy()
    np.testing.assert_allclose(est.predict_proba(X_test.numpy()), expected, atol=1e-5)


def test_nn_predictive_is_the_monte_carlo_average_over_the_same_gaussian(trained):
    model, opt, X, y, X_test = trained
    est = L2MClassifier(
        model,
        train_batch_size=50,
        prior_precision=2.0,
        pred_type="nn",
        n_samples=4000,
        random_state=0,
    ).fit(X.numpy(), y.numpy(), optimizer=opt)
    std = est.posterior_.marginal_variance().sqrt()
    theta = est.weights_.vector()
    g = torch.Generator().manual_seed(123)
    draws = theta + torch.randn(4000, theta.numel(), generator=g) * std
    expected = torch.stack(
        [torch.softmax(est.weights_.forward(t, X_test[:20]), -1) for t in draws]
    ).mean(0)
    np.testing.assert_allclose(est.predict_proba(X_test[:20].numpy()), expected.numpy(), atol=0.02)


def test_fitting_makes_no_pass_over_the_training_data(digits):
    """The posterior is read from state; the evidence's loss from skorch's history
    (the marginal-likelihood prior: the held-out default passes over its held-out rows)."""
    X, y = digits.X_train, digits.y_train
    net = make_classifier_net(max_epochs=3, module__n_outputs=5).fit(X, y)
    rows = []
    hook = net.module_.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    try:
        L2MClassifier(FrozenEstimator(net), prior_precision="marglik").fit(X, y)
    finally:
        hook.remove()
    assert sum(rows) <= 2  # the output-width check on two rows, nothing else


def test_skorch_route_reads_the_nets_own_optimizer_and_batch_size(digits):
    net = make_classifier_net(max_epochs=3, batch_size=40, module__n_outputs=5)
    net.fit(digits.X_train, digits.y_train)
    est = L2MClassifier(FrozenEstimator(net), prior_precision=1.0).fit(
        digits.X_train, digits.y_train
    )
    v = torch.cat(
        [m.reshape(-1) for m in second_moments(net.optimizer_, list(net.module_.parameters()))]
    )
    expected = len(digits.X_train) * 40 * v
    np.testing.assert_allclose(est.posterior_.h.numpy(), expected.numpy(), rtol=1e-6)


def test_default_gives_uncertainty_where_map_is_overconfident(digits):
    """Out-of-distribution rows get higher entropy than in-distribution ones."""
    from skuq.metrics import ood_auroc

    est = L2MClassifier(make_classifier_net(max_epochs=20), random_state=0).fit(
        digits.X_train, digits.y_train
    )
    u_in = est.predict_uncertainty(digits.X_test)
    u_out = est.predict_uncertainty(digits.X_ood)
    assert ood_auroc(u_in, u_out) > 0.85
    assert est.score(digits.X_test, digits.y_test) > 0.9


def test_grid_search_over_scale_trains_once_per_fold(digits, tmp_path):
    X, y = digits.X_train[:300], digits.y_train[:300]
    est = L2MClassifier(
        make_classifier_net(max_epochs=3, module=CountingMLP), random_state=0, memory=str(tmp_path)
    )
    CountingMLP.n_built = 0
    search = GridSearchCV(
        est,
        {"scale": ["fisher", "n_train", 10.0], "prior_precision": [1.0, "marglik"]},
        cv=3,
        scoring="neg_log_loss",
    ).fit(X, y)
    assert CountingMLP.n_built == 3 + 1  # one training per fold, plus the refit
    assert search.best_estimator_.posterior_.h.shape == (search.best_estimator_.n_params_,)


def test_regressor_gives_more_epistemic_variance_away_from_the_data(gap_data):
    """Beyond the data's support (|x| > 2.5) the net is less certain than inside it.

    (Between the two clusters, in the gap, a diagonal posterior over all weights
    does not grow: the known in-between failure of factorized Gaussians, which
    the diagonal GGN Laplace shares.)
    """
    est = L2MRegressor(make_regressor_net(max_epochs=150), random_state=0).fit(
        gap_data.X, gap_data.y
    )
    mean, std = est.predict(gap_data.X_test, return_std=True)
    assert np.isfinite(mean).all() and (std > 0).all()
    var = est.predict_uncertainty(gap_data.X_test, kind="epistemic_variance")
    x = gap_data.X_test[:, 0]
    inside = ~gap_data.in_gap & (np.abs(x) < 2)
    assert var[np.abs(x) > 2.5].mean() > 2 * var[inside].mean()


def test_regression_scaling_matches_the_gaussian_empirical_fisher(gap_data):
    """MSELoss's gradient is 2/C of 0.5*SSE's: h must equal sum_n (r_n J_n)^2 (unit noise)."""
    X, y = torch.as_tensor(gap_data.X), torch.as_tensor(gap_data.y)[:, None]
    g = torch.Generator().manual_seed(0)
    y = y + 0.3 * torch.randn(y.shape, generator=g)  # noise, so training settles
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 25):
            idx = perm[i : i + 25]
            opt.zero_grad()
            nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
            opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def half_sse(p, x, t):
        return 0.5 * ((functional_call(model, p, (x[None],)) - t[None]) ** 2).sum()

    gr = vmap(grad(half_sse), in_dims=(None, 0, 0))(params, X, y)
    ef = torch.cat([(gr[k] ** 2).sum(0).reshape(-1) for k in params])
    est = L2MRegressor(model, train_batch_size=25, prior_precision=1.0, sigma_noise=0.3).fit(
        X.numpy(), y.numpy(), optimizer=opt
    )
    ratio = est.posterior_.h / ef
    assert 0.7 < float(ratio.median()) < 1.4
    assert np.corrcoef(est.posterior_.h.numpy(), ef.numpy())[0, 1] > 0.9


def test_cvp_can_take_its_posterior_from_l2m(digits):
    net = make_classifier_net(max_epochs=5, module__n_outputs=5).fit(digits.X_train, digits.y_train)
    cvp = CVPClassifier(FrozenEstimator(net), posterior="l2m", random_state=0).fit(
        digits.X_train, digits.y_train
    )
    # CVP's l2m source takes L2M's marginal-likelihood prior (CVP calibrates its own scale)
    l2m = L2MClassifier(FrozenEstimator(net), prior_precision="marglik").fit(
        digits.X_train, digits.y_train
    )
    expected = l2m.weights_.unflatten(l2m.posterior_.marginal_variance())
    assert set(cvp.posterior_.variances) == set(expected)
    for name, var in expected.items():
        torch.testing.assert_close(cvp.posterior_.variances[name], var)


# ------------------------------------------------------------------ bad input
def test_an_optimizer_without_second_moments_is_refused(digits):
    net = make_classifier_net(max_epochs=2, optimizer=torch.optim.SGD, module__n_outputs=5).fit(
        digits.X_train, digits.y_train
    )
    with pytest.raises(TypeError, match=r"SGD keeps none.*Adam"):
        L2MClassifier(FrozenEstimator(net)).fit(digits.X_train, digits.y_train)


def test_a_net_never_trained_is_refused(trained):
    model, _, X, y, _ = trained
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="never trained"):
        L2MClassifier(model, train_batch_size=10).fit(X.numpy(), y.numpy(), optimizer=fresh)
    with pytest.raises(TypeError, match=r"fit\(X, y, optimizer=opt\)"):
        L2MClassifier(model).fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="train_batch_size"):
        L2MClassifier(model).fit(X.numpy(), y.numpy(), optimizer=trained[1])


@pytest.mark.parametrize(
    "params,message",
    [
        ({"scale": 0.0}, "scale must be"),
        ({"scale": -3.0}, "scale must be"),
        ({"scale": "batch"}, "scale must be one of"),
        ({"bias_correction": "yes"}, "bias_correction"),
        ({"train_batch_size": 0}, "train_batch_size"),
    ],
)
def test_bad_options(trained, params, message):
    model, opt, X, y, _ = trained
    with pytest.raises(ValueError, match=message):
        L2MClassifier(model, **params).fit(X.numpy(), y.numpy(), optimizer=opt)


def _unit_residual_regression(model, n=64, d=4, seed=0):
    """Inputs and targets with residual +-1 at ``model``'s weights: per row, the gradient
    of 0.5 r^2 squared is J_n^2, so the empirical Fisher is the GGN diagonal exactly."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    with torch.no_grad():
        y = model(X) + sign
    return X, y


def _one_pass(model, opt, X, y, batch_size):
    """One pass in order over fixed batches, on the mean MSE, at lr = 0: the weights stay
    put, so the optimizer's moment averages the squared gradients at those weights."""
    for i in range(0, len(X), batch_size):
        opt.zero_grad()
        nn.functional.mse_loss(model(X[i : i + batch_size]), y[i : i + batch_size]).backward()
        opt.step()


@pytest.mark.parametrize("case", ["adam_constant_gradients", "adagrad_mlp"])
def test_l2m_is_the_ggn_diagonal_where_the_moment_is_the_mean_squared_gradient(case):
    """Where v_hat is exactly the mean of the per-row squared gradients (batch 1; Adam with
    every g_n^2 the same, whose bias-corrected EMA of a constant is that constant for any
    beta2; Adagrad, whose moment is the plain mean), and the empirical Fisher is the GGN
    (residuals +-1), L2M's N B v_hat (C^2 / 4 for MSE) is the GGN diagonal: float32
    accumulation over 64 steps, 1e-5. Wrong N, B, bias correction or MSE factor fail."""
    torch.manual_seed(0)
    if case == "adam_constant_gradients":  # a linear model on +-1 inputs: g_n^2 = 4 for all
        model = nn.Linear(4, 1)
        opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.95))
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        opt = torch.optim.Adagrad(model.parameters(), lr=0.0)
    X, y = _unit_residual_regression(model)
    _one_pass(model, opt, X, y, batch_size=1)
    l2m = L2MRegressor(model, train_batch_size=1, prior_precision=1.0, sigma_noise=1.0).fit(
        X.numpy(), y.numpy()[:, 0], optimizer=opt
    )
    ggn = LaplaceRegressor(
        model,
        subset_of_weights="all",
        hessian_structure="diag",
        prior_precision=1.0,
        sigma_noise=1.0,
    ).fit(X.numpy(), y.numpy()[:, 0])
    torch.testing.assert_close(l2m.posterior_.h, ggn.posterior_.h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_mini_batch_moments_carry_the_cross_terms_of_each_batch(batch_size):
    """Adagrad at lr = 0 over a fixed partition: N B v_hat = sum_n g_n^2 + sum_b sum_{n != m
    in b} g_n g_m exactly; B = N (full batch) leaves (sum_n g_n)^2, not the Fisher."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    X, y = _unit_residual_regression(model)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.0)
    _one_pass(model, opt, X, y, batch_size)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def row_loss(p, x, t):  # 0.5 r^2: skuq's unit-noise convention
        return 0.5 * ((functional_call(model, p, (x[None],)) - t) ** 2).sum()

    g = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, X, y)
    g = torch.cat([g[k].reshape(len(X), -1) for k in params], 1).double()
    sums = g.reshape(-1, batch_size, g.shape[1]).sum(1)  # per batch
    expected = (sums**2).sum(0)  # = sum_n g_n^2 + the cross terms within each batch
    est = L2MRegressor(model, train_batch_size=batch_size, prior_precision=1.0, sigma_noise=1.0)
    if batch_size == len(X):
        with pytest.warns(UserWarning, match="full-batch"):
            est.fit(X.numpy(), y.numpy()[:, 0], optimizer=opt)
    else:
        est.fit(X.numpy(), y.numpy()[:, 0], optimizer=opt)
    torch.testing.assert_close(est.posterior_.h.double(), expected, rtol=1e-5, atol=1e-6)


def test_full_batch_training_leaves_no_curvature():
    """Trained full batch, v_hat is the squared full gradient, which vanishes as training
    converges: on a noisy problem (the loss settles) N^2 v_hat / GGN diagonal has median
    0.12 after 300 steps, 0.026 after 1000, 0.0034 after 3000 (mini-batch L2M tracks the
    Fisher, median ratio ~1, above); and L2M says so."""
    X, y = _noisy_problem(n=256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    medians = []
    for epochs in (300, 2700):
        _train(model, opt, X, y, epochs=epochs, batch_size=len(X))
        with pytest.warns(UserWarning, match="full-batch"):
            l2m = L2MClassifier(model, train_batch_size=len(X), prior_precision=1.0).fit(
                X.numpy(), y.numpy(), optimizer=opt
            )
        ggn = LaplaceClassifier(
            model, subset_of_weights="all", hessian_structure="diag", prior_precision=1.0
        ).fit(X.numpy(), y.numpy())
        medians.append(float((l2m.posterior_.h / ggn.posterior_.h).median()))
    assert medians[1] < 0.01 and medians[1] < medians[0] / 10, medians


class _SoftmaxNet(nn.Module):
    """Outputs probabilities (skorch's NLLLoss convention): skuq wraps it for logits."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, 16), nn.Linear(16, 5)

    def forward(self, x):
        return torch.softmax(self.out(torch.tanh(self.hidden(x))), dim=-1)


def test_a_probability_net_wrapped_for_logits_keeps_its_optimizer_state(digits):
    """The logit wrapper renames the parameters; their state is found all the same."""
    from skorch import NeuralNetClassifier

    net = NeuralNetClassifier(
        _SoftmaxNet,
        optimizer=torch.optim.Adam,
        max_epochs=3,
        batch_size=50,
        train_split=None,
        verbose=0,
    )
    net.fit(digits.X_train, digits.y_train)
    est = L2MClassifier(FrozenEstimator(net), prior_precision=1.0).fit(
        digits.X_train, digits.y_train
    )
    assert est.weights_.names[0].startswith("module.")
    v = torch.cat(
        [m.reshape(-1) for m in second_moments(net.optimizer_, list(net.module_.parameters()))]
    )
    np.testing.assert_allclose(
        est.posterior_.h.numpy(), (len(digits.X_train) * 50 * v).numpy(), rtol=1e-6
    )


def test_a_skorch_validation_split_counts_only_the_rows_trained_on(digits):
    """skorch's default train_split holds 20 % out: N is the rows the optimizer saw."""
    from skorch.dataset import ValidSplit

    net = make_classifier_net(
        max_epochs=2, batch_size=32, module__n_outputs=5, train_split=ValidSplit(5)
    )
    net.fit(digits.X_train, digits.y_train)
    train_part, _ = net.get_split_datasets(digits.X_train, digits.y_train)
    est = L2MClassifier(FrozenEstimator(net), prior_precision=1.0).fit(
        digits.X_train, digits.y_train
    )
    v = torch.cat(
        [m.reshape(-1) for m in second_moments(net.optimizer_, list(net.module_.parameters()))]
    )
    assert len(train_part) < len(digits.X_train)
    np.testing.assert_allclose(
        est.posterior_.h.numpy(), (len(train_part) * 32 * v).numpy(), rtol=1e-6
    )


def test_regression_posterior_follows_the_units_of_y():
    """Adam's second moments are squared gradients of the unit-noise loss: they carry
    1 / sigma^4 in the posterior precision, so that y in other units (x 100) scales
    sigma and the predictive std by 100 (the weights stay where least squares put them:
    the optimizer only reads gradients, lr=0). The evidence's prior follows the units
    too (1 / 100^2); a held-out prior is a value of a fixed grid, so marglik is asked for."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=gen)
    y0 = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.4 * torch.randn(60, generator=gen)
    A = torch.cat([X, torch.ones(60, 1)], 1).double()
    fits = []
    for k in (1.0, 100.0):
        y = k * y0
        coef = torch.linalg.lstsq(A, y.double()[:, None]).solution[:, 0].float()
        model = nn.Linear(3, 1)
        with torch.no_grad():
            model.weight.copy_(coef[:3][None])
            model.bias.copy_(coef[3:])
        opt = torch.optim.Adam(model.parameters(), lr=0.0)
        for _ in range(30):
            for i in range(0, 60, 20):
                opt.zero_grad()
                nn.functional.mse_loss(model(X[i : i + 20])[:, 0], y[i : i + 20]).backward()
                opt.step()
        est = L2MRegressor(model, train_batch_size=20, prior_precision="marglik")
        est.fit(X.numpy(), y.numpy(), optimizer=opt)
        fits.append((est, est.predict(X.numpy(), return_std=True)[1]))
    (one, std_one), (hundred, std_hundred) = fits
    np.testing.assert_allclose(hundred.sigma_noise_, 100 * one.sigma_noise_, rtol=1e-3)
    np.testing.assert_allclose(hundred.prior_precision_, one.prior_precision_ / 1e4, rtol=1e-2)
    np.testing.assert_allclose(std_hundred, 100 * std_one, rtol=1e-3)


def test_regressor_defaults_read_noise_and_prior_on_held_out_rows(gap_data):
    """sigma_noise="residual" and prior_precision="heldout" by default: both on held-out
    rows (``X_cal``), never on the rows the net was trained on."""
    X_tr, y_tr = gap_data.X[:150], gap_data.y[:150]
    X_cal, y_cal = gap_data.X[150:], gap_data.y[150:]
    net = make_regressor_net(max_epochs=30, module__n_outputs=1).fit(X_tr, y_tr.reshape(-1, 1))
    est = L2MRegressor(FrozenEstimator(net)).fit(X_tr, y_tr, X_cal=X_cal, y_cal=y_cal)
    residual = net.predict(X_cal)[:, 0] - y_cal
    assert est.sigma_noise_ == pytest.approx(float(np.sqrt(np.mean(residual**2))), rel=1e-5)
    assert est.prior_precision_ == pytest.approx(min(est.heldout_nll_, key=est.heldout_nll_.get))
    # a prefit net without X_cal: fit's rows are the held-out rows
    prefit = L2MRegressor(FrozenEstimator(net)).fit(X_cal, y_cal)
    assert prefit.sigma_noise_ == pytest.approx(est.sigma_noise_, rel=1e-5)
