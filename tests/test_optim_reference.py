"""geofunc.optim against hand-written float64 references of the same updates, on constrained spaces.

tests/test_optim.py compares the named optimizers with torch.optim on unconstrained (and Rn) entries,
where every projection and transport is the identity. Here the reference loops are written out from
the docstrings' formulas with the spaces' own maps (``egrad_to_rgrad``, ``inner``, ``retract``,
``transport``) as the only primitives, so that what the transforms compose on a curved space (the
per-point second moment, the bias corrections, the placement of ε and of the weight decay, the
transport of the moments, the running maximum of AMSGrad, momentum's dampening and Nesterov term)
is checked step by step, not just the membership of the iterates.
"""

from __future__ import annotations

import pytest
import torch

import geofunc as gf

F64 = torch.float64
TOL = {F64: 1e-12}


def _space_problem(name: str, generator: torch.Generator):
    """``(space, X0, grads)``: a batch of points and a sequence of Euclidean gradients (random, so that the
    steps do not settle; float64)."""
    space, shape = {"sphere": (gf.Sphere(), (3, 5)), "stiefel": (gf.Stiefel(), (2, 5, 3)),
                    "psd": (gf.PSD(), (2, 3, 3))}[name]
    X = space.sample(shape, dtype=F64, generator=generator)
    grads = [torch.randn(shape, dtype=F64, generator=generator) for _ in range(6)]
    return space, X, grads


def _run(opt, X, grads):
    p = {"x": X}
    state = opt.init(p)
    out = []
    for G in grads:
        p, state = opt.update({"x": G}, state, p)
        out.append(p["x"])
    return out


def _reference_rsgd(space, X, grads, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    r"""rsgd's docstring: g = P(G + λX); b_1 = g, b_t = μ b + (1 − τ) g; d = g + μ b (nesterov) or b;
    X⁺ = R_X(−η d); b carried to X⁺."""
    b, out = None, []
    for G in grads:
        g = space.egrad_to_rgrad(X, G + weight_decay * X)
        if momentum == 0:
            d = g
        else:
            b = g.clone() if b is None else momentum * b + (1 - dampening) * g
            d = g + momentum * b if nesterov else b
        Y = space.retract(X, -lr * d)
        if b is not None:
            b = space.transport(X, Y, b)
        X = Y
        out.append(X)
    return out


def _reference_radam(space, X, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
                     amsgrad=False):
    r"""scale_by_adam's docstring: m = β₁ m + (1 − β₁) g, v = β₂ v + (1 − β₂) ⟨g, g⟩_X (one per point),
    u = (m / (1 − β₁ᵗ)) / (√v / √(1 − β₂ᵗ) + ε) (v its running maximum with amsgrad); radam adds λX to the
    Euclidean gradient, radamw adds λ grad ½‖X‖² = λ P(X) to u; X⁺ = R_X(−η u), m carried to X⁺."""
    b1, b2 = betas
    m = torch.zeros_like(X)
    v = torch.zeros(X.shape[: X.ndim - space.point_ndim] + (1,) * space.point_ndim, dtype=F64)
    v_max = torch.zeros_like(v)
    out = []
    for t, G in enumerate(grads, start=1):
        g = space.egrad_to_rgrad(X, G if decoupled else G + weight_decay * X)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * space.inner(X, g, g).reshape(v.shape)
        v_max = torch.maximum(v_max, v)
        vv = v_max if amsgrad else v
        u = (m / (1 - b1 ** t)) / (vv.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
        if decoupled:
            u = u + weight_decay * space.egrad_to_rgrad(X, X)
        Y = space.retract(X, -lr * u)
        m = space.transport(X, Y, m)
        X = Y
        out.append(X)
    return out


def _close(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=TOL[F64], rtol=TOL[F64])


RSGD = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening-wd": dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05),
    "nesterov-wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
}


@pytest.mark.parametrize("kwargs", list(RSGD.values()), ids=list(RSGD))
@pytest.mark.parametrize("name", ["sphere", "stiefel", "psd"])
def test_rsgd_equals_its_formula_on_a_space(name, kwargs, generator):
    space, X, grads = _space_problem(name, generator)
    _close(_run(gf.optim.rsgd({"x": space}, **kwargs), X, grads), _reference_rsgd(space, X, grads, **kwargs))


RADAM = {
    "default": dict(lr=0.05),
    "custom": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05),
    "amsgrad": dict(lr=0.05, betas=(0.9, 0.6), amsgrad=True),
    "amsgrad-custom": dict(lr=0.05, betas=(0.7, 0.5), eps=1e-3, weight_decay=0.05, amsgrad=True),
}


