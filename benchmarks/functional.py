"""The functional path at small sizes (issue 13): ``torch.func.grad``, MAML and ``torch.compile``.

Each row times one training step (or one forward + backward of a single space) side by side
with the anchors it is judged against; ``ref`` names the anchor of the row's target ratio.
At these sizes the cost is the number of ops and the per-op overhead of autograd and the
transforms, not arithmetic, so the ``mm`` anchor of a row is only nominal.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
import torch._functorch.config
import torch._inductor.config
from torch.func import functional_call, grad, vmap

import geofunc as gf

from .run import GF, GT, Bench, Row, geotorch

Step = Callable[[], object]

# Interleaved rounds per row (a full run): these rows are ratios of milliseconds on a shared box, where
# a burst of load moves one round's sample by 20%; the median of 25 rounds (a few seconds a row) moves
# less. Each sample follows an untimed call of the same step (Timer.interleaved's ``warm``): a training
# loop runs its step back to back, and the first call after another contender paid for that one's
# caches and allocator state (the grad step ~0.1× of backward() more, measured with and without).
ROUNDS = 25


# ------------------------------------------------------------------ the README's program
def _twenty_lines(b: Bench, batch: int = 32):
    """The README's model, constraints and data (Linear 64→128 Stiefel, Linear 128→10 LowRank(4))."""
    with torch.random.fork_rng():  # the layers' default init, reproducible, the global RNG untouched
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(b.dtype)
    c = {"0.weight": gf.Stiefel(), "2.weight": gf.LowRank(rank=4)}
    # sampled on the CPU (the CPU generator), then moved: the same point on every device
    params = gf.sample(c, {k: v.detach() for k, v in model.named_parameters()}, generator=b.gen)
    params = {k: v.to(b.device) for k, v in params.items()}
    model = model.to(b.device)
    raw, bases = gf.from_manifold(c, params)
    x = b.randn(batch, 64)
    y = torch.randint(0, 10, (batch,), generator=b.gen).to(b.device)
    return model, c, params, raw, bases, x, y


def _adam_step(tensors: list[torch.Tensor], grads: Any, opt: torch.optim.Optimizer) -> None:
    for t, g in zip(tensors, grads):
        t.grad = g
    opt.step()


class TrainStep:
    """A contender's training step that can restart from a remembered state.

    Training moves the raw tensors away from their chart's centre (no ``rebase`` in the README's
    loop), so the exponential's degree, and the step's cost, grow with the number of steps taken:
    MAML's meta-step took 42 ms after 10 steps, 49 ms after 100 and 68 ms after 300 (degree 8,
    12, 16). ``settle(n)`` takes ``n`` steps and remembers the trained tensors and the optimizer's
    state; ``restore()`` (untimed, before each sample: ``Timer.interleaved``) puts them back, so every
    sample times the step at the same operating point, whatever the number of rounds.
    """

    def __init__(self, step: Callable[[], None], tensors: list[torch.Tensor], opt: torch.optim.Optimizer):
        self.step, self.tensors, self.opt = step, tensors, opt
        self.saved: Any = None

    def __call__(self) -> None:
        self.step()

    def settle(self, n: int) -> None:
        for _ in range(n):
            self.step()
        self.saved = ([t.detach().clone() for t in self.tensors], copy.deepcopy(self.opt.state_dict()))

    def restore(self) -> None:
        if self.saved is None:
            return
        values, state = self.saved
        with torch.no_grad():
            for t, v in zip(self.tensors, values):
                t.copy_(v)
        self.opt.load_state_dict(copy.deepcopy(state))


SETTLE = 100  # steps before the operating point is fixed: the README program's loop


