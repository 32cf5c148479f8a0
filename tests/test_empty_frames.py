"""Frames with an empty dimension (n×0, 0×k): St(n, 0) and Gr(n, 0) are one point, the empty frame.

GeoTorch's ``orthogonal`` and ``grassmannian`` take such weights (``nn.Linear(0, 3)``, a layer pruned
to width 0); so do ``Stiefel``/``Grassmannian`` and ``geofunc.nn`` here. Every map returns an empty
tensor of the right shape, gradients are empty tensors (not None, not an error), and every other
space still refuses empty matrix dimensions with a ``ManifoldError``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from cases_orthogonal import ORTHOGONAL_CASES
from torch import nn
from torch.func import functional_call, grad, vmap

import geofunc as gf
import geofunc.nn as gnn
from geofunc import ManifoldError
from geofunc.testing import check_space

# torch's own layer init warns that it has nothing to initialize
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")

SPACES = [gf.Stiefel(), gf.Stiefel(triv="cayley"), gf.Grassmannian(), gf.Grassmannian(triv="cayley")]
SHAPES = [(3, 0), (0, 4), (0, 0), (2, 5, 0), (2, 0, 3)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.complex64]

# The harness's properties that mean something on a one-point space (the others compare an
# off-space perturbation, a NaN entry, sample moments or tangent-space ranks, which an empty
# tensor does not have).
EMPTY_PROPERTIES = ("sample", "to_manifold", "from_manifold", "rebase", "retract", "project", "metric",
                    "pure", "dtypes", "gradcheck", "float32_maps", "jacobians", "vmap",
                    "vmap_grad", "compile_aot", "bad_input")


def _name(x):
    return repr(x) if not isinstance(x, tuple) else "x".join(map(str, x))


@pytest.mark.parametrize("case", [c for c in ORTHOGONAL_CASES if isinstance(c.space, (gf.Stiefel, gf.Grassmannian))],
                         ids=lambda c: c.id)
def test_harness_properties_on_empty_frames(case):
    empty = dataclasses.replace(case, shapes=((3, 0), (0, 4), (2, 5, 0), (0, 0)), smoke_shape=(3, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_space(empty, properties=EMPTY_PROPERTIES)
    assert set(EMPTY_PROPERTIES) <= {name for name, _ in report.ran}, report


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("M", SPACES, ids=_name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_map_of_an_empty_frame(M, shape, dtype):
    g = torch.Generator().manual_seed(0)
    X = M.sample(shape, generator=g, dtype=dtype)
    assert X.shape == shape and X.dtype == dtype
    Z = torch.randn(shape).to(dtype)
    for out in (M.to_manifold(Z), M.to_manifold(Z, X), M.project(Z), M.retract(X, Z), M.tangent(X, Z),
                M.egrad_to_rgrad(X, Z), M.transport(X, X, Z), M.rebase(Z, X)[0], M.rebase(Z, X)[1],
                M.from_manifold(X)[0], M.from_manifold(X)[1]):
        assert out.shape == shape and out.dtype == dtype
    assert M.inner(X, Z, Z).shape == shape[:-2]
    assert bool(M.contains(X).all()) and M.contains(X).shape == shape[:-2]
    M.check(X)
    assert bool(M.contains(Z).all())  # any tensor of the shape is the one point


@pytest.mark.parametrize("M", SPACES, ids=_name)
def test_empty_frames_broadcast_with_their_base_and_still_check_it(M):
    Z, base = torch.randn(3, 0), M.sample((2, 3, 0))
    assert M.to_manifold(Z, base).shape == (2, 3, 0)
    with pytest.raises(ManifoldError, match="point shape"):
        M.to_manifold(Z, M.sample((4, 0)))
    with pytest.raises(ManifoldError, match="dtype"):
        M.to_manifold(Z, base.double())


@pytest.mark.parametrize("M", SPACES, ids=_name)
def test_gradients_through_an_empty_frame_are_empty_tensors(M):
    Z = torch.randn(2, 4, 0, dtype=torch.float64, requires_grad=True)
    (gZ,) = torch.autograd.grad(M.to_manifold(Z).sum(), Z)
    assert gZ.shape == Z.shape
    gf_ = grad(lambda z: M.to_manifold(z).sum())(Z.detach())
    assert gf_.shape == Z.shape
    out = vmap(grad(lambda z: M.to_manifold(z).sum()))(Z.detach())
    assert out.shape == Z.shape
    c = torch.compile(lambda z: M.to_manifold(z), fullgraph=True, backend="aot_eager")
    assert c(Z).shape == Z.shape


def test_other_spaces_still_refuse_empty_matrix_dimensions():
    for M, shape in [(gf.SO(), (0, 0)), (gf.LowRank(rank=1), (3, 0)), (gf.Oblique(), (3, 0)), (gf.Sym(), (0, 0)),
                     (gf.PSD(), (0, 0)), (gf.GLp(), (0, 0)), (gf.Sphere(), (3, 0))]:
        with pytest.raises(ManifoldError, match="non-empty"):
            M.to_manifold(torch.zeros(shape))


def test_a_model_with_an_empty_layer_trains_under_the_pytree_api():
    """A layer pruned to width 0 between two others: ``grad``, ``vmap`` over an ensemble, the
    Riemannian optimizers and ``rebase`` all go through."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3))
    c = {"0.weight": gf.Stiefel(), "1.weight": gf.Grassmannian()}
    params = gf.sample(c, dict(model.named_parameters()), generator=torch.Generator().manual_seed(0))
    raw, bases = gf.from_manifold(c, params)
    x = torch.randn(5, 4)

    def loss(raw, bases):
        return functional_call(model, gf.to_manifold(c, raw, bases), (x,)).square().sum()

    g = grad(loss)(raw, bases)
    assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in raw.items()}
    assert torch.equal(g["1.bias"], 2 * 5 * raw["1.bias"])  # the output is the bias alone
    for opt in (gf.optim.rsgd(c, lr=0.1), gf.optim.radam(c, lr=0.1)):
        p2, _ = opt.update(g, opt.init(params), params)
        assert all(bool(v.all()) for v in gf.contains(c, p2).values())
    raw2, bases2 = gf.rebase(c, raw, bases)
    assert {k: v.shape for k, v in bases2.items()} == {"0.weight": (0, 4), "1.weight": (3, 0)}
    ens = {k: v.expand(3, *v.shape).clone() for k, v in raw.items()}
    ens_b = {k: v.expand(3, *v.shape).clone() for k, v in bases.items()}
    assert vmap(loss)(ens, ens_b).shape == (3,)


