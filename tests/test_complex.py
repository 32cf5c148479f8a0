"""Complex tensors (DESIGN.md §6.3, Note [Complex] in ``geofunc/spaces/_base.py``).

A space that does not declare ``accepts_complex`` refuses complex input in every map with a
``ManifoldError`` naming the space and the dtype; torch's gradient convention for a real loss
of a complex tensor makes the embedded defaults (``egrad_to_rgrad``, ``transport``, ``inner``)
right for the spaces that accept them.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES

import geofunc as gf
from geofunc import ManifoldError

# ------------------------------------------------------------------------------------------------
# Refusal: every real space of the conformance list, every map.

# every case but the test adapter of Product (points that are columns of one tensor): Product
# delegates its checks to its factors (test_product_of_real_spaces_refuses_complex)
_REAL_CASES = [c for c in CASES if not c.space.accepts_complex and type(c.space).__module__.startswith("geofunc")]
_MAPS = ("to_manifold", "from_manifold", "rebase", "tangent", "egrad_to_rgrad", "retract", "project",
         "contains", "check", "inner", "sample")


def _calls(space, X, C):
    """``{map: call}`` with one complex argument ``C`` (the other arguments real points ``X``)."""
    return {
        "to_manifold": lambda: space.to_manifold(C),
        "from_manifold": lambda: space.from_manifold(C),
        "rebase": lambda: space.rebase(C, None),
        "tangent": lambda: space.tangent(X, C),
        "egrad_to_rgrad": lambda: space.egrad_to_rgrad(X, C),
        "retract": lambda: space.retract(C, C),
        "project": lambda: space.project(C),
        "contains": lambda: space.contains(C),
        "check": lambda: space.check(C),
        "inner": lambda: space.inner(X, C, C),
        "sample": lambda: space.sample(tuple(X.shape), dtype=torch.complex128),
    }


@pytest.mark.parametrize("case", _REAL_CASES, ids=[c.id for c in _REAL_CASES])
def test_real_spaces_refuse_complex_tensors(case, generator: torch.Generator) -> None:
    space = case.space
    X = space.sample(case.smoke, generator=generator, dtype=torch.float64)
    C = torch.complex(X, torch.ones_like(X))
    name = type(space).__name__
    for what, call in _calls(space, X, C).items():
        with pytest.raises(ManifoldError, match="complex128") as info:
            call()
        msg = str(info.value)
        assert msg.startswith(repr(space)), (what, msg)
        assert "real floating dtype" in msg and name in msg, (what, msg)


def test_the_named_real_spaces_are_in_the_refusal_list() -> None:
    """The issue names SO, Sym, Skew, GLp and SL; each must be among the refusing cases."""
    refusing = {type(c.space) for c in _REAL_CASES}
    for cls in (gf.SO, gf.Sym, gf.Skew, gf.GLp, gf.SL):
        assert cls in refusing and not cls.accepts_complex, cls


def test_product_of_real_spaces_refuses_complex() -> None:
    M = gf.Product(gf.SO(), gf.Sphere())
    X = M.sample(((3, 3), (4,)), dtype=torch.float64)
    with pytest.raises(ManifoldError, match="factor 0: .*complex64"):
        M.project((X[0].to(torch.complex64), X[1]))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_and_integers_are_refused_with_the_dtype_named() -> None:
    with pytest.raises(ManifoldError, match="complex128.*int64"):
        gf.Rn().to_manifold(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ManifoldError, match="complex64 or complex128.*complex32"):
        gf.Rn().to_manifold(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(ManifoldError, match="real floating dtype.*complex32"):
        gf.SO().to_manifold(torch.zeros(2, 2, dtype=torch.complex32))


# ------------------------------------------------------------------------------------------------
# Torch's gradient convention and the embedded defaults, on Rn (which takes complex tensors).


def test_torch_gradient_of_a_real_loss_is_the_real_gradient(generator: torch.Generator) -> None:
    """For ``L(Z)`` real, autograd returns ``∂L/∂X + i ∂L/∂Y`` (``Z = X + iY``), checked against
    central differences in complex128: the gradient for the metric ``Re tr(AᴴB)``."""
    A = torch.randn(3, 3, dtype=torch.complex128, generator=generator)
    Z = torch.randn(3, 3, dtype=torch.complex128, generator=generator)

    def loss(Z):
        W = A @ Z
        return (W.conj() * W).real.sum() + (Z @ Z).real.sum() * (Z.imag ** 3).sum()

    G = torch.func.grad(loss)(Z)
    h = 1e-6
    fd = torch.zeros_like(Z)
    for idx in range(9):
        for unit in (1.0, 1.0j):
            E = torch.zeros(9, dtype=torch.complex128)
            E[idx] = unit
            E = E.reshape(3, 3)
            d = (loss(Z + h * E) - loss(Z - h * E)) / (2 * h)
            fd.view(-1)[idx] += d * unit
    torch.testing.assert_close(G, fd, atol=1e-7, rtol=1e-7)
    # the Riemannian gradient of Rn is that gradient, and inner is Re tr(GᴴV): dL(Z)[V] for any V
    M = gf.Rn()
    V = torch.randn(3, 3, dtype=torch.complex128, generator=generator)
    dL = torch.func.jvp(loss, (Z,), (V,))[1]
    torch.testing.assert_close(M.inner(Z, M.egrad_to_rgrad(Z, G), V).sum(), dL, atol=1e-9, rtol=1e-9)
    assert M.inner(Z, V, V).dtype == torch.float64
    torch.testing.assert_close(M.inner(Z, V, V), V.abs() ** 2, atol=0, rtol=1e-15)


def test_rn_takes_complex_tensors() -> None:
    M = gf.Rn()
    Z = torch.tensor([1 + 2j, complex("nan")], dtype=torch.complex64)
    assert M.to_manifold(Z) is Z
    assert M.contains(Z).tolist() == [True, False]
    assert M.sample((2, 3), dtype=torch.complex64).dtype == torch.complex64
    with pytest.raises(ManifoldError, match="non-finite"):
        M.check(Z)


def test_low_precision_policy_keeps_complex_dtypes() -> None:
    """Under autocast the maps run with autocast off and return complex tensors unchanged in dtype."""
    M = gf.Rn()
    Z = torch.randn(2, 2, dtype=torch.complex64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M.retract(Z, Z).dtype == torch.complex64
        assert M.inner(Z, Z, Z).dtype == torch.float32
