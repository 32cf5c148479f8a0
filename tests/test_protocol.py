"""The space protocol itself (DESIGN.md §6.3): an abstract base with final spaces, and the
metric methods' embedded defaults on every conformance case.

Points, tangent vectors and the embedded metric are computed here from the spaces' public maps
and plain tensor sums; the comparisons are exact up to rounding (float64, 1e-12 relative).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import optree
import pytest
import torch
from cases import CASES
from helpers import needs_torch

import geofunc as gf
import geofunc.nn as gnn
from geofunc.spaces import AbstractSpace

F64 = torch.float64

SPACE_CLASSES = [getattr(gf, name) for name in gf.spaces.__all__ if name != "AbstractSpace"]

# Spaces whose metric is not the ambient one restricted to the tangent spaces: their own tests
# pin inner/egrad_to_rgrad/transport (tests/test_hyperbolic.py, tests/test_birkhoff.py).
NON_EMBEDDED = (gf.PoincareBall, gf.Lorentz, gf.Birkhoff)


def test_abstract_space_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError, match="abstract"):
        AbstractSpace()  # type: ignore[abstract]

    @dataclasses.dataclass(frozen=True)
    class NoRetract(AbstractSpace):
        def _check_shape(self, X: Any, what: str = "X") -> None: ...
        def to_manifold(self, Z: Any, base: Any = None) -> Any: ...
        def _from_manifold(self, X: Any) -> Any: ...
        def tangent(self, X: Any, G: Any) -> Any: ...
        def project(self, Y: Any) -> Any: ...
        def _violations(self, X: Any) -> Any: ...

    with pytest.raises(TypeError, match="retract"):
        NoRetract()  # type: ignore[abstract]


@pytest.mark.parametrize("cls", SPACE_CLASSES, ids=lambda c: c.__name__)
def test_every_space_is_final_and_holds_hyperparameters_only(cls: type) -> None:
    assert getattr(cls, "__final__", False), f"{cls.__name__} is not typing.final"
    assert not inspect.isabstract(cls)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    # no concrete space derives from another concrete one
    assert not any(getattr(base, "__final__", False) for base in cls.__mro__[1:])
    # the fields are the constructor's keyword arguments: nothing hidden in them
    params = set(inspect.signature(cls).parameters) - {"factors", "kwargs"}  # Product(*factors, factors=...)
    assert {f.name for f in dataclasses.fields(cls) if f.init} - {"factors"} == params
    assert all(not f.name.startswith("_") for f in dataclasses.fields(cls))


# A required first hyperparameter (rank, lam) may come by position, as DESIGN's table writes it;
# nothing else (Note [Hyperparameters by keyword]).
FIRST_BY_POSITION = {"AlmostOrthogonal": 0.5, "LowRank": 2, "FixedRank": 2, "PSSDLowRank": 2, "PSSDFixedRank": 2}


@pytest.mark.parametrize("cls", [c for c in SPACE_CLASSES if c.__name__ != "Product"], ids=lambda c: c.__name__)
def test_hyperparameters_are_keyword_only(cls: type) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    positional = [p.name for p in inspect.signature(cls).parameters.values() if p.kind is not p.KEYWORD_ONLY]
    first = FIRST_BY_POSITION.get(cls.__name__)
    assert positional == ([fields[0].name] if first is not None else [])
    args = (first, "expm") if first is not None else (5,)  # GeoTorch's habit: a size first
    with pytest.raises(TypeError, match=rf"^{cls.__name__} takes .*got {len(args)} positional argument") as info:
        cls(*args)
    assert "Sizes are read from the tensors" in str(info.value)
    if first is not None:
        assert cls(first) == cls(**{fields[0].name: first})


def test_a_users_space_with_a_positional_init_is_untouched() -> None:
    """The keyword rule reads each class's own ``__init__``: a user's space that takes arguments by
    position (a non-frozen field order, a hand-written ``__init__``) is built as it says."""

    @dataclasses.dataclass(frozen=True)
    class Scaled(AbstractSpace):
        scale: float = 1.0

        def _check_shape(self, X: Any, what: str = "X") -> None: ...
        def to_manifold(self, Z: Any, base: Any = None) -> Any: return Z * self.scale
        def _from_manifold(self, X: Any) -> Any: ...
        def tangent(self, X: Any, G: Any) -> Any: ...
        def retract(self, X: Any, V: Any) -> Any: ...
        def project(self, Y: Any) -> Any: ...
        def _violations(self, X: Any) -> Any: ...

    assert Scaled(3.0).scale == 3.0
    with pytest.raises(TypeError, match="Scaled takes its hyperparameters by keyword"):
        Scaled(3.0, 4.0)
    assert gf.Product(gf.Sphere(), gf.SO(), gf.Rn()).factors == (gf.Sphere(), gf.SO(), gf.Rn())


def test_dataclasses_replace_of_every_space() -> None:
    """``dataclasses.replace`` builds a space anew from its fields by keyword: ``Product``'s own ``__init__``
    (factors by position) refused ``factors=`` with a TypeError."""
    P = gf.Product(gf.Sphere(), gf.SO())
    assert dataclasses.replace(P) == P and hash(dataclasses.replace(P)) == hash(P)
    assert dataclasses.replace(P, factors=(gf.Sphere(radius=2.0),)) == gf.Product(gf.Sphere(radius=2.0))
    assert gf.Product(factors=[gf.SO(), gf.Rn()]) == gf.Product(gf.SO(), gf.Rn())
    with pytest.raises(TypeError, match="Product takes its factors"):
        gf.Product(gf.SO(), factors=(gf.Rn(),))
    assert dataclasses.replace(gf.Sphere(radius=2.0), radius=3.0) == gf.Sphere(radius=3.0)


def _square(t: torch.Tensor) -> torch.Tensor:
    return t * t


def test_a_space_repr_names_its_callables() -> None:
    """A space's repr names a callable hyperparameter by module and name, not by address, so the repr
    (the start of every error message, the suite's test ids) is the same in every process: pytest-xdist
    refused to run the suite when its workers' ids differed (`<built-in method exp … at 0x7f…>`)."""
    assert repr(gf.GLp(f=(torch.exp, torch.log))) == "GLp(f=(torch.exp, torch.log), triv='expm')"
    assert repr(gf.FixedRank(rank=2, f=[torch.exp, torch.log])) == "FixedRank(rank=2, f=(torch.exp, torch.log), triv='expm')"
    assert repr(gf.PSD(f=_square)) == "PSD(f=test_protocol._square, triv='expm')"
    assert repr(gf.SO(triv=lambda A: A)) == "SO(triv=test_protocol.test_a_space_repr_names_its_callables.<locals>.<lambda>)"
    assert repr(gf.GLp()) == "GLp(f='softplus', triv='expm')" and repr(gf.Sphere(radius=2.0)) == "Sphere(radius=2.0)"
    assert repr(gf.Product((gf.SO(), gf.Sphere()))) == "Product(SO(triv='expm'), Sphere(radius=1.0))"  # its own repr kept
    for space in (gf.GLp(f=(torch.exp, torch.log)), gf.AlmostOrthogonal(lam=0.5, f=(torch.sin, torch.asin))):
        with pytest.raises(gf.ManifoldError) as info:
            space.to_manifold(torch.zeros(3))
        assert str(info.value).startswith(repr(space)) and "0x" not in str(info.value)


def test_sphere_embedded_is_a_pure_space_beside_the_others() -> None:
    assert gnn.SphereEmbeddedSpace is gf.SphereEmbedded
    assert gnn.SphereEmbedded is not gf.SphereEmbedded  # GeoTorch's class keeps its name
    assert not issubclass(gf.SphereEmbedded, gf.Sphere)
    M = gf.SphereEmbedded(radius=2.0)
    Z = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=F64)
    torch.testing.assert_close(M.to_manifold(Z), torch.tensor([[1.2, 1.6], [0.0, -2.0]], dtype=F64), atol=1e-15, rtol=0)
    torch.testing.assert_close(M.to_manifold(*M.from_manifold(M.to_manifold(Z))), M.to_manifold(Z), atol=1e-15, rtol=0)


