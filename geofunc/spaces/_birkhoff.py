"""The Birkhoff polytope: doubly stochastic matrices (positive entries, unit row and column sums)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, final

import torch

from .._expm import _front, _host_reads, _register_ops
from .._fastpath import _PLAIN_TYPES, backward_without_autocast, fake_mode_active, functionalizing, make_fx_tracing
from .._linalg import _randn, lu_solve_vec, poison, solve_vec
from ._base import AbstractSpace, can_check, rounding_dtype

__all__ = ["Birkhoff"]

Tensor = torch.Tensor


def _gaussian(shape: tuple[int, ...], generator: Optional[torch.Generator], dtype: Optional[torch.dtype], device) -> Tensor:
    """A standard Gaussian of ``shape`` from ``generator`` (on its device unless ``device`` is given)."""
    return _randn(shape, generator, dtype, device)  # Note [No generator=None]


# Note [Sinkhorn with a fixed step count]
# to_manifold(Z) = S(exp Z), the doubly stochastic matrix diag(a) exp(Z) diag(b). No fixed
# number of Sinkhorn sweeps suffices for every Z: the asymptotic rate is σ₂(S)² (Knight 2008),
# which tends to 1 as the limit approaches a vertex; already at raw scale 10 (n ≥ 2) plain
# Sinkhorn needs more than 3000 sweeps to reach 1e-7 for a fraction of inputs. And no loop may
# stop on a tensor value (vmap, torch.compile). So the balancing is, with a fixed step count:
#   1. _SWEEPS log-domain Sinkhorn sweeps (they move the potentials by large amounts fast);
#   2. _NEWTON rounds of one sweep plus one Newton step on the semi-dual
#      g(v) = Σ_i log Σ_j exp(L_ij + v_j) − Σ_j v_j, whose Hessian is diag(c) − PᵀP (P the
#      row-normalised matrix, c its column sums); the step is damped to ‖Δv‖∞ ≤ _TAU (g is
#      second-order robust in the sup norm, so such steps are safe) and taken, per matrix,
#      only where it lowers the column residual or g (a select, not a branch). Newton's local
#      quadratic convergence removes Sinkhorn's slow tail;
#   3. a final column normalisation and the rounding of Altschuler, Weed & Rigollet (2017,
#      Alg. 2): scale down rows, then columns, whose sums exceed 1, and add the rank-one
#      correction err_r err_cᵀ/‖err_r‖₁. The output's row and column sums are then 1 to
#      rounding (n·ε) for *every* finite input, converged or not, with non-negative entries.
# Measured (tests/test_birkhoff.py): raw scales ≤ 10, n ≤ 16, converge to machine precision
# in float32 and float64 before the rounding step (which then changes nothing). For
# larger raw ranges the output is still doubly stochastic, but may differ from the exact limit
# by the residual of step 2.
# * The Newton system is shifted by μI, μ = √ε·‖1 − c‖∞ (Levenberg–Marquardt; μ → 0 at the root, so
#   the local convergence is Newton's). Without it, at raw scale ~50 and up the row-normalised matrix
#   has columns of no mass to rounding, diag(c) − PᵀP is singular there, the solve gave inf/NaN, the
#   step was refused in every round and only Sinkhorn sweeps ran: the rounding step then made some
#   other doubly stochastic matrix out of the unbalanced one, silently, up to 1.0 off the limit
#   (float64 raw scale 100, 17 of 64 8×8 inputs more than 1e-4 off; float32 raw scale 50, 12 of 64).
#   With it, 64 inputs each of n = 3, 8, 16: float64 raw scale ≤ 100 within 2e-4 of the limit
#   (≤ 50: 6e-8), float32 raw scale ≤ 50 within 2e-4 of the float64 limit; float32 raw scale 100
#   and larger scales are still off (float32 n = 16 at scale 100: 0.23) where this fixed count is traced
#   (torch.compile off the CPU, tracers, FakeTensorMode). Eager mode goes on past it: Note [Eager Newton rounds
#   past the fixed count]; so do vmap and torch.compile on the CPU (Notes [Balancing under vmap], [Compiled
#   balancing]).
_SWEEPS = 8
_NEWTON = 24
_NEWTON_CAP = 256  # eager mode only: Note [Eager Newton rounds past the fixed count]
_TAU = 8.0


def _rows(L: Tensor) -> Tensor:
    return L - torch.logsumexp(L, dim=-1, keepdim=True)


def _cols(L: Tensor) -> Tensor:
    return L - torch.logsumexp(L, dim=-2, keepdim=True)


def _newton_step(L: Tensor) -> Tensor:
    """One damped, safeguarded Newton step on the semi-dual (``L`` row-normalised)."""
    n = L.shape[-1]
    P = L.exp()
    c = P.sum(-2)
    res = 1.0 - c
    # + 11ᵀ/n fixes the null direction v ↦ v + t1; + μI, μ = √ε·‖1 − c‖∞ (Levenberg–Marquardt, Note
    # [Sinkhorn with a fixed step count]): where the row-normalised P has a column of (numerically) no
    # mass, diag(c) − PᵀP has a second null direction, the plain solve gave inf/NaN and the step was
    # refused every round, leaving plain sweeps.
    mu = math.sqrt(torch.finfo(L.dtype).eps) * res.abs().amax(-1, keepdim=True)
    S = torch.diag_embed(c + mu) - P.mT @ P + 1.0 / n
    dv = torch.linalg.solve_ex(S, res.unsqueeze(-1))[0].squeeze(-1)
    dv = dv - dv.mean(-1, keepdim=True)
    step = dv * torch.clamp(_TAU / dv.abs().amax(-1, keepdim=True), max=1.0)
    lse = torch.logsumexp(L + step.unsqueeze(-2), dim=-1)
    new = L + step.unsqueeze(-2) - lse.unsqueeze(-1)
    lower_g = lse.sum(-1) - step.sum(-1) < 0  # g(v + Δv) < g(v) = 0 (rows of L are normalised)
    lower_res = (new.exp().sum(-2) - 1.0).abs().amax(-1) <= (c - 1.0).abs().amax(-1)
    # NaN anywhere makes both comparisons False: the step is then not taken.
    return torch.where((lower_g | lower_res)[..., None, None], new, L)


def _round(P: Tensor) -> Tensor:
    """Altschuler et al.'s rounding onto exact unit marginals (Note [Sinkhorn with a fixed step count])."""
    P = P * torch.clamp(1.0 / P.sum(-1, keepdim=True), max=1.0)
    P = P * torch.clamp(1.0 / P.sum(-2, keepdim=True), max=1.0)
    # Both deficits are ≥ 0 in exact arithmetic; clamping their rounding noise keeps each
    # correction entry er_i ec_j / Σ er ≤ ec_j (a noise-level Σ er with cancelling signs
    # would otherwise divide by ~0).
    er = (1.0 - P.sum(-1)).clamp(min=0.0)
    ec = (1.0 - P.sum(-2)).clamp(min=0.0)
    total = er.sum(-1, keepdim=True).clamp(min=torch.finfo(P.dtype).tiny)
    return P + er.unsqueeze(-1) * (ec / total).unsqueeze(-2)


