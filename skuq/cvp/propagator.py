"""The moment propagator: one forward pass over a traced model that carries a mean
and a variance per activation, node by node, with the rules of the registry.

:class:`MomentPropagator` prepares the traced graph once (tracing, fusion, the
elementwise products, the pooled sites, the checks); each call runs a
:class:`torch.fx.Interpreter` over it whose node values are
:class:`~skuq.cvp.registry.Moments`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

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
        run = _Propagation(self, ctx, layer_scales or {}, record)
        return run.run(x if isinstance(x, Moments) else Moments(x))


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


class _Propagation(torch.fx.Interpreter):
    """One call of a :class:`MomentPropagator`: the traced graph interpreted with
    :class:`Moments` as values (one instance per call, so calls do not share state).

    Per node: a module call site goes to its rule (a structural module without a
    rule runs on deterministic inputs), then its output variance is scaled and
    recorded; an elementwise product of one random tensor is propagated as one
    elementwise map; a function or tensor method goes to its rule, or runs as is on
    deterministic inputs; a global average pool after a shared-weight layer gets the
    cross-position covariance of that layer's weight noise.
    """

    def __init__(
        self,
        prop: MomentPropagator,
        ctx: PropagationContext,
        scales: Mapping[str, Tensor | float],
        record: dict | None,
    ):
        # values stay in the environment: the products and the pooled corrections
        # read nodes upstream of their arguments
        super().__init__(prop.graph_module, garbage_collect_values=False)
        self.extra_traceback = False  # a rule's error reaches the caller as raised
        self.prop, self.ctx, self.scales, self.record = prop, ctx, scales, record
        self._node = None

    def run_node(self, n: torch.fx.Node):
        product = self.prop._products.get(n)
        if product is not None and is_random(self.env[product[0]]):
            out = self._elementwise_product(*product)
        else:
            self._node = n
            out = super().run_node(n)
        return self._pooled(n, out)

    # ------------------------------------------------------------------ ops
    def placeholder(self, target, args, kwargs):
        try:
            return next(self.args_iter)
        except StopIteration:  # an argument after the input: its default, else None
            return args[0] if args else None

    def get_attr(self, target, args, kwargs):
        obj = self.module
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, Tensor):
            obj = self.ctx.param(obj)
            if obj.var is not None and target in self.scales:
                obj = Moments(obj.mean, obj.var * self.scales[target])
            if obj.var is not None and self.record is not None:
                self.record[target] = obj
        return obj

    def output(self, target, args, kwargs):
        out = args[0]
        return out[0] if isinstance(out, (tuple, list)) else out

    def call_module(self, target, args, kwargs):
        module = self.module.get_submodule(target)
        rule = module_rule(type(module))
        if rule is None:  # structural module without parameters
            if any_random(args, kwargs):
                raise UnsupportedLayerError(
                    f"CVP has no propagation rule for layer {target!r} of "
                    f"type {type(module).__name__}. "
                    + how_to_register("module", type(module).__name__)
                )
            out = run_deterministic(module, args, kwargs)
        else:
            out = rule(self.ctx, module, *args, **kwargs)
        return MomentPropagator._scale_and_record(target, out, self.scales, self.record)

    def call_function(self, target, args, kwargs):
        rule = get_rule(target)
        if rule is not None:
            return rule(self.ctx, target, *args, **kwargs)
        if not any_random(args, kwargs):
            return run_deterministic(target, args, kwargs)
        what = f"function {getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"
        raise self._unsupported(what, "that_function")

    def call_method(self, target, args, kwargs):
        rule = method_rule(target)
        if rule is not None:
            return rule(self.ctx, target, *args, **kwargs)
        if not any_random(args, kwargs):
            obj, *rest = unwrap(args)
            return wrap(getattr(obj, target)(*rest, **unwrap(kwargs)))
        raise self._unsupported(f"tensor method .{target}()", repr(target))

    def _unsupported(self, what: str, key: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"CVP has no propagation rule for {what} (node {self._node.name!r})."
            " " + how_to_register("function", key)
        )

    # --------------------------------------------------- graph-level handling
    def _elementwise_product(self, root, g) -> Moments:
        """A product (or sum) of two elementwise functions of the random ``root``:
        SiLU's moments for ``x * sigmoid(x)`` (``g`` None), else quadrature of ``g``."""
        r = self.env[root]
        fn = (
            mom.silu_moments if g is None else (lambda m, v, _g=g: mom.quadrature_moments(_g, m, v))
        )
        return Moments(*mom._in_slices(fn, r.mean, r.var))

    def _pooled(self, n: torch.fx.Node, out):
        """Add the cross-position variance at a global average pool after a
        shared-weight layer (:mod:`skuq.cvp.pooled`)."""
        sites = self.prop._pooled.get(n)
        if not (sites and isinstance(out, Moments) and out.var is not None):
            return out
        var = out.var
        for site in sites:
            corr = pooled_correction(
                self.ctx,
                self.module,
                site,
                self.env,
                self.prop._products,
                self.scales.get(site.layer.target, 1.0),
            )
            if corr is not None:
                var = var + corr.reshape(var.shape).to(var.dtype)
        if var is not out.var:
            out = Moments(out.mean, var.clamp_min(0.0))
        return out