def settle(fns: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Take every training step ``SETTLE`` times (2 in a quick run) and fix its operating point there."""
    for f in fns.values():
        if isinstance(f, TrainStep):
            f.settle(2 if quick else SETTLE)
    return fns


def grad_step(g_fn: Callable, raw: dict, *args: Any, lr: float = 1e-3,
              after: Callable[[dict], None] | None = None) -> TrainStep:
    """The README's loop body: ``g = g_fn(raw, *args)`` (``grad(loss)``, maybe compiled), then Adam on ``raw``
    (then ``after(raw)``, if given, as part of the step)."""
    raw = {k: v.detach().clone() for k, v in raw.items()}
    opt = torch.optim.Adam(list(raw.values()), lr=lr)

    def step() -> None:
        g = g_fn(raw, *args)
        _adam_step(list(raw.values()), [g[k] for k in raw], opt)
        if after is not None:
            after(raw)

    return TrainStep(step, list(raw.values()), opt)


class RebaseStep(TrainStep):
    """A training step that re-centres the charts after each update (``gf.rebase``: the dynamic
    trivialization, DESIGN's Riemannian gradient descent), so the raw tensors stay near 0; the bases
    are part of the remembered state."""

    def __init__(self, step: Callable[[], None], tensors: list[torch.Tensor], opt: torch.optim.Optimizer, bases: dict):
        super().__init__(step, tensors, opt)
        self.bases = bases
        self.saved_bases: Any = None

    def settle(self, n: int) -> None:
        super().settle(n)
        self.saved_bases = {k: copy.deepcopy(v) for k, v in self.bases.items()}

    def restore(self) -> None:
        super().restore()
        if self.saved_bases is not None:
            self.bases.update({k: copy.deepcopy(v) for k, v in self.saved_bases.items()})


def grad_rebase_step(g_fn: Callable, constraints: dict, raw: dict, bases: dict, *args: Any, lr: float = 1e-3) -> RebaseStep:
    """:func:`grad_step`, then ``raw, bases = gf.rebase(constraints, raw, bases)`` (timed: it is part of the
    step); the new raw values are copied into the optimizer's tensors, whose Adam moments carry over."""
    bases = dict(bases)  # the step's own, updated in place: g_fn reads it every call

    def rebase(raw: dict) -> None:
        with torch.no_grad():
            new_raw, new_bases = gf.rebase(constraints, raw, bases)
            for k in raw:
                raw[k].copy_(new_raw[k])
            bases.update(new_bases)

    s = grad_step(g_fn, raw, bases, *args, lr=lr, after=rebase)
    return RebaseStep(s.step, s.tensors, s.opt, bases)


def backward_step(loss: Callable, raw: dict, *args: Any, lr: float = 1e-3) -> TrainStep:
    """The same loss and optimizer with ``loss(raw, *args).backward()``."""
    raw = {k: v.detach().clone().requires_grad_() for k, v in raw.items()}
    opt = torch.optim.Adam(list(raw.values()), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(raw, *args).backward()
        opt.step()

    return TrainStep(step, list(raw.values()), opt)


def module_step(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3) -> TrainStep:
    """A constrained module's step: cross-entropy ``backward()``, then Adam on its parameters."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()

    return TrainStep(step, list(module.parameters()) + list(module.buffers()), opt)


def _constrained_module(lib: Any, model: torch.nn.Module, params: dict) -> torch.nn.Module:
    """A copy of ``model`` with GeoTorch's one-liners from ``lib`` (``geofunc.nn`` or ``geotorch``), at ``params``."""
    m = copy.deepcopy(model)
    with torch.random.fork_rng():  # the one-liners draw an initial point from the global RNG
        lib.orthogonal(m[0], "weight")
        lib.low_rank(m[2], "weight", 4)
    with torch.no_grad():
        m[0].weight, m[2].weight = params["0.weight"].clone(), params["2.weight"].clone()
        m[0].bias.copy_(params["0.bias"])
        m[2].bias.copy_(params["2.bias"])
    return m


def twenty_line_rows(b: Bench, targets: bool, compile_: bool) -> list[Row]:
    """The README's step under ``torch.func.grad`` beside its anchors (and compiled, if ``compile_``)."""
    model, c, params, raw, bases, x, y = _twenty_lines(b)

    def loss(raw, bases, x, y):
        p = gf.to_manifold(c, raw, bases)
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def plain_loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    plain = {k: v.detach().clone() for k, v in model.named_parameters()}
    fns: dict[str, Step] = {
        GF: grad_step(grad(loss), raw, bases, x, y),
        "unconstrained": grad_step(grad(plain_loss), plain, x, y),
        "backward()": backward_step(loss, raw, bases, x, y),
        "unconstrained backward()": backward_step(plain_loss, plain, x, y),
        "gf.nn module": module_step(_constrained_module(gf.nn, model, params), x, y),
        "geofunc + rebase": grad_rebase_step(grad(loss), c, raw, bases, x, y),
    }
    if geotorch is not None:
        fns[GT + " module"] = module_step(_constrained_module(geotorch, model, params), x, y)
    rows = [
        b.run(
            "twenty-line step, torch.func.grad",
            "batch 32",
            128,
            settle(fns, b.quick),
            heavy=False,
            rounds=ROUNDS,
            ref="unconstrained",
            target="≤ 5× unconstrained; ≤ 1.2× backward()" if targets else "",
            check=(lambda r: r.times[GF] <= 5 * r.times["unconstrained"] and r.times[GF] <= 1.2 * r.times["backward()"])
            if targets
            else None,
            note="README's program (Linear 64→128 Stiefel, Linear 128→10 LowRank(4), batch 32, Adam); "
            "'unconstrained': the same step without constraints; 'backward()': the same loss, loss.backward(); "
            "'unconstrained backward()': the step without constraints by loss.backward() (its ratio to 'unconstrained' is "
            "what torch.func.grad itself costs the plain model, not the target's contender); "
            "modules: one-liners (gf.nn, GeoTorch) and loss.backward(); every sample starts after 100 Adam steps (lr 1e-3) "
            "from the sampled point, no rebase (TrainStep); 'geofunc + rebase': the geofunc step then gf.rebase "
            "(timed), as after every one of its 100 steps, so the charts stay near their centres (not the target's contender)",
        )
    ]
    if compile_:
        rows.append(_compiled_row(b, loss, plain_loss, raw, bases, plain, x, y, targets))
    return rows


def _compiled_row(b, loss, plain_loss, raw, bases, plain, x, y, targets: bool) -> Row:
    """``torch.compile(grad(loss), fullgraph=True)``; the compile time is a cold one (no on-disk caches)."""
    torch._dynamo.reset()
    compiled = {}
    variants = {GF: (loss, (raw, bases, x, y), "default"), "plain compiled": (plain_loss, (plain, x, y), "default")}
    if b.device.type == "cuda":  # CUDA graphs: one launch per step (needs no host reads in the graph)
        variants[GF + ", reduce-overhead"] = (loss, (raw, bases, x, y), "reduce-overhead")
        variants["plain, reduce-overhead"] = (plain_loss, (plain, x, y), "reduce-overhead")
    failed = {}
    for name, (f, args, mode) in variants.items():
        cg = torch.compile(grad(f), fullgraph=True, mode=mode)
        if mode == "reduce-overhead":  # a training loop's step boundary: the last step's outputs are dead
            cg = (lambda cg: lambda *a: (torch.compiler.cudagraph_mark_step_begin(), cg(*a))[1])(cg)
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            t0 = time.perf_counter()
            try:
                cg(*args)
                if mode == "reduce-overhead":
                    cg(*args)  # CUDA graphs record on the second call
            except Exception as e:  # reported in the row's note
                if mode != "reduce-overhead":
                    raise
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            compiled[name] = (cg, time.perf_counter() - t0)
    fns = {
        GF: grad_step(compiled[GF][0], raw, bases, x, y),
        "eager": grad_step(grad(loss), raw, bases, x, y),
        "plain compiled": grad_step(compiled["plain compiled"][0], plain, x, y),
    }
    for name, (f, args, mode) in variants.items():
        if mode == "reduce-overhead" and name in compiled:
            fns[name] = grad_step(compiled[name][0], *args)
    return b.run(
        "twenty-line step, torch.compile(grad)",
        "batch 32",
        128,
        settle(fns, b.quick),
        heavy=False,
        rounds=ROUNDS,
        ref="eager",
        target="eager ÷ compiled ≥ 3" if targets else "",
        check=(lambda r: r.times["eager"] >= 3 * r.times[GF]) if targets else None,
        note=f"torch.compile(grad(loss), fullgraph=True), inductor; cold compile time (first call, on-disk caches off) geofunc "
        f"{compiled[GF][1]:.0f} s, plain {compiled['plain compiled'][1]:.0f} s"
        + "".join(f", {k} (CUDA graphs; compiled after the two above: warm in-memory caches; two calls) {v[1]:.0f} s"
                  for k, v in compiled.items() if k.endswith("reduce-overhead"))
        + "".join(f"; {k} failed: {v}" for k, v in failed.items())
        + "; 'eager': geofunc's torch.func.grad step; "
        "every sample starts after 100 Adam steps, as in the row above",
        extra={"compile_s": compiled[GF][1]},
    )


# ------------------------------------------------------------------ MAML
def sinusoid_tasks(n_tasks: int, k: int, generator: torch.Generator, dtype: torch.dtype):
    """``n_tasks`` sinusoid regression tasks (amplitude, phase random), ``k`` support and ``k`` query points."""
    amp = torch.rand(n_tasks, 1, 1, generator=generator, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=generator, dtype=dtype) * math.pi
    xs = torch.rand(n_tasks, 2 * k, 1, generator=generator, dtype=dtype) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    return xs[:, :k], ys[:, :k], xs[:, k:], ys[:, k:]


#: The constrained MAML model's constraint: its hidden weight on SO.
MAML_CONSTRAINTS = {"2.weight": gf.SO()}


def maml(width: int = 40, inner_steps: int = 5, alpha: float = 0.01, constrained: bool = True,
         dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
         device: torch.device | str = "cpu"):
    """MAML on sinusoids: an MLP 1-``width``-``width``-1 whose hidden weight is on ``SO`` (or free).

    Returns ``(task_loss, raw, bases)``: ``task_loss(raw, bases, xs, ys, xq, yq)`` takes
    ``inner_steps`` plain gradient steps on every raw tensor from the support set, then returns the
    query loss. ``vmap`` it over tasks and take its ``grad`` for the meta-gradient (grad of grad).
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                    torch.nn.ReLU(), torch.nn.Linear(width, 1)).to(dtype)
    c = MAML_CONSTRAINTS if constrained else {}
    params = gf.sample(c, {k: v.detach() for k, v in model.named_parameters()}, generator=generator)
    params = {k: v.to(device) for k, v in params.items()}  # sampled on the CPU (a CPU generator), then moved
    model = model.to(device)
    raw, bases = gf.from_manifold(c, params)

    def loss(raw, bases, x, y):
        p = gf.to_manifold(c, raw, bases)
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    def task_loss(raw, bases, xs, ys, xq, yq):
        for _ in range(inner_steps):
            g = grad(loss)(raw, bases, xs, ys)
            raw = {k: raw[k] - alpha * g[k] for k in raw}
        return loss(raw, bases, xq, yq)

    return task_loss, raw, bases


def meta_loss(task_loss: Callable) -> Callable:
    """The mean query loss over a batch of tasks (``vmap`` over the tasks' leading dimension)."""

    def f(raw, bases, xs, ys, xq, yq):
        return vmap(task_loss, in_dims=(None, None, 0, 0, 0, 0))(raw, bases, xs, ys, xq, yq).mean()

    return f


def maml_row(b: Bench, targets: bool, n_tasks: int, width: int) -> Row:
    """One MAML meta-step (grad of the vmapped task losses, Adam) beside the unconstrained one."""
    tasks = tuple(t.to(b.device) for t in sinusoid_tasks(n_tasks, 10, b.gen, b.dtype))
    fns = {}
    for name, constrained in ((GF, True), ("unconstrained", False)):
        task_loss, raw, bases = maml(width, constrained=constrained, dtype=b.dtype, generator=b.gen, device=b.device)
        fns[name] = grad_step(grad(meta_loss(task_loss)), raw, bases, *tasks)
        if constrained:
            fns["geofunc + rebase"] = grad_rebase_step(grad(meta_loss(task_loss)), MAML_CONSTRAINTS, raw, bases, *tasks)
    return b.run(
        f"MAML, MLP 1-{width}-{width}-1, SO hidden",
        f"{n_tasks} tasks, 5 inner steps",
        width,
        settle(fns, b.quick),
        heavy=False,
        rounds=ROUNDS,
        ref="unconstrained",
        target="≤ 3× unconstrained" if targets else "",
        check=(lambda r: r.times[GF] <= 3 * r.times["unconstrained"]) if targets else None,
        note="grad of (vmap over tasks of 5 inner grad steps on raw, then the query loss), Adam meta-step; "
        "'unconstrained': the same MLP without SO; every sample starts after 100 meta-steps, no rebase (TrainStep); "
        "'geofunc + rebase': gf.rebase of the meta-parameters after each meta-step (timed), so every task's inner "
        "steps start at the chart's centre (not the target's contender)",
    )


# ------------------------------------------------------------------ single spaces
def space_row(b: Bench, name: str, M: gf.AbstractSpace, shape: tuple[int, int], targets: bool,
              forward: bool = False) -> Row:
    """One space alone: ``⟨G, to_manifold(Z, base)⟩`` differentiated by ``torch.func.grad`` and by autograd."""
    Z = b.raw(*shape).detach()
    G = b.randn(*shape)
    _, base = M.from_manifold(M.sample(shape, generator=b.gen, dtype=b.dtype).to(b.device))

    def f(Z):
        return (M.to_manifold(Z, base) * G).sum()

    Zg = Z.clone().requires_grad_()
    fns: dict[str, Step] = {GF: lambda: grad(f)(Z), "autograd": lambda: torch.autograd.grad(f(Zg), [Zg])}
    if forward:
        fns["forward, no grad"] = lambda: M.to_manifold(Z, base)
    return b.run(
        f"{name}, torch.func.grad",
        f"{shape[0]}×{shape[1]}",
        max(shape),
        fns,
        heavy=False,
        rounds=ROUNDS,
        ref="autograd",
        target="≤ 1.2× autograd" if targets else "",
        check=(lambda r: r.times[GF] <= 1.2 * r.times["autograd"]) if targets else None,
        note="forward + backward of ⟨G, to_manifold(Z, base)⟩: grad(f)(Z) vs torch.autograd.grad",
    )


def functional_cases(b: Bench, targets: bool) -> list[Row]:
    """Every row of issue 13 (the compiled step only in a full run: compiling takes minutes)."""
    q = b.quick
    rows = twenty_line_rows(b, targets, compile_=not q)
    rows.append(maml_row(b, targets, 4 if q else 25, 8 if q else 40))
    rows.append(space_row(b, "Stiefel", gf.Stiefel(), (128, 64), targets))
    rows.append(space_row(b, "LowRank(4)", gf.LowRank(rank=4), (10, 128), targets, forward=True))
    return rows