def _balance_log(L: Tensor) -> Tensor:
    """``L + u1ᵀ + 1vᵀ`` at the end of the sweeps and Newton rounds (the log of the balanced matrix
    before the rounding step; values only, see the note; in eager mode the Newton rounds stop once
    every matrix is balanced to rounding: Note [Eager early exit of the Newton rounds]; under vmap and
    inside torch.compile too, as one operator: Notes [Balancing under vmap], [Compiled balancing])."""
    if _as_operator(L):  # Notes [Compiled balancing], [Balancing under vmap]
        return torch.ops.geofunc.sinkhorn_balance(L)
    L = _rows(L)
    for _ in range(_SWEEPS):
        L = _rows(_cols(L))
    tol = _early_exit_tol(L)
    C = _cols(L)
    met = None  # the round after which every matrix was balanced (eager mode)
    for k in range(_NEWTON):
        lse = torch.logsumexp(C, dim=-1, keepdim=True)  # log row sums: C - lse is _rows(C)
        if met is None and tol is not None and (k <= 8 or k % 4 == 0) and _balanced(lse, tol):
            met = k
        elif met is not None:
            break
        C = _cols(_newton_step(C - lse))
    if tol is not None and met is None:
        C = _balance_more(C, tol)
    return C


# Note [Eager Newton rounds past the fixed count]
# The _NEWTON rounds of Note [Sinkhorn with a fixed step count] stop short for raw inputs spread over
# more than ~±150 (float64) / ±100 (float32), and the rounding step then made some doubly stochastic
# matrix of the unbalanced one: p17's 3×3 Z (entries to ±150) × 10 gave [[.25, .5, .25], [.25, .5, .25],
# [.5, 0, .5]], 0.75 off the limit (the anti-diagonal permutation), finite, `contains` True. In eager mode
# (where Note [Eager early exit of the Newton rounds] reads values) a batch not balanced to 8nε after
# the _NEWTON rounds gets more of the same rounds, up to _NEWTON_CAP (256) in all, with the same exit
# (one round after every matrix is within 8nε, read every fourth round), or earlier where the batch's
# largest residual is within √ε and has not halved over four rounds (a stall: float64 stalls at
# ~1e-12 next to a vertex, float32 at ~1e-4, where Newton's step is refused). A matrix whose log row sums
# are then not within √ε of 0 is NaN (value and derivatives: the backward's Fisher projection of a NaN
# point is NaN in that matrix only), the library's rule for a map that did not get there (Note [NaN
# policy] in _linalg.py), not a finite point that can be 1 off. Measured, 64 Gaussian inputs each of
# n = 3, 8, 16 at raw scales 30 to 1000 (against the float64 limit of the same input, 1000 rounds):
# float64 within 8e-9, none NaN (was: up to 1.0 off); float32 within 3.3e-4 (its residual stall,
# ≤ √ε), 1 NaN of 768 (was: up to 1.0 off). Cost there: up to ~5 ms per 16×16 matrix; a batch
# balanced within the _NEWTON rounds (every raw scale ≤ 10 measured, retracts at |V/X| ≤ 80) runs
# exactly as before, bit for bit. vmap and torch.compile (CPU) run this balancing too, as one operator
# (Notes [Balancing under vmap], [Compiled balancing]); where nothing may be read (a trace off the CPU,
# tracers) the fixed count stays, with the limits of Note [Sinkhorn with a fixed step count].
def _balance_more(C: Tensor, tol: float) -> Tensor:
    """Eager mode, a batch not balanced after the _NEWTON rounds: more rounds, up to _NEWTON_CAP in all,
    until one round after every matrix's row sums are within ``tol`` of 1; then NaN in the matrices whose
    row sums are not within √ε of 1 (Note [Eager Newton rounds past the fixed count])."""
    lse = torch.logsumexp(C, dim=-1, keepdim=True)
    if _balanced(lse, tol):  # balanced by the last fixed round: the value of the fixed schedule
        return C
    met, last = False, math.inf
    for k in range(_NEWTON, _NEWTON_CAP):
        if k > _NEWTON:
            lse = torch.logsumexp(C, dim=-1, keepdim=True)
            if met:
                return C
            if k % 4 == 0:
                r = _residual(lse)
                met = r <= tol
                if not met and r <= _accept(C) and r > 0.5 * last:  # stalled at an accepted level
                    return C
                last = r
        C = _cols(_newton_step(C - lse))
    lse = torch.logsumexp(C, dim=-1, keepdim=True)
    # a non-finite log row sum (a NaN input) stays NaN: its result is NaN anyway
    off = lse.abs().amax(-2, keepdim=True) > _accept(C)
    return torch.where(off, torch.full_like(C, math.nan), C)


