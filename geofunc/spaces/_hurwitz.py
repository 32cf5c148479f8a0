"""Hurwitz (alpha-stable) matrices: every eigenvalue has real part at most −alpha."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, final

import torch
import torch.nn.functional as F

from .._dtensor import gather
from .._errors import ManifoldError, describe, error, first_index
from .._expm import _FAR
from .._fastpath import add_second_order, derivative_mode
from .._linalg import Triv, eye_like, poison, sanitize
from ._base import (LOW_PRECISION, AbstractSpace, cached_attribute, can_check, compute_cached, real_hyperparameter,
                    rounding_dtype, shapes_only)
from ._psd import PSD
from ._orthogonal import validate_triv
from ._skew import Skew
from ._values import floor_eps, softplus_inverse

__all__ = ["Hurwitz", "lyapunov"]

Tensor = torch.Tensor

# Note [Lyapunov by the matrix sign function]
# For a Hurwitz B, the Lyapunov equation BᵀP + PB = −C has one solution, P ≻ 0 when C ≻ 0, and
#     sign([[Bᵀ, C], [0, −B]]) = [[−I, 2P], [0, I]]
# (the block matrix is [[I, P], [0, I]] diag(Bᵀ, −B) [[I, P], [0, I]]⁻¹, and sign(Bᵀ) = −I,
# sign(−B) = I). Newton's iteration H ← (μH + (μH)⁻¹)/2 keeps the block-triangular form, so it
# runs on n×n blocks: with A₀ = B, F₀ = C,
#     A ← (μA + A⁻¹/μ)/2,   F ← (μF + A⁻ᵀ F A⁻¹/μ)/2,   μ = |det A|^(−1/n)
# (determinant scaling), A → −I and F → 2P quadratically once close. Each step is one n×n
# LU (inverse and determinant) and three products: O(n³), against O(n⁶) time and n⁴ memory for the n²×n² Kronecker
# system (34 GB in float64 at n = 256). The iteration stops when ‖A + I‖_F ≤ √n·1e3·ε (one more
# step then reaches rounding); it is capped at _MAX_ITERS. Under torch.func transforms and
# torch.compile, where a data-dependent stop is impossible, it always takes _MAX_ITERS steps
# (A = −I, F = 2P is a fixed point, so the extra steps change nothing but rounding).
# Measured: 7 to 21 steps for random n = 5…256 matrices with stability margins 1…1e-4.
_MAX_ITERS = 40


def lyapunov(B: Tensor, C: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Solve ``BᵀP + PB = −C`` (``C = I`` by default) for a batch of Hurwitz ``B``; O(n³).

    The matrix sign function's Newton iteration (Note [Lyapunov by the matrix sign function]).
    Returns ``(P, err)``: the symmetric solution and, per matrix, ``‖A_K + I‖_F/√n`` of the
    last iterate (small when converged; not small, or NaN, when ``B`` is not Hurwitz).
    """
    P, err, _ = _lyapunov_steps(B, C)
    return P, err


# Note [One sign iteration for every right-hand side]
# The iterates A_k of the sign iteration (and their inverses and scalings μ_k) depend on B alone; the
# right-hand side enters only the F recurrence, which is linear in it. A second solve with the same B (the
# certificate's refinement, Note [Hurwitz certificate refined where its checks fail]) therefore replays the
# steps of the first (_lyapunov_replay: two products a step) instead of factoring the same matrices again.
# Eager mode stops the iteration from A's error alone, so the replay takes the steps a fresh solve would
# have taken: the same values, bit for bit. Under transforms and torch.compile, where every solve takes
# _MAX_ITERS steps, a refined from_manifold records one iteration's LUs instead of three (Dynamo's graph
# of from_manifold on a 3×3 matrix: 3103 → 1803 nodes; vmap of 16×5×5 float64, one thread: 60 → 33 ms).
# The steps are held until from_manifold returns: one inverse of the batch per step (7–21 steps measured in
# eager mode, _MAX_ITERS under transforms, where the graph holds them anyway).
def _lyapunov_steps(B: Tensor, C: Tensor | None = None) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """:func:`lyapunov`, and the steps ``(A_k⁻¹, μ_k)`` it took (Note [One sign iteration for every right-hand side])."""
    n = B.shape[-1]
    eye = eye_like(B, n)
    A = sanitize(B)
    Fk = eye.expand_as(A) if C is None else C
    tol = 1e3 * torch.finfo(B.dtype).eps
    adaptive = can_check(B) and (C is None or can_check(C))
    extra = 1  # steps after the tolerance is met (eager mode)
    steps = []
    for _ in range(_MAX_ITERS):
        # One LU gives both the inverse and |det| (inv_ex + slogdet would factor twice).
        LU, piv, _ = torch.linalg.lu_factor_ex(A)
        Ai = torch.linalg.lu_solve(LU, piv, eye.expand_as(A))
        # kept (..., 1, 1): vmap over an empty batch fails on a 0-dim per-sample scalar op
        lad = torch.diagonal(LU, dim1=-2, dim2=-1).abs().log().sum(-1, keepdim=True)[..., None]
        mu = torch.exp(lad / -n)
        A = 0.5 * (mu * A + Ai / mu)
        Fk = _sign_step(Fk, Ai, mu)
        steps.append((Ai, mu))
        if adaptive:
            err = torch.linalg.matrix_norm(A + eye) / math.sqrt(n)
            if bool((err <= tol).all()) or not bool(torch.isfinite(err).all()):
                if extra == 0:
                    break
                extra -= 1
    err = torch.linalg.matrix_norm(A + eye, keepdim=True) / math.sqrt(n) + poison(B)[..., :1, :1]
    return _sign_solution(Fk, B), err[..., 0, 0], steps


def _sign_step(Fk: Tensor, Ai: Tensor, mu: Tensor) -> Tensor:
    return 0.5 * (mu * Fk + Ai.mT @ Fk @ Ai / mu)


