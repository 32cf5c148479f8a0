"""GeoTorch's module layout under ``geofunc.nn`` (Note [GeoTorch's module layout] in geofunc/nn/__init__.py).

A port renames the package in every import line (``from geotorch.so import torus_init_`` becomes
``from geofunc.nn.so import torus_init_``): each of GeoTorch's 21 submodules exists under ``geofunc.nn``
with every name GeoTorch defines there, the helpers GeoTorch defines only there compute GeoTorch's values
(against the installed geotorch, float64), its ``SymF`` class behaves as GeoTorch's, and the four module
names that are also constraint functions stay functions.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as P

import geofunc as gf
import geofunc.nn as gnn

geotorch = pytest.importorskip("geotorch")

MODULES = ["almostorthogonal", "constraints", "exceptions", "fixedrank", "glp", "grassmannian", "hurwitz", "lowrank",
           "product", "psd", "pssd", "pssdfixedrank", "pssdlowrank", "reals", "skew", "sl", "so", "sphere", "stiefel",
           "symmetric", "utils"]
f64 = torch.float64
# the modules by import (four of the names are also constraint functions: the attribute is the function, as in GeoTorch)
so_m, sphere_m, hurwitz_m, symmetric_m, utils_m = (importlib.import_module(f"geofunc.nn.{m}")
                                                   for m in ("so", "sphere", "hurwitz", "symmetric", "utils"))


def _defined_in(module) -> list[str]:
    """The public names a module defines itself (not those it imports)."""
    return [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]


def test_the_layout_is_geotorchs_whole_package():
    import pkgutil

    theirs = {m.name for m in pkgutil.iter_modules(geotorch.__path__)}
    assert theirs == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_geotorch_module_has_its_names(name):
    theirs = importlib.import_module(f"geotorch.{name}")
    ours = importlib.import_module(f"geofunc.nn.{name}")
    names = _defined_in(theirs)
    assert names, name
    for n in names:
        assert hasattr(ours, n), f"geofunc.nn.{name}.{n}"
        assert n in ours.__all__, f"geofunc.nn.{name}.__all__ lacks {n}"
        obj = getattr(ours, n)
        if hasattr(gnn, n) and not inspect.ismodule(getattr(gnn, n)):
            assert obj is getattr(gnn, n), f"geofunc.nn.{name}.{n} is not geofunc.nn.{n}"
        if inspect.isfunction(getattr(theirs, n)):  # GeoTorch's parameters, in order, first (update_base adds `module=`)
            a = list(inspect.signature(getattr(theirs, n)).parameters)
            b = list(inspect.signature(obj).parameters)
            assert b[: len(a)] == a, (name, n, a, b)
    assert set(ours.__all__) <= set(dir(ours))
    # `geotorch.so.torus_init_` after `import geotorch`: the attribute is the module, but for the four
    # module names that are also constraint functions (as in GeoTorch)
    if name not in ("grassmannian", "skew", "sphere", "symmetric"):
        assert getattr(gnn, name) is ours
    else:
        assert inspect.isfunction(getattr(gnn, name)) and inspect.isfunction(getattr(geotorch, name))


def test_module_names_that_are_constraints_stay_functions():
    for n in ("skew", "symmetric", "sphere", "grassmannian"):
        assert getattr(gnn, n) is getattr(gnn.constraints, n) and inspect.isfunction(getattr(gnn, n))
    # a fresh interpreter whose first import is a submodule: the attribute is still the function
    code = ("from geofunc.nn.sphere import Sphere, uniform_init_sphere_\n"
            "import geofunc.nn.symmetric, geofunc.nn as g, inspect\n"
            "assert inspect.isfunction(g.sphere) and inspect.isfunction(g.symmetric), (g.sphere, g.symmetric)\n"
            "assert g.sphere is g.constraints.sphere and Sphere is g.Sphere\n"
            "import geofunc.nn.sphere as s\n"
            "assert s is g.sphere  # as in GeoTorch: `import a.b as c` binds the attribute\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_value_maps_are_geotorchs():
    from geotorch.almostorthogonal import inv_scaled_sigmoid, scaled_sigmoid
    from geotorch.fixedrank import inv_softplus_epsilon, softplus_epsilon

    from geofunc.nn import almostorthogonal as ao, fixedrank as fr

    g = torch.Generator().manual_seed(0)
    x = 4.0 * torch.randn(50, generator=g, dtype=f64)
    y = torch.rand(50, generator=g, dtype=f64) * 1.98 - 0.99
    torch.testing.assert_close(ao.scaled_sigmoid(x), scaled_sigmoid(x), rtol=1e-14, atol=0)
    torch.testing.assert_close(ao.inv_scaled_sigmoid(y), inv_scaled_sigmoid(y), rtol=1e-13, atol=0)
    assert ao.scaled_sigmoid is gnn.AlmostOrthogonal.fs["scaled_sigmoid"][0]
    for eps in (1e-6, 1e-3):
        torch.testing.assert_close(fr.softplus_epsilon(x, eps), softplus_epsilon(x, eps), rtol=1e-14, atol=0)
        v = softplus_epsilon(x, eps)
        torch.testing.assert_close(fr.inv_softplus_epsilon(v, epsilon=eps), inv_softplus_epsilon(v, epsilon=eps),
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fr.softplus_epsilon(fr.inv_softplus_epsilon(v, eps), eps), v, rtol=1e-12, atol=0)
    assert fr.softplus_epsilon(torch.tensor(-100.0, dtype=f64)).item() == pytest.approx(1e-6, rel=1e-12)
    # GeoTorch's floor, where geofunc's "softplus" has √ε: FixedRank with the pair is GeoTorch's map
    M = gnn.FixedRank((5, 3), 2, f=(fr.softplus_epsilon, fr.inv_softplus_epsilon)).to(f64)
    X = M.sample()
    assert X.dtype == f64
    torch.testing.assert_close(M(M.right_inverse(X)), X, rtol=1e-10, atol=1e-12)


def test_cayley_map_and_lyapunov_exponent_are_geotorchs():
    from geotorch.hurwitz import get_lyap_exp
    from geotorch.so import cayley_map

    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 6, 6, generator=g, dtype=f64)  # any square matrix, not only skew ones
    torch.testing.assert_close(so_m.cayley_map(A), cayley_map(A), rtol=1e-10, atol=1e-12)
    K = A - A.mT
    Q = so_m.cayley_map(K)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(6, dtype=f64).expand(3, 6, 6), rtol=0, atol=1e-13)
    for dt in (torch.bfloat16, torch.float16):  # computed in float32, rounded back (GeoTorch's raises: no half inverse)
        Qh = so_m.cayley_map(K.to(dt))
        assert Qh.dtype == dt
        torch.testing.assert_close(Qh.float(), so_m.cayley_map(K.to(dt).float()).to(dt).float(), rtol=0, atol=0)
    B = A - 4.0 * torch.eye(6, dtype=f64)
    assert float(hurwitz_m.get_lyap_exp(B)) == pytest.approx(float(get_lyap_exp(B)), rel=1e-12)
    assert hurwitz_m.get_lyap_exp(B).ndim == 0
    Hb = gnn.Hurwitz((6, 6), alpha=0.5)
    assert float(hurwitz_m.get_lyap_exp(Hb.sample())) >= 0.5
    # half precision is read in float32 and answered in its dtype
    Bh = B[0].to(torch.bfloat16)
    out = hurwitz_m.get_lyap_exp(Bh)
    assert out.dtype == torch.bfloat16
    assert float(out) == pytest.approx(float(get_lyap_exp(Bh.float())), rel=1e-2)


def test_sphere_helpers_are_geotorchs():
    from geotorch.sphere import project, uniform_init_sphere_

    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g, dtype=f64)
    torch.testing.assert_close(sphere_m.project(x), project(x), rtol=1e-14, atol=0)
    torch.testing.assert_close(sphere_m.project(x[0]), project(x[0]), rtol=1e-14, atol=0)
    # GeoTorch's divides a zero row by zero; geofunc's sends it to e₁ (a point of the sphere)
    z = sphere_m.project(torch.zeros(2, 3, dtype=f64))
    torch.testing.assert_close(z, torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=f64))
    for dtype in (torch.float32, f64):
        for r in (1.0, 2.5):
            torch.manual_seed(3)
            theirs = uniform_init_sphere_(torch.empty(4, 6, dtype=dtype), r)
            torch.manual_seed(3)
            ours = sphere_m.uniform_init_sphere_(torch.empty(4, 6, dtype=dtype), r)
            torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
            torch.testing.assert_close(torch.linalg.vector_norm(ours, dim=-1), torch.full((4,), r, dtype=dtype))
    b = sphere_m.uniform_init_sphere_(torch.empty(3, 8, dtype=torch.bfloat16), r=2.0)
    torch.testing.assert_close(torch.linalg.vector_norm(b.float(), dim=-1), torch.full((3,), 2.0), rtol=1e-2, atol=0)
    # into a parametrized tensor, as GeoTorch's README does
    layer = nn.Linear(4, 3)
    gnn.sphere(layer, "weight")
    layer.weight = sphere_m.uniform_init_sphere_(torch.empty(3, 4))
    assert gnn.Sphere((3, 4)).in_manifold(layer.weight)


def test_transpose_decorator_is_geotorchs():
    from geotorch.utils import transpose

    class Theirs:
        def __init__(self, transposed):
            self.transposed = transposed

        @transpose
        def forward(self, X, scale=1.0):
            return scale * torch.cat([X, X.cumsum(-1)], dim=-1)

    class Ours(Theirs):
        @utils_m.transpose
        def forward(self, X, scale=1.0):
            return scale * torch.cat([X, X.cumsum(-1)], dim=-1)

    X = torch.randn(2, 5, 3)
    for t in (False, True):
        torch.testing.assert_close(Ours(t).forward(X, scale=2.0), Theirs(t).forward(X, scale=2.0), rtol=0, atol=0)
    assert Ours.forward.__name__ == "forward"


@pytest.mark.parametrize("bad", [
    (so_m.cayley_map, (torch.zeros(3),), gnn.VectorError),
    (so_m.cayley_map, (torch.zeros(3, 2),), gnn.NonSquareError),
    (so_m.cayley_map, ([[0.0]],), gf.ManifoldError),
    (so_m.cayley_map, (torch.zeros(2, 2, dtype=torch.int64),), gf.ManifoldError),
    (hurwitz_m.get_lyap_exp, (torch.zeros(2, 3),), gnn.NonSquareError),
    (hurwitz_m.get_lyap_exp, (torch.zeros(0, 3, 3),), gf.ManifoldError),
    (hurwitz_m.get_lyap_exp, (torch.tensor([[float("nan")]]),), gf.ManifoldError),
    (sphere_m.project, (torch.tensor(1.0),), gf.ManifoldError),
    (sphere_m.uniform_init_sphere_, (torch.empty(3), 0.0), gf.ManifoldError),
    (sphere_m.uniform_init_sphere_, (torch.empty(3), -1.0), gf.ManifoldError),
    (sphere_m.uniform_init_sphere_, (torch.empty(3), float("nan")), gf.ManifoldError),
    (sphere_m.uniform_init_sphere_, (torch.empty(()),), gf.ManifoldError),
], ids=lambda b: f"{b[0].__name__}-{b[2].__name__}")
def test_helpers_refuse_bad_input(bad):
    fn, args, err = bad
    with pytest.raises(err) as info:
        fn(*args)
    assert isinstance(info.value, gf.ManifoldError) and isinstance(info.value, ValueError)
    assert fn.__name__ in str(info.value) and "expected" in str(info.value)


def test_symf_is_geotorchs():
    from geotorch.fixedrank import inv_softplus_epsilon, softplus_epsilon
    from geotorch.symmetric import SymF as TheirSymF

    SymF = symmetric_m.SymF
    pair = (softplus_epsilon, inv_softplus_epsilon)
    # GeoTorch's errors, as geofunc's ValueErrors
    for args, err in [(((4,), 1, pair), gnn.VectorError), (((4, 3), 1, pair), gnn.NonSquareError),
                      (((4, 4), 5, pair), gnn.RankError), (((4, 4), 0, pair), gnn.RankError),
                      (((4, 4), 2, 3.0), ValueError)]:
        with pytest.raises(err):
            SymF(*args)
        with pytest.raises(ValueError):
            TheirSymF(*args)
    torch.manual_seed(4)
    M, T = SymF((2, 5, 5), 3, pair).to(f64), TheirSymF((2, 5, 5), 3, pair).to(f64)
    X = M.sample()
    assert X.shape == (2, 5, 5) and M.in_manifold(X) and T.in_manifold(X)
    L, Q = M.sample(factorized=True)
    assert L.shape == (2, 3) and Q.shape == (2, 5, 3)
    torch.testing.assert_close(M(M.right_inverse(X)), X, rtol=1e-9, atol=1e-11)
    # GeoTorch's membership, case by case
    E = torch.linalg.eigh(X)[1]
    for lam, member in [((0.0, 0.0, 1.0, 2.0, 3.0), True), ((0.0, 0.0, -1e-3, 2.0, 3.0), False),
                        ((1e-3, 0.0, 1.0, 2.0, 3.0), False), ((0.0, 0.0, 0.0, 0.0, 3.0), True)]:
        Y = E @ torch.diag_embed(torch.tensor(lam, dtype=f64).expand(2, 5)) @ E.mT
        assert M.in_manifold(Y) == T.in_manifold(Y) == member, lam
    assert not M.in_manifold(X + torch.triu(torch.ones(5, 5, dtype=f64), 1)) and not M.in_manifold(X[0])
    # a single callable: no inverse, as GeoTorch's
    with pytest.raises(gnn.InverseError):
        SymF((4, 4), 2, torch.exp).right_inverse(SymF((4, 4), 2, torch.exp).sample())
    # GeoTorch's checkpoint of a SymF-constrained layer loads with the same weight
    torch.set_default_dtype(f64)
    try:
        a, b = nn.Linear(5, 5), nn.Linear(5, 5)
        for layer, cls in ((a, TheirSymF), (b, SymF)):
            C = cls((5, 5), 3, pair)
            with torch.no_grad():
                layer.weight.copy_(C.sample())
            P.register_parametrization(layer, "weight", C)
        with torch.no_grad():
            a.parametrizations.weight.original.add_(0.1 * torch.randn(5, 5))
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-12, atol=1e-13)
    finally:
        torch.set_default_dtype(torch.float32)


def _geotorch_classes() -> list[tuple[str, type, type]]:
    from geotorch.symmetric import SymF as TheirSymF

    names = [n for n in geotorch.__all__ if inspect.isclass(getattr(geotorch, n))]
    return [(n, getattr(geotorch, n), getattr(gnn, n)) for n in names] + [("SymF", TheirSymF, gnn.SymF)]


def test_shared_methods_take_geotorchs_arguments():
    """Every public method a geofunc.nn class shares with GeoTorch's takes GeoTorch's arguments, in order (its own may
    follow). Not compared: ``forward`` (GeoTorch names the raw tensor X, v, x or X1..X3; torch calls it positionally)
    and methods GeoTorch declares as ``(X, *args, **kwargs)``."""
    checked = 0
    for name, theirs, ours in _geotorch_classes():
        for meth, fn in inspect.getmembers(theirs, inspect.isfunction):
            if meth.startswith("_") or meth == "forward" or not hasattr(ours, meth):
                continue
            if fn.__qualname__.split(".")[0] in ("Module", "ModuleList"):
                continue
            a = inspect.signature(fn).parameters
            if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in a.values()):
                continue
            b = list(inspect.signature(getattr(ours, meth)).parameters)
            assert b[: len(a)] == list(a), (name, meth, list(a), b)
            checked += 1
    assert checked > 40


def test_hurwitz_submersion_inv_takes_rho_and_tol_as_geotorch():
    torch.manual_seed(5)
    M, T = gnn.Hurwitz((2, 4, 4), alpha=0.2).to(f64), geotorch.Hurwitz((2, 4, 4), alpha=0.2).to(f64)
    A = M.sample()
    eye = torch.eye(4, dtype=f64)
    for rho in (1, 2.5):
        Q, Pinv, S = M.submersion_inv(A, rho=rho)
        Qt, Pinvt, St = T.submersion_inv(A, rho=rho)
        torch.testing.assert_close(Q, Qt, rtol=0, atol=0)
        torch.testing.assert_close(Pinv, Pinvt, rtol=1e-6, atol=0)  # the Lyapunov solve's conditioning
        torch.testing.assert_close(S, St, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(Pinv @ (S - 0.5 * Q) - 0.2 * eye, A, rtol=0, atol=1e-12)
        assert torch.equal(S, -S.mT) and bool((torch.linalg.eigvalsh(Pinv) > 0).all())
    with pytest.raises(ValueError):  # a residual no solve reaches: GeoTorch's ValueError
        T.submersion_inv(A, tol=1e-30)
    with pytest.raises(gf.ManifoldError, match="residual"):
        M.submersion_inv(A, tol=1e-30)
    for rho in (0, -1.0, float("inf")):
        with pytest.raises(gf.ManifoldError, match="rho"):
            M.submersion_inv(A, rho=rho)
    assert not M.in_manifold_eigen(A=torch.eye(4)) and M.in_manifold_eigen(A=A)  # GeoTorch's argument name
