"""Shared machinery of the factorized spaces (SVD type ``U diag(s) Vᵀ``, eigen type ``Q diag(λ) Qᵀ``).

Private. The concrete spaces (LowRank, FixedRank, GLp, AlmostOrthogonal, PSSDLowRank, PSSD,
PSSDFixedRank, PSD) are final dataclasses over the two abstract bases here, each giving its rank
and its value map (:mod:`geofunc.spaces._values`: ``f``, its inverse, projection, violations,
floor); nothing else differs between them.

Raw coordinates are packed into one tensor ``Z`` of the point's (tall) shape n×k, in disjoint
regions, as GeoTorch's frame does: the U-coordinates are the first r columns of the strict
lower triangle, the values the first r diagonal entries, the V-coordinates the strict upper
triangle of the first r rows (transposed). Only O((n + k) r) entries are read.

The frames' chart is :func:`geofunc._linalg.frame_chart` in packed coordinates: its differential at
0 is an isometry at every base, so one SGD step on raw at zero then ``rebase`` is a Riemannian
gradient step.

Spectral maps (``project``, ``retract``) take their *value* from a decomposition of the detached
input and their *derivatives* from the closed-form first and second derivatives (first and second
divided differences, Daleckii–Krein), added as terms that are exactly zero in value (Note [Second
derivatives of spectral maps] in ``geofunc/_linalg.py``). So they are right to rounding in value,
exact to second order in plain autograd and under every torch.func transform (``hessian``,
``grad(grad)``, ``jacfwd(jacrev)``), and never NaN at repeated singular values or eigenvalues (where
``torch.linalg.svd``'s backward is). ``tangent`` is too: the frames' projectors are exact to first
order wherever the kept values are above the dropped ones (:func:`_frame_coefficients`), and the projectors
as spectral maps of an indicator carry the second order (:func:`_exact_tangent`).
"""

from __future__ import annotations

import abc
import math
import operator
import os
import threading
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from .._errors import describe, error
from .. import _linalg
from .._fastpath import (autocast_off, backward_without_autocast, closed_form_node, derivative_mode, dispatch_mode_active, eager_fast,
                         forward_tangents, outside_modes, save_state, saved_state)
from .._expm import _mm, _mm_add
from .._linalg import (_add_product, _divided, _second_core, _second_divided, _svd_second_order, frame_charts, haar_stiefel, poison, refine_drifted,
                       sanitize, stack_matrices, sym_part, transpose)
from ._base import AbstractSpace, can_check
from ._orthogonal import tall, untall
from ._values import Abs, Identity, Positive, Unit, ValueMap

Tensor = torch.Tensor

__all__ = ["SVDSpace", "EigSpace", "validate_rank"]


# --------------------------------------------------------------------------- helpers
def validate_rank(space: Any, rank: Any) -> None:
    """``rank`` must be an integer ≥ 1 (its upper bound min(n, k) is checked at the first call). An
    integer of another type (``numpy.int64``, a size read from an array) is stored as the Python int it
    is, so that equal spaces are equal and hash alike and shapes built from it are plain ints."""
    try:
        value = operator.index(rank) if not isinstance(rank, (bool, torch.Tensor)) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise error(space, "`rank` to be an integer ≥ 1", describe(rank))
    if type(rank) is not int:
        object.__setattr__(space, "rank", value)


def rank_tol(smax: Tensor, n: int, k: int) -> Tensor:
    """Numerical rank tolerance ``4 ε √max(n, k) · σ₁``: singular values below it are rounding noise."""
    return 4.0 * torch.finfo(smax.dtype).eps * math.sqrt(max(n, k)) * smax


# Note [Spectral ties relative to the spectrum]
# A divided difference (gᵢ − gⱼ)/(sᵢ − sⱼ) (or (gᵢ + gⱼ)/(sᵢ + sⱼ)) is replaced by the mean slope
# (g′ᵢ + g′ⱼ)/2 only where the gap is below a tie tolerance. That is right where g is smooth on the gap
# (error δ²g‴/12), not across a kink or the jump of the odd extension at 0: the value maps are
# piecewise linear with kinks at the lift c (Positive: g = max(s, c)), at the r-th value (truncation:
# g = s·[kept]) and at 0 (g(0⁺) = c ≠ 0), so any pair that the tolerance takes as tied across one is
# wrong by O(1) of the divided difference (GLp/FixedRank: (c + c)/(sᵢ + sⱼ) = c/s became 0; LowRank(r):
# s_r/(s_r − s_(r+1)) became ½). The tolerance was √ε·max(1, s₁), absolute below s₁ = 1: every pair of
# a well-conditioned input with entries ~1e-4 (float32) or ~1e-8 (float64) tied, and the gradient of
# GLp, FixedRank, PSSDFixedRank, LowRank and PSSDLowRank project was 0 or 11× off, silently (measured
# against finite differences, tests/test_spectral_small_scale.py). What the tolerance guards against is
# rounding: computed values carry ~ε·s₁ absolute error, so a gap below √ε·s₁ is a tie and one above it
# is resolved to √ε relative; the tolerance is now that, √ε·max|s|, the same number as before wherever
# s₁ ≥ 1. It stays absolute below s₁ = tiny^¼ (float32 3e-10, float64 1e-77; zero inputs included):
# there the second-order terms (~g/s², zero in value) would overflow, and their 0·inf made even the
# first derivative NaN under create_graph. The smooth maps (eigh with h″) keep their own scale-aware
# near ties (Note [Near ties of smooth spectral maps]): exp's, whose scale is 1, are unchanged; those
# of √, 1/√ and log (scale λ) were absolute too, 0.4–2.5% off at float32 eigenvalues ~1e-4.
_tie_tol = _linalg.spectral_tie_tol  # Note [Spectral ties relative to the spectrum]


