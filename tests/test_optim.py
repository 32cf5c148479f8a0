"""geofunc.optim: reference equality with torch.optim, toy problems, every optimizer x every space."""

from __future__ import annotations

import io
import re

import optree
import pytest
import torch
from cases import CASES
from helpers import COMPILE_PYTREES, TORCH_VERSION, needs_torch
from reference import member, on_spaces
from torch.func import grad, vmap

import geofunc as gf

F64 = torch.float64

#: Every optimizer under test: id -> factory(constraints) (small steps: the every-space test
#: feeds random gradients).
OPTIMIZERS = {
    "rsgd": lambda c: gf.optim.rsgd(c, lr=0.05),
    "rsgd-momentum": lambda c: gf.optim.rsgd(c, lr=0.05, momentum=0.9, nesterov=True),
    "radam": lambda c: gf.optim.radam(c, lr=0.05),
    "radamw": lambda c: gf.optim.radamw(c, lr=0.05, weight_decay=0.1),
    # the running maximum of the second moment (a fourth state field)
    "radam-amsgrad": lambda c: gf.optim.radam(c, lr=0.05, betas=(0.9, 0.6), amsgrad=True),
    # a schedule of the update count (in torch ops: it runs under vmap and torch.compile)
    "rsgd-schedule": lambda c: gf.optim.rsgd(c, lr=lambda n: 0.05 * torch.clamp((n + 1) / 3, max=1.0), momentum=0.9),
    # Adam after clipping the Riemannian gradient's global norm (0.1: the random gradients are clipped)
    "radam-clip": lambda c: gf.optim.retract_and_transport(c, gf.optim.chain(
        gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 0.1), gf.optim.scale_by_adam(c), gf.optim.scale(-0.05))),
    # skips non-finite steps (the tests' gradients are finite: it must then be radam itself)
    "radam-finite": lambda c: gf.optim.apply_if_finite(gf.optim.radam(c, lr=0.05), max_consecutive_errors=2),
    # no decay on the entry "b" (a callable mask: it fits every test's parameters)
    "radamw-masked": lambda c: gf.optim.radamw(c, lr=0.05, weight_decay=0.1, mask=lambda p: {k: k != "b" for k in p}),
    # parameter groups: clipped Adam on the constrained entries, momentum SGD on the free one
    "multi": lambda c: gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c), gf.optim.multi_transform(
        {"geo": gf.optim.chain(gf.optim.clip_by_global_norm(c, 0.1), gf.optim.scale_by_adam(c), gf.optim.scale(-0.05)),
         "free": gf.optim.chain(gf.optim.trace(0.9), gf.optim.scale(-0.05))},
        lambda p: {k: "free" if c.get(k) is None else "geo" for k in p}))),
}


def _warmup_cosine(count: torch.Tensor) -> torch.Tensor:
    """A multiplier from 1/3 up to 1 in three updates, then a cosine decay to 0 at update 12."""
    t = count.to(F64)
    return torch.where(t < 3, (t + 1) / 3, 0.5 * (1 + torch.cos(torch.pi * (t - 3).clamp(max=9) / 9)))


def _tree_close(a, b, tol: float) -> None:
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


# ------------------------------------------------------------------ references on R^n
def _euclidean_problem(generator):
    params = {"w": torch.randn(3, 4, generator=generator, dtype=F64), "b": torch.randn(5, generator=generator, dtype=F64)}
    A = torch.randn(4, 4, generator=generator, dtype=F64) / 4
    Q = A @ A.mT + torch.eye(4, dtype=F64)

    def loss(p):
        return 0.5 * torch.einsum("ij,jk,ik->", p["w"], Q, p["w"]) + torch.sin(p["b"]).sum() + 0.1 * (p["b"] ** 4).sum()

    return params, loss


def _run_against_torch(opt, torch_opt_cls, kwargs, generator, steps=25, lr_lambda=None):
    params, loss = _euclidean_problem(generator)
    state = opt.init(params)
    structure = optree.tree_structure(state)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch_opt_cls(list(ref.values()), **kwargs)
    scheduler = None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda t: float(lr_lambda(torch.tensor(t))))
    p = params
    for _ in range(steps):
        p, state = opt.update(grad(loss)(p), state, p)
        torch_opt.zero_grad()
        loss(ref).backward()
        torch_opt.step()
        if scheduler is not None:
            scheduler.step()
        _tree_close(p, {k: v.detach() for k, v in ref.items()}, 1e-12)
    assert optree.tree_structure(state) == structure


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
    ids=["plain", "momentum", "dampening-wd", "nesterov-wd"],
)
def test_rsgd_equals_torch_sgd(kwargs, generator):
    _run_against_torch(gf.optim.rsgd({}, **kwargs), torch.optim.SGD, kwargs, generator)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.05), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
     dict(lr=0.05, betas=(0.9, 0.6), amsgrad=True), dict(lr=0.02, betas=(0.8, 0.7), weight_decay=0.05, amsgrad=True)],
    ids=["default", "custom", "amsgrad", "amsgrad-wd"],
)
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "Rn"])
def test_radam_equals_torch_adam(kwargs, constrained, generator):
    # Under Rn every entry is its own point: the per-point second moment is elementwise.
    c = {"w": gf.Rn(), "b": gf.Rn()} if constrained else {}
    _run_against_torch(gf.optim.radam(c, **kwargs), torch.optim.Adam, kwargs, generator)
    if kwargs.get("amsgrad"):  # the problem is one where the running maximum matters
        with pytest.raises(AssertionError):
            _run_against_torch(gf.optim.radam(c, **kwargs), torch.optim.Adam, {**kwargs, "amsgrad": False}, generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_radam_first_moment_is_torch_adams_bit_for_bit(dtype, generator):
    """On an unconstrained entry the first moment is ``torch.optim.Adam``'s ``exp_avg`` bit for bit (its
    own op, ``lerp``; ``β₁ m + (1 − β₁) g`` rounded differently, ~1 ulp off after a few steps)."""
    g = [torch.randn(64, 33, generator=generator, dtype=dtype) for _ in range(6)]
    p = {"w": torch.randn(64, 33, generator=generator, dtype=dtype)}
    opt = gf.optim.radam({}, lr=0.01, betas=(0.9, 0.999))
    state = opt.init(p)
    ref = p["w"].clone().requires_grad_(True)
    torch_opt = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.999))
    for gt in g:
        p, state = opt.update({"w": gt}, state, p)
        ref.grad = gt.clone()
        torch_opt.step()
    mu = optree.tree_leaves(state, none_is_leaf=False)
    exp_avg = torch_opt.state[ref]["exp_avg"]
    assert any(t.shape == exp_avg.shape and torch.equal(t, exp_avg) for t in mu if isinstance(t, torch.Tensor))


def test_radam_steps_an_unconstrained_entry_with_a_sparse_gradient():
    """A sparse gradient of an unconstrained entry (nn.Embedding(sparse=True)) steps as its dense form: the first
    moment's lerp has no sparse kernel (radam raised NotImplementedError 'aten::lerp.Scalar ... SparseCPU')."""
    w = torch.randn(10, 4, dtype=torch.float64)
    idx = torch.tensor([[1, 2, 2]])
    g = torch.sparse_coo_tensor(idx, torch.randn(3, 4, dtype=torch.float64), (10, 4), check_invariants=True)
    for opt in (gf.optim.radam({}, lr=0.1), gf.optim.radam({"u": gf.Sphere()}, lr=0.1)):
        p = {"w": w, "u": gf.Sphere().sample((3,), dtype=torch.float64)}
        gu = torch.randn(3, dtype=torch.float64)
        out, _ = opt.update({"w": g, "u": gu}, opt.init(p), p)
        ref, _ = opt.update({"w": g.to_dense(), "u": gu}, opt.init(p), p)
        torch.testing.assert_close(out["w"].to_dense(), ref["w"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: gf.optim.rsgd({}, 0.1, momentum=0.9, weight_decay=0.1), lambda: gf.optim.radam({}, 0.1, weight_decay=0.1),
    lambda: gf.optim.apply_if_finite(gf.optim.radam({}, 0.1), 2),
    lambda: gf.optim.apply_if_finite(gf.optim.rsgd({}, 0.1, momentum=0.9, weight_decay=0.1), 2),
], ids=["rsgd-weight_decay", "radam-weight_decay", "apply_if_finite-radam", "apply_if_finite-rsgd"])
def test_weight_decay_and_apply_if_finite_take_a_sparse_gradient(make):
    """Note [Sparse gradients at free entries]: with weight decay, rsgd and radam raised torch's "add(sparse, dense)
    is not supported" on a sparse gradient, and apply_if_finite "Could not run 'aten::ne.Scalar' ... SparseCPU";
    each steps as with its dense form, and a non-finite sparse gradient is skipped as a dense one."""
    w = torch.randn(10, 4, dtype=F64)
    idx = torch.tensor([[1, 2, 2]])
    g = torch.sparse_coo_tensor(idx, torch.randn(3, 4, dtype=F64), (10, 4), check_invariants=True)
    nan = torch.sparse_coo_tensor(torch.tensor([[5]]), torch.tensor([[float("nan"), 0.0, 0.0, 0.0]], dtype=F64), (10, 4),
                                  check_invariants=True)
    skips = isinstance(make().init({"w": w}), gf.optim.ApplyIfFiniteState)
    for grads in ([g, g], [g, nan, g]) if skips else ([g, g],):
        out = []
        for dense in (False, True):
            opt = make()
            p = {"w": w}
            s = opt.init(p)
            for gi in grads:
                p, s = opt.update({"w": gi.to_dense() if dense else gi}, s, p)
            out.append(p["w"])
        assert out[0].layout is torch.strided and bool(torch.isfinite(out[0]).all())
        torch.testing.assert_close(out[0], out[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "name, torch_cls, args",
    [("rsgd", torch.optim.SGD, (0.1, 0.9, 0.0, 1e-4, True)),  # SGD(params, lr, momentum, dampening, weight_decay, nesterov)
     ("radam", torch.optim.Adam, (0.1, (0.9, 0.999), 1e-8, 0.0, True)),  # Adam(params, lr, betas, eps, weight_decay, amsgrad)
     ("radamw", torch.optim.AdamW, (0.1, (0.9, 0.999), 1e-8, 0.01, True))],
)
def test_a_call_ported_from_torch_by_position_is_refused(name, torch_cls, args, generator):
    """Past the arguments in torch.optim's (and geoopt's) positions the hyperparameters are
    keyword-only (Note [Keyword-only where torch's order differs]): ``rsgd(c, 0.1, 0.9, 0, 1e-4, True)``
    read torch's weight_decay as nesterov and its nesterov as weight_decay = 1.0 (1.5 off SGD after
    five steps), ``radam(..., 0, True)`` torch's amsgrad as the mask. The shared positions still work,
    and the same hyperparameters by keyword equal torch's optimizer."""
    torch_cls([torch.nn.Parameter(torch.ones(3))], *args)  # what the port starts from
    factory = getattr(gf.optim, name)
    with pytest.raises(TypeError):
        factory({}, *args)
    shared = args[:-2] if name == "rsgd" else args[:-1]
    factory({}, *shared)
    keywords = (dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True) if name == "rsgd"
                else dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=args[3], amsgrad=True))
    _run_against_torch(factory({}, **keywords), torch_cls, keywords, generator)


def test_amsgrad_refuses_a_state_without_its_maximum(generator):
    params, loss = _euclidean_problem(generator)
    state = gf.optim.radam({}, lr=0.1).init(params)
    with pytest.raises(ValueError, match=r"amsgrad=True\) expected a ScaleByAMSGradState .* got a ScaleByAdamState"):
        gf.optim.radam({}, lr=0.1, amsgrad=True).update(grad(loss)(params), state, params)


