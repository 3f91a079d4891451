"""A portable state for skops: tensors as numpy arrays, objects as (class, attributes).

``skops.io`` refuses torch tensors (it cannot rebuild a ``TensorBase``) and a
fitted skorch net keeps its module in ``torch.save`` bytes, which ``torch.load``
would unpickle on loading -- the arbitrary-code path skops exists to avoid. So a
skuq estimator hands skops (through ``__getstate__``) a tree made only of what
skops audits itself: numpy arrays, Python scalars and strings, lists, tuples,
slices, and references to classes and functions, which skops loads only when
the user trusts them by name.

The tree is built here:

* a tensor becomes a numpy array plus its dtype name, device and whether it is
  an ``nn.Parameter`` (bfloat16 and other dtypes numpy lacks travel as float32);
* tuples, dicts (also ``OrderedDict``, ``defaultdict``), sets, ``torch.Size``,
  ``torch.dtype`` and ``torch.device`` become tagged lists;
* any other object (an ``nn.Module``, an optimizer, a posterior) becomes a
  reference to its class and its ``__dict__``, rebuilt with ``cls.__new__`` and
  the attributes set, the way pickle and skops rebuild objects, without calling
  ``__init__``. A skorch net's callbacks and virtual parameters are not stored
  but re-initialized from its parameters on loading;
* a class may define ``_skuq_getstate`` / ``_skuq_setstate`` to store less and
  rebuild the rest (CVP's traced graph is re-traced from the model).

Objects and tensors are stored once and referred to by index, so shared
objects (a module seen from the skorch net and from the posterior) stay shared
after loading.
"""

from __future__ import annotations

import collections
import copyreg
import types
from typing import Any

import numpy as np
import torch

#: marks the top-level state a skuq estimator gives skops
PORTABLE_KEY = "__skuq_portable__"
_FORMAT = 1

_LEAVES = (type(None), bool, int, float, complex, str, bytes, slice, np.ndarray, np.generic)
_REFS = (type, types.FunctionType, types.BuiltinFunctionType)
_FACTORIES = {dict: "dict", list: "list", set: "set", int: "int", float: "float"}


def _skorch_net_type():
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a run-time dependency
        return None
    return NeuralNet


