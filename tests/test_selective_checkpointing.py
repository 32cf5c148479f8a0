"""Selective activation checkpointing (``torch.utils.checkpoint`` with
``create_selective_checkpoint_contexts``) around the charts: the gradients are those without
checkpointing, whichever ops the policy saves (Note [In place under a dispatch mode] in
geofunc/_fastpath.py). Float64 throughout."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import geofunc as gf

F64 = torch.float64
TOL = 1e-12  # relative to the gradient's largest entry: recomputation gives the forward's values

SPACES = {
    "SO": (gf.SO(), (4, 4)),
    "Stiefel": (gf.Stiefel(), (6, 3)),
    "Stiefel-frame": (gf.Stiefel(), (80, 32)),  # k >= 32: the frame exponential (Note [Frame exponential])
    "Grassmannian": (gf.Grassmannian(), (6, 2)),
    "Sphere": (gf.Sphere(), (5,)),
    "LowRank": (gf.LowRank(rank=2), (5, 4)),
    "PSD": (gf.PSD(), (4, 4)),
    "SL": (gf.SL(), (4, 4)),
    "Hurwitz": (gf.Hurwitz(), (4, 4)),
}

SAVED = {
    "diagonal": {torch.ops.aten.diagonal.default},
    "slice": {torch.ops.aten.slice.Tensor},
    "non-pointwise": None,  # every op but the pointwise ones
}


def _policy(saved):
    def policy(ctx, op, *args, **kwargs):
        keep = torch.Tag.pointwise not in op.tags if saved is None else op in saved
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


@pytest.mark.parametrize("saved", list(SAVED), ids=list(SAVED))
@pytest.mark.parametrize("name", list(SPACES), ids=list(SPACES))
def test_selective_checkpointing_gives_the_plain_gradient(name, saved):
    """A policy that saves a view (``aten.diagonal``, ``aten.slice``) handed the forward's view back in
    the recomputation, and the exponential's in-place identity update through it went to the forward's
    buffer: SO, Stiefel, PSD, SL and Hurwitz gradients were 0.06 to 4.3 off, silently (or NaN); one that
    saves every non-pointwise op raised torch's "Tensor cached during selective activation checkpoint
    has been mutated" for Sphere and LowRank."""
    M, shape = SPACES[name]
    g = torch.Generator().manual_seed(0)
    X = M.sample(shape, generator=g, dtype=F64)
    Z0, base = M.from_manifold(X)
    Z0 = Z0 + 0.05 * torch.randn(Z0.shape, generator=g, dtype=F64)
    W = torch.randn(X.shape, generator=g, dtype=F64)

    def loss(Z):
        return (M.to_manifold(Z, base) * W).sum()

    Z = Z0.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(Z), Z)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(SAVED[saved]))
    Z = Z0.clone().requires_grad_()
    (got,) = torch.autograd.grad(checkpoint(loss, Z, use_reentrant=False, context_fn=context_fn), Z)
    err = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err <= TOL, f"{name}, saving {saved}: gradient {err:.2e} off"


SKETCHED = {  # the rank family's sketched maps (≥ 64², Note [Sketched frames of low-rank points])
    "contains": lambda M, X, G0: lambda W: W.square().sum() * M.contains(W).to(W.dtype),
    "check": lambda M, X, G0: lambda W: (M.check(W), W.square().sum())[1],
    "tangent": lambda M, X, G0: lambda W: (M.tangent(X, W) * G0).sum(),
    "project": lambda M, X, G0: lambda W: (M.project(X) * W).sum(),
}


@pytest.mark.parametrize("case", list(SKETCHED), ids=list(SKETCHED))
@pytest.mark.parametrize("name", ["LowRank", "PSSDLowRank"])
def test_selective_checkpointing_of_the_sketched_maps(name, case):
    """The sketch's temporaries were updated in place (the residual divided by σ₁, S − QC over S, the
    blocked transposing copy): a policy that saves every non-pointwise op raised "Tensor cached during
    selective activation checkpoint has been mutated" from contains and check of a point that requires
    grad, and from PSSDLowRank's tangent and project at a point nothing differentiates."""
    M = {"LowRank": gf.LowRank(4), "PSSDLowRank": gf.PSSDLowRank(4)}[name]
    g = torch.Generator().manual_seed(0)
    X = M.sample((96, 96), generator=g, dtype=F64)
    G0 = torch.randn(96, 96, generator=g, dtype=F64)
    f = SKETCHED[case](M, X, G0)
    W = (X + 0.0).requires_grad_()
    (ref,) = torch.autograd.grad(f(W), W)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(None))
    W = (X + 0.0).requires_grad_()
    (got,) = torch.autograd.grad(checkpoint(f, W, use_reentrant=False, context_fn=context_fn), W)
    err = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err <= TOL, f"{name} {case}: gradient {err:.2e} off"


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(96, 96), (2, 520, 520)], ids=["2d", "batched-blocked"])
def test_sketched_maps_out_of_place_under_a_dispatch_mode_are_bit_for_bit(shape, dtype):
    """Under a dispatch mode the sketch's updates are made out of place, with the same values."""
    M = gf.PSSDLowRank(4)
    g = torch.Generator().manual_seed(1)
    X = M.sample(shape, generator=g, dtype=dtype)
    G = torch.randn(shape, generator=g, dtype=dtype)
    Y = X + M.tangent(X, 1e-3 * G)

    def maps():
        return M.contains(X), M.tangent(X, G), M.project(Y), M.from_manifold(X)[0]

    plain = maps()
    with _Passthrough():
        moded = maps()
    for a, b in zip(plain, moded):
        assert torch.equal(a, b)