@pytest.mark.parametrize(
    "name, kwargs, torch_cls, expected",
    [
        ("radam", dict(lr=0.1, betas=(1.0, 0.999)), torch.optim.Adam, "0 <= β₁ < 1"),  # NaN after one step
        ("radam", dict(lr=0.1, betas=(0.9, 1.0)), torch.optim.Adam, "0 <= β₂ < 1"),  # every step silently 0
        ("radamw", dict(lr=0.1, betas=(-0.1, 0.9)), torch.optim.AdamW, "0 <= β₁ < 1"),
        ("radam", dict(lr=-0.1), torch.optim.Adam, "`lr` >= 0"),  # ascent
        ("radamw", dict(lr=0.1, eps=-1e-8), torch.optim.AdamW, "`eps` >= 0"),
        ("radam", dict(lr=0.1, weight_decay=float("nan")), torch.optim.Adam, "`weight_decay` >= 0"),
        ("rsgd", dict(lr=-0.1), torch.optim.SGD, "`lr` >= 0"),
        ("rsgd", dict(lr=0.1, momentum=-0.5), torch.optim.SGD, "`momentum` >= 0"),
        ("rsgd", dict(lr=0.1, nesterov=True), torch.optim.SGD, "`nesterov=True` with `momentum` > 0"),  # plain SGD, silently
        ("rsgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), torch.optim.SGD, "`dampening` = 0"),
    ],
)
def test_hyperparameters_are_checked_as_torch_does(name, kwargs, torch_cls, expected):
    """What ``torch.optim`` refuses at construction (a NaN point, a step silently 0, ascent, plain SGD
    where Nesterov was asked) is a ``ManifoldError`` naming the optimizer, the range and the value
    (Note [Checking hyperparameters])."""
    with pytest.raises(ValueError):
        torch_cls([torch.nn.Parameter(torch.ones(3))], **kwargs)
    with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected .*{re.escape(expected)}.*got "):
        getattr(gf.optim, name)({"w": gf.Sphere()}, **kwargs)
    with pytest.raises(gf.ManifoldError, match=r"^scale_by_adam: expected `betas` with 0 <= β₂ < 1"):
        gf.optim.scale_by_adam({}, 0.9, 1.0)


def test_hyperparameters_that_are_no_number_are_refused_at_construction():
    """A hyperparameter that is neither a number nor a tensor (nor, for ``lr``, a schedule) built an optimizer
    whose first update raised a bare TypeError ("bad operand type for unary -: 'str'", "unsupported operand
    type(s) for *: 'NoneType' and 'Tensor'"); a NumPy float32 below 0 passed unchecked (``lr=np.float32(-0.1)``
    ascended, silently) where the same float64 was refused; an int too large for a float raised OverflowError
    at the first update. Each is a ``ManifoldError`` at construction naming the optimizer."""
    import numpy as np

    for name, what in (("rsgd", "lr"), ("rsgd", "momentum"), ("rsgd", "weight_decay"), ("radam", "lr"),
                       ("radam", "eps"), ("radam", "weight_decay"), ("radamw", "lr"), ("radamw", "eps")):
        kwargs = {"lr": 0.1}
        for bad in ("0.1", None, [0.1], 10**400):
            kwargs[what] = bad
            with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected `{what}` .*got "):
                getattr(gf.optim, name)({"w": gf.Sphere()}, **kwargs)
        kwargs[what] = np.float32(-0.1)
        with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected `{what}` >= 0"):
            getattr(gf.optim, name)({"w": gf.Sphere()}, **kwargs)
    for betas in (("0.9", 0.999), (0.9, None), (np.float32(1.0), 0.999)):
        with pytest.raises(gf.ManifoldError, match=r"^radam: expected `betas` "):
            gf.optim.radam({}, lr=0.1, betas=betas)
    # numbers of other types, tensors and schedules are taken
    p = {"w": torch.tensor([1.0, 0.0], dtype=F64)}
    for opt in (gf.optim.rsgd({"w": gf.Sphere()}, lr=np.float32(0.1), momentum=np.float64(0.5)),
                gf.optim.radam({"w": gf.Sphere()}, lr=torch.tensor(0.1), betas=(np.float32(0.9), 0.99), eps=np.int64(0)),
                gf.optim.rsgd({"w": gf.Sphere()}, lr=lambda n: 0.1 / (n + 1))):
        assert member(gf.Sphere(), opt.update({"w": torch.ones(2, dtype=F64)}, opt.init(p), p)[0]["w"])


def test_a_fraction_hyperparameter_steps_as_its_float():
    """Note [Numbers of any type]: a Fraction (a numbers.Real) passed the checks as its float and then raised
    "unsupported operand type(s) for *: 'Fraction' and 'Tensor'" at the first update, for every
    hyperparameter (through TorchOptimizer too, where torch.optim.Adam takes lr=Fraction(1, 20)). It steps
    as its float, bit for bit, as do a NumPy 0-dim array dampening and a schedule returning a Fraction."""
    import numpy as np
    from fractions import Fraction as Fr

    p = {"w": gf.Sphere().sample((3, 4), dtype=F64), "b": torch.tensor([0.5, -1.0], dtype=F64)}
    g = {"w": torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), "b": torch.ones(2, dtype=F64)}
    c = {"w": gf.Sphere()}

    def steps(opt):
        q, s = p, opt.init(p)
        for _ in range(3):
            q, s = opt.update(g, s, q)
        return q

    pairs = [
        (gf.optim.rsgd(c, Fr(1, 10), Fr(9, 10), Fr(1, 2), weight_decay=Fr(1, 100)), gf.optim.rsgd(c, 0.1, 0.9, 0.5, weight_decay=0.01)),
        (gf.optim.rsgd(c, Fr(1, 10), Fr(9, 10), np.array(0.5)), gf.optim.rsgd(c, 0.1, 0.9, 0.5)),
        (gf.optim.rsgd(c, Fr(1, 10), Fr(9, 10), nesterov=True), gf.optim.rsgd(c, 0.1, 0.9, nesterov=True)),
        (gf.optim.rsgd(c, lambda n: Fr(1, 10)), gf.optim.rsgd(c, 0.1)),
        (gf.optim.radam(c, Fr(1, 20), (Fr(9, 10), Fr(99, 100)), Fr(1, 10**8), Fr(1, 100), amsgrad=True),
         gf.optim.radam(c, 0.05, (0.9, 0.99), 1e-8, 0.01, amsgrad=True)),
        (gf.optim.radamw(c, Fr(1, 20), weight_decay=Fr(1, 10)), gf.optim.radamw(c, 0.05, weight_decay=0.1)),
        (gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, Fr(1, 2)),
                                                          gf.optim.add_decayed_weights(Fr(1, 10)), gf.optim.scale(Fr(-1, 10)))),
         gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 0.5),
                                                          gf.optim.add_decayed_weights(0.1), gf.optim.scale(-0.1)))),
    ]
    for ours, ref in pairs:
        for k, v in steps(ours).items():
            torch.testing.assert_close(v, steps(ref)[k], rtol=0, atol=0)
    # TorchOptimizer against torch.optim.Adam, which takes a Fraction lr (and a whole-model clip of a Fraction)
    ref = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=F64))
    adam = torch.optim.Adam([ref], lr=Fr(1, 20))
    model = torch.nn.Module()
    model.b = torch.nn.Parameter(ref.detach().clone())
    opt = gf.optim.TorchOptimizer(model.named_parameters(), {}, gf.optim.radam, lr=Fr(1, 20), clip_by_global_norm=Fr(1, 2))
    for _ in range(3):
        ref.grad, model.b.grad = torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)
        torch.nn.utils.clip_grad_norm_([ref], 0.5)
        adam.step()
        opt.step()
    torch.testing.assert_close(model.b.detach(), ref.detach(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("make, what", [
    (lambda v: gf.optim.rsgd({}, 0.1, momentum=0.9, dampening=v), "dampening"),
    (lambda v: gf.optim.trace(v), "decay"), (lambda v: gf.optim.trace(0.9, v), "dampening"),
    (lambda v: gf.optim.scale(v), "step"), (lambda v: gf.optim.add_decayed_weights(v), "weight_decay"),
], ids=["rsgd-dampening", "trace-decay", "trace-dampening", "scale", "add_decayed_weights"])
def test_a_value_that_is_no_real_number_is_refused_at_construction(make, what):
    """Note [Numbers of any type]: a dampening (or a transform's factor) that is no real number was taken and
    raised a bare TypeError at the first update (a Decimal, which torch.optim.SGD also takes and then fails on
    at its first step, a string, None), or a RuntimeError (a bool tensor), or dropped its imaginary part with a
    warning (a complex one); each is a ManifoldError at construction naming the value."""
    from decimal import Decimal

    for bad in (Decimal("0.5"), "0.5", None, 0.5 + 0j, torch.tensor(True), torch.tensor(0.5j), [0.5]):
        with pytest.raises(gf.ManifoldError, match=rf"expected `{what}` a real number or a real 0-dim tensor, got "):
            make(bad)
    b = torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9, dampening=Decimal("0.5"))
    b.grad = torch.ones(2)
    with pytest.raises(TypeError):
        sgd.step()
        sgd.step()


def test_a_numpy_zero_dim_array_lr_steps_as_its_number():
    """torch.optim.SGD, Adam and AdamW take lr=np.array(0.1) (a 0-dim array from np.load or a config); the
    range check read numbers and refused it ("expected `lr` a number, a 0-dim tensor or a schedule"), while
    a dampening or a schedule's value of that type was taken. It is read as its number (Note [Numbers of any
    type]): one below 0 is refused, one in range steps as the float, bit for bit (TorchOptimizer too)."""
    import numpy as np

    p = {"w": gf.Sphere().sample((3, 4), dtype=F64), "b": torch.tensor([0.5, -1.0], dtype=F64)}
    g = {"w": torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), "b": torch.ones(2, dtype=F64)}
    c = {"w": gf.Sphere()}
    for name, kwargs in (("rsgd", dict(momentum=np.array(0.9), weight_decay=np.array(0.01))), ("radam", dict(eps=np.array(1e-8))),
                         ("radamw", dict(weight_decay=np.array(0.1)))):
        ours = getattr(gf.optim, name)(c, np.array(0.05), **kwargs)
        ref = getattr(gf.optim, name)(c, 0.05, **{k: float(v) for k, v in kwargs.items()})
        a, b = ours.update(g, ours.init(p), p)[0], ref.update(g, ref.init(p), p)[0]
        for k in p:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected `lr` >= 0"):
            getattr(gf.optim, name)(c, np.array(-0.05))
    ref = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=F64))
    sgd = torch.optim.SGD([ref], lr=np.array(0.05), momentum=0.9)
    model = torch.nn.Module()
    model.b = torch.nn.Parameter(ref.detach().clone())
    opt = gf.optim.TorchOptimizer(model.named_parameters(), {}, gf.optim.rsgd, lr=np.array(0.05), momentum=0.9)
    for _ in range(3):
        ref.grad, model.b.grad = torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)
        sgd.step()
        opt.step()
    torch.testing.assert_close(model.b.detach(), ref.detach(), rtol=0, atol=1e-15)


def test_a_schedule_whose_value_is_no_real_scalar_is_refused():
    """A schedule's value was used as it came (Note [A schedule's value is checked]): ``lr(count)`` of shape
    (3,) multiplied every entry's step along its last dim, a rate per coordinate, without an error (the same
    tensor given as ``lr`` is refused); a complex rate dropped its imaginary part (0.1j: no step, with only a
    ComplexWarning); None raised "bad operand type for unary -". Each is now a ManifoldError naming the
    optimizer; numbers, 0-dim tensors of any real dtype and NumPy scalars still work."""
    import numpy as np

    p = {"b": torch.zeros(3, dtype=F64), "W": torch.zeros(2, 3, dtype=F64)}
    g = {"b": torch.ones(3, dtype=F64), "W": torch.ones(2, 3, dtype=F64)}
    bad = (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.1]), torch.tensor(0.1j), torch.tensor(True), None, "0.1",
           [0.1], 0.1j)
    for name in ("rsgd", "radam", "radamw"):
        for value in bad:
            opt = getattr(gf.optim, name)({}, lambda n, value=value: value)
            with pytest.raises(gf.ManifoldError, match=rf"^{name}: the value of the schedule `lr\(count\)`: expected a "
                                                       r"real number or a real 0-dim tensor, got "):
                opt.update(g, opt.init(p), p)
    for value in bad:
        opt = gf.optim.retract_and_transport({}, gf.optim.scale_by_schedule(lambda n, value=value: value))
        with pytest.raises(gf.ManifoldError, match=r"^scale_by_schedule: the value of `schedule\(count\)`: expected "):
            opt.update(g, opt.init(p), p)
    for value in (0.1, np.float32(0.1), np.array(0.1), torch.tensor(0.1), torch.tensor(0.1, dtype=F64), lambda n: 0.1 / (n + 1)):
        opt = gf.optim.rsgd({}, value if callable(value) else (lambda n, value=value: value))
        new, _ = opt.update(g, opt.init(p), p)
        torch.testing.assert_close(new["b"], torch.full((3,), -0.1, dtype=F64), atol=1e-7, rtol=0)


def test_an_optax_trace_call_is_refused():
    """optax's ``trace(decay, nesterov)`` ported as ``gf.optim.trace(0.9, True)`` was dampening 1 (torch's
    order, ``trace(decay, dampening, nesterov)``): the buffer took the first gradient only and then
    decayed, silently (three steps of a unit gradient moved by 0.1·(1 + 0.9 + 0.81) where Nesterov moves
    by 0.805). A bool dampening is a ``ManifoldError`` saying to pass ``nesterov`` by keyword."""
    with pytest.raises(gf.ManifoldError, match=r"^trace: expected `dampening` a number .* nesterov=True by keyword"):
        gf.optim.trace(0.9, True)
    with pytest.raises(gf.ManifoldError, match="nesterov=True by keyword"):
        gf.optim.rsgd({}, 0.1, 0.9, True)
    opt = gf.optim.retract_and_transport({}, gf.optim.chain(gf.optim.trace(0.9, nesterov=True), gf.optim.scale(-0.1)))
    p = {"b": torch.zeros(2, dtype=F64)}
    s = opt.init(p)
    for _ in range(3):
        p, s = opt.update({"b": torch.ones(2, dtype=F64)}, s, p)
    ref = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        ref.grad = torch.ones(2, dtype=F64)
        sgd.step()
    torch.testing.assert_close(p["b"], ref.detach(), atol=1e-15, rtol=0)


def test_trace_refuses_nesterov_without_momentum_or_with_dampening():
    """Note [Nesterov needs momentum]: torch.optim.SGD refuses nesterov=True with momentum 0 or a dampening
    (plain SGD, or not Nesterov's buffer), and so did rsgd; the building block trace(0, nesterov=True) was
    taken and stepped as plain SGD, silently. It refuses the values known at construction (numbers, NumPy
    0-dim arrays, CPU tensors that do not require grad), and takes a learned or traced decay at 0."""
    import numpy as np

    b = [torch.nn.Parameter(torch.ones(3))]
    for decay, dampening in [(0, 0.0), (0.0, 0.0), (np.float32(0.0), 0.0), (torch.tensor(0.0), 0.0), (-0.1, 0.0),
                             (0.9, 0.5), (0.9, np.array(0.5)), (torch.tensor(0.9), torch.tensor(0.5))]:
        with pytest.raises(ValueError, match="Nesterov momentum requires|Invalid momentum"):
            torch.optim.SGD(b, lr=0.1, momentum=decay, dampening=dampening, nesterov=True)
        with pytest.raises(gf.ManifoldError, match=r"^trace: expected `nesterov=True` with `decay` > 0 and `dampening` = 0 "
                                                   r"\(as torch.optim.SGD\), got decay="):
            gf.optim.trace(decay, dampening, nesterov=True)
    gf.optim.trace(0.0)  # no nesterov: no momentum, as SGD's momentum=0
    gf.optim.trace(0.9, 0.5)
    gf.optim.trace(torch.tensor(0.0, requires_grad=True), nesterov=True)  # (Note [Values known at construction])
    vmap(lambda mu: gf.optim.trace(mu, nesterov=True).init({"x": torch.ones(2)}).count)(torch.zeros(2))


@pytest.mark.parametrize("make, what", [(gf.optim.trace, "decay"), (gf.optim.add_decayed_weights, "weight_decay")],
                         ids=["trace", "add_decayed_weights"])
def test_a_building_block_refuses_a_negative_or_nan_value_as_its_optimizer(make, what):
    """Note [A building block checks its range]: rsgd (and torch.optim.SGD) refused momentum=-0.5, but the
    building block trace(-0.5) was taken and alternated the buffer's sign (three steps on gradients of 1: -0.225
    where a decay of 0.5 gives 0.175), and trace(nan) made a NaN point, silently; add_decayed_weights took a
    negative or NaN weight_decay that rsgd, radam and torch.optim refuse. A plain tensor's value is read as
    rsgd reads it; a learned one (requires grad) is not (central differences at 0 evaluate it below 0)."""
    for bad in (-0.5, float("nan"), -float("inf"), torch.tensor(-0.5, dtype=F64), torch.tensor(float("nan"))):
        with pytest.raises(gf.ManifoldError, match=rf"^{make.__name__}: expected `{what}` >= 0 .*, got "):
            make(bad)
    for ok in (0.0, 0.9, 1.5, torch.tensor(0.9, dtype=F64), torch.tensor(-1e-6, dtype=F64, requires_grad=True)):
        make(ok)
    vmap(lambda m: make(m).init({"x": torch.ones(2)}))(torch.tensor([-0.5, 0.5]))  # a batched value is not read