def spectral_svd(Y: Tensor, g_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                 tie_tol: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``U diag(g) Vᵀ`` for a tall ``Y = U diag(s) Vᵀ`` (thin SVD), ``(g, g') = g_fn(s, U, Vh)``.

    Value from the SVD of ``Y.detach()``; first derivative (exact, any transform) from
    ``dF = U (Sym(E) ∘ Δ⁻ + Skew(E) ∘ Δ⁺) Vᵀ + (I − UUᵀ) dY V diag(g/s) Vᵀ`` with
    ``E = Uᵀ dY V``, ``Δ⁻ᵢⱼ = (gᵢ − gⱼ)/(sᵢ − sⱼ)``, ``Δ⁺ᵢⱼ = (gᵢ + gⱼ)/(sᵢ + sⱼ)`` (``g'`` at ties);
    second derivative from :func:`_svd_second_order` (``g`` piecewise linear: ``g'' = 0``).
    ``g`` may depend on the index (truncation) and on locally constant signs (det fixes).
    ``tie_tol(s)`` (``(…, 1)``) is the gap under which two values tie, default ``√ε · max(s₁, tiny^¼)``
    (Note [Spectral ties relative to the spectrum]).
    NaN/inf input gives NaN. In plain autograd one node with the adjoint of ``dF`` written out
    (Note [Lazy second-order terms]).
    """
    mode = derivative_mode(Y, first=True)
    if mode == "lazy":
        return closed_form_node(lambda: _spectral_svd(Y, g_fn, tie_tol, "vjp"),
                                lambda y: _spectral_svd(y, g_fn, tie_tol, "chain"), Y)
    return _spectral_svd(Y, g_fn, tie_tol, mode)


def _spectral_svd(Y: Tensor, g_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                  tie_tol: Optional[Callable[[Tensor], Tensor]], mode: str) -> Any:
    """:func:`spectral_svd` in ``mode``: "none" (the value), "chain" (value and derivative terms as
    torch ops), "first" (the chain without the second-order term) or "vjp" (``(value,
    vector-Jacobian product)``, for :func:`closed_form_node`)."""
    Y0 = Y.detach()
    U, s, Vh = torch.linalg.svd(sanitize(Y0), full_matrices=False)
    g, dg = g_fn(s, U, Vh)
    g, dg = g.detach(), dg.detach()
    out = (U * g.unsqueeze(-2)) @ Vh
    if mode == "none":  # nothing differentiates: the terms are 0 in value
        return out + poison(Y0)
    V = Vh.mT
    tol = (_tie_tol if tie_tol is None else tie_tol)(s).unsqueeze(-1)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    gi, gj = g.unsqueeze(-1), g.unsqueeze(-2)
    dgi, dgj = dg.unsqueeze(-1), dg.unsqueeze(-2)
    dminus = _divided(gi - gj, dgi, dgj, si - sj, tol)
    dplus = _divided(gi + gj, dgi, dgj, si + sj, tol)
    tall = Y.shape[-2] > Y.shape[-1]
    t = tol.squeeze(-1)
    ratio = torch.where(s > t, g / torch.where(s > t, s, torch.ones_like(s)), dg).unsqueeze(-2) if tall else None
    if mode == "vjp":

        def vjp(G: Tensor, U: Tensor, Vh: Tensor, dminus: Tensor, dplus: Tensor, ratio: Optional[Tensor]) -> Tensor:
            # the adjoint of dF: Sym/Skew and ∘Δ± are self-adjoint (Note [Node state as saved tensors])
            GV = G @ Vh.mT
            Gt = U.mT @ GV
            Gm, Gp = Gt * dminus, Gt * dplus
            gY = U @ (0.5 * (Gm + Gm.mT) + 0.5 * (Gp - Gp.mT))
            if tall:
                gY = gY + (GV - U @ Gt) * ratio
            return gY @ Vh

        return out + poison(Y0), vjp, (U, Vh, dminus, dplus, ratio)
    D = Y - Y0  # zero in value (NaN where Y is not finite); carries every tangent
    E = U.mT @ D @ V
    K = 0.5 * (E + E.mT) * dminus + 0.5 * (E - E.mT) * dplus
    R = D @ V - U @ E if tall else None  # (I − UUᵀ) dY V
    out = out + U @ K @ Vh
    if mode != "first":  # "first": one forward-mode level, whose tangent the term does not change
        out = out + _svd_second_order(U, s, Vh, g, dg, E, R, tol)
    if R is not None:
        out = out + (R * ratio) @ Vh
    return out


def spectral_eigh(Y: Tensor, g_fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
                  tie_tol: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``Q diag(g) Qᵀ`` for ``sym(Y) = Q diag(λ) Qᵀ`` (ascending), ``(g, g') = g_fn(λ, Q)``, or
    ``(g, g', g'')`` for a ``g`` that is not piecewise linear.

    Value from ``eigh`` of the detached symmetric part; exact first derivative
    ``Q (Qᵀ dS Q ∘ Γ) Qᵀ`` with the divided differences ``Γᵢⱼ = (gᵢ − gⱼ)/(λᵢ − λⱼ)`` (Daleckii–Krein;
    ``g'`` at ties) and exact second derivative (Note [Second derivatives of spectral maps];
    ``g'' = 0`` where ``g_fn`` returns two values). The result is exactly symmetric. ``tie_tol`` as
    :func:`spectral_svd`'s. NaN/inf input gives NaN. In plain autograd one node (as :func:`spectral_svd`).
    """
    mode = derivative_mode(Y, first=True)
    if mode == "lazy":
        return closed_form_node(lambda: _spectral_eigh(Y, g_fn, tie_tol, "vjp"),
                                lambda y: _spectral_eigh(y, g_fn, tie_tol, "chain"), Y)
    return _spectral_eigh(Y, g_fn, tie_tol, mode)


def _spectral_eigh(Y: Tensor, g_fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
                   tie_tol: Optional[Callable[[Tensor], Tensor]], mode: str) -> Any:
    """:func:`spectral_eigh` in ``mode`` (as :func:`_spectral_svd`)."""
    S = sym_part(Y)
    S0 = S.detach()
    lam, Q = torch.linalg.eigh(sanitize(S0))
    g, dg, *rest = g_fn(lam, Q)
    g, dg = g.detach(), dg.detach()
    d2g = rest[0].detach() if rest else None
    out = sym_part((Q * g.unsqueeze(-2)) @ transpose(Q))
    if mode == "none":  # nothing differentiates: the terms are 0 in value
        return out + poison(S0)
    gam, H, tie, safe = _second_divided(lam, g, dg, (_tie_tol if tie_tol is None else tie_tol)(lam).unsqueeze(-1), d2g)
    if mode == "vjp":

        def vjp(G: Tensor, Q: Tensor, gam: Tensor) -> Tensor:  # S ↦ Q (Qᵀ S Q ∘ Γ) Qᵀ is self-adjoint; sym_part twice
            return sym_part(Q @ ((transpose(Q) @ sym_part(G) @ Q) * gam) @ transpose(Q))

        return out + poison(S0), vjp, (Q, gam)
    E = transpose(Q) @ (S - S0) @ Q
    if mode == "first":  # one forward-mode level: the first-order term alone (Note [Lazy second-order terms])
        return out + sym_part(Q @ (E * gam) @ transpose(Q))
    return out + sym_part(Q @ (E * gam + _second_core(E, gam, H, tie, safe)) @ transpose(Q))


def _frame_coefficients(s: Tensor, r: int, n: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-r singular frames' first derivatives, from the singular values ``s`` (k of them) of a tall n×k
    ``X``: with ``E = Uᵀ dX V`` over the thin SVD's k pairs, ``duᵢ`` has ``αᵢⱼ Eⱼᵢ + βᵢⱼ Eᵢⱼ`` along each
    dropped ``uⱼ`` and ``(I − UUᵀ) dX vᵢ/sᵢ`` outside range U, ``dvᵢ`` has ``αᵢⱼ Eᵢⱼ + βᵢⱼ Eⱼᵢ`` along each
    dropped ``vⱼ``, ``α = sᵢ/(sᵢ² − sⱼ²)``, ``β = sⱼ/(sᵢ² − sⱼ²)``: the projectors' derivatives, exact
    wherever the r-th singular value is above the next (not only at rank r, where ``sⱼ = 0``).
    Returns ``1/sᵢ`` of the kept (``(…, 1, r)``; 0 below the rank tolerance), ``α`` and ``β``
    (``(…, k − r, r)``, j dropped; 0 where the gap is below the tolerance)."""
    sr, sq = s[..., :r], s[..., r:]
    t = rank_tol(s[..., :1], n, k).clamp(min=torch.finfo(s.dtype).tiny)
    inv = torch.where(sr > t, 1.0 / torch.where(sr > t, sr, torch.ones_like(sr)), torch.zeros_like(sr)).unsqueeze(-2)
    si, sj = sr.unsqueeze(-2), sq.unsqueeze(-1)
    gap = si * si - sj * sj
    ok = (si > t.unsqueeze(-1)) & (gap > (t * t.clamp(min=1.0)).unsqueeze(-1))
    den = torch.where(ok, gap, torch.ones_like(gap))
    return inv, torch.where(ok, si / den, torch.zeros_like(gap)), torch.where(ok, sj / den, torch.zeros_like(gap))


def separated_values(batch: tuple[int, ...], r: int, generator, dtype, device) -> Tensor:
    """``r`` random values in (0, 1], descending, consecutive gaps ≥ 1/(2r): ``tᵢ = (r − i − ξᵢ/2)/r``."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if device is None and generator is not None:
        device = generator.device
    xi = _linalg._rand(batch + (r,), generator, dtype, device)  # Note [No generator=None]
    i = torch.arange(r, dtype=dtype, device=device)
    return (r - i - 0.5 * xi) / r


def _det_sign(A: Tensor) -> Tensor:
    return torch.linalg.slogdet(A)[0]


def flip_last_column(V: Tensor, d: Tensor) -> Tensor:
    """``V`` with its last column multiplied by ``d`` (batch-shaped ±1)."""
    ones = torch.ones_like(V[..., 0, :-1])
    return V * torch.cat([ones, d.unsqueeze(-1)], dim=-1).unsqueeze(-2)


# Note [Sketched frames of low-rank points]
# A point of the rank family is an n×k (n×n) matrix of rank r ≪ k, and an optimizer step reads its
# frames three times (tangent at X, project(X + V) in retract, tangent at the new point in
# transport), each time from a thin SVD (eigh) of the dense matrix: O(nk·min(n, k)), seconds for
# 2048×2048. Where nothing differentiates (derivative_mode "none") in eager mode, those maps first
# try the range of the point from a sketch: Q = qr(Y Ω) (Ω k×q, q = r + 8 for a tangent, 2r + 8
# for project: X + V with V tangent has rank ≤ 2r), B = Qᵀ Y (q×k), the SVD of B (eigh of Qᵀ S Q),
# three n×k×q products in all. The sketch is taken only where it is certified: the residual
# ‖Y − Q B‖_F is within the rank tolerance 4ε√max(n, k)·σ₁ (the whole residual at the dense SVD's
# own backward error; √k times it let a real tail of that size through, and the frame of a kept
# value σ_r ≪ σ₁ missed by the sketch then moved by ~residual/σ_r, 500× the dense path's rounding
# at 256×256: an exactly-low-rank point's residual is 0.02–0.3 of the tolerance, float32 and
# float64, 64² to 1024²), and the r-th value is separated from the (r+1)-th (for eigenvalues: from
# the larger of it and 0, the n − q values the sketch leaves out) by more than √ε·σ₁ (both checks relative to σ₁: a point's scale does not decide; with the
# spectral maps' tie tolerance √ε·max(1, σ₁) no float32 point with σ_r < 3.5e-4 was sketched, a radam
# step of LowRank(16) 1024² scaled by 3e-4 took 1.4 s instead of 55 ms). Then Y = Q B + E with
# ‖E‖ at rounding level, and the top-r frames and values of Q B are those of Y to rounding over the
# gap, as the dense SVD's are: the results agree with the dense path's to rounding (tests pin
# 1e-10 in float64). Anything else (a point off the stratum, a rank below r, a tie at the r-th
# value, a Y of full rank given to project, a NaN/inf entry, whose residual is NaN, a batch with
# one such matrix) takes the dense path, whose results are unchanged: only the time depends on Ω
# (and, by rounding, a matrix's result on its batch neighbours, as in Note [Eager early exit of the
# Newton rounds]). Ω is fixed (a private generator's Gaussian, cached per shape): no draw from the
# user's generator, the same result on every call. The check reads a value: in eager mode only, as
# the Birkhoff early exit and the exponential's degree do (not under torch.compile, torch.func
# transforms, make_fx tracing, for subclasses or meta tensors: eager_fast and can_check), which
# keep the dense path; nor where 2q > k or k < 64 (no gain: the sketch's fixed costs match the dense
# factorization there, a step of LowRank(1) 32×32 1.24× slower, LowRank(4) 64×64 0.79×), for a
# det-fixed space (GLp) or a value map other than Identity, Positive and Abs (only those zero the
# values past r). The gain, one thread, float32, a radam step (three such maps): LowRank(16)
# 1024×1024 0.91 s → 28 ms, 2048×2048 12.8 s → 0.22 s (README, Known limitations;
# benchmarks/REFACTOR-session-2026-12-06g.md). The certificate's residual Y − Q B is one fused product
# (addmm/baddbmm) into its own n×k temporary, divided by σ₁ in place (_member_residual, the check's;
# _sketch_eigh's: S − Q C over S): not a product, a difference and a quotient, two n×k temporaries and
# two passes more (one thread, 1024²–2048²: LowRank's maps 0.86–0.97× the time, a radam step 0.90–0.95×,
# side by side; 256² unchanged). The frames are the same bit for bit, the residual the same to
# rounding (≤ 4e-3 of the rank tolerance in float64, 2e-6 in float32, for tails of 0.05–2× the
# tolerance; no gate moved): only whether the sketch is taken can read it.
#
# Note [Symmetric parts without strided elementwise ops]
# The eigen family's sketched maps (Note [Sketched frames of low-rank points]) are products with thin
# frames, O(n²r); around them a radam step of PSSDLowRank took eight symmetric parts 0.5 * (A + Aᵀ) of
# n×n matrices (of the point, of G, of X + V, of each result): an elementwise op with a transposed
# operand walks that operand a column at a time, 4 ms for 1024×1024 on one thread (40× a contiguous
# add, 5× an n×n×24 product), 55% of the step, which took 2× LowRank's. Now, where nothing
# differentiates:
# * the symmetric part of the point (of Y in project) is 0.5 * (Aᵀ + A) with Aᵀ copied first by
#   torch's blocked transposing copy (2-D; a batch of matrices of side ≥ _BLOCKED_T_MIN one matrix at
#   a time; elsewhere the strided read is as fast): the same entries bit for bit, ~1 ms at 1024²;
# * tangent never forms sym(G): with S = sym(G), P = QQᵀ (Q the n×r frame), K = Qᵀ S =
#   ½ (Qᵀ G + (G Q)ᵀ) and H = Q (K − ½ (K Q) Qᵀ), P S + S P − P S P = H + Hᵀ (three n×n×r products,
#   the old formula's to rounding, exactly symmetric; linear in G, which may be differentiated);
# * the result H + Hᵀ (project: H = Q diag(g/2) Qᵀ, the old sym(Q diag(g) Qᵀ) bit for bit, halving
#   being exact) takes the blocked copy of Hᵀ too;
# * the sketch's residual S − Q C is one fused product written over S (its own temporary), divided
#   by σ₁ in place: the frames are the old ones bit for bit, the residual the old one to rounding
#   (only whether the sketch is taken can read it).
# While a dispatch mode is active each of these updates is made out of place, with the same values (Note
# [In place under a dispatch mode]: selective checkpointing whose policy saves a product or a sum handed
# the updated output back in the recomputation, "Tensor cached during selective activation checkpoint
# has been mutated" from contains/check of a LowRank/PSSDLowRank point ≥ 64², and from PSSDLowRank's
# tangent/project of a point nothing differentiates).
# One thread, a radam step of PSSDLowRank(4) / (16) 1024² float32: 75 / 63 ms → 30 / 31 ms (LowRank's:
# 29 / 31 ms), float64 1.7–2×; 256²: 1.05–1.3× (the old and new maps interleaved in one process).
_BLOCKED_T_MIN = 512


def _transposed_copy(A: Tensor) -> Optional[Tensor]:
    """``Aᵀ`` of real square matrices as a new contiguous tensor, by torch's blocked transposing copy, or
    None where that does not pay (Note [Symmetric parts without strided elementwise ops])."""
    n = A.shape[-1]
    if dispatch_mode_active():  # (its copy and the caller's update are in place: Note [In place under a dispatch mode])
        return None
    if A.ndim == 2:
        return torch.empty(A.shape, dtype=A.dtype, device=A.device).copy_(A.mT)
    if n >= _BLOCKED_T_MIN and A.numel() // (n * n) <= 64:
        T = torch.empty(A.shape, dtype=A.dtype, device=A.device)
        for t, a in zip(T.view(-1, n, n), A.reshape(-1, n, n)):
            t.copy_(a.mT)  # (each a 2-D copy: the blocked kernel)
        return T
    return None


def _sym_detached(A: Tensor) -> Tensor:
    """``sym_part(A).detach()`` of a real ``A``, bit for bit (the same sums, then the exact halving)."""
    A = A.detach()
    T = _transposed_copy(A)
    if T is None:  # (None under a dispatch mode: no update in place either)
        return (A + A.mT) * 0.5
    return T.add_(A).mul_(0.5)


def _plus_transposed(H: Tensor) -> Tensor:
    """``H + Hᵀ`` of a real square ``H``, bit for bit; a differentiated ``H`` takes the plain op."""
    T = None if torch.is_grad_enabled() and H.requires_grad else _transposed_copy(H)
    return H + H.mT if T is None else T.add_(H)


_SKETCH_OVERSAMPLE = 8
_SKETCH_MIN_SIDE = 64  # below: the dense factorization is as fast (LowRank(1) 32×32: 0.8 ms dense, 1.0 sketched a step)
_SKETCHES: dict[tuple, Tensor] = {}
_SKETCH_LOCK = threading.Lock()


def _sketch_matrix(k: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fixed k×q Gaussian of Note [Sketched frames of low-rank points] (cached, 16 shapes)."""
    key = (k, q, dtype, device)
    Om = _SKETCHES.get(key)
    if Om is None:
        return outside_modes(_new_sketch, key)  # Note [The sketch under a dispatch mode]
    return Om


# Note [The sketch under a dispatch mode]
# The sketch is drawn on the first call of its key (randn, then _to_copy to the point's dtype) and read
# from _SKETCHES after: a map's ops depend on whether an earlier call saw the key. Selective activation
# checkpointing hands each saved op output back in the recomputation by (op, call index): a first sketch
# inside a checkpointed region (LowRank.project of a buffer), recomputed as a hit, handed the sketch's
# saved draw to the region's next randn with a generator (a policy saving the non-pointwise ops: a
# gradient 73% off, silently, where the shapes agree; a size mismatch where not) and, float32, its
# conversion to the region's next _to_copy (a policy saving every op: "Recomputed values ... have
# different metadata"). The sketch is a function of the key alone, so it is drawn with the modes
# switched off (as the layouts: Note [Layouts under a dispatch mode]).
def _new_sketch(key: tuple) -> Tensor:
    k, q, dtype, device = key
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    # (on the CPU, as its generator: the default device (set_default_device("cuda"), "meta") would
    # refuse the CPU generator or leave no values to copy)
    Om = torch.randn(k, q, generator=gen, dtype=torch.float64, device="cpu").to(dtype=dtype, device=device)
    with _SKETCH_LOCK:
        while len(_SKETCHES) >= 16:
            _SKETCHES.pop(next(iter(_SKETCHES)), None)
        _SKETCHES[key] = Om
    return Om


def _sketch_size(k: int, r: int, q: int) -> bool:
    """Whether a short side ``k`` is worth a sketch of ``q`` columns for rank ``r`` (read first: ints only)."""
    return r < q and 2 * q <= k and k >= _SKETCH_MIN_SIDE


def _sketch_ok(Y: Tensor) -> bool:
    """Whether the sketch's check may read ``Y``'s values (Note [Sketched frames of low-rank points])."""
    return Y.ndim >= 2 and Y.layout == torch.strided and eager_fast(Y) and can_check(Y)  # (sparse: the dense path's error)


def _sketch_residual(R: Tensor, smax: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """``(‖R‖_F/σ₁, √ε·σ₁)`` for the checks of Note [Sketched frames of low-rank points]: both relative to
    ``σ₁ = smax`` (the norm of ``R/σ₁``: its squares neither underflow nor overflow at any scale), and
    ``σ₁`` itself in the normal range with room for rounding (else a NaN residual: the dense path).
    ``inplace``: ``R`` is a temporary, divided in place."""
    s1 = _normal_scale(smax)[..., None, None]
    inplace = inplace and not dispatch_mode_active()  # Note [In place under a dispatch mode]
    return torch.linalg.matrix_norm(R.div_(s1) if inplace else R / s1), math.sqrt(torch.finfo(R.dtype).eps) * s1[..., 0, 0]


def _normal_scale(smax: Tensor) -> Tensor:
    """``smax`` where it is in the normal range with room for rounding, else NaN (:func:`_sketch_residual`)."""
    fi = torch.finfo(smax.dtype)
    return torch.where(smax >= fi.tiny / fi.eps, smax, torch.full_like(smax, math.nan))


def _sketch_tie(smax: Tensor) -> Tensor:
    """``√ε·σ₁`` of :func:`_sketch_residual` (NaN where ``σ₁ = smax`` is not normal), without the residual."""
    return math.sqrt(torch.finfo(smax.dtype).eps) * _normal_scale(smax)


def _minus_product(S: Tensor, Q: Tensor, C: Tensor) -> Tensor:
    """``S − Q C``, written over ``S`` (a temporary) by one fused product where the layouts allow (Note
    [Symmetric parts without strided elementwise ops]: two n×n temporaries fewer)."""
    n, m, k = S.shape[-2], S.shape[-1], Q.shape[-1]
    if (not S.is_contiguous() or Q.shape[:-2] != S.shape[:-2] or C.shape[:-2] != S.shape[:-2]
            or dispatch_mode_active()):  # Note [In place under a dispatch mode]
        return S - Q @ C
    if S.ndim == 2:
        return S.addmm_(Q, C, alpha=-1)
    b = math.prod(S.shape[:-2])
    S.view(b, n, m).baddbmm_(Q.reshape(b, n, k), C.reshape(b, k, m), alpha=-1)
    return S


def _sketch_svd(Yt: Tensor, r: int, q: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(U, s, Vh)``: the thin SVD of ``Q Qᵀ Yt`` (U n×q, s q, Vh q×k) for a tall detached ``Yt`` (n×k)
    of numerical rank ≤ q whose r-th singular value is separated from the next, or None (Note
    [Sketched frames of low-rank points])."""
    n, k = Yt.shape[-2:]
    if not _sketch_size(k, r, q):
        return None
    Yt = Yt.detach()
    Q = torch.linalg.qr(Yt @ _sketch_matrix(k, q, Yt.dtype, Yt.device)).Q
    B = Q.mT @ Yt
    Ub, s, Vh = torch.linalg.svd(sanitize(B), full_matrices=False)  # (NaN/inf in Yt: a NaN residual, the dense path)
    res = _member_residual(Yt, Q, B, s[..., 0])  # (one fused product over a fresh temporary, divided in place)
    ok = (res <= rank_tol(torch.ones_like(res), n, k)) & (s[..., r - 1] - s[..., r] > _sketch_tie(s[..., 0]))
    if not bool(ok.all()):
        return None
    return Q @ Ub, s, Vh


def _sketch_eigh(S: Tensor, r: int, q: int) -> Optional[tuple[Tensor, Tensor]]:
    """``(λ, Q)`` (ascending, q of them) of ``Q Qᵀ S Q Qᵀ`` for a detached symmetric ``S`` (n×n) of numerical
    rank ≤ q whose r-th largest eigenvalue is above the next and above 0, or None (as :func:`_sketch_svd`).
    ``S`` is overwritten (by the residual): the callers' own temporary (:func:`_sym_detached`)."""
    n = S.shape[-1]
    if not _sketch_size(n, r, q):
        return None
    Q = torch.linalg.qr(S @ _sketch_matrix(n, q, S.dtype, S.device)).Q
    C = Q.mT @ S
    lam, W = torch.linalg.eigh(sanitize(sym_part(C @ Q)))  # (NaN/inf in S: a NaN residual, the dense path)
    res, tie = _sketch_residual(_minus_product(S, Q, C), lam.abs().amax(-1), inplace=True)
    nxt = lam[..., q - r - 1].clamp(min=0.0)  # the (r+1)-th largest, the n − q left out being 0
    ok = (res <= rank_tol(torch.ones_like(res), n, n)) & (lam[..., q - r] - nxt > tie)
    if not bool(ok.all()):
        return None
    return lam, Q @ W


# Note [Sketched membership of low-rank points]
# contains, check and from_manifold of a point of the rank family read every singular value (eigenvalue):
# svdvals (eigvalsh) for the measures of _violations, then a thin SVD (eigh) for the frames, 13 s for
# LowRank(16) at 2048×2048. A rank test needs the (r+1)-th value, which the sketch Y = Q B + R (B = QᵀY,
# Note [Sketched frames of low-rank points]) gives only as a bound, each way: σᵢ(Y) ≥ σᵢ(B)/‖Q‖₂
# (interlacing; no residual), σᵢ(Y) ≤ ‖Q‖₂ σᵢ(B) + ‖R‖₂ (Weyl), with ‖R‖₂ ≤ ‖R‖_F and ‖Q‖₂² ≤ 1 + d,
# d = ‖QᵀQ − I‖_F, both computed, and σ₁(Y) ≤ ‖Y‖_F. For S = sym(Y): S = Q (QᵀSQ) Qᵀ + R + Q Qᵀ Rᵀ
# (R = S − Q QᵀS) puts each eigenvalue of S within (2 + d)‖R‖_F of one of Q (QᵀSQ) Qᵀ's (QᵀSQ's, each
# moved by at most d|λ| (Ostrowski), and n − q zeros), and QᵀSQ = G^½ (ŨᵀSŨ) G^½ (G = QᵀQ, Ũ
# orthonormal) has values that interlace S's, moved by at most 2d|λ|. Each bound is widened by the
# rounding of the computed products and values, 4ε(√max(n, k) + q)·‖Y‖₂ (the rank tolerance, the dense
# SVD's own backward error, and the q-term products'). So:
# - a member is proved by an upper bound of each measure within the tolerance: σ_(r+1), the most negative
#   and the n − r smallest |λ|, max|X − Xᵀ| from above; σ_r, λ_r and the scale max(1, σ₁) from below;
#   the value map's floor at both ends of σ₁'s interval (for a positive σ_r it is largest at an end: its
#   c is convex in σ₁);
# - a non-member by a lower bound of the rank measure above it (σ_(r+1), λ_(r+1)↓ or −λ_min from below,
#   the scale from above; no residual: a full-rank matrix too) — contains only: check's error names the
#   dense measures' values, so a check that the sketch does not accept takes them.
# Everything else (a value map's measure past the tolerance, a tail that the sketch leaves in R, a
# point within the rounding of the tolerance, NaN/inf, whose bounds are NaN, a batch with one such
# matrix) takes the dense measures, unchanged. So the sketch decides only where the exact measures are
# on that side of the tolerance: it and the dense measures (whose own values carry ε√n·σ₁) disagree
# only for a point within that rounding of the tolerance. from_manifold's frames are those of the
# certified sketch of the maps (_sketch_svd, _sketch_eigh: a residual within the rank tolerance, a gap
# at the r-th value), whose values equal the dense ones to rounding, and whose frames span the dense
# frames' spaces to rounding over the gap: up to the sign of each pair (uᵢ, vᵢ) (the dense SVD's signs
# are LAPACK's choice, a GPU's another) and, in a cluster of kept values, up to a rotation of the
# cluster (the dense path's is arbitrary too); to_manifold(*from_manifold(X)) is X to rounding either
# way. The gates are the maps': eager, nothing differentiates from_manifold's point (its result is
# differentiated through the dense SVD; contains and check, whose booleans nothing differentiates, read
# the detached values of a point that requires grad too: a parameter checked during training),
# a value map of Identity, Positive and Abs, no det fix (GLp), the sketch's size; autocast off, as in
# _measure. `rebase` of the family reads the frames from the chart already (no decomposition).
def _orth_error(Q: Tensor) -> Tensor:
    """``‖QᵀQ − I‖_F`` (an upper bound of ``‖QᵀQ − I‖₂``) of the sketch's frame."""
    G = Q.mT @ Q
    return torch.linalg.matrix_norm(G - torch.eye(G.shape[-1], dtype=G.dtype, device=G.device))


def _member_residual(Y: Tensor, Q: Tensor, B: Tensor, smax: Tensor) -> Tensor:
    """``‖Y − Q B‖_F/σ₁`` of :func:`_sketch_residual` (NaN where ``σ₁`` is not normal), in two passes over the
    n×k residual fewer: one kernel for the product and the difference, the scaling in place."""
    return _sketch_residual(_add_product(Y, Q, B, 1.0, -1.0), smax, inplace=True)[0]


def _member_rounding(dtype: torch.dtype, n: int, k: int, q: int) -> float:
    """The rounding (relative to ‖Y‖₂) by which the sketch's bounds are widened (Note [Sketched membership
    of low-rank points]): ``4ε(√max(n, k) + q)``."""
    return 4.0 * torch.finfo(dtype).eps * (math.sqrt(max(n, k)) + q)


def _sketch_member_svd(Yt: Tensor, r: int, q: int, vm: ValueMap, tol: float
                       ) -> tuple[Optional[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``contains`` of the tall ``Yt`` (n×k, r < k) at ``tol`` where the sketch decides it for every matrix of
    the batch: a member where each measure of :meth:`SVDSpace._violations` is certainly within ``tol``, not
    one where the rank's certainly exceeds it; else None (Note [Sketched membership of low-rank points]).
    Second, the sketch itself, ``(Q, B, ‖Yt − Q B‖_F/σ₁(B))``, whose frames from_manifold reads
    (:func:`_sketch_svd_of`)."""
    n, k = Yt.shape[-2:]
    Y = Yt.detach()
    Q = torch.linalg.qr(Y @ _sketch_matrix(k, q, Y.dtype, Y.device)).Q  # (NaN/inf in Y: NaN, undecided)
    B = Q.mT @ Y
    s = torch.linalg.svdvals(sanitize(B))
    s1 = s[..., 0]
    res = _member_residual(Y, Q, B, s1)  # ‖R‖_F/σ₁(B); NaN where σ₁(B) is 0 or subnormal
    d = _orth_error(Q)
    t = _member_rounding(Y.dtype, n, k, q)
    top = torch.minimum(s1 * (1.0 + d + res + t), torch.linalg.matrix_norm(Y) * (1.0 + t))  # ≥ σ₁(Y)
    u = t * top  # the rounding of the computed values

    def lo(i: int) -> Tensor:  # ≤ σᵢ(Y) (0-based i): σᵢ(B) ≤ ‖Q‖₂ σᵢ(Y), no residual
        return s[..., i] * (1.0 - d) - u

    def hi(i: int) -> Tensor:  # ≥ σᵢ(Y): Weyl
        return s[..., i] * (1.0 + d) + res * s1 + u

    worst = hi(r) / lo(0).clamp(min=1.0)  # ≥ σ_(r+1)/max(1, σ₁)
    kept = lo(r - 1)
    for vmax in (lo(0).clamp(min=0.0), torch.minimum(hi(0), top)):
        for v in vm.violations(kept.unsqueeze(-1), vmax, n, k).values():
            worst = torch.maximum(worst, v)
    if isinstance(vm, Positive):  # a floor measure is bounded by its ends only for a positive σ_r
        worst = torch.where(kept > 0, worst, torch.full_like(worst, math.inf))
    least = lo(r) / top.clamp(min=1.0)  # ≤ σ_(r+1)/max(1, σ₁)
    return _decided(worst <= tol, least > tol), (Q, B, res)


def _sketch_member_eigh(X: Tensor, r: int, q: int, vm: ValueMap, tol: float
                        ) -> tuple[Optional[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``contains`` of the square ``X`` (n×n, r < n) at ``tol`` where the sketch decides it, by the measures
    of :meth:`EigSpace._violations` (as :func:`_sketch_member_svd`), else None; second, the sketch,
    ``(Q, sym(QᵀSQ), ‖S − Q QᵀS‖_F/max|λ(QᵀSQ)|)`` (:func:`_sketch_eigh_of`)."""
    n = X.shape[-1]
    X = X.detach()
    S = _sym_detached(X)
    Q = torch.linalg.qr(S @ _sketch_matrix(n, q, S.dtype, S.device)).Q  # (NaN/inf in X: NaN, undecided)
    C = Q.mT @ S
    M = sym_part(C @ Q)
    lam = torch.linalg.eigvalsh(sanitize(M))  # ascending
    m = lam.abs().amax(-1)
    res = _member_residual(S, Q, C, m)  # ‖R‖_F/max|λ(QᵀSQ)|; NaN where that is 0 or subnormal
    d = _orth_error(Q)
    t = _member_rounding(S.dtype, n, n, q)
    top = torch.minimum(m * (1.0 + d + (2.0 + d) * res + t), torch.linalg.matrix_norm(S) * (1.0 + t))  # ≥ ‖S‖₂
    u = t * top
    w = (2.0 + d) * res * m + u  # each eigenvalue of S is within w (+ d|λ|) of one of Q (QᵀSQ) Qᵀ

    def lo(v: Tensor) -> Tensor:
        return v - d * v.abs() - w

    def hi(v: Tensor) -> Tensor:
        return v + d * v.abs() + w

    vmax_lo = (m / (1.0 + d) - u).clamp(min=0.0)  # ≤ ‖S‖₂ (QᵀSQ a compression of S)
    scale = vmax_lo.clamp(min=1.0)
    lmin = torch.minimum(lo(lam[..., 0]), -w)  # ≤ λ_min(S): min(θλ₁, 0) moved by w
    nxt = torch.maximum(hi(lam[..., q - r - 1]), w)  # ≥ λ_(r+1)↓(S): max(θλ_(r+1)↓, 0) moved by w
    # ≥ max|X − Xᵀ| (= 2 max|X − S| but for the rounding of S, |δSᵢⱼ| ≤ ε|Sᵢⱼ| ≤ ε‖S‖₂; no transposed read)
    eps = torch.finfo(S.dtype).eps
    D = torch.sub(X, S)
    D = D.abs() if dispatch_mode_active() else D.abs_()  # Note [In place under a dispatch mode]
    worst = (2.0 * D.amax(dim=(-2, -1)) * (1.0 + eps) + 2.0 * eps * top) / scale
    worst = torch.maximum(worst, (-lmin).clamp(min=0.0) / scale)  # ≥ max(0, −λ_min)/max(1, ‖X‖₂)
    worst = torch.maximum(worst, torch.maximum(-lmin, nxt).clamp(min=0.0) / scale)  # ≥ the n − r smallest |λ|
    kept = lo(lam[..., q - r])  # ≤ λ_r↓(S)
    for vmax in (vmax_lo, torch.minimum(hi(m), top)):
        for v in vm.violations(kept.unsqueeze(-1), vmax, n, n).values():
            worst = torch.maximum(worst, v)
    if isinstance(vm, Positive):
        worst = torch.where(kept > 0, worst, torch.full_like(worst, math.inf))
    # ≤ the n − r smallest |λ| over max(1, ‖X‖₂), from QᵀSQ alone (Cauchy: QᵀSQ = G^½ (ŨᵀSŨ) G^½, Ũ
    # orthonormal, G = QᵀQ, whose values interlace S's, each moved by at most 2d|λ|): λ_(r+1)↓(S) and
    # −λ_min(S) from below, ‖S‖₂ ≤ top
    nxt_lo = lam[..., q - r - 1] - 2.0 * d * lam[..., q - r - 1].abs() - u
    neg_lo = -(lam[..., 0] + 2.0 * d * lam[..., 0].abs() + u)
    least = torch.maximum(nxt_lo, neg_lo) / top.clamp(min=1.0)
    return _decided(worst <= tol, least > tol), (Q, M, res)


# Note [One sketch for from_manifold]
# from_manifold checks its point, then reads the frames: in the rank family both sketched it (Q = qr(Y Ω),
# B = QᵀY and the residual, three O(nkq) passes over Y each), ~40% of from_manifold the second time. The
# check (_Factorized._checked) returns the sketch it measured, (Q, B, res) or (Q, sym(QᵀSQ), res), and
# from_manifold hands it to _from_manifold explicitly, which reads the frames from it (_sketch_svd_of,
# _sketch_eigh_of) where its own gates allow the sketch (nothing differentiates the point): the same B
# or QᵀSQ (the same ops on the same detached point), so the same SVD (eigh), frames and values bit for bit,
# and the same certificate (the residual within the rank tolerance, a gap at the r-th value). Only the
# certificate's residual differs, by rounding: the check's is one addmm (baddbmm) over σ₁ of svdvals
# (eigvalsh), _sketch_svd's the same addmm over σ₁ of svd (_sketch_eigh's one written over its S, over
# the largest |λ| of eigh), both ε‖Y‖-accurate against a tolerance of 4ε√max(n, k)·σ₁: they disagree
# only for a point within that rounding of the rank tolerance, whose dense frames equal the sketched
# ones to rounding. A sketch that does not certify takes
# the dense SVD (eigh) at once (_sketch_svd would repeat the refusal). Nothing is kept between calls:
# where no check runs (vmap, grad, compile, make_fx, meta and FakeTensor points, a subclass's own check)
# or no sketch was taken (a point that requires grad is checked by the sketch but its frames are the dense
# SVD's), from_manifold is what it was.
def _sketch_svd_of(sketch: tuple[Tensor, Tensor, Tensor], r: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """:func:`_sketch_svd` of the point whose membership sketch ``(Q, B, res)`` :func:`_sketch_member_svd`
    returned (Note [One sketch for from_manifold]): the same SVD of the same ``B``, the same certificate
    (the residual within the rank tolerance, a gap at the r-th value), or None."""
    Q, B, res = sketch
    n, k = Q.shape[-2], B.shape[-1]
    Ub, s, Vh = torch.linalg.svd(sanitize(B), full_matrices=False)
    ok = (res <= rank_tol(torch.ones_like(res), n, k)) & (s[..., r - 1] - s[..., r] > _sketch_tie(s[..., 0]))
    if not bool(ok.all()):
        return None
    return Q @ Ub, s, Vh


def _sketch_eigh_of(sketch: tuple[Tensor, Tensor, Tensor], r: int) -> Optional[tuple[Tensor, Tensor]]:
    """:func:`_sketch_eigh` of the point whose membership sketch ``(Q, M, res)`` :func:`_sketch_member_eigh`
    returned (as :func:`_sketch_svd_of`)."""
    Q, M, res = sketch
    n, q = Q.shape[-2], Q.shape[-1]
    lam, W = torch.linalg.eigh(sanitize(M))
    nxt = lam[..., q - r - 1].clamp(min=0.0)
    ok = (res <= rank_tol(torch.ones_like(res), n, n)) & (lam[..., q - r] - nxt > _sketch_tie(lam.abs().amax(-1)))
    if not bool(ok.all()):
        return None
    return lam, Q @ W


def _decided(member: Tensor, non_member: Tensor) -> Optional[Tensor]:
    """``member`` (batch-shaped) where each matrix is proved a member or proved not one, else None: the dense
    measures decide (Note [Sketched membership of low-rank points]). NaN bounds prove neither."""
    if not bool((member | non_member).all()):
        return None
    return member & ~non_member  # (never both: the rank measure's bounds are ordered)


def _thin_tangent(Xt: Tensor, Gt: Tensor, r: int, need: tuple[bool, bool] = (False, False)
                  ) -> tuple[Tensor, Callable[..., tuple[Optional[Tensor], Optional[Tensor]]], tuple]:
    """``P_U G + G P_V − P_U G P_V`` of a tall ``Xt`` from its top-r singular frames (value from the SVD
    of ``Xt``: O(nk·min(n, k)), the products after it O(nkr); NaN where ``Xt`` is not finite), and its vector-Jacobian product in ``(Xt, Gt)``
    written out (for :func:`closed_form_node`; Note [Lazy second-order terms]). With ``dT = dP_U G (I − P_V)
    + (I − P_U) G dP_V``, a cotangent ``C`` gives ``Ū = 2 sym(C (I − P_V) Gᵀ) U`` and ``V̄ = 2 sym(Gᵀ
    (I − P_U) C) V`` (no n×n matrix formed), pulled back through the frames' derivative
    (:func:`_frame_coefficients`); in ``G`` the map is the (self-adjoint) projection: ``T(X, C)``.
    ``need``: which of the two gradients to compute. The product reads the tensors returned third
    (Note [Node state as saved tensors])."""
    U, s, Vh = torch.linalg.svd(sanitize(Xt), full_matrices=False)
    Ur, Vr = U[..., :r], Vh[..., :r, :].mT
    UG, GV = Ur.mT @ Gt, Gt @ Vr  # kept for the adjoint: Gᵀ U, G V
    UGV = UG @ Vr
    T = Ur @ UG + (GV - Ur @ UGV) @ Vr.mT + poison(Xt)
    n, k = Xt.shape[-2:]

    def vjp(C: Tensor, Gt: Tensor, U: Tensor, s: Tensor, Vh: Tensor, UG: Tensor, GV: Tensor, UGV: Tensor
            ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        Ur, Vr = U[..., :r], Vh[..., :r, :].mT
        CU, CV = C.mT @ Ur, C @ Vr
        VC = Vr.mT @ CU  # (Uᵀ C V)ᵀ
        gG = Ur @ CU.mT + (CV - Ur @ VC.mT) @ Vr.mT if need[1] else None  # T(X, C)
        if not need[0]:
            return None, gG
        GU, VG = UG.mT, UGV.mT
        Ubar = C @ GU + Gt @ CU - CV @ VG - GV @ VC  # 2 sym(C (I − P_V) Gᵀ) U
        Vbar = Gt.mT @ CV + C.mT @ GV - GU @ VC.mT - CU @ VG.mT  # 2 sym(Gᵀ (I − P_U) C) V
        inv, alpha, beta = _frame_coefficients(s, r, n, k)
        UU = U.mT @ Ubar
        P, Q = UU[..., r:, :], Vh[..., r:, :] @ Vbar
        Abar, Bbar = alpha * P + beta * Q, beta * P + alpha * Q
        W = Ubar * inv + U @ (torch.cat([torch.zeros_like(UU[..., :r, :]), Abar], dim=-2) - UU * inv)
        return W @ Vr.mT + Ur @ (Vh[..., r:, :].mT @ Bbar).mT, gG  # (batches broadcast: X and G may differ)

    return T, vjp, (Gt, U, s, Vh, UG, GV, UGV)


def _exact_tangent(Xt: Tensor, Gt: Tensor, r: int) -> Tensor:
    """The same with ``P_U = ΦΦᵀ``, ``P_V = ΦᵀΦ``, ``Φ = U_r V_rᵀ`` the SVD map of ``g = [i < r]``: exact
    to second order in ``X`` (Note [Second derivatives of spectral maps]), O(nk²)."""
    n, k = Xt.shape[-2:]
    keep = torch.arange(k, device=Xt.device) < r
    Phi = spectral_svd(Xt, lambda s, U, Vh: (keep.to(s.dtype).expand_as(s), torch.zeros_like(s)),
                       lambda s: rank_tol(s[..., :1], n, k))  # ties as _frame_coefficients': a rank deficiency
    PG = Phi.mT @ Gt
    PP = Phi.mT @ Phi
    return Phi @ PG + Gt @ PP - Phi @ (PG @ PP)


def _frame_eig_tangent(Q: Tensor, G: Tensor) -> Tensor:
    """``P S + S P − P S P``, ``S = sym(G)``, ``P = QQᵀ`` for a real orthonormal frame ``Q`` (n×r) that
    nothing differentiates: ``H + Hᵀ``, ``H = Q (K − ½ (K Q) Qᵀ)``, ``K = Qᵀ S = ½ (Qᵀ G + (G Q)ᵀ)``
    (Note [Symmetric parts without strided elementwise ops]): exactly symmetric, ``sym(G)`` never
    formed; linear in ``G`` (which may be differentiated)."""
    K = 0.5 * (Q.mT @ G + (G @ Q).mT)
    return _plus_transposed(Q @ (K - 0.5 * ((K @ Q) @ Q.mT)))


def _thin_eig_tangent(X: Tensor, Gs: Tensor, r: int) -> Tensor:
    """``P S + S P − P S P`` (``S = Gs`` symmetric) from the top-r eigenframe ``Q`` of ``sym(X)`` (value
    from ``eigh`` of the detached ``sym(X)``; NaN where ``X`` is not finite): for an ``X`` that nothing
    differentiates (the derivatives come from the projector as a spectral map, :func:`_exact_eig_tangent`)."""
    S0 = sym_part(X).detach()
    Q = torch.linalg.eigh(sanitize(S0))[1][..., -r:] + poison(S0)
    QG = transpose(Q) @ Gs
    return sym_part(2.0 * Q @ QG - Q @ (QG @ Q) @ transpose(Q))


def _exact_eig_tangent(X: Tensor, Gs: Tensor, r: int) -> Tensor:
    """The same with ``P`` the spectral map of ``g = [top r]``: exact to second order in ``X``."""
    n = X.shape[-1]
    keep = torch.arange(n, device=X.device) >= n - r
    P = spectral_eigh(X, lambda lam, Q: (keep.to(lam.dtype).expand_as(lam), torch.zeros_like(lam)),
                      lambda lam: rank_tol(lam.abs().amax(-1, keepdim=True), n, n))  # ties: a rank deficiency
    PG = P @ Gs
    return sym_part(2.0 * PG - PG @ P)


# ----------------------------------------------------------------------- the two families
class _Factorized(AbstractSpace):
    """Abstract: ``frames · diag(values) · frames``; a concrete space declares its hyperparameters
    (``triv`` among them) and implements ``_rank`` and ``_value_map``."""

    _one_node_maps: ClassVar[tuple[str, ...]] = ("tangent", "retract", "project")  # Note [Lazy second-order terms]

    _base_kind: ClassVar[str | None] = "frames"  # what its base is (AbstractSpace._refine_base)

    triv: Any

    @property
    @abc.abstractmethod
    def _value_map(self) -> ValueMap:
        """The value map of the space (see :mod:`geofunc.spaces._values`), derived from its
        hyperparameters (a :class:`~geofunc.spaces._base.cached_attribute` or a constant)."""

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``project(X + V)``."""
        self._check_pair(X, V, "V")
        return self.project(X + V)

    def _point_rank(self, Z: Tensor) -> int:
        """The rank of points of ``Z``'s shape."""
        raise NotImplementedError

    def _dtype_coords(self, Z: Tensor) -> Tensor | None:
        """The values' coordinates (the diagonal of the packed raw tensor, tall or wide) where the value
        map depends on the dtype."""
        if not self._value_map.dtype_dependent() or Z.ndim < 2:
            return None
        d = Z.diagonal(dim1=-2, dim2=-1)[..., : self._point_rank(Z)]
        return d.real if d.is_complex() else d

    def _sketch_member(self, X: Tensor, atol: Any) -> tuple[Optional[Tensor], Any]:
        """``contains(X, atol)`` where the sketch decides it for the whole batch (Note [Sketched membership
        of low-rank points]), else None: the dense measures decide; second, the sketch measured (None
        where none was taken), for :meth:`_from_manifold` (Note [One sketch for from_manifold])."""
        return None, None

    def contains(self, X: Tensor, atol: float | None = None) -> Tensor:
        self._check_shape(X, "X")
        out = self._sketch_member(X, atol)[0]
        return super().contains(X, atol) if out is None else out

    def check(self, X: Tensor, atol: float | None = None) -> None:
        self._checked(X, atol)

    def _checked(self, X: Tensor, atol: Any) -> Any:
        """:meth:`check`, returning the membership sketch it measured ``X`` by (None where none)."""
        self._check_shape(X, "X")
        out, sketch = self._sketch_member(X, atol)
        if out is None or not bool(out.all()):
            super().check(X, atol)  # the dense measures: the error names their values
        return sketch

    def from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        """Right inverse of :meth:`to_manifold`: ``to_manifold(*from_manifold(X)) == X``.

        Raises ``ManifoldError`` if ``X`` is off the space (in eager mode; under
        ``torch.func`` transforms and ``torch.compile`` the value check is skipped). The frames are
        read from the sketch the check measured ``X`` by, where it took one (Note [One sketch for
        from_manifold]).
        """
        if type(self).check is not _Factorized.check or type(self)._from_manifold not in _SKETCH_READERS:
            return super().from_manifold(X)  # a subclass's own check, or its own _from_manifold (no `sketch`)
        self._check_shape(X, "X")
        if not can_check(X):
            return self._from_manifold(X)
        sketch = self._checked(X, None)
        return self._from_manifold(X) if sketch is None else self._from_manifold(X, sketch=sketch)

    def _frames(self, *pairs: tuple[Tensor, Optional[Tensor]]) -> list[Tensor]:
        """The frames of packed coordinates ``P`` at ``base`` for each pair ``(P, base)`` (module
        docstring), their exponentials evaluated as one batch."""
        return frame_charts(list(pairs), self.triv, packed=True)


def _rank_coords(Zt: Tensor, Ub: Optional[Tensor], Vb: Optional[Tensor], r: int) -> tuple[list, Tensor]:
    """The U and V frames' ``(packed coordinates, base)`` pairs and the raw values ``s`` of the tall raw
    tensor ``Zt`` (n×k): the strict lower triangle of its first r columns, the strict upper triangle of
    its first r rows (transposed), its diagonal."""
    pairs = [(torch.tril(Zt[..., :, :r], -1), Ub), (torch.triu(Zt[..., :r, :], 1).mT, Vb)]
    return pairs, torch.diagonal(Zt, dim1=-2, dim2=-1)[..., :r]


def _rank_chart(Zt: Tensor, Ub: Optional[Tensor], Vb: Optional[Tensor], r: int, fmap: ValueMap, triv: Any) -> Tensor:
    """``U diag(f(s)) Vᵀ`` of the tall raw tensor ``Zt`` (n×k) at the frames ``(Ub, Vb)``, as torch ops."""
    pairs, s = _rank_coords(Zt, Ub, Vb, r)
    U, V = frame_charts(pairs, triv, packed=True)
    return (U * (fmap(s) + (s - s)).unsqueeze(-2)) @ V.mT  # s − s: NaN for ±inf raw values


# Note [One-node rank chart]
# In plain eager mode (and so inside the one node under torch.func.grad, Note [One node under
# torch.func.grad] in geofunc/_fused.py), when the raw tensor requires grad and the bases do not, the
# rank family's chart X = U diag(f(s)) Vᵀ is one autograd node: the factor extraction (the strict
# triangles and the diagonal of the raw tensor), the two frames stacked into the tall chart's one
# evaluation (Note [Stacked frames], Note [One-node tall chart] in geofunc/_linalg.py), the values and
# the product, with its adjoint written out:
#   X = U F Vᵀ, F = diag(f(s)):   Ḡ_U = G V F,  Ḡ_V = Gᵀ U F,  Ḡ_f = diag(Uᵀ G V),  Ḡ_s = f′(s) Ḡ_f
#   (U, V) = the stacked tall chart of (P_U, P_V):  Ḡ_P from its adjoint (_tall_adjoint)
#   P_U = tril(Z[:, :r], −1), P_V = triu(Z[:r, :], 1)ᵀ, s = diag(Z)[:r]:  Ḡ_Z scatters the three back
# (f′ in closed form for LowRank's identity and "softplus", else by autograd on the r values). The ~25 small nodes around the
# tall chart's node were a third of a LowRank(4) 10×128 forward and backward. The forward runs the
# chain's ops in the chain's order (the same values, bit for bit); a backward that builds a graph
# (double backward) differentiates the chain recomputed from the saved raw tensor, so every
# derivative order is the chain's. Everything else takes the chain: a base that requires grad, a raw
# tensor that does not (then the tall chart's forward alone runs, without a graph), torch.func
# transforms (but inside the node under grad), forward mode, compile, subclasses, complex dtypes,
# the Cayley map and user trivializations (a value map f of the user's is fine: f′ by autograd),
# square frames (GLp, full rank) and frames narrower than twice the rank. The raw tensor's entries
# are read and written by index (Note [Rank chart coordinates by index]).
#
# Note [Rank chart coordinates by index]
# The node reads the frames' coordinates out of the raw tensor with one index_select (and a masked
# fill of the entries outside the triangles) instead of the strict triangles, the transpose, the
# padding and the stack (10 ops), and writes its gradient with one index_copy_ of the adjoint's pieces
# concatenated (the packed frames' top rows, their other rows, the values) into zeros, instead of
# triangles and a diagonal written into zeros (19 ops): indices that depend only on the shapes, built
# once per (n, k, r, batch, layout, device) (_rank_layout). Where the frames are packed the gather lays
# out [P_top; 0; C_b], so that the packed direction Δ = Y P_top + [0; C_b] + W (J C_b) takes P_top
# (already strictly lower, as the triangles') and [0; C_b] as views, without _packed_apply's tril and
# padding, and the adjoint leaves out the tril that the scatter makes redundant. Every entry is a
# copy of the one the triangles gave: values and gradients are bit for bit the same. (index_select
# and index_copy_ on flat tensors, not advanced indexing, whose kernel was 5–10× slower per entry:
# 1.2 ms for the gradient of a 512×256 rank-32 point, against 0.1 ms for the triangles.)
_LAYOUT_SIZE = 64
# Note [Layouts kept by size]: the index tensors of one layout grow with the batch (~0.6x the bytes of
# the raw tensor they index: 81 MiB for 32 raw 1024x1024 rank-64 matrices), and they stay after the
# model is gone. Kept by count only, 64 batch sizes of a 256x256 rank-16 LowRank kept 276 MiB (the
# largest raw tensor 16 MiB): the layouts of one chart's matrices (one key but for the batch size) are
# also kept to a total of _LAYOUT_BYTES, the oldest batch size dropped first, the newest always kept (a
# model too large for the budget still builds its layout once). The budget is per shape, not over all
# of them: a model whose charts of different shapes need more than _LAYOUT_BYTES together (three 4096-row
# rank-240 LowRank weights, ~30 MiB each) evicted one for the next at every call, so each forward and
# backward rebuilt every layout (12% of the step).
_LAYOUT_BYTES = 1 << 26
_LAYOUTS: dict[tuple, tuple] = {}
_LAYOUT_LOCK = threading.Lock()


def _fresh_locks() -> None:  # Note [Locks across fork] (geofunc/_linalg.py): the layout and sketch caches'
    global _LAYOUT_LOCK, _SKETCH_LOCK
    _LAYOUT_LOCK, _SKETCH_LOCK = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks)


def _rank_layout(n: int, k: int, r: int, packed: bool, batch: Optional[int], transposed: bool, diag: bool,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The indices of Note [Rank chart coordinates by index] for ``batch`` raw matrices (None: one, without a
    batch dimension) of the tall shape n×k: ``(take, skip, put)``. ``take`` (flat) gathers the U and V
    frames' coordinates, ``(2, batch, rows, r)`` (``rows`` = n + r packed: ``[P_top; 0; C_b]``, else n:
    ``P``), from the flattened raw tensor (row-major, or ``transposed``: its transpose row-major),
    ``skip`` marks the gathered entries that are zeros. ``put`` sends each entry of the gradients'
    concatenation (packed: the frames' r×r tops, then their other rows; else the frames; then, where
    ``diag``, the values) to its place in the flat row-major raw gradient, or to one entry past it."""
    key = (n, k, r, packed, batch, transposed, diag, device)
    out = _LAYOUTS.get(key)
    if out is not None:
        return out
    return outside_modes(_new_layout, key)  # Note [Layouts under a dispatch mode]


# Note [Layouts under a dispatch mode]
# A layout is built on the first chart of its shape (~25 index ops) and read from _LAYOUTS after: a
# chart's ops depend on whether an earlier call saw its shape. Selective activation checkpointing hands
# each saved op output back in the recomputation by (op, call index): a first chart of a shape inside a
# checkpointed region, recomputed as a hit, raised "aten.alias.default encountered during backward but
# not found in storage" (a policy saving the non-pointwise ops). The layout is a function of the key
# alone, so it is built with the modes switched off (as the base factor cache: Note [The base factor
# cache under a dispatch mode]); while make_fx traces it is built as before.
def _new_layout(key: tuple) -> tuple[Tensor, Tensor, Tensor]:
    n, k, r, packed, batch, transposed, diag, device = key
    one, batch = batch is None, 1 if batch is None else batch
    rows = n + r if packed else n
    # Built on the CPU, then moved: on the default device, a meta one (`with torch.device("meta")` around
    # a CPU chart) had no values to move ("Cannot copy out of meta tensor"), and a CUDA one put a CPU
    # chart's layout through the GPU.
    cpu = torch.device("cpu")
    c = torch.arange(2, device=cpu).view(2, 1, 1, 1)
    b = torch.arange(batch, device=cpu).view(1, batch, 1, 1)
    i = torch.arange(rows, device=cpu).view(1, 1, rows, 1)
    j = torch.arange(r, device=cpu).view(1, 1, 1, r)
    row = torch.where(i < r, i, i - r) if packed else i  # the frame's row: the top block, then [0; C_b]
    ok = (row > j) & ((c == 0) | (row < k))
    if packed:
        ok = ok & ((i < r) | (row >= r))
    p, q = torch.where(c == 0, row, j), torch.where(c == 0, j, row)  # the raw entry: U's (p, q), V's transposed
    take = b * (n * k) + (q * n + p if transposed else p * k + q)
    take = torch.where(ok, take, torch.zeros_like(take)).expand(2, batch, rows, r)
    skip = (~ok).expand(2, batch, rows, r)
    # the gradient's pieces, in the order of the concatenation
    dump = batch * n * k

    def frames(fr: Tensor) -> Tensor:  # rows fr of both frames, (2, batch, len(fr), r)
        fr = fr.view(1, 1, -1, 1)
        p, q = torch.where(c == 0, fr, j), torch.where(c == 0, j, fr)
        dest = b * (n * k) + p * k + q
        return torch.where((fr > j) & ((c == 0) | (fr < k)), dest, torch.full_like(dest, dump)).expand(2, batch, fr.numel(), r)

    pieces = ([frames(torch.arange(r, device=cpu)), frames(torch.arange(r, n, device=cpu))] if packed
              else [frames(torch.arange(n, device=cpu))])
    if diag:
        d = torch.arange(r, device=cpu).view(1, r)
        pieces.append(torch.arange(batch, device=cpu).view(batch, 1) * (n * k) + d * (k + 1))
    put = torch.cat([t.reshape(-1) for t in pieces])
    if one:
        skip = skip[:, 0]
    out = (take.reshape(-1).to(device), skip.contiguous().to(device), put.to(device))
    with _LAYOUT_LOCK:  # Note [Layouts kept by size]
        same = [k2 for k2 in _LAYOUTS if k2 != key and _matrices(k2) == _matrices(key)]  # other batch sizes, oldest first
        held = sum(_nbytes(_LAYOUTS[k2]) for k2 in same) + _nbytes(out)
        for k2 in same:
            if held <= _LAYOUT_BYTES:
                break
            held -= _nbytes(_LAYOUTS.pop(k2))
        while len(_LAYOUTS) >= _LAYOUT_SIZE:
            _LAYOUTS.pop(next(iter(_LAYOUTS)), None)
        _LAYOUTS[key] = out
    return out


def _matrices(key: tuple) -> tuple:
    """A layout's key without its batch size: the layouts of one chart's matrices."""
    return key[:4] + key[5:]


def _nbytes(layout: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in layout)


class _RankChart(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, Zt: Tensor, Ub: Optional[Tensor], Vb: Optional[Tensor], r: int,  # type: ignore[override]
                fmap: ValueMap) -> Tensor:
        n, k = Zt.shape[-2:]
        zb = Zt.shape[:-2]
        st = _linalg._stack_pairs([(_linalg.Shape(zb + (n, r)), Ub), (_linalg.Shape(zb + (k, r)), Vb)], "expm", True, Zt)
        packed = st.packed
        transposed = not Zt.is_contiguous() and Zt.mT.is_contiguous()  # a wide raw tensor's tall view
        flat = Zt.mT.reshape(-1) if transposed else Zt.reshape(-1)
        take, skip = _rank_layout(n, k, r, packed, math.prod(zb) if zb else None, transposed, True, Zt.device)[:2]
        P = flat.index_select(0, take).view(skip.shape)
        P = P.masked_fill(skip, 0.0) if dispatch_mode_active() else P.masked_fill_(skip, 0.0)  # Note [In place under a dispatch mode]
        if st.batch != zb:  # bases with more batch dimensions than the raw tensor
            P = P.reshape((2,) + (1,) * (len(st.batch) - len(zb)) + zb + P.shape[-2:]).expand((2,) + st.batch + P.shape[-2:])
        if P.ndim > 3:
            P = P.reshape(2 * math.prod(st.batch), P.shape[-2], r)
        Y = st.Y
        if packed:  # Δ = Y P_top + [0; C_b] + W (J C_b) (_packed_apply, the triangles and the padding by index)
            W, J = _linalg._packed_basis(Y, constant=True) if st.basis is None else st.basis
            Pb = P[..., r:, :]
            D = _mm_add(_mm_add(Pb, Y, P[..., :r, :]), W, _mm(J, Pb[..., r:, :]))
        else:
            W = J = None
            D = P
        out, tall_st = _linalg._tall_forward(Y, D, False, False)
        if st.batch:
            out = out.reshape((2,) + st.batch + (n, r))
        U, V = out[0], out[1, ..., :k, :]
        s = torch.diagonal(Zt, dim1=-2, dim2=-1)[..., :r]
        s_leaf = fs_graph = None
        if isinstance(fmap, Identity):
            fs, df = s + (s - s), None
        elif (df := fmap.derivative(s)) is not None:  # f′ in closed form ("softplus")
            fs = fmap(s) + (s - s)
        else:  # f′ by autograd on the r values
            with torch.enable_grad():
                s_leaf = s.detach().clone().requires_grad_()  # (not a view: it stays on the context)
                fs_graph = fmap(s_leaf)
            fs = fs_graph.detach() + (s - s)
        ctx.r, ctx.fmap = r, fmap
        F_ = fs.unsqueeze(-2)
        tall_st["cache"].pop("powers", None)  # (for the compiled kernels: the adjoint reads P2 and P4 only)
        # the bases too: an in-place change before the backward is an error; the state as saved tensors
        # under saved-tensor hooks (Note [Node state as saved tensors] in geofunc/_fastpath.py), but f's
        # private graph and its leaf (r values) on the context: unpacked, the leaf would be another tensor
        save_state(ctx, (Zt, Ub, Vb), (st.batch, Y, W, J, tall_st, U, V, fs, F_, df))
        ctx.f_graph = (s_leaf, fs_graph)
        return (U * F_) @ V.mT

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        (Zt, Ub, Vb), state = saved_state(ctx)
        r = ctx.r
        if torch.is_grad_enabled():  # a graph is asked for: the chain, recomputed (exact to every order)
            with torch.enable_grad():
                X = _rank_chart(Zt, Ub, Vb, r, ctx.fmap, "expm")
                return torch.autograd.grad(X, Zt, G, create_graph=True)[0], None, None, None, None
        batch, Y, W, J, tall_st, U, V, fs, F_, df = state
        s_leaf, fs_graph = ctx.f_graph
        n, k = Zt.shape[-2:]
        GV = G @ V
        gf = (U * GV).sum(dim=-2)
        if gf.shape != fs.shape:  # bases with more batch dimensions than the raw tensor
            gf = gf.sum_to_size(fs.shape)
        if df is not None:
            gs = gf * df
        elif s_leaf is not None:  # the graph is kept: a backward may run more than once, as gradcheck's does
            gs = torch.autograd.grad(fs_graph, s_leaf, gf, retain_graph=True)[0]
        else:
            gs = gf
        gout = stack_matrices([GV * F_, F.pad((G.mT @ U) * F_, (0, 0, 0, n - k))])
        GD = _linalg._tall_adjoint(tall_st, Y, gout)
        if W is not None:  # the packed direction's adjoint (_tall_adjoint's, the tril left to the gather)
            parts = [_mm(Y.mT, GD).reshape(-1), (GD[..., r:, :] + _mm(J.mT, _mm(W.mT, GD))).reshape(-1)]
        else:
            parts = [GD.reshape(-1)]
        zb = Zt.shape[:-2]
        diag = batch == zb
        if diag:
            parts.append(gs.reshape(-1))
        size = math.prod(batch) * n * k
        put = _rank_layout(n, k, r, W is not None, math.prod(batch) if batch else None, False, diag, Zt.device)[2]
        gZ = G.new_zeros(size + 1).index_copy_(0, put, torch.cat(parts))[:size].view(batch + (n, k))
        if not diag:  # bases with more batch dimensions than the raw tensor
            gZ = gZ.sum_to_size(Zt.shape)
            gZ.diagonal(dim1=-2, dim2=-1)[..., :r] += gs
        return gZ, None, None, None, None


try:  # the C++ apply, without Function.apply's per-call argument binding (as _linalg's _TALL_APPLY)
    _RANK_APPLY = super(torch.autograd.Function, _RankChart).apply
except AttributeError:  # pragma: no cover (depends on the torch version)
    _RANK_APPLY = _RankChart.apply


def _rank_chart_node(Zt: Tensor, Ub: Optional[Tensor], Vb: Optional[Tensor], r: int, fmap: ValueMap,
                     triv: Any) -> Optional[Tensor]:
    """The chart as one node (Note [One-node rank chart]), or None: take the chain."""
    if (triv != "expm" or not _linalg._ONE_NODE or not torch.is_grad_enabled() or not Zt.requires_grad
            or not eager_fast(Zt, Ub, Vb) or forward_tangents(Zt, Ub, Vb)):  # Note [Dual levels and recomputation]
        return None
    for T in (Zt, Ub, Vb):
        if T is not None and (torch._C._functorch.is_functorch_wrapped_tensor(T) or (T is not Zt and T.requires_grad)):
            return None
    k = Zt.shape[-1]
    if not (k > r and k >= 2 * r):  # both frames tall and reduced (n ≥ k): the stacked tall chart's node
        return None
    return _RANK_APPLY(Zt, Ub, Vb, r, fmap)


def _pack(s: Tensor, shape: tuple[int, int]) -> Tensor:
    """The raw tensor of shape ``(*batch, n, k)`` holding ``s`` on its diagonal, zero elsewhere."""
    r = s.shape[-1]
    return F.pad(torch.diag_embed(s), (0, shape[1] - r, 0, shape[0] - r))


class SVDSpace(_Factorized):
    """Abstract: ``X = U diag(f(s)) Vᵀ`` with ``U ∈ St(n, r)``, ``V ∈ St(k, r)`` (tall form n ≥ k).

    A concrete space implements ``_rank(n, k)`` and ``_value_map``; ``_det_positive`` marks the
    det > 0 component of square matrices (GLp: square only, bases with ``det U det V = 1``).
    """

    _det_positive: ClassVar[bool] = False

    @abc.abstractmethod
    def _rank(self, n: int, k: int) -> int:
        """The rank of points of tall shape n×k."""

    def _point_rank(self, Z: Tensor) -> int:
        return self._rank(max(Z.shape[-2:]), min(Z.shape[-2:]))

    # ------------------------------------------------------------ shapes
    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        n, k = self._require_matrix(X, what, square=self._det_positive)
        r = self._rank(max(n, k), min(n, k))
        if r > min(n, k):
            raise error(self, f"`{what}` of matrices with min(n, k) ≥ rank = {r}", f"shape {tuple(X.shape)}")

    def _bases(self, base: Any, Z: Tensor, r: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The frames ``(U_b, V_b)`` of ``base`` for the tall raw tensor ``Z`` (n×k), checked: shapes
        ``(…, n, r)`` and ``(…, k, r)``, ``Z``'s dtype."""
        if base is None:
            return None, None
        n, k = Z.shape[-2:]
        # formatted on the error paths only (Note [No f-string of a size or rank in a map])
        def expected() -> str:
            return (f"`base` to be None or a pair (U, V) of frames of shapes (..., {n}, {r}) and (..., {k}, {r}) "
                    "(tall form, as from_manifold returns)")

        if not isinstance(base, (tuple, list)) or len(base) != 2:
            raise error(self, expected(), describe(base))
        for B, what in zip(base, ("base[0]", "base[1]")):  # (before their shapes: Note [Dense tensors only] in _base.py)
            if isinstance(B, torch.Tensor):
                self._require_dense(B, what)
        for B, shape in zip(base, ((n, r), (k, r))):
            if B is not None and (not isinstance(B, torch.Tensor) or B.ndim < 2 or tuple(B.shape[-2:]) != shape):
                raise error(self, expected(), f"({describe(base[0])}, {describe(base[1])})")
        if base[0] is not None:
            self._require_frame(Z, base[0], "base[0]")
        if base[1] is not None:
            self._require_frame(Z, base[1], "base[1]", base[0])
        return base[0], base[1]

    # ------------------------------------------------------------ the maps
    def _tall_raw(self, Z: Tensor, base: Any) -> tuple[Tensor, bool, int, Optional[Tensor], Optional[Tensor]]:
        """``(Zt, transposed, r, U_b, V_b)``: the raw tensor checked and in tall form, the rank, the bases."""
        self._check_shape(Z, "Z")
        Zt, tr = tall(Z)
        r = self._rank(*Zt.shape[-2:])
        return (Zt, tr, r, *self._bases(base, Zt, r))

    def _factors(self, Z: Tensor, base: Any) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``(U, s_raw, V, transposed)`` of a raw tensor."""
        Zt, tr, r, Ub, Vb = self._tall_raw(Z, base)
        pairs, s = _rank_coords(Zt, Ub, Vb, r)
        U, V = self._frames(*pairs)
        return U, s, V, tr

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        Zt, tr, r, Ub, Vb = self._tall_raw(Z, base)
        X = _rank_chart_node(Zt, Ub, Vb, r, self._value_map, self.triv)
        if X is None:
            X = _rank_chart(Zt, Ub, Vb, r, self._value_map, self.triv)
        return untall(X, tr)

    def _sketchable(self, Y: Tensor, r: int, k: int, q: int, member: bool = False) -> bool:
        """The gates of Note [Sketched frames of low-rank points] for a map of ``Y`` (n×k tall, rank r); ``member``:
        for contains/check, whose booleans nothing differentiates (a parameter that requires grad too)."""
        return (_sketch_size(k, r, q) and not self._det_positive and isinstance(self._value_map, (Identity, Positive, Abs))
                and _sketch_ok(Y) and (member or derivative_mode(Y) == "none"))

    def _sketch_member(self, X: Tensor, atol: Any) -> tuple[Optional[Tensor], Any]:
        n, k = max(X.shape[-2:]), min(X.shape[-2:])
        r = self._rank(n, k)
        if not self._sketchable(X, r, k, r + _SKETCH_OVERSAMPLE, member=True):
            return None, None
        tol = self._atol(X, atol)
        with autocast_off(X.device.type):
            return _sketch_member_svd(tall(X)[0], r, r + _SKETCH_OVERSAMPLE, self._value_map, tol)

    def _from_manifold(self, X: Tensor, *, sketch: Any = None) -> tuple[Tensor, Any]:
        """``sketch``: the one :meth:`check` measured ``X`` by (Note [One sketch for from_manifold])."""
        Xt, tr = tall(X)
        n, k = Xt.shape[-2:]
        r = self._rank(n, k)
        if self._sketchable(Xt, r, k, r + _SKETCH_OVERSAMPLE):
            sk = _sketch_svd(Xt, r, r + _SKETCH_OVERSAMPLE) if sketch is None else _sketch_svd_of(sketch, r)
            if sk is not None:  # Note [Sketched membership of low-rank points] (certified: Xt is finite)
                Z = _pack(self._value_map.inverse(self, sk[1][..., :r]), (n, k))
                return untall(Z, tr), (sk[0][..., :r], sk[2][..., :r, :].mT)
        U, s, Vh = torch.linalg.svd(sanitize(Xt), full_matrices=False)
        U, s, V = U[..., :r], s[..., :r], Vh[..., :r, :].mT
        if self._det_positive:
            V = flip_last_column(V, _det_sign(U) * _det_sign(V))
        nan = poison(Xt)  # NaN points stay NaN (under transforms, where no check runs)
        Z = _pack(self._value_map.inverse(self, s) + nan[..., 0], (n, k))
        return untall(Z, tr), (U + nan, V + nan)

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """Keep the value coordinates, move the U/V coordinates into the bases (no SVD)."""
        U, s, V, tr = self._factors(Z, base)  # drifted frames refined (Note [Rebased frames refined], _orthogonal.py)
        return untall(_pack(s, (U.shape[-2], V.shape[-2])), tr), (refine_drifted(U), refine_drifted(V))

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """The fixed-rank tangent space ``P_U G + G P_V − P_U G P_V`` (r < min(n, k)); ``G`` at full
        rank (an open set), Stiefel's ``G − X sym(XᵀG)`` where the values are pinned."""
        self._check_pair(X, G, "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        n, k = Xt.shape[-2:]
        r = self._rank(n, k)
        if r == k and self._value_map.pinned():
            return untall(Gt - Xt @ sym_part(Xt.mT @ Gt), tr)
        if r == k:
            return G + 0.0 * X
        mode = derivative_mode(X, G)
        if mode == "none":  # the thin frames (their SVD O(nk·min(n, k)), the products O(nkr))
            q = r + _SKETCH_OVERSAMPLE
            sk = _sketch_svd(Xt, r, q) if _sketch_size(k, r, q) and _sketch_ok(Xt) and _sketch_ok(Gt) else None
            if sk is not None:  # Note [Sketched frames of low-rank points]: O(nkr)
                Ur, Vr = sk[0][..., :r], sk[2][..., :r, :].mT
                UG = Ur.mT @ Gt
                return untall(Ur @ UG + (Gt @ Vr - Ur @ (UG @ Vr)) @ Vr.mT, tr)  # (certified: Xt is finite)
            return untall(_thin_tangent(Xt.detach(), Gt.detach(), r)[0], tr)
        if mode == "lazy":  # one node: the thin frames' adjoint written out; a graph-building backward
            # differentiates the exact map (Note [Lazy second-order terms]; Φ itself: 1.2–1.3× here)
            need = (X.requires_grad, G.requires_grad)
            # (Gt itself, not an alias: the node saves it once, as its input)
            return untall(closed_form_node(lambda: _thin_tangent(Xt.detach(), Gt, r, need),
                                           lambda A, B: _exact_tangent(A, B, r), Xt, Gt), tr)
        return untall(_exact_tangent(Xt, Gt, r), tr)

    def project(self, Y: Tensor) -> Tensor:
        return self._project(Y)

    def _project(self, Y: Tensor, size: float | None = None) -> Tensor:
        """``project``; ``size`` (default max(n, k)) sets the value map's lift (:class:`Positive`:
        ``min(√ε, 4ε√size)·σ₁``; ``math.inf``: ``√ε·σ₁``, for SL, whose membership needs more)."""
        self._check_shape(Y, "Y")
        Yt, tr = tall(Y)
        n, k = Yt.shape[-2:]
        keep = torch.arange(k, device=Y.device) < self._rank(n, k)
        vm = self._value_map
        size = n if size is None else size

        def g_fn(s: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
            return vm.project(s, keep.expand_as(s), _det_sign(U) * _det_sign(Vh) if self._det_positive else None, size)

        r = self._rank(n, k)
        if (_sketch_size(k, r, 2 * r + _SKETCH_OVERSAMPLE) and not self._det_positive
                and isinstance(vm, (Identity, Positive, Abs)) and _sketch_ok(Yt)
                and derivative_mode(Yt, first=True) == "none"):
            sk = _sketch_svd(Yt, r, 2 * r + _SKETCH_OVERSAMPLE)  # X + V, V tangent: rank ≤ 2r
            if sk is not None:  # Note [Sketched frames of low-rank points]
                U, s, Vh = sk
                g = vm.project(s, torch.arange(s.shape[-1], device=Y.device) < r, None, size)[0][..., :r]
                return untall((U[..., :r] * g.unsqueeze(-2)) @ Vh[..., :r, :], tr)  # (certified: Yt is finite)
        # AlmostOrthogonal's values clamp to [1 − λ, 1 + λ]: at a small Y every value is 1 − λ and the map is
        # (1 − λ)·polar(Y), scale invariant, so its ties are relative to σ₁ as the polar factor's (Note
        # [Polar ties relative to σ₁] in geofunc/_linalg.py; the float32 gradient at entries ~1e-4 was 6× off)
        tie = _linalg.relative_tie_tol if isinstance(vm, Unit) else None
        return untall(spectral_svd(Yt, g_fn, tie), tr)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """``U diag(σ) Vᵀ``: Haar frames, ``σ`` the value map's sample of separated values."""
        shape = self._sample_shape(shape, dtype)
        tr = shape[-2] < shape[-1]
        n, k = max(shape[-2:]), min(shape[-2:])
        r = self._rank(n, k)
        batch = shape[:-2]
        U = haar_stiefel(batch + (n, r), generator, dtype, device)
        V = haar_stiefel(batch + (k, r), generator, dtype, device)
        t = separated_values(batch, r, generator, dtype, U.device)
        if self._det_positive:
            V = flip_last_column(V, _det_sign(U) * _det_sign(V))
        return untall((U * self._value_map.sample(t).unsqueeze(-2)) @ V.mT, tr)

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``Σ log|f(sᵢ)|`` of the value coordinates (n = k = rank only): O(n) after the raw map."""
        self._check_shape(Z, "Z")
        n, k = Z.shape[-2:]
        if not n == k == self._rank(n, k):
            raise error(self, "square raw tensors of full rank (n = k = rank) for logabsdet", f"shape {tuple(Z.shape)}")
        Ub, Vb = self._bases(base, Z, n)
        # NaN/inf anywhere in Z or a base makes the point NaN: say so (Note [NaN policy]).
        # summed with a trailing dim kept: vmap over an empty batch fails on a 0-dim per-sample scalar op
        lad = self._value_map.log_abs(torch.diagonal(Z, dim1=-2, dim2=-1))[..., None]
        return (lad + poison(Z, Ub, Vb)[..., 0, :1])[..., 0]

    # ------------------------------------------------------------ membership
    # Note [No f-string of a size or rank in a map]
    # A map's success path formats no string from a size or a rank: under torch.compile with
    # dynamic shapes, or once automatic dynamic has made a space's `rank` symbolic (one compiled
    # function called with LowRank(rank=1), then LowRank(rank=2)), they are symbolic ints, which
    # Dynamo cannot format (a graph break: fullgraph=True refused every map that did). Error
    # messages are formatted where they are raised; the names of violations are constant (the
    # space's repr, in every message of `check`, names the rank).
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        Xs, nan = sanitize(X), poison(X)[..., 0, 0]
        s = torch.linalg.svdvals(Xs)
        n, k = max(X.shape[-2:]), min(X.shape[-2:])
        r = self._rank(n, k)
        out = {"non-finite entries (NaN if any)": nan}
        if r < k:
            out["σ_(rank+1)/max(1, σ_1)"] = s[..., r] / s[..., 0].clamp(min=1.0) + nan
        out.update({name: v + nan for name, v in self._value_map.violations(s[..., :r], s[..., 0], n, k).items()})
        if self._det_positive:
            sign = torch.linalg.slogdet(Xs)[0]
            out["det(X) ≤ 0 (inf if so)"] = torch.where(sign > 0, torch.zeros_like(sign), torch.full_like(sign, math.inf)) + nan
        return out


class EigSpace(_Factorized):
    """Abstract: ``X = Q diag(f(λ)) Qᵀ`` with ``Q ∈ St(n, r)`` (square points).

    A concrete space implements ``_rank(n)`` and ``_value_map``.
    """

    @abc.abstractmethod
    def _rank(self, n: int) -> int:
        """The rank of points of shape n×n."""

    def _point_rank(self, Z: Tensor) -> int:
        return self._rank(Z.shape[-1])

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        n, _ = self._require_matrix(X, what, square=True)
        r = self._rank(n)
        if r > n:
            raise error(self, f"`{what}` with n ≥ rank = {r}", f"shape {tuple(X.shape)}")

    def _base(self, base: Any, Z: Tensor, r: int) -> Optional[Tensor]:
        """The frame ``Q_b`` of ``base`` for the raw tensor ``Z`` (n×n), checked: shape ``(…, n, r)``, ``Z``'s dtype."""
        if base is None:
            return None
        n = Z.shape[-1]
        if isinstance(base, torch.Tensor):  # (before its shape: Note [Dense tensors only] in _base.py)
            self._require_dense(base, "base")
        if not isinstance(base, torch.Tensor) or base.ndim < 2 or tuple(base.shape[-2:]) != (n, r):
            raise error(self, f"`base` to be None or a frame Q of shape (..., {n}, {r}) (as from_manifold returns)", describe(base))
        self._require_frame(Z, base, "base")
        return base

    def _factors(self, Z: Tensor, base: Any) -> tuple[Tensor, Tensor]:
        self._check_shape(Z, "Z")
        n = Z.shape[-1]
        r = self._rank(n)
        (Q,) = self._frames((torch.tril(Z[..., :, :r], -1), self._base(base, Z, r)))
        # complex Z: the real part (Hermitian X), taken before the diagonal (Note [The imaginary diagonal under
        # torch.compile(grad)] in geofunc/_linalg.py: the diagonal of a complex tensor had a wrong compiled gradient)
        return Q, torch.diagonal(Z.real if Z.is_complex() else Z, dim1=-2, dim2=-1)[..., :r]

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        Q, lam = self._factors(Z, base)
        return sym_part((Q * (self._value_map(lam) + (lam - lam)).unsqueeze(-2)) @ transpose(Q))  # NaN for ±inf raw values

    def _sketchable(self, X: Tensor, r: int, n: int, q: int, member: bool = False) -> bool:
        """The gates of Note [Sketched frames of low-rank points] for a map of ``X`` (n×n, rank r); ``member`` as
        :meth:`SVDSpace._sketchable`."""
        return (_sketch_size(n, r, q) and isinstance(self._value_map, (Identity, Positive, Abs)) and _sketch_ok(X)
                and not X.is_complex() and (member or derivative_mode(X) == "none"))

    def _sketch_member(self, X: Tensor, atol: Any) -> tuple[Optional[Tensor], Any]:
        n = X.shape[-1]
        r = self._rank(n)
        if not self._sketchable(X, r, n, r + _SKETCH_OVERSAMPLE, member=True):
            return None, None
        tol = self._atol(X, atol)
        with autocast_off(X.device.type):
            return _sketch_member_eigh(X, r, r + _SKETCH_OVERSAMPLE, self._value_map, tol)

    def _from_manifold(self, X: Tensor, *, sketch: Any = None) -> tuple[Tensor, Any]:
        """``sketch``: the one :meth:`check` measured ``X`` by (Note [One sketch for from_manifold])."""
        n = X.shape[-1]
        r = self._rank(n)
        if self._sketchable(X, r, n, r + _SKETCH_OVERSAMPLE):
            sk = _sketch_eigh(_sym_detached(X), r, r + _SKETCH_OVERSAMPLE) if sketch is None else _sketch_eigh_of(sketch, r)
            if sk is not None:  # Note [Sketched membership of low-rank points] (certified: X is finite)
                lam, Q = sk[0][..., -r:].flip(-1), sk[1][..., -r:].flip(-1)  # top r, descending
                return _pack(self._value_map.inverse(self, lam), (n, n)).to(X.dtype), Q
        lam, Q = torch.linalg.eigh(sanitize(sym_part(X)))
        lam, Q = lam[..., -r:].flip(-1), Q[..., -r:].flip(-1)  # top r, descending
        nan = poison(X)
        return _pack(self._value_map.inverse(self, lam) + nan[..., 0], (n, n)).to(X.dtype), Q + nan

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """Keep the eigenvalue coordinates, move the Q coordinates into the base (no eigh)."""
        Q, lam = self._factors(Z, base)  # a drifted frame refined (Note [Rebased frames refined], _orthogonal.py)
        return _pack(lam, (Z.shape[-1], Z.shape[-1])).to(Z.dtype), refine_drifted(Q)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``P S + S P − P S P``, ``S = sym(G)``, ``P = QQᵀ`` (the rank-r stratum; ``sym(G)`` at r = n)."""
        self._check_pair(X, G, "G")
        n = X.shape[-1]
        r = self._rank(n)
        if r == n:
            return sym_part(G) + 0.0 * X
        if derivative_mode(X) == "none":  # X is not differentiated: the thin frame
            if _sketch_size(n, r, r + _SKETCH_OVERSAMPLE) and _sketch_ok(X) and _sketch_ok(G) and not X.is_complex():
                sk = _sketch_eigh(_sym_detached(X), r, r + _SKETCH_OVERSAMPLE)
                if sk is not None:  # Note [Sketched frames of low-rank points]: O(n²r)
                    return _frame_eig_tangent(sk[1][..., -r:], G)  # (certified: X is finite)
            return _thin_eig_tangent(X, sym_part(G), r)
        return _exact_eig_tangent(X, sym_part(G), r)  # P: one node in plain autograd (spectral_eigh), exact to second order

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        n = Y.shape[-1]
        keep = torch.arange(n, device=Y.device) >= n - self._rank(n)  # ascending: the top r
        vm = self._value_map
        r = self._rank(n)
        if (_sketch_size(n, r, 2 * r + _SKETCH_OVERSAMPLE) and isinstance(vm, (Identity, Positive, Abs))
                and _sketch_ok(Y) and not Y.is_complex()
                and derivative_mode(Y, first=True) == "none"):
            sk = _sketch_eigh(_sym_detached(Y), r, 2 * r + _SKETCH_OVERSAMPLE)
            if sk is not None:  # Note [Sketched frames of low-rank points]
                lam, Q = sk
                q = lam.shape[-1]
                g = vm.project(lam, torch.arange(q, device=Y.device) >= q - r, None, n)[0][..., q - r:]
                Qr = Q[..., q - r:]
                # sym(Qr diag(g) Qrᵀ) bit for bit (Note [Symmetric parts without strided elementwise ops])
                return _plus_transposed((Qr * (0.5 * g).unsqueeze(-2)) @ Qr.mT)  # (certified: Y is finite)
        return spectral_eigh(Y, lambda lam, Q: vm.project(lam, keep.expand_as(lam), None, n))

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """``Q diag(σ) Qᵀ``: a Haar n×r frame, ``σ`` the value map's sample of separated values."""
        shape = self._sample_shape(shape, dtype)
        n = shape[-1]
        r = self._rank(n)
        Q = haar_stiefel(shape[:-2] + (n, r), generator, dtype, device)
        t = separated_values(shape[:-2], r, generator, Q.real.dtype, Q.device)
        return sym_part((Q * self._value_map.sample(t).unsqueeze(-2)) @ transpose(Q))

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``Σ log|f(λᵢ)|`` of the eigenvalue coordinates (rank = n only): O(n) after the raw map."""
        self._check_shape(Z, "Z")
        n = Z.shape[-1]
        r = self._rank(n)
        if r != n:
            raise error(self, "a full-rank space (rank = n) for logabsdet", f"rank {r} for shape {tuple(Z.shape)}")
        Qb = self._base(base, Z, r)
        return self._value_map.log_abs(torch.diagonal(Z.real, dim1=-2, dim2=-1)) + poison(Z, Qb)[..., 0, 0]  # (.real first: as in _factors)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        """Symmetric, no eigenvalue below 0, the n − r smallest vanish (relative to ‖X‖₂), and the
        value map's own on the top r."""
        Xs, nan = sanitize(X), poison(X)[..., 0, 0]
        lam = torch.linalg.eigvalsh(sym_part(Xs))
        n = X.shape[-1]
        r = self._rank(n)
        scale = lam.abs().amax(-1).clamp(min=1.0)
        out = {
            ("max|X − Xᴴ|/max(1, ‖X‖₂)" if X.is_complex() else "max|X − Xᵀ|/max(1, ‖X‖₂)"): (Xs - transpose(Xs)).abs().amax(dim=(-2, -1)) / scale,
            "max(0, −λ_min)/max(1, ‖X‖₂)": (-lam[..., 0]).clamp(min=0.0) / scale,
        }
        if r < n:
            out["max|λ_(n−rank)|/max(1, ‖X‖₂)"] = lam[..., : n - r].abs().amax(-1) / scale
        out.update(self._value_map.violations(lam[..., n - r :], lam.abs().amax(-1), n, n))
        return {name: v + nan for name, v in out.items()}


# The _from_manifold that take the check's sketch (Note [One sketch for from_manifold]): a subclass that
# overrides _from_manifold (the documented hook, called with X alone) gets the base from_manifold.
_SKETCH_READERS = (SVDSpace._from_manifold, EigSpace._from_manifold)
