"""geofunc against GeoTorch and torch.nn.utils.parametrizations, side by side, in one process.

Usage::

    python -m benchmarks                 # full CPU run, writes benchmarks/RESULTS.md + cost_vs_n.png
    python -m benchmarks --quick         # small sizes, a smoke run (the test suite runs it)
    python -m benchmarks --device cuda   # sizes up to 4096 (see benchmarks/gpu.sh)

Method. Every case builds one closure per contender (one forward + backward, or one
training step) on the same random raw parameters of a trained-like scale (entries
~ N(0, 1/n), never zeros), plus the reference ``torch.mm`` of two n×n matrices. After a
warm-up, the closures are timed *interleaved* (round robin, the order rotated every
round) so that load from other processes hits every contender alike; the table reports
medians, the ratio ``contender / geofunc`` and the cost in matmul-equivalents (time ÷ the
n×n mm timed alongside). Nothing is installed at run time: GeoTorch comes from the
``bench`` extra (``pip install -e .[bench]``); without it its columns read "n/a".
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import geofunc as gf

try:  # optional anchor (the `bench` extra)
    import geotorch  # type: ignore[import-not-found]
except Exception:  # pragma: no cover (depends on the environment)
    geotorch = None

try:  # optional anchor (the `flows` extra): zuko's own linear flow layers
    import zuko  # type: ignore[import-not-found]

    from geofunc.contrib.zuko import LinearTransform as GFLinear
except Exception:  # pragma: no cover (depends on the environment)
    zuko = None

HERE = os.path.dirname(os.path.abspath(__file__))
GF, GT, PT = "geofunc", "geotorch", "torch.param"


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, f: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        f()
        self.sync()
        return time.perf_counter() - t0

    def many(self, f: Callable[[], object], inner: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        self.sync()
        return (time.perf_counter() - t0) / inner

    def interleaved(
        self, fns: dict[str, Callable[[], object]], warmup: int, repeats: int, budget: float, sample: float = 0.02,
        warm: bool = False,
    ) -> dict[str, float]:
        """Per-call medians of ``repeats`` round-robin rounds after ``warmup`` calls each.

        A sample of a fast function repeats it ``inner`` times (calibrated in the warm-up so
        that a sample lasts ≥ ``sample`` seconds): microsecond-scale calls are not timed one
        by one. Stops early (after 3 rounds at least) once ``budget`` seconds are spent.
        ``warm``: one untimed call before each sample, so that a sample measures the steady state
        of back-to-back calls (a training loop's) rather than the first call after another
        contender left the caches and the allocator in its own state.
        """
        names = list(fns)
        inner = {}
        for name in names:
            dts = [self.once(fns[name]) for _ in range(max(1, warmup))]
            if len(dts) < 2 and dts[0] < 0.5:  # a first call (lazy init) is not the cost
                dts.append(self.once(fns[name]))
            inner[name] = max(1, min(1000, math.ceil(sample / max(min(dts), 1e-7))))
        times: dict[str, list[float]] = {k: [] for k in names}
        start = time.perf_counter()
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                restore = getattr(fns[name], "restore", None)  # a training step's fixed operating point
                if restore is not None:
                    restore()
                if warm:
                    fns[name]()
                times[name].append(self.many(fns[name], inner[name]))
            if r >= 2 and time.perf_counter() - start > budget:
                break
        return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- cases
@dataclass
class Row:
    case: str
    size: str
    n_ref: int
    times: dict[str, float]
    mm: float
    target: str = ""
    check: Optional[Callable[["Row"], Optional[bool]]] = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    ref: str = ""  # the anchor of the row's target ratio (functional rows): geofunc ÷ ref is reported

    def ratio(self, other: str, base: str = GF) -> Optional[float]:
        if other not in self.times or base not in self.times:
            return None
        return self.times[other] / self.times[base]

    def mmeq(self, name: str) -> Optional[float]:
        return self.times[name] / self.mm if name in self.times else None

    def met(self) -> Optional[bool]:
        return None if self.check is None else self.check(self)


class Bench:
    def __init__(self, device: torch.device, quick: bool, dtype: torch.dtype = torch.float32):
        self.device, self.quick, self.dtype = device, quick, dtype
        self.timer = Timer(device)
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.rows: list[Row] = []
        self.warmup = 1 if quick else 2
        self.repeats = 3 if quick else 7
        self.budget = 2.0 if quick else (8.0 if device.type == "cuda" else 30.0)

    # helpers
    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, dtype=self.dtype) * scale).to(self.device)

    def raw(self, *shape: int) -> torch.Tensor:
        """Trained-like raw parameters: entries ~ N(0, 1/n), n the largest dimension."""
        return self.randn(*shape, scale=1.0 / math.sqrt(max(shape[-2:]))).requires_grad_()

    def mm_fn(self, n: int) -> Callable[[], object]:
        a, b = self.randn(n, n), self.randn(n, n)
        return lambda: torch.mm(a, b)

    def fb(self, X_fn: Callable[[], torch.Tensor], wrt: list[torch.Tensor], G: torch.Tensor) -> Callable[[], object]:
        """One forward + backward: ``X = X_fn()``, then the vector-Jacobian product with ``G``."""
        return lambda: torch.autograd.grad(X_fn(), wrt, G)

    def module_fb(self, module: torch.nn.Module, name: str, G: torch.Tensor) -> Callable[[], object]:
        orig = getattr(module.parametrizations, name).original
        return lambda: torch.autograd.grad(getattr(module, name), [orig], G)

    def linear(self, n: int, k: int) -> torch.nn.Linear:
        return torch.nn.Linear(k, n, bias=True, device=self.device, dtype=self.dtype)

    def set_original(self, module: torch.nn.Module, name: str, Z: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(module.parametrizations, name).original.copy_(Z)

    def run(
        self, case: str, size: str, n_ref: int, fns: dict[str, Callable[[], object]], heavy: bool = True,
        rounds: int | None = None, **kw
    ) -> Row:
        """Time ``fns`` and a ``n_ref``×``n_ref`` matmul interleaved. ``heavy=False``: a case whose
        functions are cheap at any n (only the matmul anchor is slow) keeps the full repeats;
        ``rounds``: that many interleaved rounds instead, each sample after an untimed call (a full run
        only; still within the budget)."""
        fns = dict(fns)
        fns["mm"] = self.mm_fn(n_ref)
        big = heavy and n_ref >= 1024 and self.device.type == "cpu"
        rounds = None if self.quick or big else rounds
        t = self.timer.interleaved(
            fns, 1 if big else self.warmup, 3 if big else rounds or self.repeats, self.budget,
            0.002 if self.quick else 0.02, warm=rounds is not None,
        )
        mm = t.pop("mm")
        row = Row(case, size, n_ref, t, mm, **kw)
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


def _geotorch_note() -> str:
    return "" if geotorch is not None else "geotorch not installed"


def so_case(b: Bench, n: int, triv: str, targets: bool) -> Row:
    Z = b.raw(n, n)
    G = b.randn(n, n)
    M = gf.SO(triv=triv)
    base = M.sample((n, n), generator=b.gen, dtype=b.dtype).to(b.device)
    fns = {GF: b.fb(lambda: M.to_manifold(Z, base), [Z], G)}
    if geotorch is not None:
        lin = b.linear(n, n)
        geotorch.orthogonal(lin, "weight", triv=triv)
        b.set_original(lin, "weight", Z.detach())
        fns[GT] = b.module_fb(lin, "weight", G)
    lin2 = b.linear(n, n)
    torch.nn.utils.parametrizations.orthogonal(lin2, "weight", orthogonal_map="matrix_exp" if triv == "expm" else "cayley")
    b.set_original(lin2, "weight", Z.detach())
    fns[PT] = b.module_fb(lin2, "weight", G)
    if triv == "expm":
        target = "GeoTorch ÷ geofunc ≥ 4, geofunc ≤ 35 mm-eq"
        check = lambda r: _ge(r.ratio(GT), 4) and r.mmeq(GF) <= 35 and _ge(r.ratio(PT), 1)
    else:
        target = "GeoTorch ÷ geofunc ≥ 1"
        check = lambda r: _ge(r.ratio(GT), 1) and _ge(r.ratio(PT), 1)
    return b.run(f"SO({n}) {triv}", f"{n}×{n}", n, fns, target=target if targets else "", check=check if targets else None)


def unitary_case(b: Bench, n: int) -> Row:
    """U(n) in the complex dtype of the bench's: geofunc's exponential against torch's unitary
    parametrization (matrix_exp). The mm-eq column is in real n×n matmuls (a complex one costs ~4)."""
    c = torch.complex64 if b.dtype == torch.float32 else torch.complex128
    crandn = lambda scale: (torch.randn(n, n, generator=b.gen, dtype=c) * scale).to(b.device)
    Z, G = crandn(1.0 / math.sqrt(n)).requires_grad_(), crandn(1.0)
    M = gf.Unitary()
    base = M.sample((n, n), generator=b.gen, dtype=c).to(b.device)
    fns = {GF: b.fb(lambda: M.to_manifold(Z, base), [Z], G)}
    lin = torch.nn.Linear(n, n, bias=False, device=b.device, dtype=c)
    torch.nn.utils.parametrizations.orthogonal(lin, "weight", orthogonal_map="matrix_exp")
    b.set_original(lin, "weight", Z.detach())
    fns[PT] = b.module_fb(lin, "weight", G)
    return b.run(f"Unitary({n}) expm, {str(c).removeprefix('torch.')}", f"{n}×{n}", n, fns)


def stiefel_case(b: Bench, n: int, k: int, targets: bool, need: float) -> Row:
    Z = b.raw(n, k)
    G = b.randn(n, k)
    M = gf.Stiefel()
    base = M.sample((n, k), generator=b.gen, dtype=b.dtype).to(b.device)
    fns = {GF: b.fb(lambda: M.to_manifold(Z, base), [Z], G)}
    if geotorch is not None:
        lin = b.linear(n, k)
        geotorch.orthogonal(lin, "weight")
        b.set_original(lin, "weight", Z.detach())
        fns[GT] = b.module_fb(lin, "weight", G)
    lin2 = b.linear(n, k)
    torch.nn.utils.parametrizations.orthogonal(lin2, "weight", orthogonal_map="matrix_exp")
    b.set_original(lin2, "weight", Z.detach())
    fns[PT] = b.module_fb(lin2, "weight", G)
    return b.run(
        f"Stiefel({n}×{k}) expm",
        f"{n}×{k}",
        n,
        fns,
        target=f"GeoTorch ÷ geofunc ≥ {need:g}" if targets else "",
        check=(lambda r: _ge(r.ratio(GT), need) and _ge(r.ratio(PT), 1)) if targets else None,
    )


def factored_case(b: Bench, label: str, M: gf.AbstractSpace, gt_fn, n: int, k: int, need: float, targets: bool) -> Row:
    Z = b.raw(n, k)
    G = b.randn(n, k)
    _, base = M.from_manifold(M.sample((n, k), generator=b.gen, dtype=torch.float64).to(b.dtype))
    base = torch.utils._pytree.tree_map(lambda t: t.to(b.device), base)
    fns = {GF: b.fb(lambda: M.to_manifold(Z, base), [Z], G)}
    if geotorch is not None:
        lin = b.linear(n, k)
        gt_fn(lin)
        b.set_original(lin, "weight", Z.detach())
        fns[GT] = b.module_fb(lin, "weight", G)
    return b.run(
        label,
        f"{n}×{k}",
        n,
        fns,
        target=f"GeoTorch ÷ geofunc ≥ {need:g}" if targets else "",
        check=(lambda r: _ge(r.ratio(GT), need)) if targets else None,
    )


def sphere_case(b: Bench, n: int, targets: bool) -> Row:
    z = (b.randn(n) / math.sqrt(n) + 1.0 / math.sqrt(n)).requires_grad_()
    G = b.randn(n)
    M = gf.Sphere()
    base = M.sample((n,), generator=b.gen, dtype=b.dtype).to(b.device)  # GeoTorch keeps a base too
    fns = {GF: b.fb(lambda: M.to_manifold(z, base), [z], G)}
    # The same module-to-module as GeoTorch: gf.nn.sphere on a Linear's bias (parametrize).
    lin_gf = b.linear(n, 4)
    gf.nn.sphere(lin_gf, "bias")
    b.set_original(lin_gf, "bias", z.detach())
    fns["geofunc nn"] = b.module_fb(lin_gf, "bias", G)
    if geotorch is not None:
        lin = b.linear(n, 4)
        geotorch.sphere(lin, "bias")
        with torch.no_grad():
            lin.parametrizations.bias.original.copy_(z.detach())
        fns[GT] = b.module_fb(lin, "bias", G)
    return b.run(
        f"Sphere({n})",
        f"{n}",
        n,
        fns,
        heavy=False,
        target="GeoTorch ÷ geofunc ≥ 1" if targets else "",
        check=(lambda r: _ge(r.ratio(GT), 1)) if targets else None,
    )


def logabsdet_case(b: Bench, n: int, targets: bool) -> Row:
    M = gf.GLp()
    Z = b.raw(n, n)
    X = M.to_manifold(Z.detach()).requires_grad_()
    _, base = M.from_manifold(X.detach().double())
    base = torch.utils._pytree.tree_map(lambda t: t.to(b.dtype), base)
    Z0 = torch.zeros_like(Z)
    with torch.no_grad():
        Z0.diagonal().copy_(M.from_manifold(X.detach().double())[0].diagonal().to(b.dtype))
    Z0.requires_grad_()
    fns = {
        GF: lambda: torch.autograd.grad(M.logabsdet(Z0, base), [Z0]),
        "slogdet": lambda: torch.autograd.grad(torch.linalg.slogdet(X)[1], [X]),
        # The cheapest reverse pass that reaches the diagonal of an n×n leaf: what no eager
        # O(n) log-determinant can undercut (slogdet ÷ this = the highest reachable ratio).
        "autograd floor": lambda: torch.autograd.grad(Z0.diagonal().sum(), [Z0]),
    }
    b.run(
        f"GLp({n}).logabsdet forward",
        f"{n}×{n}",
        n,
        {GF: lambda: M.logabsdet(Z0.detach(), base), "slogdet": lambda: torch.linalg.slogdet(X.detach())},
        note="forward only: slogdet of the point (LU) vs Σ log f(sᵢ) from the factorization",
    )
    return b.run(
        f"GLp({n}).logabsdet",
        f"{n}×{n}",
        n,
        fns,
        target="slogdet ÷ geofunc ≥ 50 (fwd+bwd)" if targets else "",
        check=(lambda r: _ge(r.ratio("slogdet"), 50)) if targets else None,
        note="forward + backward (the normalizing-flow use); 'autograd floor': grad of Z.diagonal().sum() alone, the eager engine's fixed cost",
    )


def hurwitz_case(b: Bench, n: int) -> Row:
    """``Hurwitz.from_manifold`` (a Lyapunov solve) against GeoTorch's ``Hurwitz.right_inverse``, float64.

    GeoTorch builds the n²×n² Kronecker system ``I⊗Aᵀ + Aᵀ⊗I`` and solves it densely: n⁴ entries
    and O(n⁶) flops. Where that matrix would not fit (n = 256: 4.3e9 entries, 34 GB) it is not
    run, and the row says how much memory it would have needed. Float64 because GeoTorch's
    inverse checks an absolute residual of 1e-4, which its float32 solve misses from n ≈ 64.
    """
    dtype = b.dtype
    b.dtype = torch.float64  # the row's matmul anchor too
    try:
        M = gf.Hurwitz()
        X = M.sample((n, n), generator=b.gen, dtype=torch.float64).to(b.device)
        nn_M = gf.nn.Hurwitz((n, n)).to(X)
        fns = {GF: lambda: M.from_manifold(X), GF + " nn": lambda: nn_M.right_inverse(X)}
        need = n**4 * 8
        note = ("float64; geofunc: the matrix sign function's Newton iteration, O(n³); geofunc nn: the whole "
                "gf.nn.Hurwitz.right_inverse (GeoTorch's membership test, the solve, the PSD chart's eigh)")
        if geotorch is not None and need <= 2**30:
            Mg = geotorch.Hurwitz((n, n)).to(device=b.device, dtype=torch.float64)
            fns[GT] = lambda: Mg.right_inverse(X)
        elif geotorch is not None:
            note += (f"; GeoTorch not run: its n²×n² Kronecker system has n⁴ = {n**4:.3g} entries, "
                     f"{need / 1e9:.0f} GB in float64")
        return b.run(f"Hurwitz({n}).from_manifold", f"{n}×{n}", n, fns, note=note)
    finally:
        b.dtype = dtype


def zuko_cases(b: Bench, n: int, batch: int) -> list[Row]:
    """A flow's linear layer on a batch of ``batch`` vectors, geofunc (``geofunc.contrib.zuko``)
    against zuko's layers, each building its matrix from its raw parameter on every call as a
    flow does. Density (training): y, log|det| and the backward of ``Σ y² + Σ log|det|`` to the
    raw parameter. Sampling: the inverse map, forward only."""
    if zuko is None:
        return []
    rows = []
    x = b.randn(batch, n)
    Z = b.raw(n, n)
    so, glp = gf.SO(), gf.GLp()
    _, glp_base = glp.from_manifold(glp.sample((n, n), generator=b.gen, dtype=torch.float64).to(b.device, b.dtype))
    lu = torch.linalg.lu_factor(glp.to_manifold(Z.detach(), glp_base))[0].requires_grad_()  # a packed LU of the same size

    def density(make):
        def step():
            y, ladj = make().call_and_ladj(x)
            return torch.autograd.grad(y.square().sum() + ladj.sum(), [Z] if make is not lu_t else [lu])
        return step

    so_t = lambda: GFLinear(so, Z)
    rot_t = lambda: zuko.transforms.RotationTransform(torch.tril(Z, -1))  # the same matrix as so_t
    glp_t = lambda: GFLinear(glp, Z, glp_base)
    lu_t = lambda: zuko.transforms.LULinearTransform(lu)
    rows.append(b.run(f"flow layer SO({n}), density", f"{n}×{n}, batch {batch}", n,
                      {GF: density(so_t), "zuko Rotation": density(rot_t)},
                      note="y = W x, log|det W| and their backward; zuko RotationTransform = expm(A − Aᵀ) by torch.linalg.matrix_exp"))
    rows.append(b.run(f"flow layer GLp({n}), density", f"{n}×{n}, batch {batch}", n,
                      {GF: density(glp_t), "zuko LULinear": density(lu_t)},
                      note="GLp: two SO charts + Σ log f(sᵢ); zuko LULinearTransform: W = L U (one matmul), Σ log|Lᵢᵢ|"))
    with torch.no_grad():
        rows.append(b.run(f"flow layer SO({n}), sampling", f"{n}×{n}, batch {batch}", n,
                          {GF: lambda: so_t().inv(x), "zuko Rotation": lambda: rot_t().inv(x)},
                          note="the inverse map: Wᵀ y for both"))
        rows.append(b.run(f"flow layer GLp({n}), sampling", f"{n}×{n}, batch {batch}", n,
                          {GF: lambda: glp_t().inv(x), "zuko LULinear": lambda: lu_t().inv(x), "GLp + solve": lambda: torch.linalg.solve(glp.to_manifold(Z, glp_base), x.mT)},
                          note="geofunc: V diag(1/σ) Uᵀ y from rebase's frames; zuko: two triangular solves; 'GLp + solve': the LU route on geofunc's matrix"))
    return rows


# ------------------------------------------------------------------ training steps
def _mlp(width: int, depth: int, device, dtype) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layers.append(torch.nn.Linear(width, width, device=device, dtype=dtype))
        if i < depth - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _weight_names(depth: int) -> list[str]:
    return [f"{2 * i}.weight" for i in range(depth)]


class FunctionalTrainer:
    """geofunc's step: raw parameters + bases, any torch optimizer on the raw tensors, then
    ``rebase`` (dynamic trivialization: the generator stays small, so the exponential is cheap)."""

    def __init__(self, model, constraints, params, lr, x, y, ensemble: bool, rebase: bool = True):
        self.model, self.c, self.x, self.y, self.ensemble, self.do_rebase = model, constraints, x, y, ensemble, rebase
        raw, self.bases = gf.from_manifold(constraints, params)
        self.raw = {k: v.detach().clone().requires_grad_() for k, v in raw.items()}
        self.opt = torch.optim.Adam(list(self.raw.values()), lr=lr)

    def loss(self, raw, bases, x, y):
        p = gf.to_manifold(self.c, raw, bases)
        return torch.nn.functional.mse_loss(torch.func.functional_call(self.model, p, (x,)), y)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.ensemble:
            losses = torch.func.vmap(self.loss, in_dims=(0, 0, None, None))(self.raw, self.bases, self.x, self.y)
            losses.sum().backward()
        else:
            self.loss(self.raw, self.bases, self.x, self.y).backward()
        self.opt.step()
        if self.do_rebase:
            with torch.no_grad():
                new_raw, self.bases = gf.rebase(self.c, self.raw, self.bases)
                for k in self.c:
                    self.raw[k].copy_(new_raw[k])


def module_step(models: list[torch.nn.Module], opt, x, y) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for m in models:
            torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()

    return step


def train_case(b: Bench, width: int, batch: int, targets: bool) -> Row:
    depth = 3
    x, y = b.randn(batch, width), b.randn(batch, width)
    lr = 1e-3
    names = _weight_names(depth)
    c = {k: gf.SO() for k in names}
    plain = _mlp(width, depth, b.device, b.dtype)
    fns: dict[str, Callable[[], object]] = {"unconstrained": module_step([plain], torch.optim.Adam(plain.parameters(), lr=lr), x, y)}
    model = _mlp(width, depth, b.device, b.dtype)
    params = {k: v.detach().cpu() for k, v in model.named_parameters()}
    params = gf.sample(c, params, generator=b.gen)  # CPU generator: sample on CPU, then move
    params = {k: v.to(b.device, b.dtype) for k, v in params.items()}
    tr = FunctionalTrainer(model, c, params, lr, x, y, ensemble=False)
    fns[GF] = tr.step
    # the same functional step without rebase, from trained-like raw values (static trivialization)
    tr2 = FunctionalTrainer(model, c, params, lr, x, y, ensemble=False, rebase=False)
    with torch.no_grad():
        for k in names:
            tr2.raw[k].copy_(b.raw(width, width).detach())
    fns[GF + " static"] = tr2.step
    if geotorch is not None:
        gm = _mlp(width, depth, b.device, b.dtype)
        for i in range(depth):
            geotorch.orthogonal(gm[2 * i], "weight")
            b.set_original(gm[2 * i], "weight", b.raw(width, width).detach())
        fns[GT] = module_step([gm], torch.optim.Adam(gm.parameters(), lr=lr), x, y)
    row = b.run(
        f"train step 3×Linear({width}) SO, Adam",
        f"batch {batch}",
        width,
        fns,
        target="geofunc ≤ 10× the unconstrained step" if targets else "",
        check=(lambda r: r.times[GF] / r.times["unconstrained"] <= 10) if targets else None,
        note="geofunc: Adam on raw + rebase each step; 'static': no rebase, trained-like raw; GeoTorch: default (static)",
    )
    return row


def ensemble_case(b: Bench, n_models: int, width: int, batch: int, targets: bool) -> Row:
    depth = 2
    x, y = b.randn(batch, width), b.randn(batch, width)
    lr = 1e-3
    names = _weight_names(depth)
    c = {k: gf.SO() for k in names}
    model = _mlp(width, depth, "meta", b.dtype)
    stacked = {k: torch.stack([v.detach().to("cpu")] * n_models) for k, v in _mlp(width, depth, "cpu", b.dtype).named_parameters()}
    stacked = gf.sample(c, stacked, generator=b.gen)
    stacked = {k: v.to(b.device, b.dtype) for k, v in stacked.items()}
    model = _mlp(width, depth, b.device, b.dtype)
    tr = FunctionalTrainer(model, c, stacked, lr, x, y, ensemble=True)
    fns: dict[str, Callable[[], object]] = {GF: tr.step}
    if geotorch is not None:
        models = []
        for _ in range(n_models):
            m = _mlp(width, depth, b.device, b.dtype)
            for i in range(depth):
                geotorch.orthogonal(m[2 * i], "weight")
                b.set_original(m[2 * i], "weight", b.raw(width, width).detach())
            models.append(m)
        opt = torch.optim.Adam([p for m in models for p in m.parameters()], lr=lr)
        fns[GT] = module_step(models, opt, x, y)
    return b.run(
        f"ensemble {n_models}× 2×Linear({width}) SO, Adam",
        f"batch {batch}",
        width,
        fns,
        target="GeoTorch loop ÷ geofunc vmap ≥ 10" if targets else "",
        check=(lambda r: _ge(r.ratio(GT), 10)) if targets else None,
        note="geofunc: one vmap over the stacked raw params + Adam + rebase; GeoTorch: a loop over the models",
    )


# --------------------------------------------------------------------------- report
def _ge(x: Optional[float], v: float) -> Optional[bool]:
    return None if x is None else x >= v


def _fmt_t(t: Optional[float]) -> str:
    if t is None:
        return "n/a"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_row(r: Row) -> str:
    parts = [f"{r.case:<40s}"]
    for k, v in r.times.items():
        parts.append(f"{k}={_fmt_t(v)} ({v / r.mm:.1f} mm)")
    if GT in r.times:
        parts.append(f"GT/gf={r.ratio(GT):.1f}x")
    if r.ref:
        parts.append(f"gf/{r.ref}={r.times[GF] / r.times[r.ref]:.2f}x")
    m = r.met()
    if m is not None:
        parts.append("MET" if m else "NOT MET")
    return "  ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} logical cores)"


def write_results(b: Bench, path: str, args, elapsed: float, failures: Optional[list[str]] = None) -> None:
    lines = [
        "# geofunc benchmarks" + (" (quick smoke run)" if b.quick else ""),
        "",
        f"* device: **{device_name(b.device)}**; dtype {str(b.dtype).removeprefix('torch.')} unless a row's note names "
        f"another; torch {torch.__version__}; "
        f"torch.set_num_threads({torch.get_num_threads()}); geotorch {getattr(geotorch, '__version__', 'not installed')}",
        f"* {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, command: `python -m benchmarks {' '.join(sys.argv[1:])}`",
        "* medians of interleaved rounds after warm-up; **mm-eq** = time ÷ one n×n `torch.mm` timed alongside; "
        "ratio = contender ÷ geofunc (> 1: geofunc faster). Forward + backward (a vector-Jacobian product) unless "
        "the case is a training step. Raw parameters ~ N(0, 1/n), random bases.",
    ]
    if b.device.type == "cpu":
        lines.append(
            "* CPU numbers come from a **shared 2-core box** on which other jobs ran: absolute times are noisy; "
            "the interleaving makes the ratios and mm-eq the meaningful columns."
        )
    if geotorch is None:
        lines.append("* **GeoTorch is not installed**: its columns read n/a (`pip install -e .[bench]`).")
    lines += [
        "",
        "| case | size | geofunc | geofunc mm-eq | GeoTorch | GeoTorch mm-eq | GeoTorch ÷ geofunc | other anchors (÷ geofunc) | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in b.rows:
        others = []
        for k, v in r.times.items():
            if k in (GF, GT):
                continue
            others.append(f"{k} {_fmt_t(v)} ({v / r.times[GF]:.2f})")
        m = r.met()
        lines.append(
            f"| {r.case} | {r.size} | {_fmt_t(r.times.get(GF))} | {_fmt(r.mmeq(GF))} | {_fmt_t(r.times.get(GT))} | "
            f"{_fmt(r.mmeq(GT))} | {_fmt(r.ratio(GT), '.2f')} | {'; '.join(others)} | {r.target} | "
            f"{'' if m is None else ('yes' if m else '**no**')} |"
        )
    functional = [r for r in b.rows if r.ref]
    if functional:
        lines += [
            "",
            "Functional path (issue 13): each contender's time ÷ the row's reference (its `ref`), side by side.",
            "",
            "| case | size | contender | time | ÷ reference | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in functional:
            m = r.met()
            for i, (k, v) in enumerate(r.times.items()):
                first = i == 0
                lines.append(
                    f"| {r.case if first else ''} | {r.size if first else ''} | {k}{' (ref)' if k == r.ref else ''} | "
                    f"{_fmt_t(v)} | {v / r.times[r.ref]:.2f} | {r.target if first else ''} | "
                    f"{'' if m is None or not first else ('yes' if m else '**no**')} |"
                )
    notes = [f"* {r.case}: {r.note}" for r in b.rows if r.note]
    if notes:
        lines += ["", "Notes:", ""] + notes
    if failures:
        lines += ["", "Sections that raised (`--keep-going`; their rows are missing):", ""] + [f"* {f}" for f in failures]
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(b: Bench, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib not installed: no plot"
    if not any(r.case.startswith("SO(") for r in b.rows):
        return "no SO(n) case run: no plot"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix, style in (("expm", "-"), ("cayley", "--")):
        rows = [r for r in b.rows if r.case.startswith("SO(") and r.case.endswith(prefix)]
        if not rows:
            continue
        for who, color in ((GF, "C0"), (GT, "C1"), (PT, "C2")):
            pts = [(r.n_ref, r.mmeq(who)) for r in rows if who in r.times]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{who} SO {prefix}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("forward + backward cost (n×n matmuls)")
    ax.set_title(f"SO(n) trivializations, {device_name(b.device)[:40]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 1: the CPU box is shared)")
    p.add_argument("--out", default=None, help="results markdown path (default benchmarks/RESULTS[-quick|-cuda].md)")
    p.add_argument("--only", default=None, help="comma-separated substrings of case names to run")
    p.add_argument("--keep-going", action="store_true",
                   help="a section that raises is reported (traceback printed, named under the table) and the run goes on")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    suffix = "-quick" if args.quick else ("" if device.type == "cpu" else f"-{device.type}")
    out = args.out or os.path.join(HERE, f"RESULTS{suffix}.md")
    png = os.path.splitext(out)[0].replace("RESULTS", "cost_vs_n") + ".png"
    if os.path.basename(png) == os.path.basename(out):
        png = os.path.splitext(out)[0] + "_cost_vs_n.png"
    print(f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"geotorch {'not installed (columns skipped)' if geotorch is None else geotorch.__version__}", flush=True)
    b = Bench(device, args.quick)
    t0 = time.perf_counter()
    cuda = device.type == "cuda"
    q = args.quick
    so_sizes = [32, 64] if q else ([256, 1024, 2048, 4096] if cuda else [64, 128, 256, 512, 1024])
    targets = not q and not cuda  # the issue's targets are CPU targets; on CUDA the table only reports
    only = [s.strip().lower() for s in args.only.split(",")] if args.only else None

    def want(name: str) -> bool:
        return only is None or any(s in name for s in only)

    failures: list[str] = []

    def section(name: str, run_it: Callable[[], None]) -> None:
        """Run one section; write the table after it, so a run stopped later still leaves these rows."""
        if not want(name):
            return
        try:
            run_it()
        except Exception:
            if not args.keep_going:
                raise
            tb = traceback.format_exc()
            print(f"section {name} failed:\n{tb}", flush=True)
            failures.append(f"{name}: {tb.strip().splitlines()[-1]}")
        write_results(b, out, args, time.perf_counter() - t0, failures)

    def _so() -> None:
        for n in so_sizes:
            so_case(b, n, "expm", targets and n in (256, 1024))
    section("so", _so)

    def _cayley() -> None:
        for n in ([64] if q else ([1024, 4096] if cuda else [256, 1024])):
            so_case(b, n, "cayley", targets)
    section("cayley", _cayley)

    def _unitary() -> None:
        for n in ([32] if q else ([256, 1024] if cuda else [64, 256])):
            unitary_case(b, n)
    section("unitary", _unitary)

    def _stiefel() -> None:
        for n, k, need in ([(128, 16, 1)] if q else ([(1024, 256, 25), (1024, 16, 1), (4096, 1024, 25)] if cuda else [(1024, 256, 25), (1024, 16, 1)])):
            stiefel_case(b, n, k, targets, need)
    section("stiefel", _stiefel)

    def _lowrank() -> None:
        n = 64 if q else (4096 if cuda else 1024)
        factored_case(b, f"LowRank(rank=16) {n}×{n}", gf.LowRank(rank=16), lambda m: geotorch.low_rank(m, "weight", 16), n, n, 50, targets)
    section("lowrank", _lowrank)

    def _psd() -> None:
        n = 64 if q else (2048 if cuda else 1024)
        factored_case(b, f"PSD({n})", gf.PSD(), lambda m: geotorch.positive_definite(m, "weight"), n, n, 3, targets)
    section("psd", _psd)

    def _glp() -> None:
        n = 32 if q else (1024 if cuda else 256)
        factored_case(b, f"GLp({n})", gf.GLp(), lambda m: geotorch.invertible(m, "weight"), n, n, 3, targets)
    section("glp", _glp)

    def _ensemble() -> None:
        ensemble_case(b, 8 if q else 64, 16 if q else 32, 16 if q else 64, targets)
    section("ensemble", _ensemble)

    def _train() -> None:
        train_case(b, 64 if q else (2048 if cuda else 512), 32 if q else (1024 if cuda else 256), targets)
    section("train", _train)

    def _logabsdet() -> None:
        logabsdet_case(b, 32 if q else 256, targets)
        if not q:
            logabsdet_case(b, 1024, False)
    section("logabsdet", _logabsdet)

    def _sphere() -> None:
        sphere_case(b, 64 if q else 1024, targets)
    section("sphere", _sphere)

    def _functional() -> None:
        from benchmarks.functional import functional_cases

        functional_cases(b, targets)
    section("functional", _functional)

    def _hurwitz() -> None:
        for n in ([16] if q else ([64, 256, 1024] if cuda else [64, 256])):
            hurwitz_case(b, n)
    section("hurwitz", _hurwitz)

    def _zuko() -> None:
        for n in ([16] if q else ([256, 1024] if cuda else [64, 256])):
            zuko_cases(b, n, 64 if q else 256)
    section("zuko", _zuko)
    elapsed = time.perf_counter() - t0
    write_results(b, out, args, elapsed, failures)
    msg = plot(b, png)
    print(f"wrote {out}" + (f" and {png}" if msg is None else f" ({msg})") + f" in {elapsed:.0f} s", flush=True)
    return b.rows


if __name__ == "__main__":
    main()
