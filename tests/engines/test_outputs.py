"""OutputDistribution, links and uncertainty measures against ground truth."""

import math

import numpy as np
import pytest
import torch

from skuq.outputs import (
    OutputDistribution,
    bridge_probabilities,
    centered_probit_probabilities,
    classification_uncertainty,
    entropy,
    probit_probabilities,
)


def random_gaussian(n=4, c=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    a = torch.randn(n, c, c, generator=g, dtype=torch.float64) * scale
    cov = a @ a.transpose(1, 2) + 0.1 * torch.eye(c, dtype=torch.float64)
    return mean, cov


def test_constructors_check_shapes():
    with pytest.raises(ValueError, match=r"mean must have shape \(N, C\)"):
        OutputDistribution.gaussian(torch.zeros(3), None)
    with pytest.raises(ValueError, match="covariance must have shape"):
        OutputDistribution.gaussian(torch.zeros(2, 3), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"samples must have shape \(S, N, C\)"):
        OutputDistribution.from_samples(torch.zeros(2, 3))


def test_variance_is_diagonal_of_full_covariance():
    mean, cov = random_gaussian()
    d = OutputDistribution.gaussian(mean, cov)
    torch.testing.assert_close(d.variance, torch.diagonal(cov, dim1=1, dim2=2))
    assert OutputDistribution.point_mass(mean).variance.abs().max() == 0


def test_sampling_reproduces_mean_and_full_covariance():
    mean, cov = random_gaussian(n=2, c=3)
    d = OutputDistribution.gaussian(mean, cov)
    s = d.sample(200_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(s.mean(0), mean, atol=0.03, rtol=0)
    emp = torch.einsum("sni,snj->nij", s - mean, s - mean) / s.shape[0]
    torch.testing.assert_close(emp, cov, atol=0.05 * cov.abs().max().item(), rtol=0)


def test_sampling_a_singular_covariance_does_not_fail():
    mean = torch.zeros(1, 2, dtype=torch.float64)
    cov = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # rank one
    s = OutputDistribution.gaussian(mean, cov).sample(50_000, torch.Generator().manual_seed(0))
    emp = torch.einsum("sni,snj->nij", s, s) / s.shape[0]
    torch.testing.assert_close(emp, cov, atol=0.03, rtol=0)


def test_probit_matches_formula_and_point_mass_is_softmax():
    mean = torch.tensor([[1.0, -0.5, 0.2]])
    var = torch.tensor([[4.0, 0.0, 1.0]])
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * var)
    torch.testing.assert_close(probit_probabilities(mean, var), torch.softmax(kappa * mean, -1))
    d = OutputDistribution.point_mass(mean)
    for link in ("probit", "centered_probit", "mc", "bridge"):
        torch.testing.assert_close(d.probabilities(link), torch.softmax(mean, -1))


def test_centered_probit_is_the_probit_of_the_centered_logits():
    """The probit of ``P f ~ N(P m, P S P)``: invariant to any shift of the logits."""
    mean, cov = random_gaussian(n=5, c=4)
    P = torch.eye(4, dtype=cov.dtype) - 1 / 4
    expected = probit_probabilities(mean @ P, torch.diagonal(P @ cov @ P, dim1=1, dim2=2))
    torch.testing.assert_close(centered_probit_probabilities(mean, cov), expected)
    # marginal variances only: the same as the diagonal covariance
    var = torch.diagonal(cov, dim1=1, dim2=2)
    torch.testing.assert_close(
        centered_probit_probabilities(mean, var),
        centered_probit_probabilities(mean, torch.diag_embed(var)),
    )
    torch.testing.assert_close(
        OutputDistribution.gaussian(mean, cov).probabilities("centered_probit"), expected
    )


def test_two_class_centered_probit_is_the_probit_of_the_logit_difference():
    """For two classes E softmax(f)_1 = E sigmoid(d), d = f_1 - f_0: the link is the
    standard sigmoid probit of d, and much closer to MC than either per-class probit."""
    mean, cov = random_gaussian(n=6, c=2, scale=3.0)
    d_mean = mean[:, 1] - mean[:, 0]
    d_var = cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]
    expected = torch.sigmoid(d_mean / torch.sqrt(1 + math.pi / 8 * d_var))
    p = centered_probit_probabilities(mean, cov)
    torch.testing.assert_close(p[:, 1], expected)
    gen = torch.Generator().manual_seed(0)
    truth = OutputDistribution.gaussian(mean, cov).probabilities(
        "mc", n_samples=400_000, generator=gen
    )
    gap = (p - truth).abs().max()
    assert gap < 0.02
    assert (
        probit_probabilities(mean, torch.diagonal(cov, dim1=1, dim2=2)) - truth
    ).abs().max() > 2 * gap


