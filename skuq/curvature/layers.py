"""The layer structure of a weight subset: which Linear/Conv2d layers own it, and their I/O.

The layer route of :func:`~skuq.curvature.compute_curvature` and the layer
predictives of :mod:`skuq.predictive` read a subset through its layers: the
plan (each layer with the slices of its weight and bias in the flat vector),
the layers' per-sample inputs and output gradients, recorded by forward hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import WeightSubset

__all__ = ["layer_plan", "unfold"]

HOOKABLE = (nn.Linear, nn.Conv2d)


def layer_plan(weights: WeightSubset) -> list[tuple[nn.Module, dict[str, slice]]] | str:
    """Modules owning the subset's tensors, or a message why the hook route cannot be used.

    Parameters
    ----------
    weights : WeightSubset
        Which weights (see :func:`~skuq.curvature.select_weights`).

    Returns
    -------
    list of (nn.Module, dict) or str
        Each Linear/Conv2d layer with the slices of its ``"weight"`` and
        ``"bias"`` in the flat vector, in the subset's order; or, when a
        tensor belongs to another kind of layer (or the subset is an index
        set), a message saying why.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import layer_plan, select_weights
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> [(type(m).__name__, sorted(s)) for m, s in layer_plan(select_weights(net))]
    [('Linear', ['bias', 'weight']), ('Linear', ['bias', 'weight'])]
    """
    if weights.indices is not None:
        return "a subnetwork (an index set) has no layer structure"
    modules = dict(weights.model.named_modules())
    plan: dict[str, dict[str, slice]] = {}
    for name, index in weights.segments():
        owner, _, attr = name.rpartition(".")
        mod = modules[owner]
        if not isinstance(mod, HOOKABLE) or attr not in ("weight", "bias"):
            return f"parameter {name!r} belongs to a {type(mod).__name__}"
        if isinstance(mod, nn.Conv2d) and (
            mod.groups != 1
            or mod.padding_mode != "zeros"
            or isinstance(mod.padding, str)
            and mod.padding != "valid"
        ):
            return f"Conv2d {owner!r} uses groups, a non-zero padding mode or string padding"
        plan.setdefault(owner, {})[attr] = index
    return [(modules[n], slices) for n, slices in plan.items()]


def unfold(mod: nn.Conv2d, a: Tensor) -> Tensor:
    """Input patches of a convolution, (B, C_in * kh * kw, T).

    ``T`` is the number of output positions; the convolution's output is the
    weight matrix times these patches.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import unfold
    >>> conv = torch.nn.Conv2d(2, 3, kernel_size=3)
    >>> unfold(conv, torch.randn(5, 2, 6, 6)).shape
    torch.Size([5, 18, 16])
    """
    padding = 0 if mod.padding == "valid" else mod.padding
    return F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)


def layer_io(
    mod: nn.Module, a: Tensor, g: Tensor, patches: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample inputs (B, T, I) and output gradients (B, T, O) of a layer.

    ``patches``: a convolution's unfolded inputs from an earlier call, reused.
    """
    if isinstance(mod, nn.Conv2d):
        if patches is None:
            patches = unfold(mod, a).transpose(1, 2)
        return patches, g.flatten(2).transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])


class Recorder:
    def __init__(self, modules: list[nn.Module]):
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
        self.outputs: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, mod, inp, out):
        self.inputs[mod].append(inp[0].detach())
        self.outputs[mod].append(out)

    def remove(self):
        for h in self.handles:
            h.remove()


class LayerRouteUnavailable(ValueError):
    """The layer route does not apply to this net (found on the first batch, before any work)."""


def record_forward(model, modules, x, grad: bool):
    """``model(x)`` with the inputs and outputs of ``modules`` recorded."""
    rec = Recorder(modules)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            f = model(x)
    finally:
        rec.remove()
    return f, rec
