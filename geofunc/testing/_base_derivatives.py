"""Second derivatives of the maps in their base point (float64): the property ``base_hessian``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import grad, jvp

from ._case import SpaceCase
from ._properties import _ctx, _fail, _gen, _property, _randn, _require_f64, _smoke_inputs, f64

__all__ = ["check_base_hessian"]

Tensor = torch.Tensor


# Note [Second derivatives in the base]
# gradgradcheck holds tangent, retract and project to their own first derivative (Note [Gradients of
# every map] in _properties.py), nested_forward holds the transforms to plain autograd, and hessian
# differentiates the chart twice; nothing held a second derivative of expmap, logmap, transport,
# retract, inner, dist or egrad_to_rgrad in the base point X against the map itself. That is what
# MAML through an optimizer step (egrad_to_rgrad, retract, transport at the iterate), a Riemannian
# Newton step or a Hessian-vector product of f(retract(X, V(X))) differentiates. The reference is
# the central difference of the autograd gradient along the manifold, X± = retract(X, ±hD) for a
# unit tangent D (X± − X∓ = 2hD + O(h³), so points off the space, where a map may be undefined, are
# never read), Richardson-extrapolated from h and h/2 (error ~1e-9 at h = 1e-3). The tangent vectors
# depend on the base (V(X) = tangent(X, W)), as an optimizer's do.
_H = 1e-3
_TOL = 1e-6


def _rdot(A: Tensor, B: Tensor) -> Tensor:
    return (A * B.conj()).real.sum()


@_property
def check_base_hessian(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """Second derivatives in the base point ``X`` (float64, smoke shape): for ``L(X) = s + s²/2`` with
    ``s = ⟨C, map(X)⟩`` and each of ``retract(X, V(X))``, ``egrad_to_rgrad(X, G)``,
    ``inner(X, U(X), V(X))``, ``transport(X, Y, U(X))``, ``transport(Y, X, U)``,
    ``transport(X, retract(X, V(X)), U(X))`` (an optimizer step's) and, where the space has them,
    ``expmap(X, V(X))``, ``logmap(X, Y)``, ``dist(X, Y)`` (``U(X) = tangent(X, ·)``, ``V`` of length
    0.3 in the metric or half ``case.geodesic_radius``, ``Y = retract(X, V)``), the Hessian-vector
    product along a unit tangent ``D`` by double backward and by ``jvp`` of ``grad`` equals finite
    differences of the gradient along ``retract(X, ±hD)`` (to ``1e-6`` relative to
    ``max(1, |reference|)``; Note [Second derivatives in the base])."""
    from ._geodesic import implements

    _require_f64("base_hessian", dtype)
    g = _gen(generator)
    M = case.space
    shape, X, _, _ = _smoke_inputs(case, g)
    ctx = _ctx(case, shape, f64)
    C, W, Ua, G = (_randn(shape, f64, g) for _ in range(4))
    D = M.tangent(X, _randn(shape, f64, g))
    size = float(M.inner(X, D, D).real.sum().clamp(min=0.0).sqrt())
    if size == 0.0:
        return  # a space of one point (Grassmannian of n×n frames): no tangent direction
    D = D / size
    r = min(0.3, 0.5 * case.geodesic_radius)
    V0 = M.tangent(X, W)
    length = M.inner(X, V0, V0).real.clamp(min=1e-300).sqrt()
    k = (r / length).reshape(length.shape + (1,) * M.point_ndim)

    def step(x: Tensor) -> Tensor:  # V(x), of length r in the metric at X (a fixed factor: smooth in x)
        return k * M.tangent(x, W)

    Y = M.retract(X, k * V0)
    UY = M.tangent(Y, Ua)
    maps: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("retract(X, V(X))", lambda x: M.retract(x, step(x))),
        ("egrad_to_rgrad(X, G)", lambda x: M.egrad_to_rgrad(x, G)),
        ("inner(X, U(X), V(X))", lambda x: M.inner(x, M.tangent(x, Ua), step(x))),
        ("transport(X, Y, U(X))", lambda x: M.transport(x, Y, M.tangent(x, Ua))),
        ("transport(Y, X, U)", lambda x: M.transport(Y, x, UY)),
        ("transport(X, retract(X, V(X)), U(X))", lambda x: M.transport(x, M.retract(x, step(x)), M.tangent(x, Ua))),
    ]
    maps += [(f"{name}{args}", fn) for name, args, fn in (
        ("expmap", "(X, V(X))", lambda x: M.expmap(x, step(x))),
        ("logmap", "(X, Y)", lambda x: M.logmap(x, Y)),
        ("dist", "(X, Y)", lambda x: M.dist(x, Y))) if implements(M, name) and name not in case.skip]
    for name, fn in maps:

        def loss(x: Tensor, fn: Callable[[Tensor], Tensor] = fn) -> Tensor:
            out = fn(x)
            s = _rdot(out, C) if out.shape == C.shape else out.sum()
            return s + 0.5 * s**2

        def gradient(x: Tensor) -> Tensor:
            xr = x.detach().clone().requires_grad_(True)
            out = loss(xr)
            if not out.requires_grad:  # a map that does not depend on X (a flat space's transport)
                return torch.zeros_like(x)
            return torch.autograd.grad(out, xr, allow_unused=True)[0]

        fd = [(gradient(M.retract(X, h * D)) - gradient(M.retract(X, -h * D))) / (2 * h) for h in (_H, _H / 2)]
        ref = (4 * fd[1] - fd[0]) / 3
        xr = X.detach().clone().requires_grad_(True)
        out = loss(xr)
        twice = torch.zeros_like(X)
        if out.requires_grad:
            (g1,) = torch.autograd.grad(out, xr, create_graph=True)
            if g1.requires_grad:
                (g2,) = torch.autograd.grad(_rdot(g1, D), xr, allow_unused=True)
                twice = twice if g2 is None else g2
        fwd = jvp(grad(loss), (X,), (D,))[1]
        tol = _TOL * max(1.0, float(ref.abs().max()))
        for how, got in (("double backward", twice), ("jvp of grad", fwd)):
            err = float((got - ref).abs().max())
            if not err <= tol:  # (NaN fails)
                raise _fail(ctx, f"{how} of {name}: Hessian-vector product in the base point {err:.3g} from finite "
                                 f"differences of the gradient (tol {tol:.3g})")
