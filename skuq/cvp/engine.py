"""The moment-propagation engine: trace a module with torch.fx, then carry a
mean and a variance through every node with a rule from a registry.

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

import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import moments as mom
from .pooled import find_pooled_sites, pooled_correction

__all__ = [
    "Moments",
    "PropagationContext",
    "MomentPropagator",
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

    @property
    def deterministic(self) -> bool:
        return self.var is None

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


# ----------------------------------------------------------------- graph passes
def _is_call(node, fns=(), methods=()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        try:
            return node.target in fns
        except TypeError:  # unhashable target
            return False
    return node.op == "call_method" and node.target in methods


def _softmax_input(gm: torch.fx.GraphModule, node):
    """``(x, dim)`` when ``node`` is a softmax over ``x`` along an explicit ``dim``."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Softmax and mod.dim is not None and len(node.args) == 1:
            return node.args[0], mod.dim
        return None
    if not _is_call(node, (F.softmax, torch.softmax), ("softmax",)):
        return None
    if node.kwargs.get("dtype") is not None or any(
        isinstance(a, torch.dtype) for a in node.args
    ):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return (node.args[0], dim) if isinstance(dim, int) else None


def _clamp_floor(node):
    """``(input, eps)`` when ``node`` is ``clamp_min(input, eps)`` (or ``clamp(min=eps)``)
    with a positive number ``eps`` and no upper bound."""
    if _is_call(node, (torch.clamp_min,), ("clamp_min",)):
        eps = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    elif _is_call(node, (torch.clamp, torch.clip), ("clamp", "clip")):
        pos = dict(zip(("min", "max"), node.args[1:], strict=False))
        if node.kwargs.get("max", pos.get("max")) is not None:
            return None
        eps = node.kwargs.get("min", pos.get("min"))
    else:
        return None
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
        return node.args[0], float(eps)
    return None


def fuse_log_softmax(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``log(softmax(x))`` and ``log(softmax(x).clamp_min(eps))`` as one
    ``log_softmax`` (``log_softmax(x).clamp_min(log eps)``: the same values).

    skorch's ``NLLLoss`` nets output probabilities and skuq takes their log
    (``skuq.base.logit_model``); fused, the moments are those of one
    linearized log-softmax instead of a pseudo-Gaussian probability passed
    through a clamp and a log. Returns the number of rewrites.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not _is_call(node, (torch.log,), ("log",)) or len(node.args) != 1 or node.kwargs:
            continue
        inner, eps = node.args[0], None
        floor = _clamp_floor(inner)
        if floor is not None:
            inner, eps = floor
        found = _softmax_input(gm, inner)
        if found is None:
            continue
        x, dim = found
        with graph.inserting_before(node):
            new = graph.call_function(F.log_softmax, (x,), {"dim": dim})
            if eps is not None:
                new = graph.call_function(torch.clamp_min, (new, math.log(eps)))
        node.replace_all_uses_with(new)
        dead = [node, node.args[0]] + ([inner] if eps is not None else [])
        for n in dead:
            if not n.users:
                graph.erase_node(n)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


# elementwise maps of one tensor (other arguments plain constants), for products
# of two functions of one tensor such as x * sigmoid(x)
_UNARY_FNS = {
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.relu, F.relu, F.gelu, F.silu,
    F.softplus, F.elu, F.leaky_relu, F.mish, torch.exp, torch.erf, torch.neg, operator.neg,
    torch.abs, torch.sin, torch.cos, torch.square,
}
_UNARY_METHODS = {"sigmoid", "tanh", "relu", "exp", "erf", "neg", "abs", "sin", "cos", "square"}
_UNARY_MODULES = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
                  nn.LeakyReLU, nn.Mish, nn.Identity)
_ARITH_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
              torch.sub, torch.mul, torch.div}
_ARITH_METHODS = {"add", "sub", "mul", "div"}
_MUL_FNS, _MUL_METHODS = {operator.mul, torch.mul, operator.imul}, {"mul"}
# sums of two functions of one tensor (h - h / 2) are handled like products
_SUM_FNS = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub}
_SUM_METHODS = {"add", "sub"}
_META_METHODS = {"size", "dim", "numel"}
_MATMUL_FNS, _MATMUL_METHODS = {operator.matmul, torch.matmul, torch.bmm}, {"matmul", "bmm"}


