"""The moment-propagation engine: trace a module with torch.fx, then carry a
mean and a variance through every node with a rule from a registry.

Weights are independent Gaussians ``N(theta, sigma^2)`` with ``theta`` the
trained values and ``sigma^2`` a per-parameter variance (a diagonal posterior);
activations are treated as independent Gaussians per unit (the usual variance-
propagation assumption). A rule is a function ``rule(ctx, target, *args,
**kwargs)`` that receives the node's inputs -- :class:`Moments` for tensors,
plain Python values otherwise -- and returns :class:`Moments` (or a tuple of
them). Rules are looked up by module type (walking the class hierarchy), by
function, or by tensor-method name; :func:`register_rule` adds or replaces one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "Moments",
    "PropagationContext",
    "MomentPropagator",
    "register_rule",
    "get_rule",
    "UnsupportedLayerError",
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

    @property
    def deterministic(self) -> bool:
        return self.var is None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Moments:
        """Apply a structural op (reshape, permute, index...) to mean and variance."""
        return Moments(fn(self.mean), None if self.var is None else fn(self.var))


class UnsupportedLayerError(TypeError):
    """Raised when a traced node has no propagation rule."""


# -------------------------------------------------------------------- registry
_MODULE_RULES: dict[type, Callable] = {}
_FUNCTION_RULES: dict[object, Callable] = {}
_METHOD_RULES: dict[str, Callable] = {}


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
        return rule

    return decorator


def _module_rule(cls: type) -> Callable | None:
    for klass in cls.__mro__:
        if klass in _MODULE_RULES:
            return _MODULE_RULES[klass]
    return None


def get_rule(target) -> Callable | None:
    """The registered rule for a module (instance or class), function or method name."""
    if isinstance(target, str):
        return _METHOD_RULES.get(target)
    if isinstance(target, nn.Module):
        return _module_rule(type(target))
    if isinstance(target, type):
        return _module_rule(target)
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable
        return None


def _how_to_register(kind: str, what: str) -> str:
    return (
        f"Register one with skuq.cvp.register_rule({what}) on a function "
        "rule(ctx, target, *args) that returns skuq.cvp.Moments(mean, var) "
        "(skuq.cvp.elementwise_rule builds one for elementwise activations; "
        "skuq.cvp.linearized_rule is the first-order fallback)."
    )


# --------------------------------------------------------------------- tracing
class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps every module with a registered rule as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _module_rule(type(m)) is not None:
            return True
        return super().is_leaf_module(m, qualname)


class _Root(nn.Module):
    """Holds a model that has a rule of its own, so that tracing keeps it a leaf."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root

    def forward(self, x):
        return self.root(x)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (modules with rules stay leaves).

    A model whose own type has a rule (a bare ``nn.Linear``, say) is wrapped,
    and its parameter and layer names in the graph get the prefix ``root.``.
    """
    if _module_rule(type(model)) is not None:
        model = _Root(model)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; say what to do
        raise UnsupportedLayerError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Data-dependent "
            "control flow cannot be traced; register a propagation rule for the "
            "submodule that contains it (skuq.cvp.register_rule(ThatModule)) so it is "
            "handled as one leaf."
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


# --------------------------------------------------------------------- context
class PropagationContext:
    """What a rule can ask for while propagating.

    Attributes
    ----------
    param_var : callable
        ``param_var(parameter) -> Tensor or None``: the posterior variance of a
        parameter tensor (``None`` when it is held fixed).
    """

    def __init__(self, variances: dict[int, Tensor]):
        self._vars = variances

    def param_var(self, p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        return self._vars.get(id(p))

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
                    f"CVP has no propagation rule for {name}. "
                    + _how_to_register("module", name)
                )
            return _run_deterministic(target, args, kwargs)
        return rule(self, target, *args, **kwargs)


def _is_random(x) -> bool:
    return isinstance(x, Moments) and x.var is not None


def _any_random(args, kwargs) -> bool:
    found = []
    torch.fx.node.map_aggregate((args, kwargs), lambda a: found.append(_is_random(a)))
    return any(found)


def _unwrap(x):
    return torch.fx.node.map_aggregate(x, lambda a: a.mean if isinstance(a, Moments) else a)


def _wrap(x):
    return torch.fx.node.map_aggregate(x, lambda a: Moments(a) if isinstance(a, Tensor) else a)


def _run_deterministic(fn, args, kwargs):
    return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))


# ------------------------------------------------------------------ propagator
class MomentPropagator:
    """One forward pass that carries a mean and a variance per activation.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (its parameters are the posterior means). Traced
        with ``torch.fx``; modules with a registered rule are leaves.
    variances : mapping of str to Tensor or float
        Posterior variance per parameter, keyed by the names of
        ``model.named_parameters()``; a float applies to every entry of that
        parameter. Parameters not named are held fixed (zero variance).

    Attributes
    ----------
    layer_names : list of str
        The calibratable layers: call sites of modules that own a parameter
        with posterior variance (their output variance can be scaled).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import MomentPropagator
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> prop = MomentPropagator(net, {n: 1e-2 for n, _ in net.named_parameters()})
    >>> out = prop(torch.randn(5, 4))
    >>> out.mean.shape, bool((out.var > 0).all())
    (torch.Size([5, 3]), True)
    >>> prop.layer_names
    ['0', '2']
    """

    def __init__(self, model: nn.Module, variances: Mapping[str, Tensor | float]):
        self.model = model
        self.graph_module = trace(model)
        self._prefix = "root." if _module_rule(type(model)) is not None else ""
        named = dict(model.named_parameters())
        unknown = sorted(set(variances) - set(named))
        if unknown:
            raise KeyError(
                f"variances name parameters the model does not have: {unknown[:5]}; "
                f"its parameters are {sorted(named)[:8]}..."
            )
        self._variances: dict[str, Tensor] = {}
        for name, v in variances.items():
            v = torch.as_tensor(v, dtype=named[name].dtype)
            if v.ndim == 0:
                v = v.expand(named[name].shape)
            if tuple(v.shape) != tuple(named[name].shape):
                raise ValueError(
                    f"variance of {name!r} has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(named[name].shape)}"
                )
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise ValueError(f"variance of {name!r} must be finite and >= 0")
            self._variances[name] = v.detach().clone()
        self._check_supported()
        self.layer_names = self._layer_names()

    # ----------------------------------------------------------- inspection
    def _check_supported(self) -> None:
        gm = self.graph_module
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                own = {f"{node.target}.{n}" for n, _ in mod.named_parameters()}
                if _module_rule(type(mod)) is None and own & {
                    self._prefix + k for k in self._variances
                }:
                    name = type(mod).__name__
                    raise UnsupportedLayerError(
                        f"CVP has no propagation rule for layer {node.target!r} of type "
                        f"{name}. " + _how_to_register("module", name)
                    )

    def _layer_names(self) -> list[str]:
        gm = self.graph_module
        names = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target not in names:
                mod = gm.get_submodule(node.target)
                own = {f"{node.target}.{n}" for n, _ in mod.named_parameters()}
                if own & {self._prefix + k for k in self._variances}:
                    names.append(node.target)
        return names

    def _var_by_id(self) -> dict[int, Tensor]:
        named = dict(self.graph_module.named_parameters())
        out = {}
        for name, v in self._variances.items():
            p = named.get(self._prefix + name)
            if p is None:  # a parameter the traced graph never uses
                continue
            if v.device != p.device or v.dtype != p.dtype:
                v = v.to(device=p.device, dtype=p.dtype)
                self._variances[name] = v
            out[id(p)] = v
        return out

    @staticmethod
    def _scale_and_record(name, out, scales, record):
        """Scale a layer's output variance; the first element of a tuple output
        (``nn.MultiheadAttention`` returns ``(output, weights)``) is the output."""
        first = out[0] if isinstance(out, tuple) and out and isinstance(out[0], Moments) else out
        if not isinstance(first, Moments):
            return out
        if name in scales and first.var is not None:
            first = Moments(first.mean, first.var * scales[name])
        if record is not None:
            record[name] = first
        return (first, *out[1:]) if isinstance(out, tuple) else first

    @property
    def variances(self) -> dict[str, Tensor]:
        """Posterior variance per named parameter."""
        return dict(self._variances)

    # ---------------------------------------------------------- propagation
    def __call__(
        self,
        x: Tensor | Moments,
        *,
        layer_scales: Mapping[str, Tensor | float] | None = None,
        record: dict | None = None,
    ) -> Moments:
        """Propagate a batch.

        Parameters
        ----------
        x : Tensor or Moments
            Inputs (deterministic tensor, or moments of a random input).
        layer_scales : mapping of str to scalar, optional
            Multiplies the output variance of each named layer (calibration).
        record : dict, optional
            Filled with ``{layer_name: Moments}`` of every module call site.

        Returns
        -------
        Moments
            Of the model output.
        """
        ctx = PropagationContext(self._var_by_id())
        gm = self.graph_module
        env: dict = {}
        scales = layer_scales or {}
        inputs = iter([x if isinstance(x, Moments) else Moments(x)])

        def load(a):
            return torch.fx.node.map_arg(a, lambda n: env[n])

        for node in gm.graph.nodes:
            op = node.op
            if op == "placeholder":
                try:
                    env[node] = next(inputs)
                except StopIteration:
                    default = node.args[0] if node.args else None
                    env[node] = default
            elif op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = ctx.param(obj) if isinstance(obj, Tensor) else obj
            elif op == "output":
                out = load(node.args[0])
                if isinstance(out, (tuple, list)):
                    out = out[0]
                return out
            else:
                args, kwargs = load(node.args), load(node.kwargs)
                if op == "call_module":
                    target = gm.get_submodule(node.target)
                    rule = _module_rule(type(target))
                    if rule is None:  # structural module without parameters
                        if _any_random(args, kwargs):
                            raise UnsupportedLayerError(
                                f"CVP has no propagation rule for layer {node.target!r} of "
                                f"type {type(target).__name__}. "
                                + _how_to_register("module", type(target).__name__)
                            )
                        out = _run_deterministic(target, args, kwargs)
                    else:
                        out = rule(ctx, target, *args, **kwargs)
                    out = self._scale_and_record(node.target, out, scales, record)
                else:
                    target = node.target
                    rule = get_rule(target) if op == "call_function" else _METHOD_RULES.get(
                        target
                    )
                    if rule is not None:
                        out = rule(ctx, target, *args, **kwargs)
                    elif not _any_random(args, kwargs):
                        if op == "call_method":
                            obj, *rest = _unwrap(args)
                            out = _wrap(getattr(obj, target)(*rest, **_unwrap(kwargs)))
                        else:
                            out = _run_deterministic(target, args, kwargs)
                    else:
                        what = (
                            f"tensor method .{target}()"
                            if op == "call_method"
                            else f"function {getattr(target, '__module__', '')}."
                            f"{getattr(target, '__name__', target)}"
                        )
                        key = repr(target) if op == "call_method" else "that_function"
                        raise UnsupportedLayerError(
                            f"CVP has no propagation rule for {what} (node {node.name!r})."
                            " " + _how_to_register("function", key)
                        )
                env[node] = out
        raise RuntimeError("the traced graph has no output")  # pragma: no cover


