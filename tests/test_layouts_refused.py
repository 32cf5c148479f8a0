"""Sparse and nested tensors given to every public method of every space, to the pytree functions, to
``gf.nn`` and to ``geofunc.hyperbolic``: each is a ``ManifoldError`` naming the space, a dense tensor as
what it expected and the layout it got (Note [Dense tensors only] in ``geofunc/spaces/_base.py``). They
were taken by the dtype check and then failed inside torch ("Could not run 'aten::_linalg_svd' with
arguments from the 'SparseCPU' backend", "NestedTensorImpl doesn't support sizes", an INTERNAL ASSERT),
or returned wrong answers: ``Oblique.tangent`` of a COO gradient a vector off the tangent space, and
``from_manifold`` of an off-space jagged tensor raw tensors without the membership check.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from cases import CASES
from torch import nn

import geofunc as gf
from geofunc import hyperbolic as hyp
from geofunc.testing import implements

# the spaces themselves (as tests/test_odd_inputs.py takes them), one of each repr
SPACES: dict[str, gf.AbstractSpace] = {}
for _c in CASES:
    _M = getattr(_c.space, "space", _c.space)
    if type(_M).__module__.startswith("geofunc.") and repr(_M) not in {repr(M) for M in SPACES.values()}:
        SPACES[_c.id] = _M

LAYOUTS = ("sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "jagged", "nested")


def _as(layout: str, T: torch.Tensor) -> torch.Tensor:
    """``T`` (at least 2-d) in ``layout``; the nested ones hold two copies of ``T``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The PyTorch API of nested tensors is in prototype stage"
        if layout == "sparse_coo":
            return T.to_sparse()
        if layout in ("sparse_csr", "sparse_csc"):
            return T.to_sparse(layout=getattr(torch, layout))
        if layout in ("sparse_bsr", "sparse_bsc"):
            return T.to_sparse(layout=getattr(torch, layout), blocksize=(1, 1))
        if layout == "jagged":
            return torch.nested.nested_tensor([T, T], layout=torch.jagged)
        return torch.nested.nested_tensor([T, T])


def _shape(M: gf.AbstractSpace) -> tuple[int, ...]:
    if M.point_ndim == 1:
        return (3, 5)  # a batch of vectors: every layout takes it
    if isinstance(M, gf.Rn):
        return (4, 3)
    return (4, 4)  # square: logabsdet too


@functools.lru_cache(maxsize=None)
def _inputs(name: str) -> dict[str, torch.Tensor]:
    M = SPACES[name]
    g = torch.Generator().manual_seed(0)
    dt = torch.complex128 if isinstance(M, (gf.Unitary, gf.Hermitian)) else torch.float64
    shape = _shape(M)
    X, Y = M.sample(shape, dtype=dt, generator=g), M.sample(shape, dtype=dt, generator=g)
    Z, base = M.from_manifold(X)
    G = torch.randn(shape, dtype=dt, generator=g)
    return {"X": X, "Y": Y, "Z": Z, "base": base, "G": G, "V": M.tangent(X, G)}


def _calls(M: gf.AbstractSpace, t: dict, layout: str) -> dict[str, object]:
    """Each public method with one of its tensors (the starred one) in ``layout``."""
    s = functools.partial(_as, layout)
    X, Y, Z, base, G, V = (t[k] for k in ("X", "Y", "Z", "base", "G", "V"))
    calls = {
        "check(X*)": lambda: M.check(s(X)),
        "contains(X*)": lambda: M.contains(s(X)),
        "from_manifold(X*)": lambda: M.from_manifold(s(X)),
        "from_manifold(off*)": lambda: M.from_manifold(s(X + G)),
        "to_manifold(Z*)": lambda: M.to_manifold(s(Z), base),
        "rebase(Z*)": lambda: M.rebase(s(Z), base),
        "project(G*)": lambda: M.project(s(G)),
        "tangent(X*, G)": lambda: M.tangent(s(X), G),
        "tangent(X, G*)": lambda: M.tangent(X, s(G)),
        "egrad_to_rgrad(X, G*)": lambda: M.egrad_to_rgrad(X, s(G)),
        "retract(X*, V)": lambda: M.retract(s(X), V),
        "retract(X, V*)": lambda: M.retract(X, s(V)),
        "transport(X, Y, V*)": lambda: M.transport(X, Y, s(V)),
        "inner(X, V*, V*)": lambda: M.inner(X, s(V), s(V)),
    }
    if isinstance(base, torch.Tensor):
        calls["to_manifold(Z, base*)"] = lambda: M.to_manifold(Z, s(base))
    for name, call in (("dist", lambda: M.dist(X, s(Y))), ("expmap", lambda: M.expmap(X, s(V))),
                       ("logmap", lambda: M.logmap(X, s(Y))), ("logabsdet", lambda: M.logabsdet(s(Z), base))):
        if implements(M, name):
            calls[f"{name}(…*)"] = call
    return calls


def _assert_named(msg: str, space_name: str, layout: str, what: str) -> None:
    assert space_name in msg and "expected" in msg and "dense (strided) tensor" in msg and "got" in msg, (what, msg)
    assert ("nested tensor" in msg) if layout in ("jagged", "nested") else (f"torch.{layout} tensor" in msg), (what, msg)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SPACES))
