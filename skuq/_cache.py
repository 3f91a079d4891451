"""The one content-keyed cache of fitted artifacts (curvatures, surrogate kernels).

A grid search refits an estimator many times with options that do not change
the expensive part of ``fit`` (a curvature, a trained surrogate). Keys are
content hashes of everything that part depends on -- the network's
architecture, weights and buffers, the training rows, the options -- so two
fits share an entry exactly when they would compute the same thing, and
artifacts of different kinds can never collide.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = ["clear_cache"]


class ContentCache:
    """A small least-recently-used map from content hashes to fitted artifacts."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        """The value stored under ``key`` (now the most recently used), or ``None``."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str, value: Any) -> None:
        """Store ``value``, forgetting the least recently used entries beyond ``size``."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


#: the cache every estimator shares (curvatures of the Laplace family, ScaLLA's surrogates)
CACHE = ContentCache(16)


def clear_cache() -> None:
    """Forget every curvature and surrogate kernel skuq keeps in memory.

    Examples
    --------
    >>> from skuq._cache import clear_cache
    >>> clear_cache()
    """
    CACHE.clear()


def _architecture(model: torch.nn.Module) -> str:
    """What the forward pass computes besides the weights: module tree, classes, modes.

    ``repr`` names the layers and their settings (a ``Tanh`` is not a ``ReLU``); the
    class's qualified name and the bytecode of its ``forward`` tell apart classes
    with the same repr (a redefined class in a notebook); ``training`` switches
    dropout and batch norm.
    """
    parts = [repr(model)]
    for name, m in model.named_modules():
        cls = type(m)
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        parts.append(repr((name, cls.__module__, cls.__qualname__, m.training, _code_key(code))))
    return "\n".join(parts)


def _code_key(code):
    """Bytecode, constants and names of a code object (nested ones alike, without addresses)."""
    if code is None:
        return None
    consts = tuple(_code_key(c) if hasattr(c, "co_code") else c for c in code.co_consts)
    return (code.co_code, consts, code.co_names)


def _option_key(value):
    """A stable stand-in for an option: a generator by its device and state, not its address."""
    if isinstance(value, torch.Generator):
        state = hashlib.sha1(value.get_state().cpu().numpy().tobytes()).hexdigest()
        return ("torch.Generator", str(value.device), state)
    if isinstance(value, dict):
        return {k: _option_key(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_option_key(v) for v in value)
    return value


def fingerprint(weights, X, y, options) -> str:
    """Content hash of a weight subset's network, the rows ``X``/``y`` and ``options``."""
    h = hashlib.sha1()
    h.update(_architecture(weights.model).encode())
    for name, p in weights.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    for b_name, b in weights.model.named_buffers():
        h.update(b_name.encode())
        h.update(b.detach().cpu().numpy().tobytes())
    for arr in (np.ascontiguousarray(X), np.ascontiguousarray(y)):
        h.update(repr((arr.shape, arr.dtype.str)).encode())
        # hashed in place: tobytes() would copy the whole training array
        h.update(arr.tobytes() if arr.dtype.hasobject else arr.reshape(-1).view(np.uint8))
    h.update(repr(_option_key(options)).encode())
    if weights.indices is not None:
        h.update(weights.indices.cpu().numpy().tobytes())
    h.update(repr(weights.names).encode())
    return h.hexdigest()
