"""Dense symmetric linear algebra of the posteriors: float64 eigenpairs, in-place factors.

With the least workspace: a dense curvature is the largest matrix of a fit, so
these avoid a second ``P x P`` array where they can.
"""

from __future__ import annotations

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


def _inverse_cholesky_lower(W: Tensor, block: int = 512) -> Tensor:
    """``L^-1`` (lower triangular) of ``W = L L^T``, from ``W``'s lower triangle, in place.

    torch's Cholesky factorization writes into ``W``'s own storage (through its
    column-major transpose, so no copy is made), then :func:`_invert_lower_in_place`
    inverts the factor block by block: no second ``P x P`` array. Both run
    through torch's LAPACK and BLAS (MKL on x86), which stay fast when the cores
    are shared with other work; OpenBLAS's threaded ``?potrf`` / ``?trtri`` (scipy's)
    took 10 s instead of 0.9 s at P = 4,000 on 2 cores beside other jobs.
    """
    info = torch.empty((), dtype=torch.int32, device=W.device)
    # W's lower triangle is the upper one of its column-major transpose
    Wt = W.mT
    torch.linalg.cholesky_ex(Wt, upper=True, out=(Wt, info))
    if int(info) != 0:
        raise _not_positive_definite(W)
    return _invert_lower_in_place(W.tril_(), block)


def _invert_lower_in_place(X: Tensor, block: int = 512) -> Tensor:
    """Overwrite the lower-triangular ``X`` (zeros above the diagonal) with ``X^-1``.

    Blocked from the bottom-right corner: with the trailing block ``X22``
    already inverted, the block column below diagonal block ``j`` becomes
    ``-X22^-1 L21 L11^-1``, its diagonal block ``L11^-1``. The products skip the
    zeros above ``X22``'s diagonal, so the work is ``P^3 / 3`` like LAPACK's
    ``?trtri``, in matrix products, with temporaries of ``P x block`` only.
    """
    n = X.shape[0]
    for j in reversed(range(0, n, block)):
        r = min(j + block, n)
        eye = torch.eye(r - j, dtype=X.dtype, device=X.device)
        X11 = torch.linalg.solve_triangular(X[j:r, j:r], eye, upper=False)
        if r < n:
            T = X[r:, j:r] @ X11  # L21 L11^-1, before its rows are overwritten
            for i in range(r, n, block):
                i1 = min(i + block, n)
                # row block i of X22^-1 is zero past column i1
                X[i:i1, j:r] = -(X[i:i1, r:i1] @ T[: i1 - r])
        X[j:r, j:r] = X11
    return X


def _not_positive_definite(W: Tensor) -> FloatingPointError:
    return FloatingPointError(
        f"the posterior precision s H + diag(delta) ({W.shape[0]:,} x {W.shape[0]:,}, "
        f"{str(W.dtype).replace('torch.', '')}) is not positive definite to working "
        "precision: raise prior_precision, or use a structure that needs no dense factor"
    )
