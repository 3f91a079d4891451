"""The curvature engine against brute force: full Jacobians, explicit Lambda, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skuq.curvature import (
    compute_curvature,
    ggn_matmul,
    jacobians,
    select_subnetwork,
    select_weights,
)
from tests._helpers import _cnn, _data, _mlp, batches, brute_ggn, brute_jacobian


@pytest.fixture(autouse=True)
def _float64():
    """Brute force in float64; the default dtype is restored for the rest of the suite."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def brute_ef(model, x, y):
    rows = []
    for n in range(len(x)):
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        g = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return G.T @ G


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_jacobians_match_brute_force(make):
    model = make()
    x, _ = _data(model)
    J, f = jacobians(select_weights(model), x)
    torch.testing.assert_close(J, brute_jacobian(model, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, model(x).detach())


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("route", ["layers", "jacobians"])
def test_diag_ggn_equals_brute_force(make, route):
    model = make()
    x, y = _data(model)
    H = brute_ggn(model, x)
    curv = compute_curvature(select_weights(model), batches(x, y), structure="diag", route=route)
    torch.testing.assert_close(curv.diag, torch.diagonal(H), rtol=1e-10, atol=1e-13)
    assert curv.n_data == len(x)
    assert curv.loss == pytest.approx(float(F.cross_entropy(model(x).detach(), y, reduction="sum")))


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_full_ggn_and_ef_equal_brute_force(make):
    model = make()
    x, y = _data(model)
    w = select_weights(model)
    full = compute_curvature(w, batches(x, y), structure="full").full
    torch.testing.assert_close(full, brute_ggn(model, x), rtol=1e-10, atol=1e-13)
    ef = compute_curvature(w, batches(x, y), structure="full", curvature="ef").full
    torch.testing.assert_close(ef, brute_ef(model, x, y), rtol=1e-10, atol=1e-13)
    ef_diag = compute_curvature(w, batches(x, y), structure="diag", curvature="ef").diag
    torch.testing.assert_close(
        ef_diag, torch.diagonal(brute_ef(model, x, y)), rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_full_by_layer_hooks_equals_jacobian_route(make, curvature):
    """The dense block from per-sample layer gradients (row chunks) equals the Jacobian route."""
    model = make()
    x, y = _data(model)
    w = select_weights(model)
    hooks = compute_curvature(
        w,
        batches(x, y),
        structure="full",
        curvature=curvature,
        route="layers",
        max_elements=3 * w.n_params,
    )  # 3-row chunks
    jac = compute_curvature(
        w, batches(x, y), structure="full", curvature=curvature, route="jacobians"
    )
    torch.testing.assert_close(hooks.full, jac.full, rtol=1e-10, atol=1e-13)
    assert hooks.loss == pytest.approx(jac.loss) and hooks.n_data == jac.n_data


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer_without_backward_passes_equals_brute_force(likelihood, monkeypatch):
    """A last Linear layer's curvature straight from Lambda's square root: no autograd."""
    model = _mlp()
    x, y = _data(model)
    if likelihood == "regression":
        y = torch.randn(len(x), 3)
    J = brute_jacobian(model, x)[:, :, -18:]
    with torch.no_grad():
        f = model(x)
    lam = (
        torch.diag_embed(torch.softmax(f, -1))
        - torch.einsum("nc,nd->ncd", torch.softmax(f, -1), torch.softmax(f, -1))
        if likelihood == "classification"
        else torch.eye(3).expand(len(x), 3, 3)
    )
    H = torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    last = select_weights(model, "last_layer", example_input=x)

    def no_backward(*args, **kwargs):
        raise AssertionError("no backward pass expected for a last Linear layer")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    full = compute_curvature(last, batches(x, y), likelihood=likelihood, structure="full")
    torch.testing.assert_close(full.full, H, rtol=1e-10, atol=1e-13)
    diag = compute_curvature(last, batches(x, y), likelihood=likelihood, structure="diag")
    torch.testing.assert_close(diag.diag, torch.diagonal(H), rtol=1e-10, atol=1e-13)
    kron = compute_curvature(last, batches(x, y), likelihood=likelihood, structure="kron").kron
    phi = model[:4](x).detach()
    torch.testing.assert_close(kron[0].factors[0], lam.sum(0), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(kron[0].factors[1], phi.T @ phi / len(x), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(kron[1].factors[0], lam.sum(0), rtol=1e-10, atol=1e-13)
    assert full.loss == pytest.approx(diag.loss)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_last_layer_dense_block_from_features_equals_jacobian_route(bias, curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    last = select_weights(model, "last_layer", example_input=x)
    for structure in ("full", "diag"):
        ours = compute_curvature(
            last, batches(x, y, size=4), structure=structure, curvature=curvature, max_elements=100
        )  # chunks of rows
        jac = compute_curvature(
            last, batches(x, y, size=4), structure=structure, curvature=curvature, route="jacobians"
        )
        torch.testing.assert_close(ours.dense(), jac.dense(), rtol=1e-10, atol=1e-13)


class _Twice(nn.Module):
    """The same Linear layer called twice per forward pass (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_shared_layer_falls_back_to_jacobians():
    torch.manual_seed(0)
    model = _Twice()
    x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    H = brute_ggn(model, x)
    w = select_weights(model)

    def one_shot():  # a generator: the first batch must not be lost by the fallback
        yield from batches(x, y)

    full = compute_curvature(w, one_shot(), structure="full")
    torch.testing.assert_close(full.full, H, rtol=1e-10, atol=1e-13)
    assert full.n_data == 7
    diag = compute_curvature(w, one_shot(), structure="diag")
    torch.testing.assert_close(diag.diag, torch.diagonal(H), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="called 2 times per forward pass"):
        compute_curvature(w, one_shot(), structure="kron")
    with pytest.raises(ValueError, match="called 2 times per forward pass"):
        compute_curvature(w, one_shot(), structure="full", route="layers")


def test_regression_ggn_is_jt_j():
    model = _mlp()
    x, _ = _data(model)
    y = torch.randn(len(x), 3)
    w = select_weights(model)
    J = brute_jacobian(model, x)
    expected = torch.einsum("ncp,ncq->pq", J, J)
    curv = compute_curvature(w, batches(x, y), likelihood="regression", structure="full")
    torch.testing.assert_close(curv.full, expected, rtol=1e-10, atol=1e-13)
    assert curv.loss == pytest.approx(float(0.5 * ((model(x) - y) ** 2).sum()))
    diag = compute_curvature(w, batches(x, y), likelihood="regression", structure="diag")
    torch.testing.assert_close(diag.diag, torch.diagonal(expected), rtol=1e-10, atol=1e-13)


def _layer_io_by_hand(model, x, layer_index):
    """Inputs a_n to layer ``layer_index`` and d f / d s (its outputs), by hand."""
    head = model[:layer_index]
    layer, tail = model[layer_index], model[layer_index + 1 :]
    with torch.no_grad():
        a = head(x)
    jac = []
    for n in range(len(x)):
        s = layer(a[n : n + 1]).detach()
        jac.append(torch.autograd.functional.jacobian(lambda t: tail(t)[0], s)[:, 0])
    return a, jac, model(x).detach()


def test_kron_factors_equal_hand_computed_linear():
    model = _mlp()
    x, y = _data(model)
    curv = compute_curvature(select_weights(model), batches(x, y), structure="kron")
    blocks = curv.kron
    assert len(blocks) == 6  # weight and bias of three layers, separately
    for k, layer_index in enumerate([0, 2, 4]):
        a, dfds, f = _layer_io_by_hand(model, x, layer_index)
        A = a.T @ a / len(x)
        G = 0
        for n in range(len(x)):
            p = torch.softmax(f[n], 0)
            lam = torch.diag(p) - torch.outer(p, p)
            G = G + dfds[n].T @ lam @ dfds[n]
        wblock, bblock = blocks[2 * k], blocks[2 * k + 1]
        torch.testing.assert_close(wblock.factors[0], G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(wblock.factors[1], A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(bblock.factors[0], G, rtol=1e-10, atol=1e-13)
    # the bias blocks are exact GGN blocks
    H = brute_ggn(model, x)
    for b in blocks[1::2]:
        torch.testing.assert_close(b.dense(), H[b.index, b.index], rtol=1e-10, atol=1e-13)


def test_kron_is_exact_for_one_sample_linear_layer():
    model = _mlp()
    x, y = _data(model, n=1)
    curv = compute_curvature(select_weights(model), [(x, y)], structure="kron")
    H = brute_ggn(model, x)
    for b in curv.kron:
        torch.testing.assert_close(b.dense(), H[b.index, b.index], rtol=1e-10, atol=1e-13)


def test_kron_factors_equal_hand_computed_conv():
    model = _cnn()
    x, y = _data(model)
    curv = compute_curvature(select_weights(model), batches(x, y), structure="kron")
    conv = model[0]
    # patches by explicit loops: 3x3 windows of the zero-padded input, stride 1
    xp = F.pad(x, (1, 1, 1, 1))
    patches = [
        xp[n, :, i : i + 3, j : j + 3].reshape(-1)
        for n in range(len(x))
        for i in range(4)
        for j in range(4)
    ]
    P = torch.stack(patches)
    A = P.T @ P / len(P)  # 1 / (N T) sum over positions and rows
    # G: sum over rows, positions and classes of output gradients after Lambda
    f = model(x).detach()
    G = 0
    for n in range(len(x)):
        s = conv(x[n : n + 1]).detach()
        jac = torch.autograd.functional.jacobian(lambda t: model[1:](t)[0], s)[:, 0]  # C,o,h,w
        jac = jac.reshape(3, 3, 16)  # classes, channels, positions
        p = torch.softmax(f[n], 0)
        lam = torch.diag(p) - torch.outer(p, p)
        for t in range(16):
            G = G + jac[:, :, t].T @ lam @ jac[:, :, t]
    wblock = curv.kron[0]
    torch.testing.assert_close(wblock.factors[1], A, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(wblock.factors[0], G, rtol=1e-10, atol=1e-13)


def test_lowrank_recovers_top_eigenpairs():
    model = _mlp()
    x, y = _data(model, n=12)
    w = select_weights(model)
    H = brute_ggn(model, x)
    V = torch.randn(w.n_params, 4)
    torch.testing.assert_close(ggn_matmul(w, batches(x, y), V), H @ V, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    curv = compute_curvature(w, batches(x, y), structure="lowrank", rank=w.n_params, generator=gen)
    torch.testing.assert_close(curv.dense(), H, rtol=1e-8, atol=1e-9)
    top = torch.linalg.eigvalsh(H).flip(0)[:5]
    curv5 = compute_curvature(w, batches(x, y), structure="lowrank", rank=5, generator=gen)
    torch.testing.assert_close(curv5.eigvals, top, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowrank_with_a_cuda_generator():
    """The estimators make their generator on the model's device: a CUDA one there."""
    model = _mlp().cuda()
    x, y = _data(model, n=12)
    x, y = x.cuda(), y.cuda()
    w = select_weights(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    curv = compute_curvature(w, batches(x, y), structure="lowrank", rank=w.n_params, generator=gen)
    assert curv.eigvecs.device.type == "cuda"
    torch.testing.assert_close(
        curv.dense().cpu(), brute_ggn(model.cpu(), x.cpu()), rtol=1e-8, atol=1e-9
    )


def test_last_layer_and_subnetwork_subsets_are_submatrices():
    model = _mlp()
    x, y = _data(model)
    H = brute_ggn(model, x)
    P = H.shape[0]
    last = select_weights(model, "last_layer", example_input=x)
    assert last.names == ["4.weight", "4.bias"]
    full = compute_curvature(last, batches(x, y), structure="full").full
    torch.testing.assert_close(full, H[P - 18 :, P - 18 :], rtol=1e-10, atol=1e-13)
    idx = [0, 5, 30, 31, P - 1]
    sub = select_weights(model, "subnetwork", subnetwork_indices=idx)
    full = compute_curvature(sub, batches(x, y), structure="full").full
    torch.testing.assert_close(full, H[idx][:, idx], rtol=1e-10, atol=1e-13)
    diag = compute_curvature(sub, batches(x, y), structure="diag").diag
    torch.testing.assert_close(diag, torch.diagonal(H)[idx], rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ bad input
def test_kron_refuses_other_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="supports Linear and Conv2d layers only.*LayerNorm"):
        compute_curvature(select_weights(model), [(x, y)], structure="kron")
    # diag and full handle any layer through Jacobians
    H = brute_ggn(model, x)
    d = compute_curvature(select_weights(model), [(x, y)], structure="diag").diag
    torch.testing.assert_close(d, torch.diagonal(H), rtol=1e-10, atol=1e-13)


def test_subset_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="selects no parameters"):
        select_subnetwork(model, [])
    with pytest.raises(ValueError, match=r"must lie in \[0, 83\)"):
        select_subnetwork(model, [0, 83])
    with pytest.raises(ValueError, match="repeated"):
        select_subnetwork(model, [1, 1])
    with pytest.raises(ValueError, match="subset_of_weights must be one of"):
        select_weights(model, "first_layer")
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_weights(frozen)


def test_non_finite_curvature_is_refused():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    x, y = _data(model)
    for structure in ("diag", "full", "kron"):
        with pytest.raises(FloatingPointError, match="contains NaN or inf"):
            compute_curvature(select_weights(model), [(x, y)], structure=structure)


def test_full_refuses_huge_subset():
    """2M weights: a 2M x 2M curvature and its factor (32 TB) fit no machine; refused
    before the data is read."""
    model = nn.Linear(2000, 1000)

    def batches():
        raise AssertionError("the data was read before the memory check")
        yield

    with pytest.raises(MemoryError, match="GiB are available"):
        compute_curvature(select_weights(model), batches(), structure="full")


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("route", ["layers", "jacobians"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_dense_curvature_of_few_rows_comes_with_its_spectrum(make, route, curvature):
    """Fewer gradient rows than a quarter of the weights: the eigenvalues of H = R^T R
    come from the Gram matrix R R^T, and equal H's own (zeros past its rank)."""
    model = make()
    x, y = _data(model, n=5)
    w = select_weights(model)
    assert 5 * 3 <= w.n_params // 4  # the GGN's rows: 3 output factors per row
    c = compute_curvature(
        w,
        batches(x, y),
        structure="full",
        curvature=curvature,
        route=route,
        max_elements=40 * w.n_params,
    )
    assert c.spectrum is not None and c.spectrum.shape == (w.n_params,)
    exact = torch.linalg.eigvalsh(c.full).clamp_min(0)
    torch.testing.assert_close(c.spectrum, exact, rtol=0, atol=1e-12 * float(exact.max()))


def test_dense_curvature_of_many_rows_leaves_the_spectrum_to_the_posterior():
    model = _mlp()
    x, y = _data(model, n=40)  # 120 GGN rows, more than a quarter of the 83 weights
    c = compute_curvature(select_weights(model), batches(x, y), structure="full")
    assert c.spectrum is None