# Note [Eager early exit of the Newton rounds]
# The fixed count of Note [Sinkhorn with a fixed step count] is for the worst inputs (raw scale ~10:
# 6-10 Newton rounds to rounding level); at the scales training meets, the rounds after the first
# one to three change nothing (measured, float32 and float64, n = 3 to 64: raw scale 1 balanced to
# 4nε after 1-2 rounds, scale 3 after 2-5), yet each costs a batched solve and ~15 ops, so a
# Birkhoff retract of 4×3×3 took ~8 ms. In eager mode on plain tensors (can_check: not under vmap,
# torch.compile or a tracer, where no value may be read) the rounds stop one round after the first
# that leaves every matrix's row sums (the columns are exact after the normalisation) within 8nε
# of 1, read from the log row sums that the next round computes anyway.
# * The residual alone is not enough: next to a decomposable matrix (tril(ones(4)) + 1e-6,
#   float32) the round that first met it left entries 2e-6 off the limit (7% of a 3e-5 entry); the
#   one more round, Newton's quadratic step, takes that below rounding (1.5e-8; float64 3.6e-11
#   → 1e-16).
# * A non-finite log row sum (a NaN input: its result is NaN anyway) does not hold the batch.
# * Each read is a reduction and a sync; after round 8 only every fourth round is read (a batch
#   that needs more has entries far apart, e.g. a retract with |V/X| up to 80, which does not get
#   there in 24 rounds; reading every round cost such a retract ~5%).
# * The exit is the batch's, so a matrix's last rounds depend on its neighbours; they are Newton
#   steps at a root (taken only where they lower g or the residual), so this moves it by rounding,
#   as the exponential's degree, chosen from the batch's largest norm, does.
# Elsewhere, and for a batch that does not get there, all _NEWTON rounds run as before; the two
# readings differ by rounding (tests/test_birkhoff.py compares them).
def _early_exit_tol(L: Tensor) -> Optional[float]:
    """The row-sum tolerance of the eager early exit, or None where no value may be read."""
    if type(L) not in _PLAIN_TYPES or not can_check(L):  # (a DTensor's read would be a collective)
        return None
    return 8.0 * L.shape[-1] * torch.finfo(L.dtype).eps


def _balanced(lse: Tensor, tol: float) -> bool:
    """Whether every finite log row sum ``lse`` (``(*batch, n, 1)``) is within ``tol`` of 0."""
    return _residual(lse) <= tol


def _residual(lse: Tensor) -> float:
    """The largest finite ``|lse|`` (0 for an empty batch)."""
    if lse.numel() == 0:  # an empty batch
        return 0.0
    # a non-finite entry (a NaN input: its result is NaN anyway) reads as 0: it does not hold the batch
    return float(torch.nan_to_num(lse, nan=0.0, posinf=0.0, neginf=0.0).abs().max())


def _accept(C: Tensor) -> float:
    """The largest log row sum residual returned as a point past the fixed rounds: √ε (Note [Eager Newton
    rounds past the fixed count])."""
    return math.sqrt(torch.finfo(C.dtype).eps)


def _balance(L: Tensor) -> Tensor:
    """The doubly stochastic scaling of ``exp(L)`` (values only; see the note)."""
    return _round(_balance_log(L).exp())


# Note [the Fisher projection of a rounded point]
# I − PᵀP is positive semidefinite for an exactly doubly stochastic P (σ₁(P) = 1), with a null
# direction per block where P decomposes, and + εI makes M definite there. A point rounded to
# bfloat16/float16 and read in float32 is doubly stochastic only to its rounding: near a vertex
# (off-entries ~1e-7, row sums 1 + ε₃₂) I − PᵀP had an eigenvalue −ε that the shift cancelled
# exactly, M was singular, and egrad_to_rgrad returned NaN for the whole matrix (rsgd with
# momentum in bfloat16, n = 4: NaN from step 76 on, carried by the momentum). So for such points
# the shift is 4nε (ε of float32, the compute dtype), which dominates the marginal error n·ε of a
# computed point and the rounding of PᵀP, while staying far below what the stored rounding already
# does to M (ε of bfloat16/float16 per entry). In float32 and float64 the shift stays ε: there a
# larger one is not free (near a face, where the smallest eigenvalue λ of I − PᵀP on 1⊥ is ~1e-6,
# 4nε moved β by 4nε/λ, and a float32 rsgd run, 7.5e-7 from float64 before, ended 0.84 away).
def fisher_project(P: Tensor, W: Tensor, solve: Any = solve_vec) -> Tensor:
    """``W − (α1ᵀ + 1βᵀ) ⊙ P`` with zero row and column sums: the projection onto the tangent
    space orthogonal in the Fisher metric ``⟨U, V⟩_P = Σ UV/P``, for doubly stochastic ``P``.

    ``(α, β)`` solve ``α + Pβ = W1``, ``Pᵀα + β = Wᵀ1``; eliminating ``α`` gives
    ``(I − PᵀP)β = Wᵀ1 − PᵀW1``, singular along ``1`` (made definite by ``+ 11ᵀ/n``) and, where
    ``P`` decomposes (a permutation matrix), along each block: ``+ εI`` picks a solution there
    (every solution gives the same projection), so the map is finite on the whole closed
    polytope, vertices included; ``+ 4nεI`` for a bfloat16/float16 point (computed in float32: Note
    [the Fisher projection of a rounded point]). ``solve``: :func:`solve_vec` (right under every
    transform), or :func:`lu_solve_vec` where nothing differentiates it forward-over-reverse.
    """
    n = P.shape[-1]
    r, c = W.sum(-1), W.sum(-2)
    eps = torch.finfo(P.dtype).eps
    shift = eps if rounding_dtype(P.dtype) == P.dtype else 4 * n * eps
    M = torch.eye(n, dtype=P.dtype, device=P.device) * (1.0 + shift) - P.mT @ P + 1.0 / n
    rhs = c - (P.mT @ r.unsqueeze(-1)).squeeze(-1)
    beta = solve(M, rhs)
    alpha = r - (P @ beta.unsqueeze(-1)).squeeze(-1)
    return W - (alpha.unsqueeze(-1) + beta.unsqueeze(-2)) * P