class _Encoder:
    def __init__(self):
        self.tensors: list[list] = []
        self.objects: list[list] = []
        self._memo: dict[int, tuple[str, int]] = {}
        self._keep: list = []  # keeps encoded objects alive, so their ids stay unique
        self._net_type = _skorch_net_type()

    def __call__(self, value: Any) -> Any:
        if isinstance(value, _LEAVES) or isinstance(value, _REFS):
            return value
        if isinstance(value, torch.Tensor):
            return ("T", self._tensor(value))
        if isinstance(value, torch.dtype):
            return ("dtype", str(value).removeprefix("torch."))
        if isinstance(value, torch.device):
            return ("device", str(value))
        if isinstance(value, torch.Size):
            return ("size", [int(s) for s in value])
        if type(value) is list:
            return [self(v) for v in value]
        if type(value) is tuple:
            return ("tuple", [self(v) for v in value])
        if type(value) in (set, frozenset):
            return (type(value).__name__, [self(v) for v in value])
        if type(value) in (dict, collections.OrderedDict, collections.defaultdict):
            factory = getattr(value, "default_factory", None)
            # builtin factories by name, so they need no trust in skops
            factory = _FACTORIES.get(factory, factory)
            return (
                type(value).__name__,
                [self(k) for k in value],
                [self(v) for v in value.values()],
                factory,
            )
        if isinstance(value, types.MethodType):
            raise TypeError(
                f"cannot save a bound method ({value!r}) in a skops-safe state; "
                "keep functions, not bound methods, in estimator attributes"
            )
        return ("O", self._object(value))

    def _tensor(self, t: torch.Tensor) -> int:
        key = id(t)
        if key in self._memo:
            return self._memo[key][1]
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"cannot save a tensor of type {type(t).__name__} with skops")
        # the memory layout too (eigh's eigenvectors are column-major, a weight.T is a
        # view): float32 kernels round differently for other strides, and predictions
        # must come back bit for bit. Stored contiguous in the order of the strides.
        strides = t.stride()
        perm = sorted(range(t.ndim), key=lambda d: -strides[d])
        data = t.detach().cpu().permute(perm).contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        try:
            array = data.numpy().copy()
        except TypeError:  # bfloat16 and friends: numpy has no such dtype
            array = data.float().numpy().copy()
        index = len(self.tensors)
        self._memo[key] = ("T", index)
        self._keep.append(t)
        self.tensors.append(
            [
                array,
                dtype,
                str(t.device),
                isinstance(t, torch.nn.Parameter),
                bool(t.requires_grad),
                perm,
            ]
        )
        return index

    def _object(self, obj: Any) -> int:
        key = id(obj)
        if key in self._memo:
            return self._memo[key][1]
        cls = type(obj)
        index = len(self.objects)
        self._memo[key] = ("O", index)
        self._keep.append(obj)
        entry: list = [cls, None, None]
        self.objects.append(entry)
        if hasattr(cls, "_skuq_getstate"):
            entry[1], entry[2] = "custom", self(obj._skuq_getstate())
            return index
        if self._net_type is not None and isinstance(obj, self._net_type):
            from skorch.history import History

            state = dict(vars(obj))
            # callbacks hold functions and printing sinks: rebuilt from the parameters
            for name in ("callbacks_", "virtual_params_"):
                state.pop(name, None)
            history = state.pop("history_", None)
            encoded = self(state)
            if isinstance(history, History):  # a list subclass: its entries, tagged
                encoded[1].append("history_")
                encoded[2].append(("history", self(list(history))))
            elif history is not None:
                encoded[1].append("history_")
                encoded[2].append(self(history))
            entry[1], entry[2] = "skorch", encoded
            return index
        if not hasattr(obj, "__dict__") or isinstance(obj, (list, dict, set, tuple)):
            raise TypeError(
                f"cannot save an object of type {cls.__module__}.{cls.__qualname__} in a "
                "skops-safe state (it has no attribute dict, or subclasses a container)"
            )
        entry[1], entry[2] = "dict", self(dict(vars(obj)))
        return index


