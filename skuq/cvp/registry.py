"""The rule interface of CVP's moment propagation: the values rules exchange, the
context they receive, and the registry that maps layers and functions to rules.

Weights are independent Gaussians ``N(theta, sigma^2)`` with ``theta`` the
trained values and ``sigma^2`` a per-parameter variance (a diagonal posterior);
activations are treated as independent Gaussians per unit (the usual variance-
propagation assumption, mean-field). Rules that are exact are exact under that
assumption; units that share a random ancestor are correlated in truth, and the
covariance is dropped except for a global average pool after a shared-weight
layer (:mod:`skuq.cvp.pooled`). A rule is a function ``rule(ctx, target, *args,
**kwargs)`` that receives the node's inputs -- :class:`Moments` for tensors,
plain Python values otherwise -- and returns :class:`Moments` (or a tuple of
them). Rules are looked up by module type (walking the class hierarchy), by
function, or by tensor-method name; :func:`register_rule` adds or replaces one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "Moments",
    "PropagationContext",
    "register_rule",
    "get_rule",
    "UnsupportedLayerError",
    "CorrelatedFactorsWarning",
]


@dataclass
class Moments:
    """Mean and elementwise variance of a tensor-valued activation.

    ``var=None`` means the value is deterministic (zero variance); rules use
    that to skip work.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp import Moments
    >>> m = Moments(torch.zeros(2), torch.ones(2))
    >>> m.variance
    tensor([1., 1.])
    """

    mean: Tensor
    var: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        """The variance, zeros when deterministic."""
        return torch.zeros_like(self.mean) if self.var is None else self.var

    def map(self, fn: Callable[[Tensor], Tensor]) -> Moments:
        """Apply a structural op (reshape, permute, index...) to mean and variance."""
        return Moments(fn(self.mean), None if self.var is None else fn(self.var))


class UnsupportedLayerError(TypeError):
    """Raised when a traced node has no propagation rule.

    Examples
    --------
    >>> from skuq.cvp import UnsupportedLayerError
    >>> issubclass(UnsupportedLayerError, TypeError)
    True
    """


class CorrelatedFactorsWarning(UserWarning):
    """A product whose factors share a random ancestor is propagated as if independent.

    Examples
    --------
    >>> from skuq.cvp import CorrelatedFactorsWarning
    >>> issubclass(CorrelatedFactorsWarning, UserWarning)
    True
    """


# -------------------------------------------------------------------- registry
_MODULE_RULES: dict[type, Callable] = {}
_FUNCTION_RULES: dict[object, Callable] = {}
_METHOD_RULES: dict[str, Callable] = {}
# bumped by every registration: a propagator resolves its nodes' rules once and
# resolves them again when this changes
_VERSION = [0]


def register_rule(*keys):
    """Decorator registering a propagation rule for module types, functions or method names.

    Parameters
    ----------
    *keys : type of nn.Module, callable, or str
        A module class (subclasses inherit the rule; a registered custom
        module is not traced into but handled by its rule as one leaf), a
        function as it appears in traced code (``torch.relu``,
        ``operator.add``, ``torch.nn.functional.gelu``), or the name of a
        tensor method (``"relu"`` for ``x.relu()``).

    Returns
    -------
    decorator
        ``decorator(rule)`` registers ``rule(ctx, target, *args, **kwargs)``
        and returns it. ``target`` is the module instance, the function, or
        the method name; tensor arguments arrive as :class:`Moments`; the
        rule returns :class:`Moments`. ``ctx`` is a
        :class:`PropagationContext` (weight variances, nested dispatch).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import Moments, register_rule, MomentPropagator
    >>> class Double(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> @register_rule(Double)
    ... def _double(ctx, module, x):
    ...     return Moments(2 * x.mean, None if x.var is None else 4 * x.var)
    >>> prop = MomentPropagator(nn.Sequential(nn.Linear(3, 2), Double()), {"0.weight": 0.1})
    >>> prop(torch.ones(1, 3)).var.shape
    torch.Size([1, 2])
    """

    def decorator(rule):
        for key in keys:
            if isinstance(key, str):
                _METHOD_RULES[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                _MODULE_RULES[key] = rule
            elif callable(key):
                _FUNCTION_RULES[key] = rule
            else:
                raise TypeError(f"cannot register a rule for {key!r}")
            _VERSION[0] += 1
        return rule

    return decorator


def module_rule(cls: type) -> Callable | None:
    """The rule registered for a module class or the nearest of its bases."""
    for klass in cls.__mro__:
        if klass in _MODULE_RULES:
            return _MODULE_RULES[klass]
    return None


def registry_version() -> int:
    """A number that changes whenever a rule is registered."""
    return _VERSION[0]


def method_rule(name: str) -> Callable | None:
    """The rule registered for a tensor method name."""
    return _METHOD_RULES.get(name)


def get_rule(target) -> Callable | None:
    """The registered rule for a module (instance or class), function or method name.

    Examples
    --------
    >>> from torch import nn
    >>> from skuq.cvp import get_rule
    >>> get_rule(nn.Linear) is not None
    True
    >>> get_rule(nn.Linear(2, 3)) is get_rule(nn.Linear)
    True
    """
    if isinstance(target, str):
        return _METHOD_RULES.get(target)
    if isinstance(target, nn.Module):
        return module_rule(type(target))
    if isinstance(target, type):
        return module_rule(target)
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable
        return None


def how_to_register(kind: str, what: str) -> str:
    """The hint appended to an error about a missing rule."""
    return (
        f"Register one with skuq.cvp.register_rule({what}) on a function "
        "rule(ctx, target, *args) that returns skuq.cvp.Moments(mean, var) "
        "(skuq.cvp.elementwise_rule builds one for elementwise activations; "
        "skuq.cvp.linearized_rule is the first-order fallback)."
    )


class PropagationContext:
    """What a rule can ask for while propagating.

    Attributes
    ----------
    param_var : callable
        ``param_var(parameter) -> Tensor or None``: the posterior variance of a
        parameter tensor (``None`` when it is held fixed).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp import PropagationContext
    >>> w, b = torch.ones(2), torch.zeros(2)
    >>> ctx = PropagationContext({id(w): torch.full((2,), 0.5)})
    >>> ctx.param_var(w)
    tensor([0.5000, 0.5000])
    >>> ctx.param_var(b) is None
    True
    """

    def __init__(self, variances: dict[int, Tensor], cache: dict | None = None):
        self._vars = variances
        self._cache = cache

    def param_var(self, p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        return self._vars.get(id(p))

    def derived(self, p: Tensor, tag: str, fn: Callable[[], Tensor]) -> Tensor:
        """``fn()``, a tensor computed from parameter ``p`` and its variance
        (``W^2 + sigma^2``, say), cached across calls.

        The propagator keeps the cache: an entry is reused while ``p`` is the
        same tensor, unchanged in place (``p._version``), with the same data
        (pointer, device, dtype) and the same variance tensor. It is computed
        afresh when ``p`` is not an ``nn.Parameter`` (a slice of one, say) and
        when autograd would need to reach ``p`` (grad mode on and
        ``p.requires_grad``). ``tag`` names what ``fn`` computes from ``p``.

        Examples
        --------
        >>> import torch
        >>> from skuq.cvp import PropagationContext
        >>> w = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        >>> ctx = PropagationContext({id(w): torch.full((2,), 0.5)}, cache={})
        >>> a = ctx.derived(w, "sq+var", lambda: w * w + ctx.param_var(w))
        >>> a, ctx.derived(w, "sq+var", lambda: None) is a
        (tensor([1.5000, 1.5000]), True)
        """
        if (
            self._cache is None
            or not isinstance(p, nn.Parameter)
            or (p.requires_grad and torch.is_grad_enabled())
        ):
            return fn()
        var = self._vars.get(id(p))
        key = (id(p), tag)
        # p.data replaced (Module.to) changes the pointer; in-place ops the version
        stamp = (p._version, p.data_ptr(), p.device, p.dtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is p and hit[1] == stamp and hit[2] is var:
            return hit[3]
        with torch.no_grad():
            out = fn()
        self._cache[key] = (p, stamp, var, out)
        return out

    def param(self, p: Tensor | None) -> Moments | None:
        """A parameter as :class:`Moments` (its value and posterior variance)."""
        return None if p is None else Moments(p, self.param_var(p))

    def call(self, target, *args, **kwargs):
        """Dispatch to the rule registered for a submodule or function (composite rules)."""
        rule = get_rule(target)
        if rule is None:
            if isinstance(target, nn.Module):
                name = type(target).__name__
                raise UnsupportedLayerError(
                    f"CVP has no propagation rule for {name}. " + how_to_register("module", name)
                )
            return run_deterministic(target, args, kwargs)
        return rule(self, target, *args, **kwargs)


def is_random(x) -> bool:
    return isinstance(x, Moments) and x.var is not None


def any_random(args, kwargs) -> bool:
    found = []
    torch.fx.node.map_aggregate((args, kwargs), lambda a: found.append(is_random(a)))
    return any(found)


def unwrap(x):
    return torch.fx.node.map_aggregate(x, lambda a: a.mean if isinstance(a, Moments) else a)


def wrap(x):
    return torch.fx.node.map_aggregate(x, lambda a: Moments(a) if isinstance(a, Tensor) else a)


def run_deterministic(fn, args, kwargs):
    return wrap(fn(*unwrap(args), **unwrap(kwargs)))