def test_centered_probit_ignores_a_shared_shift_like_softmax_does():
    """Adding the variance of a common shift ``s 1`` leaves E[softmax] unchanged.

    MC (400k draws) confirms the truth is unchanged; the centered probit is
    unchanged exactly, the plain probit moves by far more than MC's error.
    """
    mean, cov = random_gaussian(n=3, c=4, scale=0.5)
    shifted = cov + 25.0 * torch.ones(4, 4, dtype=cov.dtype)
    torch.testing.assert_close(
        centered_probit_probabilities(mean, shifted), centered_probit_probabilities(mean, cov)
    )
    torch.testing.assert_close(
        centered_probit_probabilities(mean + 7.0, cov), centered_probit_probabilities(mean, cov)
    )
    gen = torch.Generator().manual_seed(0)
    truth = OutputDistribution.gaussian(mean, cov).probabilities(
        "mc", n_samples=400_000, generator=gen
    )
    truth_shifted = OutputDistribution.gaussian(mean, shifted).probabilities(
        "mc", n_samples=400_000, generator=gen
    )
    torch.testing.assert_close(truth_shifted, truth, atol=4e-3, rtol=0)
    plain = probit_probabilities(mean, torch.diagonal(shifted, dim1=1, dim2=2))
    centered = centered_probit_probabilities(mean, shifted)
    assert float((plain - truth).abs().max()) > 0.1
    assert float((centered - truth).abs().max()) < 0.5 * float((plain - truth).abs().max())


def test_probit_approximates_binary_expected_sigmoid():
    # For two classes with logits (f, 0), probit is the classic MacKay approximation
    # of E[sigmoid(f)]; check against quadrature-accurate MC within its known error.
    f_mean, f_var = 1.5, 3.0
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc = torch.sigmoid(f_mean + math.sqrt(f_var) * z).mean()
    p = probit_probabilities(torch.tensor([[f_mean, 0.0]]), torch.tensor([[f_var, 0.0]]))[0, 0]
    assert abs(float(p) - float(mc)) < 0.01


def test_mc_link_converges_to_expected_softmax():
    mean, cov = random_gaussian(n=3, c=4, scale=0.7)
    d = OutputDistribution.gaussian(mean, cov)
    p = d.probabilities("mc", n_samples=400_000, generator=torch.Generator().manual_seed(0))
    # independent reference: the same expectation with our own Cholesky sampler
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(400_000, 3, 4, generator=torch.Generator().manual_seed(5), dtype=cov.dtype)
    ref = torch.softmax(mean + torch.einsum("nij,snj->sni", chol, z), -1).mean(0)
    torch.testing.assert_close(p, ref, atol=4e-3, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=p.dtype))


def test_bridge_formula_by_hand():
    mean = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    var = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    m = mean - mean.mean()
    k = 3
    alpha = (1 - 2 / k + torch.exp(m) / k**2 * torch.exp(-m).sum()) / var
    torch.testing.assert_close(bridge_probabilities(mean, var), alpha / alpha.sum())


def test_bridge_stays_finite_for_logits_far_apart():
    # a far-OOD input: logits spanning 300 overflow exp(m) in float32, not the log form
    mean = torch.tensor([[150.0, 0.0, -150.0], [3.0, 2.0, -1.0]])
    var = torch.tensor([[4.0, 1.0, 2.0], [0.5, 1.0, 2.0]])
    m = (mean - mean.mean(1, keepdim=True)).double()
    alpha = (1 - 2 / 3 + torch.exp(m) / 9 * torch.exp(-m).sum(1, keepdim=True)) / var.double()
    p = bridge_probabilities(mean, var)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.double(), alpha / alpha.sum(1, keepdim=True))


def test_bridge_for_two_classes_has_no_constant_term():
    mean, var = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 3.0]])
    m = mean - mean.mean()
    alpha = torch.exp(m) / 4 * torch.exp(-m).sum() / var
    torch.testing.assert_close(bridge_probabilities(mean, var), alpha / alpha.sum())


@pytest.mark.parametrize("diagonal", [True, False])
def test_sampling_from_an_overflowed_covariance_says_what_to_do(diagonal):
    cov = torch.tensor([[float("inf"), 0.0], [0.0, 1.0]])
    d = OutputDistribution.gaussian(
        torch.zeros(1, 2), cov.diagonal()[None] if diagonal else cov[None]
    )
    with pytest.raises(FloatingPointError, match="scale the inputs"):
        d.probabilities("mc", n_samples=10)