def _flat_args(node) -> list:
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _unary_parent(gm: torch.fx.GraphModule, node):
    """The one tensor an elementwise node is a function of, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    flat = _flat_args(node)
    nodes = [a for a in flat if isinstance(a, torch.fx.Node)]
    if len(nodes) != 1:
        return None
    plain = all(isinstance(a, (int, float, bool, str, type(None))) for a in flat
                if not isinstance(a, torch.fx.Node))
    if not plain:
        return None
    if node.op == "call_module":
        ok = isinstance(gm.get_submodule(node.target), _UNARY_MODULES)
    elif _is_call(node, _UNARY_FNS, _UNARY_METHODS):
        ok = node.args and node.args[0] is nodes[0]
    else:
        ok = _is_call(node, _ARITH_FNS, _ARITH_METHODS)
    return nodes[0] if ok else None


def _is_sigmoid(gm: torch.fx.GraphModule, node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.Sigmoid
    return _is_call(node, (torch.sigmoid, F.sigmoid), ("sigmoid",))


def _eval_chain(gm: torch.fx.GraphModule, chain: list, root, t: Tensor) -> Tensor:
    """Evaluate the elementwise nodes ``chain`` (root side first) on ``t`` for ``root``."""
    vals = {root: t}
    for n in chain:
        args = torch.fx.node.map_arg(n.args, lambda a: vals[a])
        kwargs = dict(torch.fx.node.map_arg(n.kwargs, lambda a: vals[a]))
        kwargs.pop("inplace", None)
        if n.op == "call_module":
            out = gm.get_submodule(n.target)(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            out = n.target(*args, **kwargs)
        vals[n] = out
    return vals[chain[-1]] if chain else t


def _elementwise_product(gm: torch.fx.GraphModule, node):
    """For ``a * b`` (or ``a + b``, ``a - b``) with both operands elementwise
    functions of one tensor ``r`` (``x * torch.sigmoid(x)``): ``(r, g)`` with
    ``a * b = g(r)``; else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    if _is_call(node, _MUL_FNS, _MUL_METHODS):
        node_fn = operator.mul
    elif _is_call(node, _SUM_FNS, _SUM_METHODS):
        name = node.target if isinstance(node.target, str) else node.target.__name__
        node_fn = operator.sub if "sub" in name else operator.add
    else:
        return None
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
        return None

    def lineage(n):
        out = [n]
        while (p := _unary_parent(gm, out[-1])) is not None:
            out.append(p)
        return out

    la, lb = lineage(a), lineage(b)
    common = next((n for n in la if n in lb), None)
    if common is None:
        return None
    chain_a = la[: la.index(common)][::-1]
    chain_b = lb[: lb.index(common)][::-1]
    if (node_fn is operator.mul and sorted(map(len, (chain_a, chain_b))) == [0, 1]
            and _is_sigmoid(gm, (chain_a + chain_b)[0])):
        return common, None  # x * sigmoid(x) is SiLU: its dedicated moments

    def g(t):
        return node_fn(_eval_chain(gm, chain_a, common, t), _eval_chain(gm, chain_b, common, t))

    return common, g