def test_trace_with_a_negative_decay_was_a_silent_step():
    """The silent result the range check stops: momentum -0.5 as the number it is."""
    c = {"w": None}
    opt = gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.trace(0.5), gf.optim.scale(-0.1)))
    p = {"w": torch.zeros(2, dtype=F64)}
    s = opt.init(p)
    for _ in range(3):
        p, s = opt.update({"w": torch.ones(2, dtype=F64)}, s, p)
    torch.testing.assert_close(p["w"], torch.full((2,), -0.1 * (1 + 1.5 + 1.75), dtype=F64), rtol=0, atol=1e-15)
    with pytest.raises(gf.ManifoldError, match=r"^trace: expected `decay` >= 0"):
        gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.trace(-0.5), gf.optim.scale(-0.1)))


def test_a_numpy_zero_momentum_steps_as_torch_sgd():
    """Note [Checking hyperparameters]: a number of another type is read as the float it is. trace took only a
    Python 0 for "no momentum", so rsgd(momentum=np.float32(0.0), dampening=0.5) made a buffer and stepped by
    (1 − τ)·g from its second step, where torch.optim.SGD (momentum != 0) steps by g; and nesterov=True with
    that momentum was taken where torch.optim.SGD refuses it."""
    import numpy as np

    def ours(momentum):
        p = {"b": torch.zeros(3, dtype=F64)}
        opt = gf.optim.rsgd({}, lr=0.1, momentum=momentum, dampening=0.5)
        s = opt.init(p)
        for _ in range(3):
            p, s = opt.update({"b": torch.ones(3, dtype=F64)}, s, p)
        return p["b"]

    b = torch.zeros(3, dtype=F64, requires_grad=True)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=np.float32(0.0), dampening=0.5)
    for _ in range(3):
        b.grad = torch.ones(3, dtype=F64)
        sgd.step()
    for momentum in (0.0, np.float32(0.0), np.float64(0.0), np.int64(0)):
        torch.testing.assert_close(ours(momentum), b.detach(), rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        torch.optim.SGD([b], lr=0.1, momentum=np.float32(0.0), nesterov=True)
    with pytest.raises(gf.ManifoldError, match=r"^rsgd: expected `nesterov=True` with `momentum` > 0"):
        gf.optim.rsgd({}, lr=0.1, momentum=np.float32(0.0), nesterov=True)


def test_nesterov_refuses_a_zero_momentum_or_a_dampening_whose_value_is_known():
    """Note [Values known at construction]: torch.optim.SGD reads a tensor momentum and dampening when it is
    built, so momentum=torch.tensor(0.) (or below 0) or a dampening != 0 (a tensor, a NumPy 0-dim array)
    with nesterov=True is its ValueError; rsgd read numbers only and took them (plain SGD, or Nesterov
    with a dampened buffer). A CPU tensor that does not require grad is read now, outside any trace."""
    import numpy as np

    b = torch.zeros(3, dtype=F64, requires_grad=True)
    for momentum, dampening in [(torch.tensor(0.0), 0.0), (torch.tensor(-0.0, dtype=F64), 0.0), (torch.tensor(0), 0.0),
                                (torch.tensor(-0.1), 0.0), (0.9, torch.tensor(0.5)), (torch.tensor(0.9), torch.tensor(0.5)),
                                (0.9, np.array(0.5))]:
        with pytest.raises(ValueError, match="Nesterov momentum requires|Invalid momentum"):
            torch.optim.SGD([b], lr=0.1, momentum=momentum, dampening=dampening, nesterov=True)
        with pytest.raises(gf.ManifoldError, match=r"^rsgd: expected (`nesterov=True` with `momentum` > 0 and `dampening` = 0"
                                                   r"|`momentum` >= 0)"):  # (-0.1: Note [Range checks read what is known])
            gf.optim.rsgd({}, lr=0.1, momentum=momentum, dampening=dampening, nesterov=True)
    for momentum, dampening in [(torch.tensor(0.9), torch.tensor(0.0)), (torch.tensor(0.9), np.array(0.0))]:
        torch.optim.SGD([b], lr=0.1, momentum=momentum, dampening=dampening, nesterov=True)
        gf.optim.rsgd({}, lr=0.1, momentum=momentum, dampening=dampening, nesterov=True)


def test_range_checks_read_a_tensor_whose_value_is_known():
    """Note [Range checks read what is known]: torch.optim reads a tensor lr, momentum, weight_decay, eps or β
    when it is built and refuses one out of range; the factories read numbers only, so lr=torch.tensor(-0.1)
    stepped uphill, momentum=torch.tensor(-0.1) was taken, a tensor β₁ of 1 (or the int tensor 1) gave a NaN
    point after one step and a tensor max_norm of -1 reversed every gradient, silently. A 0-dim CPU tensor is
    read now (one that requires grad too, as torch does); a NaN one is refused as a NaN number is."""
    b = [torch.nn.Parameter(torch.ones(3))]
    t = torch.tensor
    cases = [
        ("rsgd", dict(lr=t(-0.1)), torch.optim.SGD, "`lr` >= 0"),
        ("rsgd", dict(lr=t(-0.1, requires_grad=True)), torch.optim.SGD, "`lr` >= 0"),
        ("rsgd", dict(lr=0.1, momentum=t(-0.1)), torch.optim.SGD, "`momentum` >= 0"),
        ("rsgd", dict(lr=0.1, momentum=t(-0.1, dtype=F64)), torch.optim.SGD, "`momentum` >= 0"),
        ("rsgd", dict(lr=0.1, weight_decay=t(-1)), torch.optim.SGD, "`weight_decay` >= 0"),
        ("radam", dict(lr=t(float("nan"))), torch.optim.Adam, "`lr` >= 0"),
        ("radam", dict(lr=0.1, eps=t(-1e-8)), torch.optim.Adam, "`eps` >= 0"),
        ("radamw", dict(lr=0.1, weight_decay=t(-0.1)), torch.optim.AdamW, "`weight_decay` >= 0"),
        ("radam", dict(lr=0.1, betas=(t(1.0), t(0.999))), torch.optim.Adam, "0 <= β₁ < 1"),  # NaN after one step
        ("radam", dict(lr=0.1, betas=(t(1), t(0.999))), torch.optim.Adam, "0 <= β₁ < 1"),
        ("radamw", dict(lr=0.1, betas=(t(0.9), t(1.0, requires_grad=True))), torch.optim.AdamW, "0 <= β₂ < 1"),
        ("radamw", dict(lr=0.1, betas=(t(float("nan")), t(0.999))), torch.optim.AdamW, "0 <= β₁ < 1"),
    ]
    for name, kwargs, torch_cls, expected in cases:
        with pytest.raises(ValueError, match="Invalid"):
            torch_cls(b, **kwargs)
        with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected .*{re.escape(expected)}.*got .*tensor holding"):
            getattr(gf.optim, name)({"w": gf.Sphere()}, **kwargs)
    for bad in (t(-1.0), t(0.0), t(float("nan"))):
        with pytest.raises(gf.ManifoldError, match=r"^clip_by_global_norm: expected `max_norm` > 0 .*tensor holding"):
            gf.optim.clip_by_global_norm({}, bad)
    # in range: taken, and stepped as the number
    p, g = {"w": torch.tensor([1.0, 0.0], dtype=F64)}, {"w": torch.tensor([0.0, 1.0], dtype=F64)}
    d = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731  (the number's value exactly)
    for opt, ref in ((gf.optim.rsgd({"w": gf.Sphere()}, lr=d(0.1), momentum=d(0.5), weight_decay=d(0.0)),
                      gf.optim.rsgd({"w": gf.Sphere()}, lr=0.1, momentum=0.5)),
                     (gf.optim.radam({"w": gf.Sphere()}, lr=d(0.1), betas=(d(0.0), d(0.5)), eps=t(0)),
                      gf.optim.radam({"w": gf.Sphere()}, lr=0.1, betas=(0.0, 0.5), eps=0.0))):
        torch.testing.assert_close(opt.update(g, opt.init(p), p)[0]["w"], ref.update(g, ref.init(p), p)[0]["w"],
                                   rtol=0, atol=1e-15)


def test_range_checks_leave_a_tensor_whose_value_is_not_known():
    """What is not known at construction is not read (Note [Range checks read what is known]): a tensor off
    the CPU (here meta, standing for an accelerator: no device sync), one under vmap or torch.func.grad, and
    one given to a compiled function (fullgraph: no graph break) build as before; its range is the caller's."""
    p, g = {"x": torch.tensor([1.0, -2.0], dtype=F64)}, {"x": torch.tensor([0.5, 0.25], dtype=F64)}
    gf.optim.rsgd({}, lr=torch.tensor(-0.1, device="meta"), momentum=torch.tensor(-0.1, device="meta"))
    gf.optim.radam({}, lr=0.1, betas=(torch.tensor(1.0, device="meta"), 0.999))
    gf.optim.clip_by_global_norm({}, torch.tensor(-1.0, device="meta"))

    def run(lr):
        opt = gf.optim.radam({}, lr=lr, betas=(0.9, 0.99), weight_decay=lr)
        return opt.update(g, opt.init(p), p)[0]["x"].sum()

    lrs = torch.tensor([-0.1, 0.1], dtype=F64)
    torch.testing.assert_close(vmap(run)(lrs)[1], run(torch.tensor(0.1, dtype=F64)), rtol=1e-12, atol=0)
    grad(run)(torch.tensor(-0.1, dtype=F64))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(run, fullgraph=True, backend="eager")(torch.tensor(0.1, dtype=F64)),
                               run(torch.tensor(0.1, dtype=F64)), rtol=1e-12, atol=0)


def test_nesterov_takes_a_learned_or_traced_momentum_at_zero():
    """What is not known at construction is not read (Note [Values known at construction]): a momentum that
    requires grad (meta-learned from 0, its derivative the rule's), one under torch.func.grad or vmap, and
    one given to a compiled function (no graph break: fullgraph) build and step with nesterov."""
    x0, g = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 0.25], dtype=F64)

    def run(mu):
        opt = gf.optim.rsgd({}, lr=0.1, momentum=mu, nesterov=True)
        p, s = {"x": x0}, opt.init({"x": x0})
        for _ in range(3):
            p, s = opt.update({"x": g * p["x"]}, s, p)
        return p["x"].sum()

    mu = torch.tensor(0.0, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(run(mu), mu)
    assert d != 0
    torch.testing.assert_close(grad(run)(torch.tensor(0.0, dtype=F64)), d, rtol=1e-12, atol=0)
    torch.testing.assert_close(vmap(run)(torch.tensor([0.0, 0.5], dtype=F64))[0], run(mu).detach(), rtol=1e-12, atol=0)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(run, fullgraph=True, backend="eager")(torch.tensor(0.0, dtype=F64)),
                               run(mu).detach(), rtol=1e-12, atol=0)


def _rsgd_through_momenta_equals_sgd(momenta, dampening, generator):
    """``rsgd`` rebuilt at every step with the next momentum of ``momenta``, the state carried over, against
    ``torch.optim.SGD`` with that momentum set in its group, step for step; the count is of the steps with
    momentum ≠ 0."""
    params, loss = _euclidean_problem(generator)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch.optim.SGD(list(ref.values()), lr=0.05, momentum=momenta[0], dampening=dampening)
    p, state = params, gf.optim.rsgd({}, lr=0.05, momentum=momenta[0], dampening=dampening).init(params)
    for mu in momenta:
        p, state = gf.optim.rsgd({}, lr=0.05, momentum=mu, dampening=dampening).update(grad(loss)(p), state, p)
        torch_opt.param_groups[0]["momentum"] = mu
        torch_opt.zero_grad()
        loss(ref).backward()
        torch_opt.step()
        _tree_close(p, {k: v.detach() for k, v in ref.items()}, 1e-12)
    assert int(state[2].count) == sum(int(m != 0) for m in momenta)


@pytest.mark.parametrize("dampening", [0.0, 0.5, "tensor"])
def test_a_momentum_tensor_through_zero_equals_torch_sgd(dampening, generator):
    """A tensor momentum is compared with 0 by torch.optim.SGD at each step (``momentum != 0``); trace took the
    buffer's rule for every tensor, so with ``momentum=torch.tensor(0.)`` and dampening τ each step after the
    first was (1 − τ)·g where torch steps by g (0.45 off after four steps, silently). Note [A momentum tensor
    that may be zero]: rsgd rebuilt at every step with a tensor momentum that starts at 0, passes through 0
    and back, the state carried over: torch.optim.SGD with the same tensors, step for step, and the count is
    of the steps with momentum."""
    tau = torch.tensor(0.5, dtype=F64) if dampening == "tensor" else dampening
    momenta = [torch.tensor(m, dtype=F64) for m in (0.0, 0.0, 0.0, 0.9, 0.5, 0.0, 0.0, 0.3)]
    _rsgd_through_momenta_equals_sgd(momenta, tau, generator)