class _Decoder:
    def __init__(self, tensors: list, objects: list):
        self._tensor_states = tensors
        self._object_states = objects
        self._tensors: dict[int, torch.Tensor] = {}
        self._objects: dict[int, Any] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, tuple):
            return value
        if not value or not isinstance(value[0], str):
            raise ValueError("malformed skuq state: an untagged tuple")
        tag = value[0]
        if tag == "tuple" and len(value) == 2:
            return tuple(self(v) for v in value[1])
        if tag == "T" and len(value) == 2:
            return self._tensor(value[1])
        if tag == "O" and len(value) == 2:
            return self._object(value[1])
        if tag == "dtype" and len(value) == 2:
            dtype = getattr(torch, value[1], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {value[1]!r} in the saved state")
            return dtype
        if tag == "device" and len(value) == 2:
            return torch.device(value[1])
        if tag == "size" and len(value) == 2:
            return torch.Size(value[1])
        if tag in ("set", "frozenset") and len(value) == 2:
            return {"set": set, "frozenset": frozenset}[tag](self(v) for v in value[1])
        if tag in ("dict", "OrderedDict", "defaultdict") and len(value) == 4:
            items = zip(self(value[1]), self(value[2]), strict=True)
            if tag == "defaultdict":
                factory = value[3]
                if isinstance(factory, str):
                    factory = {v: k for k, v in _FACTORIES.items()}[factory]
                return collections.defaultdict(factory, items)
            return dict(items) if tag == "dict" else collections.OrderedDict(items)
        if tag == "history" and len(value) == 2:
            from skorch.history import History

            return History(self(value[1]))
        raise ValueError(f"malformed skuq state: unknown tag {tag!r}")

    def _tensor(self, index: int) -> torch.Tensor:
        if index in self._tensors:
            return self._tensors[index]
        array, dtype_name, device, is_param, requires_grad, perm = self._tensor_states[index]
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {dtype_name!r} in the saved state")
        array = np.array(array, copy=True, order="C")
        if sorted(perm) != list(range(array.ndim)):
            raise ValueError("malformed skuq state: a tensor's layout is not a permutation")
        inverse = [0] * len(perm)
        for i, d in enumerate(perm):
            inverse[d] = i
        t = torch.from_numpy(array).permute(inverse).to(device=device, dtype=dtype)
        if is_param:
            t = torch.nn.Parameter(t, requires_grad=requires_grad)
        elif requires_grad:
            t.requires_grad_(True)
        self._tensors[index] = t
        return t

    def _object(self, index: int) -> Any:
        if index in self._objects:
            return self._objects[index]
        cls, how, state = self._object_states[index]
        if not isinstance(cls, type):
            raise TypeError(f"the saved state names {cls!r} where a class belongs")
        obj = cls.__new__(cls)
        self._objects[index] = obj  # before the attributes: cycles refer back to it
        if how == "custom":
            obj._skuq_setstate(self(state))
        elif how in ("dict", "skorch"):
            attrs = self(state)
            if not isinstance(attrs, dict):
                raise TypeError("the saved state of an object is not a dict of attributes")
            obj.__dict__.update(attrs)
            if how == "skorch":
                obj.initialize_virtual_params()
                if "module_" in attrs:  # an initialized net: its callbacks too
                    obj.initialize_callbacks()
        else:
            raise ValueError(f"unknown object kind {how!r} in the saved state")
        return obj


def to_portable(state: dict) -> dict:
    """An estimator's attribute dict as a tree skops can audit (see the module doc).

    Parameters
    ----------
    state : dict
        The estimator's ``__dict__`` (or what ``BaseEstimator.__getstate__`` gives).

    Returns
    -------
    dict
        ``{PORTABLE_KEY: format, "tree", "tensors", "objects"}``.

    Examples
    --------
    >>> import torch
    >>> from skuq._persist import from_portable, to_portable
    >>> layer = torch.nn.Linear(2, 1)
    >>> back = from_portable(to_portable({"m": layer, "again": layer}))
    >>> back["m"] is back["again"], torch.equal(back["m"].weight, layer.weight)
    (True, True)
    """
    encode = _Encoder()
    tree = encode(dict(state))
    return {
        PORTABLE_KEY: _FORMAT,
        "tree": tree,
        "tensors": encode.tensors,
        "objects": encode.objects,
    }


def from_portable(portable: dict) -> dict:
    """Invert :func:`to_portable`: the attribute dict, tensors and objects rebuilt.

    Parameters
    ----------
    portable : dict
        What :func:`to_portable` returned (after a skops round trip).

    Returns
    -------
    dict

    Examples
    --------
    >>> import torch
    >>> from skuq._persist import from_portable, to_portable
    >>> from_portable(to_portable({"t": torch.arange(3)}))["t"]
    tensor([0, 1, 2])
    """
    if portable.get(PORTABLE_KEY) != _FORMAT:
        raise ValueError(
            f"unknown skuq state format {portable.get(PORTABLE_KEY)!r}: saved by another "
            "skuq version; load it with that version"
        )
    decode = _Decoder(portable["tensors"], portable["objects"])
    state = decode(portable["tree"])
    if not isinstance(state, dict):
        raise TypeError("the saved estimator state is not a dict of attributes")
    return state


class PortableStateMixin:
    """``skops.io`` support for an estimator (mix in before ``BaseEstimator``).

    skops cannot rebuild torch tensors, and a fitted skorch net would carry its
    module as ``torch.save`` bytes: ``__getstate__`` hands skops numpy arrays,
    plain values and class references instead (:func:`to_portable`). Pickle,
    joblib and ``copy`` keep the plain attribute dict (``__reduce_ex__``).
    """

    def __getstate__(self):
        return to_portable(super().__getstate__())

    def __reduce_ex__(self, protocol):
        # pickle, joblib and copy.deepcopy: the plain state, as BaseEstimator gives it
        return copyreg.__newobj__, (type(self),), super().__getstate__()

    def __setstate__(self, state):
        if isinstance(state, dict) and PORTABLE_KEY in state:
            state = from_portable(state)
        super().__setstate__(state)
