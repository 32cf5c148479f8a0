"""Regressions from a differential fuzz pass of geofunc.nn against GeoTorch 0.4.0.

Each test pins one behaviour a GeoTorch user hits where geofunc.nn used to differ. The GeoTorch
side is written out as literals (so the tests run without GeoTorch), and, where GeoTorch is
installed, also checked against it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geofunc.nn as gnn


def _geotorch():
    try:
        import geotorch
    except ImportError:  # pragma: no cover - GeoTorch is a test extra
        return None
    return geotorch


# ----------------------------------------------------------------------------- integer matrices
def test_skew_symmetric_in_manifold_take_integer_tensors():
    """``Skew.in_manifold`` / ``Symmetric.in_manifold`` of an integer tensor: a verdict, as GeoTorch's
    (``torch.allclose`` of ``X`` and ``∓Xᵀ``), not a RuntimeError "Long did not match Float"."""
    skew = torch.tensor([[0, 1], [-1, 0]])
    sym = torch.tensor([[0, 1], [1, 0]])
    assert gnn.Skew.in_manifold(skew) is True
    assert gnn.Skew.in_manifold(sym) is False
    assert gnn.Symmetric.in_manifold(sym) is True
    assert gnn.Symmetric.in_manifold(skew) is False
    gt = _geotorch()
    if gt is not None:
        for X in (skew, sym):
            assert bool(gt.Skew.in_manifold(X)) == gnn.Skew.in_manifold(X)
            assert bool(gt.Symmetric.in_manifold(X)) == gnn.Symmetric.in_manifold(X)


def test_skew_assign_integer_tensor_raises_value_error():
    """Assigning an integer skew matrix to a ``skew`` weight: a ``ValueError`` (GeoTorch: torch's
    dtype check), not a RuntimeError from the membership test."""
    layer = gnn.skew(nn.Linear(3, 3))
    before = layer.weight.detach().clone()
    X = torch.tensor([[0, 1, 2], [-1, 0, 3], [-2, -3, 0]])
    with pytest.raises(ValueError):
        layer.weight = X
    assert torch.equal(layer.weight, before)


# ----------------------------------------------------------------------------- Sphere.in_manifold
@pytest.mark.parametrize("cls", ["Sphere", "SphereEmbedded"])
def test_sphere_in_manifold_treats_leading_dims_as_batch(cls):
    """GeoTorch's ``Sphere.in_manifold`` checks every vector along the last dimension, whatever the
    leading dimensions ("the first dimensions are treated as batch dimensions"): a stack of samples
    is on the sphere. geofunc.nn used to answer False for any shape but the class's size."""
    torch.manual_seed(0)
    M = getattr(gnn, cls)((3, 4), radius=2.0)
    stack = torch.stack([M.sample() for _ in range(5)])  # (5, 3, 4)
    assert M.in_manifold(stack)
    assert M.in_manifold(stack[:, 0])  # (5, 4)
    assert not M.in_manifold(0.5 * stack)
    assert not M.in_manifold(torch.tensor(2.0))
    gt = _geotorch()
    if gt is not None:
        G = getattr(gt, cls)((3, 4), radius=2.0)
        assert bool(G.in_manifold(stack)) and bool(G.in_manifold(stack[:, 0])) and not bool(G.in_manifold(0.5 * stack))


def test_sphere_assignment_still_checks_the_size():
    """The lenient membership test does not let a batch through an assignment."""
    layer = gnn.sphere(nn.Linear(4, 3))
    X = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    with pytest.raises(gnn.InManifoldError):
        layer.weight = X


# ----------------------------------------------------------------------------- random draws
@pytest.mark.parametrize("make", [
    lambda: gnn.Skew((4, 4)),
    lambda: gnn.Symmetric(size=(4, 4)),
    lambda: gnn.SphereEmbedded((3, 4)),
    lambda: gnn.Rn((3, 4)),
])  # fmt: skip
def test_classes_without_a_base_draw_nothing_at_construction(make):
    """A class without a base (GeoTorch's Skew, Symmetric, SphereEmbedded, Rn) leaves the global RNG
    alone when built, as GeoTorch's do; geofunc.nn used to draw a throwaway sample."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make()
    assert torch.equal(torch.rand(3), expected)


def test_symmetric_and_skew_starts_follow_the_seed_as_geotorch():
    """``symmetric(layer)`` does not move the global RNG, and ``skew(layer)`` starts at GeoTorch's
    sample for the same seed (the draws of its ``sample()`` only)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    gnn.symmetric(layer)
    after = torch.rand(3)
    torch.manual_seed(0)
    nn.Linear(4, 4)
    assert torch.equal(after, torch.rand(3))

    torch.manual_seed(1)
    layer = gnn.skew(nn.Linear(4, 4))
    torch.manual_seed(1)
    nn.Linear(4, 4)
    W = torch.empty(4, 4)
    nn.init.xavier_normal_(W)
    L = W.tril(-1)
    assert torch.equal(layer.weight.detach(), L - L.T)
    gt = _geotorch()
    if gt is not None:
        torch.manual_seed(1)
        ref = gt.skew(nn.Linear(4, 4))
        assert torch.equal(layer.weight.detach(), ref.weight.detach())


