"""Gaussian posteriors over weights: ``N(theta*, (s H + diag(delta))^-1)``.

One class per structure of the curvature ``H``: :class:`DiagPosterior`,
:class:`KronPosterior`, :class:`FullPosterior` (and :class:`CholeskyFullPosterior`,
the one :func:`posterior_from_curvature` builds: eigenvalues only, a Cholesky
factor per ``delta``), :class:`LowRankPosterior`.
``s = 1 / (sigma_noise^2 * temperature)`` scales the curvature (computed at
unit noise; for an empirical Fisher of a regression, a sum of squared loss
gradients that carry ``1 / sigma_noise^2`` each, ``s = 1 / (sigma_noise^4 *
temperature)``) and ``delta`` is the prior precision: a scalar, or one value per
parameter tensor ("per layer"). Each class caches an eigendecomposition of
``H`` once, so a new ``delta`` or ``s`` costs O(P) for the log-determinant
and the marginal likelihood -- no pass over data, no refactorization. The
evidence is evaluated in float64 whatever the weights' dtype (its terms are
sums of O(P) logarithms that cancel to a small difference near the optimum;
in float32 the optimum of ``delta`` would be found only to ~1e-3).

Each posterior offers ``sample``, ``log_det_posterior_precision``,
``marginal_variance``, ``functional_variance(J) = J Sigma J^T`` for a batch of
Jacobians, the Laplace ``log_marginal_likelihood`` and
``optimize_prior_precision``. They are pure torch and can be built from any
curvature: :func:`posterior_from_curvature` from skuq's engine, or directly
(e.g. a :class:`DiagPosterior` from an optimizer's second moments).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
from torch import Tensor

from .curvature.ggn import Curvature, KronBlock
from .curvature.memory import check_full_memory, dense_factor_dtype

__all__ = [
    "WeightPosterior",
    "DiagPosterior",
    "KronPosterior",
    "FullPosterior",
    "CholeskyFullPosterior",
    "LowRankPosterior",
    "posterior_from_curvature",
    "center_outputs",
    "augment_centered",
    "split_centered",
    "PRIOR_STRUCTURES",
]

PRIOR_STRUCTURES = ("scalar", "layerwise")


def _eigh64(S: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric matrix in float64, on ``S``'s device.

    On the CPU through LAPACK's ``dsyevr`` (scipy's default driver, relatively
    robust representations): it needs O(P) workspace where torch's ``dsyevd``
    takes 2 P^2 -- for a dense curvature, the largest matrix of the fit.
    """
    if S.device.type != "cpu":
        return torch.linalg.eigh(S.double())
    a = S.detach().to(torch.float64, copy=True).numpy()
    evals, evecs = scipy.linalg.eigh(a, driver="evr", overwrite_a=True, check_finite=False)
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def center_outputs(t: Tensor, dim: int = 1) -> Tensor:
    """``P t``: ``t`` less its mean over the output (class) axis ``dim`` (``P = I - 11^T/C``).

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import center_outputs
    >>> center_outputs(torch.tensor([[[1.0], [3.0]]])).flatten().tolist()
    [-1.0, 1.0]
    """
    return t - t.mean(dim=dim, keepdim=True)


def augment_centered(t: Tensor, dim: int = 1) -> Tensor:
    """``[P t; 1^T t / C]`` along the output axis ``dim``: ``C + 1`` entries.

    Applied to the output side of a Jacobian (or of any factor of ``J Sigma
    J^T``), the contraction gives ``Cov[(P f, mean f)]``, from which
    :func:`split_centered` reads both the covariance of ``f`` and that of the
    centered logits ``P f``. Softmax ignores a shift shared by all logits, so
    ``P f`` carries the probabilities; forming its covariance from centered
    factors, rather than projecting the finished covariance, keeps the
    shared-shift variance (which only the prior bounds, and can exceed the
    rest by orders of magnitude) out of its sums: rounding errors enter
    squared, not linearly.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import augment_centered
    >>> augment_centered(torch.tensor([[[1.0], [3.0]]])).flatten().tolist()
    [-1.0, 1.0, 2.0]
    """
    return torch.cat([center_outputs(t, dim), t.mean(dim=dim, keepdim=True)], dim=dim)


def split_centered(M: Tensor) -> tuple[Tensor, Tensor]:
    """``(Cov f, Cov P f)`` from ``M = Cov[(P f, mean f)]`` of shape (N, C+1, C+1).

    ``f = P f + 1 mean(f)``, so ``Cov f = S_c + u 1^T + 1 u^T + s 11^T`` with
    ``S_c = M[:C, :C]``, ``u = M[:C, C]`` and ``s = M[C, C]``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import augment_centered, split_centered
    >>> J = torch.randn(1, 3, 4, dtype=torch.float64)
    >>> Ja = augment_centered(J)
    >>> S, S_c = split_centered(Ja @ Ja.transpose(1, 2))
    >>> P = torch.eye(3, dtype=J.dtype) - 1 / 3
    >>> torch.allclose(S, J @ J.transpose(1, 2)), torch.allclose(S_c, P @ S @ P)
    (True, True)
    """
    C = M.shape[-1] - 1
    S_c, u, s = M[:, :C, :C], M[:, :C, C], M[:, C, C]
    S = S_c + u[:, :, None] + u[:, None, :] + s[:, None, None]
    return S, S_c