def test_a_momentum_tensor_is_differentiable_and_batched():
    """A tensor momentum selected by value (Note [A momentum tensor that may be zero]) still has a gradient
    (a meta-learned momentum) and runs under vmap over momenta, 0 among them: each as its own rsgd."""
    g1, g2 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 3.0], dtype=F64)

    def two_steps(mu):
        opt = gf.optim.rsgd({}, lr=0.1, momentum=mu, dampening=0.25)
        p = {"b": torch.zeros(2, dtype=F64)}
        s = opt.init(p)
        p, s = opt.update({"b": g1}, s, p)
        p, s = opt.update({"b": g2}, s, p)
        return p["b"]

    mus = torch.tensor([0.0, 0.5, 0.9], dtype=F64)
    batched = vmap(two_steps)(mus)
    for mu, row in zip(mus, batched):
        torch.testing.assert_close(row, two_steps(mu), rtol=0, atol=1e-15)
    torch.testing.assert_close(batched[0], -0.1 * (g1 + g2), rtol=0, atol=1e-15)  # momentum 0: plain SGD
    d = grad(lambda mu: two_steps(mu).sum())(torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(d, -0.1 * g1.sum(), rtol=0, atol=1e-15)  # b_2 = μ g1 + 0.75 g2


def test_a_tensor_hyperparameter_of_several_values_is_refused_at_construction():
    """``lr=torch.tensor([0.1, 0.2])`` (the message asks for a 0-dim tensor) was taken and broadcast into
    each entry's step: torch's size error at the first update, or a step of another shape; a (1,) one
    broadcast a 0-dim parameter's step to (1,). A 0-dim tensor is taken, unread (a learned step size;
    logically 0-dim under vmap)."""
    for name, what in (("rsgd", "lr"), ("rsgd", "momentum"), ("radam", "lr"), ("radam", "eps"), ("radamw", "lr")):
        for bad in (torch.tensor([0.1, 0.2]), torch.zeros(0), torch.tensor([0.1])):
            with pytest.raises(gf.ManifoldError,
                               match=rf"^{name}: expected `{what}` a number.*0-dim tensor.*, got a tensor of shape"):
                getattr(gf.optim, name)({"w": gf.Sphere()}, **{"lr": 0.1, what: bad})
        getattr(gf.optim, name)({"w": gf.Sphere()}, **{"lr": 0.1, what: torch.tensor(0.1)})


@pytest.mark.parametrize("make", [
    lambda t: gf.optim.radam({}, 0.1, betas=(t, 0.999)), lambda t: gf.optim.radam({}, 0.1, betas=(0.9, t)),
    lambda t: gf.optim.radamw({}, 0.1, betas=(t, 0.999)), lambda t: gf.optim.scale_by_adam({}, b1=t),
    lambda t: gf.optim.rsgd({}, 0.1, momentum=0.9, dampening=t), lambda t: gf.optim.trace(t),
    lambda t: gf.optim.trace(0.9, t), lambda t: gf.optim.scale(t), lambda t: gf.optim.add_decayed_weights(t),
], ids=["radam-b1", "radam-b2", "radamw-b1", "scale_by_adam-b1", "rsgd-dampening", "trace-decay", "trace-dampening",
        "scale", "add_decayed_weights"])
def test_every_tensor_hyperparameter_of_one_dim_or_more_is_refused(make):
    """Tensor betas (and dampening, and the transforms' factors) were not shape-checked: a (2,) beta gave
    each column of a (3, 2) parameter its own beta, silently, and a (1,) one made a 0-dim parameter's
    vector (1,). A 0-dim tensor is taken, unread."""
    for bad in (torch.tensor([0.5, 0.25], dtype=F64), torch.tensor([0.5], dtype=F64)):
        with pytest.raises(gf.ManifoldError, match=r"0-dim tensor.*got .*tensor of shape"):
            make(bad)
    make(torch.tensor(0.5, dtype=F64))



@pytest.mark.parametrize("name, what", [("rsgd", "lr"), ("rsgd", "momentum"), ("rsgd", "weight_decay"), ("radam", "lr"),
                                        ("radam", "eps"), ("radamw", "lr")])
def test_a_bool_or_complex_tensor_lr_is_refused_at_construction(name, what):
    """A complex 0-dim tensor lr was taken and its imaginary part dropped in the step, silently (lr=0.1j made
    no step at all); a bool one raised torch's negation error at the first update (at construction before
    the lr was read at each update). Refused at construction, naming it, as a bool or complex β is."""
    make = lambda **kw: getattr(gf.optim, name)({"w": gf.Sphere()}, **kw)  # noqa: E731
    for bad in (torch.tensor(True), torch.tensor(0.1j), torch.tensor(0.1 + 0j, dtype=torch.complex128)):
        with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected `{what}` a real number or a real 0-dim tensor"):
            make(**{"lr": 0.1, what: bad})
    make(**{"lr": 0.1, what: torch.tensor(0.1)})

@pytest.mark.parametrize("make, what", [
    (lambda v: gf.optim.rsgd({}, v), "lr"), (lambda v: gf.optim.radam({}, v), "lr"), (lambda v: gf.optim.radamw({}, v), "lr"),
    (lambda v: gf.optim.rsgd({}, 0.1, v), "momentum"), (lambda v: gf.optim.rsgd({}, 0.1, 0.9, v), "dampening"),
    (lambda v: gf.optim.rsgd({}, 0.1, weight_decay=v), "weight_decay"),
    (lambda v: gf.optim.radam({}, 0.1, weight_decay=v), "weight_decay"),
    (lambda v: gf.optim.radamw({}, 0.1, weight_decay=v), "weight_decay"),
    (lambda v: gf.optim.radam({}, 0.1, eps=v), "eps"), (lambda v: gf.optim.radam({}, 0.1, betas=(v, 0.999)), "betas"),
    (lambda v: gf.optim.radamw({}, 0.1, betas=(0.9, v)), "betas"), (lambda v: gf.optim.trace(v), "decay"),
    (lambda v: gf.optim.scale(v), "step"), (lambda v: gf.optim.add_decayed_weights(v), "weight_decay"),
    (lambda v: gf.optim.scale_by_adam({}, eps=v), "eps"),
], ids=["rsgd-lr", "radam-lr", "radamw-lr", "rsgd-momentum", "rsgd-dampening", "rsgd-weight_decay", "radam-weight_decay",
        "radamw-weight_decay", "radam-eps", "radam-b1", "radamw-b2", "trace", "scale", "add_decayed_weights",
        "scale_by_adam-eps"])
def test_a_python_bool_hyperparameter_is_refused_at_construction(make, what):
    """Note [A bool is no hyperparameter]: True passed every check as 1 and False as 0 (rsgd(weight_decay=True)
    decayed by 1.0, lr=True stepped by the whole gradient, trace(True) kept every gradient), silently, while
    NumPy's bool and a bool tensor were refused. Refused at construction, naming the hyperparameter."""
    for bad in (True, False):
        with pytest.raises(gf.ManifoldError, match=rf"expected `{what}` a "):
            make(bad)
    make(0.5)


def test_a_schedule_returning_a_bool_and_a_bool_in_a_torch_optimizer_group_are_refused():
    """Note [A bool is no hyperparameter]: a schedule's value True was a rate of 1, and TorchOptimizer's groups
    pass their hyperparameters to the factory, which refuses them now (torch.optim.SGD's weight_decay=True
    raised "Boolean alpha only supported for Boolean results" at its first step)."""
    opt = gf.optim.rsgd({}, lambda count: True)
    params = {"w": torch.ones(2, dtype=F64)}
    with pytest.raises(gf.ManifoldError, match=r"the value of the schedule `lr\(count\)`: expected a real number"):
        opt.update({"w": torch.ones(2, dtype=F64)}, opt.init(params), params)
    for kw in (dict(lr=True), dict(lr=0.1, weight_decay=True), dict(lr=0.1, momentum=True)):
        p = torch.nn.Parameter(torch.ones(2, dtype=F64))
        with pytest.raises(gf.ManifoldError, match=r"^rsgd: expected `(lr|weight_decay|momentum)` a real number .*\(a bool"):
            gf.optim.TorchOptimizer([("w", p)], {}, gf.optim.rsgd, **kw)
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = gf.optim.TorchOptimizer([("w", p)], {}, gf.optim.rsgd, lr=0.1)
    with pytest.raises(gf.ManifoldError, match=r"^rsgd: expected `weight_decay` a real number .*\(a bool"):
        opt.add_param_group({"params": [("v", torch.nn.Parameter(torch.ones(2, dtype=F64)))], "weight_decay": True})


@pytest.mark.parametrize("which", [0, 1])
def test_a_bool_or_complex_tensor_beta_is_refused_at_construction(which):
    """A bool tensor β (torch.optim.Adam refuses it) was taken and raised torch's "Subtraction ... with a bool
    tensor" at the first update; TorchOptimizer, which checks a tensor β as its number, took it too. Its dtype
    is metadata: refused at construction, as a (2,) β is."""
    for bad in (torch.tensor(False), torch.tensor(True), torch.tensor(0.5 + 0j)):
        betas = [0.9, 0.999]
        betas[which] = bad
        with pytest.raises(gf.ManifoldError, match=r"^radam: expected `betas` a pair of numbers or real 0-dim tensors"):
            gf.optim.radam({}, 0.1, betas=tuple(betas))
        model = torch.nn.Linear(2, 3)
        with pytest.raises(gf.ManifoldError, match=r"expected `betas`"):
            gf.optim.TorchOptimizer(model.named_parameters(), {}, gf.optim.radam, lr=0.1, betas=tuple(betas))
    gf.optim.radam({}, 0.1, betas=(torch.tensor(0.9), torch.tensor(0.999, dtype=F64)))


def test_tensor_and_scheduled_hyperparameters_are_not_checked_by_value(generator):
    """A schedule ``lr`` and tensor hyperparameters pass the checks (no ``bool()`` of a traced tensor):
    meta-gradients of a loss after three steps with respect to ``lr``, β₁ (``radam``) and the momentum
    (``rsgd``) under ``torch.func.grad`` equal central differences (float64)."""
    X0 = gf.Stiefel().sample((5, 2), generator=generator, dtype=F64)
    target = torch.randn(5, 2, generator=generator, dtype=F64)

    def after(hyper, name):
        lr, h = hyper[0], hyper[1]
        opt = (gf.optim.radam({"w": gf.Stiefel()}, lr=lr, betas=(h, 0.99)) if name == "radam"
               else gf.optim.rsgd({"w": gf.Stiefel()}, lr=lr, momentum=h, nesterov=True))
        p = {"w": X0}
        s = opt.init(p)
        for _ in range(3):
            p, s = opt.update(grad(lambda q: ((q["w"] - target) ** 2).sum())(p), s, p)
        return ((p["w"] - target) ** 2).sum()

    for name in ("radam", "rsgd"):
        hyper = torch.tensor([0.05, 0.8], dtype=F64)
        d = grad(after)(hyper, name)
        for i in range(2):
            e = torch.zeros(2, dtype=F64)
            e[i] = 1e-6
            fd = (after(hyper + e, name) - after(hyper - e, name)) / 2e-6
            torch.testing.assert_close(d[i], fd, atol=1e-6, rtol=1e-6)
    opt = gf.optim.rsgd({"w": gf.Stiefel()}, lr=lambda n: 0.1 * (n + 1).to(F64))
    assert member(gf.Stiefel(), opt.update({"w": target}, opt.init({"w": X0}), {"w": X0})[0]["w"])


@pytest.mark.parametrize("name", ["rsgd", "radam", "radamw"])
def test_a_tensor_lr_changed_in_place_is_read_at_the_next_update(name, generator):
    """A 0-dim tensor ``lr`` changed in place between updates (a hand-written decay, a scheduler that
    ``fill_``s a tensor rate so that a compiled update is not traced again) steps with its new value,
    as every other tensor hyperparameter does and as ``torch.optim`` reads a tensor ``lr``: it was
    negated once at construction and the change ignored, silently (Note [A tensor learning rate is
    read at each update])."""
    factory = getattr(gf.optim, name)
    kwargs = {"momentum": 0.9} if name == "rsgd" else {}
    c = {"w": gf.Sphere(), "b": None}
    p = {"w": gf.Sphere().sample((4,), generator=generator, dtype=F64),
         "b": torch.randn(3, generator=generator, dtype=F64)}
    g = {k: torch.randn(v.shape, generator=generator, dtype=F64) for k, v in p.items()}
    lr = torch.tensor(0.1, dtype=F64)
    opt = factory(c, lr=lr, **kwargs)
    q, s = opt.update(g, opt.init(p), p)
    lr.fill_(0.02)
    got, _ = opt.update(g, s, q)
    want, _ = factory(c, lr=0.02, **kwargs).update(g, s, q)  # the same state structure
    for k in p:
        torch.testing.assert_close(got[k], want[k], atol=0.0, rtol=0.0, msg=k)
    lr.zero_()  # a rate of 0: no step
    q2, _ = opt.update(g, s, q)
    for k in p:
        torch.testing.assert_close(q2[k], q[k], atol=1e-15, rtol=0.0, msg=k)


#: One tensor hyperparameter each, swept under ``vmap``: name -> optimizer of the value.
SWEEPS = {
    "rsgd-weight_decay": lambda h: gf.optim.rsgd({"w": gf.Sphere()}, lr=0.05, momentum=0.9, weight_decay=h),
    "rsgd-dampening": lambda h: gf.optim.rsgd({"w": gf.Sphere()}, lr=0.05, momentum=0.9, dampening=h),
    "radam-weight_decay": lambda h: gf.optim.radam({"w": gf.Stiefel()}, lr=0.05, weight_decay=h),
    "radamw-weight_decay": lambda h: gf.optim.radamw({"w": gf.PSD()}, lr=0.05, weight_decay=h),
    "radam-clip-max_norm": lambda h: gf.optim.retract_and_transport({"w": gf.Stiefel()}, gf.optim.chain(
        gf.optim.to_tangent({"w": gf.Stiefel()}), gf.optim.clip_by_global_norm({"w": gf.Stiefel()}, 0.05 + h),
        gf.optim.scale_by_adam({"w": gf.Stiefel()}), gf.optim.scale(-0.05))),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_a_hyperparameter_sweep_under_vmap_equals_the_loop(name, generator):
    """A tensor ``weight_decay``, ``dampening`` or clip ``max_norm`` (a sweep under ``vmap``, a compiled
    run) takes the general rule: they were compared with 0 in Python (``if weight_decay == 0.0``), which
    ``vmap`` refuses (data-dependent control flow) and ``torch.compile(fullgraph=True)`` cannot trace."""
    spaces = {"rsgd": (gf.Sphere(), (2, 4)), "radam": (gf.Stiefel(), (5, 2)), "radamw": (gf.PSD(), (3, 3))}
    space, shape = spaces[name.split("-")[0]]
    X0 = space.sample(shape, generator=generator, dtype=F64)
    target = torch.randn(X0.shape, generator=generator, dtype=F64)

    def run(h):
        opt = SWEEPS[name](h)
        p = {"w": X0}
        s = opt.init(p)
        for _ in range(3):
            p, s = opt.update(grad(lambda q: ((q["w"] - target) ** 2).sum())(p), s, p)
        return p["w"]

    values = torch.tensor([0.0, 0.1, 0.5], dtype=F64)
    swept = vmap(run)(values)
    for h, got in zip(values, swept):
        torch.testing.assert_close(got, run(h), atol=1e-12, rtol=0)
        torch.testing.assert_close(got, run(float(h)), atol=1e-12, rtol=0)  # the number takes its shortcut
    # one compile per transform that branched (on the sphere: a quick one); Dynamo tracing optree
    if name.startswith("rsgd") and TORCH_VERSION >= COMPILE_PYTREES:
        torch._dynamo.reset()
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(values[1]), swept[1], atol=1e-12, rtol=0)


def test_a_state_of_another_optimizer_is_a_manifold_error(generator):
    """An optimizer given another's state (radam's update with rsgd's, rsgd's with radam's, a chain of
    another length) raises a ``ManifoldError`` naming the expected state, not an AttributeError on a
    field (Note [Checking a state's type])."""
    params, loss = _euclidean_problem(generator)
    g = grad(loss)(params)
    c = {}
    for opt, other, expected in [
        (gf.optim.radam(c, lr=0.1), gf.optim.rsgd(c, lr=0.1, momentum=0.9), "scale_by_adam: expected its own state, a ScaleByAdamState"),
        (gf.optim.rsgd(c, lr=0.1, momentum=0.9), gf.optim.radam(c, lr=0.1), "trace: expected its own state, a TraceState"),
        (gf.optim.rsgd(c, lr=lambda n: 0.1), gf.optim.radam(c, lr=0.1), "trace: expected its own state"),
        (gf.optim.radam(c, lr=0.1), gf.optim.radam(c, lr=0.1, amsgrad=True).init(params)[2], "chain: expected its state, a tuple of 4"),
    ]:
        state = other if not hasattr(other, "init") else other.init(params)
        with pytest.raises(gf.ManifoldError, match=re.escape(expected)):
            opt.update(g, state, params)
    sched = gf.optim.scale_by_schedule(lambda n: 1.0)
    with pytest.raises(gf.ManifoldError, match="scale_by_schedule: expected its own state, a ScaleByScheduleState"):
        sched.update(g, gf.optim.EmptyState(), params)


@pytest.mark.parametrize("lr", [0.05, lambda n: 0.05 / (1 + n.to(F64))], ids=["number", "schedule"])
def test_a_state_of_rsgd_without_momentum_from_before_the_trace_still_steps(lr, generator):
    """``rsgd(momentum=0)``'s state used to be three transforms' (no ``TraceState``): such a state (a
    checkpoint of it) steps as the current one, with no momentum buffer held (Note [Momentum that may be zero])."""
    params, loss = _euclidean_problem(generator)
    opt = gf.optim.rsgd({}, lr=lr)
    new = opt.init(params)
    assert isinstance(new[2], gf.optim.TraceState) and new[2].trace == ()
    old = (new[0], new[1], new[3])
    p, q = params, params
    for _ in range(4):
        p, new = opt.update(grad(loss)(p), new, p)
        q, old = opt.update(grad(loss)(q), old, q)
    _tree_close(p, q, 0.0)
    assert optree.tree_structure(old) == optree.tree_structure(new) and new[2].trace == ()


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_momentum_through_zero_and_back_equals_torch_sgd(dampening, generator):
    """``rsgd`` rebuilt at every step with the momentum of a schedule that passes through 0 (and starts
    at 0), the state carried over: ``torch.optim.SGD`` with the same momentum set in its group, step for
    step (its buffer is made at the first step with momentum ≠ 0, as the gradient, and kept as it is at
    steps with momentum 0: Note [Momentum that may be zero]); on a sphere the kept buffer stays tangent."""
    momenta = [0.0, 0.0, 0.9, 0.5, 0.0, 0.0, 0.3, 0.9, 0.0, 0.7]
    _rsgd_through_momenta_equals_sgd(momenta, dampening, generator)
    c = {"x": gf.Sphere()}
    x = {"x": gf.Sphere().sample((4,), generator=generator, dtype=F64)}
    state = gf.optim.rsgd(c, lr=0.1).init(x)
    for mu in momenta:
        x, state = gf.optim.rsgd(c, lr=0.1, momentum=mu).update({"x": torch.randn(4, generator=generator, dtype=F64)}, state, x)
        buf = state[2].trace
        if buf != ():
            torch.testing.assert_close(buf["x"] @ x["x"], torch.zeros((), dtype=F64), atol=1e-12, rtol=0)
    assert member(gf.Sphere(), x["x"])


@pytest.mark.parametrize(
    "name, kwargs, torch_cls",
    [
        ("rsgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1), torch.optim.SGD),
        ("rsgd", dict(lr=0.05, momentum=0.8, dampening=0.3), torch.optim.SGD),
        ("radam", dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.05), torch.optim.Adam),
    ],
    ids=["rsgd-nesterov-wd", "rsgd-dampening", "radam"],
)
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "Rn"])
def test_a_schedule_equals_torch_lambda_lr(name, kwargs, torch_cls, constrained, generator):
    """``lr=schedule`` steps as ``torch.optim.lr_scheduler.LambdaLR`` does (``base * f(t)`` at the
    t-th update, t from 0): through the warm-up, the decay and the zero rate past its end."""
    c = {"w": gf.Rn(), "b": gf.Rn()} if constrained else {}
    base = kwargs["lr"]
    opt = getattr(gf.optim, name)(c, **{**kwargs, "lr": lambda n: base * _warmup_cosine(n)})
    _run_against_torch(opt, torch_cls, kwargs, generator, steps=15, lr_lambda=_warmup_cosine)