def test_every_method_refuses_a_sparse_or_nested_tensor_by_name(name: str, layout: str) -> None:
    M = SPACES[name]
    for what, call in _calls(M, _inputs(name), layout).items():
        with pytest.raises(gf.ManifoldError) as info:
            call()
        _assert_named(str(info.value), type(M).__name__, layout, what)


def test_oblique_tangent_of_a_sparse_gradient_is_refused_not_wrong() -> None:
    """It returned a sparse vector 1.2 off the dense answer, whose columns were not orthogonal to X's."""
    M, g = gf.Oblique(), torch.Generator().manual_seed(0)
    X = M.sample((4, 4), dtype=torch.float64, generator=g)
    G = torch.randn(4, 4, dtype=torch.float64, generator=g)
    for call in (lambda: M.tangent(X, G.to_sparse()), lambda: M.egrad_to_rgrad(X, G.to_sparse()),
                 lambda: M.transport(X, X, G.to_sparse())):
        with pytest.raises(gf.ManifoldError, match="dense"):
            call()


@pytest.mark.parametrize("layout", ("sparse_coo", "sparse_csr", "jagged", "nested"))
def test_a_product_refuses_a_factor_in_another_layout(layout: str) -> None:
    P = gf.Product(gf.SO(), gf.Sphere())
    g = torch.Generator().manual_seed(0)
    X = (gf.SO().sample((3, 3), dtype=torch.float64, generator=g), gf.Sphere().sample((2, 4), dtype=torch.float64, generator=g))
    bad = (X[0], _as(layout, X[1]))
    for call in (lambda: P.contains(bad), lambda: P.from_manifold(bad), lambda: P.tangent(X, bad),
                 lambda: P.to_manifold(bad)):
        with pytest.raises(gf.ManifoldError) as info:
            call()
        _assert_named(str(info.value), "Sphere", layout, "factor 1")


@pytest.mark.parametrize("layout", ("sparse_coo", "sparse_csr", "jagged", "nested"))
@pytest.mark.parametrize("M", [gf.LowRank(2), gf.FixedRank(3), gf.GLp(), gf.SL(), gf.PSD(), gf.PSSDLowRank(2),
                               gf.Hurwitz(), gf.AlmostOrthogonal(0.5)], ids=repr)
def test_a_frame_of_a_base_in_another_layout_is_refused(M: gf.AbstractSpace, layout: str) -> None:
    """The frames of a factorized space's base are checked apart from the point's: a sparse one was taken
    (to_manifold computed with it), a nested one raised torch's "NestedTensorImpl doesn't support sizes"."""
    g = torch.Generator().manual_seed(0)
    Z, base = M.from_manifold(M.sample((4, 4), dtype=torch.float64, generator=g))
    frames = (base,) if isinstance(base, torch.Tensor) else tuple(base)
    for i in range(len(frames)):
        if frames[i] is None:
            continue
        bad = _as(layout, frames[i])
        b = bad if isinstance(base, torch.Tensor) else tuple(bad if j == i else f for j, f in enumerate(frames))
        for call in (lambda: M.to_manifold(Z, b), lambda: M.rebase(Z, b)):
            with pytest.raises(gf.ManifoldError) as info:
                call()
            _assert_named(str(info.value), type(M).__name__, layout, f"base[{i}]")


def _each_refuses_w_by_name(calls: dict) -> None:
    """Every call raises a ManifoldError naming the parameter 'w', its space (Stiefel) and the layout expected."""
    for what, call in calls.items():
        with pytest.raises(gf.ManifoldError) as info:
            call()
        msg = str(info.value)
        assert "'w'" in msg and "Stiefel" in msg and "dense (strided) tensor" in msg, (what, msg)


@pytest.mark.parametrize("layout", ("sparse_coo", "sparse_csr", "jagged", "nested"))
def test_pytree_functions_and_optimizers_refuse_them_naming_the_parameter(layout: str) -> None:
    """An off-space jagged point went through gf.from_manifold without the membership check (a tensor
    subclass: its values were taken as unreadable); a nested vector raised torch's internal error from the
    stacking of small entries (Note [Stacked entries] in geofunc/_pytree.py)."""
    cons = {"w": gf.Stiefel(), "v": gf.Sphere()}
    g = torch.Generator().manual_seed(0)
    params = {"w": gf.Stiefel().sample((5, 3), dtype=torch.float64, generator=g),
              "v": gf.Sphere().sample((2, 4), dtype=torch.float64, generator=g), "b": torch.zeros(3)}
    bad = dict(params, w=_as(layout, params["w"]))
    off = dict(params, w=_as(layout, 2.0 * params["w"]))
    rsgd = gf.optim.rsgd(cons, lr=0.1)
    calls = {
        "from_manifold": lambda: gf.from_manifold(cons, off),
        "contains": lambda: gf.contains(cons, bad),
        "to_manifold": lambda: gf.to_manifold(cons, bad),
        "tangent": lambda: gf.tangent(cons, params, bad),
        "egrad_to_rgrad": lambda: gf.egrad_to_rgrad(cons, params, bad),
        "retract": lambda: gf.retract(cons, params, bad),
        "sample": lambda: gf.sample(cons, bad, generator=g),
        "rsgd.update": lambda: rsgd.update(bad, rsgd.init(params), params),
    }
    _each_refuses_w_by_name(calls)


