"""geofunc.nn: GeoTorch's one-liners on nn.Modules, save/load, caching, compile, functional bridge."""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.utils.parametrize as P
from reference import member
from torch import nn
from torch.func import functional_call, vmap

import geofunc as gf
import geofunc.nn as gnn
from helpers import collect_all_garbage

to_manifold = gf.to_manifold




# ----------------------------------------------------------------------------- signatures

# GeoTorch 0.4.0: name -> (parameters, defaults) (GEOTORCH.md section 11).
GEOTORCH_SIGNATURES = {
    "symmetric": "(module, tensor_name='weight', lower=True)",
    "skew": "(module, tensor_name='weight', lower=True)",
    "sphere": "(module, tensor_name='weight', radius=1.0, embedded=False)",
    "orthogonal": "(module, tensor_name='weight', triv='expm')",
    "almost_orthogonal": "(module, tensor_name='weight', lam=0.1, f='sin', triv='expm')",
    "grassmannian": "(module, tensor_name='weight', triv='expm')",
    "low_rank": "(module, tensor_name, rank, triv='expm')",
    "fixed_rank": "(module, tensor_name, rank, f='softplus', triv='expm')",
    "invertible": "(module, tensor_name='weight', f='softplus', triv='expm')",
    "positive_definite": "(module, tensor_name='weight', f='softplus', triv='expm')",
    "positive_semidefinite": "(module, tensor_name='weight', triv='expm')",
    "positive_semidefinite_low_rank": "(module, tensor_name, rank, triv='expm')",
    "positive_semidefinite_fixed_rank": "(module, tensor_name, rank, f='softplus', triv='expm')",
    "sln": "(module, tensor_name='weight', f='softplus', triv='expm')",
    "alpha_stable": "(module, tensor_name='weight', alpha=0.001)",
}


def _sig(fn) -> str:
    params = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]
    return str(inspect.Signature(params))


@pytest.mark.parametrize("name", sorted(GEOTORCH_SIGNATURES))
def test_signatures_are_geotorchs(name):
    assert _sig(getattr(gnn, name)) == GEOTORCH_SIGNATURES[name]


# ----------------------------------------------------------------------------- every constraint

# (function, kwargs, module factory, space)
CASES = [
    ("orthogonal", {}, lambda: nn.Linear(5, 3), gf.Stiefel),
    ("orthogonal", {"triv": "cayley"}, lambda: nn.Linear(3, 5), gf.Stiefel),
    ("orthogonal", {}, lambda: nn.Linear(4, 4), gf.Stiefel),
    ("grassmannian", {}, lambda: nn.Linear(2, 5), gf.Grassmannian),
    ("sphere", {"radius": 2.0}, lambda: nn.Linear(4, 3), gf.Sphere),
    ("sphere", {"embedded": True}, lambda: nn.Linear(4, 3), gnn.SphereEmbeddedSpace),
    ("skew", {}, lambda: nn.Linear(4, 4), gf.Skew),
    ("symmetric", {"lower": False}, lambda: nn.Linear(4, 4), gf.Sym),
    ("almost_orthogonal", {"lam": 0.3}, lambda: nn.Linear(4, 4), gf.AlmostOrthogonal),
    ("low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(5, 4), gf.LowRank),
    ("fixed_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(4, 5), gf.FixedRank),
    ("invertible", {}, lambda: nn.Linear(4, 4), gf.GLp),
    ("positive_definite", {}, lambda: nn.Linear(4, 4), gf.PSD),
    ("positive_semidefinite", {}, lambda: nn.Linear(4, 4), gf.PSSD),
    ("positive_semidefinite_low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(4, 4),
     gf.PSSDLowRank),
    ("positive_semidefinite_fixed_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(4, 4),
     gf.PSSDFixedRank),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_constraint_registers_samples_and_steps(case, dtype):
    name, kwargs, make, cls = case
    torch.manual_seed(0)
    m = make().to(dtype)
    W0 = m.weight.detach().clone()
    out = getattr(gnn, name)(m, **kwargs)
    assert out is m and P.is_parametrized(m, "weight") and gnn.is_constrained(m, "weight")
    space = gnn.parametrization_of(m).space
    assert isinstance(space, cls)
    W = m.weight
    assert W.dtype == dtype and W.shape == W0.shape
    assert member(space, W)
    if name == "symmetric":  # the layer's own values, symmetrized as GeoTorch does (upper triangle mirrored)
        assert torch.equal(W, torch.triu(W0) + torch.triu(W0, 1).mT)
    # a few Adam steps keep the constraint
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.randn(8, m.in_features, dtype=dtype)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(m.weight, W)
    assert member(space, m.weight.detach())


# ----------------------------------------------------------------------------- README program


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 128)
        self.cnn = nn.Conv2d(16, 32, 3)
        # Make the linear layer into an orthogonal layer
        geotorch.orthogonal(self.linear, "weight")
        # Also works on tensors. Makes every kernel of the CNN have rank 1
        geotorch.low_rank(self.cnn, "weight", rank=1)
        # Assign to the linear layer a specific orthogonal matrix
        self.linear.weight = torch.eye(128, 64)

    def forward(self, x, img):
        return self.linear(x).sum() + self.cnn(img).sum()


geotorch = gnn  # the README's `import geofunc.nn as geotorch`


def test_readme_drop_in_program():
    torch.manual_seed(0)
    model = Model()
    assert torch.equal(model.linear.weight, torch.eye(128, 64))  # exactly the assigned matrix
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, img = torch.randn(4, 64), torch.randn(2, 16, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x, img).backward()
        opt.step()
    W = model.linear.weight
    assert not torch.equal(W, torch.eye(128, 64))
    torch.testing.assert_close(W.T @ W, torch.eye(64), atol=1e-5, rtol=0)
    K = model.cnn.weight.detach()
    assert K.shape == (32, 16, 3, 3)
    s = torch.linalg.svdvals(K)  # every 3x3 kernel has rank <= 1
    assert (s[..., 1:] <= 1e-5 * s[..., :1]).all()
    # and re-initializing still works after training
    model.linear.weight = torch.eye(128, 64)
    assert torch.equal(model.linear.weight, torch.eye(128, 64))


# ----------------------------------------------------------------------------- assignment


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_assignment_goes_through_from_manifold_and_rejects_without_change():
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(3, 5))
    Q = torch.linalg.qr(torch.randn(5, 3))[0]
    m.weight = Q
    assert torch.equal(m.weight, Q)
    assert torch.equal(m.parametrizations.weight.original, torch.zeros(5, 3))
    before = _snapshot(m)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*Stiefel.*expected a point on the space"):
        m.weight = 2 * Q
    assert _same(before, _snapshot(m))
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*Stiefel.*expected a tensor of shape \(5, 3\), got shape \(3, 5\)"):
        m.weight = Q.T
    assert _same(before, _snapshot(m))
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*expected dtype torch.float32.*got dtype torch.float64"):
        m.weight = Q.double()
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight"):
        m.weight = torch.full((5, 3), float("nan"))
    assert _same(before, _snapshot(m))
    # the stored raw tensor never aliases the assigned one (SphereEmbedded's raw tensor is X / r)
    s = gnn.sphere(nn.Linear(3, 2), embedded=True)
    U = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    s.weight = U
    U.mul_(0)
    assert not torch.equal(s.parametrizations.weight.original, torch.zeros(2, 3))


def test_square_orthogonal_is_the_whole_orthogonal_group():
    m = gnn.orthogonal(nn.Linear(3, 3))
    R = torch.diag(torch.tensor([1.0, 1.0, -1.0]))  # det -1: in O(3), not SO(3)
    m.weight = R
    assert torch.equal(m.weight, R)


def test_update_base_keeps_the_value_outside_any_cache():
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 6))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    plist = m.parametrizations.weight
    assert plist.original.abs().max() > 0  # the chart has moved away from its centre
    raw_id = id(plist.original)
    W = m.weight.detach().clone()
    gnn.update_base(m, "weight")
    assert id(plist.original) == raw_id  # optimizers keep tracking the same Parameter
    assert torch.equal(plist.original, torch.zeros(6, 4))
    assert torch.equal(plist[0].base, W)
    assert torch.equal(m.weight, W)  # the same value, exactly, and not read from a cache


