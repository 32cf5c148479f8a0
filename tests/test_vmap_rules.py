"""The vmap rules of the exponential (geofunc/_expm.py) under nested transforms, against Python loops.

Every custom vmap rule of the exponential: the Function's (``_Expm.vmap``), its adjoint node's
(``_ExpmAdjoint.vmap``, Note [Adjoint vmap rule]) and the custom operators' (``geofunc::expm``,
``expm_powers``, ``expm_vjp`` and the frame operators, Note [Compiled exponential]). A rule that
mis-lines a batch dim passes a single transform and fails only when an outer vmap level puts its
dim in front: ``vmap(jacrev(f))`` with vmap batch B and K outputs gave wrong numbers where B == K
and raised elsewhere. So each rule is reached through nested transforms (vmap(jacrev), jacrev(vmap),
vmap(vmap(grad)), vmap(jacfwd), vmap(hessian)), per-sample and shared operands, in_dims 0 and 1,
B equal to and different from n and from the output count, and compared in float64 with a Python
loop over the batch and with ``torch.linalg.matrix_exp`` (whose batching rules are torch's).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, vjp, vmap
from torch.utils._pytree import tree_map

import geofunc as gf
import geofunc._expm as E
from geofunc._expm import expm
from geofunc.testing import no_vmap_fallback

# torch 2.6 has no batching rule for matrix_exp: the references (only they) take the fallback there, which warns
pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule for aten..matrix_exp")

F64 = torch.float64
ref_expm = torch.linalg.matrix_exp
RTOL, ATOL = 1e-10, 1e-12  # float64; the errors of the fixed rules are ~1e-15 relative


def close(x, y):
    torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def ours(fn, *args):
    """``fn(*args)`` with torch's vmap fallback off: geofunc's rules must cover every op under every
    transform. The references (``matrix_exp``) run outside it: torch's own rules for matrix_exp and its
    backward are newer than some torch versions geofunc runs on (2.6 has none)."""
    with no_vmap_fallback():
        return fn(*args)


def loop(fn, B, *args, in_dims=None):
    """``fn`` per batch entry (``in_dims``: 0 or None per argument; default all 0), stacked."""
    in_dims = in_dims or (0,) * len(args)
    pick = lambda a, d, i: a if d is None else tree_map(lambda t: t.select(d, i), a)  # noqa: E731
    return torch.stack([fn(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(B)])


# B == K (the silent case: every B == K gave wrong numbers), B == n, and B != K (raised), K = 1
BK = [(3, 3), (4, 4), (3, 2), (2, 3), (3, 1), (3, 5)]


def _inputs(B, K, n, generator):
    A0 = torch.randn(B, n, n, generator=generator, dtype=F64)
    Z = 0.5 * torch.randn(B, n, n, generator=generator, dtype=F64)
    G = torch.randn(K, n, n, generator=generator, dtype=F64)
    return A0, Z, G


def _outputs(e, G):
    """K outputs ``⟨G_k, e(a + z − zᵀ)⟩`` of ``(z, a)``."""
    return lambda z, a: (G * e(a + z - z.mT)).sum((-1, -2))


# ------------------------------------------------------------------ _ExpmAdjoint.vmap: vmap(jacrev)
@pytest.mark.parametrize("B,K", BK, ids=[f"B{b}-K{k}" for b, k in BK])
def test_vmap_jacrev_of_expm_matches_a_loop(B, K, generator):
    """Per-sample Jacobians of K outputs of the exponential: jacrev's vmap over the K cotangents leaves
    A unbatched at that level, the outer vmap batches it (before the fix: wrong for B == K, raised
    otherwise)."""
    A0, Z, G = _inputs(B, K, 3, generator)
    f, fr = _outputs(expm, G), _outputs(ref_expm, G)
    out = ours(vmap(jacrev(f)), Z, A0)  # per-sample A
    close(out, ours(loop, jacrev(f), B, Z, A0))
    close(out, vmap(jacrev(fr))(Z, A0))
    shared = ours(vmap(jacrev(f), in_dims=(0, None)), Z, A0[0])  # a constant shared by the batch
    close(shared, ours(lambda: loop(jacrev(f), B, Z, A0[0], in_dims=(0, None))))
    moved = ours(vmap(jacrev(f), in_dims=(1, 1)), Z.movedim(0, 1), A0.movedim(0, 1))
    close(moved, out)


@pytest.mark.parametrize("B", [1, 3, 4])
def test_vmap_jacrev_of_a_scalar_loss(B, generator):
    """K = 1: vmap(jacrev(scalar loss)) raised for every B > 1."""
    A0, Z, G = _inputs(B, 1, 3, generator)
    f = lambda z, a: (G[0] * expm(a + z - z.mT)).sum()  # noqa: E731
    fr = lambda z, a: (G[0] * ref_expm(a + z - z.mT)).sum()  # noqa: E731
    out = ours(vmap(jacrev(f)), Z, A0)
    close(out, ours(loop, jacrev(f), B, Z, A0))
    close(out, vmap(grad(fr))(Z, A0))


@pytest.mark.parametrize("B,K", [(3, 3), (3, 2)], ids=["B=K", "B!=K"])
def test_vmap_of_vjp_over_a_batch_of_cotangents(B, K, generator):
    """vjp's pullback vmapped over cotangents inside an outer vmap, the cotangents shared by the batch
    and per sample (the adjoint node with an unbatched A and a batched G at two levels)."""
    A0, Z, G = _inputs(B, K, 3, generator)

    def pulled(e):
        def h(z, a, G):
            return vmap(vjp(lambda z: e(a + z - z.mT), z)[1])(G)[0]
        return h

    for Gs, d in ((G, None), (G.expand(B, *G.shape).clone(), 0)):
        out = ours(vmap(pulled(expm), in_dims=(0, 0, d)), Z, A0, Gs)
        close(out, ours(lambda: loop(pulled(expm), B, Z, A0, Gs, in_dims=(0, 0, d))))
        close(out, vmap(pulled(ref_expm), in_dims=(0, 0, d))(Z, A0, Gs))


@pytest.mark.parametrize("B,K", [(3, 3), (2, 3)], ids=["B=K", "B!=K"])
def test_nested_vmaps_around_jacrev(B, K, generator):
    """jacrev(vmap), vmap(jacrev(vmap)) and vmap(vmap(jacrev)) with A batched at the inner level only,
    at the outer only, and at both: the same numbers as matrix_exp's."""
    A0, Z, G = _inputs(B, K, 3, generator)
    Z2 = 0.5 * torch.randn(B, 2, 3, 3, generator=generator, dtype=F64)
    f, fr = _outputs(expm, G), _outputs(ref_expm, G)
    for T in (lambda f: jacrev(vmap(f))(Z, A0),
              lambda f: jacrev(vmap(f, in_dims=(0, None)))(Z, A0[0]),
              lambda f: vmap(jacrev(vmap(f, in_dims=(0, None))))(Z2, A0),
              lambda f: vmap(vmap(jacrev(f), in_dims=(0, None)))(Z2, A0),
              lambda f: vmap(vmap(jacrev(f), in_dims=(None, 0)), in_dims=(None, 0))(Z[0], Z2)):
        close(ours(T, f), T(fr))