@pytest.mark.parametrize("name", ["rsgd", "radam"])
def test_a_schedule_on_a_space_equals_a_rate_set_per_step(name, generator):
    """On constrained entries, update t of ``lr=schedule`` equals the update of the optimizer built
    with the number ``schedule(t)`` from the same state (momentum or moments carried over): the
    schedule only sets the step length."""
    c = {"q": gf.SO(), "f": gf.Stiefel(), "s": gf.Sphere(), "b": None}
    params = gf.sample(c, {"q": torch.empty(3, 3, dtype=F64), "f": torch.empty(5, 2, dtype=F64),
                           "s": torch.empty(4, dtype=F64), "b": torch.randn(2, dtype=F64, generator=generator)},
                       generator=generator)
    targets = {k: torch.randn(v.shape, dtype=F64, generator=generator) for k, v in params.items()}

    def loss(p):
        return sum(((p[k] - targets[k]) ** 2).sum() for k in p)

    def make(lr):
        return gf.optim.rsgd(c, lr=lr, momentum=0.9) if name == "rsgd" else gf.optim.radam(c, lr=lr)

    def sched(n):
        return 0.1 * _warmup_cosine(n)

    opt = make(sched)
    p = q = params
    state = opt.init(params)
    for t in range(14):
        assert int(state[-1].count) == t
        fixed = make(float(sched(torch.tensor(t))))
        # the same state, the schedule's count swapped for the fixed rate's empty state
        q, fixed_state = fixed.update(grad(loss)(p), state[:-1] + (fixed.init(p)[-1],), p)
        p, state = opt.update(grad(loss)(p), state, p)
        _tree_close(p, q, 1e-14)
        _tree_close(state[:-1], fixed_state[:-1], 1e-14)
    assert torch.equal(p["q"], q["q"]) and float(sched(torch.tensor(13))) == 0.0
    assert all(member(c[k], p[k]) for k in ("q", "f", "s"))  # the independent predicates


@pytest.mark.parametrize("lr", [0.05, torch.tensor(0.05, dtype=F64)], ids=["float", "tensor"])
def test_a_constant_schedule_equals_its_number(lr, generator):
    c = {"f": gf.Stiefel()}
    params = gf.sample(c, {"f": torch.empty(5, 2, dtype=F64)}, generator=generator)
    g = {"f": torch.randn(5, 2, dtype=F64, generator=generator)}
    for make in (gf.optim.rsgd, gf.optim.radam):
        a, b = make(c, lr=lr), make(c, lr=lambda n: lr)
        pa, _ = a.update(g, a.init(params), params)
        pb, _ = b.update(g, b.init(params), params)
        assert torch.equal(pa["f"], pb["f"])


@pytest.mark.parametrize("name", ["rsgd", "radam"])
def test_clip_by_global_norm_equals_torch_clip_grad_norm(name, generator):
    """On unconstrained entries, ``clip_by_global_norm`` then the rule is ``clip_grad_norm_`` then
    ``torch.optim``'s step, step for step; ``max_norm`` sits inside the range of the gradient norms,
    so some steps are clipped and some are not."""
    params, loss = _euclidean_problem(generator)
    max_norm = 3.0
    tail = ([gf.optim.trace(0.9, nesterov=True), gf.optim.scale(-0.02)] if name == "rsgd"
            else [gf.optim.scale_by_adam({}), gf.optim.scale(-0.05)])
    opt = gf.optim.retract_and_transport({}, gf.optim.chain(gf.optim.clip_by_global_norm({}, max_norm), *tail))
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = (torch.optim.SGD(list(ref.values()), lr=0.02, momentum=0.9, nesterov=True) if name == "rsgd"
                 else torch.optim.Adam(list(ref.values()), lr=0.05))
    p, state, norms = params, opt.init(params), []
    for _ in range(25):
        p, state = opt.update(grad(loss)(p), state, p)
        torch_opt.zero_grad()
        loss(ref).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm)))
        torch_opt.step()
        _tree_close(p, {k: v.detach() for k, v in ref.items()}, 1e-12)
    assert min(norms) < max_norm < max(norms), norms


def test_clip_by_global_norm_uses_each_space_metric(generator):
    """The global norm is the Riemannian one: Σ inner(X, g, g) over entries and points (the
    Poincaré ball's and Birkhoff's metrics are not Euclidean), plus ‖g‖² on free entries; above
    ``max_norm`` every vector is scaled by the one factor max_norm / (‖g‖ + 1e-6), below it nothing
    changes (bit for bit)."""
    c = {"s": gf.Sphere(), "h": gf.PoincareBall(), "d": gf.Birkhoff(), "f": gf.Stiefel(), "b": None}
    shapes = {"s": (3, 4), "h": (2, 3), "d": (3, 3), "f": (5, 2), "b": (4,)}
    params = gf.sample(c, {k: torch.empty(v, dtype=F64) for k, v in shapes.items()}, generator=generator)
    params["h"] = params["h"] * 0.9  # well inside the ball: the metric's factor is far from 1
    G = {k: torch.randn(v, dtype=F64, generator=generator) for k, v in shapes.items()}
    tangent = gf.optim.to_tangent(c)
    g, _ = tangent.update(G, tangent.init(params), params)
    total = sum(c[k].inner(params[k], g[k], g[k]).sum() for k in "shdf") + (g["b"] ** 2).sum()
    euclid = sum((v ** 2).sum() for v in g.values())
    # the metric matters here: a Euclidean global norm would miss max_norm by far more than the tolerance
    assert abs(float(total.sqrt() - euclid.sqrt())) > 1e-2 * float(total.sqrt())
    for max_norm in (0.5 * float(total.sqrt()), 2.0 * float(total.sqrt())):
        clip = gf.optim.clip_by_global_norm(c, max_norm)
        out, _ = clip.update(g, clip.init(params), params)
        if max_norm < float(total.sqrt()):
            coef = max_norm / (float(total.sqrt()) + 1e-6)
            _tree_close(out, {k: coef * v for k, v in g.items()}, 1e-14)
            got = sum(c[k].inner(params[k], out[k], out[k]).sum() for k in "shdf") + (out["b"] ** 2).sum()
            torch.testing.assert_close(float(got.sqrt()), max_norm, atol=0, rtol=1e-6)
        else:
            assert all(torch.equal(out[k], g[k]) for k in g)


def test_clip_by_global_norm_refuses_a_bad_max_norm():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(gf.ManifoldError, match="max_norm"):
            gf.optim.clip_by_global_norm({}, bad)


def test_clip_by_global_norm_reads_a_number_of_any_type():
    """Note [Checking hyperparameters]: a number of another type is checked as the float it is. max_norm was
    checked only as a Python float or int, so a NumPy float32 (or 0-dim array) of -1 was taken and reversed
    every gradient (the update pointed uphill), silently; True clipped at 1 and a string failed at the first
    update with a bare TypeError. Each is refused at construction; a positive NumPy number clips as its float."""
    import numpy as np

    for bad in (np.float32(-1.0), np.float64(-1.0), np.int64(0), np.float32("nan"), np.array(-1.0), np.array([0.5]),
                True, "1.0", None, [1.0]):
        with pytest.raises(gf.ManifoldError, match=r"^clip_by_global_norm: expected `max_norm` > 0"):
            gf.optim.clip_by_global_norm({}, bad)
    p, g = {"b": torch.zeros(3, dtype=F64)}, {"b": torch.full((3,), 2.0, dtype=F64)}

    def clipped(max_norm):
        t = gf.optim.clip_by_global_norm({}, max_norm)
        return t.update(g, t.init(p), p)[0]["b"]

    torch.testing.assert_close(clipped(np.float32(0.5)), clipped(0.5), rtol=0, atol=0)
    torch.testing.assert_close(clipped(np.int64(1)), clipped(1.0), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.05), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)],
    ids=["default", "custom"],
)
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "Rn"])
@pytest.mark.parametrize("schedule", [False, True], ids=["rate", "schedule"])
def test_radamw_equals_torch_adamw(kwargs, constrained, schedule, generator):
    c = {"w": gf.Rn(), "b": gf.Rn()} if constrained else {}
    lr = (lambda n: kwargs["lr"] * _warmup_cosine(n)) if schedule else kwargs["lr"]
    _run_against_torch(gf.optim.radamw(c, **{**kwargs, "lr": lr}), torch.optim.AdamW, kwargs, generator,
                       steps=15, lr_lambda=_warmup_cosine if schedule else None)


