"""How much memory a dense ``P x P`` curvature needs, and whether the device has it.

A full-covariance posterior keeps the curvature ``H`` and one factor of the
same size (the Cholesky factor of ``s H + delta I``, or a working copy while
eigenvalues are computed): twice the covariance's own size. The limit on ``P``
is therefore the memory the machine has, read before anything is allocated:
``MemAvailable`` of ``/proc/meminfo`` (and a cgroup's limit, in a container) on
the CPU, ``torch.cuda.mem_get_info`` on a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["available_memory", "dense_factor_dtype", "full_memory_bytes", "check_full_memory"]

#: up to this many weights a dense curvature is factorized in float64 (a working copy
#: of at most 512 MB); beyond, in the curvature's own dtype, so that the factor stays
#: the covariance's size
FLOAT64_FACTOR_MAX_PARAMS = 8192


def _cgroup_available() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((root / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can be allocated on ``device`` now, or None where it cannot be read.

    Examples
    --------
    >>> from skuq.curvature.memory import available_memory
    >>> available_memory("cpu") is None or available_memory("cpu") > 0
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        found = None
    group = _cgroup_available()
    if group is not None:
        found = group if found is None else min(found, group)
    return found


def dense_factor_dtype(n_params: int, dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense ``P x P`` curvature is factorized in (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature.memory import dense_factor_dtype
    >>> dense_factor_dtype(100, torch.float32), dense_factor_dtype(10_000, torch.float32)
    (torch.float64, torch.float32)
    """
    return torch.float64 if n_params <= FLOAT64_FACTOR_MAX_PARAMS else dtype


def full_memory_bytes(n_params: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a full-covariance posterior over ``n_params`` weights holds at its peak.

    The curvature in ``dtype`` plus one factor (or working copy) in the
    factorization's dtype (:func:`dense_factor_dtype`).

    Examples
    --------
    >>> from skuq.curvature.memory import full_memory_bytes
    >>> full_memory_bytes(10_000) / 1e9
    0.8
    """
    own = torch.empty((), dtype=dtype).element_size()
    work = torch.empty((), dtype=dense_factor_dtype(n_params, dtype)).element_size()
    return n_params * n_params * (own + work)


def check_full_memory(
    n_params: int, dtype: torch.dtype, device: torch.device | str, needed: int | None = None
) -> None:
    """Raise a MemoryError, before allocating, when a full posterior cannot fit on ``device``.

    ``needed``: the bytes still to be allocated (default: :func:`full_memory_bytes`).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature.memory import check_full_memory
    >>> check_full_memory(100, torch.float32, "cpu")  # 80 kB: fits
    """
    needed = full_memory_bytes(n_params, dtype) if needed is None else int(needed)
    avail = available_memory(device)
    if avail is None or needed <= avail:
        return
    one = n_params * n_params * torch.empty((), dtype=dtype).element_size()
    raise MemoryError(
        f"hessian_structure='full' over {n_params:,} weights needs {needed / 2**30:,.2f} GiB "
        f"({needed:,} bytes: the {n_params:,} x {n_params:,} curvature, "
        f"{one / 2**30:,.2f} GiB in {str(dtype).replace('torch.', '')}, and a factor of the "
        f"same size), but {avail / 2**30:,.2f} GiB are available on {torch.device(device)}. "
        "Use fewer weights (subset_of_weights='last_layer', or 'subnetwork' with a "
        "subnetwork_size), another structure (hessian_structure='kron', 'lowrank' or "
        "'diag'), or a device with more free memory"
    )