# --------------------------------------------------------------------- context
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
        if (self._cache is None or not isinstance(p, nn.Parameter)
                or (p.requires_grad and torch.is_grad_enabled())):
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
        with posterior variance (their output variance can be scaled), and
        parameters with variance that the forward uses directly (a positional
        embedding ``self.pos``; keyed by the parameter's name, the scale
        multiplies its variance).

    Notes
    -----
    Graph-level handling before the rules: ``log(softmax(x))`` (also with a
    ``clamp_min(eps)`` in between, as skorch ``NLLLoss`` nets get it) is
    fused into one linearized log-softmax; a product (or sum) of two
    elementwise functions of one tensor (``h * h``, ``x * torch.sigmoid(x)``,
    ``h - h / 2``) is propagated as one elementwise map of that tensor (exact
    square, SiLU's moments, or Gauss-Hermite quadrature, which is accurate for
    smooth maps); any other product or matmul whose factors share a random
    ancestor is still propagated as if independent, with a
    :class:`CorrelatedFactorsWarning` (sums are not warned about: a residual
    ``x + f(x)`` is the usual, accepted case of that approximation). A global
    average pool (``AdaptiveAvgPool`` to size 1, or a mean over all positions)
    reached from a convolution, a per-token Linear or a normalization layer's
    affine part through per-position maps gets the cross-position covariance of
    that layer's weight noise (:mod:`skuq.cvp.pooled`).

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
        fuse_log_softmax(self.graph_module)
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
        gm = self.graph_module
        self._products = {}
        for node in gm.graph.nodes:
            found = _elementwise_product(gm, node)
            if found is not None:
                self._products[node] = found
        # global average pools after a shared-weight layer: cross-position covariance
        self._pooled = find_pooled_sites(gm, self.layer_names, self._products)
        self._warned_modes: set[bool] = set()
        # tensors derived from the weights (squares, squares plus variances), kept
        # across calls: see PropagationContext.derived
        self._derived_cache: dict = {}
        self._warned_nodes: set[str] = set()
        self._warn_correlated(input_random=False)

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
        random = {self._prefix + k for k in self._variances}
        names = []
        for node in gm.graph.nodes:
            if node.target in names:
                continue
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                own = {f"{node.target}.{n}" for n, _ in mod.named_parameters()}
                if own & random:
                    names.append(node.target)
            elif node.op == "get_attr" and node.target in random:
                names.append(node.target)  # a free parameter (positional embedding)
        return names

    def _correlated_products(self, input_random: bool) -> list:
        """Products and matmuls propagated as independent whose factors share a
        random ancestor (an input with variance, a layer or parameter with variance)."""
        gm = self.graph_module
        random = {self._prefix + k for k in self._variances}
        layers = set(self.layer_names)
        sources: dict = {}
        first_input = True
        found = []
        for node in gm.graph.nodes:
            own: set = set()
            if not _is_call(node, (getattr,), _META_METHODS):  # shapes are not random
                for n in node.all_input_nodes:
                    own |= sources[n]
            if node.op == "placeholder":
                if first_input and input_random:
                    own.add(node.name)
                first_input = False
            elif node.op == "get_attr" and node.target in random:
                own.add(node.target)
            elif node.op == "call_module" and node.target in layers:
                own.add(node.target)
            sources[node] = frozenset(own)
            if node in self._products or len(node.args) != 2:
                continue
            if not (_is_call(node, _MUL_FNS, _MUL_METHODS)
                    or _is_call(node, _MATMUL_FNS, _MATMUL_METHODS)):
                continue
            a, b = node.args
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a is not b:
                shared = sources[a] & sources[b]
                if shared:
                    found.append((node.name, sorted(shared)))
        return found

    def _warn_correlated(self, input_random: bool) -> None:
        if input_random in self._warned_modes:
            return
        self._warned_modes.add(input_random)
        for name, shared in self._correlated_products(input_random):
            if name in self._warned_nodes:
                continue
            self._warned_nodes.add(name)
            warnings.warn(
                f"CVP propagates the product {name!r} as if its two factors were "
                f"independent, but both depend on the random {shared[:4]}: their "
                "correlation is ignored and its mean and variance can be badly off. "
                "Put the product in a module and register a rule for it "
                "(skuq.cvp.register_rule(ThatModule)) to propagate it as one block.",
                CorrelatedFactorsWarning,
                stacklevel=3,
            )

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

    # the traced graph holds generated code and a per-instance class: a saved
    # propagator (skuq._persist, for skops) keeps the model and variances and re-traces
    def _skuq_getstate(self) -> dict:
        return {"model": self.model, "variances": self._variances}

    def _skuq_setstate(self, state: dict) -> None:
        with warnings.catch_warnings():  # the same warnings were given when it was built
            warnings.simplefilter("ignore", CorrelatedFactorsWarning)
            self.__init__(state["model"], state["variances"])

    def clear_cache(self) -> None:
        """Drop the tensors cached from the weights (``W^2``, ``W^2 + sigma^2``...).

        They are recomputed when a weight changes in place through autograd-
        visible ops (``p._version``); call this after changing weights behind
        autograd's back (``p.data``).
        """
        self._derived_cache.clear()

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
            Multiplies the output variance of each named layer, and the
            variance of each named free parameter (calibration).
        record : dict, optional
            Filled with ``{layer_name: Moments}`` of every module call site
            (and of every free parameter with variance).

        Returns
        -------
        Moments
            Of the model output.
        """
        if isinstance(x, Moments) and x.var is not None:
            self._warn_correlated(input_random=True)
        ctx = PropagationContext(self._var_by_id(), self._derived_cache)
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
                if isinstance(obj, Tensor):
                    obj = ctx.param(obj)
                    if obj.var is not None and node.target in scales:
                        obj = Moments(obj.mean, obj.var * scales[node.target])
                    if obj.var is not None and record is not None:
                        record[node.target] = obj
                env[node] = obj
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
                elif node in self._products and _is_random(env[self._products[node][0]]):
                    root, g = self._products[node]
                    r = env[root]
                    fn = mom.silu_moments if g is None else (
                        lambda m, v, _g=g: mom.quadrature_moments(_g, m, v))
                    out = Moments(*mom._in_slices(fn, r.mean, r.var))
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
                sites = self._pooled.get(node)
                if sites and isinstance(out, Moments) and out.var is not None:
                    var = out.var
                    for site in sites:
                        corr = pooled_correction(ctx, gm, site, env, self._products,
                                                 scales.get(site.layer.target, 1.0))
                        if corr is not None:
                            var = var + corr.reshape(var.shape).to(var.dtype)
                    if var is not out.var:
                        out = Moments(out.mean, var.clamp_min(0.0))
                env[node] = out
        raise RuntimeError("the traced graph has no output")  # pragma: no cover