@pytest.mark.parametrize("name, torch_cls, kwargs", [
    ("rsgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.2)),
    ("radam", torch.optim.Adam, dict(lr=0.02, weight_decay=0.3)),
    ("radamw", torch.optim.AdamW, dict(lr=0.02, weight_decay=0.3)),
])
@pytest.mark.parametrize("mask", ["tree", "callable", "prefix"])
def test_a_weight_decay_mask_equals_torch_parameter_groups(name, torch_cls, kwargs, mask, generator):
    """No decay on the bias, as ``torch.optim`` with two parameter groups (``weight_decay=0`` on the
    second), step for step; a prefix mask covers a whole subtree."""
    params, loss = _euclidean_problem(generator)
    params = {"layer": {"w": params["w"]}, "b": params["b"]}

    def nested_loss(p):
        return loss({"w": p["layer"]["w"], "b": p["b"]})

    m = {"tree": {"layer": {"w": True}, "b": False}, "callable": lambda p: {"layer": {"w": True}, "b": False},
         "prefix": {"layer": True, "b": False}}[mask]
    opt = getattr(gf.optim, name)({}, mask=m, **kwargs)
    w, b = (t.clone().requires_grad_(True) for t in (params["layer"]["w"], params["b"]))
    ref = torch_cls([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], **kwargs)
    p, state = params, opt.init(params)
    for _ in range(15):
        p, state = opt.update(grad(nested_loss)(p), state, p)
        ref.zero_grad()
        loss({"w": w, "b": b}).backward()
        ref.step()
        _tree_close(p, {"layer": {"w": w.detach()}, "b": b.detach()}, 1e-12)
    unmasked = getattr(gf.optim, name)({}, **kwargs)
    q, qs = params, unmasked.init(params)
    r, rs = params, opt.init(params)
    for _ in range(3):  # (Adam's first step is the gradient's sign: the same with and without the L2 term)
        q, qs = unmasked.update(grad(nested_loss)(q), qs, q)
        r, rs = opt.update(grad(nested_loss)(r), rs, r)
    assert not torch.allclose(q["b"], r["b"]) and torch.equal(q["layer"]["w"], r["layer"]["w"])


def _split_problem(generator):
    """A Stiefel, a Sphere and a free entry (float64) and a loss whose free part is large (so a
    global norm over every entry differs from one over the constrained entries)."""
    c = {"w": gf.Stiefel(), "v": gf.Sphere(), "b": None}
    params = gf.sample(c, {"w": torch.empty(5, 2, dtype=F64), "v": torch.empty(4, dtype=F64),
                           "b": torch.randn(3, dtype=F64, generator=generator)}, generator=generator)
    T = {k: torch.randn(v.shape, dtype=F64, generator=generator) for k, v in params.items()}

    def loss(p):
        return sum(((p[k] - T[k]) ** 2).sum() * (50.0 if k == "b" else 1.0) for k in p)

    return c, params, loss


def test_multi_transform_equals_separate_optimizers_per_label(generator):
    """Two labels, two optimizers: each label's entries move as that optimizer alone on them moves
    them, its global norm clipped over its own entries only (the free entry's large gradient would
    change the factor otherwise)."""
    c, params, loss = _split_problem(generator)

    def geo(cc):
        return gf.optim.chain(gf.optim.clip_by_global_norm(cc, 0.3), gf.optim.scale_by_adam(cc), gf.optim.scale(-0.05))

    def free():
        return gf.optim.chain(gf.optim.trace(0.9), gf.optim.scale(-0.01))

    opt = gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c), gf.optim.multi_transform(
        {"geo": geo(c), "free": free(), "unused": gf.optim.scale(0.0)}, {"w": "geo", "v": "geo", "b": "free"})))
    cg = {"w": c["w"], "v": c["v"]}
    opt_g = gf.optim.retract_and_transport(cg, gf.optim.chain(gf.optim.to_tangent(cg), geo(cg)))
    opt_f = gf.optim.retract_and_transport({}, free())
    p, state = params, opt.init(params)
    pg, sg = {k: params[k] for k in cg}, opt_g.init({k: params[k] for k in cg})
    pf, sf = {"b": params["b"]}, opt_f.init({"b": params["b"]})
    for _ in range(10):
        g = grad(loss)(p)
        p, state = opt.update(g, state, p)
        pg, sg = opt_g.update({k: g[k] for k in cg}, sg, pg)
        pf, sf = opt_f.update({"b": g["b"]}, sf, pf)
        _tree_close(p, {**pg, **pf}, 1e-12)
    assert set(state[1]) == {"geo", "free", "unused"}
    assert member(c["w"], p["w"]) and member(c["v"], p["v"])


def test_the_whole_model_route_around_a_split(generator):
    """Whole-model semantics with ``multi_transform``: ``clip_by_global_norm`` placed before the split
    clips by the norm over every entry and ``apply_if_finite`` around the optimizer skips the whole
    step. With the same rule under both labels the run equals the unsplit optimizer's (float64, 10
    steps); a NaN in the free entry's gradient skips the constrained entries' step too (points and
    state as they were); the clip inside each label instead is each label's norm (another run)."""
    c, params, loss = _split_problem(generator)

    def rule():
        return gf.optim.chain(gf.optim.scale_by_adam(c), gf.optim.scale(-0.05))

    labels = {"w": "geo", "v": "geo", "b": "free"}
    clip = gf.optim.clip_by_global_norm(c, 0.3)
    opts = [gf.optim.apply_if_finite(gf.optim.retract_and_transport(c, gf.optim.chain(*ts)), max_consecutive_errors=3)
            for ts in ([gf.optim.to_tangent(c), clip, gf.optim.multi_transform({"geo": rule(), "free": rule()}, labels)],
                       [gf.optim.to_tangent(c), clip, rule()],
                       [gf.optim.to_tangent(c), gf.optim.multi_transform(
                           {"geo": gf.optim.chain(clip, rule()), "free": gf.optim.chain(clip, rule())}, labels)])]
    runs = [(params, o.init(params)) for o in opts]
    for step in range(10):
        new = []
        for o, (p, s) in zip(opts, runs):
            g = grad(loss)(p)
            if step == 4:
                g = {**g, "b": g["b"] * torch.tensor(float("nan"), dtype=F64)}
            new.append(o.update(g, s, p))
        if step == 4:
            (p, s), (p2, s2) = runs[0], new[0]
            assert all(torch.equal(p[k], p2[k]) for k in p) and not bool(s2.last_finite)
            assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(s.inner_state), optree.tree_leaves(s2.inner_state)))
        runs = new
        _tree_close(runs[0][0], runs[1][0], 1e-12)
    assert int(runs[0][1].total_notfinite) == 1
    assert (runs[2][0]["w"] - runs[1][0]["w"]).abs().max() > 1e-4  # the clip inside the labels: each its own norm
    assert member(c["w"], runs[0][0]["w"]) and member(c["v"], runs[0][0]["v"])


def _finite_problem(generator):
    c = {"q": gf.SO(), "s": gf.Sphere(), "b": None}
    params = gf.sample(c, {"q": torch.empty(3, 3, dtype=F64), "s": torch.empty(4, dtype=F64),
                           "b": torch.randn(2, dtype=F64, generator=generator)}, generator=generator)
    T = {k: torch.randn(v.shape, dtype=F64, generator=generator) for k, v in params.items()}

    def loss(p):
        return sum(((p[k] - T[k]) ** 2).sum() for k in p)

    return c, params, loss


def _poison(g, what):
    return {**g, "s": g["s"] * torch.tensor(float(what), dtype=F64)}


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_apply_if_finite_skips_a_non_finite_step_and_goes_on_as_without_it(bad, generator):
    c, params, loss = _finite_problem(generator)
    opt = gf.optim.apply_if_finite(gf.optim.radam(c, lr=0.05), max_consecutive_errors=3)
    ref = gf.optim.radam(c, lr=0.05)
    p, s = params, opt.init(params)
    q, r = params, ref.init(params)
    for step in range(8):
        g = grad(loss)(p)
        if step in (2, 5):  # a NaN/inf gradient in one entry: the whole step is dropped
            p2, s2 = opt.update(_poison(g, bad), s, p)
            assert all(torch.equal(p2[k], p[k]) for k in p)
            assert not bool(s2.last_finite) and int(s2.notfinite_count) == 1
            for a, b in zip(optree.tree_leaves(s2.inner_state), optree.tree_leaves(s.inner_state)):
                assert torch.equal(a, b)
            p, s = p2, s2
            continue
        p, s = opt.update(g, s, p)
        q, r = ref.update(grad(loss)(q), r, q)
        _tree_close(p, q, 0.0)
        assert bool(s.last_finite) and int(s.notfinite_count) == 0
    assert int(s.total_notfinite) == 2
    assert member(c["q"], p["q"]) and member(c["s"], p["s"])


def test_apply_if_finite_applies_after_too_many_consecutive_errors(generator):
    c, params, loss = _finite_problem(generator)
    opt = gf.optim.apply_if_finite(gf.optim.rsgd(c, lr=0.05), max_consecutive_errors=2)
    p, s = params, opt.init(params)
    for i in range(2):
        p, s = opt.update(_poison(grad(loss)(p), "nan"), s, p)
        assert torch.isfinite(p["s"]).all() and int(s.notfinite_count) == i + 1
    p, s = opt.update(_poison(grad(loss)(p), "nan"), s, p)  # the third in a row: applied, visibly NaN
    assert torch.isnan(p["s"]).all() and int(s.total_notfinite) == 3
    with pytest.raises(gf.ManifoldError, match="max_consecutive_errors"):
        gf.optim.apply_if_finite(gf.optim.rsgd(c, lr=0.05), max_consecutive_errors=-1)


def test_a_transform_where_an_optimizer_is_expected_is_refused(generator):
    """A ``TangentTransform`` (a chain without ``retract_and_transport``, as an optax user writes one)
    has ``init`` and ``update`` too, but its update returns the step's vectors: ``apply_if_finite`` of
    one returned them as the new points, silently (Note [An optimizer, not a transform])."""
    c, params, loss = _finite_problem(generator)
    transform = gf.optim.chain(gf.optim.to_tangent(c), gf.optim.scale_by_adam(c), gf.optim.scale(-0.05))
    with pytest.raises(gf.ManifoldError, match=r"^apply_if_finite: expected an Optimizer .* got a TangentTransform"):
        gf.optim.apply_if_finite(transform, max_consecutive_errors=2)
    with pytest.raises(gf.ManifoldError, match=r"^apply_if_finite: expected an Optimizer .* got dict"):
        gf.optim.apply_if_finite({"lr": 0.1}, max_consecutive_errors=2)
    opt = gf.optim.apply_if_finite(gf.optim.retract_and_transport(c, transform), max_consecutive_errors=2)
    p, _ = opt.update(grad(loss)(params), opt.init(params), params)
    assert member(c["q"], p["q"]) and member(c["s"], p["s"])


def test_apply_if_finite_under_vmap_skips_only_the_model_with_a_bad_gradient(generator):
    c, params, S, f = _batch_problem(generator)
    opt = gf.optim.apply_if_finite(gf.optim.radam(c, lr=0.05), max_consecutive_errors=3)
    state = vmap(opt.init)(params)
    g = vmap(grad(f))(params, S)
    g["x"][1, 0] = float("nan")  # model 1's gradient only
    p, state = vmap(opt.update)(g, state, params)
    assert torch.equal(p["x"][1], params["x"][1]) and not torch.equal(p["x"][0], params["x"][0])
    assert state.last_finite.tolist() == [True, False, True, True]


def test_masks_and_labels_are_checked():
    c = {"w": gf.Sphere(), "b": None}
    params = {"w": gf.Sphere().sample((3,), dtype=F64), "b": torch.zeros(2, dtype=F64)}
    grads = {"w": torch.ones(3, dtype=F64), "b": torch.ones(2, dtype=F64)}
    bad = [
        (gf.optim.radamw(c, lr=0.1, mask={"w": 1, "b": False}), "Python bools"),
        (gf.optim.radamw(c, lr=0.1, mask={"w": True}), "structure of the parameters"),
        (gf.optim.retract_and_transport(c, gf.optim.multi_transform({"a": gf.optim.scale(-0.1)}, {"w": "a", "b": "z"})),
         "keys of `transforms`"),
    ]
    for opt, match in bad:
        with pytest.raises(gf.ManifoldError, match=match):
            opt.update(grads, opt.init(params), params)
    with pytest.raises(gf.ManifoldError, match="non-empty dict"):
        gf.optim.multi_transform({}, {"w": "a"})


def test_radamw_decay_is_the_riemannian_gradient_of_the_squared_norm(generator):
    """With zero gradients only the decoupled decay moves a point: by (1 − ηλ) X where X is a
    tangent vector at itself (PSD, GLp, LowRank: the open and rank spaces), not at all where the norm
    is constant on the space (Stiefel, SO, Sphere), and toward the centre along its ray on the
    Poincaré ball (whose metric rescales the Euclidean gradient X)."""
    lr, wd = 0.1, 0.2
    shrink = {"PSD": (gf.PSD(), (3, 3)), "GLp": (gf.GLp(), (3, 3)), "LowRank": (gf.LowRank(rank=2), (4, 3))}
    still = {"Stiefel": (gf.Stiefel(), (5, 2)), "SO": (gf.SO(), (3, 3)), "Sphere": (gf.Sphere(), (4,))}
    for name, (space, shape) in {**shrink, **still, "ball": (gf.PoincareBall(), (3,))}.items():
        c = {"x": space}
        p = gf.sample(c, {"x": torch.empty(shape, dtype=F64)}, generator=generator)
        opt = gf.optim.radamw(c, lr=lr, weight_decay=wd)
        q, _ = opt.update({"x": torch.zeros(shape, dtype=F64)}, opt.init(p), p)
        X, Y = p["x"], q["x"]
        if name in shrink:
            torch.testing.assert_close(Y, (1 - lr * wd) * X, atol=1e-14, rtol=0, msg=name)
        elif name in still:
            torch.testing.assert_close(Y, X, atol=1e-14, rtol=0, msg=name)
        else:
            assert Y.norm() < X.norm() - 1e-4, name
            torch.testing.assert_close(Y / Y.norm(), X / X.norm(), atol=1e-14, rtol=0, msg=name)


# ------------------------------------------------------------------ toy problems
@pytest.mark.parametrize("name", ["rsgd-momentum", "radam"])
def test_sphere_rayleigh_quotient_finds_smallest_eigenvalue(name, generator):
    n = 8
    A = torch.randn(n, n, generator=generator, dtype=F64)
    S = A + A.mT
    c = {"x": gf.Sphere()}
    opt = {"rsgd-momentum": gf.optim.rsgd(c, lr=0.02, momentum=0.9), "radam": gf.optim.radam(c, lr=0.05)}[name]
    p = gf.sample(c, {"x": torch.empty(n, dtype=F64)}, generator=generator)
    state = opt.init(p)

    def f(p):
        return p["x"] @ S @ p["x"]

    for _ in range(800):
        p, state = opt.update(grad(f)(p), state, p)
    torch.testing.assert_close(f(p), torch.linalg.eigvalsh(S)[0], atol=1e-8, rtol=0)
    assert member(gf.Sphere(), p["x"])