@pytest.mark.parametrize("copied", [False, True], ids=["module", "deepcopy"])
@pytest.mark.parametrize("name", ["orthogonal", "invertible", "sphere"])
def test_class_update_base_after_a_functional_call_with_another_modules_parameters(name, copied):
    """GeoTorch's ``M.update_base()`` (no argument: the copying-problem idiom) re-centred at the raw
    tensor forward last saw. After ``functional_call(model, dict(ema.named_parameters()), x)`` that
    was the other module's Parameter: the method rebased the EMA's raw tensor in place and wrote the
    EMA's point into the model's base, moving both weights silently (0.50 and 0.65 off). A class that
    a constraint function registered knows its own raw tensor and re-centres at it."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = getattr(gnn, name)(nn.Linear(4, 4))
    if copied:
        model = copy.deepcopy(model)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.parametrizations.weight.original.add_(0.3 * torch.randn(4, 4))
    W, W_ema = model.weight.detach().clone(), ema.weight.detach().clone()
    x = torch.randn(2, 4)
    functional_call(model, {**dict(ema.named_parameters()), **dict(ema.named_buffers())}, (x,))
    model.parametrizations.weight[0].update_base()
    torch.testing.assert_close(model.weight.detach(), W, atol=1e-6, rtol=0)
    torch.testing.assert_close(ema.weight.detach(), W_ema, atol=0, rtol=0)
    if name != "invertible":  # (a factorized space keeps its value coordinates)
        assert float(model.parametrizations.weight.original.detach().abs().max()) == 0.0  # re-centred: raw is 0


@pytest.mark.parametrize(
    "constrain_,atol",
    [
        (lambda m: gnn.sphere(m, radius=3.0), 1e-6),
        (lambda m: gnn.symmetric(m), 0.0),  # GeoTorch cannot: its Symmetric has no right inverse
        (lambda m: gnn.low_rank(m, "weight", rank=2), 1e-5),
        (lambda m: gnn.positive_definite(m), 1e-5),
    ],
    ids=["sphere", "symmetric", "low_rank", "positive_definite"],
)
def test_update_base_other_spaces(constrain_, atol):
    torch.manual_seed(0)
    m = constrain_(nn.Linear(4, 4))
    with torch.no_grad():
        m.parametrizations.weight.original.add_(0.1 * torch.randn(4, 4))
    W = m.weight.detach().clone()
    space = gnn.parametrization_of(m).space
    gnn.update_base(m)
    torch.testing.assert_close(m.weight, W, atol=atol, rtol=0)
    assert member(space, m.weight.detach())


def test_update_base_drops_a_stale_cache_entry():
    m = gnn.sphere(nn.Linear(5, 3))
    with torch.no_grad():
        m.parametrizations.weight.original.add_(0.3)
    with gnn.cached():
        W = m.weight.detach().clone()
        gnn.update_base(m)
        torch.testing.assert_close(m.weight, W, atol=1e-6, rtol=0)
        assert m.parametrizations.weight.original.abs().max() < 1e-6


def test_update_base_riemannian_step_matches_geotorch():
    """One SGD step + update_base, geofunc vs GeoTorch 0.4.0 (both: expm(-η(GYᵀ - YGᵀ))Y)."""
    geotorch_ = pytest.importorskip("geotorch")
    torch.manual_seed(0)
    Y = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0]
    x = torch.randn(5, 3, dtype=torch.float64)
    outs = []
    for lib in (geotorch_, gnn):
        m = nn.Linear(3, 6, bias=False).double()
        lib.orthogonal(m, "weight")
        m.weight = Y
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        m(x).sin().sum().backward()
        opt.step()
        lib.update_base(m, "weight")
        outs.append(m.weight.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- bases from outside
def _trained(case, seed):
    name, kwargs, make, _ = case
    torch.manual_seed(seed)
    m = getattr(gnn, name)(make(), **kwargs)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(8, m.in_features)
    for k in range(6):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
        if k % 2 == 1:
            gnn.update_base(m)
    return m


def _base_off(space, base) -> bool:
    """Independent of geofunc's check: a frame with max|BᵀB − I| > 1e-4 or a point off the space."""
    if base is None:
        return False
    leaves = [b for b in torch.utils._pytree.tree_leaves(base) if isinstance(b, torch.Tensor)]
    if getattr(space, "_base_kind", None) == "frames":
        def off(B):
            G = B.mT @ B if B.shape[-2] >= B.shape[-1] else B @ B.mT
            return float((G - torch.eye(G.shape[-1])).abs().max()) > 1e-4
        return any(off(B) for B in leaves if B.ndim >= 2)
    return not member(space, base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_an_average_of_state_dicts_with_bases_off_the_space_is_refused(case):
    """A "model soup" averages every tensor of two state_dicts, the bases too (as does
    ``AveragedModel(use_buffers=True)``): where the averaged base is off the space, forward raises
    ``ManifoldError`` naming the module instead of returning a weight off the space (Note [Bases
    checked where they change]); where it is on the space (or there is no base), the weight is."""
    a, b = _trained(case, 0), _trained(case, 1)
    sa, sb = a.state_dict(), b.state_dict()
    soup = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    m = _trained(case, 2)
    m.load_state_dict(soup)
    P_ = gnn.parametrization_of(m)
    if _base_off(P_.space, P_.get_base()):
        with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .*base .*average of bases"):
            m.weight
        with pytest.raises(gf.ManifoldError):
            m(torch.randn(2, m.in_features))
        # assigning a point re-centres the chart: a valid base again
        m.weight = a.weight.detach()
    assert member(P_.space, m.weight)


def test_an_ema_of_buffers_is_refused_and_one_of_parameters_is_not():
    """``AveragedModel(use_buffers=True)`` of an orthogonal layer that is rebased during training
    averages its base frames: its weight was 0.38 off Stiefel (silently); now forward raises. With
    ``use_buffers=False`` the base is the copy's own and the weight stays on Stiefel."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(8, 16))
    T = torch.randn(16, 8)
    emas = {ub: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=ub) for ub in (False, True)}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(20):
        opt.zero_grad()
        (m.weight - T).square().sum().backward()
        opt.step()
        if step % 5 == 4:
            gnn.update_base(m)
        for ema in emas.values():
            ema.update_parameters(m)
    assert member(gf.Stiefel(), emas[False].module.weight)
    with pytest.raises(gf.ManifoldError, match="AveragedModel"):
        emas[True].module.weight


def test_a_value_computed_under_fake_tensor_mode_is_not_cached():
    """Inside ``gf.nn.cached()``, a forward under ``FakeTensorMode(allow_non_fake_inputs=True)`` with the
    real parameters cached a FakeTensor weight that the next real forward read: a fake loss, and a
    FakeTensor in the raw Parameter's ``.grad`` (Note [Cached values under FakeTensorMode])."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4, dtype=torch.float64))
    ref = copy.deepcopy(m)
    x = torch.randn(2, 4, dtype=torch.float64)
    ref(x).pow(2).sum().backward()
    with gnn.cached():
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert isinstance(m(x), FakeTensor)
        loss = m(x).pow(2).sum()
        assert type(loss) is torch.Tensor
        loss.backward()
        W = m.weight
    raw = m.parametrizations.weight.original
    assert type(W) is torch.Tensor and not isinstance(raw.grad, FakeTensor)
    torch.testing.assert_close(raw.grad, ref.parametrizations.weight.original.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES + [("orthogonal", {}, lambda: nn.Linear(4, 16), gf.Stiefel),
                                           ("grassmannian", {}, lambda: nn.Linear(16, 4), gf.Grassmannian),
                                           ("low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(12, 16), gf.LowRank),
                                           ("fixed_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Linear(16, 12), gf.FixedRank)],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]().weight.shape[0]}x{c[2]().weight.shape[1]}")
def test_a_real_module_runs_under_fake_tensor_mode(case):
    """A real module run under ``FakeTensorMode(allow_non_fake_inputs=True)`` (FLOP and memory
    estimates of an existing model): its parameters and bases are plain tensors, which the eager
    fast paths took for readable ones; orthogonal/grassmannian frames at least twice as tall as wide
    and every low_rank/fixed_rank forward raised DataDependentOutputException from a value read
    (Note [Fast paths under FakeTensorMode] in geofunc/_fastpath.py). Forward and backward give fake
    tensors of the real shapes; the real parameters, gradients and buffers are untouched."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    x = torch.randn(3, m.in_features)
    y_real = m(x)
    y_real.sum().backward()
    before = {k: t.clone() for k, t in m.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    for no_grad in (False, True):
        with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(not no_grad):
            y = m(x)
            assert isinstance(y, FakeTensor) and y.shape == y_real.shape and y.dtype == y_real.dtype
            if not no_grad:
                y.sum().backward()
    for k, t in m.state_dict().items():
        assert type(t) is torch.Tensor and torch.equal(t, before[k]), k
    for k, p in m.named_parameters():
        assert type(p.grad) is torch.Tensor and torch.equal(p.grad, grads[k]), k
    assert type(m(x)) is torch.Tensor


def test_a_base_is_checked_once_per_change(monkeypatch):
    """The check reads the buffers only when they changed (other tensors, or an in-place write):
    repeated forwards cost one comparison; an in-place edit of a base is caught at the next read;
    a base geofunc wrote itself (``update_base``, an assignment) is not read again (on a GPU each
    read is a device-to-host copy)."""
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 6))
    calls = []
    original = gf.Stiefel._invalid_base
    monkeypatch.setattr(gf.Stiefel, "_invalid_base", lambda self, base: calls.append(1) or original(self, base))
    x = torch.randn(3, 4)
    for _ in range(5):
        m(x)
    assert len(calls) <= 1
    calls.clear()
    with torch.no_grad():
        m.parametrizations.weight[0].base.mul_(1.01)
    with pytest.raises(gf.ManifoldError, match="not orthonormal"):
        m(x)
    assert len(calls) == 1
    with torch.no_grad():
        m.parametrizations.weight[0].base.div_(1.01)
    m(x)  # valid again (to rounding): no error
    # bases that geofunc itself writes (update_base, an assignment) are not checked again
    calls.clear()
    gnn.update_base(m)
    m(x)
    m.weight = gf.Stiefel().sample((6, 4))
    m(x)
    assert calls == []
    # a base valid in float32, loaded into a float64 module, is re-made valid there (not refused)
    d = gnn.orthogonal(nn.Linear(4, 6)).double()
    d.load_state_dict(m.state_dict())
    torch.testing.assert_close(d.weight, m.weight.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["positive_definite", "alpha_stable", "grassmannian", "sln", "orthogonal"])
def test_a_first_forward_under_selective_checkpointing(name):
    """The first forward of a layer checks its base; under selective activation checkpointing its ops
    were taken for the model's, and the recomputation (no check) was handed other calls' outputs:
    a positive_definite layer's gradient was 100% off, alpha_stable's too, silently, and others raised
    (Note [The base check under a dispatch mode], Note [The base factor cache under a dispatch mode]).
    Float64: recomputation repeats the forward's values."""
    import copy
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):  # save all but the pointwise ops
        return CheckpointPolicy.PREFER_RECOMPUTE if torch.Tag.pointwise in op.tags else CheckpointPolicy.MUST_SAVE

    torch.manual_seed(0)
    layer = getattr(gnn, name)(nn.Linear(3 if name == "grassmannian" else 8, 8, dtype=torch.float64), "weight")
    x = torch.randn(5, layer.in_features, dtype=torch.float64, requires_grad=True)
    plain, sac = copy.deepcopy(layer), copy.deepcopy(layer)  # (a copy's base is checked at its first forward)
    plain(x).pow(2).sum().backward()
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    checkpoint(sac, x, use_reentrant=False, context_fn=context_fn).pow(2).sum().backward()
    for (n, p), q in zip(plain.named_parameters(), sac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=n)
    # the check still runs there: a base off the space is refused under the policy too
    bad = copy.deepcopy(layer)
    with torch.no_grad():
        for b in bad.parametrizations.weight[0].buffers():
            b.mul_(1.5)
    with pytest.raises(gf.ManifoldError):
        checkpoint(bad, x, use_reentrant=False, context_fn=context_fn)


@pytest.mark.parametrize("space", [gf.SO(), gf.SO(triv="cayley"), gf.GLp(), gf.SL()], ids=repr)
def test_a_base_of_the_wrong_determinant_sign_is_refused(space):
    """The chart's point has the sign of ``det(base)`` (SO) or ``det U_b det V_b`` (GLp, SL): an
    orthonormal base of the other sign (a square ``orthogonal`` layer's base, O(n), loaded by hand)
    passed the check, and the weight had det < 0, silently off the space (Note [The sign of a
    base]). Forward now raises; the base geofunc writes (``update_base``) is accepted."""
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    gnn.constrain(m, "weight", space)
    p = gnn.parametrization_of(m)
    x = torch.randn(3, 4)
    m(x)
    name = p._base_names()[0]
    R = torch.eye(4)
    R[0, 0] = -1.0
    with torch.no_grad():
        B = getattr(p, name)
        B.copy_(B @ R)  # still orthonormal, det × −1
    assert float(torch.linalg.det(space.to_manifold(m.parametrizations.weight.original.detach(), p.get_base()))) < 0  # off the space
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .*det.* = −1"):
        m(x)
    with torch.no_grad():
        B.copy_(B @ R)  # the sign restored: a valid base again
    gnn.update_base(m)
    assert member(space, m.weight, 1e-4)


def test_average_is_an_ema_of_points_for_a_model_that_is_rebased():
    """``average_(ema, [ema, model], [0.9, 0.1])`` after every step of a model rebased every 4 steps:
    the EMA's orthogonal weight is the polar factor of 0.9·W_ema + 0.1·W (computed here by torch's
    SVD), its low-rank weight the best rank-2 approximation (Eckart–Young, torch's SVD), BatchNorm's
    running mean the plain EMA, ``num_batches_tracked`` the model's; both weights stay on their spaces."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).double()
    gnn.orthogonal(model[0])
    gnn.low_rank(model[2], "weight", 2)
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X, Y = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    want = {i: ema[i].weight.detach().clone() for i in (0, 2)}
    mean = ema[1].running_mean.clone()
    for step in range(12):
        idx = torch.randint(0, 64, (16,))
        opt.zero_grad()
        (model(X[idx]) - Y[idx]).square().mean().backward()
        opt.step()
        if step % 4 == 3:
            gnn.update_base(model[0])
            gnn.update_base(model[2])
        gnn.average_(ema, [ema, model], [0.9, 0.1])
        U, S, Vh = torch.linalg.svd(0.9 * want[0] + 0.1 * model[0].weight.detach(), full_matrices=False)
        want[0] = U @ Vh
        U, S, Vh = torch.linalg.svd(0.9 * want[2] + 0.1 * model[2].weight.detach(), full_matrices=False)
        want[2] = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        mean = 0.9 * mean + 0.1 * model[1].running_mean
    for i in (0, 2):
        torch.testing.assert_close(ema[i].weight.detach(), want[i], atol=1e-10, rtol=0)
        assert member(gnn.parametrization_of(ema[i]).space, ema[i].weight)
    torch.testing.assert_close(ema[1].running_mean, mean, atol=1e-12, rtol=0)
    assert int(ema[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 12


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_average_of_models_is_on_the_space(case):
    """A soup of three trained models, one per constraint: every weight on its space, and the
    unconstrained bias the plain mean; a convex space (PSD's interior) gives the mean itself."""
    models = [_trained(case, s) for s in range(3)]
    soup = _trained(case, 3)
    gnn.average_(soup, models)
    space = gnn.parametrization_of(soup).space
    assert member(space, soup.weight)
    torch.testing.assert_close(soup.bias, sum(m.bias for m in models) / 3, atol=1e-6, rtol=1e-6)
    if case[0] == "positive_definite":
        torch.testing.assert_close(soup.weight, sum(m.weight for m in models) / 3, atol=1e-5, rtol=0)


def test_a_soup_of_sl_weights_whose_mean_has_det_below_zero_stays_at_their_scale():
    """The mean of SL points can have det < 0; SL.project took GLp's canonical point there (the least
    singular value set to −√ε·σ₁) and rescaled it to det 1 by |det|^(−1/n): a soup of two 4×4 ``sln``
    weights (‖W‖ ≈ 4) came out at norm 163 in float64 (×(1/√ε)^(1/n): 42× the mean's norm at the median
    of random inputs, 3.5× in float32, so the two dtypes disagreed). project now flips the least
    singular value's sign, keeping its size (the mean reflected in its least singular direction), then
    rescales: det 1, the input's scale, and float32 the float64 point rounded."""
    M = gf.SL()
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(64, 4, 4, generator=g, dtype=torch.float64)
    flip = torch.where(torch.linalg.det(Y) < 0, 1.0, -1.0).to(Y.dtype)
    Y = torch.cat([Y[:, :1] * flip[:, None, None], Y[:, 1:]], dim=1)  # det < 0 throughout (a row negated)
    U, s, Vh = torch.linalg.svd(Y)
    s = s * torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    ref = (U * s.unsqueeze(-2)) @ Vh / s.abs().prod(-1).pow(0.25)[:, None, None]
    P = M.project(Y)
    assert member(M, P)
    torch.testing.assert_close(P, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(M.project(Y.float()).double(), ref, atol=2e-4 * ref.abs().max().item(), rtol=0)
    torch.manual_seed(0)
    a, b = gnn.sln(nn.Linear(4, 4).double()), gnn.sln(nn.Linear(4, 4).double())
    with torch.no_grad():
        b.weight = a.weight @ torch.diag(torch.tensor([-3.0, -1 / 3, 1.0, 1.0], dtype=torch.float64))  # mean: det −1/3
    assert torch.linalg.det((a.weight + b.weight) / 2) < 0
    soup = gnn.average_(copy.deepcopy(a), [a, b])
    assert member(M, soup.weight)
    assert torch.linalg.matrix_norm(soup.weight) < 2 * torch.linalg.matrix_norm(a.weight)


def test_average_refuses_what_it_cannot_average():
    a, b = gnn.orthogonal(nn.Linear(4, 6)), gnn.orthogonal(nn.Linear(4, 6))
    with pytest.raises(gf.ManifoldError, match="at least one"):
        gnn.average_(a, [])
    with pytest.raises(gf.ManifoldError, match="summing to 1"):
        gnn.average_(a, [a, b], [0.5, 0.6])
    with pytest.raises(gf.ManifoldError, match="2 weights"):
        gnn.average_(a, [a, b], [1.0])
    with pytest.raises(gf.ManifoldError, match="constrained differently"):
        gnn.average_(a, [gnn.sphere(nn.Linear(4, 6))])
    with pytest.raises(gf.ManifoldError, match="lacks"):
        gnn.average_(a, [gnn.orthogonal(nn.Linear(4, 6, bias=False))])



def test_average_weights_as_a_tensor():
    """``average_`` reads its weights as floats from any sequence of numbers, a tensor too (softmax of
    validation scores for a model soup); its annotation said ``Sequence[float]``, which a tensor is not
    to mypy or pyright (geofunc ships py.typed): a false error. The same average, and the annotation."""
    import typing

    torch.manual_seed(0)
    a, b = gnn.orthogonal(nn.Linear(4, 6).double()), gnn.orthogonal(nn.Linear(4, 6).double())
    w = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    by_list = gnn.average_(copy.deepcopy(a), [a, b], w.tolist())
    by_tensor = gnn.average_(copy.deepcopy(a), [a, b], w)
    torch.testing.assert_close(by_tensor.weight, by_list.weight, atol=0, rtol=0)
    hint = typing.get_type_hints(gnn.average_)["weights"]
    assert typing.Iterable[typing.SupportsFloat] in typing.get_args(hint), hint


class _Double(nn.Module):
    def forward(self, X):
        return 2 * X


def test_module_helpers_refuse_bad_input_with_manifold_errors():
    """stack, average_, update_base and parametrization_of raised bare ValueErrors on bad input (no
    modules, modules of other parameters, a tensor geofunc does not constrain); each is a
    ManifoldError now (section 5: what was expected, what came), still a ValueError."""
    a = gnn.orthogonal(nn.Linear(4, 6))
    with pytest.raises(gf.ManifoldError, match="expected at least one module, got none"):
        gnn.stack([])
    with pytest.raises(gf.ManifoldError, match=r"expected module 1 to have module 0's parameters .*got"):
        gnn.stack([a, gnn.orthogonal(nn.Linear(4, 6, bias=False))])
    with pytest.raises(gf.ManifoldError, match=r"update_base: expected a tensor constrained by geofunc, got "
                                               r"Linear.weight, an unconstrained"):
        gnn.update_base(nn.Linear(3, 3), "weight")
    with pytest.raises(gf.ManifoldError, match=r"expected a tensor constrained by geofunc, got Linear.bias"):
        gnn.parametrization_of(a, "bias")
    plain = nn.Linear(3, 3)
    P.register_parametrization(plain, "weight", _Double())
    with pytest.raises(gf.ManifoldError, match=r"got Linear.weight, parametrized by \['_Double'\] only"):
        gnn.update_base(plain, "weight")


def test_module_helpers_refuse_what_is_not_a_module():
    """functional, plain, module_state, load_functional, stack and average_ given something other than a
    module (a list entry left over, None) raised torch's "'int' object has no attribute 'named_modules'",
    naming neither the helper nor what it takes: a ManifoldError naming both."""
    a = gnn.orthogonal(nn.Linear(4, 6))
    calls = {
        "functional": lambda: gnn.functional(3),
        "plain": lambda: gnn.plain(3),
        "module_state": lambda: gnn.module_state(3, {}, {}),
        "load_functional": lambda: gnn.load_functional(None, {}),
        "stack": lambda: gnn.stack([a, 3]),
        "average_": lambda: gnn.average_(a, [a, "b"]),
    }
    for name, call in calls.items():
        with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected (module|module 1) to be a torch\.nn\.Module, got "):
            call()
    with pytest.raises(gf.ManifoldError, match=r"^average_: expected target to be a torch\.nn\.Module, got 'x'"):
        gnn.average_("x", [a])


# ----------------------------------------------------------------------------- cached


class RNNCell(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.recurrent = nn.Linear(n, n, bias=False)
        self.inp = nn.Linear(n, n)
        gnn.orthogonal(self.recurrent)

    def forward(self, xs):
        h = torch.zeros(xs.shape[1], xs.shape[2])
        for x in xs:
            h = torch.tanh(self.recurrent(h) + self.inp(x))
        return h


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_activation_checkpointing_gives_the_same_gradients(case):
    """``torch.utils.checkpoint`` recomputes the forward, the chart included, in backward: the same
    gradients as without it (inside ``cached()`` too: the tests below)."""
    from torch.utils.checkpoint import checkpoint

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = make()
    getattr(gnn, name)(m, **kwargs)
    x = torch.randn(6, m.in_features)
    m(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    checkpoint(m, x, use_reentrant=False).pow(2).sum().backward()
    for a, b in zip(plain, (p.grad for p in m.parameters())):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("in_cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_reentrant_activation_checkpointing_gives_the_same_gradients(case, in_cached):
    """``checkpoint(..., use_reentrant=True)`` runs the forward under ``no_grad`` and recomputes it in
    backward: the same gradients as without it, also inside ``cached()`` (README: the value cached
    under ``no_grad`` is not reused with grad enabled)."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make().double(), **kwargs)
    x = torch.randn(6, m.in_features, dtype=torch.float64, requires_grad=True)
    m(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    with gnn.cached() if in_cached else contextlib.nullcontext():
        checkpoint(m, x, use_reentrant=True).pow(2).sum().backward()
    for a, b in zip(plain, [p.grad for p in m.parameters()] + [x.grad]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backward", ["in the block", "after the block"])
@pytest.mark.parametrize("read_before", [False, True], ids=["first-read-inside", "read-before"])
@pytest.mark.parametrize("case", CASES[:1] + CASES[8:10] + CASES[12:13], ids=lambda c: f"{c[0]}-{c[1]}")
def test_non_reentrant_checkpointing_inside_cached(case, read_before, backward):
    """``checkpoint(..., use_reentrant=False)`` inside ``cached()``: a weight first read inside the region was
    cached by the forward and read back by the recomputation, which then saved fewer tensors (torch's
    CheckpointError "A different number of tensors was saved"); a weight read before the region, with the
    backward after the block, was recomputed by the recomputation only ("different metadata"). Under the
    region's hooks a value is cached for those hooks alone (Note [Cached values in checkpointed regions]):
    the plain gradients."""
    from torch.utils.checkpoint import checkpoint

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make().double(), **kwargs)
    x = torch.randn(6, m.in_features, dtype=torch.float64)
    (m(x).pow(2).sum() + m(x.sin()).pow(3).sum()).backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with gnn.cached():
        if read_before:
            m.weight
        loss = checkpoint(lambda x: m(x).pow(2).sum() + m(x.sin()).pow(3).sum(), x, use_reentrant=False)
        if backward == "in the block":
            loss.backward()
    if backward == "after the block":
        loss.backward()
    for a, b in zip(plain, (p.grad for p in m.parameters())):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def _count_stiefel_charts(monkeypatch):
    """A list that grows by one at each ``Stiefel.to_manifold`` call (patched for the test)."""
    calls = []
    original = gf.Stiefel.to_manifold

    def counting(self, Z, base=None):
        calls.append(1)
        return original(self, Z, base)

    monkeypatch.setattr(gf.Stiefel, "to_manifold", counting)
    return calls


def test_a_checkpointed_region_inside_cached_neither_reads_nor_writes_the_cache(monkeypatch):
    """Inside ``cached()`` a checkpointed region (use_reentrant=False) evaluates a weight at each read, in its
    forward and in its recomputation, as without ``cached()``; the value the block cached outside the region
    stays cached for reads outside it."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cell = RNNCell()
    xs = torch.randn(5, 2, 8)
    cell(xs).sum().backward()
    plain = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    calls = _count_stiefel_charts(monkeypatch)
    with gnn.cached():
        cell.recurrent.weight
        assert len(calls) == 1
        out = checkpoint(cell, xs, use_reentrant=False)
        assert len(calls) == 1 + 5  # the region's forward: its 5 reads
        out.sum().backward()
        assert len(calls) == 1 + 5 + 5  # the recomputation: the same
        cell.recurrent.weight
        assert len(calls) == 1 + 5 + 5  # the block's value
    for a, b in zip(plain, (p.grad for p in cell.parameters())):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_reentrant_checkpointing_inside_cached_with_the_weight_used_outside_the_region_too():
    """``checkpoint(..., use_reentrant=True)`` replays its region inside backward, with grad: the replay read
    the weight the block had cached with grad outside the region, the checkpoint's inner backward freed its
    graph, and the outer backward through it raised "Trying to backward through the graph a second time".
    Inside a backward the chain is evaluated at each read (Note [Cached values in checkpointed regions])."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4).double())
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def loss():
        return m(x).pow(2).sum() + checkpoint(m, x.sin(), use_reentrant=True).pow(3).sum()

    loss().backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with gnn.cached():
        loss().backward()
    for a, b in zip(plain, (p.grad for p in m.parameters())):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def test_cached_values_are_not_handed_to_a_new_module_at_a_freed_modules_address():
    """Inside ``cached()`` a value is keyed by the module's ``id``, which Python gives to the next
    module once the first is freed (models built, evaluated and dropped in one cached loop: a
    hyperparameter sweep, deep copies of snapshots). The stamp held the freed module's own tensors,
    which had not changed, so the new module read the freed one's weight (63 of 200 modules, silently)."""
    import gc

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    reused = 0
    with gnn.cached():
        seen = set()
        for _ in range(100):
            m = gnn.orthogonal(nn.Linear(4, 4))
            reused += id(m) in seen
            seen.add(id(m))
            torch.testing.assert_close(m(x), nn.functional.linear(x, m.parametrizations.weight(), m.bias),
                                       atol=0, rtol=0)
            del m
            gc.collect(0)  # (the youngest generation frees it: 99 of 100 addresses reused; a full collection,
            # 29 of 100, took ~0.23 s each in a process that has imported torch)
    assert reused  # the addresses were reused, so the keys collided


def test_cached_values_follow_freezing_and_unfreezing():
    """Inside ``cached()``, ``requires_grad_`` on a raw tensor (progressive unfreezing, or freezing a
    constrained weight) changes no tensor, version or storage: the value cached while it was frozen
    was reused after ``requires_grad_(True)``, so the raw tensor got no gradient, silently; and the
    other way round a frozen raw tensor's weight still required grad."""
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    raw = m.parametrizations.weight.original
    raw.requires_grad_(False)
    with gnn.cached():
        assert not m.weight.requires_grad
        m(x)
        raw.requires_grad_(True)
        m(x).pow(2).sum().backward()
        assert raw.grad is not None and raw.grad.abs().sum() > 0
        raw.requires_grad_(False)
        assert not m.weight.requires_grad


def test_cached_computes_the_map_once_per_forward(monkeypatch):
    torch.manual_seed(0)
    cell = RNNCell()
    xs = torch.randn(50, 2, 8)
    calls = _count_stiefel_charts(monkeypatch)
    plain_out = cell(xs)
    assert len(calls) == 50
    calls.clear()
    with gnn.cached():
        cached_out = cell(xs)
    assert len(calls) == 1
    torch.testing.assert_close(cached_out, plain_out, atol=0, rtol=0)
    # gradients flow through the cached value
    with gnn.cached():
        cell(xs).sum().backward()
    assert cell.recurrent.parametrizations.weight.original.grad.abs().sum() > 0


def _cached_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5))
    gnn.orthogonal(net[0])
    gnn.low_rank(net[2], "weight", rank=2)
    gnn.positive_definite(net[4])
    return net


def test_cached_values_follow_new_raw_tensors():
    """Inside ``cached()`` a value is reused only while the tensors it was computed from are the same
    (Note [A cache that sees new raw tensors]; torch's own cache keys by module and name alone):
    ``functional_call`` with other parameters, an optimizer step, ``load_state_dict``, an assignment,
    a dtype change and a value first computed under ``no_grad`` all give what the uncached module
    gives, while repeated reads of unchanged tensors return the one cached value."""
    net, x = _cached_net(), torch.randn(3, 4)
    names = [n for n, _ in net.named_parameters() if n.endswith("original")]
    snapshots = []
    for k in range(3):
        state = {n: t.detach().clone() for n, t in net.state_dict(keep_vars=True).items()}
        for n in names:
            state[n] = state[n] + 0.1 * (k + 1) * torch.randn_like(state[n])
        snapshots.append(state)
    uncached = [torch.func.functional_call(net, s, (x,)) for s in snapshots]
    with gnn.cached():
        first = net[0].weight
        assert net[0].weight is first  # unchanged tensors: the cached value
        for s, want in zip(snapshots, uncached):  # an ensemble's snapshots evaluated in one cached loop
            torch.testing.assert_close(torch.func.functional_call(net, s, (x,)), want, atol=0, rtol=0)
        torch.testing.assert_close(net[0].weight, first, atol=0, rtol=0)  # the module's own again
        # no_grad first, then with grad: the weights' raw tensors get gradients
        with torch.no_grad():
            net(x)
        net(x).sum().backward()
        assert all(net.get_parameter(n).grad is not None and net.get_parameter(n).grad.abs().sum() > 0 for n in names)
        # an optimizer step (in place) moves the weights
        before = [m.weight for m in net[::2]]
        torch.optim.SGD(net.parameters(), lr=0.5).step()
        for m, w in zip(net[::2], before):
            assert not torch.equal(m.weight, w)
        # load_state_dict and an assignment
        net.load_state_dict(snapshots[0])
        torch.testing.assert_close(net(x), uncached[0], atol=0, rtol=0)
        net[0].weight = torch.eye(6, 4)
        torch.testing.assert_close(net[0].weight, torch.eye(6, 4), atol=1e-6, rtol=0)
        # a dtype change
        net.double()
        assert net[0].weight.dtype == net[2].weight.dtype == net[4].weight.dtype == torch.float64
    with torch.no_grad():
        plain = [m.weight for m in net[::2]]
    with gnn.cached():
        for m, w in zip(net[::2], plain):
            torch.testing.assert_close(m.weight, w, atol=0, rtol=0)


@pytest.mark.parametrize("edit", ["no_grad", "grad_read_no_grad_edit", "detached", "with_grad"])
def test_cached_values_edited_in_place_are_not_served_again(edit):
    """Inside ``cached()`` an in-place edit of the weight read (``with torch.no_grad():
    layer.weight.mul_(2)``) changed the cached value itself, and every later read in the block, forward
    included, was served the edited one, off the space (0.95 off for an SO(4) weight), silently. Now the
    next read computes the value anew, as outside a block, where the edit of a fresh value changes
    nothing (Note [Cached values edited in place])."""
    torch.manual_seed(0)
    layer = gnn.orthogonal(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    with torch.no_grad():
        want_w, want_y = layer.weight.clone(), layer(x)
    M = layer.parametrizations.weight[0]
    with gnn.cached():
        if edit == "no_grad":
            with torch.no_grad():
                layer.weight.mul_(2)
                torch.testing.assert_close(layer.weight, want_w, atol=0, rtol=0)  # an evaluation's reads
                torch.testing.assert_close(layer(x), want_y, atol=0, rtol=0)
        elif edit == "grad_read_no_grad_edit":
            W = layer.weight
            assert layer.weight is W  # unedited: the cached value
            with torch.no_grad():
                W.mul_(2)
        elif edit == "detached":
            layer.weight.detach().mul_(2)  # detach() shares the version counter
        else:
            layer.weight.mul_(2)  # with grad: an in-place op on the (non-leaf) value
        W = layer.weight
        torch.testing.assert_close(W, want_w, atol=0, rtol=0)
        assert bool(M.in_manifold(W))
        assert layer.weight is W  # and cached again
        y = layer(x)
        torch.testing.assert_close(y, want_y, atol=0, rtol=0)
        y.sum().backward()  # through the recomputed value: the plain gradient
    got = layer.parametrizations.weight.original.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(got, layer.parametrizations.weight.original.grad, atol=0, rtol=0)


def _assert_cached_read_follows(module, step):
    """Inside ``cached()``: the weight read under no_grad before ``step()`` (which moves it) is not what is
    served after it (Note [Fused optimizer steps in a cached block])."""
    with torch.no_grad():
        before = module.weight.clone()
    step()
    with torch.no_grad():
        read = module.weight
        want = module.parametrizations.weight()
    assert not torch.allclose(want, before, atol=1e-3)  # the step moved the weight
    torch.testing.assert_close(read, want, atol=0, rtol=0)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
], ids=["Adam-fused", "AdamW-fused", "SGD-fused", "Adam-loop"])
def test_cached_values_follow_a_fused_optimizer_step(make):
    """torch's fused steps do not bump the parameters' version counters: a value cached under no_grad
    (an evaluation) before a fused step inside ``cached()`` was served after it, the old weight
    (Note [Fused optimizer steps in a cached block])."""
    torch.manual_seed(0)
    layer = gnn.orthogonal(nn.Linear(4, 4), "weight")
    opt = make(layer.parameters())
    x = torch.randn(8, 4)
    with gnn.cached():
        _assert_cached_read_follows(layer, lambda: (layer(x).pow(2).sum().backward(), opt.step()))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_cached_values_follow_a_compiled_fused_optimizer_step(backend):
    """A fused step compiled with torch.compile runs the step post-hook inside the trace, where a version
    bump is no op of the graph: the value cached under no_grad before the step was served after it (0.17
    off), silently (Note [Fused optimizer steps in a cached block])."""
    torch.manual_seed(0)
    layer = gnn.orthogonal(nn.Linear(4, 4), "weight")
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 4)
    torch._dynamo.reset()
    try:
        step = torch.compile(opt.step, backend=backend)
        with gnn.cached():
            _assert_cached_read_follows(layer, lambda: (layer(x).pow(2).sum().backward(), step()))
    finally:
        torch._dynamo.reset()


def test_cached_values_follow_a_fused_step_of_a_parameter_subclass():
    """A raw tensor that is a Parameter subclass (a library's own parameter class) is bumped too: the
    hook skipped it, and the value cached under no_grad before a fused step was served after it (0.16
    off), silently (Note [Fused optimizer steps in a cached block])."""

    class OwnParameter(nn.Parameter):
        pass

    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    layer.weight = OwnParameter(layer.weight.detach().clone())
    gnn.orthogonal(layer, "weight")
    assert type(layer.parametrizations.weight.original) is OwnParameter
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 4)
    with gnn.cached():
        _assert_cached_read_follows(layer, lambda: (layer(x).pow(2).sum().backward(), opt.step()))


def test_cached_under_vmap_and_grad_of_functional_call():
    """Stacked snapshots under ``vmap`` and ``torch.func.grad`` through ``functional_call`` inside
    ``cached()`` equal the uncached results (the transforms' wrapped tensors are new tensors)."""
    net, x = _cached_net(), torch.randn(3, 4)
    params = {n: t.detach() for n, t in net.named_parameters()}
    buffers = {n: t for n, t in net.named_buffers()}
    stacked = {n: torch.stack([t + 0.1 * k * torch.randn_like(t) for k in range(3)]) for n, t in params.items()}

    def f(p):
        return torch.func.functional_call(net, (p, buffers), (x,)).square().sum()

    want = (torch.func.vmap(f)(stacked), torch.func.vmap(torch.func.grad(f))(stacked))
    with gnn.cached():
        net(x)
        got = (torch.func.vmap(f)(stacked), torch.func.vmap(torch.func.grad(f))(stacked))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- state, dtype, pickling


def _net():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    gnn.orthogonal(net[0])
    gnn.sphere(net[2], radius=2.0)
    return net


def _train(net, steps=2, dtype=torch.float32):
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x = torch.randn(7, 4, dtype=dtype)
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()


def test_state_dict_round_trip_into_a_fresh_module():
    torch.manual_seed(0)
    a = _net()
    _train(a)
    keys = set(a.state_dict())
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.base",
            "2.parametrizations.weight.original", "2.parametrizations.weight.0.base"} <= keys
    b = _net()  # a different random initialization
    x = torch.randn(5, 4)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


_SPARSE_CASES = [
    ("sphere", {}, 4), ("sphere", {"embedded": True}, 4), ("orthogonal", {}, 4),
    ("low_rank", {"tensor_name": "weight", "rank": 2}, 4), ("skew", {}, 6), ("positive_definite", {}, 6),
]


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
@pytest.mark.parametrize("case", _SPARSE_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_sparse_embedding_trains_with_a_constrained_weight(case, bag):
    """``nn.Embedding(sparse=True)`` (and ``EmbeddingBag``) hands its weight a sparse gradient, which
    the chart's backward cannot take (torch's own error, e.g. "sparse transpose: transposed
    dimensions must be sparse", or "Sparse division requires a scalar ... divisor"; torch's own
    parametrizations too). The raw tensor's gradient is dense whatever the embedding's is (the chart
    mixes the rows), so the weight's sparse gradient is densified first: the same gradients as with
    ``sparse=False``, in float64 (Note [Sparse gradients of a constrained weight])."""
    name, kwargs, dim = case
    cls = nn.EmbeddingBag if bag else nn.Embedding
    mods = []
    for sparse in (True, False):
        torch.manual_seed(0)
        e = cls(6, dim, sparse=sparse, dtype=torch.float64)
        mods.append(getattr(gnn, name)(e, **kwargs))
    idx = torch.tensor([[1, 3], [3, 0]])
    c = torch.randn(2, dim, dtype=torch.float64) if bag else torch.randn(2, 2, dim, dtype=torch.float64)
    for e in mods:
        with gnn.cached():  # a cached value too: two reads, one gradient
            ((e(idx) * c).sum() + (e(idx[:1]) * c[:1]).sum()).backward()
    sparse_grad, dense_grad = (e.parametrizations.weight.original.grad for e in mods)
    assert sparse_grad.layout == torch.strided
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-12, rtol=1e-12)
    opt = torch.optim.SGD(mods[0].parameters(), lr=0.5)
    opt.step()
    assert member(gnn.parametrization_of(mods[0]).space, mods[0].weight.detach())


def test_dtype_moves_after_registration():
    torch.manual_seed(0)
    for move in (lambda m: m.double(), lambda m: m.to(torch.float64)):
        net = move(_net())
        W = net[0].weight
        assert W.dtype == torch.float64 and net[0].parametrizations.weight[0].base.dtype == torch.float64
        _train(net, dtype=torch.float64)
        # the base was drawn in float32: orthonormal to float32 accuracy until a new point is assigned
        torch.testing.assert_close(net[0].weight.T @ net[0].weight, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
        Q = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))[0]
        net[0].weight = Q
        assert torch.equal(net[0].weight, Q)
        _train(net, dtype=torch.float64)
        torch.testing.assert_close(net[0].weight.T @ net[0].weight, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_deferred_initialization_on_the_meta_device(case):
    """Build on ``meta`` (no memory, no values), ``to_empty``, then load a checkpoint: the usual
    deferred-initialization path of large models. A meta tensor has no values to check."""
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    trained = make()
    getattr(gnn, name)(trained, **kwargs)
    with torch.device("meta"):
        m = make()
        getattr(gnn, name)(m, **kwargs)
    assert m.weight.is_meta and m.state_dict().keys() == trained.state_dict().keys()
    m = m.to_empty(device="cpu")
    m.load_state_dict(trained.state_dict())
    assert torch.equal(m.weight, trained.weight)
    X = gnn.parametrization_of(trained).space.sample(tuple(m.weight.shape))
    m.weight = X  # assignment is checked again on real tensors
    torch.testing.assert_close(m.weight, X, atol=1e-5, rtol=0)
    with pytest.raises(gf.ManifoldError):
        m.weight = torch.full_like(X, float("nan"))  # off every space (an open set contains X + noise)


@pytest.mark.parametrize("case", CASES + [("sln", {}, lambda: nn.Linear(4, 4), gf.SL),
                                           ("alpha_stable", {}, lambda: nn.Linear(4, 4), gf.Hurwitz),
                                           ("constrain", {"tensor_name": "weight", "space": gf.SO()}, lambda: nn.Linear(4, 4), gf.SO)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_built_under_fake_tensor_mode(case):
    """A model built under ``FakeTensorMode`` (memory and FLOP estimates) has fake Parameters, which
    pass ``isinstance(p, nn.Parameter)``: they were taken for concrete tensors, and registering every
    constraint but ``symmetric`` raised torch's DataDependentOutputException from a membership check
    (Note [Fake parameters]). Built as on the meta device: forward and backward give fake tensors of
    the real shapes and dtypes; ``check`` of a fake point raises a ManifoldError that says why."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    real = make()
    getattr(gnn, name)(real, **kwargs)
    shape, W_real = real(torch.randn(3, real.in_features)).shape, real.weight
    with FakeTensorMode():
        m = make()
        getattr(gnn, name)(m, **kwargs)
        W = m.weight
        assert isinstance(W, FakeTensor) and W.shape == W_real.shape and W.dtype == W_real.dtype
        y = m(torch.randn(3, m.in_features))
        assert isinstance(y, FakeTensor) and y.shape == shape
        y.sum().backward()
        raw = m.parametrizations.weight.original
        assert isinstance(raw.grad, FakeTensor) and raw.grad.shape == raw.shape
        with pytest.raises(gf.ManifoldError, match="values to measure"):
            gnn.parametrization_of(m).space.check(W)


@pytest.mark.parametrize("case", CASES + [("sln", {}, lambda: nn.Linear(4, 4), gf.SL),
                                           ("alpha_stable", {}, lambda: nn.Linear(4, 4), gf.Hurwitz)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_deferred_initialization_without_a_checkpoint(case):
    """README: after ``to_empty`` (bases uninitialized) a constrained tensor is re-initialized by
    assigning it a point, its class's ``sample()``: the weight is that point, and it trains."""
    name, kwargs, make, cls = case
    torch.manual_seed(0)
    with torch.device("meta"):
        m = getattr(gnn, name)(make(), **kwargs)
    m.to_empty(device="cpu")
    X = m.parametrizations.weight[0].sample()
    m.weight = X
    torch.testing.assert_close(m.weight.detach(), X, atol=1e-5, rtol=1e-5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.no_grad():
        m.bias.zero_()
    m(torch.randn(3, m.in_features)).pow(2).sum().backward()
    opt.step()
    assert member(gnn.parametrization_of(m).space, m.weight.detach())


def test_reading_a_weight_after_to_empty_names_deferred_initialization():
    """After ``to_empty`` the bases are uninitialized memory: reading the weight before assigning a point or
    loading a checkpoint raised a ManifoldError about averaged bases (AveragedModel) only."""
    with torch.device("meta"):
        m = gnn.orthogonal(nn.Linear(4, 5))
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.parametrizations.weight[0].base.fill_(3.0)  # what uninitialized memory may hold: not a frame
    with pytest.raises(gf.ManifoldError, match=r"After to_empty .*assign each constrained tensor a point or load a checkpoint"):
        m.weight
    m.weight = m.parametrizations.weight[0].sample()  # the remedy the message names
    assert member(gf.Stiefel(), m.weight.detach())


@pytest.mark.parametrize("how", ["deepcopy", "double", "to_empty"])
def test_a_constrained_rnn_weight_under_weight_norm_copies_and_converts(how):
    """A geofunc constraint on top of weight_norm (raw tensors original0, original1): the RNN's rebuilt
    flat weights held None for it, and the LSTM kernel refused None (TypeError) after a copy or a conversion."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4)

    def make():
        m = nn.LSTM(4, 4)
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        gnn.sphere(m, "weight_hh_l0")
        return m

    m = make()
    with torch.no_grad():
        want = m(x)[0]
    if how == "deepcopy":
        new = copy.deepcopy(m)
    elif how == "double":
        new = copy.deepcopy(m).double()
    else:
        with torch.device("meta"):
            new = make()
        new.to_empty(device="cpu")
        new.load_state_dict(m.state_dict())
    with torch.no_grad():
        got = new(x.to(new.weight_ih_l0.dtype))[0]
    torch.testing.assert_close(got.to(want.dtype), want, atol=1e-6, rtol=0)
    assert member(gf.Sphere(), new.weight_hh_l0.detach())


@pytest.mark.parametrize("name, args", [("orthogonal", ()), ("low_rank", (2,)), ("sphere", ())])
def test_deferred_initialization_of_a_constrained_rnn(name, args):
    """nn.LSTM's _apply (to_empty, .to(), .double()) ends by evaluating every weight for its flat-weight
    list: on to_empty's uninitialized memory the constrained weight's base check raised ManifoldError
    before load_state_dict could fill the module in."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4)
    trained = nn.LSTM(4, 4, num_layers=2)
    getattr(gnn, name)(trained, "weight_hh_l0", *args)
    getattr(gnn, name)(trained, "weight_ih_l1", *args)
    with torch.device("meta"):
        m = nn.LSTM(4, 4, num_layers=2)
        getattr(gnn, name)(m, "weight_hh_l0", *args)
        getattr(gnn, name)(m, "weight_ih_l1", *args)
    m = m.to_empty(device="cpu")
    m.load_state_dict(trained.state_dict())
    torch.testing.assert_close(m(x)[0], trained(x)[0], atol=0, rtol=0)
    m = m.double()  # and other conversions still give the constrained weights in the new dtype
    y = m(x.double())[0]
    ref = nn.LSTM(4, 4, num_layers=2).double()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(getattr(m, n))
    torch.testing.assert_close(y, ref(x.double())[0], atol=1e-12, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_moves_after_registration():
    torch.manual_seed(0)
    net = _net().cuda()
    assert net[0].weight.is_cuda and net[0].parametrizations.weight[0].base.is_cuda
    x = torch.randn(7, 4, device="cuda")
    _train_dev = torch.optim.Adam(net.parameters(), lr=0.05)
    net(x).sum().backward()
    _train_dev.step()
    torch.testing.assert_close(net[0].weight.T @ net[0].weight, torch.eye(4, device="cuda"), atol=1e-5, rtol=0)
    net[0].weight = torch.eye(6, 4, device="cuda")
    assert torch.equal(net[0].weight, torch.eye(6, 4, device="cuda"))
    back = net.cpu()
    assert torch.equal(back[0].weight, torch.eye(6, 4))
    # registration on a CUDA module samples on CUDA
    m = gnn.orthogonal(nn.Linear(4, 6, device="cuda"))
    assert m.weight.is_cuda and m.parametrizations.weight.original.is_cuda


def test_torch_save_load_whole_module():
    torch.manual_seed(0)
    net = _net()
    _train(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    new = torch.load(buf, weights_only=False)
    x = torch.randn(5, 4)
    assert torch.equal(new(x), net(x))
    assert type(new[0]).__name__ == "ParametrizedLinear" and isinstance(new[0], nn.Linear)
    assert type(new[0]) is not type(net[0])  # its own parametrized class, properties and cache keys
    new[0].weight = torch.eye(6, 4)  # still constrained
    assert torch.equal(new[0].weight, torch.eye(6, 4))
    assert not torch.equal(net[0].weight, torch.eye(6, 4))
    with pytest.raises(gf.ManifoldError):
        new[0].weight = 2 * torch.eye(6, 4)
    # pickling twice (a reloaded module is picklable again), and deepcopy
    buf = io.BytesIO()
    torch.save(new, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), new(x))
    cp = copy.deepcopy(net)
    assert torch.equal(cp(x), net(x))
    cp[0].weight = torch.eye(6, 4)
    assert not torch.equal(net[0].weight, torch.eye(6, 4))
    with gnn.cached():  # the copy does not share the original's cache entries
        assert not torch.equal(cp[0].weight, net[0].weight)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("after_forward", [False, True])
def test_whole_constrained_rnn_pickles_and_copies(how, after_forward):
    # nn.GRU/LSTM/RNN keep weak references to their weights (_flat_weight_refs) and, after a forward,
    # the constrained weights themselves (non-leaf tensors) in _flat_weights: torch.save(model) raised
    # "cannot pickle 'weakref.ReferenceType' object" and deepcopy after a forward raised on the non-leaf.
    torch.manual_seed(0)
    net = nn.GRU(4, 6, num_layers=2, bidirectional=True)
    gnn.orthogonal(net, "weight_hh_l0")
    gnn.orthogonal(net, "weight_hh_l1_reverse")
    x = torch.randn(5, 2, 4)
    if after_forward:
        net(x)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        new = torch.load(buf, weights_only=False)
    else:
        new = copy.deepcopy(net)
    with torch.no_grad():
        want = net(x)[0]
    out = new(x)[0]
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    out.sum().backward()  # the copy trains its own raw tensor, and stays on the space
    raw = new.parametrizations.weight_hh_l0.original
    assert raw.grad is not None and net.parametrizations.weight_hh_l0.original.grad is None
    torch.optim.SGD(new.parameters(), lr=0.5).step()
    W = new.weight_hh_l0.detach()
    assert member(gf.Stiefel(), W)
    assert not torch.equal(W, net.weight_hh_l0.detach())
    with torch.no_grad():  # the copy's forward uses its new weight; the original is unchanged
        torch.testing.assert_close(net(x)[0], want, atol=0, rtol=0)
        ref = nn.GRU(4, 6, num_layers=2, bidirectional=True)
        for name, _ in ref.named_parameters():
            getattr(ref, name).copy_(getattr(new, name))
        torch.testing.assert_close(new(x)[0], ref(x)[0], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- functional bridge


def test_stack_module_state_of_containers_of_constrained_layers():
    """README: torch.func.stack_module_state stacks a container whose layers are constrained under the
    parametrized names (raw tensors and bases), and functional_call(models[0], (params, buffers)) under
    vmap runs each member's own chart: outputs, weights (on the space) and gradients are each member's
    (float64); modules that are themselves parametrized it refuses (a class of their own each)."""
    torch.manual_seed(0)
    F64 = torch.float64

    def make():
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
        gnn.orthogonal(m[0])
        gnn.positive_definite(m[2])
        return m

    models = [make() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    assert "0.parametrizations.weight.original" in params and "2.parametrizations.weight.0.base" in buffers
    x = torch.randn(5, 4, dtype=F64)

    def loss(p, b):
        return functional_call(models[0], (p, b), (x,)).pow(2).sum()

    values = vmap(loss)(params, buffers)
    grads = vmap(torch.func.grad(loss))(params, buffers)
    eye = torch.eye(4, dtype=F64)

    def layer2(p, b):  # the third layer alone, on the identity: its weight (transposed) plus its bias
        sub = ({k[2:]: v for k, v in p.items() if k.startswith("2.")}, {k[2:]: v for k, v in b.items() if k.startswith("2.")})
        return functional_call(models[0][2], sub, (eye,))

    weights = vmap(layer2)(params, buffers)
    for i, m in enumerate(models):
        m.zero_grad()
        value = m(x).pow(2).sum()
        value.backward()
        torch.testing.assert_close(values[i], value.detach(), atol=1e-12, rtol=1e-12)
        for k, t in m.named_parameters():
            torch.testing.assert_close(grads[k][i], t.grad, atol=1e-12, rtol=1e-12)
        W = (weights[i] - m[2].bias.detach()).mT
        torch.testing.assert_close(W, m[2].weight.detach(), atol=1e-12, rtol=0)
        assert bool(m[2].parametrizations.weight[0].in_manifold(W))
    with pytest.raises(RuntimeError, match="same class"):
        torch.func.stack_module_state([m[0] for m in models])


def test_functional_call_with_a_constrained_tensors_plain_name_is_refused():
    """``functional_call(layer, {"weight": W}, x)`` assigned W through right_inverse under no_grad: no
    gradient reached W (None, silently), and torch's restore re-centred the chart, rewriting the raw
    Parameter (0.40) and base (0.44) of a trained SO(4) layer. Now refused by name, with nothing swapped
    (Note [functional_call with a constrained tensor's plain name]); the two ways it names give W's
    gradient (float64, against the closed form) and leave the module as it was."""
    torch.manual_seed(0)
    F64 = torch.float64
    layer = gnn.orthogonal(nn.Linear(4, 4).to(F64))
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(4, 4, dtype=F64))
    x = torch.randn(3, 4, dtype=F64)
    state = {k: v.detach().clone() for k, v in layer.state_dict(keep_vars=True).items()}
    W = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0].requires_grad_()
    b = torch.randn(4, dtype=F64)
    for given in ({"weight": W}, {"bias": b, "weight": W}):  # a tensor swapped in before it is swapped back
        with pytest.raises(gf.ManifoldError, match=r"functional_call of Linear\.weight, a constrained tensor: .*"
                                                   r"module_state.*gf\.nn\.plain.*got the plain name 'weight'"):
            functional_call(layer, given, (x,))
        for k, v in layer.state_dict(keep_vars=True).items():
            assert v is not state[k] and torch.equal(v, state[k]), k
        assert layer.bias is layer.get_parameter("bias")
    # the ways named: a point for the unparametrized copy; raw tensors and bases for the module itself
    y = functional_call(gnn.plain(layer), {"weight": W, "bias": b}, (x,))
    (g,) = torch.autograd.grad(y.pow(2).sum(), W)
    torch.testing.assert_close(g, 2 * (x @ W.detach().T + b).T @ x, atol=1e-12, rtol=1e-12)
    _, raw, bases = gnn.functional(layer)
    raw = {k: v.detach().clone().requires_grad_() for k, v in raw.items()}
    out = functional_call(layer, gnn.module_state(layer, raw, bases), (x,))
    torch.testing.assert_close(out, layer(x), atol=0, rtol=0)
    layer.weight = layer.weight.detach().clone()  # a plain assignment still assigns
    torch.testing.assert_close(layer(x), out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_module_state_is_complete_for_a_strict_functional_call(case):
    """``functional_call(module, gnn.module_state(module, raw, bases), args, strict=True)``: the state
    names every parameter and buffer of the module. It left out the GeoTorch classes' internal
    (non-persistent) ``_reference`` buffer, which a user cannot know of, and torch refused the call
    ("Missing key(s): 'parametrizations.weight.0._reference'"); also under ``vmap`` over a stack."""
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    x = torch.randn(3, m.in_features)
    _, raw, bases = gnn.functional(m)
    state = gnn.module_state(m, raw, bases)
    torch.testing.assert_close(functional_call(m, state, (x,), strict=True), m(x), atol=0, rtol=0)
    _, sraw, sbases, _ = gnn.stack([m, m])
    out = vmap(lambda r, b: functional_call(m, gnn.module_state(m, r, b), (x,), strict=True))(sraw, sbases)
    torch.testing.assert_close(out[1], m(x), atol=1e-6, rtol=1e-6)


def test_functional_bridge_and_back():
    torch.manual_seed(0)
    net = _net()
    _train(net)
    constraints, raw, bases = gnn.functional(net)
    assert constraints == {"0.weight": gf.Stiefel(), "2.weight": gf.Sphere(radius=2.0)}
    assert set(raw) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert raw["0.weight"] is net[0].parametrizations.weight.original
    skeleton = gnn.plain(net)
    assert not P.is_parametrized(skeleton[0]) and set(dict(skeleton.named_parameters())) == set(raw)
    x = torch.randn(5, 4)
    ref = net(x)
    out = functional_call(skeleton, to_manifold(constraints, raw, bases), (x,))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # the module's own names, through its own parametrizations
    out2 = functional_call(net, gnn.module_state(net, raw, bases), (x,))
    torch.testing.assert_close(out2, ref, atol=0, rtol=0)

    # functional training on copies, then written back
    raw2 = {k: v.detach().clone() for k, v in raw.items()}

    def loss(r):
        return functional_call(skeleton, to_manifold(constraints, r, bases), (x,)).pow(2).sum()

    g = torch.func.grad(loss)(raw2)
    raw2 = {k: v - 0.1 * g[k] for k, v in raw2.items()}
    assert torch.equal(net(x), ref)  # the module was not touched
    gnn.load_functional(net, raw2, bases)
    torch.testing.assert_close(net(x), functional_call(skeleton, to_manifold(constraints, raw2, bases), (x,)), atol=0, rtol=0)


def test_stack_for_vmap_ensembles():
    torch.manual_seed(0)
    nets = [_net() for _ in range(3)]
    constraints, raw, bases, skeleton = gnn.stack(nets)
    assert raw["0.weight"].shape == (3, 6, 4) and bases["0.weight"].shape == (3, 6, 4)
    x = torch.randn(5, 4)

    def f(raw, bases, x):
        return functional_call(skeleton, to_manifold(constraints, raw, bases), (x,))

    out = vmap(f, in_dims=(0, 0, None))(raw, bases, x)
    torch.testing.assert_close(out, torch.stack([n(x) for n in nets]), atol=1e-6, rtol=0)
    grads = vmap(torch.func.grad(lambda r, b, x: f(r, b, x).sum()), in_dims=(0, 0, None))(raw, bases, x)
    assert grads["0.weight"].shape == (3, 6, 4)
    with pytest.raises(gf.ManifoldError, match="constraints"):
        gnn.stack([nets[0], gnn.orthogonal(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))[0])])


class _TiedPair(nn.Module):
    """Tied weights (a language model's embedding and decoder, in miniature): ``b.weight is a.weight``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("cls, size", [(gnn.Rn, (5, 4)), (gnn.SO, (4, 4)), (gnn.Sphere, (5, 4)), (gnn.Stiefel, (5, 4))],
                         ids=["Rn", "SO", "Sphere", "Stiefel"])
def test_plain_leaves_a_directly_registered_module_intact(cls, size):
    """plain() of a module whose GeoTorch class was registered with torch's register_parametrization
    removed the property from the class the copy shared with the original: the original then had no
    weight (Note [A replica's own class])."""
    torch.manual_seed(0)
    layer = nn.Linear(size[1], size[0])
    M = cls(size)
    if cls is not gnn.Rn:
        with torch.no_grad():
            layer.weight.copy_(M.sample())
    P.register_parametrization(layer, "weight", M)
    x = torch.randn(3, size[1])
    want = layer(x)
    copy_ = gnn.plain(layer)
    assert not P.is_parametrized(copy_)
    torch.testing.assert_close(copy_(x), want, atol=0, rtol=0)
    assert P.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer(x), want, atol=0, rtol=0)  # the original still reads its weight
    gnn.stack([layer, layer])  # (its skeleton is plain(layer))
    torch.testing.assert_close(layer(x), want, atol=0, rtol=0)


def test_quantization_and_fusion_take_the_plain_copy():
    """torch's eager quantization and conv/linear-BN fusion refuse parametrized modules (as for torch's own
    parametrizations); gf.nn.plain(model), which README names for them, quantizes and fuses to the
    constrained model's function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    gnn.orthogonal(model[0])
    gnn.low_rank(model[3], "weight", rank=2)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 8)
    want = model(x)
    with pytest.raises(KeyError, match="already exists"):
        torch.nn.utils.fusion.fuse_linear_bn_eval(model[0], model[1])
    flat = gnn.plain(model)
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(flat[0], flat[1])
    torch.testing.assert_close(fused(x), model[1](model[0](x)), atol=1e-5, rtol=1e-5)
    if not hasattr(torch.ao.quantization, "quantize_dynamic"):  # (deprecated by torch; gone in a later release)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of eager quantization and quantized tensors
        with pytest.raises(AssertionError, match="ParametrizedLinear"):
            torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        quantized = torch.ao.quantization.quantize_dynamic(flat, {nn.Linear}, dtype=torch.qint8)
    assert (quantized(x) - want).abs().max() < 0.1  # int8 weights: the float model's output to quantization error


def test_plain_and_stack_refuse_a_constrained_tensor_tied_to_another_name():
    """A constraint unties tied weights (docs/guide/nn.md): the constrained module reads the point, the
    other reads the raw Parameter. plain() removed the parametrization, which writes the point into that
    shared Parameter, so the skeleton read the point in both places: plain(m), functional_call(plain(m),
    to_manifold(functional(m))) and stack's skeleton were 1.3 off m(x), silently (one value per name cannot
    express 'the raw tensor here, its point there'), and average_ (which re-centres the chart) reset b's
    weight. They now refuse by name; functional_call(m, module_state(m, raw, bases)) runs the module
    itself and keeps the tie."""
    torch.manual_seed(0)
    m = _TiedPair().double()
    gnn.orthogonal(m.a, "weight")
    x = torch.randn(3, 5, dtype=torch.float64)
    tied = r"the raw tensor of a\.weight \(constrained to Stiefel.*\) is also the module's b\.weight"
    with pytest.raises(gf.ManifoldError, match="plain: " + tied):
        gnn.plain(m)
    with pytest.raises(gf.ManifoldError, match="stack: " + tied):
        gnn.stack([m, m])
    # average_ re-centres a's chart: b (reading the raw tensor) went to 0, so averaging m with itself
    # moved its output by 0.12; refused, m left as it was
    with torch.no_grad():
        m.a.parametrizations.weight.original.add_(0.3)
    before = m(x)
    with pytest.raises(gf.ManifoldError, match="average_: " + tied):
        gnn.average_(m, [m, m])
    torch.testing.assert_close(m(x), before, atol=0, rtol=0)
    _, raw, bases = gnn.functional(m)
    torch.testing.assert_close(functional_call(m, gnn.module_state(m, raw, bases), (x,)), m(x), atol=0, rtol=0)
    both = _TiedPair().double()  # both ends constrained: one raw Parameter read through two charts
    gnn.orthogonal(both.a, "weight")
    gnn.orthogonal(both.b, "weight")
    with pytest.raises(gf.ManifoldError, match=r"plain: the raw tensor of a\.weight .* is also the module's b\.weight"):
        gnn.plain(both)
    shared = _TiedPair()  # one parametrized module under two names (a shared submodule) reads the point in both
    shared.b = shared.a
    gnn.orthogonal(shared.a, "weight")
    _, raw, bases = gnn.functional(shared)
    skeleton = gnn.plain(shared)
    torch.testing.assert_close(functional_call(skeleton, to_manifold({"a.weight": gf.Stiefel()}, raw, bases), (x.float(),)),
                               shared(x.float()), atol=0, rtol=0)
    gnn.average_(skeleton := copy.deepcopy(shared), [shared])
    torch.testing.assert_close(skeleton(x.float()), shared(x.float()), atol=1e-6, rtol=0)
    untied = _TiedPair()  # a tie between unconstrained tensors is the skeleton's own, kept
    untied.b.weight = nn.Parameter(untied.b.weight.detach().clone())
    untied.a.bias = untied.b.bias
    gnn.orthogonal(untied.a, "weight")
    skeleton = gnn.plain(untied)
    assert skeleton.a.bias is skeleton.b.bias
    torch.testing.assert_close(skeleton(x.float()), untied(x.float()), atol=0, rtol=0)


def test_stack_of_modules_with_their_own_buffers():
    """The skeleton carries module 0's buffers: with BatchNorm statistics of their own, members 1 and 2
    ran with module 0's under vmap (0.25 and 1.1 off their outputs, silently). Now stack refuses such
    modules by the buffer's name, and stack(..., buffers=True) returns the buffers stacked: the vmapped
    ensemble equals each module (eval mode); equal buffers are accepted as before."""
    torch.manual_seed(0)

    def make(shift):
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        gnn.orthogonal(m[0], "weight")
        for _ in range(3):
            m(torch.randn(16, 4) * 2 + shift)
        return m.eval()

    nets = [make(s) for s in (0.0, 1.0, -2.0)]
    with pytest.raises(gf.ManifoldError, match=r"stack: expected module 1's buffer '1.running_mean' equal .*got a different one, a tensor of shape .*buffers=True"):
        gnn.stack(nets)
    constraints, raw, bases, skeleton, buffers = gnn.stack(nets, buffers=True)
    assert sorted(buffers) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert buffers["1.running_mean"].shape == (3, 4)
    x = torch.randn(5, 4)

    def f(raw, bases, buffers, x):
        return functional_call(skeleton, (to_manifold(constraints, raw, bases), buffers), (x,))

    out = vmap(f, in_dims=(0, 0, 0, None))(raw, bases, buffers, x)
    torch.testing.assert_close(out, torch.stack([n(x) for n in nets]), atol=1e-6, rtol=0)
    same = [make(0.0) for _ in range(2)]
    for m in same[1:]:
        m.load_state_dict(same[0].state_dict())
    assert len(gnn.stack(same)) == 4


def test_stack_refuses_modules_in_different_modes():
    """The skeleton is module 0's, in its train/eval mode, and every member ran in it under vmap: a
    member in eval mode beside a module 0 in training was evaluated with BatchNorm's batch statistics,
    0.55 off its own output, silently (torch.func.stack_module_state refuses mixed modes). Now stack
    refuses a difference in any submodule's mode by name; the same modes stack and equal each member."""
    torch.manual_seed(0)

    def make():
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
        gnn.orthogonal(m[0], "weight")
        m(torch.randn(16, 4))
        return m

    nets = [make() for _ in range(2)]
    nets[1].eval()
    with pytest.raises(gf.ManifoldError, match=r"stack: expected module 1 in module 0's train/eval mode .*got the "
                                               r"module with training=False .*\.train\(\) or \.eval\(\)"):
        gnn.stack(nets, buffers=True)
    nets[1].train()
    nets[1][2].eval()  # one submodule only: its forward changes as much
    with pytest.raises(gf.ManifoldError, match=r"got submodule '2' with training=False"):
        gnn.stack(nets, buffers=True)
    for n in nets:
        n.eval()
    nets[0][0].parametrizations.train()  # a parametrization's mode changes nothing: not compared
    constraints, raw, bases, skeleton, buffers = gnn.stack(nets, buffers=True)
    x = torch.randn(5, 4)
    out = vmap(lambda r, b, bb: functional_call(skeleton, (to_manifold(constraints, r, b), bb), (x,)))(raw, bases, buffers)
    with torch.no_grad():
        torch.testing.assert_close(out, torch.stack([n(x) for n in nets]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch 2.11's own imports
def test_compile_fullgraph_forward_backward_aot_eager():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(5, 4)
    ref = net(x)
    ref.pow(2).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    torch._dynamo.reset()
    cnet = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = cnet(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=1e-5)


def test_assignment_inside_a_compiled_function_warns_nothing_and_functional_call_is_still_refused():
    """Note [functional_call with a constrained tensor's plain name]: the weight's setter reads its caller's frames
    (sys._getframe), which Dynamo does not trace: a torch.compile'd function assigning a constrained weight raised
    Dynamo's UserWarning "Dynamo does not know how to trace the builtin `sys._getframe`" (an error under
    warnings-as-errors). The frame walk runs outside the trace now (torch.compiler.disable); the assignment is the
    right inverse as in eager, and functional_call with the plain name is refused inside a compiled function too."""
    torch.manual_seed(0)
    F64 = torch.float64
    layer = gnn.orthogonal(nn.Linear(4, 4).to(F64))
    x = torch.randn(3, 4, dtype=F64)
    W = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]

    def assign(W):
        layer.weight = W
        return layer(x)

    torch._dynamo.reset()
    y = torch.compile(assign, backend="eager")(W)  # (warnings are errors in the suite)
    torch.testing.assert_close(layer.weight.detach(), W, atol=1e-12, rtol=0)
    torch.testing.assert_close(y.detach(), x @ W.T + layer.bias.detach(), atol=1e-12, rtol=0)
    torch._dynamo.reset()
    with pytest.raises(gf.ManifoldError, match="got the plain name 'weight'"):
        torch.compile(lambda W: functional_call(layer, {"weight": W}, (x,)), backend="eager")(W)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own imports
def test_compile_fullgraph_inductor():
    torch.manual_seed(0)
    net = gnn.orthogonal(nn.Linear(4, 6))
    x = torch.randn(5, 4)
    ref = net(x)
    torch._dynamo.reset()
    out = torch.compile(net, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert net.parametrizations.weight.original.grad is not None


_EXPORT_CASES = CASES + [("sln", {}, lambda: nn.Linear(4, 4), gf.SL),
                         ("alpha_stable", {}, lambda: nn.Linear(4, 4), gf.Hurwitz)]


@pytest.mark.parametrize("case", _EXPORT_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_torch_export_holds_for_other_parameter_values(case):
    """A constrained layer exported with ``torch.export`` (deployment) computes the eager layer's
    output for parameter values other than the traced ones: no schedule or branch chosen from the
    traced values is baked into the graph (new raw parameters at scales 0.01 to 30, so that a matrix
    exponential's degree and squarings change), with the eager weight on its space at each."""
    name, kwargs, make, cls = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make().double(), **kwargs)
    x = torch.randn(3, m.in_features, dtype=torch.float64)
    exported = torch.export.export(m, (x,)).module()
    torch.testing.assert_close(exported(x), m(x), atol=1e-12, rtol=1e-12)
    state = m.state_dict()
    raw = [k for k in state if k.endswith("original")]
    assert raw, list(state)
    for scale in (0.01, 1.0, 30.0):
        new = dict(state, **{k: torch.randn_like(state[k]) * scale for k in raw})
        m.load_state_dict(new)
        exported.load_state_dict(new)
        torch.testing.assert_close(exported(x), m(x), atol=1e-10, rtol=1e-10)
        assert member(gnn.parametrization_of(m).space, m.weight.detach())


# Spaces beyond the constraint functions' (gf.nn.constrain), for the deployment checks below.
_DEPLOY_SPACES = [
    ("SO", gf.SO(), (4, 4)), ("Stiefel", gf.Stiefel(), (5, 3)), ("Stiefel-cayley-wide", gf.Stiefel(triv="cayley"), (3, 5)),
    ("Sphere", gf.Sphere(radius=2.0), (3, 4)), ("Oblique", gf.Oblique(), (4, 3)), ("PSD", gf.PSD(), (4, 4)),
    ("LowRank", gf.LowRank(2), (5, 4)), ("FixedRank", gf.FixedRank(2), (4, 5)), ("FixedRank-square", gf.FixedRank(4), (4, 4)),
    ("SL", gf.SL(), (4, 4)), ("Hurwitz", gf.Hurwitz(alpha=0.1), (4, 4)), ("GLp", gf.GLp(), (4, 4)),
    ("Birkhoff", gf.Birkhoff(), (4, 4)), ("PoincareBall", gf.PoincareBall(c=1.0), (3, 4)), ("Lorentz", gf.Lorentz(k=1.0), (3, 4)),
]


# strict export (Dynamo) for the spaces whose strict graph differs from the non-strict one (the geofunc
# operators of the exponential, the frame chart and Birkhoff's balancing: Note [Compiled balancing]) and
# the hyperbolic ones.
_DEPLOY_EXPORTS = [(c, False) for c in _DEPLOY_SPACES] + [
    (c, True) for c in _DEPLOY_SPACES
    if c[0] in ("SO", "Stiefel-cayley-wide", "LowRank", "SL", "Hurwitz", "Birkhoff", "PoincareBall")]


@pytest.mark.parametrize(("case", "strict"), _DEPLOY_EXPORTS, ids=lambda c: c[0] if isinstance(c, tuple) else ("strict" if c else "nonstrict"))
def test_torch_export_float32_dynamic_batch_strict_and_saved(case, strict, tmp_path):
    """Deployment in float32: a layer constrained to each space, exported strict or not with a dynamic
    batch (torch.export.Dim), computes the eager layer's output for another batch size, for other raw
    parameter values loaded after export (scales 0.01 to 10: no schedule chosen from the traced values
    is baked in), and after a torch.export.save/load round trip (with geofunc imported: a strict program
    holds the geofunc::expm operator, Birkhoff's geofunc::sinkhorn_balance). Tolerance: 1e-5 relative to the
    output's size (float32 rounding of a few products; measured ≤ 5e-6). Birkhoff's non-strict export takes
    ~5 s (its fixed-count Sinkhorn and Newton rounds are ~1300 nodes; the strict one holds the operator)."""
    name, space, shape = case
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(shape[1], shape[0]), "weight", space)
    x = torch.randn(3, shape[1])
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict)
    path = tmp_path / "layer.pt2"
    torch.export.save(ep, path)
    exported, loaded = ep.module(), torch.export.load(path).module()
    x7 = torch.randn(7, shape[1])

    def close(got, want, what):
        torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=0,
                                   msg=lambda msg: f"{name} ({what}): {msg}")

    with torch.no_grad():
        close(exported(x7), m(x7), "traced values, another batch size")
    state = m.state_dict()
    raw = [k for k in state if k.endswith("original")]
    assert raw, list(state)
    g = torch.Generator().manual_seed(1)
    for scale in (0.01, 1.0, 10.0):
        new = dict(state, **{k: torch.randn(state[k].shape, generator=g) * scale for k in raw})
        m.load_state_dict(new)
        exported.load_state_dict(new)
        loaded.load_state_dict(new)
        with torch.no_grad():
            close(exported(x7), m(x7), f"raw values at scale {scale}")
            close(loaded(x7), m(x7), f"saved and loaded, raw values at scale {scale}")
            assert member(space, m.weight, atol=1e-4)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize(("space", "out"), [(gf.SO(), 4), (gf.Sphere(), 5), (gf.LowRank(2), 5)], ids=repr)
def test_training_through_an_exported_program_gives_the_eager_gradients(space, out, strict):
    """README (Deployment): an exported model is trained by differentiating ep.module() with ordinary
    autograd; the raw tensors' gradients are the eager model's for raw values far from the traced ones
    (the static schedule of a non-strict program, geofunc::expm of a strict one). float32, 1e-4
    relative to the largest gradient (measured ≤ 3e-5 at scale 10)."""
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(4, out), "weight", space)
    em = torch.export.export(m, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict).module()
    g = torch.Generator().manual_seed(1)
    for scale in (0.0, 1.0, 10.0):
        state = m.state_dict()
        new = dict(state, **{k: torch.randn(v.shape, generator=g) * scale for k, v in state.items() if k.endswith("original")})
        m.load_state_dict(new)
        em.load_state_dict(new)
        x = torch.randn(9, 4, generator=g)
        grads = []
        for module in (m, em):
            module.zero_grad()
            module(x).square().mean().backward()
            grads.append({k: p.grad for k, p in module.named_parameters()})
        assert grads[0].keys() == grads[1].keys()
        for k, want in grads[0].items():
            torch.testing.assert_close(grads[1][k], want, atol=1e-4 * float(want.abs().max()), rtol=0,
                                       msg=lambda msg: f"{space!r} {k} at raw scale {scale}: {msg}")


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_torch_export_inside_cached_does_not_bake_the_cached_weight(strict):
    """torch.export inside a gf.nn.cached() block whose cache held the eager weight wrote that weight
    into the program as a constant (Note [Cached values in compiled and exported code]): the exported
    module ignored new raw values (2.2 off for SO(4)). Now the program reads its raw tensor and base."""
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(4, 4).double(), "weight", gf.SO())
    x = torch.randn(3, 4, dtype=torch.float64)
    with gnn.cached():
        m(x)  # the cache holds the eager weight
        exported = torch.export.export(m, (x,), strict=strict).module()
    new = {k: v + torch.randn_like(v) if k.endswith("original") else v for k, v in m.state_dict().items()}
    m.load_state_dict(new)
    exported.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), m(x), atol=1e-12, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch 2.11's own imports
def test_compiled_module_inside_cached_sees_an_optimizer_step():
    """Inside gf.nn.cached() a compiled layer read back the weight torch's cache had stored from its
    previous call, so after an optimizer step it kept the old weight (2.1 off, silently) while the eager
    layer recomputed (Note [Cached values in compiled and exported code])."""
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4).double())
    x = torch.randn(3, 4, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with gnn.cached():
        for _ in range(3):
            out = compiled(x)
            torch.testing.assert_close(out, m(x), atol=1e-12, rtol=1e-12)
            opt.zero_grad()
            out.square().sum().backward()
            opt.step()
        torch.testing.assert_close(compiled(x), m(x), atol=1e-12, rtol=1e-12)
    assert m.parametrizations.weight.original.grad is not None


def _jit_warnings(fn):
    """torch 2.13 deprecates torch.jit's entry points; a trace warns where Python reads a shape."""
    fn = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")(fn)
    return pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")(fn)


@_jit_warnings
@pytest.mark.parametrize("case", _EXPORT_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_torch_jit_trace_and_script_refuse_a_constrained_module(case):
    """torch.jit.trace replays the decisions the maps take from the traced values (Note [Traced by
    torch.jit.trace]): a module traced under no_grad at its chart's centre computed I + A for every later
    raw tensor (SO(4): outputs up to 39 off after a load_state_dict), silently. It is refused with a
    ManifoldError naming torch.export, as is torch.jit.script (which failed deep in geofunc's source,
    Note [Scripted by torch.jit.script]); gf.nn.plain(model) (frozen weights) traces and scripts."""
    name, kwargs, make, cls = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    x = torch.randn(3, m.in_features)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(gf.ManifoldError, match=r"got torch\.jit\.trace.*torch\.export\.export"):
            torch.jit.trace(m, (x,))
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .*got torch\.jit\.script.*gf\.nn\.plain"):
        torch.jit.script(m)
    frozen = gnn.plain(m)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(frozen, (x,))(x), m(x), atol=0, rtol=0)
        torch.testing.assert_close(torch.jit.script(frozen)(x), m(x), atol=0, rtol=0)


@_jit_warnings
def test_torch_jit_trace_refuses_the_maps_of_a_space():
    """The functional layer too: a function calling a space's map is not traced (the trace at a raw
    tensor of 0 kept the exponential's degree 1: SO(4) 1e4 off at scale 5)."""
    Z = torch.zeros(4, 4)
    with torch.no_grad(), pytest.raises(gf.ManifoldError, match=r"SO\(triv='expm'\)\.to_manifold: expected .*got torch\.jit\.trace"):
        torch.jit.trace(lambda z: gf.SO().to_manifold(z), (Z,))
    with pytest.raises(gf.ManifoldError, match=r"Sphere\(radius=1\.0\)\.retract: .*torch\.jit\.trace"):
        torch.jit.trace(lambda v: gf.Sphere().retract(torch.tensor([1.0, 0.0]), v), (torch.tensor([0.0, 0.5]),))


# ----------------------------------------------------------------------------- bad input


def test_errors_name_the_parameter_the_space_expected_and_got():
    with pytest.raises(gf.ManifoldError, match=r"cannot constrain Linear\.bias \(a tensor of shape \(3,\).*Stiefel.*expected.*matrices.*got"):
        gnn.orthogonal(nn.Linear(2, 3), "bias")
    with pytest.raises(ValueError, match=r"Module 'Linear' does not have a parameter, a buffer, or a parametrized element with name 'wieght'.*weight, bias"):
        gnn.orthogonal(nn.Linear(2, 3), "wieght")
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*Sym.*expected.*square.*got.*\(3, 2\)"):
        gnn.symmetric(nn.Linear(2, 3))
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*Sphere.*radius"):
        gnn.sphere(nn.Linear(2, 3), radius=-1.0)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*triv"):
        gnn.orthogonal(nn.Linear(2, 3), triv="nope")
    # a failed registration leaves the module as it was
    m = nn.Linear(2, 3)
    with pytest.raises(gf.ManifoldError):
        gnn.skew(m)
    assert not P.is_parametrized(m)


def test_rank_out_of_range_names_the_parameter():
    with pytest.raises(gf.ManifoldError, match=r"Conv2d\.weight.*LowRank.*rank"):
        gnn.low_rank(nn.Conv2d(2, 2, 3), "weight", rank=4)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*LowRank.*rank"):
        gnn.low_rank(nn.Linear(2, 3), "weight", rank=0)


def test_constrain_any_space_and_chains():
    m = gnn.constrain(nn.Linear(3, 3), "weight", gf.SO())
    assert torch.linalg.det(m.weight) > 0
    # on an already parametrized tensor, the space is appended to the chain
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", _Scale())
    gnn.constrain(m, "weight", gf.Stiefel())
    torch.testing.assert_close(m.weight.T @ m.weight, torch.eye(3), atol=1e-5, rtol=0)
    m.weight = torch.eye(3)
    torch.testing.assert_close(m.weight, torch.eye(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("space", [gf.Sphere(), gf.Stiefel(), gf.GLp(), gf.LowRank(rank=2)], ids=repr)
def test_a_parametrization_built_without_its_base_keeps_the_registered_and_assigned_points(space):
    """``register_parametrization(layer, "weight", gnn.Parametrization(space))``, as GeoTorch's classes are
    registered: the adapter has no base buffer, and the base of the registered point (and of every later
    assignment) was dropped (torch's pytree reads the template's None as a leaf, like a tensor), so the
    weight was ``to_manifold(0, None)``, silently another point. The base is adopted at registration."""
    g = torch.Generator().manual_seed(0)
    n = 3 if isinstance(space, gf.GLp) else 4
    layer = nn.Linear(3, n)
    X = space.sample((n, 3), generator=g)
    with torch.no_grad():
        layer.weight.copy_(X)
    P.register_parametrization(layer, "weight", gnn.Parametrization(space))
    torch.testing.assert_close(layer.weight, X, atol=1e-5, rtol=0)
    Y = space.sample((n, 3), generator=g)
    layer.weight = Y
    torch.testing.assert_close(layer.weight, Y, atol=1e-5, rtol=0)
    assert member(space, layer.weight.detach())
    fresh = nn.Linear(3, n)
    with torch.no_grad():
        fresh.weight.copy_(X)
    P.register_parametrization(fresh, "weight", gnn.Parametrization(space))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.weight, Y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("space", [gf.GLp(), gf.PSD(), gf.FixedRank(rank=2)], ids=repr)
def test_a_parametrization_registered_directly_keeps_its_point_across_dtypes(space):
    """``register_parametrization(layer, "weight", gnn.Parametrization(space))`` then ``.double()``: the raw
    values of "softplus" mean other points in float64 (its floor √ε changes), and only the GeoTorch classes
    re-expressed them, so the weight moved by 3.4e-4 with no warning; now by float32's rounding, as theirs."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 3)
    X = space.sample((3, 3), generator=g)
    with torch.no_grad():
        layer.weight.copy_(X)
    P.register_parametrization(layer, "weight", gnn.Parametrization(space))
    layer(torch.randn(2, 3, generator=g))  # an evaluation on the raw Parameter confirms it (as for the classes)
    for moved in (copy.deepcopy(layer).double(), layer.double()):
        assert moved.weight.dtype == torch.float64 and member(space, moved.weight.detach())
        torch.testing.assert_close(moved.weight, X.double(), atol=1e-5, rtol=0)


def test_constrain_refuses_a_product_by_name():
    """A Product's points are tuples, so no one tensor holds one: ``constrain`` says so with a
    ``ManifoldError`` (it sampled a tuple for the weight and failed with ``AttributeError: 'tuple' object
    has no attribute 'shape'``), and leaves the module unconstrained."""
    m = nn.Linear(3, 4)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight.*Product\(Sphere.*tuples of tensors"):
        gnn.constrain(m, "weight", gf.Product(gf.Sphere(), gf.Sphere()))
    assert not P.is_parametrized(m)


class _Scale(nn.Module):
    def forward(self, X):
        return 2 * X

    def right_inverse(self, X):
        return X / 2


def test_average_leaves_the_target_as_it_was_when_an_assignment_refuses():
    """All or nothing: a projected point the assignment refuses (here made to refuse) leaves every
    tensor of the target, the unconstrained ones too, as it was."""
    torch.manual_seed(0)
    target = nn.Sequential(gnn.orthogonal(nn.Linear(4, 6)), gnn.invertible(nn.Linear(6, 6)))
    others = [copy.deepcopy(target) for _ in range(2)]
    for m in others:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    P_ = gnn.parametrization_of(target[1])

    def refuse(X, *args, **kwargs):
        raise gf.ManifoldError("refused")

    P_.right_inverse = refuse
    with pytest.raises(gf.ManifoldError, match="refused"):
        gnn.average_(target, others)
    del P_.right_inverse
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_base_loaded_then_checked_under_autocast_is_accepted(case):
    """Mixed precision: a checkpoint loaded, then the first forward under ``torch.autocast`` (bf16 on
    the CPU) checks the base. The check's Gram runs in the base's own dtype: a bf16 Gram of a
    float32 frame is ~1e-2 off, and every loaded frame base was refused (found probing)."""
    src, dst = _trained(case, 0), _trained(case, 1)
    dst.load_state_dict(src.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dst(torch.randn(4, dst.in_features))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(dst.weight, src.weight, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_update_base_inside_autocast_keeps_the_weight_on_the_space(case):
    """Mixed-precision training with dynamic trivialization: steps and ``update_base`` all inside a
    bf16 autocast region. The base's refinement ran there in bf16 (its Gram read 2e-3 off, then a
    bf16 polar factor): the orthogonal weight ended 3e-3 off Stiefel, silently. The refinement now
    runs in the base's dtype; the float32 weight is on its space at float32's tolerance."""
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(4, m.in_features)).float().square().sum().backward()
            opt.step()
            gnn.update_base(m)
    P_ = gnn.parametrization_of(m)
    assert not _base_off(P_.space, P_.get_base())
    assert member(P_.space, m.weight)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_registration_sampling_and_assignment_inside_autocast(case):
    """A model built inside a bf16 autocast region: the one-liner's sample and ``in_manifold`` ran
    their products in bf16 (a PSD sample 1e-3 from symmetric), so 10 of these cases raised
    ``InManifoldError`` at registration, and ``M.sample()`` returned points off the space (Note [The
    classes' eager maths without autocast]). Registration, an assignment and a sample there now give
    float32 points on the space."""
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = getattr(gnn, name)(make(), **kwargs)
        m.weight = m.weight.detach().clone()
        M = gnn.parametrization_of(m)
        S = M.sample()
        assert M.in_manifold(S)
    space = M.space
    assert m.weight.dtype == torch.float32 and member(space, m.weight)
    assert member(space, S if isinstance(S, torch.Tensor) else S[0])


# ----------------------------------------------------------------------------- contiguous bases
# Note [Contiguous bases] (geofunc/nn/_adapter.py): a base buffer is contiguous wherever one is made
# or replaced, since torch's broadcast_from_rank0 loading ships a tensor's storage in memory order
# (tests/test_fsdp_nn.py launches it on 2 processes).

_BASE_KEY = r"(^|\.)parametrizations\.[^.]+\.0\.base\d*$"


def _bases(m: nn.Module) -> dict[str, torch.Tensor]:
    import re

    return {k: b for k, b in m.named_buffers() if re.search(_BASE_KEY, k)}


def _assert_contiguous_bases(m: nn.Module, after: str) -> None:
    bases = _bases(m)
    bad = {k: (tuple(b.shape), b.stride()) for k, b in bases.items() if not b.is_contiguous()}
    assert not bad, f"after {after}: base buffers not contiguous: {bad}"


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous tensor (a base buffer of an earlier geofunc)."""
    out = t.new_empty(*t.shape, 2)[..., 0]
    out.copy_(t)
    assert out.numel() <= 1 or not out.is_contiguous()
    return out


def _contiguity_cases():
    return _EXPORT_CASES + [("orthogonal", {}, lambda: nn.Conv2d(2, 3, (4, 2)), gf.Stiefel),
                            ("low_rank", {"tensor_name": "weight", "rank": 2}, lambda: nn.Conv2d(4, 6, 3), gf.LowRank)]


@pytest.mark.parametrize("case", _contiguity_cases(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]().__class__.__name__}")
def test_every_base_buffer_is_contiguous_after_every_operation(case):
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    frames = name in ("orthogonal", "grassmannian", "low_rank", "fixed_rank", "positive_definite")
    assert _bases(m) or name in ("skew", "symmetric", "sphere") and kwargs.get("embedded", name != "sphere")
    if frames:  # the ones whose base came out of from_manifold as a transposed view
        assert any(b.ndim >= 2 and b.shape[-1] > 1 for b in _bases(m).values())
    _assert_contiguous_bases(m, "registration")
    _assert_contiguous_bases(getattr(gnn, name)(make().double(), **kwargs), "registration on a float64 module")
    with torch.no_grad():
        m.parametrizations.weight.original.add_(0.1)
    gnn.update_base(m)
    _assert_contiguous_bases(m, "update_base")
    m.weight = m.weight.detach().clone()
    _assert_contiguous_bases(m, "an assignment")
    m.double()
    _assert_contiguous_bases(m, ".double()")
    m.float()
    _assert_contiguous_bases(m, ".float()")
    m.to(memory_format=torch.channels_last)  # makes 4-d tensors (a Conv2d's bases) non-contiguous
    _assert_contiguous_bases(m, ".to(memory_format=torch.channels_last)")
    # a checkpoint of an earlier geofunc, whose bases were not contiguous
    old = {k: _strided(v) if k in _bases(m) else v.clone() for k, v in m.state_dict().items()}
    for assign in (False, True):
        m2 = getattr(gnn, name)(make(), **kwargs)
        m2.load_state_dict(old, assign=assign)
        _assert_contiguous_bases(m2, f"load_state_dict(assign={assign})")
        assert all(torch.equal(b, old[k]) for k, b in _bases(m2).items())
        assert torch.equal(m2.weight, m.weight)
    # deepcopy and unpickling, of a module pickled by an earlier geofunc
    for k, b in _bases(m).items():
        owner, _, leaf = k.rpartition(".")
        m.get_submodule(owner)._buffers[leaf] = _strided(b)
    W = m.weight.detach().clone()
    _assert_contiguous_bases(copy.deepcopy(m), "copy.deepcopy")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _assert_contiguous_bases(loaded, "torch.load of a whole module")
    assert torch.equal(loaded.weight, W)


def test_bases_of_a_class_registered_directly_on_a_float64_weight_are_contiguous():
    torch.manual_seed(0)
    for M in (gnn.Stiefel((5, 3)), gnn.PSD((4, 4)), gnn.LowRank((5, 4), 2)):  # float32 buffers, re-made in float64
        lin = nn.Linear(M.size[1], M.size[0]).double()
        with torch.no_grad():
            lin.weight.copy_(M.sample().double())
        P.register_parametrization(lin, "weight", M)
        _assert_contiguous_bases(lin, f"register_parametrization of {type(M).__name__} on a float64 weight")
        assert all(b.dtype == torch.float64 for b in _bases(lin).values())


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("case", CASES + _EXPORT_CASES[len(CASES):], ids=lambda c: f"{c[0]}-{c[1]}")
def test_bases_converted_from_a_geotorch_checkpoint_are_contiguous(case, assign):
    geotorch = pytest.importorskip("geotorch")
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    mg = getattr(geotorch, name)(make(), **kwargs)
    m = getattr(gnn, name)(make(), **kwargs)
    m.load_state_dict({k: v.detach().clone() for k, v in mg.state_dict().items()}, assign=assign)
    _assert_contiguous_bases(m, f"loading a GeoTorch checkpoint (assign={assign})")
    with torch.no_grad():
        torch.testing.assert_close(m.weight, mg.weight, atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", [(6, 3), (3, 5)])
@pytest.mark.parametrize("orthogonal_map", [None, "householder", "matrix_exp", "cayley"])
def test_a_checkpoint_of_torchs_own_orthogonal_is_not_loaded_as_another_weight(orthogonal_map, shape):
    """torch.nn.utils.parametrizations.orthogonal writes GeoTorch's layout for a non-square weight (raw
    n×k, base n×n), and its default map there, "householder", reads those entries otherwise: it was
    converted with GeoTorch's map and loaded silently as another weight (Note [Checkpoints of torch's
    own orthogonal]). It is refused, naming torch's parametrization; a "matrix_exp"/"cayley" one, which
    the checkpoint cannot tell apart, loads as the message says (its diagonal set to 0) with torch's weight."""
    from torch.nn.utils import parametrizations as TP

    torch.manual_seed(0)
    mt = nn.Linear(shape[1], shape[0])
    TP.orthogonal(mt, orthogonal_map=orthogonal_map)
    opt = torch.optim.SGD(mt.parameters(), lr=0.1)
    x = torch.randn(5, shape[1])
    for _ in range(3):
        opt.zero_grad()
        mt(x).square().sum().backward()
        opt.step()
    sd = {k: v.detach().clone() for k, v in mt.state_dict().items()}
    triv = "cayley" if orthogonal_map == "cayley" else "expm"
    m = gnn.orthogonal(nn.Linear(shape[1], shape[0]), "weight", triv=triv)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(gf.ManifoldError, match=r"torch\.nn\.utils\.parametrizations\.orthogonal.*householder"):
        m.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    if orthogonal_map in ("matrix_exp", "cayley"):
        sd["parametrizations.weight.original"].diagonal(dim1=-2, dim2=-1).zero_()
        m.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(m.weight, mt.weight, atol=2e-6, rtol=0)
    else:  # the way the message gives for a "householder" checkpoint
        with torch.no_grad():
            m.weight = mt.weight
            torch.testing.assert_close(m.weight, mt.weight, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- load_functional: all or nothing


def _refusals(m, raw, bases):
    """(what, raw, bases, a regex of the message) that load_functional must refuse; each holds a valid
    new raw tensor for every name first, so that a writer going in order would have written some."""
    new = {k: v.detach() + 0.01 for k, v in raw.items()}
    out = [
        ("an unknown name", {**new, "nope.weight": torch.zeros(2)}, bases, r"nope\.weight"),
        ("a wrong shape", {**new, "bias": torch.zeros(m.bias.numel() + 1)}, bases, r"bias.*shape"),
        ("a complex value", {**new, "bias": torch.zeros_like(m.bias, dtype=torch.complex64)}, bases, r"real .*for bias"),
        ("a base of an unknown tensor", new, {**bases, "bias": torch.zeros(3)}, r"'bias'"),
    ]
    if "weight" in bases:
        bad = torch.utils._pytree.tree_map(lambda b: None if b is None else 1.5 * b + 0.1, bases["weight"])
        out.append(("a base off its space", new, {**bases, "weight": bad}, r"weight.*base"))
        wrong = torch.utils._pytree.tree_map(lambda b: None if b is None else b[..., :1], bases["weight"])
        out.append(("a base of another shape", new, {**bases, "weight": wrong}, r"weight.*shape"))
    return out


@pytest.mark.parametrize("case", _EXPORT_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_load_functional_refuses_without_writing_anything(case):
    """A refusal of load_functional (a ManifoldError naming the tensor) leaves the module as it was:
    nothing is written before everything is checked (Note [Loading functional results])."""
    name, kwargs, make, _ = case
    torch.manual_seed(0)
    m = getattr(gnn, name)(make(), **kwargs)
    with torch.no_grad():
        m.parametrizations.weight.original.add_(0.05)
    C, raw, bases = gnn.functional(m)
    bases = {k: torch.utils._pytree.tree_map(lambda b: None if b is None else b.clone(), v) for k, v in bases.items()}
    before = _snapshot(m)
    for what, r, b, message in _refusals(m, raw, bases):
        with pytest.raises(gf.ManifoldError, match=message):
            gnn.load_functional(m, r, b)
        assert _same(before, _snapshot(m)), f"load_functional of {what} changed the module"
    # what it accepts: a rebased chart (new raw tensor and base) of another dtype, gives that point
    raw2, bases2 = gf.rebase(C, {k: raw[k].detach().double() for k in C}, torch.utils._pytree.tree_map(
        lambda b: None if b is None else b.double(), bases))
    raw2 = {**{k: v.detach() for k, v in raw.items()}, **raw2}
    W = gf.to_manifold(C, raw2, bases2)["weight"].float()  # the float64 results' point (raw.double() is
    gnn.load_functional(m, raw2, bases2)                     # read with float64's softplus floor there)
    torch.testing.assert_close(m.weight, W, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", _EXPORT_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_load_functional_across_dtypes_keeps_the_points(case):
    """Functional results of another dtype than the module's are written as load_state_dict writes a
    checkpoint of another dtype (Note [Loading functional results across dtypes]): the module shows the
    results' point to the rounding of the less precise dtype. Cast alone, float64 results moved a
    float32 softplus space's values by the floors' difference (3.4e-4), and float32 bases, orthonormal
    to float32's rounding, were refused by a float64 module."""
    name, kwargs, make, _ = case
    for src, dst, atol in ((torch.float64, torch.float32, 1e-5), (torch.float32, torch.float64, 2e-6)):
        torch.manual_seed(0)
        m = getattr(gnn, name)(make().to(src), **kwargs)
        C, raw, bases = gnn.functional(m)
        g = torch.Generator().manual_seed(1)
        raw = {k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=src) for k, v in raw.items()}
        raw2, bases2 = gf.rebase(C, {k: raw[k] for k in C}, bases)  # new bases too, where the space has them
        raw2 = {**raw, **raw2}
        W = gf.to_manifold(C, raw2, bases2)["weight"]
        torch.manual_seed(1)
        target = getattr(gnn, name)(make().to(dst), **kwargs)
        gnn.load_functional(target, raw2, bases2)
        with torch.no_grad():
            torch.testing.assert_close(target.weight.double(), W.double(), atol=atol * max(1.0, float(W.abs().max())),
                                       rtol=0, msg=lambda msg: f"{src} results into a {dst} module: {msg}")
            assert target.weight.dtype == dst
            assert member(gnn.parametrization_of(target).space, target.weight)


@pytest.mark.parametrize("case", CASES + [("sln", {}, lambda: nn.Linear(4, 4), gf.SL),
                                           ("alpha_stable", {}, lambda: nn.Linear(4, 4), gf.Hurwitz)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_one_liners_constrain_a_cpu_tensor_under_a_meta_default_device(case):
    """A CPU module constrained inside ``with torch.device("meta")`` (a model built for deferred
    initialization around a submodule kept on the CPU): the class was built on the meta device, and
    moving it to the tensor's raised "Cannot copy out of meta tensor" (torch's own parametrizations
    register there). The weight is on the CPU and on its space, as without the context."""
    name, kwargs, make, cls = case
    torch.manual_seed(0)
    m = make()
    with torch.device("meta"):
        getattr(gnn, name)(m, **kwargs)
    assert all(t.device.type == "cpu" for t in [*m.parameters(), *m.buffers()])
    W = m.weight.detach()
    assert W.device.type == "cpu" and member(gnn.parametrization_of(m).space, W)


def test_functions_that_return_their_module_keep_its_type():
    """The constraint functions, ``constrain``, ``update_base``, ``load_functional`` and ``average_``
    return the module they are given (the same object). Annotated ``-> nn.Module``, they made mypy and
    pyright (geofunc ships py.typed) refuse ``self.enc: nn.Linear = gf.nn.orthogonal(nn.Linear(8, 4))``
    and read ``.in_features`` of the result as ``Tensor | Module``. Each is typed as torch types
    ``weight_norm``: the module's own type in, the same type out (a TypeVar). And the same object."""
    import typing

    fns = [getattr(gnn, n) for n in ("symmetric", "skew", "sphere", "orthogonal", "grassmannian", "almost_orthogonal",
                                     "low_rank", "fixed_rank", "invertible", "sln", "positive_definite",
                                     "positive_semidefinite", "positive_semidefinite_low_rank",
                                     "positive_semidefinite_fixed_rank", "alpha_stable", "constrain", "update_base",
                                     "load_functional", "average_")]
    bad = []
    for fn in fns:
        hints = typing.get_type_hints(fn)
        first = next(iter(inspect.signature(fn).parameters))
        ret, arg = hints["return"], hints[first]
        if not (isinstance(ret, typing.TypeVar) and ret.__bound__ is nn.Module
                and (arg is ret or ret in typing.get_args(arg))):
            bad.append(f"{fn.__name__}({first}: {arg}) -> {ret}")
    assert not bad, "functions returning their module under another type:\n  " + "\n  ".join(bad)
    lin = nn.Linear(4, 3)
    assert gnn.orthogonal(lin) is lin and gnn.update_base(lin) is lin


@pytest.mark.parametrize("make", [lambda: gnn.orthogonal(nn.Linear(6, 6)), lambda: gnn.sphere(nn.Linear(5, 3)),
                                  lambda: gnn.low_rank(nn.Linear(6, 5), "weight", 2)], ids=["orthogonal", "sphere", "low_rank"])
def test_constrained_forwards_leave_no_reference_cycles(make):
    """A constrained forward and backward leave nothing for the cyclic collector: rebuilding the base
    through torch's pytree.tree_map left a cycle of 7 objects per forward (leaks probe)."""
    import gc

    m = make()
    x = torch.randn(2, m.in_features)
    m(x).sum().backward()
    collect_all_garbage()  # (a previous test's compiled graphs freed first)
    gc.disable()
    try:
        for _ in range(10):
            m(x).sum().backward()
            with torch.no_grad():
                m(x)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_cached_values_of_a_thread_go_with_the_thread():
    """Note [Cached values across threads]: with grad enabled each thread caches its own value; while one
    thread held a cached() block open, each new thread that read the weight and ran no backward left its
    entry (a value and its graph) until the block ended. They go when their thread ends."""
    import threading

    from torch.nn.utils import parametrize

    m = gnn.orthogonal(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    inside, leave = threading.Event(), threading.Event()

    def holder():
        with gnn.cached():
            inside.set()
            leave.wait()

    h = threading.Thread(target=holder)
    h.start()
    try:
        inside.wait()
        for _ in range(6):
            t = threading.Thread(target=lambda: m(x))
            t.start()
            t.join()
        assert len(parametrize._cache) == 0
    finally:
        leave.set()
        h.join()


@pytest.mark.parametrize("case", CASES + [("sln", {}, lambda: nn.Linear(4, 4), gf.SL),
                                           ("alpha_stable", {}, lambda: nn.Linear(4, 4), gf.Hurwitz),
                                           ("constrain", {"tensor_name": "weight", "space": gf.SO()}, lambda: nn.Linear(4, 4), gf.SO)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_assigned_under_fake_tensor_mode(case):
    """An assignment to a constrained weight of a model built under ``FakeTensorMode`` has no values to
    check: only its shape is (as at registration, Note [Fake parameters]); a value check read a fake
    value (torch's DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    name, kwargs, make, _ = case
    torch.manual_seed(0)
    with FakeTensorMode():
        m = make()
        getattr(gnn, name)(m, **kwargs)
        W = m.weight.detach().clone()
        m.weight = W
        assert isinstance(m.weight, FakeTensor) and m.weight.shape == W.shape


def test_cached_values_follow_a_fused_step_of_a_later_param_group():
    """The constrained weight in the second parameter group of a fused optimizer: its cached no_grad value
    follows the step too (Note [Fused optimizer steps in a cached block]: every fused group is bumped)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), gnn.orthogonal(nn.Linear(4, 4), "weight"))
    opt = torch.optim.Adam([{"params": net[0].parameters()}, {"params": net[1].parameters(), "lr": 0.1}],
                           lr=0.01, fused=True)
    x = torch.randn(8, 4)
    with gnn.cached():
        _assert_cached_read_follows(net[1], lambda: (net(x).pow(2).sum().backward(), opt.step()))


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.RMSprop(p, lr=0.1),
    lambda p: torch.optim.Rprop(p, lr=0.1),
    lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=2),
], ids=["RMSprop", "Rprop", "LBFGS"])
def test_cached_values_follow_a_step_of_an_optimizer_without_a_fused_option(make):
    """A step of an optimizer whose groups have no ``fused`` entry (RMSprop, Rprop, LBFGS, a user's
    torch.optim.Optimizer) inside ``cached()``: the step post-hook passes it by, and the value read after
    it is the new weight."""
    torch.manual_seed(0)
    layer = gnn.orthogonal(nn.Linear(4, 4), "weight")
    opt = make(layer.parameters())
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = layer(x).pow(2).sum()
        loss.backward()
        return loss

    with gnn.cached():
        _assert_cached_read_follows(layer, lambda: opt.step(closure))


def _on_orthogonal(seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    return Q * torch.sign(torch.linalg.det(Q))  # det +1: a point of SO too


@pytest.mark.parametrize("how", ["transfer", "register"])
@pytest.mark.parametrize("constraint", [gnn.orthogonal, gnn.positive_definite, lambda m: gnn.constrain(m, "weight", gf.SO())],
                         ids=["orthogonal", "positive_definite", "constrain_SO"])
def test_a_registered_parametrization_refuses_a_second_tensor(constraint, how):
    """One adapter holds one tensor's base. torch's transfer_parametrizations_and_params (geofunc.nn.parametrize
    re-exports it) registers the source's adapter itself on the target: its right_inverse re-centred the shared
    base at the target's weight and the source's weight moved, silently (orthogonal 5×5: 1.8 off), as did
    register_parametrization(other, "weight", layer.parametrizations.weight[0]). Both now raise ManifoldError
    and leave both modules as they were (Note [One adapter, one tensor])."""
    torch.manual_seed(0)
    src = nn.Linear(5, 5)
    constraint(src)
    want = src.weight.detach().clone()
    dst = nn.Linear(5, 5)
    point = _on_orthogonal(1)
    if constraint is gnn.positive_definite:
        point = point @ torch.diag(torch.linspace(1.0, 2.0, 5)) @ point.T
    with torch.no_grad():
        dst.weight.copy_(point)  # a point of every space above: the silent case
    with pytest.raises(gf.ManifoldError, match="already registered on another"):
        if how == "transfer":
            gnn.parametrize.transfer_parametrizations_and_params(src, dst)
        else:
            P.register_parametrization(dst, "weight", src.parametrizations.weight[0])
    torch.testing.assert_close(src.weight.detach(), want, atol=0, rtol=0)
    assert not P.is_parametrized(dst)
    torch.testing.assert_close(dst.weight.detach(), point, atol=0, rtol=0)
    # what works: a copy of the module, or the target's own constraint and the source's state_dict
    torch.testing.assert_close(copy.deepcopy(src).weight.detach(), want, atol=0, rtol=0)
    constraint(dst)
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst.weight.detach(), want, atol=0, rtol=0)
    torch.testing.assert_close(src.weight.detach(), want, atol=0, rtol=0)


def test_a_parametrization_whose_module_is_gone_registers_again():
    """An adapter whose chain was freed (its module deleted) is not registered anywhere: it may be registered anew."""
    src = nn.Linear(4, 4)
    gnn.orthogonal(src)
    M = src.parametrizations.weight[0]
    del src
    collect_all_garbage()
    dst = nn.Linear(4, 4)
    with torch.no_grad():
        dst.weight.copy_(torch.eye(4))
    P.register_parametrization(dst, "weight", M)
    torch.testing.assert_close(dst.weight.detach(), torch.eye(4), atol=1e-6, rtol=0)


def test_a_shallow_copy_of_a_constrained_module():
    # copy.copy raised "TypeError: _reconstruct() takes from 4 to 7 positional arguments but 8 were given"
    # (the module's reduction has a state setter, which the copy module does not take): Note [Shallow
    # copies of constrained modules]. It is nn.Module's shallow copy: the raw tensor and base are shared.
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(5, 4)
    cp = copy.copy(net[0])
    assert cp is not net[0] and type(cp) is not type(net[0]) and isinstance(cp, nn.Linear)
    assert torch.equal(cp(x), net[0](x))
    assert cp.parametrizations.weight.original is net[0].parametrizations.weight.original
    cp.weight = torch.eye(6, 4)  # shared, as nn.Module's shallow copy shares its parameters
    assert torch.equal(net[0].weight, torch.eye(6, 4))
    with pytest.raises(gf.ManifoldError):
        cp.weight = 2 * torch.eye(6, 4)
    rnn = nn.GRU(4, 6)
    gnn.orthogonal(rnn, "weight_hh_l0")
    y = torch.randn(3, 2, 4)
    torch.testing.assert_close(copy.copy(rnn)(y)[0], rnn(y)[0], atol=0, rtol=0)


@pytest.mark.parametrize("start_lower", [True, False])
def test_assigning_so_lower_keeps_the_functional_bridge_consistent(start_lower):
    """GeoTorch's SO reads ``self.lower`` in its map (geofunc.nn's too); whether the raw tensor is the
    space's own was fixed at construction, so after ``M.lower = False`` ``gf.nn.functional`` gave the
    other triangle's weight, silently (Note [SO's lower assigned after construction])."""
    torch.manual_seed(0)
    M = gnn.SO((4, 4), lower=start_lower)
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(M.sample())
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", M)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(4, 4))
    M.lower = not start_lower
    W = layer.weight.detach()
    if M.lower:  # the raw tensor is the space's: the bridge computes the module's weight
        constraints, raw, bases = gnn.functional(layer)
        torch.testing.assert_close(gf.to_manifold(constraints, raw, bases)["weight"], W, atol=1e-6, rtol=0)
    else:  # the upper triangle: refused, as for a class built with lower=False
        with pytest.raises(gf.ManifoldError, match="lower=True for the functional bridge"):
            gnn.functional(layer)