_UNDER_LEVEL = {
    **SPACES,
    "Stiefel-tall": (gf.Stiefel(), (16, 4)),
    "AlmostOrthogonal": (gf.AlmostOrthogonal(lam=0.3), (9, 4)),
    "LowRank-tall": (gf.LowRank(rank=2), (16, 12)),
    "FixedRank": (gf.FixedRank(rank=2), (16, 12)),
    "PSSDLowRank": (gf.PSSDLowRank(rank=2), (6, 6)),
}


@pytest.mark.parametrize("map_", ["to_manifold", "project", "retract"])
@pytest.mark.parametrize("name", list(_UNDER_LEVEL), ids=list(_UNDER_LEVEL))
def test_checkpoint_recomputed_after_a_dual_level_closes(name, map_):
    """``checkpoint(..., use_reentrant=False)`` run inside an open ``torch.autograd.forward_ad.dual_level()``
    on inputs without tangents, its backward after the level closed: the fast paths asked whether a level
    was open (the forward took the op chain) where the recomputation, outside it, took the one node, and
    torch raised CheckpointError ("different metadata") for the charts of Stiefel, Grassmannian,
    AlmostOrthogonal and the rank family and the projections and retractions of nearly every matrix
    space (Note [Dual levels and recomputation] in geofunc/_fastpath.py). The gradient is the plain one;
    a base that does carry a tangent still gets the forward-mode chart's tangent."""
    import torch.autograd.forward_ad as fwAD

    M, shape = _UNDER_LEVEL[name]
    g = torch.Generator().manual_seed(0)
    X = M.sample(shape, generator=g, dtype=F64)
    Z0, base = M.from_manifold(X)
    Z0 = Z0 + 0.05 * torch.randn(Z0.shape, generator=g, dtype=F64)
    V0 = M.tangent(X, torch.randn(X.shape, generator=g, dtype=F64))
    W = torch.randn(X.shape, generator=g, dtype=F64)
    fn, inp = {"to_manifold": (lambda Z: M.to_manifold(Z, base), Z0),
               "project": (M.project, X + 0.1 * torch.randn(X.shape, generator=g, dtype=F64)),
               "retract": (lambda V: M.retract(X, V), 0.1 * V0)}[map_]

    def loss(Z):
        return (fn(Z) * W).sum()

    Z = inp.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(Z), Z)
    Z = inp.clone().requires_grad_()
    with fwAD.dual_level():
        out = checkpoint(loss, Z, use_reentrant=False)
    (got,) = torch.autograd.grad(out, Z)
    err = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err <= TOL, f"{name} {map_}: gradient {err:.2e} off"
    if map_ == "to_manifold" and base is not None:  # a base with a tangent: the chart's forward-mode tangent
        bases = base if isinstance(base, tuple) else (base,)  # (the rank family's (U, V))
        T = tuple(torch.randn(B.shape, generator=g, dtype=F64) for B in bases)
        pack = (lambda Bs: Bs) if isinstance(base, tuple) else (lambda Bs: Bs[0])
        _, ref_t = torch.func.jvp(lambda *Bs: M.to_manifold(Z0, pack(Bs)), bases, T)
        with fwAD.dual_level():
            dual = tuple(fwAD.make_dual(B, t) for B, t in zip(bases, T))
            got_t = fwAD.unpack_dual(M.to_manifold(Z0, pack(dual))).tangent
        torch.testing.assert_close(got_t, ref_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["new", "known"])