@pytest.mark.parametrize("kwargs", list(RADAM.values()), ids=list(RADAM))
@pytest.mark.parametrize("name", ["sphere", "stiefel", "psd"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["radam", "radamw"])
def test_radam_and_radamw_equal_their_formula_on_a_space(decoupled, name, kwargs, generator):
    space, X, grads = _space_problem(name, generator)
    factory = gf.optim.radamw if decoupled else gf.optim.radam
    kwargs = {"weight_decay": 0.0, **kwargs}
    _close(_run(factory({"x": space}, **kwargs), X, grads),
           _reference_radam(space, X, grads, decoupled=decoupled, **kwargs))


def test_clip_by_global_norm_of_a_tiny_gradient_equals_torch(generator):
    """``min(1, max_norm / (‖g‖ + 1e-6))`` with its ``1e-6``, as ``clip_grad_norm_``: for gradients of norm
    ~1e-6 the term is half the denominator (without it the factor is 1, nothing clipped)."""
    g = {"w": torch.randn(3, 4, dtype=F64, generator=generator), "b": torch.randn(5, dtype=F64, generator=generator)}
    norm = torch.cat([t.reshape(-1) for t in g.values()]).norm()
    g = {k: t * (1e-6 / norm) for k, t in g.items()}  # global norm 1e-6
    for max_norm in (1e-6, 5e-7, 1.0):
        clip = gf.optim.clip_by_global_norm({}, max_norm)
        out, _ = clip.update(g, clip.init(g), g)
        ref = [torch.zeros_like(t, requires_grad=True) for t in g.values()]
        for r, t in zip(ref, g.values()):
            r.grad = t.clone()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        for a, r in zip(out.values(), ref):
            torch.testing.assert_close(a, r.grad, atol=0, rtol=TOL[F64])


def test_a_clip_inside_masked_sees_its_own_entries_only(generator):
    """``masked``'s inner transform sees the other entries' vectors as zero (its docstring), so a clip inside
    it is the clip of the masked entries alone; the others pass unchanged."""
    g = {"w": 3.0 * torch.randn(3, 4, dtype=F64, generator=generator),
         "b": 50.0 * torch.randn(5, dtype=F64, generator=generator)}
    clip = gf.optim.masked(gf.optim.clip_by_global_norm({}, 1.0), {"w": True, "b": False})
    out, _ = clip.update(g, clip.init(g), g)
    torch.testing.assert_close(out["w"], g["w"] / (g["w"].norm() + 1e-6), atol=0, rtol=TOL[F64])
    assert torch.equal(out["b"], g["b"])


@pytest.mark.parametrize("where", ["real", "imag"])
def test_apply_if_finite_skips_a_non_finite_complex_gradient(where):
    """A complex entry's gradient with a NaN in its real or imaginary part is not finite: the step is
    skipped (the points and the state as they were), as for a real one."""
    p = {"z": torch.tensor([1.0 + 1.0j, 0.5 - 2.0j], dtype=torch.complex128), "x": torch.ones(3, dtype=F64)}
    opt = gf.optim.apply_if_finite(gf.optim.radam({}, lr=0.1), max_consecutive_errors=3)
    state = opt.init(p)
    bad = complex(float("nan"), 0.0) if where == "real" else complex(0.0, float("nan"))
    g = {"z": torch.tensor([bad, 1.0 + 0.0j], dtype=torch.complex128), "x": torch.ones(3, dtype=F64)}
    q, state = opt.update(g, state, p)
    assert torch.equal(q["z"], p["z"]) and torch.equal(q["x"], p["x"])
    assert not bool(state.last_finite) and int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1


@pytest.mark.parametrize("name", ["sphere", "psd"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["radam", "radamw"])
def test_a_weight_decay_mask_on_a_space_equals_the_formula(decoupled, name, generator):
    """With ``mask`` the masked entries decay as without it (radamw's Riemannian decay, radam's L2 term) and
    the others do not, each with its own space's maps."""
    space, X, grads = _space_problem(name, generator)
    b0 = torch.randn(4, dtype=F64, generator=generator)
    gb = [torch.randn(4, dtype=F64, generator=generator) for _ in grads]
    factory = gf.optim.radamw if decoupled else gf.optim.radam
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)
    opt = factory({"x": space}, **kwargs, mask={"x": True, "b": False})
    p = {"x": X, "b": b0}
    state = opt.init(p)
    xs, bs = [], []
    for G, B in zip(grads, gb):
        p, state = opt.update({"x": G, "b": B}, state, p)
        xs.append(p["x"])
        bs.append(p["b"])
    _close(xs, _reference_radam(space, X, grads, decoupled=decoupled, **kwargs))
    _close(bs, _reference_radam(gf.Rn(), b0, gb, decoupled=decoupled, **{**kwargs, "weight_decay": 0.0}))


def test_apply_if_finite_skips_a_step_whose_new_points_are_not_finite():
    """Finite gradients whose step overflows (a point of inf) are skipped too: the rule reads the
    gradients *and* the new points (its docstring)."""
    p = {"x": torch.tensor([1.0, -2.0], dtype=F64)}
    opt = gf.optim.apply_if_finite(gf.optim.rsgd({}, lr=1e308), max_consecutive_errors=3)
    state = opt.init(p)
    q, state = opt.update({"x": torch.tensor([10.0, 0.0], dtype=F64)}, state, p)  # x − 1e309: −inf
    assert torch.equal(q["x"], p["x"])
    assert not bool(state.last_finite) and int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1


def test_apply_if_finite_counts_a_non_finite_step_applied_after_too_many():
    """With ``max_consecutive_errors=0`` the first non-finite step is applied (visibly NaN), and still
    counted as not finite: ``last_finite`` False, one skip in a row, one in all; a finite step after it
    resets the count to 0 and keeps the total."""
    p = {"x": torch.tensor([1.0, -2.0], dtype=F64)}
    opt = gf.optim.apply_if_finite(gf.optim.rsgd({}, lr=0.1), max_consecutive_errors=0)
    state = opt.init(p)
    q, state = opt.update({"x": torch.tensor([float("nan"), 1.0], dtype=F64)}, state, p)
    assert torch.isnan(q["x"][0]) and q["x"][1] == -2.1
    assert not bool(state.last_finite) and int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    q, state = opt.update({"x": torch.tensor([1.0, 1.0], dtype=F64)}, state, p)
    torch.testing.assert_close(q["x"], torch.tensor([0.9, -2.1], dtype=F64), atol=0, rtol=TOL[F64])
    assert bool(state.last_finite) and int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1