def _points_and_vectors(case, g: torch.Generator) -> tuple[Any, Any, Any, Any]:
    shape = case.smoke
    M = case.space
    X = M.sample(shape, generator=g, dtype=F64)
    Y = M.sample(shape, generator=g, dtype=F64)
    U = M.tangent(X, torch.randn(shape, generator=g, dtype=F64))
    V = M.tangent(X, torch.randn(shape, generator=g, dtype=F64))
    return X, Y, U, V


EMBEDDED = [c for c in CASES if not isinstance(c.space, NON_EMBEDDED)
            and getattr(getattr(c.space, "space", c.space), "metric", "embedded") == "embedded"]  # complex: wrapped


@pytest.mark.parametrize("case", EMBEDDED, ids=lambda c: c.id)
def test_embedded_metric_defaults(case, generator) -> None:
    """``inner`` is ``Σ U∘V`` over the point's dims, ``egrad_to_rgrad`` is ``tangent``, and
    ``transport(X, Y, V)`` is ``tangent(Y, V)``, a tangent vector at ``Y`` (fixed by ``tangent``)."""
    M = case.space
    X, Y, U, V = _points_and_vectors(case, generator)
    p = M.point_ndim
    embedded = (U * V).sum(dim=tuple(range(-p, 0))) if p else U * V  # Rn: every entry is a point
    torch.testing.assert_close(M.inner(X, U, V), embedded, atol=1e-12 * (1.0 + float((U * V).abs().sum())), rtol=1e-12)
    G = torch.randn(X.shape, generator=generator, dtype=F64)
    torch.testing.assert_close(M.egrad_to_rgrad(X, G), M.tangent(X, G), atol=1e-12, rtol=1e-12)
    T = M.transport(X, Y, V)
    torch.testing.assert_close(T, M.tangent(Y, V), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(M.tangent(Y, T), T, atol=1e-9, rtol=1e-9)


def test_every_space_class_has_a_case_for_the_metric() -> None:
    """No space slips through the list above: each class is under test here or in NON_EMBEDDED."""
    # (a complex space's case wraps it in tests/cases_complex.py's real adapter, as ``.space``)
    covered = {type(getattr(c.space, "space", c.space)) for c in EMBEDDED} | set(NON_EMBEDDED)
    product_factors = {type(f) for c in CASES if hasattr(c.space, "product") for f in c.space.product.factors}
    missing = [cls.__name__ for cls in SPACE_CLASSES if cls not in covered | product_factors and cls is not gf.Product]
    assert not missing, missing


# ------------------------------------------------------------------ empty batches, base dtypes
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_map_takes_an_empty_batch(case) -> None:
    """A batch of zero points maps to an empty result of the right shape, differentiably (the degree
    choice of the exponential read a largest norm with ``amax``, which refuses an empty reduction)."""
    M = case.space
    for shape in case.shapes:
        full = (0, *shape)
        batch = full[: len(full) - M.point_ndim]
        Z = torch.zeros(full, dtype=F64)
        assert M.to_manifold(Z).shape == full
        z = Z.clone().requires_grad_()
        M.to_manifold(z).sum().backward()
        assert z.grad.shape == full
        assert torch.func.grad(lambda z: M.to_manifold(z).sum())(Z).shape == full
        X = M.sample(full, dtype=F64)
        assert X.shape == full
        Zb, base = M.from_manifold(X)
        assert M.to_manifold(Zb, base).shape == full
        assert torch.func.grad(lambda z: M.to_manifold(z, base).sum())(Zb).shape == full
        assert M.to_manifold(*M.rebase(Zb, base)).shape == full
        assert M.project(Z).shape == full
        assert M.contains(X).shape == batch
        M.check(X)
        V = M.tangent(X, Z)
        assert V.shape == full and M.retract(X, V).shape == full
        if case.has_logabsdet and shape[-1] == shape[-2]:
            assert M.logabsdet(Z).shape == full[:-2]



_SOLVE_EX_EMPTY_VMAP = needs_torch((2, 13), "vmap of linalg.solve_ex over an empty batch (2.6 raises an IndexError; "
                                   "2.7-2.12 not tried)")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_SOLVE_EX_EMPTY_VMAP) if c.id == "Birkhoff" else c for c in CASES],
                         ids=lambda c: c.id)