# Note [the Fisher gradient near a vertex]
# Near a vertex (a permutation σ plus off-entries of size δ ~ 1e-6 .. 1e-30) the Riemannian gradient
# R = Π_X(X ⊙ G) has Fisher norm ~√δ·|G| while X ⊙ G has ~|G|, and fisher_project loses it three
# ways: I − PᵀP is 1 − (≈1) on the diagonal (absolute error ε where the true value is ~δ); its
# rhs Wᵀ1 − PᵀW1 and the result's entries at σ, W − (α + β)X, are O(1) terms cancelling to
# O(δ); and a point rounded to float32 has marginals 1 ± nε, which I − PᵀP assumes exact: an
# eigenvalue −ε against the shift ε, so the float64 map on the same float32 point was up to 3e4
# times ‖X ⊙ G‖_X (measured, 2000 random near-vertex points: float32 vs float64 off by 0.1–22 ×
# ‖R‖; relative to ‖X ⊙ G‖ off by 1.2e-3, where ε₃₂ is 1.2e-7). fisher_gradient computes the same
# projection (exactly, for any positive X, with its actual marginals r, c) with no cancellation:
#   * eliminating α leaves the Schur complement c − XᵀD_r⁻¹X, a graph Laplacian whose weights
#     A_jk = Σ_i X_ij X_ik / r_i (j ≠ k) are sums of non-negative terms; its diagonal is formed
#     as their row sums, so it is exactly a Laplacian (PSD) whatever the point's marginals;
#   * it is grounded at its strongest node (+τ there, τ its largest degree: the null direction
#     1, on the scale of the weights) and shifted by ε·deg_j per node (exactly disconnected
#     blocks at a face; a fixed ε or 11ᵀ/n swamps weights below ε, a near vertex's all);
#   * at an entry holding more than half its row (the dominant one, at most one per row),
#     G_ij − μ_i and R_ij are formed from the row's other entries (Σ_k≠j X_ik(G_ij − G_ik)/r_i,
#     and R_ij = −Σ_k≠j R_ik), elsewhere directly.
# Measured on 6000 such points (n ≤ 16; raw scales 3–300, mixtures (1 − t)P + tQ, t down to 1e-30):
# float32 equals float64 within 1e-3·‖R₆₄‖_X + 1e-8·‖X ⊙ G‖_X (the second term where the stored
# point is only doubly stochastic to its rounding, and its true R is ~0); float64 equals a
# 90-digit reference within 6e-13·(‖R‖_X + ε₃₂‖X ⊙ G‖_X) (600 points, n ≤ 10); no NaN. Cost: ~1.8×
# fisher_project's on the CPU (n = 8, 64). What remains is the LU's: a cut of weight below ~ε·deg is
# resolved only to ε·deg/weight (a GTH-style elimination would not).
# The Sinkhorn derivative (_Sinkhorn's backward and jvp, _SinkhornCompiled's backward) is this map
# too, Π_P(P ⊙ G). Through fisher_project, whose + εI shift and cancellation are errors of ε relative
# to eigenvalues of I − PᵀP that are ~1e-12 next to a face, its first derivative was 6e-8 off
# (relative) and its second derivatives, which differentiate the solve once more, 0.5–16% off, with
# a Hessian asymmetric by 4e-3: jvp(grad) through retract at step ratio |V/X| = 72 (float64, 3 of
# 12 seeds) disagreed with finite differences of grad at every step size. Both maps are the same
# formula on the space, and the derivatives of P that reach them are tangent (zero marginals), so
# the derivatives of every order are the same in exact arithmetic; fisher_gradient's are accurate
# (tests/test_birkhoff.py, test_second_derivatives_next_to_a_face_equal_finite_differences).
def fisher_gradient(X: Tensor, G: Tensor, solve: Any = solve_vec) -> Tensor:
    """``Π_X(X ⊙ G)``: the Fisher projection of ``X ⊙ G`` onto the tangent space, computed without
    cancellation near the vertices (Note [the Fisher gradient near a vertex]); in exact arithmetic it
    equals :func:`fisher_project` ``(X, X ⊙ G)`` on the space, and for any positive ``X`` it is the
    projection orthogonal in ``Σ UV/X`` onto zero row and column sums. ``solve`` as in :func:`fisher_project`."""
    n = X.shape[-1]
    eps, tiny = torch.finfo(X.dtype).eps, torch.finfo(X.dtype).tiny
    Q = X / X.sum(-1, keepdim=True)
    dom = Q > 0.5  # the dominant entry of each row, if any
    Gc = G - (Q * G).sum(-1, keepdim=True)  # G − μ1ᵀ, μ the rows' X-weighted means
    K = X * Gc  # its row sums are 0: the dominant entry is −(the others)
    b = (K - dom * K.sum(-1, keepdim=True)).sum(-2)
    A = (Q.mT @ X).masked_fill(torch.eye(n, dtype=torch.bool, device=X.device), 0.0)
    deg = A.sum(-1)
    pin = deg.amax(-1, keepdim=True) * (torch.arange(n, device=X.device) == deg.argmax(-1, keepdim=True))
    beta = solve(torch.diag_embed(deg + (eps * deg).clamp(min=tiny) + pin) - A, b).unsqueeze(-2)
    R = X * (Gc + Q @ beta.mT - beta)  # X ⊙ (G − α1ᵀ − 1βᵀ), α = μ − Qβ
    return R - dom * R.sum(-1, keepdim=True)  # the dominant entry: −(the others)


