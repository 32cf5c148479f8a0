"""GeoTorch 0.4.0 checkpoints load into the same model built with ``geofunc.nn`` (Note [GeoTorch
checkpoints] in ``geofunc/nn/_geotorch_checkpoints.py``), against the installed GeoTorch itself.

A GeoTorch model is built, trained a few SGD steps (its raw tensors leave 0; its bases are the
random points GeoTorch's registration draws), saved with ``torch.save`` and loaded with
``torch.load(weights_only=True)`` into the same model built with ``geofunc.nn`` (another seed):
the loaded weights are GeoTorch's to the rounding of its float32 (float64) evaluation, on the
space by the independent predicates of ``tests/reference.py``, and training goes on from there.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn

import geofunc as gf
import geofunc.nn as gnn
from reference import member

geotorch = pytest.importorskip("geotorch")

# (constraint function, kwargs, module factory)
CASES = [
    ("orthogonal", {}, lambda: nn.Linear(5, 3)),
    ("orthogonal", {}, lambda: nn.Linear(3, 6)),
    ("orthogonal", {"triv": "cayley"}, lambda: nn.Linear(3, 6)),
    ("orthogonal", {}, lambda: nn.Linear(4, 4)),
    ("orthogonal", {}, lambda: nn.Conv2d(2, 3, (4, 2))),
    ("grassmannian", {}, lambda: nn.Linear(2, 5)),
    ("grassmannian", {"triv": "cayley"}, lambda: nn.Linear(6, 2)),
    ("grassmannian", {}, lambda: nn.Linear(3, 3)),
    ("sphere", {}, lambda: nn.Linear(4, 3)),
    ("sphere", {"radius": 2.0}, lambda: nn.Linear(4, 3)),
    ("sphere", {"radius": 0.5, "embedded": True}, lambda: nn.Linear(4, 3)),
    ("skew", {"lower": False}, lambda: nn.Linear(4, 4)),
    ("symmetric", {}, lambda: nn.Linear(4, 4)),
    ("almost_orthogonal", {"lam": 0.3}, lambda: nn.Linear(4, 4)),
    ("almost_orthogonal", {"lam": 0.5, "f": "tanh", "triv": "cayley"}, lambda: nn.Linear(5, 5)),
    ("almost_orthogonal", {"lam": 0.2, "f": "scaled_sigmoid"}, lambda: nn.Linear(3, 3)),
    ("low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(5, 4)),
    ("low_rank", {"tensor_name": "weight", "rank": 2, "triv": "cayley"}, lambda: nn.Linear(3, 7)),
    ("low_rank", {"tensor_name": "weight", "rank": 1}, lambda: nn.Conv2d(4, 6, 3)),
    ("fixed_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(4, 5)),
    ("fixed_rank", {"tensor_name": "weight", "rank": 3}, lambda: nn.Linear(6, 4)),
    ("invertible", {}, lambda: nn.Linear(4, 4)),
    ("sln", {}, lambda: nn.Linear(4, 4)),
    ("positive_definite", {}, lambda: nn.Linear(4, 4)),
    ("positive_definite", {"triv": "cayley"}, lambda: nn.Linear(3, 3)),
    ("positive_semidefinite", {}, lambda: nn.Linear(4, 4)),
    ("positive_semidefinite_low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(4, 4)),
    ("positive_semidefinite_fixed_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(5, 5)),
    ("alpha_stable", {}, lambda: nn.Linear(4, 4)),
    ("alpha_stable", {"alpha": 0.5}, lambda: nn.Linear(3, 3)),
]


def _input(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if isinstance(m, nn.Conv2d):
        return torch.randn(8, m.in_channels, 6, 6, generator=g, dtype=dtype)
    return torch.randn(8, m.in_features, generator=g, dtype=dtype)


def _trained(lib, name: str, kwargs: dict, make, dtype: torch.dtype, seed: int, steps: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = make().to(dtype)
    getattr(lib, name)(m, **kwargs)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x = _input(m, dtype)
    for _ in range(steps):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    if lib is geotorch:  # every raw entry non-zero, also those GeoTorch's map ignores (training leaves them 0)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for t in m.parametrizations.weight.parameters():
                t.add_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return m


def _reload(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _atol(W: torch.Tensor) -> float:
    scale = max(1.0, float(W.abs().max()))
    return (2e-5 if W.dtype == torch.float32 else 1e-11) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_trained_geotorch_model_loads_with_its_weights(case, dtype):
    name, kwargs, make = case
    mg = _trained(geotorch, name, kwargs, make, dtype, seed=0)
    sd = _reload(mg.state_dict())
    keys = {k: v.clone() for k, v in sd.items()}
    mf = _trained(gnn, name, kwargs, make, dtype, seed=1, steps=0)
    mf.load_state_dict(sd)  # strict
    with torch.no_grad():
        Wg, Wf = mg.weight, mf.weight
        x = _input(mg, dtype)
        torch.testing.assert_close(Wf, Wg, atol=_atol(Wg), rtol=0)
        torch.testing.assert_close(mf(x), mg(x), atol=10 * _atol(Wg), rtol=1e-5)
        assert Wf.dtype == dtype
    space = gnn.parametrization_of(mf).space
    assert member(space, Wf)
    # the checkpoint itself is left as it was
    assert set(sd) == set(keys) and all(torch.equal(sd[k], keys[k]) for k in sd)
    # and the model trains on from there, on its space
    opt = torch.optim.Adam(mf.parameters(), lr=0.02)
    x = _input(mf, dtype)
    for _ in range(3):
        opt.zero_grad()
        mf(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert member(space, mf.weight)
        if not (name == "grassmannian" and Wf.shape[-1] == Wf.shape[-2]):  # Gr(n, n) is a point
            assert not torch.allclose(mf.weight, Wf)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("orthogonal", "low_rank", "positive_definite",
                                                                 "sphere", "alpha_stable")],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_float32_geotorch_checkpoint_loads_into_a_float64_model(case):
    name, kwargs, make = case
    mg = _trained(geotorch, name, kwargs, make, torch.float32, seed=0)
    mf = _trained(gnn, name, kwargs, make, torch.float64, seed=1, steps=0)
    mf.load_state_dict(_reload(mg.state_dict()))
    with torch.no_grad():
        Wf = mf.weight
        assert Wf.dtype == torch.float64
        torch.testing.assert_close(Wf, mg.weight.double(), atol=_atol(mg.weight), rtol=0)
        # re-made valid in float64 (Note [Raw tensors across dtypes]), not left at float32's rounding
        assert member(gnn.parametrization_of(mf).space, Wf)


def test_the_class_api_registered_directly():
    """GeoTorch's class API (``register_parametrization(layer, "weight", geotorch.X(size))``): the class
    re-writes the raw tensor torch has just loaded."""
    torch.manual_seed(0)
    pairs = [
        (lambda lib: lib.Stiefel((6, 3)), nn.Linear(3, 6)),
        (lambda lib: lib.SO((4, 4), lower=False), nn.Linear(4, 4)),
        (lambda lib: lib.SO((3, 3), triv="cayley"), nn.Linear(3, 3)),
        (lambda lib: lib.LowRank((4, 5), 2), nn.Linear(5, 4)),
        (lambda lib: lib.PSSDFixedRank((4, 4), 2), nn.Linear(4, 4)),
        (lambda lib: lib.Sphere((3, 4), radius=3.0), nn.Linear(4, 3)),
    ]
    for make_cls, layer in pairs:
        mg, mf = layer, nn.Linear(layer.in_features, layer.out_features)
        Mg, Mf = make_cls(geotorch), make_cls(gnn)
        for m, M in ((mg, Mg), (mf, Mf)):  # as GeoTorch's one-liners: a point first, then registration
            with torch.no_grad():
                m.weight.copy_(M.sample())
            P.register_parametrization(m, "weight", M)
        with torch.no_grad():
            mg.parametrizations.weight.original.add_(0.1 * torch.randn_like(mg.parametrizations.weight.original))
        mf.load_state_dict(_reload(mg.state_dict()))
        with torch.no_grad():
            torch.testing.assert_close(mf.weight, mg.weight, atol=_atol(mg.weight), rtol=0)
            assert member(Mf.space, mf.weight)
    # assign=True would replace the raw Parameter the class re-writes: refused, not a wrong point
    with pytest.raises(gf.ManifoldError, match="assign=True"):
        mf.load_state_dict(_reload(mg.state_dict()), assign=True)
    # GeoTorch's Hurwitz class has three raw tensors, geofunc's one: registered directly, torch's key error
    hg, hf = nn.Linear(3, 3), nn.Linear(3, 3)
    for m, M in ((hg, geotorch.Hurwitz((3, 3))), (hf, gnn.Hurwitz((3, 3)))):
        with torch.no_grad():
            m.weight.copy_(M.sample())
        P.register_parametrization(m, "weight", M)
    with pytest.raises(RuntimeError, match="original0"):
        hf.load_state_dict(hg.state_dict())


@pytest.mark.parametrize("shape", [(6, 3), (3, 5)])
def test_a_checkpoint_of_torchs_own_orthogonal_into_the_class_api_is_refused(shape):
    """A non-square checkpoint of torch.nn.utils.parametrizations.orthogonal (GeoTorch's layout, its
    default "householder" map another one) into a Stiefel class registered directly: refused with the
    ManifoldError the one-liners give (Note [Checkpoints of torch's own orthogonal]), not a bare
    StopIteration (the class is handed its raw tensor without the key)."""
    from torch.nn.utils import parametrizations as TP

    torch.manual_seed(0)
    mt = nn.Linear(shape[1], shape[0])
    TP.orthogonal(mt)
    c = nn.Linear(shape[1], shape[0])
    M = gnn.Stiefel(tuple(c.weight.shape))
    with torch.no_grad():
        c.weight.copy_(M.sample())
    P.register_parametrization(c, "weight", M)
    with pytest.raises(gf.ManifoldError, match=r"torch\.nn\.utils\.parametrizations\.orthogonal.*householder"):
        c.load_state_dict(_reload(mt.state_dict()))


def test_geotorch_readme_model_loads():
    """GeoTorch's README model (orthogonal Linear, rank-1 Conv2d kernels): same outputs after loading."""

    def model(lib):
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(64, 128)
                lib.orthogonal(self.linear, "weight")
                self.cnn = nn.Conv2d(16, 32, 3)
                lib.low_rank(self.cnn, "weight", rank=1)

            def forward(self, x, img):
                return self.linear(x), self.cnn(img)

        return Model()

    torch.manual_seed(0)
    mg = model(geotorch)
    x, img = torch.randn(4, 64), torch.randn(2, 16, 8, 8)
    opt = torch.optim.Adam(mg.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        sum(t.square().mean() for t in mg(x, img)).backward()
        opt.step()
    mf = model(gnn)
    mf.load_state_dict(_reload(mg.state_dict()))
    with torch.no_grad():
        for a, b in zip(mf(x, img), mg(x, img)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert member(gf.Stiefel(), mf.linear.weight) and member(gf.LowRank(rank=1), mf.cnn.weight)


def test_a_geofunc_checkpoint_is_not_taken_for_geotorchs():
    """Same keys and shapes as GeoTorch's (a Sphere of radius 2): a geofunc checkpoint loads bit for bit."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    gnn.sphere(a, radius=2.0)
    gnn.sphere(b, radius=2.0)
    with torch.no_grad():
        a.parametrizations.weight.original.add_(0.3)
    sd = _reload(a.state_dict())
    b.load_state_dict(sd)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_a_point_geofunc_cannot_represent_is_refused_naming_the_entries():
    """GeoTorch's fixed rank reaches σ = 1e-6 (its softplus epsilon); geofunc's float32 chart stops at
    √ε = 3.5e-4: a clear ManifoldError naming the checkpoint's entries, and the module is left as it was."""
    torch.manual_seed(0)
    mg, mf = nn.Linear(4, 5), nn.Linear(4, 5)
    geotorch.fixed_rank(mg, "weight", rank=2)
    gnn.fixed_rank(mf, "weight", rank=2)
    with torch.no_grad():
        original = mg.parametrizations.weight.original
        original.diagonal()[1] = -30.0  # softplus(-30) + 1e-6 ≈ 1e-6
        assert float(torch.linalg.svdvals(mg.weight)[1]) < 1e-5
    before = {k: v.clone() for k, v in mf.state_dict().items()}
    with pytest.raises(gf.ManifoldError, match=r"parametrizations\.weight\.original.*floor"):
        mf.load_state_dict(mg.state_dict())
    assert all(torch.equal(mf.state_dict()[k], v) for k, v in before.items())


def test_assign_and_strict_false_load_geotorchs_points_too():
    torch.manual_seed(0)
    mg = _trained(geotorch, "low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(5, 4),
                  torch.float32, seed=0)
    for kwargs in ({"assign": True}, {"strict": False}):
        mf = _trained(gnn, "low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(5, 4),
                      torch.float32, seed=1, steps=0)
        result = mf.load_state_dict(_reload(mg.state_dict()), **kwargs)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(mf.weight, mg.weight, atol=_atol(mg.weight), rtol=0)


def test_hurwitz_keeps_the_saved_alpha_and_refuses_a_point_outside_its_own():
    """GeoTorch's point is computed with the saved ``alpha``; loaded into a module whose bound is
    stricter than the point's eigenvalues, it is refused (not moved)."""
    mg = _trained(geotorch, "alpha_stable", {"alpha": 0.1}, lambda: nn.Linear(3, 3), torch.float64, seed=0)
    mf = _trained(gnn, "alpha_stable", {"alpha": 0.1}, lambda: nn.Linear(3, 3), torch.float64, seed=1, steps=0)
    mf.load_state_dict(mg.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mf.weight, mg.weight, atol=1e-11, rtol=0)
        top = float(torch.linalg.eigvals(mg.weight).real.max())
    strict = _trained(gnn, "alpha_stable", {"alpha": -top + 1.0}, lambda: nn.Linear(3, 3), torch.float64, seed=1,
                      steps=0)
    with pytest.raises(gf.ManifoldError, match="GeoTorch"):
        strict.load_state_dict(mg.state_dict())
    assert math.isfinite(top)


# (constraint function, kwargs, the point's singular values (eigenvalues), eigen family?)
BELOW_THE_FLOAT32_FLOOR = [
    ("invertible", {}, (1e-4, 0.5, 1.0, 2.0), False),
    ("positive_definite", {}, (1e-4, 0.5, 1.0, 2.0), True),
    ("fixed_rank", {"tensor_name": "weight", "rank": 2}, (1e-4, 0.7), False),
    ("positive_semidefinite_fixed_rank", {"tensor_name": "weight", "rank": 2}, (1e-4, 0.7), True),
]


def _point(values: tuple, eig: bool, det_sign: float = 1.0) -> torch.Tensor:
    """A 4×4 float32 point with the given nonzero singular values (eigenvalues), the rest 0."""
    g = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    R = Q if eig else torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    d = torch.zeros(4, dtype=torch.float64)
    d[: len(values)] = torch.tensor(values, dtype=torch.float64)
    X = Q @ torch.diag(d) @ R.T
    if not eig and torch.linalg.det(X).sign() != det_sign and len(values) == 4:
        X[:, 0] *= -1
    return X.float()


@pytest.mark.parametrize("case", BELOW_THE_FLOAT32_FLOOR, ids=lambda c: c[0])
def test_a_float32_point_below_geofuncs_float32_floor_loads_into_a_float64_model(case):
    """The documented way out for a GeoTorch point below geofunc's float32 floor 3.45e-4 (GeoTorch's is
    1e-6): load it into a float64 model. The entries were converted in the checkpoint's float32 and
    refused against its floor all the same; they are converted in the model's dtype now (Note
    [GeoTorch checkpoints]). A float32 model still refuses it, naming the entries."""
    name, kwargs, values, eig = case
    mg = nn.Linear(4, 4)
    getattr(geotorch, name)(mg, **kwargs)
    mg.weight = _point(values, eig)  # GeoTorch's in_manifold takes it (its bound is 1e-5)
    sd = _reload(mg.state_dict())
    mf = _trained(gnn, name, kwargs, lambda: nn.Linear(4, 4), torch.float64, seed=1, steps=0)
    mf.load_state_dict(sd)
    with torch.no_grad():
        W = mf.weight
        assert W.dtype == torch.float64
        torch.testing.assert_close(W, mg.weight.double(), atol=_atol(mg.weight), rtol=0)
        v = torch.linalg.eigvalsh(W).flip(-1) if eig else torch.linalg.svdvals(W)
        assert abs(float(v[len(values) - 1]) - 1e-4) < 1e-6  # kept, not lifted to 3.45e-4
        assert member(gnn.parametrization_of(mf).space, W)
    m32 = _trained(gnn, name, kwargs, lambda: nn.Linear(4, 4), torch.float32, seed=1, steps=0)
    with pytest.raises(gf.ManifoldError, match=r"parametrizations\.weight\.original.*below 0\.000345"):
        m32.load_state_dict(sd)


def test_a_geotorch_invertible_checkpoint_with_a_negative_determinant():
    """GeoTorch's GLp is both components of GL(n) (about half of its ``invertible`` starts have det < 0,
    and training keeps the sign); geofunc's GLp is det > 0. Such a checkpoint is refused with a message
    that says so and names the model that loads it: ``fixed_rank(module, tensor_name, rank=n)``, GeoTorch's
    GLp map with the same entries; the class API alike."""
    mg = nn.Linear(4, 4)
    geotorch.invertible(mg)
    mg.weight = _point((0.3, 0.5, 1.0, 2.0), False, det_sign=-1.0)
    assert float(torch.linalg.det(mg.weight.detach())) < 0
    sd = _reload(mg.state_dict())
    mf = gnn.invertible(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in mf.state_dict().items()}
    pattern = (r"parametrizations\.weight\.original: expected a point of GLp \(det > 0\), got a point with det < 0"
               r".*geofunc\.nn\.fixed_rank\(module, tensor_name, rank=4\)")
    with pytest.raises(gf.ManifoldError, match=pattern):
        mf.load_state_dict(sd)
    assert all(torch.equal(mf.state_dict()[k], v) for k, v in before.items())
    mr = gnn.fixed_rank(nn.Linear(4, 4), "weight", rank=4)
    mr.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(mr.weight, mg.weight, atol=_atol(mg.weight), rtol=0)
    # the class API registered directly
    m = nn.Linear(4, 4)
    M = gnn.GLp((4, 4))
    with torch.no_grad():
        m.weight.copy_(M.sample())
    P.register_parametrization(m, "weight", M)
    with pytest.raises(gf.ManifoldError, match=r"det < 0.*FixedRank\(size, rank=4\)"):
        m.load_state_dict(sd)


def test_a_geotorch_sln_checkpoint_with_another_f_has_left_sl_and_is_refused():
    """GeoTorch 0.4.0's ``sln`` divides out the determinant only for ``f="softplus"``: with another
    ``f`` its weight leaves det = 1 as it trains (docs/guide/migration.md), and geofunc's ``SL`` (which
    normalizes for every ``f``) refuses that checkpoint, measuring ``|log det X|``, the module left as
    it was; a ``"softplus"`` one loads (the CASES above)."""
    f = (torch.exp, torch.log)
    mg = _trained(geotorch, "sln", {"f": f}, lambda: nn.Linear(3, 3), torch.float64, seed=0)
    assert abs(float(torch.linalg.det(mg.weight.detach())) - 1.0) > 1e-2
    mf = _trained(gnn, "sln", {"f": f}, lambda: nn.Linear(3, 3), torch.float64, seed=1, steps=0)
    before = {k: v.clone() for k, v in mf.state_dict().items()}
    with pytest.raises(gf.ManifoldError, match=r"SL\(f=.*\|log det X\|"):
        mf.load_state_dict(_reload(mg.state_dict()))
    assert all(torch.equal(mf.state_dict()[k], v) for k, v in before.items())