@pytest.mark.parametrize("layout", ("jagged", "nested"))
def test_a_nested_point_beside_stackable_entries_is_refused_naming_the_parameter(layout: str) -> None:
    """The optimizer maps stack small entries of one space (Note [Stacked entries] in geofunc/_pytree.py): a
    nested *point* among them (two Stiefel (5, 3) entries, one nested) reached ``x.shape`` in the stacking
    and raised torch's "NestedTensorImpl doesn't support sizes" (egrad_to_rgrad, retract, radam's update)
    without its guard, where the per-entry call refuses it by name."""
    cons = {"w": gf.Stiefel(), "u": gf.Stiefel(), "v": gf.Sphere()}
    g = torch.Generator().manual_seed(0)
    params = {k: gf.Stiefel().sample((5, 3), dtype=torch.float64, generator=g) for k in ("w", "u")}
    params["v"] = gf.Sphere().sample((4,), dtype=torch.float64, generator=g)
    grads = {k: torch.randn(p.shape, dtype=p.dtype, generator=g) for k, p in params.items()}
    bad = dict(params, w=_as(layout, params["w"]))
    radam = gf.optim.radam(cons, lr=0.1)
    calls = {
        "egrad_to_rgrad": lambda: gf.egrad_to_rgrad(cons, bad, grads),
        "retract": lambda: gf.retract(cons, bad, grads),
        "tangent": lambda: gf.tangent(cons, bad, grads),
        "radam.update": lambda: radam.update(grads, radam.init(params), bad),
    }
    _each_refuses_w_by_name(calls)


@pytest.mark.parametrize("layout", ("sparse_coo", "sparse_csr", "jagged", "nested"))
@pytest.mark.parametrize("fname", ["orthogonal", "sphere", "low_rank", "positive_definite", "symmetric", "skew",
                                   "invertible"])
def test_gf_nn_refuses_a_sparse_weight_and_a_sparse_assignment(fname: str, layout: str) -> None:
    """Registering on a module whose weight is sparse raised torch's copy_ error; assigning a sparse point to
    a constrained weight raised from the membership test ("Could not run 'aten::ne.Scalar' ...")."""
    kw = {"rank": 2} if fname == "low_rank" else {}
    m = nn.Linear(4, 4, dtype=torch.float64)
    m.weight = nn.Parameter(_as(layout, m.weight.detach()), requires_grad=False)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*dense \(strided\) tensor"):
        getattr(gf.nn, fname)(m, "weight", **kw)
    m = getattr(gf.nn, fname)(nn.Linear(4, 4, dtype=torch.float64), "weight", **kw)
    with pytest.raises(gf.ManifoldError, match="dense"):
        m.weight = _as(layout, m.weight.detach())


@pytest.mark.parametrize("layout", ("sparse_coo", "jagged", "nested"))
def test_hyperbolic_functions_refuse_them_by_name(layout: str) -> None:
    x = torch.tensor([[0.1, 0.2, -0.1], [0.0, 0.3, 0.1]], dtype=torch.float64)
    bad = _as(layout, x)
    for fn, call in (("dist", lambda: hyp.dist(x, bad)), ("expmap0", lambda: hyp.expmap0(bad)),
                     ("project", lambda: hyp.project(bad)), ("mobius_add", lambda: hyp.mobius_add(bad, x))):
        with pytest.raises(gf.ManifoldError, match=f"hyperbolic.{fn}: expected .* dense"):
            call()


def test_a_sparse_matrix_of_mobius_matvec_is_still_taken() -> None:
    """M ⊗ x reads the matrix through a product only, which torch computes for a sparse M: the same answer."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 4, dtype=torch.float64, generator=g)
    x = 0.2 * torch.randn(4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(hyp.mobius_matvec(M.to_sparse(), x), hyp.mobius_matvec(M, x), atol=1e-12, rtol=1e-12)


def test_the_layout_check_lets_traced_and_shape_only_tensors_through() -> None:
    """meta, FakeTensor, vmap, grad and torch.compile(fullgraph=True) tensors are strided: nothing changes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    M = gf.Stiefel()
    X = M.sample((5, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = torch.ones(5, 3, dtype=torch.float64)
    assert M.to_manifold(torch.empty(5, 3, device="meta")).is_meta
    with FakeTensorMode():
        Zf, _ = M.from_manifold(torch.empty(5, 3))
    assert Zf.shape == (5, 3)
    Xs = torch.stack([X, X])
    assert bool(torch.func.vmap(M.contains)(Xs).all())
    torch.func.grad(lambda Z: M.to_manifold(Z, X).sum())(torch.zeros(5, 3, dtype=torch.float64))
    torch._dynamo.reset()
    compiled = torch.compile(M.tangent, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(X, G), M.tangent(X, G), atol=1e-12, rtol=1e-12)