class _SinkhornCompiled(torch.autograd.Function):
    """:class:`_Sinkhorn` for ``torch.compile``, whose ``forward`` is :func:`_sinkhorn_ops`.

    Dynamo (torch 2.13) keeps a Function's ``backward`` under plain autograd but, under ``torch.func``
    transforms, inlines its ``forward`` and drops the ``backward`` (pytorch#193279), which then
    differentiated the Sinkhorn sweeps themselves (NaN gradients for some 3×3 points). With this
    forward both readings are right: plain autograd gets the Fisher projection (eager mode's values),
    ``torch.compile(grad(f))`` the three Newton steps' exact derivatives (whose float32 solve loses
    accuracy next to a vertex: 3×3 points at raw scale 20 up to 1e7 off, relative). No ``jvp``: Dynamo
    cannot trace it. Compiled forward and backward (inductor, batches of 8, 8×8 to 64×64) cost
    0.99–1.01× the Function whose forward was the balancing alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(L: Tensor) -> Tensor:  # type: ignore[override]
        return _sinkhorn_ops(L)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> Tensor:  # type: ignore[override]
        # Reached under plain autograd only (Dynamo drops it under torch.func transforms), so the solve
        # is LU's, as in eager mode: inside torch.compile solve_vec takes the inverse, whose float32
        # projection next to a vertex was 4e-4 to 8e-2 off (relative) where eager's was 1e-6.
        (P,) = ctx.saved_tensors
        return fisher_gradient(P, G, solve=lu_solve_vec)


class _Sinkhorn(torch.autograd.Function):
    """``L ↦ S(exp L)`` with its exact derivative by implicit differentiation.

    At the fixed point ``P = diag(a) exp(L) diag(b)`` with unit marginals, ``dP = P ⊙ (dL + da/a 1ᵀ +
    1 db/bᵀ)`` must have zero marginals, hence ``dP = Π_P(P ⊙ dL)`` with ``Π_P`` the Fisher
    projection (:func:`fisher_gradient`, accurate next to a face). That map is self-adjoint for the Euclidean inner
    product, so the vector-Jacobian and Jacobian-vector products are the same formula; it is
    written with differentiable ops of the saved output ``P``, so higher derivatives
    (``hessian``, ``jacfwd(jacrev)``, double backward) are exact too. ``generate_vmap_rule``
    batches it under ``vmap``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(L: Tensor) -> Tensor:  # type: ignore[override]
        return _balance(L)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> Tensor:  # type: ignore[override]
        (P,) = ctx.saved_tensors
        return fisher_gradient(P, G)

    @staticmethod
    def jvp(ctx: Any, dL: Tensor) -> Tensor:  # type: ignore[override]
        (P,) = ctx.saved_tensors
        return fisher_gradient(P, dL)


# Note [Compiled balancing]
# _sinkhorn_ops takes its value from the balancing of the detached input (its derivatives come from the
# three Newton steps on the live one), so the balancing needs no derivative. Traced by torch.compile it
# was _SWEEPS sweeps and _NEWTON Newton rounds unrolled: ~1,340 graph nodes per map (to_manifold,
# retract, project, rebase), each traced by Dynamo and AOT autograd (a compiled Birkhoff step took
# seconds more to compile than any other space's), and the fixed count of Note [Sinkhorn with a fixed
# step count] ran where eager mode stops early or goes on past it. On the CPU (where a kernel may read
# values, as the compiled exponential's: Note [Compiled exponential] in geofunc/_expm.py) the balancing
# is one operator, geofunc::sinkhorn_balance, opaque to the compiler: its kernel is eager mode's
# balancing (early exit; rounds past the fixed count, NaN where they do not get there), so a compiled
# map gives eager mode's value for every input, not only where the fixed count converges (float32
# n = 16 at raw scale 100 was 0.23 off the limit, compiled). Its vmap rule calls it on the whole batch,
# as eager mode's batched call does. Elsewhere (another device, a torch without the operator API) the
# fixed count is traced as before.
# Note [Balancing under vmap]
# Under vmap (and functionalize, and nested forward mode: the Newton-step path of _sinkhorn_ops) no value may be
# read, so the balancing was the fixed count of Note [Sinkhorn with a fixed step count]: past raw scale ~150 (float64;
# ~100 float32) a doubly stochastic matrix up to 1 off the limit, with no error, where the same call
# without the transform reaches the limit or gives NaN (Note [Eager Newton rounds past the fixed count]);
# and all _NEWTON rounds ran where 2-4 do at training scales. The balancing is values only (the Function's
# forward, or a detached input; the derivatives are the Fisher projection's or the Newton steps'), so on a
# torch.func-wrapped tensor over plain values (not inside torch.compile, a tracer or FakeTensorMode) it is
# geofunc::sinkhorn_balance (Note [Compiled balancing]), whose vmap rule runs eager mode's balancing on the
# whole batch: vmap(to_manifold)(Z) is to_manifold(Z), as for any other space, on every device (an eager
# call reads the values there too).
def _as_operator(L: Tensor) -> bool:
    """Whether the balancing of ``L`` is geofunc::sinkhorn_balance: inside torch.compile a plain tensor on the CPU
    (Note [Compiled balancing]), elsewhere a torch.func-wrapped tensor over plain values, outside any tracer
    (Note [Balancing under vmap]); a plain eager tensor balances in Python, as the operator's kernel does."""
    if not _BALANCE_OP:
        return False
    if torch.compiler.is_compiling():
        return type(L) in _PLAIN_TYPES and _host_reads(L)
    if not torch._C._functorch.is_functorch_wrapped_tensor(L) or make_fx_tracing() or fake_mode_active():
        return False
    x = L
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return type(x) in _PLAIN_TYPES and not x.is_meta


