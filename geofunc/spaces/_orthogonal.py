"""Shared pieces of the orthogonal family (SO, Unitary, Stiefel, Grassmannian): checks, the
abstract matrix group that SO and Unitary specialise (they differ in the projection, sampling and
membership), and the abstract frame space that Stiefel and Grassmannian specialise (they differ
only in the chart and tangent)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

import dataclasses
import functools

from .._errors import error
from .._fastpath import add_second_order, derivative_mode, eager_fast, values_readable
from .._linalg import (Triv, chol_qr, haar_stiefel, orthonormality_error, poison, polar, refine_drifted, refine_frame, resolve_triv,
                       sanitize, skew_lower, skew_part, sym_part, tall, transpose, untall, wide_dtype)
from ._base import AbstractSpace
from ._logs import theta_over_sin_cs

Tensor = torch.Tensor


def validate_triv(space: Any, triv: Any) -> None:
    """``triv`` must be ``"expm"``, ``"cayley"`` or a callable (checked lazily, as GeoTorch does)."""
    if callable(triv):
        return
    if not isinstance(triv, str) or triv not in ("expm", "cayley"):
        raise error(space, '`triv` to be "expm", "cayley" or a callable mapping skew to orthogonal matrices', repr(triv))


def empty_frame(Zt: Tensor, Bt: Tensor | None) -> Tensor | None:
    """The chart of a frame space at a tall ``Zt`` (n×k) with k = 0: St(n, 0) is the single empty frame,
    returned with the broadcast shape of ``Zt`` and the base (still a function of ``Zt``, so a
    gradient is an empty tensor, not None); None if k > 0."""
    if Zt.shape[-1] != 0:
        return None
    return 0.0 * (Zt if Bt is None else Zt + Bt)


# Note [Group logarithms on the cut locus]: SO's logmap reads the planes with sin θ below _SO_NEAR (and cos θ < 0) from pairs
_SO_NEAR = 0.1
_SO_CLOSE = 1e-3  # ... pairs whose eigenvalue of −T²/tr is this close to a neighbour's: re-read on invariant planes of K


# Note [Constants cached outside transforms]
# The pairs' index tensors are cached per (n, dtype, device). Made first inside torch.func.grad(grad(...)) (a
# Hessian of an SO logmap), the factory calls returned that transform's wrappers, which the cache kept: the
# next SO logmap of that size under nested grad raised torch's "level <= current_level INTERNAL ASSERT ...
# escaped?". So they are cached only where they are plain tensors (eager_fast: no torch.func level, no
# compile, fake mode or make_fx trace) and made afresh elsewhere.
def _pair_constants(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """For n eigenvectors in pairs (0, 1), (2, 3), …: each one's partner (an odd last one itself), the first
    of its pair, ±1 (+1 for the first), the positions in ``[inf, λ₁ − λ₀, …, λₙ₋₁ − λₙ₋₂, inf]`` of the
    gaps before and after its pair, and the identity (Note [Constants cached outside transforms])."""
    if eager_fast():
        return _pair_constants_cached(n, dtype, device)
    return _make_pair_constants(n, dtype, device)


@functools.lru_cache(maxsize=64)
def _pair_constants_cached(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    return _make_pair_constants(n, dtype, device)


def _make_pair_constants(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    j = torch.arange(n, device=device)
    partner = torch.where(j < n - n % 2, j ^ 1, j)
    first = j - j % 2
    sign = (1 - 2 * (j % 2)).to(dtype)
    return partner, first, sign, first, torch.clamp(first + 2, max=n), torch.eye(n, dtype=dtype, device=device)


def _so_tie_tol(lam: Tensor) -> Tensor:
    """S's tie tolerance in SO's logmap: 16ε (S is an orthogonal matrix's symmetric part, |λ| ≤ 1); near ties
    are φ's own scale's (Note [Several planes in the cut cluster])."""
    return torch.full_like(lam[..., :1], 16.0 * torch.finfo(lam.dtype).eps)


# Note [Where the cut cluster ends]
# The cut cluster was the eigenvectors of S with c < 0 and ‖K q‖ ≤ τ, and the other eigenvalues near −1 took K φ(S),
# whose derivative near the cut is a difference of two terms ~π/δ that carry S's and K's rounding at ~u/δ: logmap's
# jvp and vjp ~5u/δ² off relative (1.5e-5 just outside τ, 5e-8 at δ = 1e-4; Unitary and SO, float64), second
# derivatives ~u/δ³ (2.4e-2 at δ = 1e-5). And where two eigenvalues (planes) near −1 lay on both sides of τ,
# the cluster's frame turning against the rest and K φ(S)'s divided differences across the boundary, each
# ~1/Δc at a gap Δc of S's eigenvalues that has lost δ (Δc ≈ δΔδ), were differenced: the first derivative 6e-2
# to O(1) off at δ = 3e-6 and 9e-6 (Δc = 4e-11), up to 1e7 at δ within 1e-4 of each other (float64). So the
# cluster ends in a gap of S's spectrum: from the eigenvalues within τ it takes each next one (c < 0) closer than
# _CUT_JOIN = 1e-8 in c (δ up to ~1.4e-4 beside one within τ; not further: the cluster's turning is first order
# only, so second derivatives there would go from 3e-9 to O(1) off at δ = 1e-7 and 1e-2, and SO reads its planes
# from −T² scaled to its trace, which a far plane taken in would hold: jvp 2.5 off at planes 1e-8, 1e-7, 1e-3),
# and a point without any within τ that has one eigenvalue (Unitary) or one plane (SO) with c < 0 and ‖K q‖ ≤
# _CUT_LONE = 1e-3, followed by a gap of _CUT_GAP = 1e-4 in c, takes that one as its cluster (its form, θ(σ) with
# the frame turning, is exact at any δ: first and second derivatives to ~1e-13; a lone plane at 0.1 beside one 2e-7
# further in c, taken alone, was 8e4 off). Beyond 1e-3 K φ(S) is kept (≤ 6e-10 off, second derivatives ≤ 2e-7), so
# that Haar points keep their bits (SO(8) pairs have a plane within 0.1 of π at one point in 5, within 1e-2 at 1 in 30). The turning's θ[σⱼ, σₖ] on one side is −arcsin[σⱼ, σₖ] without cancellation
# (_asin_divided; the series −(1 + (σⱼ² + σⱼσₖ + σₖ²)/6) it was is exact only for σ ≲ 1e-4). Elsewhere the cluster
# is as before. Values are unchanged (they are _so_log_value's and _unitary_log_value's on the near block), and so
# is every point with no eigenvalue near −1, to the bit. What remains (float64, relative): a cluster that ends at a
# gap just above _CUT_JOIN (first derivatives ~6e-5 off at δ = 3e-6 and 1.5e-4); second derivatives where the
# cluster took a neighbour in (first order: O(1) off, where K φ(S)'s were 3%–45% off); and two or more eigenvalues
# near −1 none within τ, which K φ(S) reads (logmap's jvp 2e-3 off at δ = 1e-5 and 3e-5, 2e-6 at 1e-4 and 3e-4;
# sqdist's gradient 0.5, 2e-3, 4e-5 at 3e-4 and 1e-3; taking them in fixes the first derivatives but leaves the
# second first order: O(1e2–1e5) off where K φ(S)'s are 1e-2 to 2e-9 off).
_CUT_LONE, _CUT_GAP = 1e-3, 1e-4  # a lone eigenvalue (plane) within _CUT_LONE of −1 (sin θ), and the gap in c after it
_CUT_JOIN = 1e-8  # the gaps in c the cluster grows across


def _cut_cluster(lam: Tensor, s: Tensor, tol: float, per: int) -> Tensor:
    """The cut cluster's columns (a leading block of S's ascending eigenvalues ``lam``; ``s = ‖K q‖``): those with
    c < 0 and s ≤ ``tol`` and each next one closer than _CUT_JOIN in c, or else ``per`` lone columns (one eigenvalue or
    plane) with s ≤ _CUT_LONE followed by a gap of _CUT_GAP (Note [Where the cut cluster ends])."""
    neg = lam < 0
    wide = (s <= _CUT_LONE) & neg
    if values_readable(lam) and not bool(wide.any()):  # nothing within _CUT_LONE of −1: no cluster (as s ≤ τ: none)
        return wide
    inf = torch.full_like(lam[..., :1], torch.inf)
    gap = torch.cat((inf, lam[..., 1:] - lam[..., :-1], inf), dim=-1)  # gap[k] = λₖ − λₖ₋₁ (inf at either end)
    step = ((s <= tol) | (gap[..., :-1] < _CUT_JOIN)) & neg
    chain = torch.cumprod(step.to(lam.dtype), dim=-1) > 0.5  # (at column 0 only s ≤ tol starts it)
    k = wide.sum(dim=-1, keepdim=True)
    lone = wide & (k == per) & (torch.gather(gap, -1, k) >= _CUT_GAP)
    return chain | lone


# Note [Planes at one distance near the cut]
# Planes within _SO_CLOSE of one another in −T²'s scale share (nearly) an eigenspace of it, whose eigenvectors pair
# them arbitrarily: the pairs (a, b) need not span invariant planes of K. Below the guard (‖Kw‖ ≤ √ε per pair,
# δ ≲ 1.5e-8) the pair form θ (baᵀ − abᵀ) took them as they came: logmap's value 0.2–3 off in float64 at δ of
# 1e-12 to 1e-8 (two planes at ±(π − δ) beside a generic one, SO(6)–SO(8); round trips ~u, expmap being
# insensitive there) and its derivative 17% off. Above it θ/‖Kw‖ K wwᵀ is exact for any basis of one σ, but
# −T² scaled to trace 1 also puts planes at different small δ together where a larger one (δ up to ~0.1) holds
# the trace: eigenvectors mixed at ~u tr/σ², value 2e-6 and round trip 7e-7 off at δ = 1e-8 and 1e-7 beside one
# at 1e-2 (6.5e-4 and 2.9e-4 at 3e-9 and 3e-8 beside 5e-2). So a close group's pairs are re-read as invariant
# planes: the eigenvectors v of the Hermitian i T on the group (scaled by its largest entry) with positive
# eigenvalue are (a + ib)/√2 with T a = σ b, T b = −σ a (σ > 0), one per plane, told apart by σ to ~u
# absolutely (not σ²/tr) and accurate to ~u/δ (T's rounding) as the log is; mixing planes of nearly one σ costs
# ~u. a, b are made orthonormal by one Newton–Schulz step, and the pair form reads them: value ~u/δ, round trips
# ~u. Where they are not orthonormal to 1e-6 (σ at rounding: at −1 itself, where any pairs give a minimal log)
# the pairs are kept (and θ/‖Kw‖ K wwᵀ above the guard). The derivatives' frame (_cut_planes) re-reads the
# pairs below the guard alike (its close pairs take the whole block's derivative, right in any basis). One
# complex eigh where there is a close group (eager, grad, jvp; always under vmap or traced); values elsewhere are
# the same to the bit.
# Note [Planes at −1 beside resolved ones]
# Whether the pairs resolve is read pair by pair. Read for the whole point, one plane at −1 itself (σ ~u, whose
# ±σ eigenvectors of i T mix when the group's largest σ is ~1e10 times its own) kept every close pair of the point
# as −T² had paired them, and −T² mixes a plane at δ₂ with one at −1 by ~u tr/δ₂²: round trips 1.2e-7 off at
# planes π − (1e-3, 1e-3, 3e-8, 0) in SO(8), 1e-8 at (1e-2, 1e-2, 1e-6, 0), 4e-11 at (1e-2, 1e-5, 0) (float64; the
# log on the planes at δ > 0 as far off). The resolved pairs now take their invariant planes, and the unresolved
# ones U's own columns less their components along those (the −T² frame: the planes nearest −1, which the
# smallest σ pair with), made orthonormal by one Newton–Schulz step (any orthonormal pairs of planes at −1 give
# a minimal log); round trips ~u. Where those columns are not within 1e-8 of orthonormal once projected (−T²
# mixed a resolved plane at δ ≲ 1e-7·√tr with one at −1: planes π − (0.09, 0.09, 1e-9, 0), round trips 7e-10,
# as before) the point keeps its pairs as it did. A few k×k products more, on this path only.
def _so_invariant_pairs(U: Tensor, T: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
    """``(U', ok)``: ``U`` (detached, n×n) with the ``low`` columns (whole pairs of close groups, among the leading
    near ones) rotated onto invariant planes of K where they resolve (``ok``), ``T = (QU)ᵀ K (QU)`` (its entries off
    low×low unused; Note [Planes at one distance near the cut])."""
    n = U.shape[-1]
    k = n  # the columns read: where values are readable, up to the last low one (the near block leads)
    if values_readable(U) and bool(low.any()):
        k = int(low.nonzero()[:, -1].max()) + 1
    lk = low[..., :k]
    m = lk.to(U.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    Ts = skew_part(T[..., :k, :k] * mm)
    scale = Ts.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(U.dtype).tiny)
    cdt = torch.complex128 if U.dtype == torch.float64 else torch.complex64
    H = (1j * (Ts / scale)).to(cdt) + torch.diag_embed((2.0 * (1.0 - m)).to(cdt))
    _, Z = torch.linalg.eigh(sanitize(H))
    # the j-th low pair takes the j-th eigenvector of positive eigenvalue (after the M negative ones)
    M = (m.sum(dim=-1, keepdim=True) * 0.5).long()
    r = (torch.cumsum(lk.long(), dim=-1) - 1).clamp(min=0)
    src = (M + r // 2).clamp(max=k - 1)
    Zs = torch.gather(Z, -1, src.unsqueeze(-2).expand(Z.shape))
    C = torch.where((r % 2 == 0).unsqueeze(-2), Zs.real, Zs.imag) * (2.0 ** 0.5) * mm
    E = transpose(C) @ C - torch.diag_embed(m)
    # pair by pair: a plane at −1 does not hold the others back (Note [Planes at −1 beside resolved ones])
    res = E.abs().amax(dim=-2)
    if k % 2:  # (an odd last column: its own pair)
        res = torch.nn.functional.pad(res, (0, 1))
    res = res.unflatten(-1, (-1, 2)).amax(dim=-1, keepdim=True).expand(*res.shape[:-1], res.shape[-1] // 2, 2)
    ok = lk & (res.flatten(-2)[..., :k] <= 1e-6)
    C = C - 0.5 * (C @ E)  # one Newton–Schulz step: orthonormal to ~u
    # the unresolved pairs' columns: U's own less the resolved planes, made orthonormal by one step where they were
    # within 1e-8 of it (the point kept as it was elsewhere)
    g = ok.to(U.dtype)
    b = m - g
    Cg, Ib = C * g.unsqueeze(-2), torch.diag_embed(b)
    Cb = Ib - Cg @ (transpose(Cg) * b.unsqueeze(-2))
    Eb = transpose(Cb) @ Cb - Ib
    ok = ok & (Eb.abs().amax(dim=(-2, -1)) <= 1e-8).unsqueeze(-1)
    Uk = U[..., :k]
    # in U's layout (eigh's, column-major): the products with it round as before where nothing changed
    out = U.clone()
    out[..., :k] = torch.where((lk & ok.any(dim=-1, keepdim=True)).unsqueeze(-2), Uk @ (Cg + Cb - 0.5 * (Cb @ Eb)), Uk)
    return out, torch.nn.functional.pad(ok, (0, n - k))


def _so_log_value(Q: Tensor, KQ: Tensor, f: Tensor, near: Tensor) -> Tensor:
    """The value of SO's log as ``Σⱼ ℓⱼ wⱼᵀ`` (skew up to rounding; Note [Group logarithms on the cut
    locus]). Outside ``near`` (a leading block of S's eigenvectors Q, whole pairs) w = q and ℓ = φ K q
    (``f`` = φ). On it, w are the eigenvectors of −T² (T = QᵀKQ on the block, scaled to trace 1, the other
    coordinates moved to eigenvalue 2), in pairs (a, b): ℓ_a = θ_a b, ℓ_b = θ_b a, θ = atan2(σ, −√(1 − σ²)),
    σ_a = bᵀKa, σ_b = −σ_a; the pairs whose eigenvalue is within ``_SO_CLOSE`` of a neighbouring pair's are re-read
    as invariant planes of K first (Note [Planes at one distance near the cut]); where that fails (σ at rounding)
    and ‖Kw‖ > √ε they take ℓ = θ(‖Kw‖) K w/‖Kw‖ instead. Detached."""
    n = Q.shape[-1]
    partner, first, sign, before, after, eye = _pair_constants(n, Q.dtype, Q.device)
    m = near.to(Q.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    G = (transpose(KQ) @ KQ) * mm
    tr = G.diagonal(dim1=-2, dim2=-1).sum(dim=-1).clamp(min=torch.finfo(Q.dtype).tiny)[..., None, None]
    lam, V = torch.linalg.eigh(sanitize(G / tr + torch.diag_embed(2.0 - 2.0 * m)))
    U = torch.where(near.unsqueeze(-2), V, eye)  # near: the first columns, as the block's eigenvalues (≤ 1)
    W, KW = Q @ U, KQ @ U
    sw = (KW * KW).sum(dim=-2).sqrt()
    gaps = torch.nn.functional.pad(lam[..., 1:] - lam[..., :-1], (1, 1), value=torch.inf)
    close = (torch.minimum(gaps[..., before], gaps[..., after]) <= _SO_CLOSE) & near
    big = sw + sw[..., partner] > 2.0 * torch.finfo(Q.dtype).eps ** 0.5
    if not values_readable(Q) or bool(close.any()):  # Note [Planes at one distance near the cut]
        U, ok = _so_invariant_pairs(U, transpose(W) @ KW, close)
        W, KW = Q @ U, KQ @ U
        sw = (KW * KW).sum(dim=-2).sqrt()
        close = close & ~ok
    close = close & big
    Wp = W[..., partner]
    sig = torch.cat(((Wp * KW).sum(dim=-2)[..., first] * sign, sw), dim=-1)  # σ_a = bᵀKa, σ_b = −σ_a; then ‖Kw‖
    th = torch.atan2(sig, -torch.sqrt((1.0 - sig * sig).clamp(min=0.0)))
    coef = torch.where(near, torch.where(close, th[..., n:] / sw, 0.0), f)
    ell = KW * coef.unsqueeze(-2) + Wp * torch.where(close, 0.0, th[..., :n] * m).unsqueeze(-2)
    return ell @ transpose(W)

# Note [Unitary eigenvalues near the cut]
# Outside the cut cluster (δ = π − θ from τ to ~0.1) Unitary's log was K φ(S) in S's frame, and S sees cos θ,
# which has lost δ: two eigenvalues of XᴴY near −1 on one side (e^{i(π−δ₁)}, e^{i(π−δ₂)}) share an eigenspace of
# S to ~u/δ², and K φ(S) (φ ~ π/δ) mixed them: logmap and expmap(logmap) 3.6e-6 off at δ = 1e-5 and 3e-5,
# 2.6e-6 at 1e-8 and 1e-5, 1.5e-7 at 3e-5 and 1e-4 (complex128; the entries fix the log to ~u/δ). So, as SO's
# _so_log_value, the value is read otherwise where S has eigenvalues with c < 0 and sin θ ≤ 0.1 (the near
# block, leading in S's ascending order): the eigenpairs (σ, w) of the Hermitian −iK on the block (which tell
# eigenvalues apart by σ = sin θ, to ~u absolutely) give i Σ θ(σ) w wᴴ, θ = atan2(σ, −√(1 − σ²)), and the
# other eigenvectors keep φ K q qᴴ (φ = atan2(s, c)/s, off by ≤ πu/0.1). Mixing across the block's edge
# costs |Δθ| u/|Δc| ~ u/0.1. Value only: L + (value − L.detach()), the derivatives those of K φ(S) + the
# cluster's form as before. One eigh of the block (eager: k×k, k the block's size) where some eigenvalue is
# near −1; elsewhere (eager) skipped, the same numbers to the bit. Where nothing differentiates (eager) this value
# is the log, and the cluster's n×n eigh (run at every point before, for a C of exact zeros where no eigenvalue
# is near −1) is skipped: no-grad logmap 0.83–0.85× at U(8) and U(64) generic points, 1.04× at U(8) (0.83× at
# U(64)) with two eigenvalues near −1 (CPU, 1 thread).
def _unitary_log_value(Q: Tensor, KQ: Tensor, s: Tensor, lam: Tensor, near: Tensor) -> Tensor:
    """The value of Unitary's log (detached): ``i W diag(θ(σ)) Wᴴ`` on the ``near`` block of ``S``'s
    eigenvectors ``Q`` (σ, W from an eigh of −iK there) plus ``Σ φⱼ K qⱼ qⱼᴴ`` off it (Note [Unitary
    eigenvalues near the cut]); ``KQ = K Q``, ``s = ‖K qⱼ‖``, ``lam`` S's eigenvalues."""
    n = Q.shape[-1]
    k = n  # where values are readable, only the leading block's columns
    if values_readable(lam):
        k = max(int(near.sum(dim=-1).max()), 1)
    H = -1j * (transpose(Q[..., :k]) @ KQ[..., :k])  # −iK on the block (eigh reads its lower triangle)
    whole = k < n and values_readable(lam) and bool(near[..., :k].all())  # every point's block k columns
    if not whole:  # the other columns at eigenvalue 2, their θ 0 and φ kept
        m = near[..., :k].to(lam.dtype)
        H = H * (m.unsqueeze(-1) * m.unsqueeze(-2)).to(Q.dtype) + torch.diag_embed((2.0 * (1.0 - m)).to(Q.dtype))
    sig, V = torch.linalg.eigh(sanitize(H))
    th = torch.atan2(sig, -torch.sqrt((1.0 - sig * sig).clamp(min=0.0)))
    Wn = Q[..., :k] @ V
    f = torch.atan2(s, lam) / s.clamp(min=torch.finfo(s.dtype).tiny)  # φ (any value where s = 0: K q = 0 there)
    if whole:
        Z1 = torch.cat((KQ[..., k:] * f[..., k:].unsqueeze(-2), Wn * (1j * th).unsqueeze(-2)), dim=-1)
        return skew_part(Z1 @ transpose(torch.cat((Q[..., k:], Wn), dim=-1)))
    th = torch.where(sig < 1.0, th, 0.0)
    f = torch.where(near, 0.0, f)
    return skew_part((KQ * f.unsqueeze(-2)) @ transpose(Q) + (Wn * (1j * th).unsqueeze(-2)) @ transpose(Wn))

@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixGroup(AbstractSpace):
    """Abstract: a group of square matrices with the chart ``base · φ(A)`` on skew(-Hermitian)
    generators ``A`` read from the strict lower triangle of ``Z`` (and the imaginary diagonal if
    complex), base = the point itself. Shared: the chart, ``from_manifold(X) = (0, X)``,
    ``tangent(X, G) = X skew(XᴴG)``, ``retract(X, V) = X φ(skew(XᴴV))``. Subclasses (SO, Unitary)
    implement ``project``, ``sample``, ``_violations``, ``logabsdet`` and the dtype check.
    """

    _base_kind: ClassVar[str | None] = "frames"  # what its base is (AbstractSpace._refine_base)
    _one_node_maps: ClassVar[tuple[str, ...]] = ("project",)  # the polar factor (Note [Lazy second-order terms])

    triv: Triv = "expm"

    def __post_init__(self) -> None:
        validate_triv(self, self.triv)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_base(Z, base)
        R = resolve_triv(self.triv)(skew_lower(Z))
        return R if base is None else base @ R

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return torch.zeros_like(X), X

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """``(0, to_manifold(Z, base))``, the point refined onto the group where it drifted (Note [Rebased frames refined])."""
        return self._from_manifold(refine_drifted(self.to_manifold(Z, base)))

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        return X @ skew_part(transpose(X) @ G)

    # Note [Long steps on the group]
    # expm of a skew generator A by scaling and squaring is orthonormal only to ~ε‖A‖ (each squaring
    # doubles the error of the scaled exponential): float32 3.8e-4 at ‖A‖ = 1e4, 5e-3 at 1e5, off the
    # space; a long step is an optimizer's ordinary output (rsgd with lr 1 on a gradient of 1e3, radam
    # with a large lr: its step length is lr per point). Refining X alone (before) multiplied
    # that error in, so the product X φ(A) itself is refined, by the same Newton–Schulz step: it takes X's
    # rounding and φ's error together to their squares (~(ε‖A‖)² + ε), with the same three n×n
    # products. At a point of the group the refinement's derivative is the tangent projection at R = XE,
    # and R skew(Rᴴ dX E) = X skew(XᴴdX) E: first derivatives are those of refining X alone. The Cayley
    # map is orthogonal to rounding; there the change only refines X's rounding after the product.
    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_pair(X, V, "V")
        phi = resolve_triv("expm" if callable(self.triv) else self.triv)
        # the product refined (Note [Retractions that multiply], Note [Long steps on the group])
        return refine_frame(X @ phi(skew_part(transpose(X) @ V)))

    # Note [The group's geodesics]
    # With the embedded metric Re tr(UᴴV), a tangent vector at X is XΩ (Ω skew(-Hermitian)) of length
    # ‖Ω‖_F, the metric is bi-invariant and the geodesics are the one-parameter subgroups X exp(tΩ):
    # Exp_X(V) = X expm(skew(XᴴV)) (the retraction of the "expm" trivialization, whatever `triv` is),
    # and dist(X, Y) = ‖log(XᴴY)‖_F = √(Σ_j arg(λ_j)²) over the eigenvalues λ_j of the unitary XᴴY
    # (a normal matrix: its eigenvalues are as accurate as its entries). Log_X(Y) = X log(XᴴY), the
    # principal logarithm as K φ(S) of the Hermitian and skew parts of XᴴY (Note [Logarithms as
    # spectral maps] in geofunc/spaces/_logs.py): no eigenvectors, whose derivatives are undefined where
    # eigenvalues repeat; unique for rotation angles < π (an eigenvalue −1 of XᴴY is the cut locus:
    # Note [Group logarithms on the cut locus]).
    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``X expm(skew(XᴴV))``: the one-parameter subgroup through ``X`` along ``V`` (Note [The group's
        geodesics])."""
        self._check_pair(X, V, "V")
        return refine_frame(X @ resolve_triv("expm")(skew_part(transpose(X) @ V)))  # Note [Long steps on the group]

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``‖log(XᴴY)‖_F = √(Σ_j arg(λ_j)²)``, ``λ_j`` the eigenvalues of ``XᴴY``; batch-shaped (for
        SO(3), √2 times the angle of the rotation ``XᵀY``)."""
        self._check_pair(X, Y, "Y")
        # Note [Distances from differences]
        # The eigenvalues are read as 1 + μ, μ those of E = Xᴴ(Y − X) = XᴴY − I: at Y = X, E is exactly 0, so
        # every angle is exactly 0 and the gradient (a norm's, at 0) is 0. From XᴴY itself the angles were
        # rounding noise (~ε) and dist's gradient at Y = X the unit vector along that noise (norm 0.8–1.6
        # for U(3), complex128, different under vmap). Small distances are relative-accurate besides; the
        # same reading in Grassmannian.dist and PSD(metric="affine").dist.
        P = transpose(X) @ (Y - X)  # LAPACK's eig reports NaN input (MKL prints an error): sanitize, poison (Note [NaN policy])
        mu = torch.linalg.eigvals(sanitize(P))
        return torch.linalg.vector_norm(torch.atan2(mu.imag, 1.0 + mu.real), dim=-1) + poison(P)[..., 0, 0]

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """``X log(XᴴY)``, the principal logarithm: the inverse of :meth:`expmap` for rotation angles
        below π (Note [The group's geodesics]); exact first and second derivatives, also at ``Y = X``.
        At an angle of exactly π, one of the minimal logarithms (Note [Group logarithms on the cut locus])."""
        from ._factorized import spectral_eigh  # (_factorized imports this module)

        self._check_pair(X, Y, "Y")
        # Note [Group logarithms of rounded points]
        # φ(c) = θ/sin θ reads sin θ from 1 − c², so a point off its group by η (its rounding) moves
        # φ by ~η/(π − θ)² near the cut locus: float32/complex64 points (η ≈ 1e-7) gave logmaps 0.1–1.1
        # off at angles within ~0.01 of π (69 of 4,000 Haar pairs of U(4) past 1e-3, some NaN where
        # 1 + c rounded below 0), and complex128 copies of them 0.03 off, where the log is well
        # defined. XᴴY is refined onto the group by one Newton–Schulz step first (S's eigenvalues are
        # then cos θ to the working precision), in float64 for lower precisions, the result rounded
        # back. Along the group the refinement is the identity, to every order of derivative.
        # Note [Group logarithms near the cut locus]
        # S's eigenvalues c = cos θ carry π − θ = δ only through 1 + c ≈ δ²/2, so even refined, φ(S) was
        # ~u/δ² off (u the working unit roundoff): float64 logmaps 1e-3 off at δ = 1e-6, 0.2 at 1e-7, NaN
        # or 2.2 (a log longer than π) at 1e-8, where R's entries fix the log to ~u/δ. The values of
        # φ on S's eigenvectors qⱼ read sin θⱼ = ‖K qⱼ‖ instead (K shares them: K qⱼ = sin θⱼ × a unit
        # vector of the same eigenspace), accurate to ~u absolutely, and θⱼ = atan2(‖K qⱼ‖, cⱼ)
        # (theta_over_sin_cs). On the group these are φ(cⱼ), so the derivatives (Daleckii–Krein in c)
        # are those of the value as long as R stays on the group to third order: a second Newton–Schulz
        # step leaves R off it by O(t⁴) for inputs moved off it by t (one step: O(t²), and second
        # derivatives in directions off the group were O(1) off at a generic pair). At R = −I exactly
        # the log is not unique (Note [Group logarithms on the cut locus]). Cost: three n×n
        # products more (1.0–1.2× at 64×64, within noise at 8×8).
        # Note [Group logarithms on the cut locus]
        # Where XᴴY has an eigenvalue −1 (a rotation angle π) a log is ±iπ (Unitary) or π times a complex
        # structure (SO) on that eigenspace, plus the principal log elsewhere; sin θ = ‖K q‖ is rounding
        # noise there and K φ(S) was π times the unit vector along that noise: a finite log whose expmap was
        # 0.1–1.5 from Y (U(3), SO(3)–SO(5), float64), silently. So the eigenvectors q of S with c < 0 and
        # ‖K q‖ ≤ τ (the cut cluster) take φ = 0 and, instead, θ = atan2(σ, −√(1 − σ²)) with the signed
        # sine σ read from K on them:
        # * Unitary (τ = u^⅓, u the working unit roundoff: 6e-6 in float64): σ, w the eigenpairs of the
        #   Hermitian −iK restricted to the cluster, the log i θ w wᴴ. Within δ = π − θ of the cut two
        #   eigenvalues at different δ (a conjugate pair ±(π − δ) too) share an eigenspace of S to ~u/δ²
        #   (S sees cos θ, which has lost δ) and K φ(S) mixed them: round trips 1.1 off at δ = 1e-8 and
        #   3e-8, 2e-4 at 1e-6 and 3e-6; −iK tells them apart by the sign and size of σ. One eigh of the
        #   cluster more. Just outside it (sin θ ≤ 0.1) the value is read by −iK as well (Note [Unitary
        #   eigenvalues near the cut]).
        # * SO (τ = u^⅓ too; it was √u, and one plane at δ between the two kept K φ(S), whose derivative
        #   reads φ's divided differences from c, which has lost δ: jvp 20% off at δ = 3e-8, 1e-3 at 3e-7,
        #   in float64): σ = bᵀKa on consecutive pairs (a, b) of the cluster's eigenvectors (ascending
        #   eigenvalues put them first, two per plane), the log θ (baᵀ − abᵀ); an unpaired one keeps φ.
        #   That is the form whose derivatives are taken. Its value was still off: two planes at different δ
        #   below 1e-4 share an eigenspace of S to ~u/δ², and K φ(S) (φ ~ π/δ) or the cut pairs mixed them
        #   (round trips 1e-8 to 1e-3 off in float64; 1.5 in float32, whose rounding leaves each such plane
        #   ~1e-7 from π; 0.5 at −X·E in SO(64)); even one plane at δ beside a generic one lost ~πu/δ
        #   (1.4e-8 at δ = 2e-8). So the value is read otherwise (_so_log_value; with derivatives, as value
        #   + (form − its detached copy), so these are the form's as before): the leading pairs of S's
        #   eigenvectors with c < 0 and sin θ ≤ 0.1 (the near block; the rest keep K φ(S), off by ≤ πu/0.1)
        #   are re-resolved by the eigenvectors of −T² on the block (T = QᵀKQ, scaled to trace 1: planes
        #   apart in σ² by more than ~u tr are told apart, where S needed 2u), and each plane's log is
        #   θ(baᵀ − abᵀ), exact for any orthonormal pair of an invariant plane. A pair whose eigenvalue is
        #   within 1e-3 of a neighbour's (planes at nearly one σ, whose pairs need not be invariant: θ baᵀ was
        #   up to σ off) is re-read on invariant planes of K, by an eigh of i T on the group (Note [Planes at one
        #   distance near the cut]; it took θ/‖Kw‖ K wwᵀ, which is still the fallback). Round trips of planes at
        #   different δ: ~u (float32 inputs: their rounding); ‖log‖ = dist to ~u. Cost: one more eigh, of a
        #   matrix diagonal off the block (a quarter of a dense one at 64×64, LAPACK skipping the zero
        #   columns), three n×n products; φ's value is read as atan2(s, c)/s without the series and its
        #   derivatives where nothing differentiates (1.00× at 64×64, 0.78× at 8×8, CPU time).
        # At −1 itself σ is ±rounding and θ = ±π: one of the minimal logs, with expmap(X, logmap(X, Y)) = Y.
        # σ carries the derivative of the angles, and the cluster's frame turns with its eigenspace against the
        # rest where a derivative is taken (Note [The cut cluster's eigenspace derivative]); SO's planes within
        # the cluster turn against each other to first order (Note [Several planes in the cut cluster]: the
        # log's derivative across them is ~π/δ; at the cut it has none). Unitary's eigenvectors within the
        # cluster are not taken.
        wide = wide_dtype(X)
        Xw = X.to(wide)
        R = refine_frame(refine_frame(transpose(Xw) @ Y.to(wide)))
        K = skew_part(R)
        K0 = K.detach()
        cplx = R.is_complex()
        tol = torch.finfo(R.real.dtype).eps ** (1.0 / 3.0)  # τ (Note [Group logarithms on the cut locus])
        # (derivative_mode's eager test takes real dtypes: R.real, a view, tracks R's derivatives)
        mode = derivative_mode(R.real if cplx else R, first=True)
        value_only = not cplx and mode == "none"
        held: list[tuple[Tensor, ...]] = []

        def phi(lam: Tensor, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            KQ = K0 @ Q
            s = torch.linalg.vector_norm(KQ, dim=-2)
            # (where nothing differentiates the cluster only reads the value, which the near block's replaces)
            cut = _cut_cluster(lam, s, tol, 1 if cplx else 2) if mode != "none" else (s <= tol) & (lam < 0)
            if cplx:
                held.append((Q.detach(), cut.detach(), lam.detach(), KQ.detach(), s.detach()))
                return theta_over_sin_cs(lam, s, cut)
            partner = _pair_constants(Q.shape[-1], Q.dtype, Q.device)[0]
            cut = cut & cut[..., partner]  # both of a pair (an odd last one has λ = 1)
            near = (s <= _SO_NEAR) & (lam < 0)  # whole pairs, up to the first that is not (the nearest come first)
            near = torch.cumprod((near & near[..., partner]).to(Q.dtype), dim=-1) > 0.5
            # φ's value for _so_log_value (away from the near pairs): θ/sin θ = atan2(s, c)/s, 1 at s = 0
            f = torch.where(s > 0.0, torch.atan2(s, lam) / torch.where(s > 0.0, s, 1.0), 1.0)
            held.append((Q.detach(), cut.detach(), KQ.detach(), near, torch.where(cut, 0.0, f).detach(), lam.detach()))
            return theta_over_sin_cs(lam, s, cut) if not value_only else (f, f, f)

        if value_only:  # nothing differentiates: the value alone (one product for both parts)
            S0 = sym_part(R)
            phi(*torch.linalg.eigh(sanitize(S0)))
            Q, _, KQ, near, f, _ = held[0]
            return (Xw @ (skew_part(_so_log_value(Q, KQ, f, near)) + poison(S0))).to(X.dtype)
        S = sym_part(R)
        P = spectral_eigh(S, phi, _so_tie_tol)
        if cplx:  # −iK on the cluster, the rest of Q's coordinates moved to eigenvalue 2 (|σ| ≤ τ there)
            Q, cut, lam, KQ, s = held[0]
            # eigenvalues near −1 (the cut cluster among them, leading): the value re-read by −iK there, the
            # derivatives as they were (Note [Unitary eigenvalues near the cut])
            near = torch.cumprod(((s <= _SO_NEAR) & (lam < 0)).to(lam.dtype), dim=-1) > 0.5
            readable = values_readable(R.real)
            if mode == "none" and readable:  # nothing differentiates: the value alone (no cluster where none is near)
                if not bool(near.any()):
                    return (Xw @ skew_part(K @ P)).to(X.dtype)
                L = _unitary_log_value(Q, KQ, s, lam, near)
                if not bool(near[..., 0].all()):  # (a point with none: K φ(S), the same numbers)
                    L = torch.where(near[..., :1, None], L, skew_part(K @ P))
                return (Xw @ L).to(X.dtype)
            m = cut.to(R.real.dtype)
            H = (transpose(Q) @ (-1j * K0) @ Q) * (m.unsqueeze(-1) * m.unsqueeze(-2)).to(R.dtype)
            H = 0.5 * (H + transpose(H)) + torch.diag_embed((2.0 * (1.0 - m)).to(R.dtype))
            sig0, V = torch.linalg.eigh(sanitize(H))
            # the cluster's frame turning with its eigenspace (Q in value: the log is the same number)
            W = (_cluster_frame(Q, cut, lam, S, mode) if mode != "none" else Q) @ V
            inn = (sig0 < 1.0).to(R.real.dtype)
            sig = (W.conj() * (K @ W)).sum(dim=-2).imag * inn
            th = torch.atan2(sig, -torch.sqrt(1.0 - sig * sig)) * inn
            C = 1j * ((W * th.unsqueeze(-2).to(W.dtype)) @ transpose(W))
            # the cluster's eigenvectors turning against each other (Note [Eigenvalues in the cut cluster]; eager, where
            # no point has two, skipped: the same numbers; grad and jvp too: Note [Values read under grad and jvp])
            if mode != "none" and (not values_readable(R.real) or bool((inn.sum(dim=-1) > 1.5).any())):
                C = C + _cut_eigvecs_turning(W, K - K0, sig.detach(), th.detach(), inn)
            L = skew_part(K @ P) + C
            if not readable or bool(near.any()):  # (a point with none: L + 0, the same numbers)
                L = L + torch.where(near[..., :1, None], _unitary_log_value(Q, KQ, s, lam, near) - L.detach(), 0.0)
            return (Xw @ L).to(X.dtype)
        Q, cut, KQ, near, f, lam = held[0]
        p = Q.shape[-1] // 2
        Qr = _cluster_frame(Q, cut, lam, S, mode)  # Q in value, turning with the cut cluster's eigenspace
        # several planes in the cut cluster: their own frame and turning (Note [Several planes in the cut cluster];
        # eager, grad or jvp, where no point has two, skipped: the same numbers; Note [Values read under grad and jvp])
        several = not values_readable(R) or bool((cut.sum(dim=-1) > 2).any())
        if several:
            U, T0, close = _cut_planes(Q, KQ, cut)
            Qr = Qr @ U
        A, B, w = Qr[..., 0:2 * p:2], Qr[..., 1:2 * p:2], (cut & ~close if several else cut)[..., 0:2 * p:2]
        sig = (B * (K @ A)).sum(dim=-2) * w
        Bt = B * (torch.atan2(sig, -torch.sqrt(1.0 - sig * sig)) * w).unsqueeze(-2)
        C = Bt @ transpose(A) - A @ transpose(Bt)
        L = skew_part(K @ P) + C
        if several:
            L = L + _cut_planes_turning(Qr, K - K0, T0, cut, close)
        # the value as where nothing differentiates; the derivatives of K φ(S) + C, as before
        return (Xw @ (L + (skew_part(_so_log_value(Q, KQ, f, near)) - L.detach()))).to(X.dtype)


# Note [Several planes in the cut cluster]
# The cut pairs' form θ (baᵀ − abᵀ) is the log on the cluster only where each pair (a, b) spans an invariant
# plane of K. Two planes within τ of π at different distances δ1 ≠ δ2 share an eigenspace of S to ~u/δ² (S sees
# cos θ, which has lost δ), so S's eigenvector pairs mixed them, and the planes' turning against each other
# within the cluster was not taken: logmap's derivative was O(1) off where it is O(1) (along X e^{tB} R e^{−tB}:
# X [B, log R]), ~100% where it is ~π/δ (jvp, vjp, jacrev; float64, δ of 1e-8 to 6e-6), and sqdist's gradient
# (⟨log, dlog⟩, O(1)) 0.5–100% off, a sign flipped at two planes at 1e-6. So the cluster is re-resolved by the
# eigenvectors V of −T² on it (the matrix _so_log_value decomposes, (KQ)ᵀKQ on the cluster scaled to trace 1,
# the rest at 2: where its near block is the cluster, the same planes to the bit; planes read apart at ~u/δ
# made ⟨log, dlog⟩ 1e3 off at δ = 1e-10), the pairs read from Q V (θ (baᵀ − abᵀ) is the same for any
# orthonormal pair of the plane: one plane's log and derivatives are as before), and the planes' turning is
# added to first order as the Daleckii–Krein derivative of the log on the cluster, F = T ψ(−T²) (T = WᵀK₀W,
# W = Q V, ψ(σ²) = θ(σ)/σ, even in σ): with N = Wᵀ dK W, dF = N ψ + T (Γ ∘ dA), dA = −(T N + N T),
# Γⱼₖ = ψ[σⱼ², σₖ²] = (θ[σⱼ, σₖ] σ̄ − θ̄)/(σⱼ σₖ (σⱼ + σₖ)) (means over j, k; θ[·,·] = −(1 + (σⱼ² + σⱼσₖ +
# σₖ²)/6), exact to O(τ⁴) for σ ≤ τ), σ read as ‖T w‖ (accurate to ~u absolutely; no difference of
# eigenvalues), taken between different pairs only: within a pair the form's θ'(σ) N is the same number
# without the cancellation of N ψ against T (Γ ∘ dA) (each ~π/δ there). Pairs that _so_log_value reads as
# close (planes at nearly one δ: the pairs need not be invariant, and the form on them was O(1) from the log,
# which the cluster's turning against the rest carried) leave the form: they take the whole block's dF, and
# W (T ψ) Wᵀ on their columns for the turning. Columns with σ ≤ 64ε (rounding: at −1 itself) take no turning.
# Zero in value; its own derivative is not exact (first order: second derivatives with several planes in the
# cluster are not; a single plane, the common case, keeps exact second derivatives). Cost: one eigh and a
# few products where something differentiates (value-only paths unchanged).
# Just outside the cluster (planes at δ from τ to ~1e-4) K φ(S) reads them, and spectral_eigh's default tie
# tolerance (√ε, absolute on S's spectrum in [−1, 1]) took two planes whose cosines differ by < 1.5e-8 as
# tied (the mean slope of φ, whose scale there is δ²): the derivative 2–25× off at δ = 1e-5 and 3e-5. S's tie
# tolerance is 16ε there (_so_tie_tol); near ties are φ's own scale's (Note [Near ties of smooth spectral
# maps]), so elsewhere (planes farther than ~1e-2 from π) the derivatives are the same to the bit.
def _asin_divided(a: Tensor, b: Tensor) -> Tensor:
    """arcsin[a, b] = (arcsin a − arcsin b)/(a − b) for a, b of one sign (|·| < 1), without cancellation: the series
    1 + (a² + ab + b²)/6 (error ~σ⁴/13) up to 1e-4, else tan(arcsin a − arcsin b) = z = (a² − b²)/((a√(1−b²) +
    b√(1−a²))(√(1−a²)√(1−b²) + ab)) and arcsin[a, b] = atan(z)/(a − b) (Note [Where the cut cluster ends])."""
    series = 1.0 + (a * a + a * b + b * b) / 6.0
    big = torch.maximum(a.abs(), b.abs()) > 1e-4
    ca, cb = torch.sqrt((1.0 - a * a).clamp(min=0.0)), torch.sqrt((1.0 - b * b).clamp(min=0.0))
    den = (a * cb + b * ca) * (ca * cb + a * b)
    big = big & (den != 0)  # (0 only at |a| = |b| = 1, c = 0: never in the cluster, which has c < 0)
    den = torch.where(big, den, torch.ones_like(a))
    z = (a - b) * (a + b) / den
    atanc = torch.where(z == 0, torch.ones_like(z), torch.atan(z) / torch.where(z == 0, torch.ones_like(z), z))
    return torch.where(big, (a + b) / den * atanc, series)


def _cut_planes(Q: Tensor, KQ: Tensor, cut: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, T, close)``: the rotation ``U`` (detached; V on the cut columns, I elsewhere) of S's eigenvectors
    ``Q`` onto the cut cluster's planes, ``T = (QU)ᵀ K₀ (QU)`` on the cluster (0 elsewhere) and the pairs that
    _so_log_value reads as close (Note [Several planes in the cut cluster])."""
    n = Q.shape[-1]
    partner, first, sign, before, after, eye = _pair_constants(n, Q.dtype, Q.device)
    m = cut.to(Q.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    G = (transpose(KQ) @ KQ) * mm  # as _so_log_value's (the same planes where its near block is the cluster)
    tr = G.diagonal(dim1=-2, dim2=-1).sum(dim=-1).clamp(min=torch.finfo(Q.dtype).tiny)[..., None, None]
    lam, V = torch.linalg.eigh(sanitize(G / tr + torch.diag_embed(2.0 - 2.0 * m)))
    U = torch.where(cut.unsqueeze(-2), V, eye)
    T = (transpose(Q @ U) @ (KQ @ U)) * mm
    gaps = torch.nn.functional.pad(lam[..., 1:] - lam[..., :-1], (1, 1), value=torch.inf)
    sw = torch.linalg.vector_norm(T, dim=-2)
    close = (torch.minimum(gaps[..., before], gaps[..., after]) <= _SO_CLOSE) & cut
    big = sw + sw[..., partner] > 2.0 * torch.finfo(Q.dtype).eps ** 0.5  # as _so_log_value's
    low = close & ~big
    if not values_readable(Q) or bool(low.any()):  # invariant planes for the form (Note [Planes at one distance near the cut])
        U = _so_invariant_pairs(U, T, low)[0]
        T = (transpose(Q @ U) @ (KQ @ U)) * mm
    return U, T, close & big


def _cut_planes_turning(W: Tensor, dK: Tensor, T: Tensor, cut: Tensor, close: Tensor) -> Tensor:
    """The cut cluster's planes turning against each other, to first order (zero in value): ``W dF Wᵀ`` with
    ``dF`` of Note [Several planes in the cut cluster] off the pairs' blocks (on them too for ``close`` pairs,
    which add ``W (T ψ) Wᵀ`` on their columns); ``dK`` is K less its detached copy, ``T`` as :func:`_cut_planes`
    returns it."""
    n = W.shape[-1]
    first = _pair_constants(n, T.dtype, T.device)[1]
    eps = torch.finfo(T.dtype).eps
    m = cut.to(T.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    N = (transpose(W) @ dK @ W) * mm
    sw = torch.linalg.vector_norm(T, dim=-2)
    sg = sw.clamp(min=64.0 * eps)  # σ per column; below 64ε it is rounding: no turning there (δ = 0 has none)
    th = torch.atan2(sg, -torch.sqrt((1.0 - sg * sg).clamp(min=0.0)))
    si, sj = sg.unsqueeze(-1), sg.unsqueeze(-2)
    dth = -_asin_divided(si, sj)  # θ[σⱼ, σₖ]
    gam = (dth * 0.5 * (si + sj) - 0.5 * (th.unsqueeze(-1) + th.unsqueeze(-2))) / (si * sj * (si + sj))
    dA = -(T @ N + N @ T)
    psi = th / sg
    dF = N * psi.unsqueeze(-2) + T @ (gam * mm * dA)
    same = first.unsqueeze(-1) == first.unsqueeze(-2)
    cl = close.to(T.dtype)
    res = (sw > 64.0 * eps).to(T.dtype)
    keep = mm * torch.where(same, cl.unsqueeze(-1) * cl.unsqueeze(-2), res.unsqueeze(-1) * res.unsqueeze(-2))
    F = T * (psi * cl).unsqueeze(-2)  # the close pairs' log, turning with the cluster (their form is left out)
    return skew_part(W @ (dF * keep + F) @ transpose(W))


# Note [The cut cluster's eigenspace derivative]
# The cut cluster's frame (Q's cluster columns, Note [Group logarithms on the cut locus]) is read from a detached
# eigh, so the log on it held the angles' derivative only: the turning of the cluster's eigenspace against the
# rest of S's, O(1/gap) with the gap between their eigenvalues, was lost. A Unitary with one eigenvalue
# e^{i(π − δ)} within τ of −1 and the others far from it (where the principal log is smooth) had a logmap
# derivative 100% off (δ = 5e-6 in float64), its second derivative 75% off; SO(3) at δ = 1e-8 alike (SO's
# value is _so_log_value's, and these derivatives are those of the form it adds). The cluster's projector is
# the spectral function h(S) of the indicator h of the cluster, whose expansion at S + E in Q's coordinates
# (N = QᴴEQ, Hermitian) is diag(h) + M + Σₖ h[λᵢ, λₖ, λⱼ] Nᵢₖ Nₖⱼ with M = h[λᵢ, λⱼ] Nᵢⱼ (Daleckii–Krein; the
# divided differences of an indicator are 0 within one side, and the second-order sum is ∓(M M)ᵢⱼ on one side,
# − in the cluster, and (M N − N M)ᵢⱼ/(λᵢ − λⱼ) across it); with N = Qᴴ(S − S.detach())Q (zero in value) that
# is exact to second order in every derivative. The frame is then the direct rotation from the cluster's
# eigenspace P₀ = diag(h) to that projector's P, T = P P₀ + (I − P)(I − P₀) = I + (P − P₀) D (D = 2P₀ − I),
# made unitary to second order: U = T − ½(TᴴT − I) = I + skew((P − P₀) D) − ½ D M M D (M N − N M is
# M N − (M N)ᴴ: two products for the second order). U is I in value (N is zero), so Q U is Q and the log
# the same number; it is built only where something differentiates (the value-only paths keep Q).
def _cluster_frame(Q: Tensor, cut: Tensor, lam: Tensor, S: Tensor, mode: str) -> Tensor:
    """``Q U`` (``Q`` in value): ``S``'s eigenvectors ``Q`` (eigenvalues ``lam``, detached) with the ``cut``
    columns' frame turning with their eigenspace of ``S`` against the rest's, exact to second order
    (Note [The cut cluster's eigenspace derivative]); ``mode`` is ``derivative_mode``'s (not "none")."""
    h = cut.to(lam.dtype)
    dh, gap = h.unsqueeze(-1) - h.unsqueeze(-2), lam.unsqueeze(-1) - lam.unsqueeze(-2)
    ok = (dh != 0) & (gap != 0)
    inv = torch.where(ok, 1.0 / torch.where(ok, gap, torch.ones_like(gap)), torch.zeros_like(gap))  # 1/(λᵢ − λⱼ) across
    cdt = Q.dtype
    hd, inv, d = (dh * inv).to(cdt), inv.to(cdt), (2.0 * h - 1.0).to(cdt)
    if mode == "chain":
        Z = _cluster_rotation(S, Q, hd, inv, d)
    elif mode == "first":  # one forward-mode level: the second-order part's tangent is 0 (Note [Lazy second-order terms])
        Z = _cluster_rotation(S, Q, hd, inv, d, second=False)
    else:  # "lazy": the second-order part only where a backward builds a graph
        Z = add_second_order(lambda *ts: _cluster_rotation(*ts, first=False), _cluster_rotation(S, Q, hd, inv, d, second=False),
                             S, state=(Q, hd, inv, d))
    return Q + Q @ Z


def _cluster_rotation(S: Tensor, Q: Tensor, hd: Tensor, inv: Tensor, d: Tensor, first: bool = True,
                      second: bool = True) -> Tensor:
    """``U − I`` (zero in value) in Q's coordinates: its first-order part, its second-order part, or both
    (Note [The cut cluster's eigenspace derivative]; the tensors as arguments: the lazy node saves them)."""
    N = transpose(Q) @ (S - S.detach()) @ Q  # zero in value; carries every derivative of S
    M = hd * N  # h[λᵢ, λⱼ] Nᵢⱼ (Hermitian, zero within either side)
    out = skew_part(M * d.unsqueeze(-2)) if first else None
    if second:
        MM, MN = M @ M, M @ N
        P2 = (-d).unsqueeze(-1) * MM + inv * (MN - transpose(MN))  # P's second-order part
        Z2 = skew_part(P2 * d.unsqueeze(-2)) - 0.5 * (d.unsqueeze(-1) * d.unsqueeze(-2)) * MM
        out = Z2 if out is None else out + Z2
    return out


# Note [Eigenvalues in the cut cluster]
# Unitary's cluster log i Σ θ(σₖ) wₖwₖᴴ (σ, w the eigenpairs of −iK on it, Note [Group logarithms on the cut
# locus]) took the angles' derivative (σ from K) and the cluster's turning against the rest, not its
# eigenvectors' turning against each other: with two eigenvalues in the cluster logmap's derivative was O(1)
# off (along a conjugation, 4.3 at e^{i(π−δ1)}, e^{−i(π−δ2)}; 50–90% in general directions, on either side;
# complex128, δ of 1e-8 to 6e-6). That turning is the Daleckii–Krein term i W (Γ ∘ N) Wᴴ off the diagonal,
# N = Wᴴ(−i dK)W, Γⱼₖ = θ[σⱼ, σₖ]: across the cut (σⱼσₖ < 0, ~2π/(|σⱼ| + |σₖ|)) read directly, on one side
# −(1 + (σⱼ² + σⱼσₖ + σₖ²)/6) (θ = ±π − arcsin σ, exact to O(τ⁴)); pairs closer than 64ε across the cut (at
# −1 itself, where the log has no derivative) take none. Zero in value; first order.
def _cut_eigvecs_turning(W: Tensor, dK: Tensor, sig: Tensor, th: Tensor, inn: Tensor) -> Tensor:
    """``i W (Γ ∘ N) Wᴴ`` of Note [Eigenvalues in the cut cluster] (zero in value): ``W`` the cluster's frame
    (``inn`` its columns), ``sig``/``th`` their σ and θ, ``dK`` K less its detached copy."""
    eps = torch.finfo(sig.dtype).eps
    N = transpose(W) @ (-1j * dK) @ W
    si, sj = sig.unsqueeze(-1), sig.unsqueeze(-2)
    ds = si - sj
    across = (si * sj < 0) | ((si == 0) != (sj == 0))
    ok = ~across | (ds.abs() > 64.0 * eps)
    same = -_asin_divided(torch.where(across, 0.0, si), torch.where(across, 0.0, sj))
    gam = torch.where(across, (th.unsqueeze(-1) - th.unsqueeze(-2)) / torch.where(ok, ds, torch.ones_like(ds)), same)
    n = W.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=W.device)
    mask = (inn.unsqueeze(-1) * inn.unsqueeze(-2)) * (ok & off).to(inn.dtype)
    return 1j * (W @ ((gam * mask).to(W.dtype) * N) @ transpose(W))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrameSpace(AbstractSpace):
    """Abstract: n×k orthonormal frames (wide ones transposed), base = the frame itself.

    Complex frames (``XᴴX = I``) too: ``ᵀ`` reads ``ᴴ`` throughout (Note [Complex]).
    Subclasses implement ``to_manifold`` and ``tangent``; everything else is shared:
    ``from_manifold(X) = (0, X)``, ``rebase = (0, to_manifold(Z, base))``, the QR retraction
    (CholeskyQR2, O(n k²)), the polar projection, Haar sampling and the orthonormality check.
    """

    _base_kind: ClassVar[str | None] = "frames"  # what its base is (AbstractSpace._refine_base)
    _one_node_maps: ClassVar[tuple[str, ...]] = ("project",)  # the polar factor (Note [Lazy second-order terms])
    _empty_points: ClassVar[bool] = True  # St(n, 0) and Gr(n, 0): one point, the empty frame (as GeoTorch)

    triv: Triv = "expm"
    accepts_complex: ClassVar[bool] = True

    def __post_init__(self) -> None:
        validate_triv(self, self.triv)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return torch.zeros_like(X), X

    # Note [Rebased frames refined]
    # `rebase` makes the chart's point the next base: SGD on raw tensors plus a rebase every step (the
    # README's Riemannian gradient descent) charts each point at the previous one. A chart's point is
    # orthonormal only to its rounding, and the chart at a base off by E carries E into its point
    # (φ(W) Y rotates Y's error with it) or, in the 2k×2k reduction and the packed chart (which take
    # the base to be orthonormal), amplifies it by ~1 + ‖step‖. So the frames drifted off linearly in
    # the number of rebases (float32 SO(cayley) 7e-5 after 1,000 rebases of one steady raw step,
    # Stiefel 1.4e-4 after 3,000 SGD steps of a PCA, off the space) and the rank family's U frame
    # exponentially (float64 1e-4 after 1,000, float32 NaN after ~600). So a new base whose frames are
    # off by more than rounding (max|XᴴX − I| > 64ε; a fresh chart point measured ≤ 17ε up to 256×32)
    # is refined by one Newton–Schulz step (Note [Retractions that multiply] in geofunc/_linalg.py):
    # an error E comes back as ~E², and the drift stays below ~64ε. Below that the point is kept bit
    # for bit (torch.where per frame, no branch on values), so geofunc.nn's update_base keeps the
    # weight's value exactly, as documented. Two small products per frame and rebase; the chart
    # itself (the hot path) is unchanged.
    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """``(0, to_manifold(Z, base))``, the frame refined where it drifted (Note [Rebased frames refined])."""
        Xt, tr = tall(self.to_manifold(Z, base))
        return self._from_manifold(untall(refine_drifted(Xt), tr))

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``qf(X + V)``: the Q factor (positive diagonal R) by CholeskyQR2, O(n k²)."""
        self._check_pair(X, V, "V")
        Xt, tr = tall(X)
        return untall(chol_qr(Xt + tall(V)[0]), tr)

    def project(self, Y: Tensor) -> Tensor:
        """The polar factor ``U Vᵀ`` of ``Y = U S Vᵀ`` (the nearest frame)."""
        self._check_shape(Y, "Y")
        if 0 in Y.shape[-2:]:  # the empty frame (its polar factor has no singular values to read)
            return 0.0 * Y
        return polar(Y)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """Haar-uniform frames of full shape ``shape`` (QR of a Gaussian, signs fixed)."""
        shape = self._sample_shape(shape, dtype)
        tr = shape[-2] < shape[-1]
        tshape = shape[:-2] + (shape[-1], shape[-2]) if tr else shape
        return untall(haar_stiefel(tshape, generator, dtype, device), tr)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        return {("max|XᴴX − I|" if X.is_complex() else "max|XᵀX − I|"): orthonormality_error(tall(X)[0])}
