"""Inputs a space cannot take, given to every public method of every space: each is a
``ManifoldError`` naming the space, what it expected and what it got (DESIGN §5), never a raw
``RuntimeError``/``IndexError`` from the linear algebra underneath (``Hurwitz.check`` once sent a
vector, a non-square matrix or an integer tensor straight to ``torch.linalg.eigvals``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import CASES

import geofunc as gf
from geofunc.testing import implements

# the spaces themselves: a complex case's real adapter unwrapped; the test-only Product adapter
# (cases_rank) has the real gf.Product under test in tests/test_rank.py
SPACES = {c.id: getattr(c.space, "space", c.space) for c in CASES}
SPACES = {k: M for k, M in SPACES.items() if type(M).__module__.startswith("geofunc.")}


def _bad_inputs(M: gf.AbstractSpace) -> dict[str, object]:
    dt = torch.complex128 if isinstance(M, (gf.Unitary, gf.Hermitian)) else torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        c32 = torch.ones(4, 4, dtype=torch.complex32)
    bad: dict[str, object] = {
        "an integer tensor": torch.ones(4, 4, dtype=torch.int64),
        "a bool tensor": torch.ones(4, 4, dtype=torch.bool),
        "a complex32 tensor": c32,
        "a nested list": [[1.0, 0.0], [0.0, 1.0]],
    }
    if not isinstance(M, gf.Rn):  # every tensor is a point of Rn
        bad["a 0-dim tensor"] = torch.tensor(1.0, dtype=dt)
    if M.point_ndim == 2:
        bad["a vector"] = torch.ones(4, dtype=dt)
    square = not isinstance(M, (gf.Rn, gf.Stiefel, gf.Grassmannian, gf.Oblique, gf.LowRank, gf.FixedRank,
                                gf.AlmostOrthogonal, gf.Sphere, gf.PoincareBall, gf.Lorentz, gf.SphereEmbedded))
    if square:
        bad["a non-square matrix"] = torch.ones(4, 3, dtype=dt)
        bad["a 4×0 matrix"] = torch.ones(4, 0, dtype=dt)
    return bad


@pytest.mark.parametrize("name", list(SPACES))
def test_every_method_refuses_what_the_space_cannot_take_by_name(name: str) -> None:
    M = SPACES[name]
    for what, Y in _bad_inputs(M).items():
        for method in ("check", "contains", "to_manifold", "from_manifold", "project"):
            with pytest.raises(gf.ManifoldError) as info:
                getattr(M, method)(Y)
            msg = str(info.value)
            assert type(M).__name__ in msg and "expected" in msg and "got" in msg, (method, what, msg)


@pytest.mark.parametrize("name", list(SPACES))
def test_float8_is_refused_by_name(name: str) -> None:
    """float8 dtypes (torchao's FP8 weights) are floating dtypes without arithmetic: the dtype check let
    them through, and every method raised torch's NotImplementedError ('"tril" not implemented for
    Float8_e4m3fn', '"normal_kernel_cpu" ...' from sample) or, for Rn, passed the tensor through
    (Note [Floating dtypes without arithmetic] in spaces/_base.py)."""
    M = SPACES[name]
    shape = (4,) if M.point_ndim == 1 else (4, 4)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        Y = torch.zeros(shape).to(dtype)
        calls = {m: (lambda m=m: getattr(M, m)(Y)) for m in ("check", "contains", "to_manifold", "from_manifold", "project")}
        calls["sample"] = lambda: M.sample(shape, dtype=dtype)
        for method, call in calls.items():
            with pytest.raises(gf.ManifoldError) as info:
                call()
            msg = str(info.value)
            assert type(M).__name__ in msg and "expected" in msg and "float8" in msg, (method, dtype, msg)


def test_a_callable_triv_of_another_shape_or_dtype_is_refused() -> None:
    """A callable ``triv``'s result was used as it came (Note [A callable triv's result]): one that dropped a
    row and column gave SO a (3, 3) point for a (4, 4) raw tensor, one that added a batch dim (2, ...) points,
    one in float64 float64 points from float32, without an error; the frame spaces raised torch's matmul
    errors, a non-tensor result an AttributeError. Each is a ManifoldError naming `triv`; a valid callable
    (and the names) still give the same points."""
    expm = torch.linalg.matrix_exp
    bad = {"short": lambda A: expm(A)[..., :-1, :-1], "batch": lambda A: expm(A).expand(2, *A.shape),
           "float64": lambda A: expm(A).double(), "number": lambda A: 1.0}
    g = torch.Generator().manual_seed(0)
    cases = [(gf.SO, {}, (4, 4)), (gf.Stiefel, {}, (5, 3)), (gf.Grassmannian, {}, (5, 3)), (gf.LowRank, {"rank": 2}, (5, 4)),
             (gf.GLp, {}, (4, 4)), (gf.AlmostOrthogonal, {"lam": 0.5}, (4, 4))]
    for cls, kw, shape in cases:
        Z = 0.3 * torch.randn(shape, generator=g)
        for name, triv in bad.items():
            with pytest.raises(gf.ManifoldError, match=r"`triv` .*: expected a result of its argument's shape .*, got "):
                cls(triv=triv, **kw).to_manifold(Z)
        torch.testing.assert_close(cls(triv=expm, **kw).to_manifold(Z), cls(**kw).to_manifold(Z), atol=1e-5, rtol=0)


def test_a_callable_f_of_another_shape_or_dtype_is_refused() -> None:
    """A callable value map ``f`` (and ``f_inverse``) was used as it returned (Note [A callable f's result]): an
    extra trailing dim gave GLp a (4, 4, 4) point for a (4, 4) raw tensor and FixedRank a (2, 5, 4) one, a
    reduction ``f(s).sum()`` made every value the same, without an error; a float64 result raised torch's
    dtype error. Each is a ManifoldError naming `f`; an elementwise callable still gives the named map's points."""
    sp = torch.nn.functional.softplus
    bad = {"extra dim": lambda s: sp(s)[..., None], "sum": lambda s: sp(s).sum(-1, keepdim=True),
           "float64": lambda s: sp(s).double(), "number": lambda s: 1.0}
    g = torch.Generator().manual_seed(0)
    cases = [(gf.GLp, {}, (4, 4)), (gf.PSD, {}, (4, 4)), (gf.FixedRank, {"rank": 2}, (5, 4)), (gf.SL, {}, (4, 4)),
             (gf.PSSDFixedRank, {"rank": 2}, (4, 4)), (gf.AlmostOrthogonal, {"lam": 0.5}, (4, 4))]
    for cls, kw, shape in cases:
        Z = torch.randn(shape, generator=g)
        for name, f in bad.items():
            with pytest.raises(gf.ManifoldError, match=r"`f` .*: expected a map of each value that returns a tensor of "
                                                       r"its argument's shape .*, got "):
                cls(f=f, **kw).to_manifold(Z)
        f = (torch.sin, lambda y: torch.asin(y.clamp(-1, 1))) if cls is gf.AlmostOrthogonal else (sp, lambda y: y + torch.log(-torch.expm1(-y)))
        X = cls(f=f, **kw).to_manifold(Z)
        assert X.shape == Z.shape and bool(cls(**kw).contains(X).all()), cls
    M = gf.GLp(f=(torch.exp, lambda y: torch.log(y).double()))  # a bad inverse: from_manifold
    with pytest.raises(gf.ManifoldError, match=r"`f_inverse` .*: expected a map of each value"):
        M.from_manifold(torch.eye(3))


def test_hurwitz_check_names_the_shape_not_an_eigenvalue() -> None:
    """The eigenvalue line of ``Hurwitz.check`` is added to a violation of the space, not to a shape error."""
    M = gf.Hurwitz()
    with pytest.raises(gf.ManifoldError, match=r"square matrices") as info:
        M.check(torch.ones(4, 3, dtype=torch.float64))
    assert "eigenvalue" not in str(info.value)
    with pytest.raises(gf.ManifoldError, match=r"Largest eigenvalue real part: 1\b"):
        M.check(torch.eye(3, dtype=torch.float64))


GEODESIC = [(c, name) for c in CASES for name in ("dist", "sqdist", "logmap")
            if implements(c.space, "logmap" if name == "sqdist" else name)]


@pytest.mark.parametrize(("case", "name"), GEODESIC, ids=lambda v: v if isinstance(v, str) else v.id)
def test_geodesic_maps_of_a_non_finite_point_are_nan_per_point(case, name: str, capfd) -> None:
    """``dist``/``sqdist``/``logmap`` with a NaN or inf entry in one point of a batch: that point's value is
    not finite, its neighbours' are the clean ones, and nothing raises or prints (README, "NaN and inf").
    ``Grassmannian.dist`` fed ``svdvals`` and ``PSD(metric="affine").dist`` ``eigvalsh`` the raw matrix,
    which raised a LinAlgError; ``SO``/``Unitary.dist`` fed ``eigvals``, which printed an MKL error."""
    M, tol = case.space, case.tol[torch.float64]
    g = torch.Generator().manual_seed(0)
    full = (3, *case.smoke)
    X = M.sample(full, generator=g, dtype=torch.float64)
    Y = M.retract(X, 0.2 * M.tangent(X, torch.randn(full, generator=g, dtype=torch.float64)))
    fn = getattr(M, name)
    clean = fn(X, Y)
    capfd.readouterr()
    for bad in (math.nan, math.inf):
        for which in ("X", "Y"):
            B = (X if which == "X" else Y).clone(memory_format=torch.contiguous_format)
            B.view(3, -1)[1, -1] = bad  # the last entry, which every map reads
            out = fn(B, Y) if which == "X" else fn(X, B)
            per_point = out.reshape(3, -1)
            assert not bool(torch.isfinite(per_point[1]).all()), (name, which, bad, out[1])
            torch.testing.assert_close(out[0::2], clean[0::2], atol=tol, rtol=tol)
    printed = capfd.readouterr()
    assert "ERROR" not in printed.out + printed.err, printed


def test_a_product_whose_factor_batches_do_not_broadcast_is_named() -> None:
    """``Product``'s batch-shaped results combine the factors' (``&`` or ``+``): batch shapes that do not
    broadcast raised a bare RuntimeError from the combination; ones that do broadcast still combine."""
    P = gf.Product(gf.SO(), gf.Sphere())
    g = torch.Generator().manual_seed(0)
    X = (gf.SO().sample((2, 3, 3), generator=g, dtype=torch.float64),
         gf.Sphere().sample((3, 4), generator=g, dtype=torch.float64))
    for name, call in (("contains", lambda: P.contains(X)), ("inner", lambda: P.inner(X, X, X)),
                       ("dist", lambda: P.dist(X, X)), ("sqdist", lambda: P.sqdist(X, X))):
        with pytest.raises(gf.ManifoldError, match=rf"Product\(.*expected factors whose batch shapes broadcast "
                                                   rf"\(`{name}`.*factor 0: \(2,\), factor 1: \(3,\)"):
            call()
    Z = (torch.zeros(2, 3, 3, dtype=torch.float64), torch.zeros(3, 3, 3, dtype=torch.float64))
    P2 = gf.Product(gf.SO(), gf.GLp())
    with pytest.raises(gf.ManifoldError, match=r"`logabsdet`"):
        P2.logabsdet(Z)
    Xb = (X[0][:, None], X[1])  # (2, 1) and (3,) broadcast to (2, 3)
    assert P.contains(Xb).shape == (2, 3) and bool(P.contains(Xb).all())
    torch.testing.assert_close(P.inner(Xb, Xb, Xb), (X[0][:, None] ** 2).sum((-2, -1)) + (X[1] ** 2).sum(-1),
                               atol=1e-12, rtol=1e-12)


def test_a_product_refuses_factor_batches_that_pair_up_two_ways() -> None:
    """K stacked models with a ``Product(SO(), Rn())`` entry have batch shapes (K,) and (K, n): for K = n
    torch's broadcasting paired weight j with entry j of every bias, so ``gf.contains`` blamed one entry of
    each model for model 0's bad weight and ``inner`` summed across models, silently, where ``vmap`` over
    the stack pairs model k with model k. Note [Batches of different ranks] in geofunc/spaces/_product.py."""
    P = gf.Product(gf.SO(), gf.Rn())
    g = torch.Generator().manual_seed(0)
    on = gf.SO().sample((3, 3, 3), generator=g, dtype=torch.float64)
    W = on.clone()
    W[0] *= 2  # model 0's weight off SO
    b = torch.randn(3, 3, dtype=torch.float64, generator=g)
    for name, call in (("contains", lambda: P.contains((W, b))), ("inner", lambda: P.inner((W, b), (W, b), (W, b))),
                       ("dist", lambda: P.dist((W, b), (W, b))), ("check", lambda: P.check((on, b)))):
        with pytest.raises(gf.ManifoldError, match=rf"pair their points one way \(`{name}`.*factor 0: \(3,\), "
                                                   r"factor 1: \(3, 3\)"):
            call()
    with pytest.raises(gf.ManifoldError, match=r"parameter 'layer'.*pair their points one way"):
        gf.contains({"layer": P}, {"layer": (W, b)})
    # under vmap (one model at a time) the pairing is model k with model k: model 0 alone is off
    flags = torch.func.vmap(lambda q: gf.contains({"layer": P}, q))({"layer": (W, b)})["layer"]
    assert flags.tolist() == [[False] * 3, [True] * 3, [True] * 3]
    # singleton dims say which pairing is meant; rank-0 and all-ones batches are unambiguous
    assert P.contains((W[:, None], b)).tolist() == [[False] * 3, [True] * 3, [True] * 3]
    assert P.contains((W[None, None], b[..., None])).shape == (3, 3, 3)
    assert P.contains((W[0], b)).shape == (3, 3)
    assert P.contains((W[:1], torch.zeros(1, 5, dtype=torch.float64))).shape == (1, 5)


def test_a_product_takes_batches_whose_leading_reading_is_no_stack() -> None:
    """A (3,) batch with a (1, 3) or (1, 1, 3) one pairs entry j with entry j (torch's rule); the leading
    reading would broadcast a leading 1 against 3, which no vmap over a stack does (it maps equal sizes),
    so it is not ambiguous and was answered before Note [Batches of different ranks]'s refusal."""
    P = gf.Product(gf.Sphere(), gf.Sphere())
    g = torch.Generator().manual_seed(0)
    x = gf.Sphere().sample((3, 4), generator=g, dtype=torch.float64)
    y = gf.Sphere().sample((1, 3, 2), generator=g, dtype=torch.float64)
    x[1] *= 2  # entry 1 of the first factor off the sphere
    assert P.contains((x, y)).tolist() == [[True, False, True]]
    assert P.contains((y[None], x)).tolist() == [[[True, False, True]]]
    torch.testing.assert_close(P.dist((x, y), (x, y)), torch.zeros(1, 3, dtype=torch.float64), atol=1e-7, rtol=0)
    with pytest.raises(gf.ManifoldError, match="pair their points one way"):  # equal leading sizes: still refused
        P.contains((x, y[0, :, None]))


def test_a_product_check_refuses_factor_batches_that_do_not_broadcast() -> None:
    """``Product.check`` checked each factor alone: a (3, 4) batch of sphere points with a (2,) batch of Rn
    points passed, where ``contains`` of the same tuple raises (no batch of product points to answer for).
    Note [A product's batch in check] in geofunc/spaces/_product.py. Broadcasting batches still pass."""
    g = torch.Generator().manual_seed(0)
    P = gf.Product(gf.Sphere(), gf.Rn())
    x = gf.Sphere().sample((3, 4), generator=g, dtype=torch.float64)
    for b in (torch.randn(2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)):
        with pytest.raises(gf.ManifoldError, match=r"Product\(.*expected factors whose batch shapes broadcast "
                                                   r"\(`check`.*factor 0: \(3,\), factor 1: \("):
            P.check((x, b))
        with pytest.raises(gf.ManifoldError, match=r"batch shapes broadcast \(`contains`"):
            P.contains((x, b))
    N = gf.Product(P, gf.SO())
    R = gf.SO().sample((2, 3, 3), generator=g, dtype=torch.float64)
    with pytest.raises(gf.ManifoldError, match=r"\(`check`.*factor 0: \(3,\), factor 1: \(2,\)"):
        N.check(((x, torch.randn(3, dtype=torch.float64)), R))
    for X in ((x, torch.randn(3, dtype=torch.float64)), (x, torch.randn(())), (x[:, None], torch.randn(2, dtype=torch.float64))):
        P.check(X)
        assert bool(P.contains(X).all())
    N.check(((x[:, None], torch.randn(1, 2, dtype=torch.float64)), R))


def test_poincare_membership_has_no_tolerance() -> None:
    """The ball is open and ``atol`` plays no role (PoincareBall's docstring): a large ``atol`` once
    accepted points on and outside the boundary (the violation is c‖x‖² itself). Bad atols still raise."""
    M = gf.PoincareBall()
    X = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.1, 0.0], [100.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([True, False, False, False])
    for atol in (None, 0.0, 1.0, 2.0, 1e6):
        assert torch.equal(M.contains(X, atol=atol), expected)
    with pytest.raises(gf.ManifoldError, match="c‖x‖²"):
        M.check(X[1:2], atol=1e6)
    M.check(X[:1], atol=0.0)
    with pytest.raises(gf.ManifoldError, match="atol"):
        M.contains(X, atol=-1.0)


# (space class, hyperparameter, a valid value)
REAL_HYPERPARAMETERS = [(gf.Sphere, "radius", 2.0), (gf.SphereEmbedded, "radius", 2.0), (gf.PoincareBall, "c", 0.5),
                        (gf.Lorentz, "k", 2.0), (gf.Hurwitz, "alpha", 0.5), (gf.AlmostOrthogonal, "lam", 0.5)]


@pytest.mark.parametrize(("cls", "name", "value"), REAL_HYPERPARAMETERS, ids=lambda v: getattr(v, "__name__", None))
def test_real_hyperparameters_are_stored_as_python_floats(cls, name: str, value: float) -> None:
    """A real hyperparameter given as another real number type (NumPy's, from a config or an array, or a
    ``Fraction``) is the Python float it stands for, as ``rank`` is the int it stands for: ``Lorentz(k=np.float32(2))``
    and ``AlmostOrthogonal(lam=np.float64(0.5))`` were kept as NumPy scalars, and ``torch.compile(fullgraph=True)``
    of ``Lorentz.to_manifold``/``retract`` and ``AlmostOrthogonal.tangent`` then failed ("Could not guard on
    data-dependent expression", "Data-dependent branching"); ``PoincareBall(c=Fraction(1, 2))`` was accepted and
    every map raised a bare ``TypeError`` (Fraction * Tensor); ``AlmostOrthogonal(lam=np.float32(0.5))`` was refused
    where ``np.float64`` was accepted. An int too large for a float is refused by name (it raised OverflowError)."""
    import fractions

    import numpy as np

    for given in (np.float32(value), np.float64(value), fractions.Fraction(value)):
        M = cls(**{name: given})
        assert type(getattr(M, name)) is float and getattr(M, name) == float(given), (given, M)
        assert M == cls(**{name: float(given)}) and hash(M) == hash(cls(**{name: float(given)}))
    M = cls(**{name: np.float32(value)})
    shape = (2, 3) if M.point_ndim == 1 else (2, 3, 3)
    X = M.sample(shape, generator=torch.Generator().manual_seed(0))
    V = M.tangent(X, torch.ones(shape))
    for fn, args in ((M.to_manifold, (0.1 * torch.ones(shape),)), (M.retract, (X, V)), (M.tangent, (X, V))):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(*args), fn(*args),
                                   atol=1e-6, rtol=1e-6)
    with pytest.raises(gf.ManifoldError, match=rf"{cls.__name__}\(.*expected .*`{name}`.*got 1000"):
        cls(**{name: 10**400})


def test_messages_describe_arrays_and_mappings_by_shape_not_values() -> None:
    """A NumPy array given for a tensor was described by its repr, its values printed (a random 30×30 array: a
    message of 12 000 characters): messages name shapes, never dumps (DESIGN §5). An array (anything with a
    ``shape`` and a ``dtype``) is described as a tensor is; a dict by its size (500 entries: 4 900 characters)."""
    import numpy as np

    M = gf.Stiefel()
    big = np.random.default_rng(0).random((30, 20))
    for call in (lambda: M.to_manifold(big), lambda: M.tangent(torch.zeros(30, 20), big),
                 lambda: gf.to_manifold({"w": M}, {"w": big})):
        with pytest.raises(gf.ManifoldError, match=r"got a numpy\.ndarray of shape \(30, 20\) and dtype float64") as info:
            call()
        assert len(str(info.value)) < 400, len(str(info.value))
    with pytest.raises(gf.ManifoldError, match=r"got a dict of 500 entries") as info:
        M.to_manifold({i: 0.0 for i in range(500)})
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("name", list(SPACES))
def test_transport_checks_its_first_point(name: str) -> None:
    """``transport(X, Y, V)``: the projection transport (the default, ``tangent(Y, V)``) never read ``X``, so an
    ``X`` of another shape, batch, dtype, an integer tensor or a list went through unnoticed (a batch of 3 points
    with 2 targets returned 2 vectors); ``X`` is checked as the spaces with their own transport check it."""
    M = SPACES[name]
    dt = torch.complex128 if isinstance(M, (gf.Unitary, gf.Hermitian)) else torch.float64
    shape = (2, 4) if M.point_ndim == 1 else (2, 3, 3)
    g = torch.Generator().manual_seed(0)
    X = M.sample(shape, generator=g, dtype=dt)
    Y = M.sample(shape, generator=g, dtype=dt)
    V = M.tangent(X, torch.randn(shape, generator=g, dtype=dt))
    M.transport(X, Y, V)
    M.transport(X[:1], Y, V)  # batch dims that broadcast
    bad = {"another point shape": torch.ones(*shape[:-1], shape[-1] + 1, dtype=dt),
           "a batch that does not broadcast": torch.cat([X, X[:1]]),
           "another dtype": X.to(torch.complex64 if dt.is_complex else torch.float32),
           "an integer tensor": torch.ones(shape, dtype=torch.int64), "a nested list": X.tolist(), "None": None}
    for what, B in bad.items():
        with pytest.raises(gf.ManifoldError) as info:
            M.transport(B, Y, V)
        msg = str(info.value)
        assert type(M).__name__ in msg and "expected" in msg and "got" in msg, (what, msg)


def test_check_states_a_failed_condition_as_the_condition_and_nan_as_nan() -> None:
    """check's message read "det(X) ≤ 0 (inf if so) = inf > atol = 0.0001" for an indicator measure (inf
    where its condition holds), and a NaN measure (non-finite entries) as "= inf": the condition is
    stated alone ("with det(X) ≤ 0."), a NaN as NaN."""
    neg = torch.diag(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    bad = torch.eye(3, dtype=torch.float64)
    bad[0, 1] = math.nan
    expect = [
        (gf.GLp(), neg, r"with det\(X\) ≤ 0\.$"),
        (gf.SL(), neg, r"with det\(X\) ≤ 0\.$"),
        (gf.Lorentz(), torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), r"with x₀ ≤ 0 \(lower sheet\)\.$"),
        (gf.GLp(), bad, r"with non-finite entries\.$"),
        (gf.SL(), bad, r"with det\(X\) ≤ 0: NaN \(undefined: non-finite entries\?\)\.$"),
        (gf.SO(), bad, r"= NaN \(undefined: non-finite entries\?\)\.$"),
        (gf.Sphere(), torch.ones(3, dtype=torch.float64), r"with \|‖x‖ − r\| / r = 0\.732 > atol = 1e-09\.$"),
    ]
    for space, X, pattern in expect:
        with pytest.raises(gf.ManifoldError, match=pattern) as info:
            space.check(X)
        assert "inf if so" not in str(info.value) and "NaN if any" not in str(info.value), str(info.value)


@pytest.mark.parametrize("name", list(SPACES))
def test_check_of_a_meta_tensor_is_a_manifold_error(name: str) -> None:
    """``check`` measures the point; a ``meta`` tensor has no values, and torch's "item() cannot be called
    on meta tensors" came out of the measure. A ``ManifoldError`` names the space and the meta device
    (``from_manifold`` skips its membership check there, for deferred initialization)."""
    M = SPACES[name]
    dt = torch.complex128 if isinstance(M, (gf.Unitary, gf.Hermitian)) else torch.float64
    shape = (2, 4) if M.point_ndim == 1 else (2, 3, 3)
    X = M.sample(shape, generator=torch.Generator().manual_seed(0), dtype=dt)
    M.check(X)
    with pytest.raises(gf.ManifoldError, match="meta device") as info:
        M.check(X.to("meta"))
    assert type(M).__name__ in str(info.value)


def test_an_atol_too_large_for_a_float_is_infinite() -> None:
    """``atol=10**400`` (an int too large for a float) raised ``float()``'s OverflowError from contains and
    check; it is the tolerance inf (as ``atol=inf``), and ``-10**400`` is refused as a negative atol."""
    M = gf.Sphere()
    X = M.sample((3, 4), generator=torch.Generator().manual_seed(0)) * 2.0  # off the sphere
    assert torch.equal(M.contains(X, atol=10**400), M.contains(X, atol=float("inf")))
    assert M.check(X, atol=10**400) is None
    assert gf.contains({"w": M}, {"w": X}, atol=10**400)["w"].all()
    for call in (M.contains, M.check):
        with pytest.raises(gf.ManifoldError, match=r"Sphere\(radius=1.0\): expected `atol` to be None or a number ≥ 0"):
            call(X, atol=-(10**400))


def test_an_atol_given_as_a_string_is_refused() -> None:
    """``atol`` is read by ``float()``, which also reads a string: contains(X, atol='1e-3') and check
    answered as for 1e-3, where every other non-number (a bool, a tensor of several values) is refused."""
    M = gf.Stiefel()
    X = M.sample((4, 3), generator=torch.Generator().manual_seed(0))
    for call in (lambda a: M.contains(X, atol=a), lambda a: M.check(X, atol=a),
                 lambda a: gf.contains({"w": M}, {"w": X}, atol=a)):
        for bad in ("1e-3", b"1e-3"):
            with pytest.raises(gf.ManifoldError, match=r"Stiefel\(triv='expm'\): expected `atol` to be None or a number ≥ 0"):
                call(bad)
    assert bool(M.contains(X, atol=1e-3)) and M.check(X, atol=1e-3) is None


def test_a_schedule_of_numpy_bools_is_refused_with_manifold_error():
    """A schedule whose value is a NumPy bool (np.bool_, a 0-dim bool array) passed the value check and raised
    NumPy's "boolean negative is not supported" TypeError from the negation of the rate (Note [A schedule's
    value is checked] in geofunc/optim/_transforms.py); it is refused as a bool tensor is."""
    import numpy as np

    x, g = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}
    for value in (np.bool_(True), np.array(True)):
        opt = gf.optim.rsgd({}, lr=lambda n, value=value: value)
        with pytest.raises(gf.ManifoldError, match="expected a real number or a real 0-dim tensor"):
            opt.update(g, opt.init(x), x)