def _balance_kernel(L: Tensor) -> Tensor:
    return _balance_log(L).contiguous()  # contiguous, as the fake kernel says


def _balance_below_autograd(L: Tensor) -> Tensor:
    # values only: no gradient flows through it (the Newton steps of _sinkhorn_ops carry the derivatives),
    # and an output that required grad without a formula would be differentiated as nothing, silently
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.geofunc.sinkhorn_balance(L)


def _register_balance_op() -> bool:
    """Define geofunc::sinkhorn_balance (Note [Compiled balancing]); False where torch lacks the API."""
    if not (hasattr(torch.library, "register_fake") and hasattr(torch.library, "register_vmap")):
        return False  # pragma: no cover (torch < 2.4)
    ops = torch.ops.geofunc
    if hasattr(ops, "sinkhorn_balance"):  # this module imported again (importlib.reload): already registered
        return True

    def vmap_rule(info: Any, in_dims: tuple, L: Tensor) -> tuple[Tensor, int]:
        return ops.sinkhorn_balance(_front(L, in_dims[0], info.batch_size)), 0

    lib = torch.library.Library("geofunc", "FRAGMENT")  # noqa: TOR901 (lives as long as the module)
    lib.define("sinkhorn_balance(Tensor L) -> Tensor")
    _register_ops(lib, (("sinkhorn_balance", _balance_kernel, _balance_below_autograd,
                         lambda L: torch.empty_like(L, memory_format=torch.contiguous_format), vmap_rule),))
    globals()["_BALANCE_LIBRARY"] = lib
    return True


_BALANCE_OP = _register_balance_op()


def _sinkhorn_ops(L: Tensor) -> Tensor:
    """``S(exp L)`` without a custom Function: the value of :func:`_balance`, with the derivatives
    of three Newton steps on the semi-dual ``g`` taken from the detached limit.

    With ``v*`` the limit's column potentials (detached) and ``N(v; L) = v − H⁻¹∇g(v; L)``, one
    Newton step from ``v*`` has the exact first derivative in ``L`` (``∂N/∂v = 0`` at the root);
    each further step makes one more order exact (measured: 1, 2, 3 steps give exact first,
    second, third derivatives; ``tests/test_birkhoff.py`` checks the third against unrolled
    Sinkhorn). Used where a custom Function's rules fall short: nested forward mode, and as the
    forward of :class:`_SinkhornCompiled` inside ``torch.compile``.
    """
    Ld = L.detach()
    Lfin = _balance_log(Ld)
    value = _round(Lfin.exp())
    n = L.shape[-1]
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    v = (Lfin - Ld).mean(-2)  # u_i + v_j averaged over i: v up to a constant (a null direction)
    for _ in range(3):
        P = _rows(L + v.unsqueeze(-2)).exp()
        c = P.sum(-2)
        H = torch.diag_embed(c) - P.mT @ P + 1.0 / n + torch.finfo(L.dtype).eps * eye
        v = v + solve_vec(H, 1.0 - c)
    P = _rows(L + v.unsqueeze(-2)).exp()
    # P − P.detach() is 0 where the Newton steps are finite; where their float32 solve breaks down next
    # to a vertex (raw scale ~50) it is NaN: the value stays the limit's (its derivatives are then NaN)
    return value + torch.nan_to_num(P - P.detach(), nan=0.0, posinf=0.0, neginf=0.0)


def _nested_forward_mode() -> bool:
    """Whether two or more ``torch.func`` forward-mode levels are active (``jacfwd(jacfwd(...))``):
    PyTorch does not record a custom Function's ``jvp`` at an outer forward level, so there the
    second-order term would be lost silently (as for :mod:`geofunc._expm`)."""
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        interpreters = retrieve_all_functorch_interpreters()
    except Exception:  # pragma: no cover - private API moved: assume nested, the op chain is exact
        return True
    return sum(1 for i in interpreters if i.key() == TransformType.Jvp) >= 2


