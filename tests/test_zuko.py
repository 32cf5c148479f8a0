"""geofunc spaces as zuko flow layers (``geofunc.contrib.zuko``), against torch.linalg and zuko itself.

Float64 throughout (float32 where a test changes dtypes). Checked: the log-determinant against
``slogdet`` of the formed matrix, the inverse (by the factorization) against ``torch.linalg.solve``
and as a round trip, agreement with zuko's own ``RotationTransform`` and ``LULinearTransform`` on
the same matrix, a composed zuko flow's ``log_prob`` against the change-of-variables formula
written by hand, gradients against a reference written with ``slogdet`` and against finite
differences, and ``rebase_`` keeping the layer. The log-determinant of a batch of matrices acting
on broadcast inputs against ``slogdet`` of the map's Jacobian (``jacrev``), and ``SpaceLinear``
keeping its matrix across ``.float()``/``.double()`` and a ``load_state_dict`` of another dtype
(it moved by the difference of the softplus floors).
"""

from __future__ import annotations

import copy
import doctest
import io
import itertools

import pytest
import torch

import geofunc as gf

zuko = pytest.importorskip("zuko", reason="the flow adapter needs zuko (pip install -e .[flows])")
from geofunc.contrib import zuko as gz  # noqa: E402  (after the importorskip)
from helpers import collect_all_garbage

F64 = torch.float64
ATOL = {torch.float64: 1e-10, torch.float32: 2e-4}

SQUARE_SPACES = {
    "SO": gf.SO(),
    "SO-cayley": gf.SO(triv="cayley"),
    "Stiefel": gf.Stiefel(),
    "GLp": gf.GLp(),
    "FixedRank": gf.FixedRank(rank=5),
    "AlmostOrthogonal": gf.AlmostOrthogonal(lam=0.5),
    "PSD": gf.PSD(),
    "PSSD": gf.PSSD(),
    "PSSDFixedRank": gf.PSSDFixedRank(rank=5),
    "SL": gf.SL(),
    "LowRank": gf.LowRank(rank=5),
    "PSSDLowRank": gf.PSSDLowRank(rank=5),
}
KIND = {"SO": "orthogonal", "SO-cayley": "orthogonal", "Stiefel": "orthogonal", "GLp": "svd", "FixedRank": "svd",
        "AlmostOrthogonal": "svd", "PSD": "eig", "PSSD": "eig", "PSSDFixedRank": "eig", "SL": "svd", "LowRank": "svd",
        "PSSDLowRank": "eig"}
N = 5


def _point_and_raw(space, generator, batch=()):
    """Raw coordinates of a random point, moved off the chart centre, with their base."""
    X = space.sample(batch + (N, N), generator=generator, dtype=F64)
    Z, base = space.from_manifold(X)
    return Z + 0.3 * torch.randn(Z.shape, generator=generator, dtype=F64), base