# ------------------------------------------ the adjoint's rule under forward mode and higher orders
@pytest.mark.parametrize("chain", [True, False], ids=["op-chain", "function"])
def test_second_order_transforms_under_vmap(chain, generator, monkeypatch):
    """vmap(hessian), vmap(jacfwd(jacrev)), vmap(jacrev(jacrev)) and vmap(vmap(grad)) with B == n == K.
    With two derivative levels under vmap small exponentials take the op chain (Note [Op chain under
    torch.func]); ``function``: the Function and its adjoint node (as for n > _CHAIN_N), whose vmap rule
    expands an unbatched A under forward mode and gives it a dim of size 1 otherwise."""
    if not chain:
        monkeypatch.setattr(E, "_CHAIN_N", 0)
    B = K = 3
    A0, Z, G = _inputs(B, K, 3, generator)
    Z2 = 0.5 * torch.randn(B, 2, 3, 3, generator=generator, dtype=F64)
    f, fr = _outputs(expm, G), _outputs(ref_expm, G)
    s = lambda e: lambda z, a: (G[0] * e(a + z - z.mT)).sum()  # noqa: E731
    close(ours(vmap(hessian(s(expm))), Z, A0), loop(hessian(s(ref_expm)), B, Z, A0))
    close(ours(vmap(jacfwd(jacrev(f))), Z, A0), loop(jacrev(jacrev(fr)), B, Z, A0))
    close(ours(vmap(jacrev(jacrev(s(expm)))), Z, A0), vmap(hessian(s(ref_expm)))(Z, A0))
    close(ours(vmap(jacfwd(f)), Z, A0), loop(jacrev(fr), B, Z, A0))
    close(ours(vmap(vmap(grad(s(expm)), in_dims=(0, None))), Z2, A0), vmap(vmap(grad(s(ref_expm)), in_dims=(0, None)))(Z2, A0))