def test_every_map_takes_an_empty_batch_under_vmap(case) -> None:
    """``vmap`` over a batch of zero points (an ensemble or a data-dependent split that comes out empty)
    gives empty results of the right shape, for the maps and for per-sample gradients and jvps. torch's
    vmap cannot run an elementwise op on a 0-dim per-sample tensor over an empty batch (an IndexError
    from ``select``; torch 2.13), so the maps keep a trailing dim on their per-sample scalars (SL's
    scale, Hurwitz's Newton step, GLp's logabsdet) and flatten with ``flatten`` rather than
    ``reshape(-1, …)`` (ambiguous on an empty tensor: the rank family's stacked frames)."""
    M = case.space
    full = (0, *case.smoke)
    Z = torch.randn(full, dtype=F64)
    X = M.sample(full, dtype=F64)
    G = torch.randn(full, dtype=F64)
    vmap = torch.func.vmap
    outs = {
        "to_manifold": vmap(M.to_manifold)(Z),
        "project": vmap(M.project)(Z),
        "from_manifold": vmap(lambda x: M.from_manifold(x)[0])(X),
        "tangent": vmap(M.tangent)(X, G),
        "retract": vmap(M.retract)(X, G),
        "egrad_to_rgrad": vmap(M.egrad_to_rgrad)(X, G),
        "per-sample grad": vmap(torch.func.grad(lambda z: M.to_manifold(z).square().sum()))(Z),
        "per-sample jvp": vmap(lambda z: torch.func.jvp(M.to_manifold, (z,), (z,))[1])(Z),
    }
    for name, out in outs.items():
        assert out.shape == full, (name, out.shape)
    batch = full[: len(full) - M.point_ndim]
    assert vmap(M.inner)(X, G, G).shape == batch
    if case.has_logabsdet:
        assert vmap(M.logabsdet)(Z).shape == full[:-2]

_OTHER = {torch.float64: torch.float32, torch.float32: torch.float64, torch.complex128: torch.complex64}


def _cast(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.to(_OTHER[t.dtype]), tree, none_is_leaf=False)


BASED = [c for c in CASES if optree.tree_leaves(c.space.from_manifold(c.space.sample(c.smoke, dtype=F64))[1])]


@pytest.mark.parametrize("case", BASED, ids=lambda c: c.id)
def test_a_base_of_another_dtype_is_a_manifold_error(case) -> None:
    """A base whose dtype is not ``Z``'s is refused by name in every space that takes a base (it was a
    raw RuntimeError from a product in some, a silent promotion in others); the same pair in one
    dtype works, complex ones included."""
    M = case.space
    inner = getattr(M, "space", M)  # a complex case's real adapter: the complex space raises
    X = M.sample(case.smoke, generator=torch.Generator().manual_seed(0), dtype=F64)
    Z, base = M.from_manifold(X)
    torch.testing.assert_close(M.to_manifold(Z, base), X, atol=1e-9, rtol=1e-9)
    for what, call in (("to_manifold", lambda: M.to_manifold(Z, _cast(base))),
                       ("to_manifold of Z in float32", lambda: M.to_manifold(_cast(Z), base)),
                       ("rebase", lambda: M.rebase(Z, _cast(base))),
                       ("grad of to_manifold", lambda: torch.func.grad(lambda z: M.to_manifold(z, _cast(base)).sum())(Z))):
        with pytest.raises(gf.ManifoldError) as info:
            call()
        msg = str(info.value)
        assert repr(inner) in msg and "dtype" in msg and "tensor(" not in msg, (what, msg)


REAL = [c for c in CASES if not hasattr(c.space, "space")]  # the complex cases are real adapters


@pytest.mark.parametrize("case", REAL, ids=lambda c: c.id)
def test_a_vector_of_another_dtype_is_a_manifold_error(case) -> None:
    """``tangent``/``retract``/``egrad_to_rgrad``/``transport``/``inner`` refuse a vector whose dtype is
    not the point's, by name (it was torch's unnamed dtype error in some spaces, a silent promotion in
    others); a bfloat16 point takes a float32 vector (the low-precision policy upcasts the call, as for
    bases) and returns bfloat16."""
    M = case.space
    g = torch.Generator().manual_seed(0)
    X = M.sample(case.smoke, generator=g, dtype=F64)
    G = torch.randn(X.shape, generator=g, dtype=F64)
    V = M.tangent(X, G)
    calls = {"tangent": lambda v: M.tangent(X, v), "retract": lambda v: M.retract(X, v),
             "egrad_to_rgrad": lambda v: M.egrad_to_rgrad(X, v), "transport": lambda v: M.transport(X, X, v),
             "inner": lambda v: M.inner(X, V, v)}
    for what, call in calls.items():
        with pytest.raises(gf.ManifoldError) as info:
            call(V.float())
        msg = str(info.value)
        assert repr(M) in msg and "dtype" in msg and "tensor(" not in msg, (what, msg)
    Xb = X.to(torch.bfloat16)
    assert M.retract(Xb, M.tangent(Xb, G.float())).dtype == torch.bfloat16
    with pytest.raises(gf.ManifoldError, match=r"of the dtype of `X` \(torch.bfloat16, computed in torch.float32"):
        M.tangent(Xb, G)  # (it named float32 alone: the upcast point's dtype, not the one given)


