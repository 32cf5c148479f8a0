"""Entries of one space, shape and dtype mapped as one batch (Note [Stacked entries] in geofunc/_pytree.py):
the optimizers' steps equal the per-entry maps' (bit for bit for Stiefel's embedded metric, Sphere and
unconstrained entries; within 1e-12 in float64 where a batched kernel rounds otherwise), errors still name
the parameter, and what the stacked path does not take steps as before."""

from __future__ import annotations

import optree
import pytest
import torch

import geofunc as gf
from geofunc import _pytree

F32, F64 = torch.float32, torch.float64

OPTIMIZERS = {
    "radam": lambda c: gf.optim.radam(c, lr=0.05),
    "radam-amsgrad": lambda c: gf.optim.radam(c, lr=0.05, betas=(0.8, 0.9), eps=1e-6, amsgrad=True),
    "radamw": lambda c: gf.optim.radamw(c, lr=0.05, weight_decay=0.1),
    "rsgd": lambda c: gf.optim.rsgd(c, lr=0.05),
    "rsgd-nesterov": lambda c: gf.optim.rsgd(c, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "radam-tensor-lr": lambda c: gf.optim.radam(c, lr=torch.tensor(0.05, dtype=F64)),
    "radam-clip": lambda c: gf.optim.retract_and_transport(c, gf.optim.chain(
        gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 0.1), gf.optim.scale_by_adam(c), gf.optim.scale(-0.05))),
}

#: name prefix -> (space, shape, dtype); several entries of each, so that they stack
KINDS = {
    "st": (gf.Stiefel(), (6, 2), F64),
    "stb": (gf.Stiefel(), (2, 5, 3), F32),  # a batch of frames per entry
    "sp": (gf.Sphere(), (8,), F32),
    "spm": (gf.Sphere(), (3, 4), F64),  # rows
    "so": (gf.SO(), (3, 3), F64),
    "sof": (gf.SO(), (4, 4), F32),
    "sc": (gf.Stiefel(metric="canonical"), (5, 2), F32),
    "scd": (gf.Stiefel(metric="canonical"), (5, 2), F64),
    "gr": (gf.Grassmannian(), (6, 2), F64),
    "grw": (gf.Grassmannian(), (2, 5), F32),  # wide: transposed in and out
    "grb": (gf.Grassmannian(), (2, 5, 3), F64),
    "ob": (gf.Oblique(), (4, 3), F32),
    "obw": (gf.Oblique(), (2, 5), F64),  # wide: no transposition
}
#: bit for bit (the others: SO's retraction, a matrix exponential of the batch's degree, and the canonical
#: metric's differ in the last bits)
EXACT = ("st", "stb", "sp", "spm", "gr", "grw", "grb", "ob", "obw", "b", "gain", "w", "single")


def _tree(n: int = 4, extra: dict | None = None):
    g = torch.Generator().manual_seed(0)
    constraints, params = {}, {}
    for i in range(n):
        for k, (space, shape, dt) in KINDS.items():
            constraints[f"{k}{i}"] = space
            params[f"{k}{i}"] = space.sample(shape, generator=g, dtype=dt)
        params[f"b{i}"] = torch.randn(4, generator=g, dtype=F64 if i % 2 else F32)
    constraints["single"] = gf.Stiefel()  # a group of one
    params["single"] = gf.Stiefel().sample((7, 3), generator=g)
    params["gain"] = torch.randn((), generator=g)
    params["nested"] = {"w": torch.randn(3, generator=g, dtype=F64)}
    for k, (space, value) in (extra or {}).items():
        params[k] = value
        if space is not None:
            constraints[k] = space
    return constraints, params


def _run(make, constraints, params, stacked: bool, steps: int = 4, graph: bool = False):
    old = _pytree._stacked
    sizes = []

    def spy(leaves, cols, fn):
        out = old(leaves, cols, fn)
        sizes.append(len(out))
        return out

    _pytree._stacked = spy if stacked else (lambda leaves, cols, fn: {})
    try:
        opt = make(constraints)
        state = opt.init(params)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            grads = optree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype), params)
            if graph:
                grads = optree.tree_map(lambda t: t.requires_grad_(), grads)
            params, state = opt.update(grads, state, params)
    finally:
        _pytree._stacked = old
    return params, state, sizes


