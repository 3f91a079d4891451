"""The moment propagator: one forward pass over a traced model that carries a mean
and a variance per activation, node by node, with the rules of the registry.

:class:`MomentPropagator` prepares the traced graph once (tracing, fusion, the
elementwise products, the pooled sites, the checks, each node's module and rule);
each call runs over its nodes with :class:`~skuq.cvp.registry.Moments` as values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from . import moments as mom
from .graph import (
    check_supported,
    correlated_products,
    elementwise_product,
    fuse_log_softmax,
    random_layers,
    trace,
)
from .pooled import find_pooled_sites, pooled_correction
from .registry import (
    CorrelatedFactorsWarning,
    Moments,
    PropagationContext,
    UnsupportedLayerError,
    any_random,
    get_rule,
    how_to_register,
    is_random,
    method_rule,
    module_rule,
    registry_version,
    run_deterministic,
    unwrap,
    wrap,
)

__all__ = ["MomentPropagator"]


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
        self._prefix = "root." if module_rule(type(model)) is not None else ""
        self._variances = _checked_variances(model, variances)
        gm = self.graph_module
        random = self._random_names()
        check_supported(gm, random)
        self.layer_names = random_layers(gm, random)
        self._products = {}
        for node in gm.graph.nodes:
            found = elementwise_product(gm, node)
            if found is not None:
                self._products[node] = found
        # global average pools after a shared-weight layer: cross-position covariance
        self._pooled = find_pooled_sites(gm, self.layer_names, self._products)
        self._warned_modes: set[bool] = set()
        # tensors derived from the weights (squares, squares plus variances), kept
        # across calls: see PropagationContext.derived
        self._derived_cache: dict = {}
        self._warned_nodes: set[str] = set()
        self._plan: tuple[tuple, list[_Step]] | None = None
        self._warn_correlated(input_random=False)

    # ----------------------------------------------------------- inspection
    def _random_names(self) -> set[str]:
        """Names, in the traced graph, of the parameters with posterior variance."""
        return {self._prefix + k for k in self._variances}

    def _warn_correlated(self, input_random: bool) -> None:
        if input_random in self._warned_modes:
            return
        self._warned_modes.add(input_random)
        found = correlated_products(
            self.graph_module,
            self._random_names(),
            set(self.layer_names),
            self._products,
            input_random,
        )
        for name, shared in found:
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

    def __getstate__(self) -> dict:
        # the plan holds the registry's rules, some of them closures pickle cannot
        # store; it is made again on the first call after loading
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

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
        x = x if isinstance(x, Moments) else Moments(x)
        return _propagate(self, x, ctx, layer_scales or {}, record)

    def _steps(self) -> list[_Step]:
        """The per-node plan, made again when a rule has been registered since (or the
        products or pooled sites were replaced)."""
        key = (registry_version(), id(self._products), id(self._pooled))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, _plan(self.graph_module, self._products, self._pooled))
        return self._plan[1]


def _checked_variances(
    model: nn.Module, variances: Mapping[str, Tensor | float]
) -> dict[str, Tensor]:
    """``variances`` as tensors of the parameters' shapes and dtypes (floats expanded),
    checked to name parameters of ``model`` and to be finite and non-negative."""
    named = dict(model.named_parameters())
    unknown = sorted(set(variances) - set(named))
    if unknown:
        raise KeyError(
            f"variances name parameters the model does not have: {unknown[:5]}; "
            f"its parameters are {sorted(named)[:8]}..."
        )
    out: dict[str, Tensor] = {}
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
        out[name] = v.detach().clone()
    return out


class _Step(NamedTuple):
    """One node of the plan: its op, for a call its module (``call_module``) or target
    and the rule registered for it (None when it has none), and the nodes whose values
    are not read after it."""

    node: torch.fx.Node
    op: str
    target: object
    rule: Callable | None
    release: tuple


def _plan(gm: torch.fx.GraphModule, products: dict, pooled: dict) -> list[_Step]:
    """The graph's nodes with their modules and rules resolved (class hierarchies walked
    once, not at every call), and when each value is read for the last time: by a
    node's arguments, by an elementwise product (its root) or by a pooled correction
    (the layer, its input, the chain between them and the pool)."""
    nodes = list(gm.graph.nodes)
    last: dict = {}
    for i, node in enumerate(nodes):
        last[node] = i
        for a in node.all_input_nodes:
            last[a] = i
        if node in products:
            last[products[node][0]] = i
        for site in pooled.get(node, ()):
            for n in (site.layer, *site.layer.all_input_nodes):
                last[n] = i
            for n, _kind, parent in site.chain:
                last[n] = last[parent] = i
    release: list[list] = [[] for _ in nodes]
    for n, i in last.items():
        release[i].append(n)
    steps = []
    for node, done in zip(nodes, release, strict=True):
        target, rule = node.target, None
        if node.op == "call_module":
            target = gm.get_submodule(node.target)
            rule = module_rule(type(target))
        elif node.op == "call_function":
            rule = get_rule(target)
        elif node.op == "call_method":
            rule = method_rule(target)
        steps.append(_Step(node, node.op, target, rule, tuple(done)))
    return steps


def _propagate(prop: MomentPropagator, x: Moments, ctx, scales, record) -> Moments:
    """One call: the traced graph run node by node with :class:`Moments` as values.

    Per node: a module call site goes to its rule (a structural module without a
    rule runs on deterministic inputs), then its output variance is scaled and
    recorded; an elementwise product of one random tensor is propagated as one
    elementwise map; a function or tensor method goes to its rule, or runs as is on
    deterministic inputs; a global average pool after a shared-weight layer gets the
    cross-position covariance of that layer's weight noise. A value leaves ``env``
    after its last reader (the products and the pooled corrections read nodes upstream
    of their arguments), so that a pass holds only the values still needed.
    """
    gm, env = prop.graph_module, {}
    products, pooled = prop._products, prop._pooled
    first_input = True
    for node, op, target, rule, release in prop._steps():
        product = products.get(node)
        if product is not None and is_random(env[product[0]]):
            out = _elementwise_product(env[product[0]], product[1])
        elif op == "placeholder":
            if first_input:
                out, first_input = x, False
            else:  # an argument after the input: its default, else None
                out = node.args[0] if node.args else None
        elif op == "get_attr":
            out = _get_attr(gm, target, ctx, scales, record)
        elif op == "output":
            out = torch.fx.node.map_arg(node.args[0], env.__getitem__)
            return out[0] if isinstance(out, (tuple, list)) else out
        else:
            args = torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            out = _call(node, op, target, rule, args, kwargs, ctx)
            if op == "call_module":
                out = MomentPropagator._scale_and_record(node.target, out, scales, record)
        sites = pooled.get(node)
        if sites:
            out = _pooled(gm, sites, out, ctx, env, products, scales)
        env[node] = out
        for done in release:  # freed as the pass goes: the allocator reuses the memory
            del env[done]
    raise RuntimeError("the traced graph has no output")  # pragma: no cover


def _get_attr(gm, target: str, ctx, scales, record):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, Tensor):
        obj = ctx.param(obj)
        if obj.var is not None and target in scales:
            obj = Moments(obj.mean, obj.var * scales[target])
        if obj.var is not None and record is not None:
            record[target] = obj
    return obj


def _call(node, op: str, target, rule, args, kwargs, ctx):
    """A call node: its rule, else the op itself on deterministic inputs."""
    if rule is not None:
        return rule(ctx, target, *args, **kwargs)
    if op == "call_module":  # structural module without parameters
        if any_random(args, kwargs):
            raise UnsupportedLayerError(
                f"CVP has no propagation rule for layer {node.target!r} of "
                f"type {type(target).__name__}. " + how_to_register("module", type(target).__name__)
            )
        return run_deterministic(target, args, kwargs)
    if op == "call_function":
        if not any_random(args, kwargs):
            return run_deterministic(target, args, kwargs)
        what = f"function {getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"
        key = "that_function"
    else:
        if not any_random(args, kwargs):
            obj, *rest = unwrap(args)
            return wrap(getattr(obj, target)(*rest, **unwrap(kwargs)))
        what, key = f"tensor method .{target}()", repr(target)
    raise UnsupportedLayerError(
        f"CVP has no propagation rule for {what} (node {node.name!r}). "
        + how_to_register("function", key)
    )


def _elementwise_product(r: Moments, g) -> Moments:
    """A product (or sum) of two elementwise functions of the random ``r``: SiLU's
    moments for ``x * sigmoid(x)`` (``g`` None), else quadrature of ``g``."""
    fn = mom.silu_moments if g is None else (lambda m, v, _g=g: mom.quadrature_moments(_g, m, v))
    return Moments(*mom._in_slices(fn, r.mean, r.var))


def _pooled(gm, sites, out, ctx, env, products, scales):
    """Add the cross-position variance at a global average pool after a
    shared-weight layer (:mod:`skuq.cvp.pooled`)."""
    if not (isinstance(out, Moments) and out.var is not None):
        return out
    var = out.var
    for site in sites:
        corr = pooled_correction(ctx, gm, site, env, products, scales.get(site.layer.target, 1.0))
        if corr is not None:
            var = var + corr.reshape(var.shape).to(var.dtype)
    if var is not out.var:
        out = Moments(out.mean, var.clamp_min(0.0))
    return out