@pytest.mark.parametrize("register", ["orthogonal", "grassmannian"])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 3)], ids=_name)
def test_nn_one_liners_take_empty_weights_as_geotorch_does(register, shape):
    """``orthogonal``/``grassmannian`` on a weight with an empty dimension: the weight's shape, the
    layer's output and its training step as GeoTorch's (whose base buffer is n×n, here the n×k frame,
    as for every shape)."""
    geotorch = pytest.importorskip("geotorch")
    outs = {}
    for lib in (geotorch, gnn):
        torch.manual_seed(0)
        layer = nn.Linear(shape[-1], shape[-2])
        if len(shape) == 3:
            layer.weight = nn.Parameter(torch.zeros(shape))
            layer.bias = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(lib, register)(layer, "weight")
        assert layer.weight.shape == shape
        assert layer.parametrizations.weight.original.shape == shape
        x = torch.randn(4, shape[-1])
        y = layer(x) if len(shape) == 2 else layer.weight @ x.T
        y.sum().backward()
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
        outs[lib] = (y.detach(), layer.weight.detach().clone())
    for a, b in zip(outs[geotorch], outs[gnn]):
        assert a.shape == b.shape and torch.equal(a, b)


def test_nn_classes_and_state_dicts_with_an_empty_frame():
    layer = nn.Linear(0, 3)
    nn.utils.parametrize.register_parametrization(layer, "weight", gnn.Stiefel(size=(3, 0)))
    M = layer.parametrizations.weight[0]
    assert M.in_manifold(layer.weight) and M.sample().shape == (3, 0)
    layer.weight = M.sample()
    gnn.update_base(layer, "weight")
    other = gnn.orthogonal(nn.Linear(0, 3))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(torch.randn(2, 0)), layer(torch.randn(2, 0)))


def test_square_and_empty_weights_are_still_refused_by_orthogonal():
    """A 0×0 weight is an SO point shape, which stays refused (GeoTorch fails with an IndexError)."""
    with pytest.raises(ManifoldError, match="non-empty"):
        gnn.orthogonal(nn.Linear(0, 0))