@pytest.mark.parametrize("name", SQUARE_SPACES)
def test_logdet_and_inverse_by_the_factorization(name, generator):
    space = SQUARE_SPACES[name]
    Z, base = _point_and_raw(space, generator)
    t = gz.LinearTransform(space, Z, base)
    W = space.to_manifold(Z, base)
    x = torch.randn(7, N, generator=generator, dtype=F64)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, x @ W.mT, atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(W)[1].expand(7), atol=ATOL[F64], rtol=0)
    assert t._factors()[0] == KIND[name]  # the inverse reads the factorization, not an LU of W
    x_back = t.inv(y)
    torch.testing.assert_close(x_back, torch.linalg.solve(W, y.mT).mT, atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(x_back, x, atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(t.inv.log_abs_det_jacobian(y, x), -ladj, atol=ATOL[F64], rtol=0)


def test_batched_matrices(generator):
    """A batch of matrices (``(B, n, n)``, e.g. from a context) acts on a batch of vectors."""
    space = gf.GLp()
    Z, base = _point_and_raw(space, generator, batch=(3,))
    t = gz.LinearTransform(space, Z, base)
    W = space.to_manifold(Z, base)
    x = torch.randn(3, N, generator=generator, dtype=F64)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, torch.einsum("bij,bj->bi", W, x), atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(W)[1], atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(t.inv(y), x, atol=ATOL[F64], rtol=0)


def test_same_as_zuko_rotation_transform(generator):
    """``SO`` at the canonical base is ``expm(L − Lᵀ)``, L the strict lower triangle of Z: zuko's
    ``RotationTransform(L)`` builds the same matrix, so the two transforms agree everywhere."""
    Z = torch.randn(N, N, generator=generator, dtype=F64)
    ours = gz.LinearTransform(gf.SO(), Z)
    theirs = zuko.transforms.RotationTransform(torch.tril(Z, -1))
    x = torch.randn(6, N, generator=generator, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(ours.inv(x), theirs.inv(x), atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(ours.log_abs_det_jacobian(x, ours(x)), theirs.log_abs_det_jacobian(x, theirs(x)), atol=ATOL[F64], rtol=0)


def _lu_no_pivot(W: torch.Tensor) -> torch.Tensor:
    """Doolittle LU without pivoting, packed as zuko's ``LULinearTransform`` reads it (L with its
    diagonal in the lower triangle, the strict upper triangle of a unit-diagonal U)."""
    n = W.shape[-1]
    L = torch.zeros_like(W)
    U = torch.eye(n, dtype=W.dtype)
    for j in range(n):
        for i in range(j, n):
            L[i, j] = W[i, j] - L[i, :j] @ U[:j, j]
        for k in range(j + 1, n):
            U[j, k] = (W[j, k] - L[j, :j] @ U[:j, k]) / L[j, j]
    return torch.tril(L) + torch.triu(U, 1)


@pytest.mark.parametrize("name", ["GLp", "PSD"])
def test_same_as_zuko_lu_linear_transform(name, generator):
    """zuko's ``LULinearTransform`` of the LU factors of the same matrix: same map, same
    log-determinant (zuko's from the diagonal of L), same inverse (zuko's by two triangular solves)."""
    space = SQUARE_SPACES[name]
    Z, base = _point_and_raw(space, generator)
    ours = gz.LinearTransform(space, Z, base)
    theirs = zuko.transforms.LULinearTransform(_lu_no_pivot(ours.weight))
    torch.testing.assert_close(theirs.L @ theirs.U, ours.weight, atol=1e-9, rtol=0)
    x = torch.randn(6, N, generator=generator, dtype=F64)
    y_ours, ladj_ours = ours.call_and_ladj(x)
    torch.testing.assert_close(y_ours, theirs(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_ours, theirs.log_abs_det_jacobian(x, y_ours), atol=1e-9, rtol=0)
    torch.testing.assert_close(ours.inv(y_ours), theirs.inv(y_ours), atol=1e-9, rtol=0)


def _flow(generator, layers):
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(N, dtype=F64), torch.ones(N, dtype=F64), buffer=True
    )
    return zuko.flows.Flow(transform=layers, base=base).to(F64)


def _set_raw(layer, generator):
    with torch.no_grad():
        layer.raw.add_(0.3 * torch.randn(layer.raw.shape, generator=generator, dtype=F64))


def test_composed_flow_log_prob_and_sampling(generator):
    """A zuko flow of three geofunc layers: ``log_prob`` equals the change of variables written with
    ``slogdet``, and samples are the inverse map of base draws (checked with ``solve``)."""
    layers = [gz.SpaceLinear(gf.GLp(), N), gz.SpaceLinear(gf.SO(), N), gz.SpaceLinear(gf.PSD(), N)]
    flow = _flow(generator, layers)
    for layer in layers:
        _set_raw(layer, generator)
    Ws = [layer.weight.detach() for layer in layers]
    x = torch.randn(9, N, generator=generator, dtype=F64)
    z, logdet = x, torch.zeros(9, dtype=F64)
    for W in Ws:
        z = z @ W.mT
        logdet = logdet + torch.linalg.slogdet(W)[1]
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + logdet
    torch.testing.assert_close(flow().log_prob(x), expected, atol=ATOL[F64], rtol=0)

    torch.manual_seed(0)  # zuko draws from the global generator; the check does not depend on it
    dist = flow()
    u = dist.base.sample((4,))
    samples = dist.transform.inv(u)
    ref = u
    for W in reversed(Ws):
        ref = torch.linalg.solve(W, ref.mT).mT
    torch.testing.assert_close(samples, ref, atol=ATOL[F64], rtol=0)
    torch.testing.assert_close(dist.log_prob(samples), dist.base.log_prob(u) + sum(torch.linalg.slogdet(W)[1] for W in Ws),
                               atol=1e-9, rtol=0)


def test_composition_with_zuko_layers_trains(generator):
    """Mixed with zuko's own autoregressive layer, the flow trains by maximum likelihood and every
    geofunc layer stays on its space."""
    torch.manual_seed(0)  # zuko's MADE initializes from the global generator
    glp, so = gz.SpaceLinear(gf.GLp(), N), gz.SpaceLinear(gf.SO(), N)
    flow = _flow(generator, [glp, zuko.flows.MaskedAutoregressiveTransform(N, hidden_features=[8]).to(F64), so])
    A = torch.randn(N, N, generator=generator, dtype=F64)
    data = torch.randn(128, N, generator=generator, dtype=F64) @ A.mT
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    first = None
    for step in range(60):
        loss = -flow().log_prob(data).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5, (first, loss.item())
    W = so.weight.detach()
    torch.testing.assert_close(W.mT @ W, torch.eye(N, dtype=F64), atol=ATOL[F64], rtol=0)
    assert torch.linalg.det(glp.weight.detach()) > 0


@pytest.mark.parametrize("name", ["GLp", "PSD", "SO"])
def test_gradients(name, generator):
    """The gradient of a log-likelihood w.r.t. the raw tensor equals the one of a reference written
    with ``to_manifold`` and ``slogdet``, and passes ``gradcheck`` (finite differences)."""
    space = SQUARE_SPACES[name]
    Z0, base = _point_and_raw(space, generator)
    x = torch.randn(6, N, generator=generator, dtype=F64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))

    def ours(Z):
        y, ladj = gz.LinearTransform(space, Z, base).call_and_ladj(x)
        return (normal.log_prob(y).sum(-1) + ladj).mean()

    def reference(Z):
        W = space.to_manifold(Z, base)
        return (normal.log_prob(x @ W.mT).sum(-1) + torch.linalg.slogdet(W)[1]).mean()

    Z = Z0.clone().requires_grad_()
    (g_ours,) = torch.autograd.grad(ours(Z), Z)
    (g_ref,) = torch.autograd.grad(reference(Z), Z)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9, rtol=0)
    assert torch.autograd.gradcheck(ours, (Z,), eps=1e-6, atol=1e-6)

    def inverse(Z):  # the sampling direction is differentiable too
        return gz.LinearTransform(space, Z, base).inv(x).sum()

    assert torch.autograd.gradcheck(inverse, (Z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["GLp", "SO", "PSD"])
def test_rebase_keeps_the_layer(name, generator):
    layer = gz.SpaceLinear(SQUARE_SPACES[name], N).to(F64)
    _set_raw(layer, generator)
    W = layer.weight.detach().clone()
    layer.rebase_()
    torch.testing.assert_close(layer.weight.detach(), W, atol=ATOL[F64], rtol=0)
    x = torch.randn(3, N, generator=generator, dtype=F64)
    torch.testing.assert_close(layer()(x), x @ W.mT, atol=ATOL[F64], rtol=0)


@pytest.mark.parametrize("name", ["GLp", "SO", "PSD"])
def test_deepcopy_and_pickle_keep_the_layer(name, generator):
    """A layer deep-copies and pickles (whole module) to the same matrix, without a warning (the base's
    torch TreeSpec raised torch 2.13's LeafSpec FutureWarning on deepcopy: an error under this suite)."""
    layer = gz.SpaceLinear(SQUARE_SPACES[name], N).to(F64)
    _set_raw(layer, generator)
    layer.rebase_()  # an explicit base
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other.weight, layer.weight, atol=0, rtol=0)
        other.rebase_()


def test_identity_start_and_float32():
    layer = gz.SpaceLinear(gf.GLp(), N)
    x = torch.randn(4, N)
    y, ladj = layer().call_and_ladj(x)
    torch.testing.assert_close(y, x, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(4), atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("space", [gf.LowRank(rank=2), gf.Sphere(), gf.Stiefel()], ids=["LowRank", "Sphere", "Stiefel-wide"])
def test_spaces_without_a_determinant_are_refused(space):
    shape = (3,) if isinstance(space, gf.Sphere) else ((3, 5) if isinstance(space, gf.Stiefel) else (4, 4))
    with pytest.raises(gf.ManifoldError, match=type(space).__name__):
        gz.LinearTransform(space, torch.randn(shape))
    with pytest.raises(gf.ManifoldError, match="geofunc space"):
        gz.LinearTransform(torch.nn.Linear(2, 2), torch.randn(2, 2))


def test_bad_features_or_init_is_a_manifold_error():
    """``features`` not a positive int was torch's error from ``eye``; an ``init`` of another size than
    ``features × features`` silently made a layer of that size; a non-tensor ``init`` an AttributeError."""
    for features in (0, -1, 3.0, True, "3"):
        with pytest.raises(gf.ManifoldError, match="`features`"):
            gz.SpaceLinear(gf.SO(), features)
    for init in (torch.eye(4), torch.eye(3)[:, :2], [[1.0, 0.0], [0.0, 1.0]]):
        with pytest.raises(gf.ManifoldError, match="`init`"):
            gz.SpaceLinear(gf.SO(), 3, init=init)
    assert gz.SpaceLinear(gf.SO(), 3, init=torch.eye(3)).raw.shape == (3, 3)


@pytest.mark.parametrize("name", ["GLp", "SO", "PSD", "SL"])
def test_vectors_of_another_size_batch_or_dtype_are_a_manifold_error(name, generator):
    """``x`` (or ``y`` for the inverse) of another last dimension than ``n``, of a batch that does not
    broadcast with ``W``'s, or of another dtype raised torch's ``mat1 and mat2 shapes cannot be
    multiplied`` (``linalg.solve``'s message for the solve family), naming neither the layer nor what
    it expects; a ``Product`` (which has a ``logabsdet``) made a transform that raised an
    AttributeError on first use."""
    space = gf.SL() if name == "SL" else SQUARE_SPACES[name]
    Z, base = _point_and_raw(space, generator, batch=(3,))
    t = gz.LinearTransform(space, Z, base)
    for bad, match in [(torch.randn(3, N + 1, dtype=F64), rf"of shape \(\.\.\., {N}\)"),
                       (torch.tensor(1.0, dtype=F64), rf"of shape \(\.\.\., {N}\)"),
                       (torch.randn(4, N, dtype=F64), r"broadcasts with W's \(3,\)"),
                       (torch.randn(3, N), "dtype torch.float64")]:
        for f in (t, t.inv, t.call_and_ladj, t.inv.call_and_ladj):
            with pytest.raises(gf.ManifoldError, match=rf"{type(space).__name__}\(.*expected `[xy]` .*{match}.*, got a tensor"):
                f(bad)
    x = torch.randn(2, 1, N, generator=generator, dtype=F64)  # what does broadcast still works
    torch.testing.assert_close(t.inv(t(x)), x.expand(2, 3, N), atol=ATOL[F64], rtol=0)
    P = gf.Product(gf.SO(), gf.GLp())
    with pytest.raises(gf.ManifoldError, match=r"Product\(.*expected `Z` to be a tensor.*got a tuple"):
        gz.LinearTransform(P, P.from_manifold(P.sample([(2, 2), (3, 3)], generator=generator, dtype=F64))[0])


def _by_solve(monkeypatch):
    """Make ``SL`` a space inverted by ``linalg.solve``, the path of a square space outside the families
    (no built-in one is: ``SL`` was, until it joined the SVD family)."""
    monkeypatch.setattr(gz, "SVD_FAMILY", tuple(c for c in gz.SVD_FAMILY if c is not gf.SL))


@pytest.mark.parametrize("name", ["GLp", "SO", "PSD", "SL", "SL-solve"])
def test_inverse_under_autocast(name, generator, monkeypatch):
    """Under CPU autocast the inverse of a float32 layer takes bf16 vectors, as the map does; the
    solve path's (``linalg.solve``) raised "Expected A and B to have the same dtype"."""
    if name == "SL-solve":
        _by_solve(monkeypatch)
    space = SQUARE_SPACES[name.removesuffix("-solve")]
    Z, base = _point_and_raw(space, generator)
    t = gz.LinearTransform(space, Z.float(), base if base is None else torch.utils._pytree.tree_map(lambda b: b.float(), base))
    x = torch.randn(4, N, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = t(x)
        x_back = t.inv(y)
    ref = torch.linalg.solve(t.weight.double(), y.double().mT).mT
    torch.testing.assert_close(x_back.double(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)  # bf16: 8 bits


@pytest.mark.parametrize("name", ["GLp", "FixedRank", "AlmostOrthogonal", "PSD", "PSSDFixedRank"])
def test_inverse_factors_formed_under_autocast_are_float32(name, generator):
    """The inverse's factors (σ or λ) are kept for the transform's life: formed by a first inverse
    inside a bf16 autocast region they were bf16 products, and the float32 round trip after the
    region was 5e-3 off (1e-6 for a transform first inverted outside)."""
    space = SQUARE_SPACES[name]
    Z, base = _point_and_raw(space, generator)
    t = gz.LinearTransform(space, Z.float(), base if base is None else torch.utils._pytree.tree_map(lambda b: b.float(), base))
    x = torch.randn(4, N, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t.inv(t(x))
    ref = torch.linalg.solve(t.weight.double(), t(x).double().mT).mT
    torch.testing.assert_close(t.inv(t(x)).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("space", [gf.Stiefel(), gf.Unitary(), gf.PSD(), gf.PSSD()], ids=repr)
def test_complex_layers_invert(space, generator):
    """Square complex ``Stiefel``/``Unitary`` (``W⁻¹ = Wᴴ``) and complex ``PSD``/``PSSD`` (Hermitian,
    ``Q diag(λ)⁻¹ Qᴴ``): the inverse by the factorization used the transpose, and ``W⁻¹(W x)`` was
    off by O(1) with the right log-determinant. Oracle: ``linalg.solve`` and ``slogdet``."""
    C = torch.complex128
    Z, base = space.from_manifold(space.sample((2, N, N), generator=generator, dtype=C))
    Z = Z + 0.3 * torch.randn(Z.shape, generator=generator, dtype=C)
    x = torch.randn(2, N, generator=generator, dtype=C)
    for Zi, bi in ((Z, base), (Z[0], base[0])):  # a batch of matrices, and one on a batch of vectors
        t = gz.LinearTransform(space, Zi, bi)
        W = space.to_manifold(Zi, bi)
        y, ladj = t.call_and_ladj(x)
        torch.testing.assert_close(ladj, torch.linalg.slogdet(W)[1].expand(2), atol=ATOL[F64], rtol=0)
        torch.testing.assert_close(t.inv(y), torch.linalg.solve(W, y.unsqueeze(-1)).squeeze(-1), atol=ATOL[F64], rtol=0)
        torch.testing.assert_close(t.inv(y), x, atol=ATOL[F64], rtol=0)
        assert t._factors()[0] == ("eig" if isinstance(space, (gf.PSD, gf.PSSD)) else "orthogonal")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["SL", "LowRank", "PSSDLowRank", "SL-solve", "GLp", "PSD"])
def test_low_precision_layers_invert(name, dtype, generator, monkeypatch):
    """A bf16/fp16 ``SL``, ``LowRank`` or ``PSSDLowRank`` layer's inverse went through
    ``linalg.solve``, which torch has not in those dtypes on the CPU ("lu_cpu" not implemented for
    'BFloat16'); they are inverted by their factors now, and the solve path (a square space outside
    the families) solves in float32. Oracle: the float64 solve with the low-precision ``W``; bf16 has
    8 bits, fp16 11."""
    if name == "SL-solve":
        _by_solve(monkeypatch)
    space = SQUARE_SPACES[name.removesuffix("-solve")]
    Z, base = _point_and_raw(space, generator)
    t = gz.LinearTransform(space, Z.to(dtype), torch.utils._pytree.tree_map(lambda b: b.to(dtype), base))
    x = torch.randn(4, N, generator=generator).to(dtype)
    y = t(x)
    x_back = t.inv(y)
    assert x_back.dtype == dtype
    ref = torch.linalg.solve(t.weight.double(), y.double().mT).mT
    tol = {torch.bfloat16: 4e-2, torch.float16: 5e-3}[dtype] * ref.abs().max().item()
    torch.testing.assert_close(x_back.double(), ref, atol=tol, rtol=0)
    assert t._factors()[0] == ("solve" if name == "SL-solve" else KIND[name])


@pytest.mark.parametrize("name", ["GLp", "SO", "PSD", "SL-solve"])
def test_gradients_after_a_first_use_under_no_grad(name, generator, monkeypatch):
    """A transform keeps ``W`` and the inverse's factors from their first use: first used under
    ``no_grad`` (an evaluation sample of the distribution that is then trained) it kept them without a
    graph, and the gradient of a later loss missed ``W``'s path (log|det|, formed at construction,
    kept its own): silently wrong. Oracle: the loss written with ``to_manifold``, ``slogdet`` and
    ``solve``."""
    if name == "SL-solve":
        _by_solve(monkeypatch)
    space = SQUARE_SPACES[name.removesuffix("-solve")]
    Z0, base = _point_and_raw(space, generator)
    x = torch.randn(6, N, generator=generator, dtype=F64)

    def reference(Z):
        W = space.to_manifold(Z, base)
        return (-(x @ W.mT).square().sum() / 2 + 6 * torch.linalg.slogdet(W)[1]
                + torch.linalg.solve(W, x.mT).sum())

    Z = Z0.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(reference(Z), Z)
    for first in ("forward", "inverse", "both"):
        t = gz.LinearTransform(space, Z, base)
        with torch.no_grad():
            if first in ("forward", "both"):
                t(x)
            if first in ("inverse", "both"):
                t.inv(x)
        y, ladj = t.call_and_ladj(x)
        (g,) = torch.autograd.grad(-y.square().sum() / 2 + ladj.sum() + t.inv(x).sum(), Z)
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0, msg=first)
    with torch.no_grad():  # made under no_grad, it is used so (as zuko's transforms, formed in __init__)
        t = gz.LinearTransform(space, Z, base)
    assert not t.inv(t(x)).requires_grad


def test_layers_compile_fullgraph(generator):
    """A chain of layers' log-density compiles with fullgraph=True: the base was rebuilt by
    ``optree.tree_unflatten`` of a spec made outside the trace, which Dynamo's optree polyfill
    refuses ("Expected `treespec` to be an instance of PyTreeSpec"). A layer pickled before the
    template existed still rebuilds its base."""
    layers = [gz.SpaceLinear(space, N).to(F64) for space in (gf.GLp(), gf.SO(), gf.PSD())]
    for layer in layers:
        _set_raw(layer, generator)
    layers[1].rebase_()

    def log_prob(x):
        total = 0.0
        for layer in layers:
            x, ladj = layer().call_and_ladj(x)
            total = total + ladj
        return -x.square().sum(-1) / 2 + total

    x = torch.randn(4, N, generator=generator, dtype=F64)
    compiled = torch.compile(log_prob, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), log_prob(x), atol=ATOL[F64], rtol=0)
    state = layers[0].__getstate__()
    del state["_template"]
    old = gz.SpaceLinear.__new__(gz.SpaceLinear)
    old.__setstate__(state)
    torch.testing.assert_close(old.weight, layers[0].weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["SO", "GLp", "PSD", "SL"])
def test_a_flow_step_leaves_no_reference_cycles(name):
    """A layer's forward, log-density and backward leave nothing for the cyclic collector: the base
    rebuilt by torch's pytree.tree_map left a cycle of 7 objects per forward (as in geofunc.nn). The
    inverse is left out: torch's Transform.inv holds its inverse, which holds the transform."""
    import gc

    layer = gz.SpaceLinear(SQUARE_SPACES[name], N).to(F64)
    layer.rebase_()  # an explicit base (the canonical one may be None)
    x = torch.randn(4, N, dtype=F64)

    def step():
        y, ladj = layer().call_and_ladj(x)
        (y.square().sum() + ladj.sum()).backward()
        with torch.no_grad():
            layer().call_and_ladj(x)

    step()
    collect_all_garbage()  # (a previous test's compiled graphs freed first)
    gc.disable()
    try:
        for _ in range(10):
            step()
        assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["SO", "GLp", "PSD"])
def test_torch_jit_trace_of_a_flow_names_what_works_for_a_flow(name):
    """torch.jit.trace (and torch.onnx.export(dynamo=False), which traces with it) is refused by the maps,
    whose message named gf.nn.plain(model): that leaves a SpaceLinear as it is (no gf.nn constraint), so
    a flow traced after plain met the same refusal. It names torch.export / torch.onnx.export(dynamo=True)
    (Note [Flows traced by torch.jit.trace]); tests/test_deploy.py exports a flow so."""
    flow = zuko.flows.Flow(transform=[gz.SpaceLinear(SQUARE_SPACES[name], 3)], base=zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(3), torch.ones(3), buffer=True))

    class LogProb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = flow

        def forward(self, x):
            return self.flow().log_prob(x)

    x = torch.randn(4, 3)
    for model in (LogProb(), gf.nn.plain(LogProb())):
        with torch.no_grad(), pytest.raises(gf.ManifoldError, match=(
                r"expected a LinearTransform \(geofunc\.contrib\.zuko\) to be captured by torch\.export\.export\(model, "
                r"args\) or torch\.onnx\.export\(model, args, dynamo=True\).*gf\.nn\.plain leaves a SpaceLinear.*"
                r"got torch\.jit\.trace")):
            torch.jit.trace(model, (x,))


def test_docstring_examples():
    result = doctest.testmod(gz, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def _slogdet_of_jacobian(f, x: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``log|det ∂f(x)_b/∂x_b|`` for every output batch index ``b``, from the full Jacobian of ``f``
    (``torch.func.jacrev``): ``x_b`` is the entry of ``x`` that broadcasting pairs with ``b``."""
    J = torch.func.jacrev(f)(x)  # shape batch + (n,) + x.shape
    xb = x.shape[:-1]
    out = torch.empty(batch, dtype=x.dtype)
    for b in itertools.product(*(range(d) for d in batch)):
        tail = b[len(b) - len(xb):] if xb else ()
        xi = tuple(0 if d == 1 else i for i, d in zip(tail, xb))
        out[b] = torch.linalg.slogdet(J[b + (slice(None),) + xi + (slice(None),)])[1]
    return out


@pytest.mark.parametrize("x_shape", [(N,), (1, N), (2, 1, N), (3, N)])
def test_logdet_broadcasts_like_the_map(x_shape, generator):
    """A batch of 3 matrices on a vector, a (1, n) batch or a (2, 1, n) batch: ``y = W x`` broadcasts
    (to (3, n), (3, n), (2, 3, n)), and so must the log-determinant (it raised a RuntimeError from
    ``expand(x.shape[:-1])``). Oracle: the Jacobian of the map, per output entry, by ``jacrev``."""
    space = gf.GLp()
    Z, base = _point_and_raw(space, generator, batch=(3,))
    t = gz.LinearTransform(space, Z, base)
    x = torch.randn(x_shape, generator=generator, dtype=F64)
    y = t(x)
    batch = torch.broadcast_shapes((3,), x.shape[:-1])
    assert y.shape == batch + (N,)
    expected = _slogdet_of_jacobian(t, x, batch)
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == batch
    torch.testing.assert_close(ladj, expected, atol=1e-10, rtol=0)
    y2, ladj2 = t.call_and_ladj(x)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    torch.testing.assert_close(ladj2, expected, atol=1e-10, rtol=0)
    # the inverse: x = W⁻¹ y, log|det| of its Jacobian
    xi = t.inv(x)
    assert xi.shape == batch + (N,)
    torch.testing.assert_close(t.inv.log_abs_det_jacobian(x, xi), _slogdet_of_jacobian(t.inv, x, batch), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- dtype changes
# A SpaceLinear of a "softplus" space (values softplus(s) + √ε of the dtype) keeps its matrix across
# .float() / .double() / load_state_dict of another dtype (Note [SpaceLinear across dtypes]).
# Values (0.69, 2.5e-3, 9.1e-4): above float32's floor 3.5e-4, so representable in both dtypes;
# cast alone they moved by the floors' difference (log|det| by ~0.45 nats).
DTYPE_SPACES = {"GLp": gf.GLp(), "PSD": gf.PSD(), "FixedRank": gf.FixedRank(rank=N), "SO": gf.SO()}


def _small_valued_layer(space, generator) -> "gz.SpaceLinear":
    layer = gz.SpaceLinear(space, N).double()
    with torch.no_grad():
        Z = 0.1 * torch.randn(N, N, generator=generator, dtype=F64)
        Z.diagonal().copy_(torch.tensor([0.0, -6.0, -7.0, 1.0, -1.0], dtype=F64))
        layer.raw.copy_(Z)
    return layer.rebase_()  # bases away from the identity: non-trivial frames that a cast rounds


def _logdet(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.slogdet(W.double())[1]


@pytest.mark.parametrize("name", DTYPE_SPACES)
def test_dtype_change_keeps_the_matrix(name, generator):
    space = DTYPE_SPACES[name]
    layer = _small_valued_layer(space, generator)
    W = layer.weight.detach().clone()
    assert torch.linalg.svdvals(W).min() > 5e-4  # above float32's floor: representable there
    raw = layer.raw
    layer.float()
    assert layer.raw is raw and layer.raw.dtype == torch.float32  # the same Parameter (optimizers hold it)
    W32 = layer.weight.detach()
    assert W32.dtype == torch.float32
    torch.testing.assert_close(W32.double(), W, atol=5e-7, rtol=0)  # float32 rounding
    torch.testing.assert_close(_logdet(W32), _logdet(W), atol=1e-4, rtol=0)
    torch.testing.assert_close(layer().ladj.double(), _logdet(W), atol=1e-4, rtol=0)
    layer.double()
    W64 = layer.weight.detach()
    torch.testing.assert_close(W64, W, atol=5e-7, rtol=0)  # float32's rounding, not the floors' 3.5e-4
    torch.testing.assert_close(_logdet(W64), _logdet(W), atol=1e-4, rtol=0)
    # the base is valid in float64 again (Note [Bases across dtypes])
    assert bool(space.contains(W64))


@pytest.mark.parametrize("name", ["GLp", "PSD", "SO"])
def test_state_dict_of_another_dtype_keeps_the_matrix(name, generator):
    space = DTYPE_SPACES[name]
    layer = _small_valued_layer(space, generator)
    W = layer.weight.detach().clone()
    state = layer.state_dict()
    saved = {k: v.clone() for k, v in state.items()}
    into32 = gz.SpaceLinear(space, N)
    into32.load_state_dict(state)
    assert into32.raw.dtype == torch.float32
    torch.testing.assert_close(into32.weight.detach().double(), W, atol=5e-7, rtol=0)
    torch.testing.assert_close(_logdet(into32.weight.detach()), _logdet(W), atol=1e-4, rtol=0)
    for k, v in state.items():  # the caller's state_dict is not modified
        assert torch.equal(v, saved[k])
    into64 = gz.SpaceLinear(space, N).double()
    into64.load_state_dict(into32.state_dict())
    W64 = into64.weight.detach()
    torch.testing.assert_close(W64, W, atol=5e-7, rtol=0)
    assert bool(space.contains(W64))  # the float32 base re-made valid in float64


def test_values_below_the_float32_floor_are_lifted_with_a_warning():
    """A float64 value below float32's floor (√ε = 3.5e-4) cannot be represented in float32: it is
    lifted to the floor, with a warning, as geofunc.nn does (README, Known limitations)."""
    layer = gz.SpaceLinear(gf.GLp(), 3).double()
    with torch.no_grad():
        layer.raw.copy_(torch.diag(torch.tensor([0.0, -6.0, -10.0], dtype=F64)))
    s64 = torch.linalg.svdvals(layer.weight.detach())
    with pytest.warns(UserWarning, match="below the floor"):
        layer.float()
    s32 = torch.linalg.svdvals(layer.weight.detach()).double()
    floor = torch.finfo(torch.float32).eps ** 0.5
    torch.testing.assert_close(s32[:2], s64[:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(s32[2], torch.tensor(floor, dtype=F64), atol=1e-7, rtol=0)


def test_space_linear_takes_any_integer_size_and_names_a_class_given_for_a_space():
    """SpaceLinear refused a NumPy integer size ('expected `features` to be an int ≥ 1, got np.int64(3)'),
    which gf.nn's sizes and ranks take, and a space class given for an instance was 'got ABCMeta'."""
    np = pytest.importorskip("numpy")
    layer = gz.SpaceLinear(gf.GLp(), np.int64(3))
    assert layer().bijective and tuple(layer()(torch.zeros(2, 3)).shape) == (2, 3)
    for bad in (0, 2.5, "3", True):
        with pytest.raises(gf.ManifoldError, match=r"SpaceLinear: expected `features` to be an int ≥ 1"):
            gz.SpaceLinear(gf.GLp(), bad)
    with pytest.raises(gf.ManifoldError, match=r"SpaceLinear: expected a geofunc space \(an instance, e\.g\. gf\.GLp\(\)\), "
                                               r"got <class 'geofunc\.spaces\._glp\.GLp'>"):
        gz.SpaceLinear(gf.GLp, 3)


@pytest.mark.parametrize("name", ["SO", "GLp", "PSD"])
def test_a_base_off_the_space_is_a_manifold_error(name, generator):
    """log|det W| is read from the raw diagonal and W trusts its base, so an averaged base (an EMA of a
    flow by AveragedModel(use_buffers=True) over rebased layers) or to_empty's zeros made log_prob
    silently wrong (SO: log|det| 0, slogdet(W) -0.58). The layer now refuses such a base, as
    geofunc.nn does (Note [SpaceLinear's base checked where it changes]); valid bases pass."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    space = SQUARE_SPACES[name]
    layer = gz.SpaceLinear(space, N).to(F64)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for _ in range(3):
        _set_raw(layer, generator)
        layer.rebase_()  # the base moves
        t = layer()  # valid after rebase_
        torch.testing.assert_close(t.ladj, _logdet(t.weight), atol=ATOL[F64], rtol=0)
        ema.update_parameters(layer)
    with pytest.raises(gf.ManifoldError, match=r"SpaceLinear on .*expected its base .* on the space"):
        ema.module()
    with torch.device("meta"):
        deferred = gz.SpaceLinear(space, N, init=torch.eye(N, dtype=F64))
    deferred.to_empty(device="cpu")
    with torch.no_grad():
        for i in range(deferred._n_base):
            getattr(deferred, f"base{i}").zero_()  # what to_empty may leave
    with pytest.raises(gf.ManifoldError, match="to_empty"):
        deferred()
    deferred.load_state_dict(layer.state_dict())  # a checkpoint's own bases are valid again
    torch.testing.assert_close(deferred().weight, layer.weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["SO", "PSD"])
def test_the_weight_property_refuses_a_base_off_the_space_as_forward(name):
    """layer.weight read the base unchecked: with a base off the space (an average, to_empty's zeros) it
    returned a W off the space silently, where layer() raises (Note [SpaceLinear's base checked where it
    changes])."""
    layer = gz.SpaceLinear(SQUARE_SPACES[name], N).to(F64)
    W = layer.weight
    assert bool(SQUARE_SPACES[name].contains(W))
    with torch.no_grad():
        layer.base0.mul_(0.5)  # what an average of rebased layers' frames does to them
    with pytest.raises(gf.ManifoldError, match=r"SpaceLinear on .*expected its base .* on the space"):
        layer.weight
    with pytest.raises(gf.ManifoldError, match=r"SpaceLinear on .*expected its base .* on the space"):
        layer()
