"""The one currency of skuq: a distribution over a network's outputs.

Every method in skuq answers the same question -- given inputs ``X``, what is
the distribution of the network outputs ``f(X)``? -- and returns an
:class:`OutputDistribution`. Everything downstream of that (links to
probabilities, uncertainty scores, regression bands) is written once here.

Two representations are supported:

* **Gaussian**: per row a mean over the ``C`` outputs and a covariance, either
  full (``N x C x C``) or diagonal (``N x C``); a missing covariance is a point
  mass (the bare network).
* **Samples**: a stack ``S x N x C`` of output draws (MC dropout, ensembles,
  weight-space sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._utils import check_finite

LINKS = ("probit", "centered_probit", "mc", "bridge")
CLASSIFICATION_UNCERTAINTIES = (
    "entropy",
    "mutual_information",
    "expected_entropy",
    "variance",
    "max_prob",
)

__all__ = [
    "LINKS",
    "CLASSIFICATION_UNCERTAINTIES",
    "OutputDistribution",
    "probit_probabilities",
    "centered_probit_probabilities",
    "bridge_probabilities",
    "entropy",
    "classification_uncertainty",
]


@dataclass
class OutputDistribution:
    """Distribution of the network outputs for a batch of ``N`` rows.

    Build one with :meth:`gaussian`, :meth:`point_mass` or :meth:`from_samples`
    rather than with the constructor.

    Parameters
    ----------
    mean : Tensor of shape (N, C) or None
        Mean of the outputs (Gaussian form).
    covariance : Tensor of shape (N, C, C) or (N, C), or None
        Full or diagonal covariance (Gaussian form). ``None`` is a point mass.
    samples : Tensor of shape (S, N, C) or None
        Output draws (sample form).
    centered_covariance : Tensor of shape (N, C, C) or None
        Optional ``Cov[P f]`` of the centered outputs (``P = I - 11^T/C``), the
        part of ``covariance`` a softmax sees. A predictive that can form it
        without cancellation (from centered Jacobians, see
        :func:`skuq.posterior.split_centered`) passes it here, and
        ``link="centered_probit"`` uses it instead of projecting
        ``covariance``, whose shared-shift variance can exceed the rest by
        orders of magnitude.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import OutputDistribution
    >>> d = OutputDistribution.gaussian(torch.zeros(2, 3), torch.ones(2, 3))
    >>> d.variance.shape
    torch.Size([2, 3])
    >>> d.probabilities("probit").sum(dim=1)
    tensor([1., 1.])
    """

    mean: Tensor | None = None
    covariance: Tensor | None = None
    samples: Tensor | None = None
    centered_covariance: Tensor | None = None

    # ------------------------------------------------------------------ build
    @classmethod
    def gaussian(
        cls, mean: Tensor, covariance: Tensor | None, centered_covariance: Tensor | None = None
    ) -> OutputDistribution:
        """Gaussian over outputs; ``covariance`` is (N, C, C), (N, C) or None.

        ``centered_covariance`` (N, C, C), optional: ``Cov[P f]`` formed precisely.
        """
        if mean.ndim != 2:
            raise ValueError(f"mean must have shape (N, C), got {tuple(mean.shape)}")
        full = (mean.shape[0], mean.shape[1], mean.shape[1])
        if covariance is not None:
            if tuple(covariance.shape) not in (full, tuple(mean.shape)):
                raise ValueError(
                    f"covariance must have shape {full} or {tuple(mean.shape)}, "
                    f"got {tuple(covariance.shape)}"
                )
        if centered_covariance is not None and (
            covariance is None or tuple(centered_covariance.shape) != full
        ):
            raise ValueError(
                f"centered_covariance must have shape {full} and come with a covariance"
            )
        return cls(mean=mean, covariance=covariance, centered_covariance=centered_covariance)

    @classmethod
    def point_mass(cls, mean: Tensor) -> OutputDistribution:
        """All mass on ``mean``: the deterministic network."""
        return cls.gaussian(mean, None)

    @classmethod
    def from_samples(cls, samples: Tensor) -> OutputDistribution:
        """Empirical distribution of ``S`` draws of shape (S, N, C)."""
        if samples.ndim != 3:
            raise ValueError(f"samples must have shape (S, N, C), got {tuple(samples.shape)}")
        return cls(samples=samples)

    @staticmethod
    def concatenate(parts: Sequence[OutputDistribution]) -> OutputDistribution:
        """Stack distributions of consecutive row batches into one."""
        first = parts[0]
        if first.is_sampled:
            return OutputDistribution.from_samples(torch.cat([p.samples for p in parts], dim=1))
        mean = torch.cat([p.mean for p in parts], dim=0)
        if first.covariance is None:
            return OutputDistribution.point_mass(mean)
        centered = None
        if all(p.centered_covariance is not None for p in parts):
            centered = torch.cat([p.centered_covariance for p in parts], dim=0)
        return OutputDistribution.gaussian(
            mean, torch.cat([p.covariance for p in parts], dim=0), centered
        )

    # ------------------------------------------------------------- properties
    @property
    def is_sampled(self) -> bool:
        """Whether the distribution is held as samples."""
        return self.samples is not None

    @property
    def is_point_mass(self) -> bool:
        """Whether all mass sits on the mean (no spread at all)."""
        return not self.is_sampled and self.covariance is None

    @property
    def n_rows(self) -> int:
        return self.samples.shape[1] if self.is_sampled else self.mean.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.samples.shape[2] if self.is_sampled else self.mean.shape[1]

    @property
    def output_mean(self) -> Tensor:
        """Mean of the outputs, shape (N, C)."""
        if self.is_sampled:  # summed in float64: rounding then does not hang on N (below)
            return self.samples.double().mean(dim=0).to(self.samples.dtype)
        return self.mean

    @property
    def variance(self) -> Tensor:
        """Marginal variance of each output, shape (N, C)."""
        if self.is_sampled:
            if self.samples.shape[0] < 2:
                return torch.zeros_like(self.samples[0])
            # torch's float32 sums over samples round a row's entry differently with
            # its position (vectorized body vs tail); float64 makes that invisible
            return self.samples.double().var(dim=0, unbiased=True).to(self.samples.dtype)
        if self.covariance is None:
            return torch.zeros_like(self.mean)
        if self.covariance.ndim == 3:
            return torch.diagonal(self.covariance, dim1=1, dim2=2)
        return self.covariance

    def to(self, target: torch.device | str | torch.dtype) -> OutputDistribution:
        """Every tensor moved to a device, or cast to a dtype (as ``Tensor.to``)."""

        def move(t):
            return None if t is None else t.to(target)

        return OutputDistribution(
            move(self.mean),
            move(self.covariance),
            move(self.samples),
            move(self.centered_covariance),
        )

    def scale_variance(self, factor: float) -> OutputDistribution:
        """The Gaussian with its covariance multiplied by ``factor``.

        Used by temperature-like calibration of the epistemic spread. Sample
        form is scaled around the sample mean.
        """
        if self.is_sampled:
            m = self.samples.mean(dim=0, keepdim=True)
            return OutputDistribution.from_samples(m + math.sqrt(factor) * (self.samples - m))
        if self.covariance is None:
            return self
        centered = self.centered_covariance
        return OutputDistribution.gaussian(
            self.mean, self.covariance * factor, None if centered is None else centered * factor
        )

    # --------------------------------------------------------------- sampling
    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw output samples, shape (n_samples, N, C).

        A sample-form distribution returns its own draws (``n_samples`` is then
        ignored); a point mass repeats its mean. Each draw uses one standard
        normal vector for every row (``mean_i + L_i eps_s``): each row's draws
        have the row's exact distribution and depend on that row alone, not on
        the other rows or their order (rows are not independent of each other;
        a joint over rows is not modelled here anyway).
        """
        if self.is_sampled:
            return self.samples
        mean = self.mean
        if self.covariance is None:
            return mean.unsqueeze(0).expand(n_samples, *mean.shape)
        check_finite(self.covariance, "the predicted output covariance")
        eps = torch.randn(
            (n_samples, 1, mean.shape[-1]),
            generator=generator,
            device=mean.device,
            dtype=mean.dtype,
        ).expand(n_samples, *mean.shape)
        if self.covariance.ndim == 2:
            return mean + eps * self.covariance.clamp_min(0).sqrt()
        chol = _safe_cholesky(self.covariance)
        return mean + torch.einsum("nij,snj->sni", chol, eps)

    # ---------------------------------------------------------- classification
    def probabilities(
        self,
        link: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Predictive class probabilities, shape (N, C).

        Parameters
        ----------
        link : {"probit", "centered_probit", "mc", "bridge"}
            How a Gaussian over logits becomes probabilities:

            * ``"probit"``: ``softmax(mean_k / sqrt(1 + pi/8 Var f_k))`` (the
              probit approximation, per-class; MacKay 1992; laplace-torch's).
            * ``"centered_probit"``: the same after removing the variance of
              the shift shared by all logits, which softmax ignores (see
              :func:`centered_probit_probabilities`).
            * ``"mc"``: average of ``softmax`` over ``n_samples`` logit draws.
            * ``"bridge"``: mean of the Dirichlet given by the Laplace bridge
              (Hobbhahn et al., 2022), see :func:`bridge_probabilities`.

            Sample-form distributions always average ``softmax`` over their
            samples; point masses give ``softmax(mean)`` for every link.
        n_samples : int
            Logit draws for ``link="mc"``.
        generator : torch.Generator, optional
            Source of randomness for ``link="mc"``.
        """
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        if self.is_sampled:  # float64 average, as in ``output_mean``
            probs = torch.softmax(self.samples, dim=-1)
            return probs.double().mean(dim=0).to(probs.dtype)
        if self.covariance is None:
            return torch.softmax(self.mean, dim=-1)
        if link == "probit":
            return probit_probabilities(self.mean, self.variance)
        if link == "centered_probit":
            cov = self.covariance if self.centered_covariance is None else self.centered_covariance
            return centered_probit_probabilities(self.mean, cov)
        if link == "bridge":
            return bridge_probabilities(self.mean, self.variance)
        probs = torch.softmax(self.sample(n_samples, generator), dim=-1)
        return probs.double().mean(dim=0).to(probs.dtype)


def _safe_cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor of a batch of PSD matrices, with growing jitter if needed."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if not bool((info > 0).any()):
        return chol
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    for jitter in (1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale[:, None, None] * eye)
        if not bool((info > 0).any()):
            return chol
    # Fall back to the symmetric square root, which exists for any PSD matrix.
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def probit_probabilities(mean: Tensor, variance: Tensor) -> Tensor:
    """Probit approximation to ``E[softmax(f)]`` for ``f ~ N(mean, diag(variance))``.

    ``p = softmax(kappa * mean)`` with ``kappa_k = (1 + pi/8 * variance_k)^(-1/2)``.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import probit_probabilities
    >>> p = probit_probabilities(torch.tensor([[2.0, 0.0]]), torch.tensor([[100.0, 100.0]]))
    >>> bool(p[0, 0] < torch.softmax(torch.tensor([2.0, 0.0]), 0)[0])
    True
    """
    kappa = torch.rsqrt(1.0 + (math.pi / 8.0) * variance.clamp_min(0))
    return torch.softmax(kappa * mean, dim=-1)


def centered_probit_probabilities(mean: Tensor, covariance: Tensor) -> Tensor:
    """The probit approximation after removing the logits' shared shift.

    ``softmax(f) = softmax(P f)`` with ``P = I - 11^T / C``, so ``f ~ N(m, S)``
    and ``P f ~ N(P m, P S P)`` give the same distribution of probabilities.
    The per-class probit does not: it reads the variance of a shift common to
    all logits as uncertainty. A weight posterior carries much of that
    variance where the likelihood has no curvature -- a last layer's biases
    and its weight rows moved together, bounded only by the prior -- so the
    plain probit flattens every prediction alike. This link applies the
    probit to ``P f ~ N(P m, P S P)``; the diagonal of ``P S P`` is ``S_kk -
    (2/C) sum_j S_kj + sum_ij S_ij / C^2``, and the centered mean makes the
    result invariant to any shift of the logits, as softmax is. Measured
    against 2,000-draw Monte Carlo of the same Gaussians
    (``benchmarks/results/laplace_prior_sweep.md``, last-layer K-FAC over a
    grid of prior precisions): mean NLL gap 0.030 vs 0.434 (digits) and
    0.025 vs 0.726 (images) for the plain probit. For two classes it is the
    probit of the logit difference ``d``: ``sigmoid(E d / sqrt(1 + pi/8 Var
    d))``, the standard approximation of ``E sigmoid(d)`` (centering alone
    would apply a quarter of that correction).

    Precision: the centred variance is a difference of the covariance's
    entries, so a shared-shift variance far above it loses digits to
    cancellation in float32 (on scikit-learn's estimator-check blobs,
    batching the same rows differently moved probabilities by up to 1.2e-3
    with a last-layer K-FAC posterior). skuq's predictives therefore form
    ``P S P`` from centered Jacobians and pass it as
    ``OutputDistribution.centered_covariance`` (7e-7 there); call this
    function on such a matrix (projecting again changes nothing) or on a
    float64 covariance.

    Parameters
    ----------
    mean : Tensor of shape (N, C)
    covariance : Tensor of shape (N, C, C), or (N, C) marginal variances

    Returns
    -------
    Tensor of shape (N, C)

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import centered_probit_probabilities, probit_probabilities
    >>> m = torch.tensor([[2.0, 0.0]])
    >>> shared = torch.full((1, 2, 2), 100.0)  # only a common shift is uncertain
    >>> torch.allclose(centered_probit_probabilities(m, shared), torch.softmax(m, -1))
    True
    >>> bool(probit_probabilities(m, torch.diagonal(shared, dim1=1, dim2=2))[0, 0] < 0.6)
    True
    """
    n_classes = mean.shape[-1]
    mean = mean - mean.mean(-1, keepdim=True)  # the probit of P f: its mean is P m
    if covariance.ndim == mean.ndim:  # independent logits: S = diag(v)
        v = covariance.clamp_min(0)
        var = v * (1.0 - 2.0 / n_classes) + v.sum(-1, keepdim=True) / n_classes**2
    else:
        row = covariance.sum(-1)
        var = (
            torch.diagonal(covariance, dim1=-2, dim2=-1)
            - (2.0 / n_classes) * row
            + row.sum(-1, keepdim=True) / n_classes**2
        )
    if n_classes == 2:
        # softmax is the sigmoid of d = f_1 - f_0 and the centered logits are -d/2, d/2,
        # of variance Var d / 4: their probit would correct with pi/32 Var d. The probit
        # of d itself, sigmoid(E d / sqrt(1 + pi/8 Var d)), is the one for a sigmoid
        var = 4.0 * var
    return probit_probabilities(mean, var)


def bridge_probabilities(mean: Tensor, variance: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean of the Laplace-bridge Dirichlet for ``f ~ N(mean, diag(variance))``.

    The logits are first centred (the bridge assumes they sum to zero; softmax
    does not care), then ``alpha_k = (1 - 2/C + exp(m_k) / C^2 * sum_l exp(-m_l))
    / v_k`` and the returned probabilities are ``alpha / sum(alpha)``.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import bridge_probabilities
    >>> p = bridge_probabilities(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    >>> bool(torch.isclose(p.sum(), torch.tensor(1.0))), bool(p[0, 0] > p[0, 1])
    (True, True)
    """
    n_classes = mean.shape[-1]
    m = mean - mean.mean(dim=-1, keepdim=True)
    # in log space: exp(m_k) * sum_l exp(-m_l) overflows once the logits span ~90
    # (float32), which a far-OOD input reaches; alpha / sum(alpha) is a softmax of log alpha
    log_term = m + torch.logsumexp(-m, dim=-1, keepdim=True) - 2 * math.log(n_classes)
    base = 1.0 - 2.0 / n_classes  # 0 for two classes: log 0 = -inf, which logaddexp takes
    log_base = math.log(base) if base > 0 else -math.inf
    log_alpha = torch.logaddexp(log_term, torch.full_like(log_term, log_base))
    return torch.softmax(log_alpha - variance.clamp_min(eps).log(), dim=-1)


def entropy(probabilities: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of a probability matrix.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import entropy
    >>> h = entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    >>> torch.allclose(h, torch.tensor([0.6931, 0.0]), atol=1e-4)
    True
    """
    p = probabilities.clamp_min(1e-30)
    return -(probabilities * p.log()).sum(dim=-1)


def classification_uncertainty(
    distribution: OutputDistribution,
    kind: str = "entropy",
    link: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One uncertainty score per row; higher means less certain.

    Parameters
    ----------
    distribution : OutputDistribution
        Distribution over logits.
    kind : str
        * ``"entropy"`` (total): ``H[p]`` of the predictive ``p`` (through ``link``).
        * ``"expected_entropy"`` (aleatoric): ``E_f[H[softmax(f)]]``, estimated
          from ``n_samples`` logit draws (or the distribution's own samples).
        * ``"mutual_information"`` (epistemic): ``H[p] - E_f[H[softmax(f)]]``,
          clipped at zero; the predictive ``p`` here is the average of the same
          draws so that the difference is a proper (non-negative) estimate.
        * ``"variance"``: the sum over classes of the logit variances,
          ``trace Cov[f]``.
        * ``"max_prob"``: ``1 - max_k p_k``.
    link, n_samples, generator
        As in :meth:`OutputDistribution.probabilities`.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import OutputDistribution, classification_uncertainty
    >>> d = OutputDistribution.gaussian(torch.zeros(2, 3), torch.ones(2, 3))
    >>> classification_uncertainty(d, kind="variance")
    tensor([3., 3.])
    >>> classification_uncertainty(d, kind="entropy").shape
    torch.Size([2])
    """
    if kind not in CLASSIFICATION_UNCERTAINTIES:
        raise ValueError(f"kind must be one of {CLASSIFICATION_UNCERTAINTIES}, got {kind!r}")
    if kind == "variance":
        return distribution.variance.sum(dim=-1)
    if kind in ("entropy", "max_prob"):
        p = distribution.probabilities(link, n_samples, generator)
        return entropy(p) if kind == "entropy" else 1.0 - p.max(dim=-1).values
    probs = torch.softmax(distribution.sample(n_samples, generator), dim=-1)
    dtype, probs = probs.dtype, probs.double()  # float64 averages, as in ``probabilities``
    expected = entropy(probs).mean(dim=0)
    if kind == "expected_entropy":
        return expected.to(dtype)
    return (entropy(probs.mean(dim=0)) - expected).clamp_min(0).to(dtype)
