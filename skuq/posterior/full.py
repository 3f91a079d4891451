"""Dense posteriors: ``N(theta*, (s H + diag(delta))^-1)`` with a dense ``H`` (P x P).

:class:`FullPosterior` eigendecomposes ``H`` once; :class:`CholeskyFullPosterior`
(the default) needs only its eigenvalues for the evidence and a Cholesky factor
per ``delta`` for the covariance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..curvature.memory import check_full_memory, dense_factor_dtype
from .base import WeightPosterior
from .centering import augment_centered
from .linalg import _eigh64, _eigvalsh_lower, _inverse_cholesky_lower

__all__ = ["FullPosterior", "CholeskyFullPosterior"]


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
        self.raw_eigvals = evals.to(H.dtype)  # before clipping (an indefinite Hessian's)
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

    def functional_variance_grid(self, J: Tensor) -> Callable[[float], Tensor]:
        """``delta -> J Sigma(delta) J^T`` for a scalar ``delta``, with the work shared over values.

        With ``Sigma = Q diag(1 / (s lambda + delta)) Q^T``, ``J`` (B, C, P) is
        rotated once (``O(B C P^2)``, and ``H``'s eigenvectors, formed on first
        use); each ``delta`` then costs ``O(B C^2 P)``. The posterior's own
        ``delta`` is left as it is.

        Examples
        --------
        >>> import torch
        >>> from skuq.posterior import FullPosterior
        >>> post = FullPosterior(torch.zeros(2), torch.eye(2))
        >>> variance = post.functional_variance_grid(torch.eye(2)[None])
        >>> torch.diagonal(variance(3.0), dim1=1, dim2=2)
        tensor([[0.2500, 0.2500]])
        """
        JQ = J @ self.eigvecs.to(J.dtype)
        s = self.curvature_scale
        lam = self.eigvals.to(J.dtype)

        def full(delta: float) -> Tensor:
            return torch.einsum("bck,k,bdk->bcd", JQ, 1.0 / (s * lam + delta), JQ)

        return full

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


class CholeskyFullPosterior(FullPosterior):
    """Dense posterior that never forms ``H``'s eigenvectors: the default for ``"full"``.

    ``N(theta*, (s H + diag(delta))^-1)`` with a dense ``H``, like
    :class:`FullPosterior`, with the work split by what each step needs:

    * the **evidence** for any scalar ``delta`` and ``s`` needs ``H``'s
      eigenvalues only, ``log det = sum log(s lambda + delta)``: computed once,
      when the evidence is first asked for, without eigenvectors (LAPACK,
      ``jobz="N"``: torch's ``?syevd`` in ``H``'s dtype, scipy's ``?syevr`` on a
      float64 copy; several times cheaper than the eigenvectors,
      whose back-transformation dominates), or given as ``spectrum`` (the
      curvature's, from the Gram matrix of its rows when there are fewer rows
      than weights: :mod:`skuq.curvature.gram`);
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

    def __init__(self, mean: Tensor, curvature: Tensor, spectrum: Tensor | None = None, **kwargs):
        P = mean.numel()
        if curvature.shape != (P, P):
            raise ValueError("curvature must be a P x P matrix")
        if spectrum is not None and spectrum.shape != (P,):
            raise ValueError("spectrum must hold the curvature's P eigenvalues")
        H = curvature.detach()
        if H.dtype != mean.dtype or not H.is_contiguous():
            H = H.to(mean.dtype).contiguous()
        self.H = H
        self._work_dtype = dense_factor_dtype(P, H.dtype)
        self._check_work_memory()
        # on first use (a fixed delta and predictions never need them), unless the
        # curvature came with them
        self._eigvals = None if spectrum is None else spectrum.clamp_min(0).to(H.dtype)
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
            try:
                W = _inverse_cholesky_lower(W)  # L^-1, in place
            except FloatingPointError:
                if self.prior_precision.ndim != 0:
                    raise
                # a tiny scalar delta against a large curvature (a wide held-out choice):
                # the eigenbasis gives the same Sigma with no factorization to fail
                del W
                _ = self.eigvecs
                return self._factor()
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