def _sign_solution(Fk: Tensor, B: Tensor) -> Tensor:
    """``P`` from the last ``F`` of the sign iteration (``F → 2P``), symmetrized; NaN where ``B`` is not finite."""
    return 0.25 * (Fk + Fk.mT) + poison(B)


def _lyapunov_replay(B: Tensor, C: Tensor, steps: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``P`` with ``BᵀP + PB = −C`` from the steps that :func:`_lyapunov_steps` took for ``B`` (Note [One sign
    iteration for every right-hand side])."""
    Fk = C
    for Ai, mu in steps:
        Fk = _sign_step(Fk, Ai, mu)
    return _sign_solution(Fk, B)


# Note [Hurwitz certificate refined where its checks fail]
# The sign iteration's P is accurate to ~ε·cond(P) but its Lyapunov residual R = BᵀP + PB + I is not small where P is
# ill-conditioned (|R| up to 4.8 in float32, 0.31 in float64, for points project returned), and the chart's
# reconstruction from P is exactly off by it: W(S − I/2) = B − W·sym(R)/2 for W = P⁻¹, S = skew(PB). So the round
# trip check (Note [Hurwitz right inverse off by its conditioning]) refused points the chart holds well (the raw
# tensor from a float64 certificate came back within 1e-7–5e-4 in float32): 0–15% of float32 projections and
# retractions of 3×3…32×32 Gaussian matrices of scale 0.2…10, 5% (5×5) and 18% (16×16) of float32 rsgd iterates
# with the constraint active (float64: 0–10%, rsgd 1–5%), all accepted by contains. So eager from_manifold refines
# the certificate of a matrix that fails a check: P ← P + Δ with BᵀΔ + ΔB = −R (R in B's dtype; one more sign
# iteration, on that batch), _REFINE_STEPS times at most, then checks as before (the same 1/64 bound and
# positivity test). A matrix that passes is returned as computed, bit for bit and at the same cost (no step runs);
# under transforms nothing is checked, and the refinement runs on the values (Note [Hurwitz certificate refined under
# transforms]). Measured after: float64 none refused, float32 1 of 200
# projections and 2 of 600 rsgd iterates (a certificate with cond(P) > 1/(n·ε) in float64 too, or a round trip
# still 0.09 off after the steps: the chart's own conditioning, float64 holds them).
_CONVERGED = 1e-2  # the sign iteration's ‖A + I‖_F/√n up to which B counts as Hurwitz (eager checks)
_REFINE_STEPS = 2

# Note [Hurwitz certificate refined under transforms]
# Under torch.func transforms and torch.compile nothing is read, and from_manifold returned the unrefined
# certificate's raw tensor: for projections of 6×6 Gaussian matrices (scales 1…300) 1–3 of 16 came back with
# to_manifold(from_manifold(X)) up to 0.065 (float64) and 3.6 (float32, near-singular inputs) off X, relative,
# with no error, where eager mode refines them to within 1/64 (Note [Hurwitz certificate refined where its
# checks fail]). There the same refinement runs on every matrix's values, _REFINE_STEPS times, and
# torch.where keeps it where the checks fail (a matrix that passes is returned as computed, as in eager
# mode): the results are eager mode's. Cost: the checks and a replay of the sign iteration per step (Note [One
# sign iteration for every right-hand side]), under transforms only (from_manifold is not on an optimizer step's
# path: rebase does not solve); measured against the unrefined call, float64, one thread, two rounds
# (benchmarks/transformed_hurwitz.py): vmap 64×5×5 15–19 → 26–41 ms, 16×16×16 14–16 → 50–51 ms; jvp 1.5–1.9×;
# compiled 2–2.9× (eager mode unchanged).


def _converged(err: Tensor) -> Tensor:
    """Per matrix: the sign iteration's error is finite and at most ``_CONVERGED``."""
    return torch.isfinite(err) & (err <= _CONVERGED)


def _refined(B: Tensor, P: Tensor, steps: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``P + Δ`` with ``BᵀΔ + ΔB = −R``, ``R = BᵀP + PB + I`` the residual of ``P``: one step of iterative refinement
    in ``B``'s dtype (Note [Hurwitz certificate refined where its checks fail]), on the sign iteration's ``steps``
    for ``B`` (Note [One sign iteration for every right-hand side])."""
    R = B.mT @ P + P @ B + eye_like(B, B.shape[-1])
    D = _lyapunov_replay(B, 0.5 * (R + R.mT), steps)
    P = P + D
    return 0.5 * (P + P.mT)


# Note [Gather, not take_along_dim]
# The top eigenvalue's entries are read with ``gather`` and an index expanded to the output's shape,
# not ``torch.take_along_dim``, whose broadcasting of the index against the input guards the batch
# size to its value under torch.compile's automatic dynamic shapes (torch 2.13: ``Eq(s17, 9)``):
# a compiled step over a batch of Hurwitz matrices whose batch size changed recompiled at every new
# size (8 sizes, 8 graphs, then eager after the recompile limit), where every other space compiles
# one dynamic graph. ``gather`` with an index of the output's shape broadcasts nothing.
def _take(T: Tensor, i: Tensor, dim: int) -> Tensor:
    """``T`` at position ``i`` (``(*batch, 1)``) along ``dim`` (-1 or -2): ``(*batch, 1)``, or for a
    matrix ``(*batch, 1, n)`` (row, ``dim=-2``) or ``(*batch, n, 1)`` (column, ``dim=-1``)
    (Note [Gather, not take_along_dim])."""
    if T.dim() == i.dim():
        return T.gather(-1, i)
    index = i.unsqueeze(-1) if dim == -2 else i.unsqueeze(-2)
    return T.gather(dim, index.expand(*T.shape[:-2], *((1, T.shape[-1]) if dim == -2 else (T.shape[-2], 1))))


def _described(X: Tensor) -> str:
    """``describe(X)`` with the dtype the caller passed: inside a bf16/fp16 call ``X`` is its float32 copy
    (Note [Low precision] in ``_base.py``), and the messages named that copy's dtype."""
    return describe(X).replace(f"dtype {X.dtype}", f"dtype {rounding_dtype(X.dtype)}")


def _abscissa(Y: Tensor, eig: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The spectral abscissa ``max Re λ(Y)``, batch-shaped.

    Value from ``eig`` of the detached input; derivatives from the perturbation series of the top
    eigenvalue ``i`` (simple where the abscissa is differentiable; a complex pair has one real part):
    with ``M = V⁻¹ dY V`` (right eigenvectors ``V``), ``dλᵢ = Mᵢᵢ`` and
    ``½ d²λᵢ = Σ_{j≠i} Mᵢⱼ Mⱼᵢ/(λᵢ − λⱼ)``, added as terms that are zero in value. So first and second
    derivatives are exact under every transform, and no eigenvector derivative with its divisions by
    eigenvalue gaps enters a backward or jvp (an eigenvalue tied with the top one is left out of the
    second-order sum: the abscissa has no second derivative there). ``eig``: ``eig`` of the detached,
    sanitized ``Y`` where the caller has it.
    """
    lam, V = torch.linalg.eig(sanitize(Y.detach())) if eig is None else eig
    re = lam.real
    i = re.argmax(-1, keepdim=True)
    a = _take(re, i, -1).squeeze(-1)
    mode = derivative_mode(Y)
    if mode == "none":  # nothing differentiates: the terms are 0 in value
        return a + poison(Y)[..., 0, 0]
    Vi = torch.linalg.inv_ex(V).inverse
    tie = math.sqrt(torch.finfo(re.dtype).eps)
    floor = torch.finfo(re.dtype).tiny ** 0.25  # (numbers: the closure below holds no tensor but its arguments)

    def terms(Yd: Tensor, V: Tensor, Vi: Tensor, i: Tensor, lam: Tensor, first: bool = True, second: bool = True) -> Any:
        # (the tensors as arguments: the lazy node saves them, Note [Node state as saved tensors])
        D = (Yd - Yd.detach()).to(V.dtype)  # zero in value (NaN where Y is not finite); carries every tangent
        Vr = _take(Vi, i, -2) @ D  # row i of V⁻¹ D
        row = (Vr @ V).squeeze(-2)  # Mᵢⱼ
        out = _take(row, i, -1).squeeze(-1).real if first else None
        if second:
            col = (Vi @ (D @ _take(V, i, -1))).squeeze(-1)  # Mⱼᵢ
            gap = _take(lam, i, -1) - lam
            # relative to max|λ| (absolute below tiny^¼, where 1/gap² terms would overflow): √ε·max(1, |λ|) dropped
            # every pair of a Y with entries ~1e-4 (float32; 1e-9 float64), whose d²a was then 0
            far = gap.abs() > tie * lam.abs().amax(-1, keepdim=True).clamp(min=floor)
            inv_gap = torch.where(far, 1.0 / torch.where(far, gap, torch.ones_like(gap)), torch.zeros_like(gap))
            s2 = (row * col * inv_gap).sum(-1).real
            out = s2 if out is None else out + s2
        return out

    if mode == "chain":
        return a + terms(Y, V, Vi, i, lam)
    return add_second_order(lambda *ts: terms(*ts, first=False), a + terms(Y, V, Vi, i, lam, second=False), Y,
                            state=(V, Vi, i, lam))  # Note [Lazy second-order terms]


# Note [Hurwitz project inside the chart of the stored dtype]
# A bf16/fp16 chart point has a certificate W = P⁻¹ (BᵀP + PB = −I, B = X + alpha·I) with λ_min(W) ≥ the floor √ε
# of the stored dtype (Note [Hurwitz floor of the stored dtype]), and from_manifold in that dtype refuses a point
# below it (the chart has no raw tensor for it). project's abscissa margin c (Note [Hurwitz margin of the stored
# dtype]) says nothing of W: λ_min(W) ≤ 2c, equal only for a normal B, so most projected points were below the
# floor and from_manifold (and a gf.nn assignment, its right inverse) refused them: 7–92% of bf16 projections of
# 3×3…16×16 Gaussian matrices of scale 0.2…3 (fp16 8–46%), λ_min(W) down to 0.002 of the floor; 18% (bf16) and 36%
# (fp16) of rsgd iterates after 100 steps with the constraint active. So a bf16/fp16 project shifts by a further
# s ≥ 0, the least with λ_min(W) ≥ 1.25·floor (a slack for the rounding of the stored point): λ_min(W) of B − sI
# rises with s at slope ≤ 2 (dλ_max(P)/ds ≥ −2λ_max(P)²), and a point already there is left as it is. P is read in B's eigenbasis from the eig project computes anyway,
# P = V⁻ᴴ (G ∘ K) V⁻¹ with G = VᴴV and K_ij = 1/(2s − conj(βᵢ) − βⱼ), and s is found by Newton's iteration on
# s ↦ λ_min(W) (dP/ds = −2 V⁻ᴴ (G ∘ K²) V⁻¹), _SHIFT_STEPS steps at most; at each one Cholesky factorization of
# G/target − G ∘ K (congruent to I/target − P) tells which matrices are there (they take no step), and in eager
# mode when every matrix is, so a point
# inside costs ~0.1 of the eig (measured: 0.2–0.8 ms beside 2–4 ms, 256×5×5, 16×16×16, 64×64), and a projected
# one 1–2 Newton steps (each aimed 5% past the target, which from below it could only approach). Under torch.func/compile the steps all run (a step
# is 0 where the target is met, so the result is eager's, and a matrix's the same alone or in any batch: a step
# aimed past the target moved a met matrix beside unmet ones, by up to an ulp of the stored dtype). s is capped by the log-norm's shift
# λ_max(sym B) + target/2, which always suffices (‖e^{Bt}‖ ≤ e^{λ_max(sym B)t}), and falls back to it where the
# iteration has not met the target (a defective or strongly non-normal B whose eigenbasis is unreliable: a 4×4
# Jordan block). s carries no derivative (project's derivative is that of Y − (a + alpha + c)·I where s > 0).
# Measured after: none of those projections nor iterates refused, λ_min(W) of the stored point ≥ 1.24·floor;
# bf16 rsgd's loss on a 5×5 problem with the constraint active 11% above float32's (7% before), fp16 4% (1%).
# float32/float64 calls are unchanged, bit for bit.
_SHIFT_STEPS = 6
_SHIFT_SLACK = 1.25


def _floor_shift(Y0: Tensor, lam: Tensor, V: Tensor, beta0: Tensor, target: float) -> Tensor:
    """The least ``s ≥ 0`` (``(*batch, 1, 1)``, no derivative) with ``λ_min(W) ≥ target`` for the certificate
    ``W = P⁻¹`` of ``B − sI`` (``BᵀP + PB = −I``), ``B = Y0 + beta0·I`` Hurwitz, ``(lam, V)`` the ``eig`` of
    ``Y0``: Newton's iteration on ``s ↦ λ_min(W)`` from ``s = 0``, ``P`` from ``B``'s eigenbasis, capped by (and
    falling back to) the log-norm's shift (Note [Hurwitz project inside the chart of the stored dtype])."""
    beta0 = sanitize(beta0)  # (a NaN point's output is poisoned)
    beta = lam + beta0[..., 0]  # B's eigenvalues, (*batch, n)
    G = V.mH @ V
    # P = V⁻ᴴ (G ∘ K) V⁻¹, K_ij = 1/(2s − conj(βᵢ) − βⱼ) (Hermitian; its real part > 0 for a Hurwitz B − sI)
    den = -(beta.conj()[..., :, None] + beta[..., None, :])
    s = torch.zeros_like(beta0)
    adaptive = can_check(lam)
    Vi = None
    for _ in range(_SHIFT_STEPS):
        d = den + 2.0 * s
        GK = G / d
        # λ_max(P) ≤ 1/target, i.e. G/target − G∘K ⪰ 0 (congruent to I/target − P by V): one Cholesky factorization,
        # no inverse nor eigh (eager: where every matrix is there, the common case, it costs ~0.1 of the eig before it)
        met = torch.linalg.cholesky_ex(G / target - GK)[1] == 0
        if adaptive and bool(met.all()):
            return s
        if Vi is None:
            Vi = torch.linalg.inv_ex(V).inverse
            # λ_max(sym B) ≤ −target/2 makes λ_min(W) ≥ target (‖e^{Bt}‖ ≤ e^{λ_max(sym B)·t}): a shift that always does
            cap = (torch.linalg.eigvalsh(0.5 * (Y0 + Y0.mT))[..., -1:, None] + beta0 + 0.5 * target).clamp(min=0.0)
        P = (Vi.mH @ GK @ Vi).real
        ev, U = torch.linalg.eigh(sanitize(0.5 * (P + P.mT)))  # (a defective V's inverse overflows)
        top, u = ev[..., -1:, None], U[..., -1:]  # λ_max(P) (*batch, 1, 1), its eigenvector (*batch, n, 1)
        w = Vi @ u.to(Vi.dtype)
        # dλ_min(W)/ds = −(dλ_max(P)/ds)/λ_max(P)² (≤ 2), dP/ds = −2 V⁻ᴴ (G ∘ K²) V⁻¹
        slope = 2.0 * (w.mH @ (GK / d) @ w).real / (top * top)
        step = (1.05 * target - 1.0 / top) / slope  # (aimed 5% past it: Newton can approach it from below)
        # (NaN: no step; nor where the target is met, so that a matrix's shift is the same alone, in any batch, under
        # vmap or compiled: a step aimed past the target moved a met matrix beside unmet ones, by up to an ulp of bf16)
        step = torch.where((step > 0) & ~met[..., None, None], step, torch.zeros_like(step))
        s = torch.minimum(s + step, cap)
    # not converged (a strongly non-normal or defective B, whose eigenbasis is unreliable): the cap
    ok = torch.linalg.cholesky_ex(G / target - G / (den + 2.0 * s))[1] == 0
    return torch.where(ok[..., None, None], s, cap)


# Note [Hurwitz floor of the stored dtype]
# Every output of the chart has Re λ ≤ −alpha − λ_min(W)/2, and W's values are softplus(t) with no floor, so that
# W ≻ 0 reaches every positive definite matrix (the chart's reach is limited by the conditioning only). A bf16/fp16
# call computes the point in float32 and rounds it, which moves each entry by up to u·|X_ij| (u the stored dtype's
# unit roundoff); with λ_min(W) far below that the rounded point left the space: 6% of bf16 points of 5×5 raw
# tensors of scale 1 with one raw diagonal entry at −6 (max Re λ +0.008), 24% at scale 3 (+0.2), 5.6% at scale 3
# with no shifted entry; fp16 12% at scale 3, all accepted by contains. So in a bf16/fp16 call W's values are
# softplus(t) + √ε of the stored dtype (0.088 bf16, 0.031 fp16), as the open spaces' floors (README, "bfloat16 and
# float16"): then none of those came back unstable, nor at n = 16 and 64. A point whose W and S spread much more
# (raw scale 10, n = 5: 8% bf16, 1.5% fp16) can still round off the space, as GLp's and PSD's. float32/float64
# calls keep no floor (unchanged, bit for bit). The raw diagonal (W's value coordinates) therefore means another
# point in bf16/fp16 than in float32/float64: a gf.nn module's dtype change re-expresses it (_dtype_coords,
# _coords_floor; Note [Raw tensors across dtypes] in geofunc/nn/_adapter.py), and from_manifold of a bf16/fp16
# point lifts a certificate value below the floor to it (the round trip check refuses the point if that moves it).
def _w_floor(dtype: torch.dtype) -> float:
    """The floor of W's values: √ε of the stored dtype in a bf16/fp16 call (or for a bf16/fp16 dtype), else 0
    (Note [Hurwitz floor of the stored dtype])."""
    stored = rounding_dtype(dtype)
    return floor_eps(stored) if stored in LOW_PRECISION else 0.0


def _w_values(t: Tensor) -> Tensor:
    """W's values ``softplus(t)`` (+ the floor of a bf16/fp16 call)."""
    floor = _w_floor(t.dtype)
    v = F.softplus(t)
    return v + floor if floor else v


def _w_values_inverse(y: Tensor) -> Tensor:
    """Inverse of :func:`_w_values` (a value at or below the floor gives a finite, very negative coordinate)."""
    floor = _w_floor(y.dtype)
    if not floor:
        return softplus_inverse(y)
    return softplus_inverse((y - floor).clamp(min=torch.finfo(y.dtype).tiny))


#: The value map of the factor W: softplus, with no floor in float32/float64 (Note [Hurwitz floor of the stored dtype]).
_W_MAP = (_w_values, _w_values_inverse)
_SKEW = Skew(lower=False)  # the chart of S: the strict upper triangle of Z


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Hurwitz(AbstractSpace):
    r"""Alpha-stable (Hurwitz) matrices: :math:`\{X \in \mathbb{R}^{n\times n} : \operatorname{Re}\lambda_i(X) \le -\alpha\ \forall i\}`.

    Points are ``(*batch, n, n)`` tensors; ``alpha ≥ 0`` (GeoTorch's ``Hurwitz``). A matrix
    ``B = X + αI`` is Hurwitz exactly when ``B = W(S − Q/2)`` with ``W, Q`` symmetric positive
    definite and ``S`` skew-symmetric (``P = W⁻¹`` is a Lyapunov certificate:
    ``BᵀP + PB = −Q``). Fixing ``Q = I`` loses nothing: for every Hurwitz ``B`` there is exactly
    one such pair, ``P`` the solution of ``BᵀP + PB = −I`` and ``S = PB + I/2``. So the chart is
    a single ``n×n`` raw tensor, as for every other space:

    .. math::

        X = W\,(S - \tfrac12 I) - \alpha I,\qquad
        W = Q_b\,\varphi(A)\operatorname{diag}(\operatorname{softplus}(\operatorname{diag} Z))\,\varphi(A)^\top Q_b^\top,\qquad
        S = \operatorname{triu}(Z, 1) - \operatorname{triu}(Z, 1)^\top

    ``W`` is :class:`PSD`'s chart (frame ``Q_b φ(A)``, ``A`` from the strict lower triangle of
    ``Z``, values ``softplus`` with no floor; in a bfloat16/float16 call ``softplus + √ε`` of the stored
    dtype, so that the rounded point stays stable: Note [Hurwitz floor of the stored dtype]) and ``S``
    :class:`Skew`'s (``lower=False``), so the
    lower triangle and diagonal of ``Z`` parametrize ``W``, the strict upper triangle ``S``;
    ``base`` is ``W``'s eigenframe ``Q_b`` (``None``: the identity). Every output has
    ``Re λ ≤ −α − λ_min(W)/2 < −α``.

    * ``from_manifold(X)``: ``P`` from ``BᵀP + PB = −I`` in O(n³) (:func:`lyapunov`, the matrix
      sign function iterated to ``1e3·ε``; no n²×n² Kronecker system), ``W = P⁻¹`` through
      :class:`PSD`'s inverse, ``S = skew(PB)``. A point off the space raises ``ManifoldError``
      naming its largest eigenvalue real part; a point too close to the boundary for a
      numerically positive definite ``P`` raises too (the chart's reach: its reconstruction
      error grows like ``ε·cond(P)``, so keep float64 for matrices near the boundary). In eager mode a matrix
      that fails the certificate or round trip check has its certificate refined first (Note [Hurwitz
      certificate refined where its checks fail]), so the outputs of ``project``/``retract`` are accepted
      (float64; float32 but for certificates beyond its conditioning, ~0.3% measured).
    * ``rebase``: :class:`PSD`'s ``rebase`` of ``W`` (no Lyapunov solve; ``S`` is kept).
    * ``tangent(X, G) = G`` (an open set); ``project(Y) = Y − t I`` with
      ``t = max(0, a(Y) + α + c)``, ``a`` the spectral abscissa, ``c = √ε·max(1, ‖Y − tr(Y)/n·I‖_F)``
      (a canonical point, not the nearest: the least shift of the spectrum that puts it
      ``c`` inside; ``a`` is differentiated in closed form at its eigenvalue, see :func:`_abscissa`);
      ``retract(X, V) = project(X + V)``. For a bfloat16/float16 ``Y``, ``c`` also covers the rounding
      of the stored point, so that it stays stable (Note [Hurwitz margin of the stored dtype]), and the
      shift goes on until the certificate ``W`` reaches the chart's floor of that dtype, so that
      ``from_manifold`` of the same dtype accepts the point (Note [Hurwitz project inside the chart of the
      stored dtype]; that extra shift carries no derivative).
    * ``sample``: ``W`` from :class:`PSD`'s sample (eigenvalues in (0.5, 1.5]), ``S`` from
      :class:`Skew`'s: ``Re λ ≤ −α − 1/4``.
    * Membership: ``max Re λ(X) + α ≤ atol·max(1, ‖X‖_F)``: a relative tolerance, as every space's, so the
      default one accepts matrices with ``Re λ`` up to ``atol·max(1, ‖X‖_F)`` above ``−α`` (float32 1e-4;
      bfloat16 5e-2, float16 1e-2: unstable ones too, e.g. a bf16 ``diag(0.04, −1)``); ``contains(X, atol=0)``
      is the exact test, which the bf16/fp16 outputs of ``to_manifold``, ``project``, ``retract`` and
      ``sample`` pass at moderate scales (their points stay stable once rounded; the Notes on the stored dtype
      say where that ends). In float32/float64 (no floor) a chart point whose ``W`` has eigenvalues below
      ~ε·‖X‖ is stable only to rounding: ``eig`` of the computed point can show ``Re λ`` up to ~15ε·‖X‖_F above
      0 (float32 5×5: 1.4% of points from raw scale 3 with a raw diagonal entry at −10, 17% at −15, 16% at
      raw scale 10), which the default tolerance accepts; keep such weights in float64.

    Example::

        >>> M = Hurwitz(alpha=0.5)
        >>> X = M.to_manifold(torch.randn(4, 4))
        >>> bool(torch.linalg.eigvals(X).real.max() <= -0.5)
        True
    """

    _one_node_maps: ClassVar[tuple[str, ...]] = ("retract", "project")  # Note [Lazy second-order terms]
    # its eager certificate and round-trip checks raise per point (Note [Checks inside a map on DTensors])
    _gathered_maps: ClassVar[frozenset[str]] = frozenset({"_from_manifold", "rebase"})

    alpha: float = 0.0
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        real_hyperparameter(self, "alpha", "`alpha` to be a finite real number ≥ 0")
        validate_triv(self, self.triv)
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _psd(self) -> PSD:
        """The chart of ``W`` (derived from the hyperparameters)."""
        return PSD(f=_W_MAP, triv=self.triv)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def _check_base(self, Z: Tensor, base: Any) -> None:
        if base is None:
            return
        n = Z.shape[-1]
        if isinstance(base, torch.Tensor):  # (before its shape: Note [Dense tensors only] in _base.py)
            self._require_dense(base, "base")
        if not isinstance(base, torch.Tensor) or base.ndim < 2 or tuple(base.shape[-2:]) != (n, n):
            raise error(self, f"`base` to be None or an orthogonal ({n}, {n}) frame of W (as from_manifold returns)",
                        describe(base))
        self._require_frame(Z, base, "base")

    def _shift(self, B: Tensor) -> Tensor:
        return B - self.alpha * eye_like(B, B.shape[-1]) if self.alpha else B

    # ------------------------------------------------------------------ the maps
    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        """``W(S − I/2) − αI`` with ``W`` the PSD chart of ``tril(Z)``, ``S`` the skew chart of ``triu(Z, 1)``."""
        self._check_shape(Z, "Z")
        self._check_base(Z, base)
        W = self._psd.to_manifold(Z, base)
        S = _SKEW.to_manifold(Z)
        return self._shift(W @ S - 0.5 * W)

    def _dtype_coords(self, Z: Tensor) -> Tensor | None:
        """The diagonal of ``Z``: W's value coordinates, whose floor depends on the dtype (Note [Hurwitz floor of
        the stored dtype])."""
        return Z.diagonal(dim1=-2, dim2=-1) if Z.ndim >= 2 else None

    def _coords_floor(self, dtype: torch.dtype) -> float:
        """The floor of W's values for a raw tensor of ``dtype``: √ε of bf16/fp16, 0 for float32/float64."""
        return _w_floor(dtype)

    def _refine_base(self, base: Any, force: bool = False) -> Any:
        """PSD's (the base is the frame of ``W``'s PSD chart)."""
        return self._psd._refine_base(base, force)

    def _invalid_base(self, base: Any) -> str | None:
        """PSD's (the base is the frame of ``W``'s PSD chart)."""
        return self._psd._invalid_base(base)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        n = X.shape[-1]
        B = X + self.alpha * eye_like(X, n)
        P, err, steps = _lyapunov_steps(B)
        if not can_check(X):  # Note [Hurwitz certificate refined under transforms]
            conv = _converged(err[..., None, None])  # (the checks kept (*batch, 1, 1): keepdim)
            for _ in range(_REFINE_STEPS):
                Z, base = self._from_certificate(X, P)
                ok = self._certified(P, err, keepdim=True) & (self._round_trip_error(X, Z, base, keepdim=True) <= _FAR)
                P = torch.where(conv & ~ok, _refined(B, P, steps), P)
            return self._from_certificate(X, P)
        # eager: refine the certificate of the matrices that fail a check, then check (Note [Hurwitz certificate
        # refined where its checks fail]); a batch that passes both is returned as computed
        for step in range(_REFINE_STEPS + 1):
            weak = ~self._certified(P, err)
            if not bool(weak.any()):
                Z, base = self._from_certificate_checked(X, P)
                weak = ~(self._round_trip_error(X, Z, base) <= _FAR)  # (NaN: weak; the check below names it)
                if not bool(weak.any()):
                    return Z, base
            # (a sign iteration that did not converge: not Hurwitz to rounding, refused below, nothing refined)
            if step == _REFINE_STEPS or not bool(_converged(err).all()):
                break
            P = torch.where(weak[..., None, None], _refined(B, P, steps), P)
        self._check_certificate(X, P, err)
        Z, base = self._from_certificate_checked(X, P)
        self._check_round_trip(X, Z, base, P)
        return Z, base

    def _from_certificate_checked(self, X: Tensor, P: Tensor) -> tuple[Tensor, Any]:
        """Eager :meth:`_from_certificate`, naming a certificate whose ``W = P⁻¹`` is off PSD's chart."""
        try:
            return self._from_certificate(X, P)
        except ManifoldError as e:  # W = P⁻¹ off PSD's chart: too close to the boundary
            raise error(self, "a matrix far enough from the stability boundary for this dtype",
                        f"{_described(X)} whose certificate W = P⁻¹ is off the PSD chart ({e})") from None

    def _round_trip_error(self, X: Tensor, Z: Tensor, base: Any, keepdim: bool = False) -> Tensor:
        """``max|to_manifold(Z, base) − X|/max(1, max|X|)`` per matrix, no graph (``keepdim``: ``(*batch, 1, 1)``)."""
        with torch.no_grad():
            X2 = self.to_manifold(Z.detach(), None if base is None else base.detach())
            Xd = X.detach()
            return ((X2 - Xd).abs().amax(dim=(-2, -1), keepdim=keepdim)
                    / Xd.abs().amax(dim=(-2, -1), keepdim=keepdim).clamp(min=1.0))

    # Note [Hurwitz right inverse off by its conditioning]
    # The certificate's residual can be small while W = P⁻¹ and S = skew(PB) amplify it by the
    # Lyapunov equation's conditioning: points of this space's own chart from raw entries of scale
    # 10 (float64, 16×16) came back up to 4.9 off (relative to max(1, max|X|); median 4e-4), float32
    # at scale 3 up to 0.68 (median 4e-4), with a certificate that passed. Eager from_manifold therefore
    # maps the result back (one to_manifold, O(n³), no graph) and refuses a point whose round trip is
    # more than 1/64 off (expm's bound for a point, Note [Too far to be a point]); scales ≤ 1 came back
    # to ~1e-15 (float64) and ~1e-6 (float32). Under transforms only the shape checks run (README,
    # "from_manifold under transforms").
    def _check_round_trip(self, X: Tensor, Z: Tensor, base: Any, P: Tensor) -> None:
        """Eager: refuse ``X`` if ``to_manifold(from_manifold(X))`` is more than 1/64 off it (Note [Hurwitz
        right inverse off by its conditioning]); in a bf16/fp16 call, naming W's floor where the certificate's
        ``W = P⁻¹`` is below it (Note [Hurwitz floor of the stored dtype])."""
        rel = self._round_trip_error(X, Z, base)
        bad = ~(rel <= _FAR)
        if not bool(bad.any()):
            return
        idx = first_index(bad)
        floor = _w_floor(X.dtype)
        if floor:
            w_min = 1.0 / torch.linalg.eigvalsh(sanitize(P.detach()))[..., -1]
            if float(w_min[idx]) < floor:
                raise error(self, f"a matrix whose Lyapunov certificate W = P⁻¹ has eigenvalues ≥ {floor:.3g}, the floor "
                            f"of W in {rounding_dtype(X.dtype)} (so that the chart's points stay stable once rounded)",
                            f"{_described(X)} with least eigenvalue of W {float(w_min[idx]):.3g} (batch index {idx}): "
                            f"too close to the stability boundary for a {rounding_dtype(X.dtype)} chart; float32 "
                            "has no floor")
        raise error(self, "a matrix conditioned well enough for this dtype that its Lyapunov certificate gives "
                    "a right inverse", f"{_described(X)} whose round trip to_manifold(from_manifold(X)) is "
                    f"{float(rel[idx]):.3g} off relative to max(1, max|X|) (batch index {idx}); float64 "
                    "holds more")

    def _certified(self, P: Tensor, err: Tensor, keepdim: bool = False) -> Tensor:
        """Per matrix: the sign iteration converged and ``P`` is numerically positive definite (``keepdim``:
        shape ``(*batch, 1, 1)``, which vmap over an empty batch takes: a per-sample 0-dim select fails there)."""
        lam = torch.linalg.eigvalsh(sanitize(P))[..., None]
        tiny = P.shape[-1] * torch.finfo(P.dtype).eps * lam[..., -1:, :].abs()
        ok = _converged(err[..., None, None]) & (lam[..., :1, :] > tiny)
        return ok if keepdim else ok[..., 0, 0]

    def _check_certificate(self, X: Tensor, P: Tensor, err: Tensor) -> None:
        """Eager: refuse a point with no numerically positive definite Lyapunov certificate."""
        ok = self._certified(P, err)
        if bool(ok.all()):
            return
        bad = ~ok
        idx = first_index(bad)
        a = torch.linalg.eigvals(sanitize(X.detach())).real.amax(-1)
        raise error(self, "a matrix whose X + alpha·I is numerically strictly stable (a Lyapunov certificate "
                    "P ≻ 0 with BᵀP + PB = −I)",
                    f"{_described(X)} with largest eigenvalue real part {float(a[idx]):.6g} (−alpha = "
                    f"{-self.alpha:.6g}) and no positive definite certificate (batch index {idx}): too close to "
                    "the boundary for this dtype")

    def _from_certificate(self, X: Tensor, P: Tensor) -> tuple[Tensor, Any]:
        B = X + self.alpha * eye_like(X, X.shape[-1])
        PB = P @ B
        S = 0.5 * (PB - PB.mT)
        # P⁻¹ by inv: torch.cholesky_inverse's forward-mode derivative is wrong (torch 2.13: jvp of
        # from_manifold 3–9% off; Note [Solves under torch.func] in geofunc/_linalg.py)
        W = torch.linalg.inv_ex(sanitize(P))[0] + poison(P)
        W = 0.5 * (W + W.mT)
        Zw, base = self._psd.from_manifold(W)
        Zs, _ = _SKEW.from_manifold(S)
        return torch.tril(Zw) + torch.triu(Zs, 1), base

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """:class:`PSD`'s ``rebase`` of the ``W`` coordinates; the ``S`` coordinates are kept."""
        self._check_shape(Z, "Z")
        self._check_base(Z, base)
        Zw, base2 = self._psd.rebase(Z, base)
        return torch.tril(Zw) + torch.triu(Z, 1), base2

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G``: the space is open in the n×n matrices."""
        self._check_pair(X, G, "G")
        return G + 0.0 * X

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``project(X + V)`` (``= X + V`` while ``X + V`` stays inside)."""
        self._check_pair(X, V, "V")
        return self.project(X + V)

    # Note [Hurwitz margin of the stored dtype]
    # project (and retract = project(X + V), every optimizer step) puts the spectral abscissa c = √ε·spread
    # inside −alpha. A bf16/fp16 call computes in float32 and rounds the result, which moves each entry by up to
    # u·|X_ij| (u: the stored dtype's unit roundoff); float32's c (3.4e-4·spread) is far inside that, so 12% of
    # bf16 projections of 5×5 Gaussian matrices of scale 3 came back unstable (max Re λ up to +0.09 at alpha = 0)
    # and bf16 rsgd/radam iterates were unstable at 77–99 of 100 steps, all accepted by contains (its bf16
    # tolerance is 5e-2·‖X‖_F). After the shift X = Y − tI has ‖offdiag X‖_F ≤ spread and
    # |X_ii| ≤ spread + |tr X/n| = spread + m + c with m = a(Y) − tr(Y)/n + alpha, so the rounding E has
    # ‖E‖₂ ≤ u(2·spread + m + c); c is raised to c₀ + k(2·spread + m + c) with k = 2u = ε (room for mild
    # non-normality), solved for c: no unstable bf16 iterate in those runs (bf16 rsgd's loss 7% above float32's
    # with the constraint active). √ε of the stored dtype, as the open spaces' floors, kept them stable too but
    # pushed them 0.088·spread inside (37% above). A point whose top eigenvalue is ill-conditioned (strongly
    # non-normal) can still round off (fp16, n = 3, alpha = 50: 0.07% of projections). float32/float64 calls
    # are unchanged.
    def project(self, Y: Tensor) -> Tensor:
        """``Y − tI``: the spectrum shifted left just enough (see the class docstring)."""
        self._check_shape(Y, "Y")
        n = Y.shape[-1]
        eye = eye_like(Y, n)
        # (..., 1, 1) throughout: torch.func.jvp promotes the tangent of a 0-d tensor times a
        # Python float to float64 (torch 2.13), which a single unbatched matrix would hit.
        trace = torch.diagonal(Y, dim1=-2, dim2=-1).mean(-1)[..., None, None]
        # max(1, ‖Y − tr(Y)/n I‖_F) without the norm's derivative at 0 (a multiple of I: the chart's centre),
        # whose double backward is NaN and survived the clamp's zero gradient (0·NaN): the square is clamped
        D = sanitize(Y) - trace * eye
        spread = torch.sqrt((D * D.conj()).real.sum(dim=(-2, -1), keepdim=True).clamp(min=1.0))
        c = spread * math.sqrt(torch.finfo(Y.dtype).eps)
        stored = rounding_dtype(Y.dtype)
        if stored == Y.dtype:
            a = _abscissa(Y)[..., None, None]
            t = (a + self.alpha + c).clamp(min=0.0)
            return Y - t * eye + poison(Y)
        # a bf16/fp16 point: room for its rounding (Note [Hurwitz margin of the stored dtype])
        Y0 = sanitize(Y.detach())
        lam, V = eig = torch.linalg.eig(Y0)
        a = _abscissa(Y, eig)[..., None, None]
        k = torch.finfo(stored).eps  # twice the stored dtype's unit roundoff
        c = (c + k * (2.0 * spread + (a - trace + self.alpha))) / (1.0 - k)
        t = (a + self.alpha + c).clamp(min=0.0)
        # and inside the chart of the stored dtype (Note [Hurwitz project inside the chart of the stored dtype])
        s = _floor_shift(Y0, lam, V, (self.alpha - t).detach(), _SHIFT_SLACK * _w_floor(stored))
        return Y - (t + s) * eye + poison(Y)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """``W(S − I/2) − αI`` with ``W`` :class:`PSD`'s sample and ``S`` :class:`Skew`'s."""
        shape = self._sample_shape(shape, dtype)
        W = PSD().sample(shape, generator=generator, dtype=dtype, device=device)
        S = Skew().sample(shape, generator=generator, dtype=dtype, device=W.device)
        return self._shift(W @ S - 0.5 * W)

    # ------------------------------------------------------------------ membership
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        Xs = sanitize(X)
        a = torch.linalg.eigvals(Xs).real.amax(-1)
        v = (a + self.alpha).clamp(min=0.0) / torch.linalg.matrix_norm(Xs).clamp(min=1.0)
        return {"(max Re λ(X) + alpha)/max(1, ‖X‖_F)": v + poison(X)[..., 0, 0]}

    def check(self, X: Tensor, atol: float | None = None) -> None:
        """Eager validation; the message names the largest eigenvalue real part of the first bad point."""
        self._check_shape(X, "X")  # a shape or dtype error as it is: the eigenvalues below need a real square X
        self._check_readable(X)  # (Note [check under vmap]: before the eigenvalues, which vmap cannot read either)
        try:
            super().check(X, atol)
        except ManifoldError as e:
            if shapes_only(X):  # no values to name an eigenvalue by
                raise
            # A DTensor is gathered, as its measures were (every rank is here): the eigenvalues of a batch-sharded
            # one named rank 0's own largest (-1e-5 for a first bad point's 5) and raised torch's sharding error
            # for nonzero on rank 1 (Note [DTensor] in geofunc/_dtensor.py)
            X = gather(X)
            Xs = sanitize(X.detach())
            Xs = Xs.float() if Xs.dtype in LOW_PRECISION else Xs
            a = torch.linalg.eigvals(Xs).real.amax(-1)
            bad = ~(torch.isfinite(X).flatten(start_dim=-2).all(-1)) | (a + self.alpha > 0)
            if bad.ndim and bool(bad.any()):
                a = a[first_index(bad)]
            elif bad.ndim:
                a = a.amax()
            first = "NaN/inf" if not bool(torch.isfinite(X).all()) else f"{float(a):.6g}"
            raise ManifoldError(f"{e} Largest eigenvalue real part: {first} (the space needs ≤ −alpha = "
                                f"{-self.alpha:.6g}).") from None
