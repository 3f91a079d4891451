"""CVP's graph side: torch.fx tracing with rule-bearing modules as leaves, the graph
rewrites and pattern finders that run before propagation, and the graph inspection
the propagator needs (supported layers, calibratable layers, correlated products).

* ``log(softmax(x))`` (also with a ``clamp_min(eps)`` in between) is fused into one
  ``log_softmax`` (:func:`fuse_log_softmax`);
* a product or sum of two elementwise functions of one tensor (``x * sigmoid(x)``)
  is found as one elementwise map of that tensor (:func:`elementwise_product`).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import UnsupportedLayerError, how_to_register, module_rule

# internal to the propagator and the pooled sites: no public names
__all__: list[str] = []


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps every module with a registered rule as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_rule(type(m)) is not None:
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
    if module_rule(type(model)) is not None:
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
def is_call(node, fns=(), methods=()) -> bool:
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
    if not is_call(node, (F.softmax, torch.softmax), ("softmax",)):
        return None
    if node.kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in node.args):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return (node.args[0], dim) if isinstance(dim, int) else None


def _clamp_floor(node):
    """``(input, eps)`` when ``node`` is ``clamp_min(input, eps)`` (or ``clamp(min=eps)``)
    with a positive number ``eps`` and no upper bound."""
    if is_call(node, (torch.clamp_min,), ("clamp_min",)):
        eps = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    elif is_call(node, (torch.clamp, torch.clip), ("clamp", "clip")):
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
        if not is_call(node, (torch.log,), ("log",)) or len(node.args) != 1 or node.kwargs:
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
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    torch.relu,
    F.relu,
    F.gelu,
    F.silu,
    F.softplus,
    F.elu,
    F.leaky_relu,
    F.mish,
    torch.exp,
    torch.erf,
    torch.neg,
    operator.neg,
    torch.abs,
    torch.sin,
    torch.cos,
    torch.square,
}
_UNARY_METHODS = {"sigmoid", "tanh", "relu", "exp", "erf", "neg", "abs", "sin", "cos", "square"}
_UNARY_MODULES = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.LeakyReLU,
    nn.Mish,
    nn.Identity,
)
_ARITH_FNS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
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


def unary_parent(gm: torch.fx.GraphModule, node):
    """The one tensor an elementwise node is a function of, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    flat = _flat_args(node)
    nodes = [a for a in flat if isinstance(a, torch.fx.Node)]
    if len(nodes) != 1:
        return None
    plain = all(
        isinstance(a, (int, float, bool, str, type(None)))
        for a in flat
        if not isinstance(a, torch.fx.Node)
    )
    if not plain:
        return None
    if node.op == "call_module":
        ok = isinstance(gm.get_submodule(node.target), _UNARY_MODULES)
    elif is_call(node, _UNARY_FNS, _UNARY_METHODS):
        ok = node.args and node.args[0] is nodes[0]
    else:
        ok = is_call(node, _ARITH_FNS, _ARITH_METHODS)
    return nodes[0] if ok else None


def _is_sigmoid(gm: torch.fx.GraphModule, node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.Sigmoid
    return is_call(node, (torch.sigmoid, F.sigmoid), ("sigmoid",))


def eval_chain(gm: torch.fx.GraphModule, chain: list, root, t: Tensor) -> Tensor:
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


def elementwise_product(gm: torch.fx.GraphModule, node):
    """For ``a * b`` (or ``a + b``, ``a - b``) with both operands elementwise
    functions of one tensor ``r`` (``x * torch.sigmoid(x)``): ``(r, g)`` with
    ``a * b = g(r)``; else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    if is_call(node, _MUL_FNS, _MUL_METHODS):
        node_fn = operator.mul
    elif is_call(node, _SUM_FNS, _SUM_METHODS):
        name = node.target if isinstance(node.target, str) else node.target.__name__
        node_fn = operator.sub if "sub" in name else operator.add
    else:
        return None
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
        return None

    def lineage(n):
        out = [n]
        while (p := unary_parent(gm, out[-1])) is not None:
            out.append(p)
        return out

    la, lb = lineage(a), lineage(b)
    common = next((n for n in la if n in lb), None)
    if common is None:
        return None
    chain_a = la[: la.index(common)][::-1]
    chain_b = lb[: lb.index(common)][::-1]
    if (
        node_fn is operator.mul
        and sorted(map(len, (chain_a, chain_b))) == [0, 1]
        and _is_sigmoid(gm, (chain_a + chain_b)[0])
    ):
        return common, None  # x * sigmoid(x) is SiLU: its dedicated moments

    def g(t):
        return node_fn(eval_chain(gm, chain_a, common, t), eval_chain(gm, chain_b, common, t))

    return common, g


# -------------------------------------------------------------------- inspection
def check_supported(gm: torch.fx.GraphModule, random: set[str]) -> None:
    """Refuse a module call site without a rule that owns a parameter named in ``random``
    (qualified names in ``gm``)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            own = {f"{node.target}.{n}" for n, _ in mod.named_parameters()}
            if module_rule(type(mod)) is None and own & random:
                name = type(mod).__name__
                raise UnsupportedLayerError(
                    f"CVP has no propagation rule for layer {node.target!r} of type "
                    f"{name}. " + how_to_register("module", name)
                )


def random_layers(gm: torch.fx.GraphModule, random: set[str]) -> list[str]:
    """Module call sites that own a parameter named in ``random``, and the parameters
    of ``random`` that the forward reads directly, in graph order."""
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


def correlated_products(
    gm: torch.fx.GraphModule, random: set[str], layers: set[str], products: dict, input_random: bool
) -> list:
    """Products and matmuls propagated as independent whose factors share a random
    ancestor (an input with variance, a layer or parameter with variance):
    ``[(node name, sorted shared ancestors), ...]``. ``products``: the nodes propagated
    as one elementwise map (:func:`elementwise_product`), which are not reported."""
    sources: dict = {}
    first_input = True
    found = []
    for node in gm.graph.nodes:
        own: set = set()
        if not is_call(node, (getattr,), _META_METHODS):  # shapes are not random
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
        if node in products or len(node.args) != 2:
            continue
        if not (
            is_call(node, _MUL_FNS, _MUL_METHODS) or is_call(node, _MATMUL_FNS, _MATMUL_METHODS)
        ):
            continue
        a, b = node.args
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a is not b:
            shared = sources[a] & sources[b]
            if shared:
                found.append((node.name, sorted(shared)))
    return found