def test_a_first_chart_inside_selective_checkpointing(layout, monkeypatch):
    """A chart's first call of its shape builds the index layout (Note [Layouts under a dispatch mode]), its first
    call at new bases the base factors (Note [The base factor cache under a dispatch mode]); a later call
    reads both from their caches. Made first inside the checkpointed region (the recomputation then hits),
    with a policy that saves the non-pointwise ops, the first raised "aten.alias.default encountered during
    backward but not found in storage" (the second "aten.equal.default"). The gradient is the plain one."""
    import geofunc.spaces._factorized as fz

    monkeypatch.setattr(fz, "_LAYOUTS", {})  # (no chart of this shape yet in this process)
    M = gf.LowRank(rank=3)
    g = torch.Generator().manual_seed(1)
    if layout == "known":  # the shape charted once outside, at other bases
        Z1, b1 = M.from_manifold(M.sample((11, 7), generator=g, dtype=F64))
        M.to_manifold(Z1.clone().requires_grad_(), b1).sum().backward()
    X = M.sample((11, 7), generator=g, dtype=F64)
    Z0, base = M.from_manifold(X)  # fresh bases: not in the base factor cache
    Z0 = Z0 + 0.05 * torch.randn(Z0.shape, generator=g, dtype=F64)
    W = torch.randn(X.shape, generator=g, dtype=F64)

    def loss(Z):
        return (M.to_manifold(Z, base) * W).sum()

    context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(None))
    Z = Z0.clone().requires_grad_()
    (got,) = torch.autograd.grad(checkpoint(loss, Z, use_reentrant=False, context_fn=context_fn), Z)
    Z = Z0.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(Z), Z)
    err = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err <= TOL, f"gradient {err:.2e} off"



@pytest.mark.parametrize("saved", ["everything", "non-pointwise"])
def test_a_first_sketch_inside_selective_checkpointing(saved, monkeypatch):
    """The rank family's sketch is drawn on the first call of its shape and dtype (randn with a generator, then
    _to_copy: Note [The sketch under a dispatch mode]) and read from its cache after. Drawn first inside the
    checkpointed region (the recomputation then hits), the region's own later draw with a generator was handed
    the sketch back (a policy saving the non-pointwise ops: the gradient 73% off, silently), and with a policy
    saving every op its ``.to(float32)`` too ("Recomputed values ... have different metadata"). The gradient
    is the plain one."""
    import geofunc.spaces._factorized as fz

    monkeypatch.setattr(fz, "_SKETCHES", {})  # (no sketch of this shape yet in this process)
    M = gf.LowRank(rank=2)
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(96, 96, generator=g)  # a buffer: the sketched project (float32, no derivatives; q = 12)
    W0 = torch.randn(96, 12, generator=g, dtype=F64)

    def loss(W):
        P = M.project(Y)
        noise = torch.randn(96, 12, generator=torch.Generator().manual_seed(7), dtype=F64)
        return ((W * noise).to(torch.float32).sin() * (P[:, :12] + 1)).sum()

    def everything(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE

    context_fn = functools.partial(create_selective_checkpoint_contexts, everything if saved == "everything" else _policy(None))
    W = W0.clone().requires_grad_()
    (got,) = torch.autograd.grad(checkpoint(loss, W, use_reentrant=False, context_fn=context_fn), W)
    assert len(fz._SKETCHES) == 1  # (the sketched path ran)
    W = W0.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(W), W)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same float32 ops, recomputed or saved


@pytest.mark.parametrize("map_", ["project", "contains", "from_manifold"])
def test_complex_maps_without_grad_inside_a_region_saving_every_op(map_):
    """Unitary's maps on a point nothing differentiates, inside a checkpointed region whose policy saves
    every op: torch's isfinite of a complex tensor (sanitize) ands the parts' results in place, and the
    recomputation raised "Tensor cached during selective activation checkpoint has been mutated"."""
    M = gf.Unitary()
    g = torch.Generator().manual_seed(0)
    X = M.sample((12, 12), generator=g, dtype=torch.complex128)
    G = torch.randn(12, 12, generator=g, dtype=torch.complex128)
    call = {"project": lambda: M.project(X + G).abs().sum(), "contains": lambda: M.contains(X).double(),
            "from_manifold": lambda: M.from_manifold(X)[0].abs().sum()}[map_]
    context_fn = functools.partial(create_selective_checkpoint_contexts, lambda *a, **k: CheckpointPolicy.MUST_SAVE)

    def f(z):
        with torch.no_grad():
            c = call()
        return (z * z).sum() + c

    z = torch.randn(3, dtype=F64, generator=g).requires_grad_()
    (got,) = torch.autograd.grad(checkpoint(f, z, use_reentrant=False, context_fn=context_fn), z)
    torch.testing.assert_close(got, 2 * z.detach(), rtol=0, atol=0)