# ----------------------------------------------------------------------------- chains
def test_symmetric_on_a_constrained_tensor_keeps_its_values():
    """``symmetric`` on an already constrained tensor appends to the chain and keeps the values (GeoTorch's
    ``Symmetric`` has no inverse: nothing is assigned), so ``skew`` then ``symmetric`` gives the
    symmetrization of the skew value; geofunc.nn used to raise InManifoldError ("X is not symmetric")."""
    torch.manual_seed(0)
    layer = gnn.skew(nn.Linear(4, 4))
    A = layer.weight.detach().clone()
    gnn.symmetric(layer)
    assert len(layer.parametrizations.weight) == 2
    L = A.tril()
    assert torch.equal(layer.weight.detach(), L + L.tril(-1).T)
    gt = _geotorch()
    if gt is not None:
        torch.manual_seed(0)
        ref = gt.symmetric(gt.skew(nn.Linear(4, 4)))
        assert torch.equal(layer.weight.detach(), ref.weight.detach())


# ----------------------------------------------------------------------------- GLp at registration
def test_glp_registration_on_a_negative_determinant_weight_says_what_to_do():
    """GeoTorch's ``register_parametrization(layer, "weight", GLp(size))`` takes the layer's current
    weight whatever the sign of its determinant (about half of fresh layers have det < 0); geofunc's
    GLp is det > 0 only (README), so it refuses, and the message says why and what to do instead."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    assert float(torch.linalg.det(layer.weight.detach())) < 0
    with pytest.raises(gnn.InManifoldError, match=r"positive determinant.*M\.sample\(\).*invertible"):
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", gnn.GLp(layer.weight.size()))
    M = gnn.GLp((3, 3))
    with pytest.raises(gnn.InManifoldError) as info:  # singular, not negative: no hint about the sign
        M.right_inverse(torch.zeros(3, 3))
    assert "positive determinant" not in str(info.value)


# ----------------------------------------------------------------------------- hyperparameter types
@pytest.mark.parametrize("kind", ["np.int64", "np.int32", "tensor"])
def test_rank_of_any_integer_type(kind):
    """GeoTorch takes a NumPy integer or a 0-d integer tensor as ``rank``; geofunc.nn used to raise
    RankError ("expected a rank with 1 <= rank <= 3, got rank np.int64(2)")."""
    if kind == "tensor":
        rank = torch.tensor(2)
    else:
        np = pytest.importorskip("numpy")
        rank = getattr(np, kind[3:])(2)
    layer = gnn.low_rank(nn.Linear(3, 4), "weight", rank)
    assert int(torch.linalg.matrix_rank(layer.weight.detach())) == 2
    assert layer.parametrizations.weight[0].rank == 2 and type(layer.parametrizations.weight[0].rank) is int
    gnn.positive_semidefinite_fixed_rank(nn.Linear(3, 3), "weight", rank)
    with pytest.raises(gnn.RankError):
        gnn.low_rank(nn.Linear(3, 4), "weight", torch.tensor(4))
    with pytest.raises(gnn.RankError):
        gnn.low_rank(nn.Linear(3, 4), "weight", 2.0)


def test_scalar_tensor_hyperparameters():
    """``radius``, ``lam`` and ``alpha`` given as 0-d tensors or NumPy scalars (GeoTorch takes them)."""
    layer = gnn.sphere(nn.Linear(3, 4), radius=torch.tensor(2.0))
    assert torch.allclose(layer.weight.detach().norm(dim=-1), torch.full((4,), 2.0))
    layer = gnn.almost_orthogonal(nn.Linear(3, 3), lam=torch.tensor(0.5))
    assert layer.parametrizations.weight[0].lam == 0.5
    layer = gnn.alpha_stable(nn.Linear(3, 3), alpha=torch.tensor(0.5))
    assert float(torch.linalg.eigvals(layer.weight.detach()).real.max()) <= -0.5
    with pytest.raises(ValueError):
        gnn.sphere(nn.Linear(3, 4), radius=torch.tensor(-1.0))
    np = pytest.importorskip("numpy")
    layer = gnn.sphere(nn.Linear(3, 4), radius=np.float32(2.0))
    assert layer.parametrizations.weight[0].radius == 2.0


# ----------------------------------------------------------------------------- assignable hyperparameters
def test_assigning_lam_changes_the_map_as_geotorch():
    """GeoTorch's ``AlmostOrthogonal`` reads ``self.lam`` in its map: ``M.lam = 0.1`` (annealing) narrows the
    singular values of the weight. geofunc.nn used to keep the old map and test membership with the new
    ``lam`` (silently inconsistent)."""
    torch.manual_seed(0)
    layer = gnn.almost_orthogonal(nn.Linear(4, 4), lam=0.5)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(4, 4))
    M = layer.parametrizations.weight[0]
    assert float((torch.linalg.svdvals(layer.weight.detach()) - 1).abs().max()) > 0.2
    M.lam = 0.1
    s = torch.linalg.svdvals(layer.weight.detach())
    assert float((s - 1).abs().max()) <= 0.1 + 1e-6
    assert M.lam == 0.1 and M.in_manifold(layer.weight)
    with pytest.raises(ValueError):
        M.lam = 2.0


@pytest.mark.parametrize("embedded", [False, True])
def test_assigning_radius_changes_the_map_as_geotorch(embedded):
    """GeoTorch's spheres read ``self.radius`` in their map: ``M.radius = 2`` scales the weight (the same
    directions), ``sample`` and ``in_manifold`` follow."""
    torch.manual_seed(0)
    layer = gnn.sphere(nn.Linear(3, 4), embedded=embedded)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(4, 3))
    M = layer.parametrizations.weight[0]
    W = layer.weight.detach().clone()
    M.radius = 2.0
    assert torch.allclose(layer.weight.detach(), 2.0 * W, atol=1e-6)
    assert M.in_manifold(layer.weight) and M.in_manifold(M.sample()) and not M.in_manifold(W)
    gnn.update_base(layer, "weight")
    assert torch.allclose(layer.weight.detach(), 2.0 * W, atol=1e-6)
    with pytest.raises(ValueError):
        M.radius = -1.0


@pytest.mark.parametrize("register", [gnn.skew, gnn.symmetric])
@pytest.mark.parametrize("size", [(0, 0), (2, 0, 0)])
def test_empty_square_weights_are_refused_with_a_manifold_error(register, size):
    """A 0×0 weight: GeoTorch's ``skew`` fails with a ZeroDivisionError in its init (geofunc's did too);
    both say which tensor and why."""
    from geofunc import ManifoldError

    layer = nn.Module()
    layer.weight = nn.Parameter(torch.zeros(size))
    with pytest.raises(ManifoldError, match="non-empty matrix dimensions"):
        register(layer, "weight")
    with pytest.raises(ManifoldError, match="non-empty matrix dimensions"):
        (gnn.Skew if register is gnn.skew else gnn.Symmetric)(size=size)


def _perturbed(layer):
    with torch.no_grad():
        raw = layer.parametrizations.weight.original
        raw.add_(0.5 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(1), dtype=raw.dtype))
    return layer


def _cayley(A):
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


@pytest.mark.parametrize("register, shape", [(gnn.orthogonal, (4, 4)), (gnn.orthogonal, (6, 3)),
                                             (lambda m: gnn.low_rank(m, "weight", 2), (5, 4))],
                         ids=["SO", "Stiefel", "LowRank"])
@pytest.mark.parametrize("triv", ["cayley", _cayley], ids=["name", "callable"])
def test_assigning_triv_changes_the_map_as_geotorch(register, shape, triv):
    """GeoTorch's classes read ``self.triv`` in their map: ``M.triv = "cayley"`` moves the weight to the
    Cayley chart's point of the same raw tensor. geofunc.nn kept the old map, silently (Note [Maps
    assigned after construction])."""
    torch.manual_seed(0)
    layer = _perturbed(register(nn.Linear(shape[1], shape[0])))
    M = layer.parametrizations.weight[0]
    W = layer.weight.detach().clone()
    M.triv = triv
    assert M.triv is (M.trivializations[triv] if isinstance(triv, str) else triv)  # a callable, as GeoTorch's
    assert M.space.triv is triv
    W2 = layer.weight.detach()
    assert float((W2 - W).abs().max()) > 1e-2  # another point of the same raw tensor
    # the same as a class built with that triv from the same raw tensor and bases
    fresh = type(M)(M.size, **({"rank": M.rank} if hasattr(M, "rank") else {}), triv=triv)
    fresh.load_state_dict(M.state_dict())
    torch.testing.assert_close(W2, fresh(layer.parametrizations.weight.original.detach()), atol=1e-6, rtol=0)
    assert M.in_manifold(W2)
    with pytest.raises(ValueError):
        M.triv = "not a map"


def test_assigning_f_changes_the_map_as_geotorch():
    """GeoTorch's FixedRank (and the other classes with ``f``) read ``self.f`` in their map:
    ``M.f = (torch.exp, torch.log)`` gives singular values ``exp(s)`` of the same raw tensor."""
    torch.manual_seed(0)
    layer = _perturbed(gnn.fixed_rank(nn.Linear(4, 5), "weight", 2))
    M = layer.parametrizations.weight[0]
    s_soft = torch.linalg.svdvals(layer.weight.detach())[:2]
    pair = (torch.exp, torch.log)
    M.f = pair
    assert M.f is pair[0] and M.inv is pair[1] and M.space.f is pair  # callables, as GeoTorch's attributes
    s_exp = torch.linalg.svdvals(layer.weight.detach())[:2]
    # f acts on the same raw singular-value entries: exp(s) where softplus(s) was (softplus(s) = log(1 + exp(s)))
    torch.testing.assert_close(s_exp, torch.expm1(s_soft - _softplus_floor(M)).sort(descending=True).values,
                               atol=1e-4, rtol=1e-4)
    layer.weight = layer.weight.detach()  # the new f's inverse is used on assignment
    M.f = torch.exp  # the current map assigned again: nothing changes, GeoTorch's inv kept
    assert M.space.f is pair and M.inv is torch.log
    layer.weight = layer.weight.detach()
    M.f = torch.special.expit  # another single callable: the map follows, assignment has no inverse
    assert M.space.f is torch.special.expit and M.inv is None
    with pytest.raises(gnn.InverseError):
        layer.weight = layer.weight.detach()
    with pytest.raises(ValueError):
        M.f = "not a map"


def _softplus_floor(M):
    """geofunc's softplus is ``log(1 + eˢ) + floor`` (the dtype's √ε, Note in the migration guide)."""
    return float(torch.finfo(torch.float32).eps) ** 0.5


def test_spaces_without_triv_or_f_have_no_such_attribute():
    assert not hasattr(gnn.Sphere((3,)), "triv") and not hasattr(gnn.SO((3, 3)), "f")


def test_a_subclass_keeps_its_own_f_or_triv_where_the_space_has_none():
    """A subclass (GeoTorch's way to build on a class) that stores its own ``self.f`` or ``self.triv`` where
    its space has no such field: a plain attribute, as before Note [Maps assigned after construction]
    (the assignment raised "object has no attribute 'f'")."""
    class Squashed(gnn.Sphere):
        def __init__(self, size):
            super().__init__(size)
            self.f = torch.tanh
            self.triv = nn.Linear(3, 3)  # a submodule by that name is registered as one

        def forward(self, X):
            return super().forward(self.f(X))

    M = Squashed((3,))
    assert M.f is torch.tanh and isinstance(M.triv, nn.Linear) and "triv" in M._modules
    X = torch.randn(3)
    torch.testing.assert_close(M(X), gnn.Sphere.forward(M, torch.tanh(X)), atol=0, rtol=0)
    M.f = torch.sin
    assert M.f is torch.sin
    assert not hasattr(gnn.Sphere((3,)), "f")


@pytest.mark.parametrize("register", [gnn.skew, gnn.symmetric])
def test_assigning_lower_changes_the_map_as_geotorch(register):
    """GeoTorch's Skew and Symmetric read ``self.lower`` in their map."""
    torch.manual_seed(0)
    layer = register(nn.Linear(4, 4))
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(4, 4))
    Z = layer.parametrizations.weight.original.detach()
    M = layer.parametrizations.weight[0]
    M.lower = False
    assert M.lower is False
    up = torch.triu(Z, 1)
    expected = up - up.mT if register is gnn.skew else torch.triu(Z) + up.mT
    torch.testing.assert_close(layer.weight.detach(), expected, atol=0, rtol=0)
