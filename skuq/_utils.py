"""Small helpers shared across skuq: devices, seeds, batching, progress, checks."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import Tensor


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use 'auto'")
    return resolved


def seed_from_random_state(random_state) -> int:
    """An int seed from ``None``, an int or a ``numpy.random.RandomState``."""
    if random_state is None:  # numpy's global RNG, as scikit-learn does
        return int(check_random_state(None).randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    raise ValueError(f"random_state must be None, an int or a RandomState, got {random_state!r}")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


#: held while torch's process-wide generator is privately seeded (see ``seeded_global_rng``)
_GLOBAL_RNG_LOCK = threading.RLock()


@contextmanager
def seeded_global_rng(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Run a block on a private copy of torch's global generator, seeded with ``seed``.

    For third-party code that can only draw from the global generator (skorch's
    training: lazy initialization, batch shuffling, dropout). The caller's
    generator states (the CPU's and those of the CUDA ``devices``) are restored
    on exit. That generator is one per process, so two threads inside such blocks
    at once would interleave their draws and neither run would follow its seed:
    a lock lets one block run at a time, which makes a thread pool give the
    draws of a serial run.

    Examples
    --------
    >>> import torch
    >>> from skuq._utils import seeded_global_rng
    >>> state = torch.get_rng_state()
    >>> with seeded_global_rng(0):
    ...     a = torch.rand(2)
    >>> with seeded_global_rng(0):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), state)
    (True, True)
    """
    indices = [
        d.index if d.index is not None else torch.cuda.current_device()
        for d in map(torch.device, devices)
        if d.type == "cuda"
    ]
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=indices):
        torch.default_generator.manual_seed(seed)
        for index in indices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def iter_batches(
    *arrays: np.ndarray | Tensor | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Consecutive row batches of ``arrays`` as tensors on ``device``.

    Only one batch lives on the device at a time, so memory stays flat in N.
    Floating arrays are cast to ``dtype`` when given; integer arrays keep theirs.
    """
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        out = []
        for a in arrays:
            t = torch.as_tensor(a[start : start + batch_size])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out.append(t.to(device, non_blocking=True))
        yield tuple(out)


def progress(iterable: Iterable, verbose: int | bool, desc: str, total: int | None = None):
    """Wrap ``iterable`` in a tqdm bar when ``verbose`` and tqdm is installed."""
    if not verbose:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are an optional extra
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def check_option(name: str, value, allowed: Iterable) -> None:
    """Raise a ValueError naming the allowed values when ``value`` is not one."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_positive(name: str, value, *, allow_none: bool = False, strict: bool = True) -> None:
    """Raise a ValueError unless ``value`` is a finite number > 0 (>= 0 if not strict)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0)
    if not ok:
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    """Raise a ValueError unless ``value`` is an int >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_finite(t: Tensor, what: str) -> Tensor:
    """Refuse to hand out non-finite numbers: raise with a hint instead."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"{what} contains NaN or inf. The network or its posterior is numerically "
            "unstable on these inputs: scale the inputs (e.g. a StandardScaler in a "
            "Pipeline), shrink the posterior variance (raise prior_precision), or, for a "
            "net that diverged in training, lower its lr."
        )
    return t