#: Whether Dynamo traces ``peek_interpreter_stack`` (torch 2.13 does; 2.6 breaks the graph; 2.7–2.12 not tried).
_PEEK_TRACED = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def sinkhorn(L: Tensor) -> Tensor:
    """``S(exp L)``: the doubly stochastic matrix ``diag(a) exp(L) diag(b)`` (last two dims), differentiable."""
    if torch.compiler.is_compiling():
        # Note [Sinkhorn under torch.func inside torch.compile]
        # Under torch.func transforms Dynamo inlines _SinkhornCompiled's forward and drops its backward
        # (pytorch#193279), so there the Function is _sinkhorn_ops with extra steps, and one step too
        # many: under vmap(grad(f)) Dynamo (torch 2.13) refused the Function whose input was computed
        # inside the transforms ("You tried to vmap over ApplyTemplate", pytorch#129845: retract and project in a
        # per-sample gradient). The ops are taken directly there; under plain autograd the Function.
        # (Dynamo wraps peek_interpreter_stack()'s None in an object, which `is not None`: isinstance.)
        # (torch 2.6's Dynamo cannot trace peek_interpreter_stack: there the Function, as before.)
        if _PEEK_TRACED and isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter):
            return _sinkhorn_ops(L)
        return _SinkhornCompiled.apply(L)
    if _nested_forward_mode() or functionalizing():  # Note [Functions under functionalize] in _fastpath.py
        return _sinkhorn_ops(L)
    return _Sinkhorn.apply(L)