class WeightPosterior:
    """Base class of the weight-space Gaussians (not for direct use).

    Parameters
    ----------
    mean : Tensor of shape (P,)
        The MAP weights ``theta*``.
    prior_precision : float or Tensor of shape () or (n_groups,)
        ``delta``; one per group of ``group_sizes`` for a per-layer prior.
    group_sizes : list of int, optional
        Sizes of the parameter groups (tensors) in the flat vector; default one group.
    sigma_noise : float
        Gaussian noise (regression); 1 for classification.
    temperature : float
        The curvature (and the log-likelihood) is divided by it.
    loss : float, optional
        Summed training loss (cross-entropy or ``0.5 * SSE``) -- for the marginal likelihood.
    n_data, n_outputs : int, optional
        Training rows and outputs -- for the marginal likelihood.
    likelihood : {"classification", "regression"}
    curvature_kind : {"ggn", "ef", "l2m"}, default="ggn"
        What the curvature is: a Gauss-Newton (scales as ``1 / sigma_noise^2``)
        or outer products of loss gradients (``"ef"``; ``"l2m"``, an optimizer's
        second moments), which for a regression scale as ``1 / sigma_noise^4``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import DiagPosterior
    >>> post = DiagPosterior(torch.ones(2), torch.ones(2), loss=1.0, n_data=4, n_outputs=2)
    >>> post.optimize_prior_precision()
    >>> float(post.prior_precision) > 0
    True
    """

    structure = "base"

    def __init__(
        self,
        mean: Tensor,
        *,
        prior_precision=1.0,
        group_sizes: list[int] | None = None,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        loss: float | None = None,
        n_data: int | None = None,
        n_outputs: int | None = None,
        likelihood: str = "classification",
        curvature_kind: str = "ggn",
    ):
        self.mean = mean.detach()
        self.n_params = mean.numel()
        self.group_sizes = list(group_sizes) if group_sizes else [self.n_params]
        if sum(self.group_sizes) != self.n_params:
            raise ValueError("group_sizes must add up to the number of weights")
        self.loss, self.n_data, self.n_outputs = loss, n_data, n_outputs
        self.likelihood = likelihood
        self.curvature_kind = curvature_kind
        self.temperature = float(temperature)
        self.sigma_noise = float(sigma_noise)
        self.prior_precision = prior_precision

    # ------------------------------------------------------------- hyper-parameters
    @property
    def prior_precision(self) -> Tensor:
        """``delta``: shape () for a scalar prior, (n_groups,) per layer."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        self._prior_precision = self._check_delta(value)
        self._invalidate()

    @property
    def curvature_scale(self) -> float:
        """``s = 1 / (sigma_noise^2 temperature)`` (``sigma_noise^4`` for a regression EF)."""
        return self._scale(self.sigma_noise)

    def _scale(self, sigma):
        """``s`` at noise ``sigma`` (a float or a tensor, for the evidence's gradient).

        A Gauss-Newton of the Gaussian log-likelihood is ``J^T J / sigma^2``; its
        empirical Fisher ``sum_n J_n^T r_n r_n^T J_n / sigma^4`` squares gradients
        that each carry ``1 / sigma^2``: scaling it like the GGN would make the
        posterior depend on the units of ``y``.
        """
        gradients = self.likelihood == "regression" and self.curvature_kind != "ggn"
        return 1.0 / (sigma ** (4 if gradients else 2) * self.temperature)

    def set_hyperparameters(self, prior_precision=None, sigma_noise=None) -> None:
        """Change ``delta`` and/or ``sigma_noise``; cached factors are refreshed lazily."""
        if sigma_noise is not None:
            if not (float(sigma_noise) > 0 and math.isfinite(float(sigma_noise))):
                raise ValueError(f"sigma_noise must be a finite number > 0, got {sigma_noise!r}")
            self.sigma_noise = float(sigma_noise)
        if prior_precision is not None:
            self.prior_precision = prior_precision
        self._invalidate()

    def _check_delta(self, value) -> Tensor:
        d = torch.as_tensor(value, dtype=self.mean.dtype, device=self.mean.device).detach()
        if d.ndim > 1 or (d.ndim == 1 and d.numel() not in (1, len(self.group_sizes))):
            raise ValueError(
                f"prior_precision must be a scalar or have one value per layer "
                f"({len(self.group_sizes)}), got shape {tuple(d.shape)}"
            )
        if d.ndim == 1 and d.numel() == 1:
            d = d[0]
        if not bool(torch.isfinite(d).all()) or bool((d <= 0).any()):
            raise ValueError(f"prior_precision must be finite and > 0, got {value!r}")
        return d

    def _delta_vector(self, delta: Tensor) -> Tensor:
        """``delta`` expanded to one value per weight, (P,)."""
        if delta.ndim == 0:
            return delta.expand(self.n_params)
        sizes = torch.as_tensor(self.group_sizes, device=delta.device)
        return torch.repeat_interleave(delta, sizes)

    def _invalidate(self) -> None:
        self._cache = {}

    # ------------------------------------------------------------ the evidence (float64)
    def _f64(self, value) -> Tensor:
        """``value`` as a float64 tensor on the posterior's device (keeps autograd)."""
        return torch.as_tensor(value, dtype=torch.float64, device=self.mean.device)

    def _stored64(self, name: str) -> Tensor:
        """A float64 copy of the attribute ``name`` (O(P)), made once for the evidence."""
        store = self.__dict__.setdefault("_store64", {})
        if name not in store:
            store[name] = getattr(self, name).detach().to(torch.float64)
        return store[name]

    # ----------------------------------------------------------------- interface
    def log_det_posterior_precision(self, prior_precision=None, curvature_scale=None) -> Tensor:
        """``log det(s H + diag(delta))`` in float64 (differentiable in ``delta`` and ``s``)."""
        d = self.prior_precision if prior_precision is None else prior_precision
        s = self.curvature_scale if curvature_scale is None else curvature_scale
        return self._log_det(self._f64(d), self._f64(s))

    def log_det_ratio(self, prior_precision=None, curvature_scale=None) -> Tensor:
        """``log det(posterior precision) - log det(prior precision)``, float64."""
        d = self.prior_precision if prior_precision is None else prior_precision
        d = self._f64(d)
        prior = self._delta_vector(d).log().sum()
        return self.log_det_posterior_precision(d, curvature_scale) - prior

    def scatter(self, prior_precision=None) -> Tensor:
        """``theta*^T diag(delta) theta*`` (prior mean zero), float64."""
        d = self.prior_precision if prior_precision is None else prior_precision
        return (self._delta_vector(self._f64(d)) * self._stored64("mean") ** 2).sum()

    def log_likelihood(self, sigma_noise=None) -> Tensor:
        """Training log-likelihood at ``theta*`` from the stored loss, float64."""
        if self.loss is None:
            raise ValueError("this posterior was built without the training loss")
        sigma = self._f64(self.sigma_noise if sigma_noise is None else sigma_noise)
        if self.likelihood == "classification":
            return self._f64(-self.loss / self.temperature)
        c = self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return -self.loss / (sigma**2 * self.temperature) - c

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """Laplace evidence ``log p(D|theta*) - 0.5 (log det ratio + scatter)``.

        Evaluated in float64 from float64 copies of the curvature's eigenvalues
        (or diagonal) and of ``theta*`` -- O(P) extra memory -- so its optimum
        is resolved to ~1e-7 (relative) rather than float32's ~1e-3.
        Differentiable in ``prior_precision`` and ``sigma_noise`` (tensors).
        """
        d = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        s = self._scale(self._f64(sigma))
        return self.log_likelihood(sigma) - 0.5 * (
            self.log_det_ratio(d, s) + self.scatter(d)
        )

    def optimize_prior_precision(
        self,
        prior_structure: str = "scalar",
        fit_sigma_noise: bool = False,
        max_iter: int = 200,
        fit_prior: bool = True,
    ) -> None:
        """Maximize the Laplace evidence in ``log delta`` (and ``log sigma``), in place.

        L-BFGS (scipy) on the log scale, started from the current values, with
        exact gradients by autograd; each step costs O(P) for the diag, kron
        and full (scalar prior) structures thanks to the cached
        eigendecomposition. The objective is float64 (see
        :meth:`log_marginal_likelihood`) and the stopping rule is on its
        gradient (``1e-10`` in the log scale), so the optimum is found to
        ~1e-7 relative; a scalar prior alone is a Brent search to ``1e-8`` in
        ``log delta``.
        """
        if prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"prior_structure must be one of {PRIOR_STRUCTURES}, got {prior_structure!r}"
            )
        n = 1 if prior_structure == "scalar" else len(self.group_sizes)
        if not fit_prior:
            n = self.prior_precision.numel()
        start = self.prior_precision.log()
        start = start.mean().expand(n) if start.ndim == 0 or n == 1 else start
        x0 = np.concatenate([
            start.detach().double().reshape(n).cpu().numpy(),
            [math.log(self.sigma_noise)] if fit_sigma_noise else [],
        ])
        mask = np.r_[np.full(n, fit_prior), [True] if fit_sigma_noise else []].astype(bool)
        if not mask.any():
            return
        if n == 1 and fit_prior and not fit_sigma_noise:
            self._optimize_scalar_prior(max_iter)
            return

        def evidence(z):
            z_t = torch.tensor(z, dtype=torch.float64, device=self.mean.device,
                               requires_grad=True)
            d = z_t[:n].exp()
            d = d[0] if n == 1 else d
            sigma = z_t[n].exp() if fit_sigma_noise else self.sigma_noise
            value = -self.log_marginal_likelihood(d, sigma)
            (grad,) = torch.autograd.grad(value, z_t)
            return float(value.detach()), grad.cpu().numpy() * mask

        # L-BFGS-B's ftol is relative to |f|: shifting out the value at the start keeps
        # it from stopping on a large constant (the training loss) before the gradient
        # test, which is what resolves the optimum
        f0 = evidence(x0)[0]

        def objective(z):
            value, grad = evidence(z)
            return value - f0, grad

        # L-BFGS on the log scale (scipy's: no torch.optim start-up cost); the bounds keep
        # delta and sigma in a finite range when the evidence is flat
        bounds = [(-25.0, 25.0)] * len(x0)
        res = scipy.optimize.minimize(objective, x0, jac=True, method="L-BFGS-B",
                                      bounds=bounds,
                                      options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-10})
        z = torch.as_tensor(res.x, dtype=torch.float64)
        log_d = z[:n]
        log_s = z[n] if fit_sigma_noise else torch.tensor(math.log(self.sigma_noise))
        d = log_d.detach().exp()
        if not bool(torch.isfinite(d).all()):
            raise FloatingPointError("the marginal likelihood optimization diverged")
        self.set_hyperparameters(
            prior_precision=(d[0] if n == 1 else d) if fit_prior else None,
            sigma_noise=float(log_s.detach().exp()) if fit_sigma_noise else None,
        )

    def _optimize_scalar_prior(self, max_iter: int) -> None:
        """One ``delta``: bounded Brent search in ``log delta``, no gradients needed.

        The evidence is unimodal in ``log delta`` for a scalar prior (its
        derivative ``P / delta - sum 1 / (s h_i + delta) - |theta|^2`` changes sign
        once), so a 1-D search is exact and needs a few dozen O(P) evaluations.
        """

        def objective(z: float) -> float:
            with torch.no_grad():
                return -float(self.log_marginal_likelihood(self._f64(math.exp(z))))

        res = scipy.optimize.minimize_scalar(
            objective, bounds=(-25.0, 25.0), method="bounded",
            options={"xatol": 1e-8, "maxiter": max_iter},
        )
        d = math.exp(float(res.x))
        if not math.isfinite(d):
            raise FloatingPointError("the marginal likelihood optimization diverged")
        self.set_hyperparameters(prior_precision=d)

    # to implement per structure
    def _log_det(self, delta: Tensor, s) -> Tensor:
        raise NotImplementedError

    def functional_variance(self, J: Tensor) -> Tensor:
        """``J Sigma J^T`` for Jacobians ``J`` (B, C, P); returns (B, C, C)."""
        raise NotImplementedError

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Weight draws from the posterior, shape (n_samples, P)."""
        raise NotImplementedError

    def marginal_variance(self) -> Tensor:
        """``diag(Sigma)``, shape (P,)."""
        raise NotImplementedError

    def _randn(self, shape, generator) -> Tensor:
        return torch.randn(
            shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )


class DiagPosterior(WeightPosterior):
    """``N(theta*, diag(1 / (s h + delta)))`` from a diagonal curvature ``h``.

    Parameters
    ----------
    mean : Tensor of shape (P,)
    curvature_diag : Tensor of shape (P,)
        Non-negative diagonal curvature of the summed loss (GGN, Fisher, or an
        optimizer's scaled second moments).
    **kwargs
        See :class:`WeightPosterior`.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import DiagPosterior
    >>> post = DiagPosterior(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), prior_precision=1.0)
    >>> post.marginal_variance()
    tensor([0.5000, 0.3333, 0.2500])
    """

    structure = "diag"

    def __init__(self, mean: Tensor, curvature_diag: Tensor, **kwargs):
        self.h = curvature_diag.detach().to(mean.dtype)
        if self.h.shape != mean.shape:
            raise ValueError("curvature_diag must have the shape of mean")
        super().__init__(mean, **kwargs)

    def _precision(self, delta=None, s=None) -> Tensor:
        delta = self.prior_precision if delta is None else delta
        s = self.curvature_scale if s is None else s
        return s * self.h + self._delta_vector(delta)

    def _log_det(self, delta, s):
        return (s * self._stored64("h") + self._delta_vector(delta)).log().sum()

    def marginal_variance(self):
        return 1.0 / self._precision()

    def functional_variance(self, J):
        return torch.einsum("bcp,p,bdp->bcd", J, self.marginal_variance().to(J.dtype), J)

    def sample(self, n_samples, generator=None):
        eps = self._randn((n_samples, self.n_params), generator)
        return self.mean + eps * self.marginal_variance().sqrt()

    def functional_variance_last_layer(self, phi: Tensor, n_out: int, has_bias: bool,
                                       augment: bool = False) -> Tensor:
        """``J Sigma J^T`` of a last Linear layer from its input features ``phi`` (B, D).

        ``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``
        (see :func:`augment_centered`), mapped from the logits' own variances:
        they are independent here, so no large entries cancel.
        """
        var = self.marginal_variance().to(phi.dtype)
        d = phi.shape[1]
        vw = var[: n_out * d].reshape(n_out, d)
        out = (phi**2) @ vw.T
        if has_bias:
            out = out + var[n_out * d :]
        if not augment:
            return torch.diag_embed(out)
        eye = torch.eye(n_out, dtype=out.dtype, device=out.device)
        A = augment_centered(eye, 0)  # (C+1, C): the map f -> (P f, mean f)
        return torch.einsum("ic,nc,jc->nij", A, out, A)


class FullPosterior(WeightPosterior):
    """``N(theta*, (s H + diag(delta))^-1)`` with a dense ``H`` (P x P).

    ``H = Q diag(lambda) Q^T`` is decomposed once; for a scalar ``delta`` the
    covariance is ``Q diag(1 / (s lambda + delta)) Q^T``. A per-layer
    ``delta`` uses a Cholesky factorization instead.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import FullPosterior
    >>> post = FullPosterior(torch.zeros(2), torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    >>> torch.allclose(post.covariance(), torch.linalg.inv(torch.tensor([[3.0, 1.0], [1.0, 3.0]])))
    True
    """

    structure = "full"

    def __init__(self, mean: Tensor, curvature: Tensor, **kwargs):
        H = curvature.detach().to(mean.dtype)
        if H.shape != (mean.numel(), mean.numel()):
            raise ValueError("curvature must be a P x P matrix")
        H = H + H.T
        H.mul_(0.5)  # symmetrized with one temporary (P x P can be large)
        self.H = H
        evals, evecs = _eigh64(H)
        self._store64 = {"eigvals": evals.clamp_min(0)}  # for the float64 evidence
        self.eigvals = evals.clamp_min(0).to(H.dtype)
        self.eigvecs = evecs.to(H.dtype)
        del evecs
        super().__init__(mean, **kwargs)

    def _log_det(self, delta, s):
        if delta.ndim == 0:
            return torch.log(s * self._stored64("eigvals") + delta).sum()
        # per-layer priors: a float64 Cholesky per evaluation (a P x P float64 temporary)
        P = s * self.H.to(torch.float64) + torch.diag(self._delta_vector(delta))
        return 2 * torch.log(torch.diagonal(torch.linalg.cholesky(P))).sum()

    def _factor(self) -> Tensor:
        """``A`` with ``A A^T = Sigma``."""
        if "A" not in self._cache:
            d, s = self.prior_precision, self.curvature_scale
            if d.ndim == 0:
                self._cache["A"] = self.eigvecs * torch.rsqrt(s * self.eigvals + d)
            else:
                P = s * self.H + torch.diag(self._delta_vector(d))
                L = torch.linalg.cholesky(P)
                eye = torch.eye(self.n_params, dtype=P.dtype, device=P.device)
                self._cache["A"] = torch.linalg.solve_triangular(L, eye, upper=False).T
        return self._cache["A"]

    def covariance(self) -> Tensor:
        """``Sigma`` (P, P), cached until ``delta`` or ``s`` change."""
        if "cov" not in self._cache:
            A = self._factor()
            self._cache["cov"] = A @ A.T
        return self._cache["cov"]

    def marginal_variance(self):
        return (self._factor() ** 2).sum(1)

    def functional_variance(self, J):
        JA = J @ self._factor().to(J.dtype)
        return JA @ JA.transpose(1, 2)

    def sample(self, n_samples, generator=None):
        eps = self._randn((n_samples, self.n_params), generator)
        return self.mean + eps @ self._factor().T

    def functional_variance_last_layer(self, phi, n_out, has_bias, augment=False):
        """In factor form, ``(J A)(J A)^T`` with ``A A^T = Sigma``: a sum of squares.

        The covariance's own entries reach ``1 / delta`` along feature
        directions the data never spans, while the predictive variance is
        O(1); contracting them with ``phi`` would cancel, and rows batched
        differently would round apart. Through the factor, rounding errors
        enter squared. Same cost order as the covariance blocks, ``B C^2 d^2``.
        ``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``.
        """
        d = phi.shape[1]
        nw = n_out * d
        key = ("last_layer", d, n_out, has_bias, phi.dtype, augment)
        if key not in self._cache:  # the factor laid out by class once, not per batch
            A = self._factor().to(phi.dtype)
            Aw, Ab = A[:nw].reshape(n_out, d, -1), A[nw:] if has_bias else None
            if augment:
                Aw = augment_centered(Aw, 0)
                Ab = None if Ab is None else augment_centered(Ab, 0)
            self._cache[key] = (Aw, Ab)
        Aw, Ab = self._cache[key]
        JA = torch.einsum("ni,cik->nck", phi, Aw)
        if Ab is not None:
            JA = JA + Ab
        return JA @ JA.transpose(1, 2)


def _eigvalsh_lower(H: Tensor, dtype: torch.dtype) -> Tensor:
    """Eigenvalues (ascending) of the symmetric matrix whose lower triangle is ``H``'s.

    Computed in ``dtype`` on a working copy that LAPACK overwrites (``?syevr``
    without eigenvectors: no ``P x P`` output); returned in float64.
    """
    if H.device.type != "cpu":
        return torch.linalg.eigvalsh(H.to(dtype), UPLO="L").double()
    work = H.detach().to(dtype, copy=True).numpy()
    # the transpose is Fortran-ordered, so LAPACK works on the copy in place; its upper
    # triangle is H's lower one
    evals = scipy.linalg.eigh(work.T, lower=False, eigvals_only=True, driver="evr",
                              overwrite_a=True, check_finite=False)
    return torch.from_numpy(evals).double()


def _inverse_cholesky_lower(W: Tensor) -> Tensor:
    """``L^-1`` (lower triangular) of ``W = L L^T``, from ``W``'s lower triangle, in place.

    On the CPU, LAPACK's ``?potrf`` and ``?trtri`` overwrite ``W`` (no second
    ``P x P`` array); elsewhere torch's Cholesky and triangular solve.
    """
    if W.device.type != "cpu":
        L = torch.linalg.cholesky_ex(W)
        if int(L.info) != 0:
            raise _not_positive_definite(W)
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        return torch.linalg.solve_triangular(L.L, eye, upper=False)
    F = W.numpy().T  # Fortran view: its upper triangle is W's lower one
    potrf, trtri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "trtri"), (F,))
    U, info = potrf(F, lower=0, overwrite_a=1, clean=0)
    if info != 0 or not np.may_share_memory(U, F):
        if info != 0:
            raise _not_positive_definite(W)
        F[...] = U  # LAPACK worked on a copy (not expected for a Fortran view)
    Ui, info = trtri(F, lower=0, overwrite_c=1)
    if info != 0:
        raise _not_positive_definite(W)
    if not np.may_share_memory(Ui, F):
        F[...] = Ui
    return W.tril_()


def _not_positive_definite(W: Tensor) -> FloatingPointError:
    return FloatingPointError(
        f"the posterior precision s H + diag(delta) ({W.shape[0]:,} x {W.shape[0]:,}, "
        f"{str(W.dtype).replace('torch.', '')}) is not positive definite to working "
        "precision: raise prior_precision, or use a structure that needs no dense factor"
    )


class CholeskyFullPosterior(FullPosterior):
    """Dense posterior that never forms ``H``'s eigenvectors: the default for ``"full"``.

    ``N(theta*, (s H + diag(delta))^-1)`` with a dense ``H``, like
    :class:`FullPosterior`, with the work split by what each step needs:

    * the **evidence** for any scalar ``delta`` and ``s`` needs ``H``'s
      eigenvalues only, ``log det = sum log(s lambda + delta)``: computed once,
      when the evidence is first asked for, without eigenvectors (LAPACK
      ``?syevr``, ``jobz="N"``; several times cheaper than the eigenvectors,
      whose back-transformation dominates);
    * the **covariance** at the current ``(delta, s)`` is the factor ``A =
      L^-T`` of the Cholesky factorization ``s H + diag(delta) = L L^T``
      (``A A^T = Sigma``), formed once per ``(delta, s)``: a Cholesky and a
      triangular inverse, in place. A per-layer ``delta`` takes the same path.

    Memory: ``H`` (kept as given, its lower triangle read, never copied) and
    one ``P x P`` work array -- the eigenvalues' working copy, then the factor
    -- twice the covariance's size; a :class:`MemoryError` names the bytes
    before a work array that does not fit is allocated. Up to
    :data:`~skuq.curvature.memory.FLOAT64_FACTOR_MAX_PARAMS` weights the work
    array is float64, as :class:`FullPosterior`'s eigendecomposition (the
    factor is then stored in ``H``'s dtype).

    For a last Linear layer, whose Jacobian is ``I_C (x) phi(x)``, the
    predictive covariance contracts ``phi`` with the factor's rows of each class
    (:meth:`functional_variance_last_layer`): ``A`` is triangular, so class ``c``
    needs only the columns from its own first row on, half the products of a
    dense factor.

    ``eigvecs`` (for a grid of ``delta`` values sharing one rotation: each
    value then costs ``O(P^2)``, not a factorization) are computed on first
    access only, and then serve every scalar ``delta`` (as in
    :class:`FullPosterior`, with its memory).

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import CholeskyFullPosterior
    >>> H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> post = CholeskyFullPosterior(torch.zeros(2), H)
    >>> torch.allclose(post.covariance(), torch.linalg.inv(H + torch.eye(2)))
    True
    """

    structure = "full"

    def __init__(self, mean: Tensor, curvature: Tensor, **kwargs):
        P = mean.numel()
        if curvature.shape != (P, P):
            raise ValueError("curvature must be a P x P matrix")
        H = curvature.detach()
        if H.dtype != mean.dtype or not H.is_contiguous():
            H = H.to(mean.dtype).contiguous()
        self.H = H
        self._work_dtype = dense_factor_dtype(P, H.dtype)
        self._check_work_memory()
        self._eigvals = None  # on first use: a fixed delta and predictions never need them
        self._eigvecs = None
        WeightPosterior.__init__(self, mean, **kwargs)

    @property
    def eigvals(self) -> Tensor:
        """``H``'s eigenvalues (P,), ascending, computed once on first use (the evidence)."""
        if self._eigvals is None:
            self._check_work_memory()
            # the evidence (FullPosterior's _log_det) reads them in H's dtype, as there
            lam = _eigvalsh_lower(self.H, self._work_dtype).clamp_min(0)
            self._eigvals = lam.to(self.H.dtype)
        return self._eigvals

    @eigvals.setter
    def eigvals(self, value: Tensor) -> None:
        self._eigvals = value

    def _check_work_memory(self) -> None:
        P = self.n_params if hasattr(self, "n_params") else self.H.shape[0]
        item = torch.empty((), dtype=self._work_dtype).element_size()
        check_full_memory(P, self.H.dtype, self.H.device, needed=P * P * item)

    @property
    def eigvecs(self) -> Tensor:
        """``H``'s eigenvectors (P, P), formed on first access (a full eigendecomposition)."""
        if self._eigvecs is None:
            H = self.H.tril() + self.H.tril(-1).T
            evals, evecs = _eigh64(H)
            del H
            self._eigvecs = evecs.to(self.H.dtype)
            # the pairs stay together (the same eigenvalues to rounding)
            self.eigvals = evals.clamp_min(0).to(self.H.dtype)
            self._invalidate()
        return self._eigvecs

    def _factor(self) -> Tensor:
        """``A = L^-T`` (upper triangular) with ``A A^T = Sigma``."""
        if "A" not in self._cache:
            self._cache.pop("cov", None)
            if self.prior_precision.ndim == 0 and self._eigvecs is not None:
                # eigenvectors at hand (a grid of delta values): each delta is O(P^2)
                rs = torch.rsqrt(self.curvature_scale * self.eigvals + self.prior_precision)
                self._cache["A"] = self._eigvecs * rs
                return self._cache["A"]
            self._check_work_memory()
            s = float(self.curvature_scale)
            dv = self._delta_vector(self.prior_precision).to(self._work_dtype)
            W = self.H.to(self._work_dtype, copy=True)
            W.mul_(s)
            W.diagonal().add_(dv)
            W = _inverse_cholesky_lower(W)  # L^-1, in place
            if W.dtype != self.H.dtype:
                W = W.to(self.H.dtype)
            self._cache["A"] = W.T
        return self._cache["A"]

    def marginal_variance(self):
        A = self._factor()
        step = max(1, (1 << 22) // max(1, A.shape[1]))  # row chunks: no P x P temporary
        return torch.cat([(A[i : i + step] ** 2).sum(1) for i in range(0, len(A), step)])

    def functional_variance_last_layer(self, phi, n_out, has_bias, augment=False):
        """``(J A)(J A)^T`` of a last Linear layer, ``J = I_C (x) [phi, 1]``.

        The rows of ``A`` that belong to class ``c``'s weights start at column
        ``c d`` (``A`` is upper triangular), the bias rows at ``C d + c``: each
        class's product skips the zeros before them. A sum of squares, as
        :meth:`FullPosterior.functional_variance_last_layer`.
        ``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``.
        """
        A = self._factor()
        if A.dtype != phi.dtype:
            A = A.to(phi.dtype)
        B, d = phi.shape
        nw = n_out * d
        JA = torch.zeros(B, n_out, self.n_params, dtype=phi.dtype, device=phi.device)
        for c in range(n_out):
            lo = c * d
            JA[:, c, lo:] = phi @ A[lo : lo + d, lo:]
        if has_bias:
            JA[:, :, nw:] += A[nw:, nw:]
        if augment:
            JA = augment_centered(JA, 1)
        return JA @ JA.transpose(1, 2)


class KronPosterior(WeightPosterior):
    """K-FAC posterior: blocks ``s G (x) A + delta I`` (or dense ``s B + delta I`` for biases).

    Each factor is eigendecomposed once; a block's precision eigenvalues are
    ``s lambda_G lambda_A^T + delta``. The prior precision must be constant
    within a block (per-layer priors are per parameter tensor, which is per
    block).

    Parameters
    ----------
    mean : Tensor of shape (P,)
    blocks : list of KronBlock
        Covering ``0..P`` (see :class:`skuq.curvature.KronBlock`).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import KronBlock
    >>> from skuq.posterior import KronPosterior
    >>> G, A = torch.eye(2), 2 * torch.eye(3)
    >>> post = KronPosterior(torch.zeros(6), [KronBlock(slice(0, 6), [G, A])])
    >>> post.marginal_variance()
    tensor([0.3333, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333])
    """

    structure = "kron"

    def __init__(self, mean: Tensor, blocks: list[KronBlock], **kwargs):
        self.blocks = sorted(blocks, key=lambda b: b.index.start)
        self.eig, self._eig64 = [], []
        for b in self.blocks:
            pairs, evs = [], []
            for F in b.factors:
                F = F.detach()
                ev, Q = _eigh64((F + F.T) / 2)
                pairs.append((ev.clamp_min(0).to(mean.dtype), Q.to(mean.dtype)))
                evs.append(ev.clamp_min(0))  # float64, for the evidence
            self.eig.append(pairs)
            self._eig64.append(evs[0] if len(evs) == 1 else torch.outer(evs[0], evs[1]))
        if kwargs.get("group_sizes") is None:
            kwargs["group_sizes"] = [b.index.stop - b.index.start for b in self.blocks]
        super().__init__(mean, **kwargs)

    def _block_eigvals(self, i: int) -> Tensor:
        pairs = self.eig[i]
        if len(pairs) == 1:
            return pairs[0][0]
        return torch.outer(pairs[0][0], pairs[1][0])

    def _block_deltas(self, delta: Tensor) -> list[Tensor]:
        if delta.ndim == 0:
            return [delta] * len(self.blocks)
        dv = self._delta_vector(delta)
        out = []
        for b in self.blocks:
            seg = dv[b.index]
            if not bool((seg == seg[0]).all()):
                raise ValueError(
                    "hessian_structure='kron' needs the prior precision to be constant "
                    "within each layer block"
                )
            out.append(seg[0])
        return out

    def _log_det(self, delta, s):
        return sum(
            torch.log(s * self._eig64[i] + d).sum()
            for i, d in enumerate(self._block_deltas(delta))
        )

    def _inv_eig(self) -> list[Tensor]:
        if "inv" not in self._cache:
            s = self.curvature_scale
            deltas = self._block_deltas(self.prior_precision)
            self._cache["inv"] = [
                1.0 / (s * self._block_eigvals(i) + d) for i, d in enumerate(deltas)
            ]
        return self._cache["inv"]

    def marginal_variance(self):
        out = torch.empty(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        for b, pairs, inv in zip(self.blocks, self.eig, self._inv_eig(), strict=True):
            if len(pairs) == 1:
                out[b.index] = (pairs[0][1] ** 2) @ inv
            else:
                QG, QA = pairs[0][1], pairs[1][1]
                out[b.index] = ((QG**2) @ inv @ (QA**2).T).reshape(-1)
        return out

    def functional_variance(self, J):
        B, C, _ = J.shape
        out = torch.zeros(B, C, C, dtype=J.dtype, device=J.device)
        for b, pairs, inv in zip(self.blocks, self.eig, self._inv_eig(), strict=True):
            Jb = J[:, :, b.index]
            if len(pairs) == 1:
                T = Jb @ pairs[0][1].to(J.dtype)
                out += torch.einsum("bcp,p,bdp->bcd", T, inv.to(J.dtype), T)
            else:
                QG, QA = pairs[0][1].to(J.dtype), pairs[1][1].to(J.dtype)
                T = QG.T @ Jb.reshape(B, C, QG.shape[0], QA.shape[0]) @ QA
                out += torch.einsum("bcoi,oi,bdoi->bcd", T, inv.to(J.dtype), T)
        return out

    def sample(self, n_samples, generator=None):
        out = self.mean.expand(n_samples, -1).clone()
        for b, pairs, inv in zip(self.blocks, self.eig, self._inv_eig(), strict=True):
            if len(pairs) == 1:
                z = self._randn((n_samples, inv.numel()), generator) * inv.sqrt()
                out[:, b.index] += z @ pairs[0][1].T
            else:
                QG, QA = pairs[0][1], pairs[1][1]
                z = self._randn((n_samples, *inv.shape), generator) * inv.sqrt()
                out[:, b.index] += (QG @ z @ QA.T).reshape(n_samples, -1)
        return out

    def functional_variance_last_layer(self, phi, n_out, has_bias, augment=False):
        """``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``."""
        out = 0
        for _b, pairs, inv in zip(self.blocks, self.eig, self._inv_eig(), strict=True):
            if len(pairs) == 1:  # the bias block: the same for every row
                Q = pairs[0][1].to(phi.dtype)
                Q = augment_centered(Q, 0) if augment else Q
                out = out + ((Q * inv.to(phi.dtype)) @ Q.T).expand(phi.shape[0], -1, -1)
            else:
                QG, QA = pairs[0][1].to(phi.dtype), pairs[1][1].to(phi.dtype)
                QG = augment_centered(QG, 0) if augment else QG
                s = ((phi @ QA) ** 2) @ inv.to(phi.dtype).T  # (B, out)
                out = out + torch.einsum("co,no,eo->nce", QG, s, QG)
        return out


class LowRankPosterior(WeightPosterior):
    """``H ~= U diag(lambda) U^T`` (top-k eigenpairs) plus a scalar prior ``delta I``.

    ``Sigma = (I - U diag(s lambda / (s lambda + delta)) U^T) / delta``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import LowRankPosterior
    >>> U = torch.eye(3)[:, :1]
    >>> post = LowRankPosterior(torch.zeros(3), torch.tensor([3.0]), U, prior_precision=1.0)
    >>> post.marginal_variance()
    tensor([0.2500, 1.0000, 1.0000])
    """

    structure = "lowrank"

    def __init__(self, mean: Tensor, eigvals: Tensor, eigvecs: Tensor, **kwargs):
        self.eigvals = eigvals.detach().to(mean.dtype).clamp_min(0)
        self.eigvecs = eigvecs.detach().to(mean.dtype)
        super().__init__(mean, **kwargs)

    def _check_delta(self, value):
        d = super()._check_delta(value)
        if d.ndim != 0:
            raise ValueError("hessian_structure='lowrank' supports a scalar prior precision only")
        return d

    def _log_det(self, delta, s):
        if delta.ndim != 0:
            raise ValueError("hessian_structure='lowrank' supports a scalar prior precision only")
        k = self.eigvals.numel()
        return (torch.log(s * self._stored64("eigvals") + delta).sum()
                + (self.n_params - k) * torch.log(delta))

    def _shrink(self) -> Tensor:
        s, d = self.curvature_scale, self.prior_precision
        return s * self.eigvals / (s * self.eigvals + d)

    def marginal_variance(self):
        return (1 - (self.eigvecs**2) @ self._shrink()) / self.prior_precision

    def functional_variance(self, J):
        JU = J @ self.eigvecs.to(J.dtype)
        D = self._shrink().to(J.dtype)
        return (J @ J.transpose(1, 2) - (JU * D) @ JU.transpose(1, 2)) / self.prior_precision

    def sample(self, n_samples, generator=None):
        s, d = self.curvature_scale, self.prior_precision
        E = 1 - torch.sqrt(d / (s * self.eigvals + d))
        z = self._randn((n_samples, self.n_params), generator)
        return self.mean + (z - ((z @ self.eigvecs) * E) @ self.eigvecs.T) / d.sqrt()


def posterior_from_curvature(
    curvature: Curvature,
    mean: Tensor,
    *,
    prior_precision=1.0,
    group_sizes: list[int] | None = None,
    sigma_noise: float = 1.0,
    temperature: float = 1.0,
) -> WeightPosterior:
    """The posterior class matching ``curvature.structure``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> from skuq.posterior import posterior_from_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> curv = compute_curvature(w, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))],
    ...                          structure="full")
    >>> post = posterior_from_curvature(curv, w.vector(), prior_precision=1.0)
    >>> post.sample(4).shape
    torch.Size([4, 8])
    """
    kwargs = dict(
        prior_precision=prior_precision, group_sizes=group_sizes, sigma_noise=sigma_noise,
        temperature=temperature, loss=curvature.loss, n_data=curvature.n_data,
        n_outputs=curvature.n_outputs, likelihood=curvature.likelihood,
        curvature_kind=curvature.curvature,
    )
    if curvature.structure == "diag":
        return DiagPosterior(mean, curvature.diag, **kwargs)
    if curvature.structure == "full":
        return CholeskyFullPosterior(mean, curvature.full, **kwargs)
    if curvature.structure == "kron":
        return KronPosterior(mean, curvature.kron, **kwargs)
    if curvature.structure == "lowrank":
        return LowRankPosterior(mean, curvature.eigvals, curvature.eigvecs, **kwargs)
    raise ValueError(f"unknown curvature structure {curvature.structure!r}")