def test_the_adjoint_reuses_the_forward_intermediates_under_jacrev(generator, monkeypatch):
    """The dim of size 1 that the rule gives an unbatched A does not cost a second evaluation: the
    adjoint views the forward's intermediates (_cache_for), under jacrev and vmap(jacrev), with and
    without squarings."""
    calls = []
    evaluate = E._evaluate
    monkeypatch.setattr(E, "_evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    for scale in (0.3, 30.0):
        A = scale * torch.randn(3, 70, 70, generator=generator, dtype=F64) / 70**0.5  # > _CHAIN_N: the Function
        G = torch.randn(2, 70, 70, generator=generator, dtype=F64)
        f = lambda a: (G * expm(a)).sum((-1, -2))  # noqa: E731
        for run in (lambda: jacrev(f)(A[0]), lambda: vmap(jacrev(f))(A), lambda: vmap(grad(lambda a: f(a)[0]))(A)):
            calls.clear()
            run()
            assert len(calls) == 1, (scale, len(calls))


# ------------------------------------------------------------------------------------ the charts
def _chart_cases():
    return [
        ("SO-3", gf.SO(), (3, 3)),
        ("SO-2", gf.SO(), (2, 2)),
        ("Stiefel-tall", gf.Stiefel(), (6, 3)),
        ("Stiefel-wide", gf.Stiefel(), (3, 5)),
        ("Stiefel-frame", gf.Stiefel(), (40, 32)),  # k ≥ 32: the frame exponential in eager mode
        ("Grassmannian", gf.Grassmannian(), (5, 2)),
        ("LowRank", gf.LowRank(rank=2), (5, 4)),
        ("FixedRank", gf.FixedRank(rank=2), (4, 3)),
        ("GLp", gf.GLp(), (3, 3)),
        ("SL", gf.SL(), (3, 3)),
        ("PSD", gf.PSD(), (3, 3)),
    ]


CHARTS = _chart_cases()


@pytest.mark.parametrize("B,K", [(3, 3), (4, 2)], ids=["B=K", "B!=K"])
@pytest.mark.parametrize("name,space,shape", CHARTS, ids=[c[0] for c in CHARTS])
def test_vmap_jacrev_of_a_chart_matches_a_loop(name, space, shape, B, K, generator):
    """Per-sample Jacobians of K outputs of an expm chart at per-sample and shared bases, and of a
    scalar loss: vmap(jacrev) against a Python loop of jacrev."""
    _, bases = space.from_manifold(space.sample((B, *shape), generator=generator, dtype=F64))
    Z = 0.3 * torch.randn(B, *shape, generator=generator, dtype=F64)
    G = torch.randn(K, *shape, generator=generator, dtype=F64)
    f = lambda z, b: (G * space.to_manifold(z, b)).sum((-1, -2))  # noqa: E731
    s = lambda z, b: (G[0] * space.to_manifold(z, b)).sum()  # noqa: E731
    base0 = tree_map(lambda t: t[0], bases)
    with no_vmap_fallback():
        close(vmap(jacrev(f))(Z, bases), loop(jacrev(f), B, Z, bases))
        close(vmap(jacrev(f), in_dims=(0, None))(Z, base0), loop(jacrev(f), B, Z, base0, in_dims=(0, None)))
        close(vmap(jacrev(s))(Z, bases), loop(grad(s), B, Z, bases))


@pytest.mark.parametrize("B", [3, 4])
def test_vmap_jacrev_of_the_so2_chart_itself(B, generator):
    """The Jacobian of SO(2)'s chart (4 outputs) per sample, base None: B = 4 gave wrong numbers, B = 3 raised."""
    M = gf.SO()
    Z = 0.7 * torch.randn(B, 2, 2, generator=generator, dtype=F64)
    with no_vmap_fallback():
        close(vmap(jacrev(M.to_manifold))(Z), loop(jacrev(M.to_manifold), B, Z))


# --------------------------------------------------------------- the custom operators' vmap rules
def _frame_op(M):
    """``expm(M)[..., :k]`` by ``geofunc::frame_cols`` from the top rows of ``M`` (T, R), c = 1."""
    k = M.shape[-1] // 2
    return torch.ops.geofunc.frame_cols(M[..., :k, :k], M[..., :k, k:], torch.ones(M.shape[:-2] + (1, 1), dtype=M.dtype))


def _frame_ref(M):
    k = M.shape[-1] // 2
    T, R = M[..., :k, :k], M[..., :k, k:]
    bottom = torch.cat([torch.eye(k, dtype=M.dtype).expand_as(T), torch.zeros_like(T)], dim=-1)
    return ref_expm(torch.cat([torch.cat([T, R], dim=-1), bottom], dim=-2))[..., :k]


OPS = [("expm", lambda M: torch.ops.geofunc.expm(M), ref_expm, 3), ("frame_expm", _frame_op, _frame_ref, 4)]


@pytest.mark.parametrize("B,K", [(3, 3), (4, 4), (3, 2)], ids=["B=K=n", "B=K", "B!=K"])
@pytest.mark.parametrize("name,op,ref,n", OPS, ids=[o[0] for o in OPS])
def test_custom_operator_vmap_rules_under_nested_transforms(name, op, ref, n, B, K, generator):
    """The operators' rules expand an unbatched operand to the batch (_front), so every operand keeps
    one rank: called directly in eager mode (as the compiled graph calls them), under the nested
    transforms that broke the adjoint node's rule, they agree with matrix_exp."""
    if not (E._FRAME_OPS if name == "frame_expm" else E._COMPILED_OPS):
        pytest.skip("custom operators not registered on this torch")
    A0 = torch.randn(B, n, n, generator=generator, dtype=F64)
    Z = 0.5 * torch.randn(B, n, n, generator=generator, dtype=F64)
    Z2 = 0.5 * torch.randn(B, 2, n, n, generator=generator, dtype=F64)
    G = torch.randn(K, *op(A0[0]).shape, generator=generator, dtype=F64)
    f = lambda e: lambda z, a: (G * e(a + z - z.mT)).sum((-1, -2))  # noqa: E731
    s = lambda e: lambda z, a: (G[0] * e(a + z - z.mT)).sum()  # noqa: E731
    close(ours(vmap(jacrev(f(op))), Z, A0), loop(jacrev(f(ref)), B, Z, A0))
    close(ours(vmap(jacrev(f(op)), in_dims=(0, None)), Z, A0[0]), vmap(jacrev(f(ref)), in_dims=(0, None))(Z, A0[0]))
    close(ours(jacrev(vmap(f(op))), Z, A0), jacrev(vmap(f(ref)))(Z, A0))
    close(ours(vmap(vmap(grad(s(op)), in_dims=(0, None))), Z2, A0), vmap(vmap(grad(s(ref)), in_dims=(0, None)))(Z2, A0))
    close(ours(vmap(jacfwd(f(op))), Z, A0), loop(jacrev(f(ref)), B, Z, A0))
    close(ours(vmap(hessian(s(op))), Z, A0), loop(hessian(s(ref)), B, Z, A0))