def test_a_complex_vector_at_a_real_point_is_a_manifold_error() -> None:
    X = gf.Stiefel().sample((5, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    for call in (lambda: gf.Stiefel().tangent(X, X.to(torch.complex128)),
                 lambda: gf.Stiefel().tangent(X.to(torch.complex128), X),
                 lambda: gf.Sphere().retract(X[:, 0], X[:, 1].to(torch.complex128))):
        with pytest.raises(gf.ManifoldError, match="dtype"):
            call()


@pytest.mark.parametrize("case", BASED, ids=lambda c: c.id)
def test_a_base_on_another_device_is_a_manifold_error(case) -> None:
    """A base on another device than ``Z`` (here ``meta`` against the CPU: no accelerator needed) is
    refused by name, not left to torch's device error, which names neither the space nor the argument."""
    M = case.space
    inner = getattr(M, "space", M)
    Z, base = M.from_manifold(M.sample(case.smoke, generator=torch.Generator().manual_seed(0), dtype=F64))
    meta = optree.tree_map(lambda t: t.to("meta"), base, none_is_leaf=False)
    with pytest.raises(gf.ManifoldError) as info:
        M.to_manifold(Z, meta)
    msg = str(info.value)
    assert repr(inner) in msg and "device" in msg and "meta" in msg, msg


@pytest.mark.parametrize("case", BASED, ids=lambda c: c.id)
def test_a_base_whose_batch_does_not_broadcast_is_a_manifold_error(case) -> None:
    """A base of 3 points for 2 (or 0) raw tensors is refused by name in every space that takes a base (the
    factorized spaces, SL and Hurwitz left it to torch's broadcast error inside a product); a base of
    one point, or of 3 points for a raw batch (2, 1) or (1,), broadcasts."""
    M = case.space
    inner = getattr(M, "space", M)
    g = torch.Generator().manual_seed(0)
    shape = tuple(case.smoke)
    Z, base = M.from_manifold(M.sample((3, *shape), generator=g, dtype=F64))
    for batch in ((2,), (0,), (3, 2)):
        Zx = torch.zeros((*batch, *Z.shape[1:]), dtype=Z.dtype)
        for what, call in (("to_manifold", lambda: M.to_manifold(Zx, base)), ("rebase", lambda: M.rebase(Zx, base))):
            with pytest.raises(gf.ManifoldError) as info:
                call()
            msg = str(info.value)
            assert repr(inner) in msg and "broadcast" in msg and "tensor(" not in msg, (what, batch, msg)
    X = M.to_manifold(Z[:1].expand(Z.shape), base)  # Z[0] at each of the 3 bases
    for batch, out in (((2, 1), (2, 3)), ((1,), (3,))):
        Y = M.to_manifold(Z[:1].expand(*batch, *Z.shape[1:]), base)
        assert Y.shape == (*out, *X.shape[1:])
        torch.testing.assert_close(Y.reshape(-1, *X.shape)[-1], X, atol=1e-12, rtol=1e-12)


_SOFTPLUS_SPACES = (gf.FixedRank, gf.GLp, gf.PSD, gf.PSSDFixedRank, gf.SL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dtype_coords_are_the_values_of_softplus(case) -> None:
    """``_dtype_coords`` (what a module's dtype change re-expresses, Note [Raw tensors across dtypes])
    names exactly the raw entries whose values are ``softplus(s) + √ε``: for the ``"softplus"`` spaces,
    ``softplus`` of them plus float64's floor are the point's singular values (eigenvalues for ``PSD``;
    for ``SL``, of its ``GLp`` point before normalization), computed here by ``svdvals``/``eigvalsh``;
    ``Hurwitz``'s raw diagonal (its factor W's eigenvalues, softplus with a floor in bf16/fp16 only);
    None for every other space."""
    M = getattr(case.space, "space", case.space)
    X = case.space.sample(case.smoke, generator=torch.Generator().manual_seed(0), dtype=F64)
    if M is not case.space:  # a complex space's real adapter: (re, im) pairs in the last dim
        X = torch.view_as_complex(X.contiguous())
    Z, base = M.from_manifold(X)
    view = M._dtype_coords(Z) if isinstance(Z, torch.Tensor) else None
    if isinstance(M, gf.Hurwitz):  # W's values: softplus, floored only in bf16/fp16 (Note [Hurwitz floor of the stored dtype])
        assert view is not None and M._coords_floor(F64) == 0.0 and M._coords_floor(torch.float32) == 0.0
        assert M._coords_floor(torch.bfloat16) == torch.finfo(torch.bfloat16).eps ** 0.5
        expected = torch.linalg.eigvalsh(M._psd.to_manifold(Z, base)).flip(-1)
        values = torch.nn.functional.softplus(view)
        torch.testing.assert_close(values.sort(-1, descending=True).values, expected, atol=1e-9, rtol=1e-9)
        assert view.data_ptr() == Z.diagonal(dim1=-2, dim2=-1).data_ptr()
        return
    if not (isinstance(M, _SOFTPLUS_SPACES) and getattr(M, "f", None) == "softplus"):
        assert view is None
        return
    assert view is not None
    values = torch.nn.functional.softplus(view) + torch.finfo(F64).eps ** 0.5
    W = M._glp.to_manifold(Z, base) if isinstance(M, gf.SL) else X
    if isinstance(M, gf.PSD):
        expected = torch.linalg.eigvalsh(W).flip(-1)
    else:
        expected = torch.linalg.svdvals(W)[..., : values.shape[-1]]
    torch.testing.assert_close(values.sort(-1, descending=True).values, expected, atol=1e-9, rtol=1e-9)
    assert view.data_ptr() == Z.diagonal(dim1=-2, dim2=-1).data_ptr()  # a view: writes reach Z


_ONE_CASE_PER_CLASS = list({type(c.space): c for c in reversed(REAL)}.values())


@pytest.mark.parametrize("case", _ONE_CASE_PER_CLASS, ids=lambda c: c.id)
def test_a_bad_atol_or_generator_is_a_manifold_error(case) -> None:
    """``contains``/``check`` with a negative or NaN ``atol`` refused every point silently (``v <= atol``
    is False), and a non-number raised torch's or Python's unnamed error; ``sample`` with a generator
    that is not a ``torch.Generator`` raised an AttributeError. Now each is a ``ManifoldError`` naming
    the argument; 0, inf and a one-element tensor are valid tolerances."""
    M = case.space
    X = M.sample(case.smoke, generator=torch.Generator().manual_seed(0), dtype=F64)
    for atol in (-1.0, float("nan"), "x", [1e-3], torch.ones(2), True):
        for call in (M.contains, M.check):
            with pytest.raises(gf.ManifoldError, match="`atol`") as info:
                call(X, atol=atol)
            assert repr(M) in str(info.value)
    assert bool(M.contains(X, atol=float("inf")).all())
    assert M.contains(X, atol=0.0).shape == M.contains(X).shape
    assert torch.equal(M.contains(X, atol=torch.tensor(1e-6)), M.contains(X, atol=1e-6))
    for generator in (5, "seed", torch.Generator().get_state()):
        with pytest.raises(gf.ManifoldError, match="`generator`"):
            M.sample(case.smoke, generator=generator, dtype=F64)
    # a bad dtype is named as the dtype (it read "expected `shape` of a floating dtype, got a tensor of shape ...")
    for dtype in (torch.int32, torch.bool, "float32", torch.complex32):
        with pytest.raises(gf.ManifoldError, match="expected `dtype`") as info:
            M.sample(case.smoke, dtype=dtype)
        assert repr(M) in str(info.value) and "`shape`" not in str(info.value)
    # complex32 was refused only after torch's "ComplexHalf support is experimental" UserWarning (an
    # error under filterwarnings=error) from a tensor of it made to read the dtype; a bad device was
    # torch's RuntimeError from inside the sampler
    for device in ("no-such-device", [0]):
        with pytest.raises(gf.ManifoldError, match="expected `device`") as info:
            M.sample(case.smoke, dtype=F64, device=device)
        assert repr(M) in str(info.value)


@pytest.mark.parametrize("case", REAL, ids=lambda c: c.id)
def test_transport_names_the_vector_it_refuses(case) -> None:
    """``transport(X, Y, V)`` with a ``V`` of another point shape named ``G`` (the projection's argument)."""
    M = case.space
    g = torch.Generator().manual_seed(0)
    X, Y = M.sample(case.smoke, generator=g, dtype=F64), M.sample(case.smoke, generator=g, dtype=F64)
    bad = torch.zeros(*X.shape[:-1], X.shape[-1] + 1, dtype=F64)
    with pytest.raises(gf.ManifoldError) as info:
        M.transport(X, Y, bad)
    assert "`V`" in str(info.value) and "`G`" not in str(info.value), str(info.value)


# Spaces with attributes derived from their hyperparameters (geofunc.spaces._base.cached_attribute).
_DERIVED = [
    (gf.GLp(), (2, 5, 5)),
    (gf.SL(), (2, 4, 4)),
    (gf.PSD(), (2, 5, 5)),
    (gf.FixedRank(rank=2), (2, 6, 4)),
    (gf.PSSDFixedRank(rank=2), (2, 5, 5)),
    (gf.AlmostOrthogonal(lam=0.5), (2, 6, 4)),
    (gf.Hurwitz(), (2, 4, 4)),
]


@pytest.mark.parametrize(("space", "shape"), _DERIVED, ids=[type(M).__name__ for M, _ in _DERIVED])
def test_compile_a_space_before_any_eager_call(space, shape) -> None:
    # A new instance, compiled with fullgraph before anything ran eagerly (Dynamo's tracing: the backend
    # does not matter). Python 3.11's functools.cached_property computed its value under an RLock that
    # Dynamo cannot trace ("Unsupported context manager"), and Hurwitz's derived PSD, made inside the
    # trace, could not be stored back ("Reconstruction failure").
    torch._dynamo.reset()
    M = dataclasses.replace(space)
    Z = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    X = torch.compile(lambda z: M.to_manifold(z), fullgraph=True, backend="aot_eager")(Z)
    torch.testing.assert_close(X, M.to_manifold(Z), rtol=1e-10, atol=1e-10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaledSphere(AbstractSpace):
    """A user's space written as CONTRIBUTING.md says: a value derived from the hyperparameters is a
    ``functools.cached_property``."""

    scale: float = 1.0
    point_ndim = 1

    @functools.cached_property
    def _half(self) -> float:
        return 0.5 * self.scale

    def _check_shape(self, X, what="X"):
        self._require_vector(X, what)

    def to_manifold(self, Z, base=None):
        return 2.0 * self._half * Z / torch.linalg.vector_norm(Z, dim=-1, keepdim=True)

    def _from_manifold(self, X):
        return X, None

    def tangent(self, X, G):
        return G - (G * X).sum(-1, keepdim=True) * X / self.scale**2

    def retract(self, X, V):
        return self.project(X + V)

    def project(self, Y):
        return self.scale * Y / torch.linalg.vector_norm(Y, dim=-1, keepdim=True)

    def _violations(self, X):
        return {"|‖x‖ − scale|": (torch.linalg.vector_norm(X, dim=-1) - self.scale).abs()}


def test_compile_a_user_space_with_a_cached_property_before_any_eager_call() -> None:
    # Python 3.11's functools.cached_property computes under an RLock that Dynamo cannot trace
    # ("Unsupported context manager"): a user's space following CONTRIBUTING.md failed under
    # torch.compile(fullgraph=True) until something had read the property eagerly. AbstractSpace makes
    # each one a lock-free cached_attribute; the cached value is still the instance's own.
    torch._dynamo.reset()
    M = _ScaledSphere(scale=2.0)
    Z = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    X = torch.compile(lambda z: M.to_manifold(z), fullgraph=True, backend="eager")(Z)
    torch.testing.assert_close(X, M.to_manifold(Z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.linalg.vector_norm(X, dim=-1), torch.full((3,), 2.0, dtype=F64), rtol=1e-12, atol=1e-12)
    assert M._half == 1.0 and _ScaledSphere(scale=3.0)._half == 1.5 and vars(M)["_half"] == 1.0


@needs_torch((2, 13), "Dynamo tracing the construction of a frozen dataclass (2.6 cannot; tested on 2.13)")
@pytest.mark.parametrize("make", [gf.GLp, gf.Hurwitz], ids=["GLp", "Hurwitz"])
def test_compile_a_space_made_inside_the_compiled_function(make) -> None:
    # The derived attributes are then computed while Dynamo traces __post_init__: lock-free.
    torch._dynamo.reset()
    Z = torch.randn(2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    X = torch.compile(lambda z: make().to_manifold(z), fullgraph=True, backend="aot_eager")(Z)
    torch.testing.assert_close(X, make().to_manifold(Z), rtol=1e-10, atol=1e-10)


# A float argument of a compiled function that builds a space: at its second value Dynamo's automatic
# dynamic shapes trace it as a symbolic float (one graph for every later value), and the space is built
# from that symbolic float while the function is traced.
_MADE_FROM_A_FLOAT = [
    (lambda v: gf.Sphere(radius=v), (5, 4)),
    (lambda v: gf.SphereEmbedded(radius=v), (5, 4)),
    (lambda v: gf.PoincareBall(c=v / 4), (5, 4)),
    (lambda v: gf.Lorentz(k=v), (5, 4)),
    (lambda v: gf.Hurwitz(alpha=v), (2, 3, 3)),
    (lambda v: gf.AlmostOrthogonal(lam=v / 4), (2, 4, 3)),
]


@needs_torch((2, 13), "Dynamo tracing the construction of a frozen dataclass (2.6 cannot; tested on 2.13)")
@pytest.mark.parametrize(("make", "shape"), _MADE_FROM_A_FLOAT,
                         ids=["Sphere", "SphereEmbedded", "PoincareBall", "Lorentz", "Hurwitz", "AlmostOrthogonal"])
def test_compile_a_space_made_inside_from_a_float_argument(make, shape) -> None:
    """``torch.compile(fullgraph=True)`` of ``lambda v, z: Sphere(radius=v)...``, called with a second
    value of ``v``: the validation of the hyperparameter called ``math.isfinite`` on the symbolic float
    (Dynamo: "torch.* op returned non-Tensor") and ``AlmostOrthogonal`` formatted ``lam`` into its
    violation's name; each raised at every value after the first. Values equal eager's (float64)."""

    def maps(v, Z):
        M = make(v)
        X = M.to_manifold(Z)
        return X, M.contains(X)

    torch._dynamo.reset()
    compiled = torch.compile(maps, fullgraph=True, backend="eager")
    Z = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    try:
        for v in (2.0, 3.0):  # the second value is the symbolic one
            _same_leaves(compiled(v, Z), maps(v, Z))
    finally:
        torch._dynamo.reset()


# Spaces with a float hyperparameter, which torch.compile(dynamic=True) traces as a symbolic float.
_FLOAT_HYPER = [
    (gf.AlmostOrthogonal(lam=0.5), (4, 3)),
    (gf.AlmostOrthogonal(lam=0.3, f="sigmoid"), (3, 3)),
    (gf.Sphere(radius=2.5), (4,)),
    (gf.SphereEmbedded(radius=2.0), (4,)),
    (gf.PoincareBall(c=0.5), (4,)),
    (gf.Lorentz(k=2.0), (4,)),
    (gf.Hurwitz(alpha=0.5), (3, 3)),
]


@pytest.mark.parametrize(("space", "point"), _FLOAT_HYPER, ids=[repr(M) for M, _ in _FLOAT_HYPER])
def test_compile_dynamic_with_a_float_hyperparameter(space, point) -> None:
    """``torch.compile(fullgraph=True, dynamic=True)`` of every map: Dynamo then traces a float attribute
    of the space it closes over as a symbolic float, and ``AlmostOrthogonal.contains`` formatted ``lam``
    into the name of its violation (an f-string of a symbolic float: a graph break, refused under
    fullgraph). Values equal eager's on two batch sizes (float64)."""
    M = space

    def maps(X, G, H, Y, Z):
        Z0, base = M.from_manifold(X)
        V = M.tangent(X, H)
        return (M.to_manifold(Z), Z0, base, M.to_manifold(Z0 + 0.1 * Z, base), M.rebase(Z0 + 0.1 * Z, base),
                M.tangent(X, G), M.retract(X, 0.3 * V), M.project(Y), M.contains(X), M.inner(X, V, V),
                M.transport(X, X, V))

    torch._dynamo.reset()
    compiled = torch.compile(maps, fullgraph=True, backend="eager", dynamic=True)
    g = torch.Generator().manual_seed(0)
    try:
        for batch in (5, 7):
            shape = (batch, *point)
            args = (M.sample(shape, generator=g, dtype=F64), *(torch.randn(shape, generator=g, dtype=F64) for _ in range(4)))
            _same_leaves(compiled(*args), maps(*args))
    finally:
        torch._dynamo.reset()


def _same_leaves(got: Any, expected: Any) -> None:
    """The compiled maps' results equal the eager ones: booleans exactly, values to 1e-10 (float64)."""
    got, expected = optree.tree_leaves(got), optree.tree_leaves(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if b.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("cls", [gf.LowRank, gf.FixedRank, gf.PSSDLowRank, gf.PSSDFixedRank], ids=lambda c: c.__name__)
def test_compile_a_function_of_the_space_for_two_ranks(cls) -> None:
    """One compiled function that takes the space as an argument, called with ``rank=1`` and then
    ``rank=2``: Dynamo's automatic dynamic shapes make ``rank`` a symbolic int at the second call, and
    the maps formatted it into strings on their success path (the name of a violation in
    ``contains``, the expected shapes of a base in ``to_manifold(Z, base)``/``rebase``), which
    Dynamo cannot do: fullgraph=True refused them (Note [No f-string of a size or rank in a map])."""
    def maps(M, X, Z):
        Z0, base = M.from_manifold(X)
        return M.to_manifold(Z0 + 0.1 * Z, base), M.rebase(Z0 + 0.1 * Z, base), M.contains(X), M.project(Z)

    torch._dynamo.reset()
    compiled = torch.compile(maps, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    try:
        for rank in (1, 2):
            M = cls(rank=rank)
            X = M.sample((2, 5, 5), generator=g, dtype=F64)
            Z = torch.randn(2, 5, 5, generator=g, dtype=F64)
            _same_leaves(compiled(M, X, Z), maps(M, X, Z))
    finally:
        torch._dynamo.reset()


class _Passthrough(torch.Tensor):
    """A tensor subclass that overrides ``__torch_function__`` only (as torchvision's ``tv_tensors`` or a
    user's logging tensor do): its values are real."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("case", REAL, ids=lambda c: c.id)
def test_from_manifold_checks_a_torch_function_subclass(case) -> None:
    """``from_manifold`` of an off-space point raises ``ManifoldError`` when the point is a
    ``__torch_function__`` subclass, as for a plain tensor: ``can_check`` read every subclass as a
    tracer's (no values), so the check was skipped and a raw tensor for another point came back
    without an error. A point on the space round-trips."""
    M = case.space
    g = torch.Generator().manual_seed(0)
    X = M.sample(case.smoke, generator=g, dtype=F64)
    Y = case.off_manifold(X) if case.off_manifold is not None else None
    Y = torch.full_like(X, float("nan")) if Y is None else Y
    with pytest.raises(gf.ManifoldError):
        M.from_manifold(Y)
    with pytest.raises(gf.ManifoldError) as info:
        M.from_manifold(Y.as_subclass(_Passthrough))
    assert repr(M) in str(info.value)
    Z, base = M.from_manifold(X.as_subclass(_Passthrough))
    torch.testing.assert_close(M.to_manifold(Z, base).as_subclass(torch.Tensor), X, rtol=1e-8, atol=1e-8)


def test_a_tracer_subclass_is_still_not_read() -> None:
    """Subclasses that override ``__torch_dispatch__`` (FakeTensor here) have no values: no check reads them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from geofunc.spaces._base import can_check

    assert can_check(torch.ones(2).as_subclass(_Passthrough))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(3, 3))
        assert not can_check(fake)
        Z, _ = gf.SO().from_manifold(fake)  # shapes only: no check, no error
    assert Z.shape == (3, 3)


_FAKE_CASES = [(gf.LowRank(4), (96, 96)), (gf.FixedRank(4), (96, 96)), (gf.PSSDLowRank(4), (96, 96)),
               (gf.PSSDFixedRank(4), (2, 96, 96)), (gf.Stiefel(), (80, 32)), (gf.Grassmannian(), (80, 32))]


@pytest.mark.parametrize("space, shape", _FAKE_CASES, ids=[f"{type(m).__name__}{s}" for m, s in _FAKE_CASES])
def test_real_points_under_fake_tensor_mode_read_no_fake_value(space, shape) -> None:
    """FakeTensorMode(allow_non_fake_inputs=True) over real points (a memory or FLOP estimate of a forward or
    an optimizer step with the real parameters): the fast paths read values of their own, there fake,
    intermediates and raised DataDependentOutputException (the rank family's sketched contains, tangent,
    project and transport from 64², the frame exponential's to_manifold from k = 32): Note [Fast paths under
    FakeTensorMode]. The maps give fake results of the right shapes, as for fake inputs."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    g = torch.Generator().manual_seed(0)
    X = space.sample(shape, generator=g)
    Z, base = space.from_manifold(X)
    V = space.tangent(X, torch.randn(shape, generator=g))
    with FakeTensorMode(allow_non_fake_inputs=True):
        outs = {"contains": space.contains(X), "to_manifold": space.to_manifold(Z, base), "tangent": space.tangent(X, V),
                "project": space.project(X + V), "transport": space.transport(X, X, V), "retract": space.retract(X, V)}
    for name, out in outs.items():
        assert isinstance(out, FakeTensor), name
        assert out.shape == (X.shape[:-2] if name == "contains" else X.shape), name


@pytest.mark.parametrize("space, shape", _FAKE_CASES, ids=[f"{type(m).__name__}{s}" for m, s in _FAKE_CASES])
def test_check_and_from_manifold_of_real_points_under_fake_tensor_mode(space, shape) -> None:
    """Under FakeTensorMode(allow_non_fake_inputs=True) the check's measures of a real point are fake: from_manifold
    skips the check (as for a FakeTensor point) and gives fake results, check raises ManifoldError naming the mode
    (both raised torch's DataDependentOutputException: a gf.nn weight assigned inside a FLOP/memory estimate)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    X = space.sample(shape, generator=torch.Generator().manual_seed(0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        Z, _ = space.from_manifold(X)
        with pytest.raises(gf.ManifoldError, match="FakeTensorMode"):
            space.check(X)
    assert isinstance(Z, FakeTensor) and Z.shape == X.shape
    space.check(X)  # (a real check after the mode)


def test_a_tensor_hyperparameter_is_described_not_dumped():
    """Errors name shapes, never tensor dumps: ``AlmostOrthogonal(lam=torch.tensor(0.2))`` printed
    ``tensor(0.2000)`` twice (in the space's name and as what it got)."""
    for make in (lambda: gf.AlmostOrthogonal(lam=torch.tensor(0.2)), lambda: gf.Sphere(radius=torch.tensor(2.0)),
                 lambda: gf.LowRank(rank=torch.tensor(2))):
        with pytest.raises(gf.ManifoldError) as info:
            make()
        assert "tensor(" not in str(info.value) and "a tensor of shape ()" in str(info.value), str(info.value)


def test_product_metric_is_the_sum_of_its_factors_metrics(generator) -> None:
    """``Product``'s ``inner``, ``egrad_to_rgrad`` and ``transport`` are its factors', each with its own
    metric (the conformance Product case has embedded factors only, where a Product that ignored its
    factors' metrics, summed the first factor's inner only or skipped a factor's transport would pass)."""
    factors = (gf.PSD(metric="affine"), gf.Stiefel(metric="canonical"), gf.Sphere(radius=2.0))
    M = gf.Product(*factors)
    shapes = ((2, 3, 3), (2, 5, 2), (2, 4))
    X = tuple(f.sample(s, generator=generator, dtype=F64) for f, s in zip(factors, shapes))
    Y = tuple(f.sample(s, generator=generator, dtype=F64) for f, s in zip(factors, shapes))
    U, V, G = (tuple(f.tangent(x, torch.randn(s, generator=generator, dtype=F64)) for f, x, s in zip(factors, X, shapes))
               for _ in range(3))
    torch.testing.assert_close(M.inner(X, U, V), sum(f.inner(x, u, v) for f, x, u, v in zip(factors, X, U, V)),
                               atol=1e-12, rtol=1e-12)
    for got, f, x, g in zip(M.egrad_to_rgrad(X, G), factors, X, G):
        torch.testing.assert_close(got, f.egrad_to_rgrad(x, g), atol=1e-12, rtol=1e-12)
    for got, f, x, y, v in zip(M.transport(X, Y, V), factors, X, Y, V):
        torch.testing.assert_close(got, f.transport(x, y, v), atol=1e-12, rtol=1e-12)
    # and the metrics differ from the embedded one, so the test can tell them apart
    assert not torch.allclose(M.inner(X, U, V), sum((u * v).flatten(1).sum(-1) for u, v in zip(U, V)))


def test_every_public_method_of_every_space_is_annotated():
    """geofunc ships py.typed: a parameter without an annotation is ``Any`` to mypy and *unknown* to
    pyright, whose strict mode reports every call of such a method in a correct user program
    (``gf.Stiefel().sample((5, 3))``: 'Type of "sample" is partially unknown'). The ``sample``
    overrides of 16 of the 24 spaces had unannotated ``shape``, ``generator``, ``dtype`` and ``device``.
    Every public method of every exported space annotates its parameters as the base class does."""
    import typing

    bad = []
    for name in gf.__all__:
        cls = getattr(gf, name)
        if not (isinstance(cls, type) and issubclass(cls, AbstractSpace)):
            continue
        for attr in dir(cls):
            fn = getattr(cls, attr)
            if attr.startswith("_") or not callable(fn) or isinstance(fn, type):
                continue
            hints = typing.get_type_hints(fn)  # the wrappers of the policy keep the maps' own annotations
            params = inspect.signature(fn).parameters.values()
            missing = [p.name for p in params if p.name != "self" and p.name not in hints
                       and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            missing += [] if "return" in hints else ["return"]
            if missing:
                bad.append(f"{name}.{attr}: {', '.join(missing)}")
    assert not bad, "public methods of spaces without annotations:\n  " + "\n  ".join(bad)


def test_a_shape_error_inside_torch_compile() -> None:
    """README (Errors): a shape error raised while Dynamo traces is the ManifoldError without fullgraph;
    with fullgraph=True torch reports it as Unsupported, quoting the ManifoldError's message."""
    X = gf.Birkhoff().sample((2, 3, 3), generator=torch.Generator().manual_seed(0))
    G = torch.zeros(2, 3, 4)
    B = gf.Birkhoff()  # built outside: torch 2.6's Dynamo cannot trace building a space

    def f(X, G):
        return B.tangent(X, G)

    torch._dynamo.reset()
    with pytest.raises(gf.ManifoldError, match="square matrices"):
        torch.compile(f, backend="eager")(X, G)
    torch._dynamo.reset()
    with pytest.raises((gf.ManifoldError, torch._dynamo.exc.Unsupported), match="square matrices"):  # Unsupported on 2.13
        torch.compile(f, backend="eager", fullgraph=True)(X, G)
    torch._dynamo.reset()


@pytest.mark.parametrize("case", REAL, ids=lambda c: c.id)
def test_check_under_vmap_says_to_use_contains(case) -> None:
    """``check`` reads values, which vmap cannot: inside ``vmap`` every call (on the space or off it) raised
    torch's "data-dependent control flow" RuntimeError, naming neither the space nor ``contains``
    (Note [check under vmap]). Now a ``ManifoldError`` that names both; under ``grad`` (values there) it
    still checks, and ``contains`` under vmap gives the verdicts."""
    M = case.space
    g = torch.Generator().manual_seed(0)
    X = M.sample((2, *case.smoke), generator=g, dtype=F64)
    with pytest.raises(gf.ManifoldError, match="contains") as info:
        torch.func.vmap(M.check)(X)
    assert repr(M) in str(info.value)
    assert torch.equal(torch.func.vmap(M.contains)(X), M.contains(X))
    Y = case.off_manifold(X) if case.off_manifold is not None else None
    if Y is not None:
        with pytest.raises(gf.ManifoldError, match="on the space"):
            torch.func.grad(lambda y: (M.check(y), y.sum())[1])(Y)


def test_check_of_an_unbatched_point_under_vmap() -> None:
    """A point closed over by the vmapped function (not batched) has values to read: ``check`` and
    ``from_manifold`` of it measure it under vmap as outside (Note [check under vmap]); only a batched
    point is refused."""
    M = gf.Stiefel()
    X0 = M.sample((5, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    zs = torch.randn(3, 5, 2, dtype=F64)

    def f(z):
        Z0, base = M.from_manifold(X0)
        return M.to_manifold(Z0 + 0.1 * z, base)

    got = torch.func.vmap(f)(zs)
    Z0, base = M.from_manifold(X0)
    torch.testing.assert_close(got, M.to_manifold(Z0 + 0.1 * zs, base), rtol=0, atol=1e-12)
    with pytest.raises(gf.ManifoldError, match="on the space"):
        torch.func.vmap(lambda z: (M.from_manifold(2 * X0), z)[1])(zs)
    with pytest.raises(gf.ManifoldError, match="on the space"):
        torch.func.vmap(torch.func.grad(lambda z: (M.check(2 * X0), z.sum())[1]))(zs)
    with pytest.raises(gf.ManifoldError, match="contains"):  # batched (under grad too): refused
        torch.func.vmap(torch.func.grad(lambda x: (M.check(x), x.sum())[1]))(torch.stack([X0, X0]))


def test_registration_inside_vmap_reads_its_unbatched_weight() -> None:
    """A module built and constrained inside a vmapped function has a plain weight, whose values the
    registration reads (``gf.nn.sln`` of an off-SL weight: the base check of its projection): it registers
    there as outside vmap (it raised "expected `check` outside torch.func.vmap")."""
    xs = torch.randn(3, 2, 4, dtype=F64)

    def f(x):
        m = torch.nn.Linear(4, 4, dtype=F64)
        with torch.no_grad():
            m.weight.copy_(torch.eye(4, dtype=F64) + 0.1 * torch.arange(16, dtype=F64).reshape(4, 4) / 16)
        gf.nn.sln(m, "weight")
        return m.weight + 0.0 * x.sum()

    W = torch.func.vmap(f, randomness="same")(xs)
    torch.testing.assert_close(torch.linalg.det(W), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)


def test_complex_project_compiles_in_one_graph() -> None:
    """torch.compile(fullgraph=True) of a complex space's project: sanitize asks dispatch_mode_active, which is
    False while Dynamo traces (the dispatch stack's length is no op Dynamo can trace: 'torch.* op returned
    non-Tensor')."""
    g = torch.Generator().manual_seed(0)
    U = gf.Unitary()
    X = U.sample((4, 4), dtype=torch.complex128, generator=g)
    Y = X + 0.1 * torch.randn(4, 4, dtype=torch.complex128, generator=g)
    torch._dynamo.reset()
    got = torch.compile(U.project, fullgraph=True, backend="eager")(Y)
    torch.testing.assert_close(got, U.project(Y), rtol=1e-12, atol=1e-12)
