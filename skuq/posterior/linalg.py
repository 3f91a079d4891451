"""Dense symmetric linear algebra of the posteriors: float64 eigenpairs, in-place factors.

On the CPU through LAPACK (scipy) with the least workspace: a dense curvature
is the largest matrix of a fit, so these avoid a second ``P x P`` array where
they can.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor


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


def _eigvalsh_lower(H: Tensor, dtype: torch.dtype) -> Tensor:
    """Eigenvalues (ascending) of the symmetric matrix whose lower triangle is ``H``'s.

    Computed in ``dtype`` on one working copy that LAPACK overwrites (no
    eigenvectors: no second ``P x P`` output); returned in float64. In ``H``'s
    own dtype the copy is torch's (its LAPACK is MKL's on x86, whose
    tridiagonal reduction of a matrix past the caches is several times faster
    than OpenBLAS's: 7 s against 50 s at P = 6,000 on 2 cores); a float64 copy
    of a float32 ``H`` goes to scipy's ``?syevr`` in place, since torch would
    copy it once more.
    """
    if H.device.type != "cpu" or dtype == H.dtype:
        return torch.linalg.eigvalsh(H.detach().to(dtype), UPLO="L").double()
    work = H.detach().to(dtype, copy=True).numpy()
    # the transpose is Fortran-ordered, so LAPACK works on the copy in place; its upper
    # triangle is H's lower one
    evals = scipy.linalg.eigh(
        work.T, lower=False, eigvals_only=True, driver="evr", overwrite_a=True, check_finite=False
    )
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