@pytest.mark.parametrize("name", ["rsgd-momentum", "radam"])
def test_stiefel_procrustes_reaches_svd_optimum(name, generator):
    # max tr(Xᵀ M) over St(6, 3) is attained at the polar factor U Vᵀ of M = U S Vᵀ.
    M = torch.randn(6, 3, generator=generator, dtype=F64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    c = {"X": gf.Stiefel()}
    opt = {"rsgd-momentum": gf.optim.rsgd(c, lr=0.05, momentum=0.9), "radam": gf.optim.radam(c, lr=0.05)}[name]
    p = gf.sample(c, {"X": torch.empty(6, 3, dtype=F64)}, generator=generator)
    state = opt.init(p)

    def f(p):
        return -torch.trace(p["X"].mT @ M)

    for _ in range(600):
        p, state = opt.update(grad(f)(p), state, p)
    torch.testing.assert_close(f(p), -S.sum(), atol=1e-8, rtol=0)
    torch.testing.assert_close(p["X"], U @ Vh, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ every optimizer x space
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_points_stay_on_space(case, name, generator):
    c = {"x": case.space}
    opt = OPTIMIZERS[name](c)
    p = gf.sample(c, {"x": torch.empty(case.smoke, dtype=F64)}, generator=generator)
    state = opt.init(p)
    structure = optree.tree_structure(state)
    for _ in range(100):
        G = {"x": torch.randn(case.smoke, generator=generator, dtype=F64)}
        p, state = opt.update(G, state, p)
    assert optree.tree_structure(state) == structure
    assert bool(torch.as_tensor(case.member(p["x"], case.tol[F64])).all()), case.id
    assert bool(gf.contains(c, p)["x"].all()), case.id


def test_rsgd_float32_stiefel_1000_steps_stays_orthonormal(generator):
    c = {"X": gf.Stiefel()}
    M = torch.randn(64, 16, generator=generator)
    opt = gf.optim.rsgd(c, lr=0.01, momentum=0.9)
    p = gf.sample(c, {"X": torch.empty(64, 16)}, generator=generator)
    state = opt.init(p)
    for _ in range(1000):
        p, state = opt.update({"X": -M + 0.1 * torch.randn(64, 16, generator=generator)}, state, p)
    X = p["X"]
    assert X.dtype == torch.float32
    assert float((X.mT @ X - torch.eye(16)).abs().max()) < 1e-5


# ------------------------------------------------------------------ transforms
def _batch_problem(generator, B=4, n=5):
    A = torch.randn(B, n, n, generator=generator, dtype=F64)
    S = A + A.mT
    c = {"x": gf.Sphere(), "W": gf.SO(), "b": None}
    params = {
        "x": gf.Sphere().sample((B, n), generator=generator, dtype=F64),
        "W": gf.SO().sample((B, 3, 3), generator=generator, dtype=F64),
        "b": torch.randn(B, 2, generator=generator, dtype=F64),
    }

    def f(p, S):
        return p["x"] @ S @ p["x"] + torch.trace(p["W"]) + (p["b"] ** 2).sum()

    return c, params, S, f


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_under_vmap_equals_loop(name, generator):
    c, params, S, f = _batch_problem(generator)
    opt = OPTIMIZERS[name](c)
    state = vmap(opt.init)(params)
    p = params
    for _ in range(3):
        g = vmap(grad(f))(p, S)
        p, state = vmap(opt.update)(g, state, p)
    for i in range(S.shape[0]):
        pi = {k: v[i] for k, v in params.items()}
        si = opt.init(pi)
        for _ in range(3):
            pi, si = opt.update(grad(f)(pi, S[i]), si, pi)
        # 1e-9: torch.linalg.matrix_exp picks its degree from the whole batch's norm
        _tree_close({k: v[i] for k, v in p.items()}, pi, 1e-9)


@needs_torch(COMPILE_PYTREES, "Dynamo tracing optree")
@pytest.mark.parametrize("name", ["rsgd-momentum", "radam", "rsgd-schedule", "radam-clip", "multi", "radam-finite"])
def test_update_compiles_fullgraph(name, generator):
    c, params, S, f = _batch_problem(generator, B=2)
    opt = OPTIMIZERS[name](c)
    torch._dynamo.reset()  # every optimizer's update is the same code object: one compile each, not 8 per process
    step = torch.compile(opt.update, fullgraph=True, backend="aot_eager")
    state_c = state_e = opt.init(params)
    p_c = p_e = params
    for _ in range(2):
        g = vmap(grad(f))(p_e, S)
        p_e, state_e = opt.update(g, state_e, p_e)
        p_c, state_c = step(g, state_c, p_c)
    _tree_close(p_c, p_e, 1e-12)
    _tree_close(state_c, state_e, 1e-12)


def test_momentum_is_transported_to_the_new_tangent_space(generator):
    c = {"X": gf.Stiefel()}
    opt = gf.optim.rsgd(c, lr=0.1, momentum=0.9)
    p = gf.sample(c, {"X": torch.empty(5, 2, dtype=F64)}, generator=generator)
    state = opt.init(p)
    for _ in range(3):
        p, state = opt.update({"X": torch.randn(5, 2, generator=generator, dtype=F64)}, state, p)
    buf = state[2].trace["X"]
    torch.testing.assert_close(gf.Stiefel().tangent(p["X"], buf), buf, atol=1e-12, rtol=0)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_first_moment_is_transported_to_the_new_tangent_space(amsgrad, generator):
    """radam's first moment lives at the current point: a ``scale_by_adam`` whose ``transport`` left it
    where it was (tangent at the previous point) passed every test of test_optim and test_geometry_optim."""
    c = {"X": gf.Stiefel(), "s": gf.Sphere()}
    opt = gf.optim.radam(c, lr=0.1, amsgrad=amsgrad)
    p = gf.sample(c, {"X": torch.empty(5, 2, dtype=F64), "s": torch.empty(3, 4, dtype=F64)}, generator=generator)
    state = opt.init(p)
    for _ in range(3):
        G = optree.tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=F64), p)
        p, state = opt.update(G, state, p)
    for k, space in c.items():
        mu = state[2].mu[k]
        assert mu.abs().max() > 0.1
        torch.testing.assert_close(space.tangent(p[k], mu), mu, atol=1e-12, rtol=0)


def test_grads_must_match_params():
    opt = gf.optim.rsgd({"x": gf.Sphere()}, lr=0.1)
    p = {"x": torch.tensor([1.0, 0.0]), "y": torch.zeros(2)}
    with pytest.raises(gf.ManifoldError, match="structure"):
        opt.update({"x": torch.zeros(2)}, opt.init(p), p)


def test_radam_second_moment_is_per_point_and_per_product_factor(generator):
    c = {"pair": gf.Product(gf.SO(), gf.Sphere()), "rows": gf.Sphere(), "free": None}
    params = gf.sample(
        c,
        {"pair": (torch.empty(3, 3, dtype=F64), torch.empty(4, dtype=F64)), "rows": torch.empty(5, 4, dtype=F64),
         "free": torch.zeros(2, dtype=F64)},
        generator=generator,
    )
    opt = gf.optim.radam(c, lr=0.05)
    state = opt.init(params)
    nu = state[2].nu
    assert [t.shape for t in nu["pair"]] == [(1, 1), (1,)]  # one scalar per factor point
    assert nu["rows"].shape == (5, 1) and nu["free"].shape == (2,)  # per row; elementwise
    for _ in range(50):
        G = optree.tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=F64), params)
        params, state = opt.update(G, state, params)
    assert all(on_spaces(c, params).values())


# ------------------------------------------------------------------ half precision
# Note [Adam's statistics in low precision] in geofunc/optim/_transforms.py. Before it, radam never
# moved a bfloat16 parameter (1 − β₂ᵗ rounded to 0: every step √v/0 → 0) and gave NaN at a zero
# gradient; in float16 a zero or small gradient gave NaN/inf (ε and the squares underflowed).
HALF = [torch.bfloat16, torch.float16]
#: max |X_low − X_float32| after the run below, per dtype: ~10 spacings of the stored dtype at the
#: entries' size (up to ~3; measured: bfloat16 ≤ 0.09, float16 ≤ 0.008 across the spaces). Membership
#: after 30 retractions without a projection: 20 units of roundoff (measured: SO bfloat16 0.04).
HALF_TOL = {torch.bfloat16: 0.15, torch.float16: 0.03}
HALF_SPACES = {"free": None, "Rn": gf.Rn(), "SO": gf.SO(), "Sphere": gf.Sphere(), "Stiefel": gf.Stiefel()}


def _half_run(space, dtype, X0, T, steps=30):
    """``steps`` of radam on ``½‖X − T‖²`` from ``X0`` in ``dtype`` (gradient formed in float32, rounded)."""
    c = {"x": space}
    opt = gf.optim.radam(c, lr=0.02)
    p = {"x": X0.to(dtype)}
    state = opt.init(p)
    for _ in range(steps):
        g = {"x": (p["x"].float() - T).to(dtype)}
        p, state = opt.update(g, state, p)
    return p["x"]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(HALF_SPACES))