def _safe_log(X: Tensor) -> Tensor:
    return torch.log(X.clamp(min=torch.finfo(X.dtype).tiny))


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Birkhoff(AbstractSpace):
    r"""Doubly stochastic matrices: the interior of the Birkhoff polytope (last two dimensions).

    .. math::

        \mathcal{DP}_n = \{X \in \mathbb{R}^{n\times n} : X_{ij} > 0,\ X\mathbf{1} = \mathbf{1},\ X^\top\mathbf{1} = \mathbf{1}\},
        \qquad T_X = \{V : V\mathbf{1} = 0,\ V^\top\mathbf{1} = 0\},

    a manifold of dimension :math:`(n-1)^2` whose closure has the permutation matrices as
    vertices. Points are ``(*batch, n, n)`` tensors. The metric is the **Fisher information
    metric** :math:`\langle U, V\rangle_X = \sum_{ij} U_{ij}V_{ij}/X_{ij}` (Douik & Hassibi 2018,
    as geoopt's ``BirkhoffPolytope``, whose ``inner`` divides it by ``n``).

    * ``to_manifold(Z, base) = S(base ⊙ exp(Z))`` with ``S`` Sinkhorn balancing, in the log
      domain, to unit marginals within rounding (Note [Sinkhorn with a fixed step count]:
      fixed step counts, Newton steps, and a final rounding that makes the row and column
      sums 1 to ``n·ε`` for every input); ``base=None`` is the uniform matrix, so
      ``to_manifold(Z) = S(exp Z)``. Differentiated exactly by implicit differentiation:
      ``d to_manifold = Π_P(P ⊙ dZ)`` (``Π_P`` the Fisher projection below), to every order.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``.
    * ``tangent(X, G) = G − G1 1ᵀ/n − 1 1ᵀG/n + (1ᵀG1) 11ᵀ/n²``: the Euclidean orthogonal
      projection onto :math:`T_X` (the same subspace at every ``X``).
    * ``egrad_to_rgrad(X, G) = Π_X(X ⊙ G) = X ⊙ G − (α1ᵀ + 1βᵀ) ⊙ X`` with ``(α, β)`` making the
      marginals zero: the Fisher-metric gradient (geoopt's ``egrad2rgrad``); it is finite at
      the vertices, where geoopt's raises. ``inner(X, U, V) = Σ UV/max(X, tiny)`` (``+inf`` for
      vectors that are non-zero where an entry of ``X`` is 0: the metric's boundary).
    * ``retract(X, V) = S(X ⊙ exp(V/X))`` (first-order ``X + V``; ``X`` floored at the smallest
      normal number ``tiny`` and ``V/X`` capped at ``±½ log(1/tiny)`` (±44 in float32, ±354 in
      float64), so at the boundary, vertices included, it is finite and keeps the face);
      ``transport(X, Y, V) = Π_Y(Y ⊙ V/X)`` (``X`` floored at ``tiny``): the
      differentiated retraction, which carries the log-domain direction ``V/X`` of a step
      (Note [Transport by the differentiated retraction]). A Riemannian gradient step is then
      ``retract(X, −η egrad_to_rgrad(X, G)) = S(X ⊙ exp(−η G))``: the row and column terms of
      the gradient are absorbed by ``S``, so it is exponentiated gradient with Sinkhorn
      projection (entropic mirror descent).
    * ``project(Y) = S(max(Y, ε·max|Y|))``: a canonical point (the Euclidean nearest point of
      the closed polytope lies on its boundary for most ``Y``), equal to ``Y`` on the space.
    * ``sample``: ``S(exp Z)`` with ``Z`` standard Gaussian (exchangeable rows and columns,
      ``E X = 11ᵀ/n``).

    Membership: row and column sums equal to 1 within ``atol`` and entries ``≥ −atol`` (an
    entry of an interior point can underflow to 0 in floating point, as one of ``exp(−1e30)`` does).
    NaN or inf raw input (``Z``, ``base``, ``Y``, or ``X``, ``V`` of ``retract``; ``−inf`` included)
    gives NaN in the matrices it is in.

    Example:
        >>> import torch, geofunc as gf
        >>> B = gf.Birkhoff()
        >>> X = B.to_manifold(torch.randn(4, 4))
        >>> bool(torch.allclose(X.sum(-1), torch.ones(4))), bool(torch.allclose(X.sum(-2), torch.ones(4)))
        (True, True)

    References: R. Sinkhorn, P. Knopp, *Concerning nonnegative matrices and doubly stochastic
    matrices*, 1967; A. Douik, B. Hassibi, *Manifold Optimization Over the Set of Doubly
    Stochastic Matrices: A Second-Order Geometry*, 2018; J. Altschuler, J. Weed, P. Rigollet,
    *Near-linear time approximation algorithms for optimal transport via Sinkhorn iteration*, 2017.
    """

    _base_kind: ClassVar[str | None] = "point"  # what its base is (AbstractSpace._refine_base)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def to_manifold(self, Z: Tensor, base: Optional[Tensor] = None) -> Tensor:
        """``S(base ⊙ exp Z)`` (``S(exp Z)`` if ``base`` is None)."""
        self._check_shape(Z, "Z")
        if base is not None:
            self._require_base(Z, base)
            Z = Z + _safe_log(base)
        # A −inf entry is a finite zero of exp(Z) to the balancing (a plausible point): poison the
        # matrices with a non-finite entry in Z or base (Note [NaN policy]).
        return sinkhorn(Z) + poison(Z, base)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G`` minus its row means, column means, plus its mean: zero row and column sums."""
        self._check_pair(X, G, "G")
        V = G - G.mean(-1, keepdim=True) - G.mean(-2, keepdim=True) + G.mean((-2, -1), keepdim=True)
        return V + 0.0 * X

    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """``Π_X(X ⊙ G)``: the Riemannian gradient of the Fisher metric (Note [the Fisher gradient near a vertex])."""
        self._check_pair(X, G, "G")
        return fisher_gradient(X, G)

    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """The Fisher metric ``Σ U V / X`` (``X`` floored at the smallest normal number), batch-shaped; NaN where ``X``
        has a NaN/inf entry (an inf entry of ``X`` took its term to 0: Note [NaN policy])."""
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        # the sum and poison(X) added with their kept dimensions: vmap cannot add 0-dim per-sample tensors over an
        # empty batch (tests/test_protocol.py)
        out = (U * V / X.clamp(min=torch.finfo(X.dtype).tiny)).sum((-2, -1), keepdim=True) + poison(X)
        return out[..., 0, 0]

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``S(X ⊙ exp(V / X))`` (``V/X`` capped at ``±½ log(1/tiny)``)."""
        self._check_pair(X, V, "V")
        tiny = torch.finfo(X.dtype).tiny
        Xs = X.clamp(min=tiny)
        # An entry that underflowed to 0 (a face of the polytope) has V/X = ±inf: the cap keeps
        # it below √tiny, so the retraction stays finite and on that face.
        cap = 0.5 * math.log(1.0 / tiny)
        # The cap would also turn V = ±inf into a finite step: non-finite X or V gives NaN instead.
        return sinkhorn(torch.log(Xs) + (V / Xs).clamp(min=-cap, max=cap)) + poison(X, V)

    # Note [Transport by the differentiated retraction]
    # The tangent spaces of the polytope's interior are one subspace, so the projection tangent(Y, V)
    # (the protocol's default) is the identity on them; but in the Fisher metric a vector's meaning
    # depends on the point: V at X is the step X ⊙ V/X, a translation by V/X in the log domain, where
    # retract moves (S(X ⊙ exp(V/X))). Carried unchanged to a Y with other small entries, momentum
    # made steps of the wrong size there: rsgd(lr=0.05, momentum=0.9) toward a target near a vertex
    # (n = 5, float64) went from 1e-3 at step 100 to 2e-2 at step 500 and 1e-3 after 2000, where
    # momentum-free rsgd at the same effective step reached 2e-6. The differentiated retraction,
    # d/dt retract(X, V + tW) = Π_Y(Y ⊙ W/X) at Y = retract(X, V) (the derivative of S is the
    # Fisher projection: the implicit derivative of to_manifold), keeps the log-domain direction W/X: linear in
    # W, into T_Y, W itself at Y = X (Π_X(W) = W for tangent W). With it that run reaches 1.6e-6
    # (lr 0.5: 3.5e-9, against 2.4e-6). One Fisher projection per call (fisher_gradient: accurate near
    # the vertices). X is floored at tiny as in inner, V/X not capped (retract's cap bounds an
    # exponent; here it would break linearity: float32 points with entries ~0.03 and unit V reach
    # it); V/X overflows only where X underflowed and V does not vanish, a vector of infinite Fisher
    # norm (inner's +inf): NaN there, as for non-finite input.
    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """``Π_Y(Y ⊙ V/X)``: the differentiated retraction (Note [Transport by the differentiated retraction])."""
        self._check_pair(X, Y, "Y")
        self._check_pair(X, V, "V")
        return fisher_gradient(Y, V / X.clamp(min=torch.finfo(X.dtype).tiny)) + poison(X, V)

    def project(self, Y: Tensor) -> Tensor:
        """``S(max(Y, ε·max|Y|))``, a canonical doubly stochastic matrix (``Y`` itself on the space)."""
        self._check_shape(Y, "Y")
        tiny = torch.finfo(Y.dtype).tiny
        m = Y.abs().amax((-2, -1), keepdim=True).clamp(min=tiny)
        # + poison: a new tensor, not Sinkhorn's output, which its backward reads (an in-place op on the
        # result, allowed for every other map, raised at backward), as to_manifold and retract add it
        return sinkhorn(torch.log(torch.maximum(Y, torch.finfo(Y.dtype).eps * m))) + poison(Y)

    def sample(
        self,
        shape: Any,
        *,
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
    ) -> Tensor:
        """``S(exp Z)`` with ``Z`` standard Gaussian."""
        return sinkhorn(_gaussian(self._sample_shape(shape, dtype), generator, dtype, device))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        return {
            "max |row sum − 1|": (X.sum(-1) - 1.0).abs().amax(-1),
            "max |column sum − 1|": (X.sum(-2) - 1.0).abs().amax(-1),
            "max(0, −min entry)": (-X.amin((-2, -1))).clamp(min=0.0),
        }