def _close(a, b, coupled: bool = False) -> None:
    """Bit for bit on EXACT's entries, else within 1e-12 (float64) / 1e-5 (float32); ``coupled``: a global norm
    couples every entry to the float32 SO entries' last bits (within 1e-6 then)."""
    pa, la, sa = optree.tree_flatten_with_path(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for path, x, y in zip(pa, la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        key = str(next((k for k in path if isinstance(k, str)), ""))
        if coupled:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6 if x.dtype == F64 else 1e-5)
        elif key.rstrip("0123456789") in EXACT:
            assert torch.equal(x, y), (path, (x - y).abs().max())
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12 if x.dtype == F64 else 1e-5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stacked_equals_per_entry(name):
    constraints, params = _tree()
    p1, s1, sizes = _run(OPTIMIZERS[name], constraints, params, stacked=True)
    p0, s0, _ = _run(OPTIMIZERS[name], constraints, params, stacked=False)
    _close(p1, p0, coupled=name == "radam-clip")
    _close(s1, s0, coupled=name == "radam-clip")
    assert any(sizes)  # entries were stacked (the comparison is not of the per-entry path with itself)


def test_torch_optimizer_stacks():
    constraints, params = _tree(3)
    del params["nested"]
    p0, _, _ = _run(OPTIMIZERS["radam"], constraints, params, stacked=False, steps=3)
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = gf.optim.TorchOptimizer(list(ps.items()), constraints, gf.optim.radam, lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _, p in sorted(ps.items()):  # the order of optree's flattening of a dict: sorted keys
            p.grad = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
        opt.step()
    _close({k: p.detach() for k, p in ps.items()}, p0)


@pytest.mark.parametrize("extra", ["bf16", "complex-free", "graph"])
def test_entries_outside_the_stacked_path(extra):
    """Half-precision entries, complex unconstrained ones and a step that builds a graph step as before."""
    add = {
        "bf16": {"h0": (gf.Stiefel(), gf.Stiefel().sample((6, 2), dtype=torch.bfloat16)),
                 "h1": (gf.Stiefel(), gf.Stiefel().sample((6, 2), dtype=torch.bfloat16))},
        "complex-free": {"c": (None, torch.randn(3, dtype=torch.complex64))},
        "graph": None,
    }[extra]
    constraints, params = _tree(2, add)
    p1, s1, sizes = _run(OPTIMIZERS["radam"], constraints, params, stacked=True, graph=extra == "graph")
    p0, s0, _ = _run(OPTIMIZERS["radam"], constraints, params, stacked=False, graph=extra == "graph")
    _close(p1, p0)
    _close(s1, s0)
    assert (not any(sizes)) if extra == "graph" else any(sizes)


def test_a_graph_is_not_stacked():
    """Points that need a graph are mapped one by one (the gradient flows to each as before)."""
    X = torch.stack([gf.Stiefel().sample((6, 2), dtype=F64) for _ in range(3)]).requires_grad_()
    V = torch.randn(3, 6, 2, dtype=F64)
    c = {str(i): gf.Stiefel() for i in range(3)}
    seen = []
    old = _pytree._stacked
    _pytree._stacked = lambda *a: seen.append(old(*a)) or seen[-1]
    try:
        out = gf.retract(c, {str(i): X[i] for i in range(3)}, {str(i): V[i] for i in range(3)})
    finally:
        _pytree._stacked = old
    assert seen == [{}]
    sum(o.sum() for o in out.values()).backward()
    assert X.grad is not None


def test_stacked_errors_name_the_parameter():
    """A bad vector among entries of one shape is refused as before, naming its parameter."""
    constraints, params = _tree(3)
    grads = optree.tree_map(torch.zeros_like, params)
    grads["st1"] = torch.zeros(6, 3, dtype=F64)
    with pytest.raises(gf.ManifoldError, match="st1"):
        gf.retract(constraints, params, grads)
    with pytest.raises(gf.ManifoldError, match="st1"):
        gf.egrad_to_rgrad(constraints, params, grads)
    grads["st1"] = torch.zeros(6, 2, dtype=F32)  # another dtype: its own group of one
    with pytest.raises(gf.ManifoldError, match="st1"):
        gf.retract(constraints, params, grads)



@pytest.mark.parametrize("space, shape, m", [(gf.Sphere(), (), 3), (gf.SO(), (3,), 3), (gf.Stiefel(), (2,), 6)])
def test_entries_that_are_not_points_are_refused_though_their_stack_is_one(space, shape, m):
    """3 scalars on Sphere() stack to a (3,) vector, a point: each entry is still refused, naming it."""
    constraints = {f"p{i}": space for i in range(m)}
    params = {f"p{i}": torch.ones(shape, dtype=F64) for i in range(m)}
    grads = {k: torch.ones(shape, dtype=F64) for k in params}
    for f in (gf.retract, gf.egrad_to_rgrad):
        with pytest.raises(gf.ManifoldError, match="p0"):
            f(constraints, params, grads)
    with pytest.raises(gf.ManifoldError, match="p0"):
        gf.transport(constraints, params, params, grads)

def test_results_are_views_of_one_tensor_and_independent():
    """Stacked results share a storage; an in-place change of one entry's result leaves the others."""
    constraints, params = _tree(3)
    grads = optree.tree_map(torch.zeros_like, params)
    out = gf.retract(constraints, params, grads)
    before = out["st1"].clone()
    out["st0"].zero_()
    assert torch.equal(out["st1"], before)


@pytest.mark.parametrize("dtype,big", [(F32, 1e10), (F32, 1e30), (F64, 1e100)])
def test_a_diverged_entry_does_not_poison_its_batch(dtype, big):
    """One SO entry with a huge step (NaN itself) beside small ones: the others step as they do one by one
    (an expm of the batch: Note [Skips past the exponent range] in geofunc/_expm.py)."""
    g = torch.Generator().manual_seed(0)
    c = {f"w{i}": gf.SO() for i in range(4)}
    p = {k: gf.SO().sample((4, 4), generator=g, dtype=dtype) for k in c}
    v = {k: 0.1 * torch.randn(4, 4, generator=g, dtype=dtype) for k in c}
    v["w0"] = v["w0"].clone()
    v["w0"][0, 1] = big
    out = gf.retract(c, p, v)
    tol = 1e-5 if dtype == F32 else 1e-12
    for k in ("w1", "w2", "w3"):
        torch.testing.assert_close(out[k], gf.SO().retract(p[k], v[k]), rtol=0, atol=tol)


class _Scaled:
    """A configurable trivialization with value equality and so no hash (as an ``eq=True`` dataclass's)."""

    __hash__ = None

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __eq__(self, other):
        return isinstance(other, _Scaled) and other.scale == self.scale

    def __call__(self, A):
        assert A.ndim == 2, "a user's map of one matrix"
        return torch.linalg.matrix_exp(self.scale * A)


def test_a_user_triv_steps_one_by_one():
    """A space with a user's ``triv`` (here unhashable too, and written for one matrix) maps each entry by
    itself: the stacked path raised ``TypeError: unhashable type`` at the grouping."""
    space = gf.SO(triv=_Scaled(1.0))
    c = {f"w{i}": space for i in range(3)}
    g = torch.Generator().manual_seed(0)
    p = {k: gf.SO().sample((3, 3), generator=g, dtype=F64) for k in c}
    v = {k: 0.1 * torch.randn(3, 3, generator=g, dtype=F64) for k in c}
    out = gf.retract(c, p, v)
    for k in c:
        assert torch.equal(out[k], space.retract(p[k], v[k]))


def test_each_result_is_a_tensor_of_its_own():
    """Stacked results are cloned out of the group's tensor: one parameter's storage is its own (a
    torch.save of it wrote the whole group's), and an in-place change of one does not bump another's
    version counter (backward through it raised "modified by an inplace operation")."""
    g = torch.Generator().manual_seed(0)
    c = {f"w{i}": gf.Stiefel() for i in range(8)}
    p = {k: gf.Stiefel().sample((16, 4), generator=g, dtype=F64) for k in c}
    v = {k: 0.1 * torch.randn(16, 4, generator=g, dtype=F64) for k in c}
    out = gf.retract(c, p, v)
    a = out["w0"]
    assert a.untyped_storage().nbytes() == a.numel() * a.element_size()
    a = a.requires_grad_()
    loss = (a * a).sum()
    with torch.no_grad():
        out["w1"].mul_(2.0)
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * a.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("space, shape, stacks", [
    (gf.Stiefel(), (6, 2), True), (gf.Stiefel(), (256, 64), False), (gf.Sphere(), (8,), True),
    (gf.Sphere(), (65536,), False), (gf.SO(), (64, 64), True), (gf.SO(), (128, 128), False),
    (gf.Stiefel(), (512, 4, 2), True), (gf.Stiefel(), (1024, 4, 2), False),  # an entry's batch counts
])
def test_only_small_entries_stack(space, shape, stacks, monkeypatch):
    """Large entries map one by one: stacking them only adds copies (a group of 16 Stiefel 512x128 entries
    stepped 2x slower, Sphere(262144) 3.8x, with 2.4x the extra peak memory), and the values are the same."""
    g = torch.Generator().manual_seed(0)
    c = {f"w{i}": space for i in range(3)}
    p = {k: space.sample(shape, generator=g, dtype=F32) for k in c}
    v = {k: 1e-2 * torch.randn(shape, generator=g, dtype=F32) for k in c}
    seen = []
    old = _pytree._stacked
    monkeypatch.setattr(_pytree, "_stacked", lambda *a: seen.append(old(*a)) or seen[-1])
    with torch.no_grad():
        out = gf.retract(c, p, v)
    assert bool(seen[0]) is stacks
    for k in c:
        torch.testing.assert_close(out[k], space.retract(p[k], v[k]), rtol=2e-6, atol=2e-6)


def _maps_alone_and_stacked(c, p, v, w):
    """egrad_to_rgrad, Adam's squared norms, retract and transport of ``(p, v)`` (transport to ``w``): stacked,
    and with the stacking off (each entry alone); and the sizes of the stacked groups."""
    from geofunc.optim._transforms import _point_sq_norm

    def maps():
        return (gf.egrad_to_rgrad(c, p, v), _pytree.lift(c, _point_sq_norm, p, v, stack=True), gf.retract(c, p, v),
                gf.transport(c, p, w, v))

    old, sizes = _pytree._stacked, []
    _pytree._stacked = lambda *a: sizes.append(len(old(*a))) or old(*a)
    try:
        stacked = maps()
    finally:
        _pytree._stacked = old
    _pytree._stacked = lambda *a: {}
    try:
        alone = maps()
    finally:
        _pytree._stacked = old
    return stacked, alone, sizes


def _adversarial(space, dtype, complex_=False):
    """Points and vectors of one shape where most members are normal and some are degenerate: a step to zero
    (X + V = 0), a rank-one X + V, a nearly rank-deficient X + V, steps of extreme scales, a NaN and an inf."""
    g = torch.Generator().manual_seed(3)
    n, k = 6, 3
    big = 1e150 if dtype == F64 else 1e30
    tiny = 1e-150 if dtype == F64 else 1e-30
    p, v = {}, {}
    for i in range(12):
        X = space.sample((n, k), generator=g, dtype=dtype)
        V = 0.1 * torch.randn(n, k, generator=g, dtype=dtype)
        p[f"x{i}"], v[f"x{i}"] = X, V
    p = {key: (x.to(torch.complex128 if dtype == F64 else torch.complex64) if complex_ else x) for key, x in p.items()}
    v = {key: (x.to(p[key].dtype) if complex_ else x) for key, x in v.items()}
    X = p["x1"]
    v["x1"] = -X  # X + V = 0
    v["x2"] = -p["x2"] + torch.outer(torch.ones(n, dtype=dtype), torch.arange(1.0, k + 1, dtype=dtype)).to(X.dtype)
    eps = torch.finfo(dtype).eps
    v["x3"] = -p["x3"].clone()
    v["x3"][:, 0] += p["x3"][:, 1] + 30 * eps * p["x3"][:, 0]  # columns 0 and 1 of X + V nearly equal
    v["x3"][:, 1] += 0.0
    v["x4"] = big * v["x4"]
    v["x5"] = tiny * v["x5"]
    v["x6"] = v["x6"].clone()
    v["x6"][0, 0] = float("nan")
    v["x7"] = v["x7"].clone()
    v["x7"][1, 1] = float("inf")
    v["x8"] = -p["x8"].clone()  # one zero column of X + V (Oblique: e_1 there)
    v["x8"][:, 1:] = 0.0
    v["x9"] = 1e-4 * eps * v["x9"]  # a step below rounding
    return p, v


@pytest.mark.parametrize("space", [gf.Grassmannian(), gf.Oblique()], ids=["Grassmannian", "Oblique"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_newly_stacked_spaces_equal_each_entry_alone(space, dtype, complex_):
    """Grassmannian and Oblique entries mapped as one batch give each member's own result bit for bit (NaN where
    it is NaN alone), with degenerate members (a zero or rank-deficient step, extreme scales, NaN, inf) beside
    normal ones: CholeskyQR2's scale, trust check and Oblique's zero-column rule are per matrix or column."""
    p, v = _adversarial(space, dtype, complex_)
    c = {key: space for key in p}
    w = gf.retract(c, p, {key: 0.05 * torch.ones_like(x) for key, x in p.items()})
    stacked, alone, sizes = _maps_alone_and_stacked(c, p, v, w)
    assert sizes == [len(p)] * 4
    for i, (a, b) in enumerate(zip(stacked, alone)):
        for key in p:
            # the squared norms (i = 1) of a column-major vector (-X here: a frame's layout) are summed in another
            # order once torch.stack made them contiguous: within 2 ulp, as for the stacked Stiefel entries
            rtol = 2 * torch.finfo(dtype).eps if i == 1 else 0.0
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=0, equal_nan=True, msg=key)
            if key in ("x0", "x9", "x10", "x11"):
                assert a[key].isfinite().all()
    # the degenerate members are what they are alone: NaN for Grassmannian where X + V has no QR factor
    if isinstance(space, gf.Grassmannian):
        assert stacked[2]["x1"].isnan().all() and stacked[2]["x6"].isnan().all()
    else:
        assert stacked[2]["x8"][:, 1:].isfinite().all() and stacked[2]["x6"][:, 0].isnan().all()