def test_radam_in_half_precision_follows_float32(name, dtype, generator):
    space = HALF_SPACES[name]
    shape = (4, 4) if name in ("SO", "free", "Rn") else (6, 3) if name == "Stiefel" else (5,)
    if space is None:
        X0 = torch.randn(shape, generator=generator)
    else:
        X0 = space.sample(shape, generator=generator)
    X0 = X0.to(dtype).float()  # one starting point for both runs
    T = 3 * torch.randn(shape, generator=generator)
    ref = _half_run(space, torch.float32, X0, T)
    out = _half_run(space, dtype, X0, T)
    assert out.dtype == dtype and torch.isfinite(out).all()
    moved, ref_moved = float((out.float() - X0).abs().max()), float((ref - X0).abs().max())
    assert moved > 0.5 * ref_moved > 0.1, f"{name} {dtype}: moved {moved:.3g}, float32 moved {ref_moved:.3g}"
    err = float((out.float() - ref).abs().max())
    assert err <= HALF_TOL[dtype], f"{name} {dtype}: {err:.3g} from the float32 run"
    if space is not None:
        assert member(space, out.double(), 20 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_radam_in_half_precision_at_zero_and_small_gradients(dtype):
    # a zero gradient entry does not move; gradients of 1e-4 (squares below float16's range) take
    # Adam's normalized first step, lr·sign(g), as in float32
    opt = gf.optim.radam({"x": None, "s": gf.Sphere()}, lr=0.02)
    p = {"x": torch.tensor([1.0, 1.0, 1.0], dtype=dtype), "s": torch.tensor([1.0, 0.0, 0.0], dtype=dtype)}
    g = {"x": torch.tensor([1e-4, 0.0, -1e-4], dtype=dtype), "s": torch.tensor([0.7, 0.0, 0.0], dtype=dtype)}  # s: normal
    new, _ = opt.update(g, opt.init(p), p)
    ulp = 2 * torch.finfo(dtype).eps  # the spacing of the stored dtype just above 1
    torch.testing.assert_close(new["x"].float(), torch.tensor([0.98, 1.0, 1.02]), atol=ulp, rtol=0)
    assert new["x"][1] == 1.0
    assert new["s"].tolist() == [1.0, 0.0, 0.0]  # a critical point of the sphere stays put


def test_radam_state_of_half_precision_entries():
    opt = gf.optim.radam({"x": gf.SO(), "y": None}, lr=0.02)
    state = opt.init({"x": torch.eye(3, dtype=torch.bfloat16), "y": torch.zeros(2, dtype=torch.float16)})
    (adam,) = [s for s in optree.tree_leaves(state, is_leaf=lambda s: isinstance(s, gf.optim.ScaleByAdamState))
               if isinstance(s, gf.optim.ScaleByAdamState)]
    assert adam.mu["x"].dtype == torch.bfloat16 and adam.mu["y"].dtype == torch.float16  # transported with the point
    assert adam.nu["x"].dtype == torch.float32 and adam.nu["y"].dtype == torch.float32  # a statistic: float32


#: Optimizers whose hyperparameters are tensors of another dtype than the parameters' (a float64
#: schedule, a float32 rate, clip factor, momentum or weight decay).
TENSOR_HYPERPARAMETERS = {
    "radam-f64-schedule": lambda: gf.optim.radam({}, lr=lambda n: 0.05 * torch.clamp((n + 1).to(F64) / 3, max=1.0)),
    "rsgd-tensor-momentum": lambda: gf.optim.rsgd({}, lr=torch.tensor(0.05), momentum=torch.tensor(0.9),
                                                   dampening=torch.tensor(0.1), weight_decay=torch.tensor(0.1)),
    "rsgd-nesterov": lambda: gf.optim.rsgd({}, lr=0.05, momentum=torch.tensor(0.9), nesterov=True),
    "radamw-tensor": lambda: gf.optim.radamw({}, lr=torch.tensor(0.05), weight_decay=torch.tensor(0.1),
                                             betas=(torch.tensor(0.9), torch.tensor(0.99))),
    "clip": lambda: gf.optim.retract_and_transport({}, gf.optim.chain(gf.optim.clip_by_global_norm({}, 0.1),
                                                                       gf.optim.scale(torch.tensor(-0.05)))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(TENSOR_HYPERPARAMETERS))
def test_a_scalar_parameter_keeps_its_dtype_with_tensor_hyperparameters(name, dtype, generator):
    """A 0-dim parameter (a scalar gain) steps as the same parameter of shape (1,), in its own dtype,
    with a state that keeps init's dtypes (Note [Vectors keep their dtype]): type promotion let a 0-dim
    tensor hyperparameter widen a 0-dim vector, so such a parameter came back float64 (a float64
    schedule) or float32 (bfloat16 with a float32 rate), and its momentum buffer with it."""
    opt = TENSOR_HYPERPARAMETERS[name]()
    w = torch.randn(3, 2, generator=generator).to(dtype)
    scalar = {"w": w, "t": torch.tensor(0.7, dtype=dtype)}
    vector = {"w": w, "t": torch.tensor([0.7], dtype=dtype)}
    s0, s1 = opt.init(scalar), opt.init(vector)
    dtypes = [t.dtype for t in optree.tree_leaves(s0)]
    for k in range(4):
        g = {"w": torch.full((3, 2), 0.3 * (k + 1)).to(dtype), "t": torch.tensor(0.5 * (k - 1), dtype=dtype)}
        scalar, s0 = opt.update(g, s0, scalar)
        vector, s1 = opt.update({**g, "t": g["t"].reshape(1)}, s1, vector)
        assert scalar["t"].dtype == dtype and scalar["t"].shape == ()
        assert [t.dtype for t in optree.tree_leaves(s0)] == dtypes
        assert torch.equal(scalar["t"].reshape(1), vector["t"]) and torch.equal(scalar["w"], vector["w"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_missing_gradient_is_a_manifold_error_naming_it(name):
    """A ``None`` gradient (a frozen parameter) or a missing or extra entry names the parameter (an
    unconstrained one was optree's bare "Expected None, got tensor(...)")."""
    c = {"enc.w": gf.Sphere()}
    params = {"enc": {"w": torch.nn.functional.normalize(torch.ones(3, 4), dim=-1), "b": torch.zeros(2)}, "out": [torch.zeros(3)]}
    opt = OPTIMIZERS[name](c)
    state = opt.init(params)
    good = {"enc": {"w": torch.ones(3, 4), "b": torch.ones(2)}, "out": [torch.ones(3)]}
    opt.update(good, state, params)  # the structures agree: no error
    for grads, named in (({"enc": {"w": torch.ones(3, 4), "b": None}, "out": [torch.ones(3)]}, "'enc.b'"),
                         ({"enc": {"w": None, "b": torch.ones(2)}, "out": [torch.ones(3)]}, "'enc.w'"),
                         ({"enc": {"w": torch.ones(3, 4), "b": torch.ones(2)}, "out": [None]}, "'out.0'"),
                         ({"enc": {"w": torch.ones(3, 4), "b": torch.ones(2)}, "out": [torch.ones(3)], "x": torch.ones(1)}, "'x'")):
        with pytest.raises(gf.ManifoldError, match=re.escape(named)):
            opt.update(grads, state, params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_checkpoint_of_the_state_loads_with_torch_load_and_resumes_bit_for_bit(name, generator):
    """``torch.save`` of the points and the optimizer state mid-run, then ``torch.load`` with
    ``weights_only=True`` (torch's default since 2.6, which refuses classes it was not told about:
    Note [Loading optimizer state]), then the same steps: the same points and state, bit for bit,
    as the run that was never interrupted."""
    c = {"q": gf.SO(), "f": gf.Stiefel(), "s": gf.Sphere(), "h": gf.Lorentz(), "b": None}
    params = gf.sample(c, {"q": torch.empty(3, 3, dtype=F64), "f": torch.empty(5, 2, dtype=F64),
                           "s": torch.empty(4, dtype=F64), "h": torch.empty(3, dtype=F64),
                           "b": torch.randn(2, dtype=F64, generator=generator)}, generator=generator)
    targets = {k: torch.randn(v.shape, dtype=F64, generator=generator) for k, v in params.items()}

    def loss(p):
        return sum(((p[k] - targets[k]) ** 2).sum() for k in p)

    opt = OPTIMIZERS[name](c)
    p, state = params, opt.init(params)
    for _ in range(3):
        p, state = opt.update(grad(loss)(p), state, p)
    buf = io.BytesIO()
    torch.save({"params": p, "state": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    q, loaded_state = loaded["params"], loaded["state"]
    assert optree.tree_structure(loaded_state) == optree.tree_structure(state)
    for _ in range(3):
        p, state = opt.update(grad(loss)(p), state, p)
        q, loaded_state = opt.update(grad(loss)(q), loaded_state, q)
    for x, y in zip(optree.tree_leaves((p, state)), optree.tree_leaves((q, loaded_state))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["rsgd", "rsgd-momentum", "radam", "radamw", "scheduled", "apply_if_finite"])
def test_states_built_under_a_meta_default_device_live_with_torch_optims_step(name, generator):
    """The optimizers' step counts were made on the default device: with ``init`` inside ``torch.device("meta")``
    (deferred initialization around it) radam's update raised "Tensor on device meta is not on the expected
    device cpu!" and rsgd's state held a count without a value. They are on the CPU, as torch.optim hosts its
    step, and the steps equal those of a state built outside the context."""
    cons = {"w": gf.Stiefel(), "s": gf.Sphere()}
    make = {"rsgd": lambda: gf.optim.rsgd(cons, 0.1), "rsgd-momentum": lambda: gf.optim.rsgd(cons, 0.1, momentum=0.9),
            "radam": lambda: gf.optim.radam(cons, 0.1), "radamw": lambda: gf.optim.radamw(cons, 0.1, weight_decay=0.1),
            "scheduled": lambda: gf.optim.radam(cons, lambda count: 0.1 / (1.0 + count)),
            "apply_if_finite": lambda: gf.optim.apply_if_finite(gf.optim.radam(cons, 0.1), 2)}[name]
    params = {"w": gf.Stiefel().sample((5, 3), generator=generator), "s": gf.Sphere().sample((4,), generator=generator),
              "b": torch.randn(3, generator=generator)}
    grads = [{k: torch.randn(v.shape, generator=generator) for k, v in params.items()} for _ in range(3)]
    opt = make()
    with torch.device("meta"):
        state = opt.init(params)
    assert {t.device.type for t in optree.tree_leaves(state)} <= {"cpu"}
    ref_p, ref_s, p = params, opt.init(params), params
    for g in grads:
        p, state = opt.update(g, state, p)
        ref_p, ref_s = opt.update(g, ref_s, ref_p)
    for k in params:
        torch.testing.assert_close(p[k], ref_p[k], atol=0, rtol=0)
    for a, b in zip(optree.tree_leaves(state), optree.tree_leaves(ref_s), strict=True):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_apply_if_finite_flags_of_a_tree_without_tensors_are_on_the_cpu_under_a_meta_default_device():
    """``apply_if_finite``'s flags were made on the default device when the tree held no tensor: under
    ``torch.device("meta")`` they were meta, and ``torch.where`` over them made the inner state's count
    meta too after one update (no value to read or save). On the CPU, as the counts (``_count()``)."""
    opt = gf.optim.apply_if_finite(gf.optim.radam({}, lr=0.1), 3)
    with torch.device("meta"):
        state = opt.init({"n": None})
    _, state = opt.update({"n": None}, state, {"n": None})
    assert {t.device.type for t in optree.tree_leaves(state)} == {"cpu"}
    assert int(state.notfinite_count) == 0 and bool(state.last_finite)


def test_torch_optimizer_steps_and_saves_under_a_meta_default_device():
    """TorchOptimizer's first step (its state's counts) and its state_dict (the cohort entries) inside
    ``torch.device("meta")``: the step raised, and the state_dict held meta tensors that no load could read."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 5)
        with torch.no_grad():
            m.weight.copy_(gf.Stiefel().sample((5, 3), generator=torch.Generator().manual_seed(1)))
        return m, gf.optim.TorchOptimizer(m.named_parameters(), {"weight": gf.Stiefel()}, gf.optim.radam, lr=0.1)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    m, opt = make()
    ref, ref_opt = make()
    for step in range(2):
        for mod, o, meta in ((m, opt, True), (ref, ref_opt, False)):
            o.zero_grad()
            mod(x).pow(2).sum().backward()
            with torch.device("meta") if meta else torch.device("cpu"):
                o.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.device("meta"):
        saved = opt.state_dict()
    assert all(t.device.type == "cpu" for s in saved["state"].values() for t in s.values() if isinstance(t, torch.Tensor))
    again, again_opt = make()
    again_opt.load_state_dict(saved)


def _admits(hint, cls: type) -> bool:
    """Whether an annotation (as ``typing.get_type_hints`` gives it) admits instances of ``cls``."""
    import types
    import typing

    if hint is typing.Any or hint is cls:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_admits(a, cls) for a in typing.get_args(hint))
    return isinstance(hint, type) and issubclass(cls, hint)


def test_hyperparameter_annotations_admit_tensors():
    """Every numeric hyperparameter may be a 0-dim tensor (a learned or meta-learned value under
    torch.func: Note [Checking hyperparameters]; OPTIMIZERS above steps them), and TorchOptimizer
    takes torch.optim's ``lr: float | Tensor``. They were annotated ``float``: a typed program that
    differentiates through ``rsgd(..., momentum=mu)`` or builds ``chain(..., scale(-lr))`` with a
    tensor got false errors from mypy and pyright (geofunc ships py.typed)."""
    import typing

    opt = gf.optim
    params = {
        opt.rsgd: ("momentum", "dampening", "weight_decay"),
        opt.radam: ("eps", "weight_decay"),
        opt.radamw: ("eps", "weight_decay"),
        opt.trace: ("decay", "dampening"),
        opt.scale: ("step",),
        opt.scale_by_adam: ("b1", "b2", "eps"),
        opt.add_decayed_weights: ("weight_decay",),
        opt.clip_by_global_norm: ("max_norm",),
        opt.TorchOptimizer.__init__: ("lr",),
    }
    bad = []
    for fn, names in params.items():
        hints = typing.get_type_hints(fn)
        bad += [f"{fn.__qualname__}({n}: {hints[n]})" for n in names
                if not (_admits(hints[n], torch.Tensor) and _admits(hints[n], float))]
    for fn in (opt.radam, opt.radamw):
        betas = typing.get_type_hints(fn)["betas"]
        if not all(_admits(b, torch.Tensor) for b in typing.get_args(betas)):
            bad.append(f"{fn.__qualname__}(betas: {betas})")
    assert not bad, "hyperparameters whose annotation refuses a 0-dim tensor:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("make", [lambda t: gf.optim.rsgd({}, lr=t), lambda t: gf.optim.radam({}, lr=1e-2, eps=t),
                                  lambda t: gf.optim.rsgd({}, lr=0.1, momentum=t),
                                  lambda t: gf.optim.clip_by_global_norm({}, t)],
                         ids=["lr", "eps", "momentum", "max_norm"])
def test_a_one_value_tensor_hyperparameter_of_one_dim_is_refused(make):
    """Note [Checking hyperparameters]: a tensor hyperparameter is not read, but its shape is static. A (1,)
    one was taken (one value) and broadcast a 0-dim parameter's step, or its clipped gradient, to shape (1,)
    silently; it is refused as a (2,) one is, and the 0-dim tensor works."""
    with pytest.raises(gf.ManifoldError, match=r"0-dim tensor"):
        make(torch.tensor([0.5]))
    assert make(torch.tensor(0.5)) is not None


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_bias_corrections_of_a_model_of_mixed_dtypes_are_each_dtypes_own(amsgrad, generator):
    """scale_by_adam computes its bias corrections once per dtype and device: each parameter of a float32 and
    float64 model steps bit for bit as in a model of its dtype alone (corrections shared across dtypes gave
    the float64 entries float32's, 1e-6 off)."""
    cons = {"s": gf.Sphere(), "w": gf.Stiefel()}
    params = {"s": gf.Sphere().sample((5,), generator=generator, dtype=F64), "w": gf.Stiefel().sample((4, 2), generator=generator),
              "b": torch.randn(3, generator=generator, dtype=F64), "f": torch.randn(2, generator=generator)}
    grads = [{k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()} for _ in range(3)]

    def run(names):
        opt = gf.optim.radam({k: v for k, v in cons.items() if k in names}, 0.05, amsgrad=amsgrad)
        p = {k: params[k] for k in names}
        s = opt.init(p)
        for g in grads:
            p, s = opt.update({k: g[k] for k in names}, s, p)
        return p

    mixed = run(("s", "w", "b", "f"))
    alone = {**run(("s", "b")), **run(("w", "f"))}
    for k in params:
        assert mixed[k].dtype == params[k].dtype
        assert torch.equal(mixed[k], alone[k]), k


def test_apply_if_finite_of_parameters_without_floating_entries_keeps_its_flag_on_the_cpu():
    """The finiteness flag of a pytree with no floating entry (int-only, or none) was made on the default
    device: under ``torch.device("meta")`` apply_if_finite stored a meta ``last_finite``."""
    opt = gf.optim.apply_if_finite(gf.optim.rsgd({}, 0.1), 2)
    params, grads = {"n": torch.tensor([1, 2])}, {"n": torch.tensor([0, 0])}
    with torch.device("meta"):
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
    assert all(t.device.type == "cpu" for t in optree.tree_leaves(state))


@pytest.mark.parametrize("pdtype, gdtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)], ids=str)
def test_scale_by_adam_first_moment_of_a_gradient_of_another_dtype(pdtype, gdtype):
    """A gradient whose dtype is not the state's (a float64 vector for a float32 parameter): the first moment
    keeps the formula β₁ m + (1 − β₁) g (torch.lerp takes one dtype: it raised 'expected dtype ... for `end`')."""
    t = gf.optim.scale_by_adam({}, b1=0.9)
    p = {"w": torch.ones(3, dtype=pdtype)}
    state = t.init(p)
    g = {"w": torch.full((3,), 0.5, dtype=gdtype)}
    _, state = t.update(g, state, p)
    mu = state.mu["w"]
    torch.testing.assert_close(mu.double(), torch.full((3,), 0.05, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("momenta", [(0.0, 0.0), (0.9, 0.0)])
def test_a_momentum_tensor_at_zero_steps_by_the_gradient_after_a_non_finite_one(momenta):
    """torch.optim.SGD with a momentum tensor at 0 steps by the gradient whatever its buffer holds; trace's
    value selection multiplies that buffer by 0 (Note [A momentum tensor that may be zero]): a buffer holding an
    inf or NaN gradient of an earlier step (a skipped overflow, a NaN batch) must not make the update NaN."""
    x = torch.zeros(3, dtype=F64)
    g1 = torch.tensor([float("inf"), 1.0, float("nan")], dtype=F64)
    g2 = torch.tensor([2.0, 3.0, 4.0], dtype=F64)
    mu1, mu2 = (torch.tensor(m, dtype=F64) for m in momenta)
    s = gf.optim.trace(mu1, 0.0).init(x)
    _, s = gf.optim.trace(mu1, 0.0).update(g1, s, x)
    v, _ = gf.optim.trace(mu2, 0.0).update(g2, s, x)
    torch.testing.assert_close(v, g2, rtol=0, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_momentum_tensor_at_zero_has_the_rules_derivative(nesterov):
    """A meta-learned momentum initialised at 0 (dampening 0, the default: the step is continuous in μ there):
    selected by value (Note [A momentum tensor that may be zero]), its derivative was 0 where central
    differences give the rule's (rsgd, three steps on a quadratic: -23.5, silently 0)."""
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=F64)

    def run(mu):
        x = torch.tensor([1.0, -2.0], dtype=F64)
        t = gf.optim.trace(mu, 0.0, nesterov)
        s = t.init(x)
        for _ in range(3):
            v, s = t.update(A @ x, s, x)
            x = x - 0.1 * v
        return 0.5 * x @ A @ x

    mu = torch.tensor(0.0, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(run(mu), mu)
    h = 1e-6
    # (learned momenta: with nesterov a plain tensor at -h is refused, Note [Nesterov needs momentum])
    at = lambda m: run(torch.tensor(m, dtype=F64, requires_grad=True)).detach()  # noqa: E731
    fd = (at(h) - at(-h)) / (2 * h)
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-8)


def test_nesterov_momentum_under_a_dispatch_mode_is_not_read():
    """Note [Values known at construction]: no value is read while a dispatch mode is active (the tensor may be
    a mode's own, or reading it a data-dependent op there), so momentum=torch.tensor(0.) with nesterov builds
    inside a mode, and is refused outside it, as torch.optim.SGD refuses it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    mu = torch.tensor(0.0, dtype=F64)
    with Passthrough():
        gf.optim.rsgd({}, lr=0.1, momentum=mu, nesterov=True)
    with pytest.raises(gf.ManifoldError, match="nesterov=True"):
        gf.optim.rsgd({}, lr=0.1, momentum=mu, nesterov=True)


def test_nesterov_momentum_of_a_subclass_or_meta_tensor_is_not_read():
    """Note [Values known at construction]: only a plain CPU tensor's value is read. A tensor subclass's (a
    fake, a DTensor, a user's wrapper) and a meta or accelerator tensor's are left to the caller: a meta
    momentum raised torch's "Tensor.item() cannot be called on meta tensors" when read."""

    class Wrapped(torch.Tensor):
        pass

    for mu in (torch.tensor(0.0, dtype=F64).as_subclass(Wrapped), torch.tensor(0.0, dtype=F64, device="meta")):
        gf.optim.rsgd({}, lr=0.1, momentum=mu, nesterov=True)
