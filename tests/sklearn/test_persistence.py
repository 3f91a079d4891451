"""Saving and loading: skops round trips for every estimator; pickle keeps working."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from skuq._persist import from_portable, to_portable
from skuq.base import UQClassifierMixin, all_estimators
from tests._helpers import EST_KWARGS, NET_KWARGS, make_classifier_net, make_regressor_net

sio = pytest.importorskip("skops.io")

#: where every type a saved skuq estimator asks the user to trust comes from (with
#: the network's own classes: here skuq.nets.MLP and torch.nn layers)
TRUSTED_PREFIXES = ("skuq.", "skorch.", "torch.nn.", "torch.optim.", "torch.utils.data.")


def _make(name, cls):
    clf = issubclass(cls, UQClassifierMixin)
    make_net = make_classifier_net if clf else make_regressor_net
    net = make_net(max_epochs=2, **NET_KWARGS.get(name, {}))
    return cls(net, random_state=0, **EST_KWARGS.get(name, {})), clf


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(60, 5, n_informative=3, random_state=0)
    return X.astype(np.float32), y


def _outputs(est, X, clf):
    out = [est.predict_proba(X) if clf else np.stack(est.predict(X, return_std=True))]
    out.append(est.predict_uncertainty(X))
    return out


def _params_repr(obj) -> str:
    """``repr`` of ``get_params(deep=False)``, set values sorted: a set's order follows
    the process's string hashing, which differs between the dumping and loading run."""
    params = obj.get_params(deep=False)
    return repr({k: sorted(v) if isinstance(v, set) else v for k, v in params.items()})


@pytest.mark.parametrize("name, cls", all_estimators())
def test_skops_round_trip_gives_identical_predictions(name, cls, data, tmp_path):
    X, y = data
    est, clf = _make(name, cls)
    target = y if clf else y.astype(np.float32)

    # unfitted: the loaded copy has the same parameters and fits like the original
    sio.dump(est, tmp_path / "unfitted.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "unfitted.skops")
    loaded = sio.load(tmp_path / "unfitted.skops", trusted=untrusted)
    assert type(loaded) is cls
    assert _params_repr(loaded) == _params_repr(est)
    assert _params_repr(loaded.estimator) == _params_repr(est.estimator)

    est.fit(X, target)
    sio.dump(est, tmp_path / "fitted.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "fitted.skops")
    assert all(t.startswith(TRUSTED_PREFIXES) for t in untrusted), untrusted
    with pytest.raises(Exception, match="[Uu]ntrusted"):  # nothing loads unless trusted
        sio.load(tmp_path / "fitted.skops")
    loaded = sio.load(tmp_path / "fitted.skops", trusted=untrusted)
    for a, b in zip(_outputs(est, X, clf), _outputs(loaded, X, clf), strict=True):
        np.testing.assert_array_equal(a, b)
    if clf:
        np.testing.assert_array_equal(loaded.classes_, est.classes_)
    # the loaded skorch nets are whole: same weights, history, a working optimizer
    nets = est.net_ if isinstance(est.net_, list) else [est.net_]
    loaded_nets = loaded.net_ if isinstance(loaded.net_, list) else [loaded.net_]
    for net, other in zip(nets, loaded_nets, strict=True):
        for (k, p), (k2, p2) in zip(
            net.module_.named_parameters(), other.module_.named_parameters(), strict=True
        ):
            assert k == k2 and torch.equal(p, p2)
        assert other.history.to_list() == net.history.to_list()
        assert [n for n, _ in other.callbacks_] == [n for n, _ in net.callbacks_]


def test_pickle_and_deepcopy_keep_the_plain_state(data):
    X, y = data
    est, _ = _make("LaplaceClassifier", dict(all_estimators())["LaplaceClassifier"])
    est.fit(X, y)
    for other in (pickle.loads(pickle.dumps(est)), copy.deepcopy(est)):
        np.testing.assert_array_equal(other.predict_proba(X), est.predict_proba(X))
        # the plain state, not the skops one: the posterior is the same class, tensors intact
        assert type(other.posterior_) is type(est.posterior_)


def test_portable_state_keeps_sharing_dtypes_and_parameters():
    lin = torch.nn.Linear(3, 2)
    half = torch.arange(4, dtype=torch.bfloat16)
    state = {
        "a": lin,
        "b": [lin, (lin.weight, torch.Size([2, 3]))],
        "dtype": torch.float64,
        "h": half,
        "nested": {1: {"x"}, "k": (None, 2.5)},
    }
    back = from_portable(
        sio.loads(sio.dumps(to_portable(state)), trusted=["torch.nn.modules.linear.Linear"])
    )
    assert back["a"] is back["b"][0]
    assert back["b"][1][0] is back["a"].weight  # the same Parameter object, not a copy
    assert isinstance(back["a"].weight, torch.nn.Parameter) and back["a"].weight.requires_grad
    assert back["b"][1][1] == torch.Size([2, 3]) and back["dtype"] is torch.float64
    assert back["h"].dtype == torch.bfloat16 and torch.equal(back["h"], half)
    cols = torch.randn(4, 3).T  # a column-major view keeps its strides
    again = from_portable(sio.loads(sio.dumps(to_portable({"c": cols})), trusted=[]))["c"]
    assert again.stride() == cols.stride() and torch.equal(again, cols)
    assert back["nested"] == {1: {"x"}, "k": (None, 2.5)}
    x = torch.randn(4, 3)
    torch.testing.assert_close(back["a"](x), lin(x), rtol=0, atol=0)


def test_portable_state_refuses_what_it_cannot_audit():
    class Slotted:
        __slots__ = ("x",)

    with pytest.raises(TypeError, match="cannot save"):
        to_portable({"s": Slotted()})
    with pytest.raises(ValueError, match="unknown skuq state format"):
        from_portable({"__skuq_portable__": 99})


def test_skops_round_trip_of_a_module_and_a_frozen_net(data):
    from sklearn.frozen import FrozenEstimator

    from skuq import CVPClassifier, LaplaceClassifier

    X, y = data
    module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    net = make_classifier_net(max_epochs=2).fit(X, y)
    for est in (
        LaplaceClassifier(module, device="cpu", random_state=0),
        CVPClassifier(FrozenEstimator(net), device="cpu", random_state=0),
    ):
        est.fit(X, y)
        blob = sio.dumps(est)
        loaded = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
        np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))
        if isinstance(est.estimator, torch.nn.Module):  # the wrapped module is the one used
            assert loaded.model_ is loaded.estimator


def test_skops_round_trip_of_regvars_exact_mode_from_the_hessian(data):
    """The default RegVarRegressor keeps the Hessian's eigenbasis (a posterior) instead of
    fine-tuned nets: it travels through skops and predicts the same."""
    from skuq import RegVarRegressor

    X, y = data
    module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    est = RegVarRegressor(module, device="cpu", random_state=0).fit(X, y.astype(np.float32))
    assert est.exact_solver_ == "hessian" and est.posterior_ is not None
    blob = sio.dumps(est)
    loaded = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
    mean, std = est.predict(X, return_std=True)
    loaded_mean, loaded_std = loaded.predict(X, return_std=True)
    np.testing.assert_array_equal(loaded_mean, mean)
    np.testing.assert_array_equal(loaded_std, std)