def test_sample_form_probabilities_average_softmax():
    s = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0))
    d = OutputDistribution.from_samples(s)
    torch.testing.assert_close(d.probabilities(), torch.softmax(s, -1).mean(0))
    torch.testing.assert_close(d.variance, s.var(0))
    torch.testing.assert_close(d.output_mean, s.mean(0))


def test_concatenate_keeps_rows_in_order():
    mean, cov = random_gaussian(n=5)
    d = OutputDistribution.gaussian(mean, cov)
    parts = [
        OutputDistribution.gaussian(mean[:2], cov[:2]),
        OutputDistribution.gaussian(mean[2:], cov[2:]),
    ]
    joined = OutputDistribution.concatenate(parts)
    torch.testing.assert_close(joined.mean, d.mean)
    torch.testing.assert_close(joined.covariance, d.covariance)


def test_uncertainty_measures_on_samples_by_hand():
    # two samples that disagree completely: softmax (1,0) and (0,1) approximately
    s = torch.tensor([[[20.0, -20.0]], [[-20.0, 20.0]]], dtype=torch.float64)
    d = OutputDistribution.from_samples(s)
    ent = classification_uncertainty(d, "entropy")
    exp_ent = classification_uncertainty(d, "expected_entropy")
    mi = classification_uncertainty(d, "mutual_information")
    torch.testing.assert_close(ent, torch.tensor([math.log(2)], dtype=torch.float64))
    assert float(exp_ent) < 1e-12
    torch.testing.assert_close(mi, torch.tensor([math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(
        classification_uncertainty(d, "max_prob"), torch.tensor([0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        classification_uncertainty(d, "variance"), torch.tensor([1600.0], dtype=torch.float64)
    )


def test_point_mass_has_no_epistemic_uncertainty():
    d = OutputDistribution.point_mass(torch.tensor([[2.0, 0.0, -1.0]]))
    p = torch.softmax(d.mean, -1)
    torch.testing.assert_close(classification_uncertainty(d, "entropy"), entropy(p))
    torch.testing.assert_close(classification_uncertainty(d, "expected_entropy"), entropy(p))
    assert float(classification_uncertainty(d, "mutual_information")) == 0.0


def test_gaussian_mutual_information_grows_with_variance():
    mean = torch.zeros(1, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    small = classification_uncertainty(
        OutputDistribution.gaussian(mean, torch.full((1, 3), 0.01, dtype=torch.float64)),
        "mutual_information",
        n_samples=2000,
        generator=gen,
    )
    large = classification_uncertainty(
        OutputDistribution.gaussian(mean, torch.full((1, 3), 25.0, dtype=torch.float64)),
        "mutual_information",
        n_samples=2000,
        generator=gen,
    )
    assert float(small) < 0.01 < 0.3 < float(large)


def test_unknown_kind_and_link_are_refused():
    d = OutputDistribution.point_mass(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="kind must be one of"):
        classification_uncertainty(d, "surprise")
    with pytest.raises(ValueError, match="link must be one of"):
        d.probabilities("logit")


def test_scale_variance():
    mean, cov = random_gaussian()
    d = OutputDistribution.gaussian(mean, cov).scale_variance(3.0)
    torch.testing.assert_close(d.covariance, 3 * cov)
    s = torch.randn(10, 2, 3, dtype=torch.float64)
    ds = OutputDistribution.from_samples(s).scale_variance(4.0)
    np.testing.assert_allclose(ds.variance.numpy(), 4 * s.var(0).numpy(), rtol=1e-10)


def test_centered_covariance_is_what_the_centered_link_reads_and_travels_along():
    mean, cov = random_gaussian(n=4, c=3)
    P = torch.eye(3, dtype=cov.dtype) - 1 / 3
    precise = P @ cov @ P + 1e-3 * torch.eye(3, dtype=cov.dtype)  # distinguishable
    d = OutputDistribution.gaussian(mean, cov, precise)
    torch.testing.assert_close(
        d.probabilities("centered_probit"), centered_probit_probabilities(mean, precise)
    )
    torch.testing.assert_close(
        d.probabilities("probit"), probit_probabilities(mean, torch.diagonal(cov, dim1=1, dim2=2))
    )
    both = OutputDistribution.concatenate([d, d])
    assert both.centered_covariance.shape == (8, 3, 3)
    assert d.to(torch.float32).centered_covariance.dtype == torch.float32
    torch.testing.assert_close(d.scale_variance(2.0).centered_covariance, 2 * precise)
    with pytest.raises(ValueError, match="centered_covariance must have shape"):
        OutputDistribution.gaussian(mean, cov, precise[:, :2, :2])
    with pytest.raises(ValueError, match="come with a covariance"):
        OutputDistribution.gaussian(mean, None, precise)
