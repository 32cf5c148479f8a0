"""A fast, accurate, differentiable matrix exponential (Taylor + scaling and squaring).

``expm(A) ≈ T_m(A / 2^s)^(2^s)`` with ``T_m`` the Taylor polynomial of degree ``m``,
evaluated by Paterson–Stockmeyer in the powers ``B, B², B³, B⁴`` of ``B = A / 2^s``.
``m`` and ``s`` are chosen per call from the 1-norms of ``A``, ``A³`` and ``A⁴``
(the ``α₃ = max(‖A³‖^(1/3), ‖A⁴‖^(1/4))`` bound of Al-Mohy and Higham, which for a
random skew generator is ~10× smaller than ``‖A‖₁``, hence ~3 fewer squarings) so
that the backward error is at the unit roundoff of the dtype, for the least number
of matrix products: ``m`` and the largest ``s`` for a batch's largest generator, and each
matrix of the batch only the squarings its own ``α₃`` needs (Note [Squarings per matrix]).

Why not ``torch.linalg.matrix_exp``: its backward evaluates the exponential of a
2n×2n block matrix (~100 n×n matmuls). Here the backward is the adjoint of the
evaluation itself (the exact gradient of the approximant ``T_m(A/2^s)^(2^s)``), about
twice the forward's products, reusing the forward's intermediates. Total
forward + backward ≈ 3 × (#products + s) matmuls, and more accurate.

Transforms. ``m`` and ``s`` are data dependent, so the choice happens on concrete
tensors inside a ``torch.autograd.Function``:

* ``backward`` reuses the forward's intermediates. With ``create_graph`` (double backward,
  and every ``torch.func`` ``grad``/``vjp``, which always build a graph) it is one more
  Function of ``(A, G)`` with the same value, whose own derivatives differentiate the
  evaluation at a higher degree, so that higher derivatives are exact (Note [Adjoint node]).
* ``jvp`` (forward mode) recomputes the intermediates from the saved input
  (correct under nested transforms) and propagates the tangent through them.
* ``vmap`` calls the Function again on the batch moved to the front: the op is
  batched over leading dimensions, so no per-sample fallback is needed (the adjoint's unbatched
  ``A`` takes a dim of size 1 there, so that nested levels line up: Note [Adjoint vmap rule]).
* under ``torch.compile`` the exponential and its adjoint are custom operators
  (``geofunc::expm``, ``expm_powers``, ``expm_vjp``) whose kernels choose the degree and squarings
  from the values at run time, as above (Note [Compiled exponential]): one graph, no Python
  branching traced.
* in plain eager mode with nothing to record, the values are evaluated directly, and with a graph
  the Function is applied without ``Function.apply``'s per-call argument binding (Note [Plain eager
  calls]).
* the tall frame chart, which needs only the first k columns of the exponential of a 2k×2k
  matrix ``[[T, R], [c I, 0]]``, evaluates them by blocks in plain eager mode and under
  ``torch.compile`` (``frame_columns``, Notes [Frame exponential] and [Compiled frame
  exponential]): about half the products, forward and backward.
* for tensor subclasses (DTensor), under nested forward mode, and for the derivatives of the
  compiled adjoint, ``expm`` evaluates a tensor-only schedule in plain torch ops (Note
  [Static schedule]). Empty and meta inputs go to ``torch.linalg.matrix_exp``.

Complex inputs (complex64, complex128; the skew-Hermitian generators of ``Unitary``) take
every path above (Note [Complex]).

The thresholds ``θ_m`` are computed here (no tables copied): the largest ``θ`` with
``Σ_k |c_k| θ^(k-1) ≤ u`` for the series ``log(e^{-x} T_m(x)) = Σ_{k>m} c_k x^k``
(relative backward error ``≤ u``, Higham's criterion).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from fractions import Fraction
from typing import Any

import torch

from ._fastpath import (_FAST_DTYPES, _PLAIN_TYPES, _transforms, dispatch_mode_active, make_fx_tracing, save_state,
                        forward_tangents, saved_state, saving_hooks, tracks_derivatives)
from ._fastpath import backward_without_autocast  # Note [Backward formulas under autocast]

Tensor = torch.Tensor

__all__ = ["expm", "expm_frechet", "choose_degree"]

# Degrees with the Paterson–Stockmeyer block size q and the number of matrix products.
# q = 4 for m ≥ 8: the powers B², B³, B⁴ (3 products) then m/4 - 1 Horner steps in B⁴.
_LOW = (1, 2, 4)  # chosen from ‖A‖₁ alone (no powers computed first)
_HIGH = (8, 12, 16, 20, 24)
_Q = {1: 1, 2: 2, 4: 2, 8: 4, 12: 4, 16: 4, 20: 4, 24: 4}


def _products(m: int) -> int:
    q = _Q[m]
    return (q - 1) + m // q - (1 if m % q == 0 else 0)


_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
_REAL = {torch.complex128: torch.float64, torch.complex64: torch.float32}


def _real(dtype: torch.dtype) -> torch.dtype:
    """The real dtype whose tables (unit roundoff, static degree) serve ``dtype`` (Note [Complex])."""
    return _REAL.get(dtype, dtype)


@functools.lru_cache(maxsize=None)
def _theta(m: int, u: float) -> float:
    """Largest θ with Σ_{k>m} |c_k| θ^(k-1) ≤ u, ``log(e^{-x} T_m(x)) = Σ c_k x^k``."""
    K = m + 80
    # e^{-x} T_m(x) = 1 + y(x), y = Σ_{k>m} b_k x^k with b_k = (-1)^(k+m) C(k-1, m) / k!
    y = [Fraction(0)] * (K + 1)
    for k in range(m + 1, K + 1):
        y[k] = Fraction((-1) ** (k + m) * math.comb(k - 1, m), math.factorial(k))
    yf = [float(v) for v in y]
    # log(1 + y) = Σ_j (-1)^(j+1) y^j / j, truncated at degree K (floats are enough here)
    c = [0.0] * (K + 1)
    power = yf[:]
    j = 1
    while any(power):
        sign = 1.0 if j % 2 else -1.0
        for k in range(K + 1):
            c[k] += sign * power[k] / j
        nxt = [0.0] * (K + 1)
        for a in range(K + 1):
            if power[a]:
                for b in range(m + 1, K + 1 - a):
                    nxt[a + b] += power[a] * yf[b]
        power = nxt
        j += 1

    def bound(t: float) -> float:
        return sum(abs(ck) * t ** (k - 1) for k, ck in enumerate(c) if k > 0)

    lo, hi = 0.0, 64.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if bound(mid) <= u:
            lo = mid
        else:
            hi = mid
    return lo


def _colnorm1(X: Tensor) -> Tensor:
    """The 1-norm (largest column sum of |entries|) of each matrix of the batch."""
    return X.abs().sum(dim=-2).amax(dim=-1)


def _norms34(P3: Tensor, P4: Tensor) -> Tensor:
    """``(2, batch)``: the 1-norms of each matrix's third and fourth powers, for one read."""
    return torch.stack([_colnorm1(P3), _colnorm1(P4)]).reshape(2, -1)


def _alpha3(P3: Tensor, P4: Tensor) -> Tensor:
    """α₃ = max(‖A³‖₁^⅓, ‖A⁴‖₁^¼) of each matrix of the batch, as a tensor (values: no derivative)."""
    return torch.maximum(_colnorm1(P3.detach()).pow(1.0 / 3.0), _colnorm1(P4.detach()).pow(0.25))


def _finite_max(norms: Tensor, dim: int | None = None) -> Tensor:
    """The largest finite entry of ``norms`` (over ``dim``, or all; 0 if none): non-finite ones read as 0.
    An empty batch (no norm) reads 0 too: ``amax`` refuses an empty reduction."""
    if norms.numel() == 0:
        return norms.new_zeros(()) if dim is None else norms.sum(dim=dim)
    finite = norms.nan_to_num(0.0, 0.0, 0.0)
    return finite.amax() if dim is None else finite.amax(dim=dim)


def _values(t: Tensor) -> Tensor:
    """The plain tensor under ``t``'s ``torch.func`` wrappers (``t`` itself when plain): under
    ``vmap`` it holds every batch entry's values, the batch dimensions anywhere. Only for reading a
    largest norm into Python (the degree choice, a piecewise-constant function of the values)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t) or F.is_batchedtensor(t):
        t = F.get_unwrapped(t)
    return t


def _read_max(norms: Tensor) -> float:
    """The largest finite entry of ``norms`` over every batch entry, also under ``vmap``, as a float.

    A NaN/inf matrix in a batch gets a NaN/inf result anyway; it must not change the degree and
    squarings of its finite neighbours."""
    return float(_finite_max(_values(norms)))


def _eye(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


# Note [Complex]
# The Taylor coefficients are real and the backward error analysis (Al-Mohy and Higham) is
# stated for complex matrices in the 1-norm of |entries|, so a complex A gets the degree, the
# squarings and the static schedule of its real dtype (_real: complex64 → float32's unit
# roundoff and thresholds). The evaluation and its Fréchet derivative (_tangent, forward mode)
# are polynomials in A and E, holomorphic, unchanged. The adjoint follows PyTorch's convention
# for complex gradients, ⟨G, dX⟩ = Re tr(Gᴴ dX): the reverse of X = Y Z is (G Zᴴ, Yᴴ G), so
# _adjoint transposes with .mH, which for a real tensor is the same view as .mT (real results
# are bit-identical).


def choose_degree(A: Tensor, powers: Any = None) -> tuple[int, int, Any]:
    """``(m, s, pre)``: Taylor degree, number of squarings, and precomputed powers.

    ``pre`` is ``None`` or ``(t, [A_t, A_t², A_t³, A_t⁴])`` with ``A_t = A / 2^t``
    (``t > 0`` only for ``‖A‖₁ > 2¹⁶``, so that the powers cannot overflow while the
    norms are measured; ``B^j = A_t^j 2^((t-s)j)`` is exact).
    ``powers``: ``(A_t², A_t³, A_t⁴)`` from an earlier call on the same ``A`` (the compiled adjoint,
    Note [Compiled exponential]), which then gives the same choice without the 3 products.
    Reads tensor values: concrete tensors only.
    """
    u = _UNIT_ROUNDOFF[_real(A.dtype)]
    with torch.no_grad():
        if powers is None and A.shape[-1] <= _SPECULATE_N and _values(A) is A:
            choice = _small_choice(A, u)
            if choice is not None:
                return choice
        a1 = _read_max(_colnorm1(A))
        m = _low_degree(a1, u)
        if m is not None:
            return m, 0, None
        t = max(0, math.ceil(math.log2(a1 / 2.0**16))) if a1 > 2.0**16 else 0
        A_t = A * 2.0**-t if t else A
        if powers is None:
            P2 = _mm(A_t, A_t)
            P3 = _mm(P2, A_t)
            P4 = _mm(P2, P2)
        else:
            P2, P3, P4 = powers
        m, s = _high_degree(A, P3, P4, u, 2.0**t)
        return m, s, (t, [A_t, P2, P3, P4])


# Note [Small degree choice]
# For a small plain matrix (n ≤ _SPECULATE_N, the rank charts' 2r×2r frames) choose_degree computes
# the powers A², A³, A⁴ before it knows whether ‖A‖₁ alone decides (three products of a few hundred
# flops each), then reads the three 1-norms' batch maxima in one reduction and one transfer to
# Python: ~9 ops where the two-step choice took ~18 (the fixed cost of an op, ~1–5 µs, is the cost
# here). Same degree, squarings and powers, bit for bit. Past ‖A‖₁ = 2¹⁶ (the powers might overflow)
# it falls back to the two-step choice, which rescales first. Under vmap the batch dimensions may
# sit anywhere in the plain tensor, so the norms are read one by one there (_read_max).
_SPECULATE_N = 16


def _small_choice(A: Tensor, u: float) -> tuple[int, int, Any] | None:
    """:func:`choose_degree` of a small plain ``A`` with its powers computed first (Note [Small degree
    choice]), or None past ‖A‖₁ = 2¹⁶."""
    P2 = _mm(A, A)
    P3 = _mm(P2, A)
    P4 = _mm(P2, P2)
    norms = _colnorm1(torch.stack([A, P3, P4])).reshape(3, -1)
    a1, n3, n4 = _finite_max(norms, dim=1).tolist()
    if a1 > 2.0**16:
        return None
    m = _low_degree(a1, u)
    if m is not None:
        return m, 0, None
    m, s = _pick_degree(max(n3 ** (1.0 / 3.0), n4**0.25), u)
    return m, s, (0, [A, P2, P3, P4])


def _low_degree(a1: float, u: float) -> int | None:
    """The degree of ``_LOW`` that ``‖A‖₁ = a1`` alone allows at unit roundoff ``u`` (no powers needed), or None."""
    return next((m for m in _LOW if a1 <= _theta(m, u)), None)


def _high_degree(A: Tensor, P3: Tensor, P4: Tensor, u: float, scale: float = 1.0) -> tuple[int, int]:
    """The degree ``m ∈ _HIGH`` and squarings ``s`` from the largest finite 1-norms of ``A``'s powers
    ``P3``, ``P4`` (``α₃ = scale · max(‖P3‖^⅓, ‖P4‖^¼)`` over the batch) at unit roundoff ``u``: the
    fewest matrix products, then the fewest squarings."""
    if _values(A) is A:  # both 1-norms' finite maxima in one reduction and one read (no copy of the powers)
        n3, n4 = _finite_max(_norms34(P3, P4), dim=1).tolist()
    else:  # under vmap the batch dimensions may sit anywhere in the plain tensor: one read each
        n3, n4 = (_read_max(_colnorm1(P)) for P in (P3, P4))
    return _pick_degree(max(n3 ** (1.0 / 3.0), n4**0.25) * scale, u)


def _pick_degree(alpha: float, u: float) -> tuple[int, int]:
    """The degree ``m ∈ _HIGH`` and squarings ``s`` for ``α₃ = alpha``: the fewest matrix products, then
    the fewest squarings."""
    # α of a float64 generator within a factor ~n of the largest float overflows a Python float (and
    # α/θ_m does earlier): an OverflowError from ceil(inf) escaped every chart. Any α past 2¹⁰⁰⁰ is far
    # beyond Note [Too far to be a point] (u·α > 1/64 from α ≈ 1.4e14 in float64), whose NaN it gets
    alpha = min(alpha, 2.0**1000)
    best = None
    for m in _HIGH:
        th = _theta(m, u)
        s = max(0, math.ceil(math.log2(alpha / th))) if alpha > th else 0
        key = (_products(m) + s, s)
        if best is None or key < best[0]:
            best = (key, m, s)
    assert best is not None
    return best[1], best[2]


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y``; ``mm``/``bmm`` where both are 2-D, or 3-D with one batch size. On 3-D tensors ``@``
    is four ops (expand, view, bmm, view) and its backward more: at the sizes of a rank chart's
    frames (8×8) the ops cost more than the product."""
    if X.ndim == Y.ndim == 3 and X.shape[0] == Y.shape[0]:
        return torch.bmm(X, Y)
    return X @ Y


def _mm_add(C: Tensor, X: Tensor, Y: Tensor, alpha: float = 1.0) -> Tensor:
    """``C + alpha · X @ Y``, fused (one op, one pass fewer over memory) when the shapes allow."""
    if C.ndim == X.ndim == Y.ndim == 2:
        return torch.addmm(C, X, Y, alpha=alpha)
    if C.ndim == X.ndim == Y.ndim == 3 and C.shape[0] == X.shape[0] == Y.shape[0]:
        return torch.baddbmm(C, X, Y, alpha=alpha)
    return C + X @ Y if alpha == 1.0 else C + alpha * (X @ Y)


def _mm_add_(C: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """``C + X @ Y`` into ``C`` (a fresh buffer) where the shapes allow, else :func:`_mm_add`."""
    if C.ndim == X.ndim == Y.ndim == 2:
        return C.addmm_(X, Y)
    if C.ndim == X.ndim == Y.ndim == 3 and C.shape[0] == X.shape[0] == Y.shape[0]:
        return C.baddbmm_(X, Y)
    return _mm_add(C, X, Y)


def _add_identity(X: Tensor, c: float, inplace: bool) -> Tensor:
    if c == 0.0:
        return X
    if inplace:
        X.diagonal(dim1=-2, dim2=-1).add_(c)
        return X
    return X + c * _eye(X)


def _block(coef: list[float], P: list[Any], inplace: bool) -> Tensor:
    """``Σ_j coef[j] P[j]`` with ``P[0] = I`` (``len(coef) ≥ 2``): one pass per term."""
    out = P[1] * coef[1]
    for j in range(2, len(coef)):
        out = out.add_(P[j], alpha=coef[j]) if inplace else out.add(P[j], alpha=coef[j])
    return _add_identity(out, coef[0], inplace)


def _coefs(m: int) -> list[float]:
    return [1.0 / math.factorial(j) for j in range(m + 1)]


def _powers(B: Tensor, q: int) -> list[Any]:
    """``[None, B, B², ..., B^q]`` for q ≤ 4 (B⁴ = B² B²)."""
    P: list[Any] = [None, B]
    if q >= 2:
        P.append(_mm(B, B))
    if q >= 3:
        P.append(_mm(P[2], B))
    if q >= 4:
        P.append(_mm(P[2], P[2]))
    return P


# Note [Low degrees and NaN]
# The degree choice reads a matrix with a NaN/inf entry as norm 0 (_finite_max: it must not change the
# degree of its finite neighbours), so a lone non-finite matrix, or one among small neighbours, gets a
# low degree: T_1(B) = I + B is NaN only at B's own NaN entries (a plausible point elsewhere), and its
# adjoint is G itself, which reads nothing of B: finite gradients for a NaN input. From degree 4 on,
# the products with B² (whose NaN rows and columns spread to every entry) make the value and the
# adjoint NaN across the whole matrix. So degrees ≤ _MIX_DEGREE add, to the value and to the adjoint,
# 0 per matrix (NaN where B is not finite): one sum over B and one add, on the cheapest evaluations
# (m ≤ 2 means ‖B‖₁ ≤ θ₂ for every finite matrix of the batch, so the sum cannot overflow there).
_MIX_DEGREE = 2


def _poisoned(X: Tensor, B: Tensor, inplace: bool) -> Tensor:
    """``X + poison(B)``: 0 per matrix, NaN where ``B`` has a non-finite entry (Note [Low degrees and
    NaN]). ``inplace``: ``X`` is a fresh buffer."""
    from ._linalg import poison  # (geofunc._linalg imports this module)

    p = poison(B)
    return X.add_(p) if inplace else X + p


def _evaluate(A: Tensor, m: int, s: int, pre: Any = None, inplace: bool = False, chosen: int | None = None) -> tuple[Tensor, dict]:
    """``T_m(A/2^s)^(2^s)`` and the intermediates the derivatives need (torch ops only); a matrix of a
    batch that needs fewer squarings at degree ``chosen`` (the degree ``s`` was chosen for, default
    ``m``) skips the others (Note [Squarings per matrix])."""
    # Note [Traced by make_fx], Note [In place under a dispatch mode]
    inplace = inplace and not make_fx_tracing() and not dispatch_mode_active()
    q = _Q[m]
    if pre is not None:
        t, Pt = pre
        sc = 2.0 ** (t - s)
        P: list[Any] = [None] + [Pt[j - 1] * sc**j if sc != 1.0 else Pt[j - 1] for j in range(1, q + 1)]
    else:
        B = A * 2.0**-s if s else A
        P = _powers(B, q)
    far = _far(P, m, s, A.dtype)
    skip, lead = _skips(P, m if chosen is None else chosen, s)
    if skip is not None:  # Note [Squarings per matrix]: B_i = A_i / 2^(s − skip_i), exact
        if lead * (len(P) - 1) < _HALF_EXPONENT.get(_real(A.dtype), 8):
            up = torch.exp2(skip)
            P = [None] + [P[j] * up**j for j in range(1, len(P))]
        else:  # Note [Skips past the exponent range]
            P = _powers(A * torch.exp2(skip - s), q)
            skip, far = _skips_again(P, m if chosen is None else chosen, s, skip, far)
            P = _powers(A * torch.exp2(skip - s), q)
    X, Hs = _taylor(P, m, inplace)
    if m <= _MIX_DEGREE:  # Note [Low degrees and NaN]
        X = _poisoned(X, P[1], inplace)
    Xs = []
    for k in range(s):
        Xs.append(X)
        X = _mm(X, X) if k >= lead else torch.where(skip <= k, _mm(X, X), X)
    if far is not None:  # Note [Too far to be a point]
        X = X.mul_(far) if inplace else X * far
    return X, {"P": P, "Hs": Hs, "Xs": Xs, "far": far, "skip": skip, "lead": lead}


# Note [Squarings per matrix]
# The degree m and the squarings s are chosen for the batch's largest generator (one choice, read
# once). Squaring is where the rounding grows: each squaring doubles the error of the scaled
# exponential, so a matrix squared k times more than its own norm needs carries ~2^k times its own
# error. With s for the batch, one large generator in a batch (an ensemble member that diverged,
# the U frame of a rank chart beside a small V) spoiled every other: float32 SO(6) at raw scale 1
# beside one at 1e4 came out 6.6e-4 off orthogonality (alone 2.4e-7), outside contains' tolerance,
# and vmap over members differed from a loop over them by that much. So each matrix takes only the
# squarings its own α_i = max(‖A_i³‖₁^⅓, ‖A_i⁴‖₁^¼) needs at degree m, s_i = ⌈log₂(α_i/θ_m)⌉ in
# [0, s] (as the static schedule's, Note [Static schedule]): it is scaled by 2^−s_i instead of
# 2^−s (the powers by 2^((s−s_i)j), exact), skips the first skip_i = s − s_i squarings
# (torch.where, as the static schedule discards its surplus ones), and the adjoint and the tangent
# pass through the skipped ones unchanged. Every matrix then meets the same bound at degree m as
# it would alone. Only where s > 0 and some matrix of a batch needs fewer (the largest skip read once
# per call, and only the squarings before it select: the others are plain; nothing changes, bit for
# bit, where no matrix skips; while make_fx traces, torch.func.linearize's jvp, nothing is read and
# every squaring selects: the same values); a NaN/inf matrix keeps s. Cost: nothing at s = 0 or for one matrix;
# ~10 small ops and one read for a batch at s > 0 (~5 up to 64 plain matrices: Note [Squarings per
# matrix read in one transfer]); a torch.where per selecting squaring (forward, adjoint, tangent)
# where some matrix skips. Measured on a quiet box (SO(16), 8 matrices, float32 forward and backward,
# 1 thread, best of 15×50 calls): 515 → 555 µs where the raw scales are alike (3.0: some matrices
# skip one squaring), 564 → 748 µs where they spread (0.1 to 10); a rebased step (s = 0) and one
# matrix unchanged.
def _skips(P: list[Any], m: int, s: int) -> tuple[Tensor | None, int]:
    """``(skip, lead)``: per matrix (…, 1, 1) the number of leading squarings it skips (Note [Squarings
    per matrix]) and the largest, or ``(None, 0)`` where none skips; ``P`` the powers of ``A/2^s``."""
    # (the matrices counted in the plain tensor: under vmap a logical matrix is one of a batch, and the
    # op chain of Note [Op chain under torch.func] evaluates it there with the batch's s)
    if s == 0 or len(P) < 5 or _values(P[1]).numel() < 2 * P[1].shape[-1] * P[1].shape[-2]:
        return None, 0
    u = _UNIT_ROUNDOFF[_real(P[1].dtype)]
    with torch.no_grad():
        batch = P[1].shape[:-2]
        if batch.numel() <= _SKIPS_IN_PYTHON and _values(P[1]) is P[1] and not make_fx_tracing() and not torch.compiler.is_compiling():
            return _skips_read(P, m, s, u, batch)
        alpha = _alpha3(P[3], P[4])  # α_i / 2^s
        need = torch.ceil(torch.log2(alpha / _theta(m, u))) + s  # s_i, −inf at A_i = 0, NaN if not finite
        skip = s - need.nan_to_num(s, s, 0).clamp(0, s)
        if make_fx_tracing() or torch.compiler.is_compiling():  # nothing to read: every squaring selects
            return skip[..., None, None], s
        lead = int(_values(skip).max())
        return (skip[..., None, None], lead) if lead else (None, 0)


# Note [Skips past the exponent range]
# Rescaling the powers of A/2^s by 2^(skip_i·j) is exact only while both stay in the exponent range:
# a matrix that skips many squarings beside a huge one (float32: one generator at 1e10 beside ones
# at 0.1, s = 32) has powers A_i^j/2^(sj) that are subnormal or 0 and factors 2^(skip_i·j) that are
# inf (2^128), so every matrix of the batch came out NaN (or its powers lost their bits), where alone
# each was a rotation: one diverged entry of an optimizer's stacked batch (Note [Stacked entries] in
# geofunc/_pytree.py) poisoned its neighbours. Past half the exponent range the powers are recomputed
# from A_i/2^(s − skip_i) (exact: a power of 2), q − 1 more products, only in that rare case (half the
# exponent range: 512 in float64, 64 in float32 and bfloat16, 8 in float16). There a small matrix's
# A_i³/2^(3s) and A_i⁴/2^(4s) may underflow to 0 too, so _skips read it as a zero matrix that skips
# every squaring (float32: generators at 3 beside one at 1e20 came out 1e7 off orthogonality, finite,
# where they had been NaN): the skips are read again from the recomputed powers (for a matrix read
# as 0, skip_i = s: the powers of A_i itself), and the powers recomputed once more; α_i is read there
# too for Note [Too far to be a point] (one at 1e7 beside one at 1e30, float32: NaN alone, was a
# finite point 0.5 off orthogonality once its squarings were right).
def _skips_again(P: list[Any], m: int, s: int, skip: Tensor, far: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(skip, far)`` read again from the powers of ``A_i/2^(s − skip_i)`` (Note [Skips past the exponent
    range]): a matrix whose powers of ``A/2^s`` underflowed read as 0, skipped every squaring and was
    never too far (Note [Too far to be a point])."""
    u = _UNIT_ROUNDOFF[_real(P[1].dtype)]
    with torch.no_grad():
        alpha = _alpha3(P[3], P[4])  # α_i / 2^(s − skip_i)
        more = torch.ceil(torch.log2(alpha / _theta(m, u)))
        more = more.nan_to_num(0.0, 0.0, 0.0).clamp(min=0)  # NaN/inf matrices already keep every squaring
        ok = ~(alpha * torch.exp2(s - skip[..., 0, 0]) * u > _FAR)
        far_again = _one_or_nan(ok, P[1].dtype)[..., None, None]
        return (skip - more[..., None, None]).clamp(min=0), far_again if far is None else far * far_again


_HALF_EXPONENT = {d: (int(math.log2(torch.finfo(d).max)) + 1) // 2
                  for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


# Note [Squarings per matrix read in one transfer]
# For a plain batch of up to _SKIPS_IN_PYTHON matrices, _skips reads the two 1-norms of each matrix in
# one reduction and one transfer and computes s_i in Python, as the degree choice does for the batch
# (_high_degree): ~5 ops and one read where the tensor expression took ~17 (~85 µs of a 520 µs SO(16)
# forward and backward of 8 matrices, float32, 1 thread), and no tensor at all where no matrix skips.
# The same rule (non-finite norms keep s, a zero matrix skips all); s_i from float64 arithmetic on
# the norms, as the degree choice's for a matrix alone.
_SKIPS_IN_PYTHON = 64


def _skips_read(P: list[Any], m: int, s: int, u: float, batch: torch.Size) -> tuple[Tensor | None, int]:
    norms = _norms34(P[3], P[4]).tolist()
    th = _theta(m, u)
    skips = []
    for n3, n4 in zip(*norms):
        if not (math.isfinite(n3) and math.isfinite(n4)):
            skips.append(0)
            continue
        alpha = max(n3 ** (1.0 / 3.0), n4**0.25)
        need = min(max(math.ceil(math.log2(alpha / th)) + s, 0), s) if alpha > 0 else 0
        skips.append(s - need)
    lead = max(skips)
    if not lead:
        return None, 0
    skip = torch.tensor(skips, dtype=_real(P[1].dtype), device=P[1].device).reshape(*batch, 1, 1)
    return skip, lead


# Note [Too far to be a point]
# Scaling and squaring has a backward error of ~u per unit of ‖A‖ (relative, Higham's criterion), and
# for a skew generator the s squarings double the orthogonality error of T_m(A/2^s) each time: the
# result is off its group by ~u·α (α ≈ θ_m 2^s), like torch.linalg.matrix_exp's. Past u·α = 1/64
# (float32: α ≈ 2.6e5, raw scales ~1e5; float64: α ≈ 1.4e14) the "point" is off by more than 1%,
# and soon finite noise: SO(6) at raw scale 1e8 in float32 was 6e3 off, at 1e16 in float64 2 off
# (Stiefel 20×4 in float32 at 1e5: 0.1). There every matrix of the batch whose own
# α_i = 2^s max(‖B_i³‖₁^⅓, ‖B_i⁴‖₁^¼) is that far gets NaN (value, adjoint and tangent: a factor,
# NaN or 1, per matrix), as the static schedule gives NaN beyond its bound (Note [Static schedule]):
# never a finite wrong point. Below that bound (float32 raw norms ~1e3 to 1e5) points are off the
# manifold by ~u·α, as README's "Extreme raw scales" says. Cost: nothing unless s is that large.
_FAR = 2.0**-6


def _far(P: list[Any], m: int, s: int, dtype: torch.dtype) -> Tensor | None:
    """None, or per matrix 1 (finite) or NaN where ``u·α_i > _FAR`` (Note [Too far to be a point])."""
    u = _UNIT_ROUNDOFF[_real(dtype)]
    if s == 0 or u * 2.0**s * _theta(m, u) <= _FAR or len(P) < 5:
        return None
    with torch.no_grad():
        alpha = _alpha3(P[3], P[4]) * 2.0**s
        return _one_or_nan(~(alpha * u > _FAR), P[1].dtype)[..., None, None]


def _one_or_nan(ok: Tensor, dtype: torch.dtype) -> Tensor:
    """1 where ``ok``, NaN elsewhere, in the real dtype of ``dtype`` (a factor that multiplies a tensor of
    ``dtype`` without promoting it): ``ok / ok``, 0/0 being NaN. No ``where``, whose presence in a
    compiled graph the tests read as the static schedule's. The guards that keep a map from returning
    a finite point far off its space (here, and in geofunc/_linalg.py) multiply by it."""
    f = ok.to(_real(dtype))
    return f / f


def _taylor(P: list[Any], m: int, inplace: bool = False) -> tuple[Tensor, list[Tensor]]:
    """``T_m(B)`` from the powers ``P = [None, B, …, B^q]`` and the Horner left factors.

    Paterson–Stockmeyer with ``q | m``: ``C_i = Σ_{j<q} c_{iq+j} B^j``,
    ``H_{r-1} = C_{r-1} + c_m B^q``, ``H_i = C_i + H_{i+1} B^q`` down to ``H_0 = T_m(B)``.
    ``inplace`` (plain tensors, no graph being built) saves memory passes.
    """
    q = _Q[m]
    c = _coefs(m)
    r = m // q
    if q == 1:  # m = 1: I + B
        H = _add_identity(P[1] * 1.0, 1.0, inplace)
    else:
        top = c[(r - 1) * q : r * q] + [c[m]]
        H = _block(top, P, inplace)
    Hs: list[Tensor] = []  # left factors of the Horner products, in forward order
    for i in range(r - 2, -1, -1):
        Hs.append(H)
        blk = _block(c[i * q : (i + 1) * q], P, inplace)
        H = _mm_add_(blk, H, P[q]) if inplace else _mm_add(blk, H, P[q])
    return H, Hs


def _adjoint(cache: dict, G: Tensor, m: int, s: int, inplace: bool = False) -> Tensor:
    """The gradient of ``⟨G, T_m(A/2^s)^(2^s)⟩`` with respect to ``A`` (reverse of :func:`_evaluate`;
    ``⟨G, X⟩ = Re tr(GᴴX)``, Note [Complex]).

    ``inplace`` accumulates into fresh buffers (only when no graph is being built).
    """
    # Note [Traced by make_fx], Note [In place under a dispatch mode]
    inplace = inplace and not make_fx_tracing() and not dispatch_mode_active()
    q = _Q[m]
    P, Hs, Xs = cache["P"], cache["Hs"], cache["Xs"]
    skip, lead = cache.get("skip"), cache.get("lead", 0)
    for k in range(len(Xs) - 1, -1, -1):
        Xt = Xs[k].mH
        G = _mm_add(_mm(G, Xt), Xt, G) if k >= lead else torch.where(skip <= k, _mm_add(_mm(G, Xt), Xt, G), G)
    c = _coefs(m)
    r = m // q
    GP: list[Any] = [None] * (q + 1)

    def acc(j: int, val: Tensor, alpha: float = 1.0) -> None:
        if GP[j] is None:
            GP[j] = val * alpha if (alpha != 1.0 or inplace) else val
        elif inplace:
            GP[j].add_(val, alpha=alpha)
        else:
            GP[j] = GP[j].add(val, alpha=alpha)

    def acc_mm(j: int, X: Tensor, Y: Tensor) -> None:
        GP[j] = _mm(X, Y) if GP[j] is None else _mm_add(GP[j], X, Y)

    # each power's transpose taken once (a view, but an op each time: at 8×8 the ops are the cost)
    Pqt = P[q].mH if Hs else None
    P1t = P[1].mH if q >= 2 else None
    P2t = P[2].mH if q >= 3 else None
    GH = G  # gradient with respect to H_i, i = 0, 1, ...
    for k in range(len(Hs) - 1, -1, -1):
        i = r - 2 - k
        for j in range(1, q):
            acc(j, GH, c[i * q + j])
        acc_mm(q, Hs[k].mH, GH)
        GH = _mm(GH, Pqt)
    for j in range(1, q):  # H_{r-1} = C_{r-1} + c_m B^q
        acc(j, GH, c[(r - 1) * q + j])
    acc(q, GH, c[m])
    if q >= 4:
        acc_mm(2, GP[4], P2t)
        acc_mm(2, P2t, GP[4])
    if q >= 3:
        acc_mm(2, GP[3], P1t)
        acc_mm(1, P2t, GP[3])
    if q >= 2:
        acc_mm(1, GP[2], P1t)
        acc_mm(1, P1t, GP[2])
    G1 = GP[1]
    if m <= _MIX_DEGREE:  # Note [Low degrees and NaN]: the adjoint of I + B (+ B²/2) reads little or nothing of B
        G1 = _poisoned(G1, P[1], inplace and G1 is not G)
    if cache.get("far") is not None:  # Note [Too far to be a point]
        G1 = G1 * cache["far"]
    if skip is not None:  # Note [Squarings per matrix]: dB_i/dA_i = 2^−(s − skip_i)
        return G1 * torch.exp2(skip - s)
    return G1 * 2.0**-s if s else G1


def _tangent(cache: dict, E: Tensor, m: int, s: int) -> Tensor:
    """The Fréchet derivative of ``T_m(A/2^s)^(2^s)`` in the direction ``E`` (forward mode)."""
    q = _Q[m]
    P, Hs, Xs = cache["P"], cache["Hs"], cache["Xs"]
    skip, lead = cache.get("skip"), cache.get("lead", 0)
    if skip is not None:  # Note [Squarings per matrix]
        dB = E * torch.exp2(skip - s)
    else:
        dB = E * 2.0**-s if s else E
    dP: list[Any] = [None, dB]
    if q >= 2:
        dP.append(_mm_add(_mm(dB, P[1]), P[1], dB))
    if q >= 3:
        dP.append(_mm_add(_mm(dP[2], P[1]), P[2], dB))
    if q >= 4:
        dP.append(_mm_add(_mm(dP[2], P[2]), P[2], dP[2]))
    c = _coefs(m)
    r = m // q

    def dblock(i: int) -> Tensor:
        out = c[i * q + 1] * dP[1] if q > 1 else None
        for j in range(2, q):
            out = out + c[i * q + j] * dP[j]
        return out

    dH = c[m] * dP[q]
    if q > 1:
        dH = dH + dblock(r - 1)
    for k, i in enumerate(range(r - 2, -1, -1)):
        dH = _mm_add(_mm(dH, P[q]), Hs[k], dP[q])
        if q > 1:
            dH = dH + dblock(i)
    dX = dH
    for k, X in enumerate(Xs):
        dX = _mm_add(_mm(dX, X), X, dX) if k >= lead else torch.where(skip <= k, _mm_add(_mm(dX, X), X, dX), dX)
    if cache.get("far") is not None:  # Note [Too far to be a point]
        dX = dX * cache["far"]
    return dX


def _derivative_degree(m: int) -> int:
    """Degree for derivative rules that may themselves be differentiated.

    ``m`` is chosen so that ``T_m`` and its first derivative are exact to rounding, but
    the k-th derivative of ``T_m`` errs by ~``θ^(m+1-k)/(m+1-k)!``: the second derivative
    of ``T_1(A) = I + A`` is 0, not ``(EF + FE)/2``. Rules that build a graph (double
    backward, ``torch.func``, forward mode) therefore use 4 more degrees (at least 8),
    which makes the second derivative as accurate as the first.
    """
    return 8 if m < 8 else min(m + 4, _HIGH[-1])


class _Holder:
    """Carries (m, s, intermediates) from ``forward`` to ``setup_context`` (not a pytree node,
    so functorch passes the same object through to both)."""

    __slots__ = ("m", "s", "cache")


# Note [Intermediates as saved tensors]
# The adjoint reuses the forward's powers, Horner steps and squarings (~10 n×n matrices at a
# rebased generator, more with squarings). Kept on a context attribute, they were invisible to
# torch.autograd.graph.saved_tensors_hooks: activation checkpointing (use_reentrant=False), which
# frees what the hooks pack and recomputes it in backward, freed none of them (SO(128)'s chart held
# 10 n×n matrices per call with or without it; torch.linalg.matrix_exp's none), and save_on_cpu left
# them on the accelerator. In plain autograd they are saved through ctx.save_for_backward (a flat
# list and its layout), so every hook sees them and autograd checks their versions. Under
# torch.func transforms, where a Function may save only its inputs and outputs and the vmap rules
# share the holder between levels, the holder keeps them as before.
def _flat_cache(cache: dict) -> tuple[list, tuple]:
    """The tensors of an evaluation's intermediates, in order, and the layout :func:`_cache_of` rebuilds them from."""
    P, Hs, Xs, far, skip = cache["P"], cache["Hs"], cache["Xs"], cache.get("far"), cache.get("skip")
    flat = [*P[1:], *Hs, *Xs] + ([] if far is None else [far]) + ([] if skip is None else [skip])
    return flat, (len(P) - 1, len(Hs), len(Xs), far is not None, skip is not None, cache.get("lead", 0))


def _cache_of(flat: list, layout: tuple) -> dict:
    nP, nH, nX, far, skip, lead = layout
    rest = flat[nP + nH + nX:]
    return {"P": [None, *flat[:nP]], "Hs": list(flat[nP:nP + nH]), "Xs": list(flat[nP + nH:nP + nH + nX]),
            "far": rest[0] if far else None, "skip": rest[-1] if skip else None, "lead": lead}


class _Expm(torch.autograd.Function):
    @staticmethod
    def forward(A: Tensor, holder: _Holder) -> Tensor:  # type: ignore[override]
        m, s, pre = choose_degree(A)
        X, cache = _evaluate(A, m, s, pre, inplace=True)
        holder.m, holder.s, holder.cache = m, s, cache
        return X

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        A, holder = inputs
        ctx.m, ctx.s = holder.m, holder.s
        if torch._C._functorch.peek_interpreter_stack() is None:  # Note [Intermediates as saved tensors]
            flat, ctx.layout = _flat_cache(holder.cache)
            ctx.holder = None
            ctx.save_for_backward(A, *flat)
        else:
            ctx.holder = holder
            ctx.save_for_backward(A)
        ctx.save_for_forward(A)

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        A, *flat = ctx.saved_tensors
        holder = ctx.holder
        if holder is None:
            holder = _Holder()
            holder.cache = _cache_of(flat, ctx.layout)
        if torch.autograd.forward_ad._current_level >= 0 and torch._C._functorch.peek_interpreter_stack() is None:
            return _adjoint_chain(A, G, ctx.m, ctx.s), None  # Note [Adjoint under a dual level]
        if not torch.is_grad_enabled():
            return _adjoint(holder.cache, G, ctx.m, ctx.s, inplace=True), None
        # Building a graph (double backward, and every torch.func grad/vjp, which always do):
        # the adjoint is one node whose value reuses the forward's intermediates and whose own
        # derivatives differentiate the evaluation (Note [Adjoint node]).
        return _ExpmAdjoint.apply(A, G, ctx.m, ctx.s, holder), None

    @staticmethod
    def jvp(ctx: Any, E: Tensor, _holder: Any) -> Tensor:  # type: ignore[override]
        (A,) = ctx.saved_tensors
        m = _derivative_degree(ctx.m)
        _, cache = _evaluate(A, m, ctx.s, chosen=ctx.m)
        return _tangent(cache, E, m, ctx.s)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, A: Tensor, holder: _Holder) -> tuple[Tensor, Any]:
        d = in_dims[0]
        if d is None:
            return _Expm.apply(A, holder), None  # pragma: no cover (one tensor input: always batched)
        # The same holder: an outer transform's setup_context reads (m, s) chosen here.
        return _Expm.apply(A.movedim(d, 0), holder), 0


# Note [Adjoint node]
# torch.func.grad/vjp always run backward rules with create_graph, so a backward written in
# differentiable torch ops is recorded op by op (and, to make second derivatives exact, had to
# re-evaluate the exponential from A at a higher degree). Instead the adjoint is itself one
# autograd.Function of (A, G): its value is the plain adjoint of the forward evaluation, from the
# intermediates the forward left in the holder (viewed with the dims of size 1 that its vmap rule
# gives an unbatched A, Note [Adjoint vmap rule]; recomputed for any other batch layout), and only
# its own derivatives (asked for by double backward, MAML, hessian) run the differentiable chain
# ``adjoint(evaluate(A, m'), G)`` at the derivative degree m' (through torch.func.vjp / jvp, so
# they compose to every order).


# Note [Adjoint derivatives under saved-tensor hooks]
# The adjoint node's backward differentiates the chain by torch.func.vjp, which refuses to run while any
# saved-tensor hooks are active (torch.func.{grad, vjp, ...} "don't yet support saved tensor hooks"): a
# second-order backward (a Hessian-vector product, MAML or a gradient penalty by plain autograd) run inside
# save_on_cpu, a user's saved_tensors_hooks or a checkpoint's hooks raised that error, though the user
# called no torch.func transform (torch.linalg.matrix_exp's double backward runs there). In plain autograd
# under hooks the same chain is differentiated by torch.autograd.grad (the same ops and formulas; a graph
# where grad mode is on, as vjp's): _vjp. So also the compiled operators' (Notes [Compiled exponential]
# and [Compiled frame exponential]), whose Autograd kernels run eagerly wherever the traced graph does
# (torch.compile(backend="eager"), a make_fx or torch.export graph called with autograd): their adjoints'
# own derivatives, and their adjoint under a dual level, are torch.func.vjp of the static schedule.


def _vjp(f: Any, primals: tuple, cotangents: Any) -> tuple:
    """``torch.func.vjp(f, *primals)[1](cotangents)``; in plain autograd under saved-tensor hooks the same
    by torch.autograd.grad (Note [Adjoint derivatives under saved-tensor hooks]): a graph where grad mode
    is on, zeros for a primal ``f`` does not read, the primals' forward tangents kept."""
    if not (saving_hooks() and torch._C._functorch.peek_interpreter_stack() is None):
        return torch.func.vjp(f, *primals)[1](cotangents)
    higher = torch.is_grad_enabled()
    with torch.enable_grad():
        xs = [x.view_as(x) for x in primals]
        xs = [x if x.requires_grad else x.requires_grad_() for x in xs]
        return torch.autograd.grad(f(*xs), xs, cotangents, create_graph=higher, allow_unused=True,
                                   materialize_grads=True)

# Note [Adjoint under a dual level]
# The adjoint node's jvp rule runs torch.func.jvp of the chain, which opens a dual level of its own:
# under a torch.func transform that nests, but under a dual level of torch.autograd.forward_ad
# (forward over reverse: a Hessian-vector product as the tangent of loss.backward(create_graph=True),
# gradgradcheck's check_fwd_over_rev) torch refuses a second one, and every map through the
# exponential (SO, Stiefel, LowRank, PSD, ...) raised 'Nested forward mode AD is not supported'.
# There the adjoint is the chain itself, as torch ops: the dual level records their tangents (A and G
# come back from the saved tensors with theirs) and their graph serves any later backward. So also
# where the backward builds no graph (torch.autograd.grad(loss, A) without create_graph, under a dual
# level): the plain adjoint of the forward's intermediates, which carry no tangents, gave the gradient
# a tangent without the exponential's second derivative (SO 2.7 off, GLp 4.0, PSD 1.6; Grassmannian
# and LowRank alike), where torch.linalg.matrix_exp gives the exact one.


# Note [Adjoint vmap rule]
# The adjoint node is batched over leading dimensions and broadcasts A against G, so its vmap rule
# moves each batched operand's dim to the front and expands an unbatched G. An unbatched A (jacrev:
# a batch of cotangents G of one A) is not expanded: it gets a dim of size 1 at the front, its
# intermediates are those of the forward (the holder's, viewed with the 1s: _cache_for) and broadcast
# against the batch of G. A dim of size 1, not none: A and G must keep one rank, each level's dim at
# the same place in both, for the next (outer) level's rule to line them up. With A left (n, n)
# against G's (K, n, n), an outer vmap (vmap(jacrev): per-sample Jacobians) put its dim B in front
# of both and (B, n, n) met (B, K, n, n) from the right, B against K: wrong numbers where B == K,
# a shape error elsewhere (fixed; tests/test_vmap_rules.py). Under forward mode (hessian =
# jacfwd(jacrev)) an unbatched A is expanded to the batch, whose tangent of the output must have
# the batched output's shape. The custom operators' rules (Note [Compiled exponential]) expand
# every unbatched operand (_front): one rank too.


def _adjoint_value(cache: dict, G: Tensor, m: int, s: int) -> Tensor:
    """:func:`_adjoint` of plain tensors, no graph built, as a new tensor (m = 1: the adjoint is G itself)."""
    out = _adjoint(cache, G, m, s, inplace=not G._is_zerotensor())  # ZeroTensors are immutable
    return out.clone() if out is G else out


def _adjoint_chain(A: Tensor, G: Tensor, m: int, s: int) -> Tensor:
    """The adjoint as differentiable torch ops, at the derivative degree of ``m``."""
    d = _derivative_degree(m)
    return _adjoint(_evaluate(A, d, s, chosen=m)[1], G, d, s)


def _cache_for(cache: dict | None, A: Tensor) -> dict | None:
    """The forward's intermediates ``cache`` as those of ``A``, or None (then recomputed). ``A`` may be
    the forward's input with dims of size 1 inserted in its batch (Note [Adjoint vmap rule]): the
    same matrices, in the same order (the vmap rules put each level's dim in front, outer levels
    first, in the forward and in the adjoint alike), so the intermediates are viewed with A's batch
    shape. Any other batch layout (forward mode's expanded A) recomputes them."""
    if cache is None:
        return None
    shape = cache["P"][1].shape
    if shape == A.shape:
        return cache
    if shape[-2:] != A.shape[-2:] or [d for d in shape[:-2] if d != 1] != [d for d in A.shape[:-2] if d != 1]:
        return None
    batch = A.shape[:-2]

    def fit(X: Tensor) -> Tensor:
        return X.reshape(*batch, *X.shape[-2:])

    far, skip = cache.get("far"), cache.get("skip")
    return {"P": [None] + [fit(X) for X in cache["P"][1:]], "Hs": [fit(X) for X in cache["Hs"]],
            "Xs": [fit(X) for X in cache["Xs"]], "far": None if far is None else fit(far),
            "skip": None if skip is None else fit(skip), "lead": cache.get("lead", 0)}


class _ExpmAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(A: Tensor, G: Tensor, m: int, s: int, holder: _Holder) -> Tensor:  # type: ignore[override]
        cache = _cache_for(holder.cache, A)
        if cache is None:
            cache = _evaluate(A, m, s, inplace=True)[1]
        return _adjoint_value(cache, G, m, s)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        A, G, ctx.m, ctx.s, _ = inputs
        ctx.save_for_backward(A, G)
        ctx.save_for_forward(A, G)

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, H: Tensor) -> tuple:  # type: ignore[override]
        A, G = ctx.saved_tensors
        return (*_vjp(lambda A, G: _adjoint_chain(A, G, ctx.m, ctx.s), (A, G), H), None, None, None)

    @staticmethod
    def jvp(ctx: Any, dA: Tensor, dG: Tensor, *_: Any) -> Tensor:  # type: ignore[override]
        A, G = ctx.saved_tensors
        dA = torch.zeros_like(A) if dA is None else dA
        dG = torch.zeros_like(G) if dG is None else dG
        return torch.func.jvp(lambda A, G: _adjoint_chain(A, G, ctx.m, ctx.s), (A, G), (dA, dG))[1]

    @staticmethod
    def vmap(info: Any, in_dims: tuple, A: Tensor, G: Tensor, m: int, s: int, holder: _Holder) -> tuple[Tensor, int]:
        # Note [Adjoint vmap rule]: an unbatched A gets a dim of size 1 here (forward mode: the batch)
        dA, dG = in_dims[:2]
        if dA is not None:
            A = A.movedim(dA, 0)
        elif _forward_levels() > 0:
            A = A.expand(info.batch_size, *A.shape)
        else:
            A = A.unsqueeze(0)
        G = G.expand(info.batch_size, *G.shape) if dG is None else G.movedim(dG, 0)
        return _ExpmAdjoint.apply(A, G, m, s, holder), 0


def _plain(A: Tensor) -> bool:
    return _real(A.dtype) in _UNIT_ROUNDOFF and A.numel() > 0 and A.device.type != "meta"


def _forward_levels() -> int:
    """The number of ``torch.func`` forward-mode (jvp) levels active."""
    return _transforms().count("Jvp")


def _nested_forward_mode() -> bool:
    """Whether two or more ``torch.func`` forward-mode levels are active.

    PyTorch runs an ``autograd.Function``'s ``jvp`` without recording it at an outer
    forward-mode level, so ``jvp(jvp(...))`` (``jacfwd(jacfwd(...))``) of a custom Function
    silently loses the second-order term (checked on torch 2.13 with a one-line ``sin``
    Function). There, ``expm`` uses the static schedule (Note [Static schedule]): torch ops only,
    whose rules are exact.
    """
    return _forward_levels() >= 2


# Note [Static schedule]
# For tensor subclasses such as DTensor, whose values cannot be read into Python, under nested
# forward mode, for forward mode and the adjoint's own derivatives inside torch.compile (Note
# [Compiled exponential]), and inside torch.compile if the custom operators could not be
# registered, the degree and the squarings cannot be chosen by reading norms. There, every
# matrix gets a fixed degree (_STATIC_M: 16 in float32, 24 in float64, both θ ≈ 2.2–2.5) and a
# per-matrix number of squarings
# s = ⌈log₂(α₃/θ)⌉ ∈ [0, _STATIC_S] held in a tensor (α₃ from the powers A³, A⁴ that the
# evaluation needs anyway, B^j = A^j 2^(−sj) exact); the _STATIC_S squarings are all computed
# and the ones beyond s are discarded by torch.where. Same backward error bound (≤ u) as the
# eager choice for α₃ ≤ θ_m 2^_STATIC_S (float32: ≈ 2500, float64: ≈ 2300, i.e. far beyond any
# generator that rebase leaves); larger (or non-finite) inputs give NaN, never an inaccurate
# point. Pure torch ops: every transform differentiates it to all orders, and torch.compile
# traces it into one graph (no matrix_exp, whose backward is a 2n×2n exponential).
_STATIC_M = {torch.float32: 16, torch.float64: 24}
_STATIC_S = 10
_STATIC_THETA = {dtype: _theta(m, _UNIT_ROUNDOFF[dtype]) for dtype, m in _STATIC_M.items()}  # constants for the tracer


def _expm_static(A: Tensor) -> Tensor:
    """:func:`expm` with the tensor-only schedule of Note [Static schedule] (any transform, compile)."""
    m, theta = _STATIC_M[_real(A.dtype)], _STATIC_THETA[_real(A.dtype)]
    P = _powers(A, _Q[m])
    alpha = _alpha3(P[3], P[4])
    s = torch.ceil(torch.log2(alpha / theta)).clamp(0, _STATIC_S)  # NaN for a non-finite input
    sc = torch.exp2(-torch.nan_to_num(s))[..., None, None]
    X, _ = _taylor([None] + [P[j] * sc**j for j in range(1, len(P))], m)
    for i in range(_STATIC_S):
        X = torch.where(s[..., None, None] > i, X @ X, X)
    bad = ~(alpha <= theta * 2.0**_STATIC_S)  # too large, or NaN/inf
    # NaN by a factor (1 elsewhere, exact), not torch.where: the gradient and the tangent of a bad
    # matrix are then NaN too, where a where() would give them 0 (finite numbers for a NaN input)
    nan = torch.where(bad, torch.full_like(alpha, float("nan")), torch.ones_like(alpha))
    return X * nan[..., None, None]


# Note [Compiled exponential]
# Under torch.compile (plain tensors) the exponential is a custom operator, geofunc::expm, opaque
# to the compiler, whose kernel chooses the degree and the squarings from the values exactly as
# eager mode does. The compiled graph thus holds the fast exponential at the eager schedule and no
# data-dependent Python is traced (fullgraph=True holds: the branching happens inside the kernel,
# at run time). Where a backward is recorded, the forward is geofunc::expm_powers, which also
# returns the powers A_t², A_t³, A_t⁴ that the degree choice computed (an operator returns
# tensors, not the forward's intermediates), and the adjoint geofunc::expm_vjp(A, P, G) makes the
# same choice from them and re-evaluates only the Horner steps and squarings. At the README step's
# operating point (a rebased 128×128 generator: degree 8, no squaring) that is 4 products forward
# and 9 backward, where the static schedule, valid for any generator up to its bound, computes
# ~48. Measured (README step, inductor, 1 thread): compiled 3.7 → 2.3 ms and compile 60 → 30 s
# with the operators; reusing the powers, 2.02 → 1.81 ms (interleaved in one process).
# Autograd: each operator has a Python kernel at the Autograd key that applies a single-level
# Function (as functorch's own generated Functions are applied: the dispatcher reaches it with the
# tensors of functorch's current level; torch 2.13's register_autograd does not compose with
# torch.func, pytorch#168393), whose forward re-enables gradients below it so that lower functorch
# levels record the operator too (nested grad). With nothing to record (the compiled graph at run
# time) the kernel goes straight below autograd. The adjoint's own derivatives (double backward,
# hessian, MAML) and forward mode (a Function's jvp rule cannot nest torch.func.jvp) run the static
# schedule's torch ops (Note [Static schedule]), exact to every order. vmap: the kernels are
# batched over leading dimensions, so their vmap rules move the batch to the front and expand an
# unbatched operand to the batch (_front: every operand keeps one rank, Note [Adjoint vmap rule]).
# Measured and dropped: the static schedule for n ≤ 32 inside compile (fused by the compiler; a
# kernel's fixed cost is ~0.05 ms more at 2×8×8 alone): the README step, whose rank chart has two
# 8×8 exponentials, was 1.70 vs 1.71 ms (interleaved), so one path serves every size.


def _expm_kernel(A: Tensor) -> Tensor:
    """The values alone, no graph (the compiled operator's kernel; plain eager calls with nothing to record)."""
    m, s, pre = choose_degree(A)
    # contiguous, as the operators' fake kernels say: from a non-contiguous A the low degrees (I + A,
    # I + A + A²/2) keep A's strides, which a compiled graph would read with the fake's
    return _evaluate(A, m, s, pre, inplace=True)[0].contiguous()


def _expm_powers_kernel(A: Tensor) -> tuple[Tensor, Tensor]:
    """The exponential and ``(…, 3, n, n)``: the powers ``A_t², A_t³, A_t⁴`` its degree choice computed
    (zeros where the choice needed none: it is then made from ‖A‖₁ alone, again by the adjoint)."""
    m, s, pre = choose_degree(A)
    X = _evaluate(A, m, s, pre, inplace=True)[0]
    n = A.shape[-1]
    P = torch.stack(pre[1][1:], dim=-3) if pre is not None else A.new_zeros(*A.shape[:-2], 3, n, n)
    return X.contiguous(), P


def _expm_vjp_kernel(A: Tensor, P: Tensor, G: Tensor) -> Tensor:
    m, s, pre = choose_degree(A, P.unbind(-3))
    return _adjoint_value(_evaluate(A, m, s, pre, inplace=True)[1], G, m, s).contiguous()


def _static_vjp(A: Tensor, G: Tensor) -> Tensor:
    """The adjoint of the static schedule, as torch ops (derivatives of every order)."""
    return _vjp(_expm_static, (A,), G)[0]


def _front(x: Tensor, d: int | None, size: int) -> Tensor:
    return x.expand(size, *x.shape) if d is None else x.movedim(d, 0)


try:  # private (torch 2.13); absent: the custom operators are not registered (static schedule)
    from torch.autograd.forward_ad import _set_fwd_grad_enabled
except Exception:  # pragma: no cover (depends on the torch version)
    _set_fwd_grad_enabled = None


# The Autograd kernels of the custom operators (expm's and the frame chart's) apply single-level
# Functions: the dispatcher reaches them with the tensors of functorch's current level already
# unwrapped (Function.apply would re-enter functorch), as functorch's own generated Functions are
# applied. Forward mode (a jvp level, or a dual level of torch.autograd.forward_ad) takes the static
# schedule's torch ops, recorded there as a composite would be: a Function's jvp rule cannot nest
# torch.func.jvp, and forward mode over a Function loses the second-order term
# (_nested_forward_mode).
@contextlib.contextmanager
def _below_autograd() -> Any:
    """The kernel of the next dispatch key. Gradients back on (a Function's forward runs without
    them): below a functorch level, the lower levels record the op (nested grad, jacfwd)."""
    with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
        yield


def _jvp_level() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None and _forward_levels() > 0


def _forward_mode() -> bool:
    return torch.autograd.forward_ad._current_level >= 0 or _jvp_level()


def _no_graph(*ts: Tensor) -> bool:
    """Nothing to record (the compiled graph calls the op at run time with plain tensors)."""
    return not tracks_derivatives(*ts) and not _jvp_level()


def _register_ops(lib: Any, table: tuple) -> None:
    """Each ``(name, kernel, autograd kernel, fake kernel, vmap rule)`` of ``table`` on ``lib``'s operators."""
    for name, kernel, autograd_kernel, fake, vmap_rule in table:
        lib.impl(name, kernel, "CompositeExplicitAutograd")
        lib.impl(name, autograd_kernel, "Autograd")
        torch.library.register_fake(f"geofunc::{name}", fake, lib=lib)
        torch.library.register_vmap(f"geofunc::{name}", vmap_rule, lib=lib)


def _register_compiled_ops() -> bool:
    """Define geofunc::expm, expm_powers and expm_vjp (Note [Compiled exponential]); False where the
    private functorch names they need are missing (then compile takes the static schedule)."""
    try:
        from torch._functorch.utils import enable_single_level_autograd_function
        from torch.autograd.function import _SingleLevelFunction
    except Exception:  # pragma: no cover (depends on the torch version)
        return False
    if _set_fwd_grad_enabled is None:  # pragma: no cover (depends on the torch version)
        return False

    ops = torch.ops.geofunc
    if hasattr(ops, "expm_vjp"):  # this module imported again (importlib.reload): already registered
        return True

    class _CompiledExpm(_SingleLevelFunction):
        @staticmethod
        def forward(A: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            with _below_autograd():
                return ops.expm_powers(A)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
            ctx.mark_non_differentiable(output[1])
            ctx.save_for_backward(inputs[0], output[1])

        @staticmethod
        @backward_without_autocast
        def backward(ctx: Any, G: Tensor, _: Any) -> Tensor:  # type: ignore[override]
            A, P = ctx.saved_tensors
            return ops.expm_vjp(A, P, G)

    class _CompiledExpmVjp(_SingleLevelFunction):
        @staticmethod
        def forward(A: Tensor, P: Tensor, G: Tensor) -> Tensor:  # type: ignore[override]
            with _below_autograd():
                return ops.expm_vjp(A, P, G)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
            ctx.save_for_backward(inputs[0], inputs[2])

        @staticmethod
        @backward_without_autocast
        def backward(ctx: Any, H: Tensor) -> tuple[Tensor, None, Tensor]:  # type: ignore[override]
            A, G = ctx.saved_tensors
            dA, dG = _vjp(_static_vjp, (A, G), H)
            return dA, None, dG

    def expm_autograd(A: Tensor) -> Tensor:
        if _no_graph(A):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.expm(A)
        if _forward_mode():
            return _expm_static(A)
        with enable_single_level_autograd_function():
            return _CompiledExpm.apply(A)[0]

    def expm_powers_autograd(A: Tensor) -> tuple[Tensor, Tensor]:
        # only called below _CompiledExpm's level (a lower functorch level: nested grad), where the
        # forward-mode check above has already sent any forward mode to the static schedule
        if _no_graph(A):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.expm_powers(A)
        with enable_single_level_autograd_function():
            return _CompiledExpm.apply(A)

    def expm_vjp_autograd(A: Tensor, P: Tensor, G: Tensor) -> Tensor:
        if _no_graph(A, G):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.expm_vjp(A, P, G)
        if _forward_mode():
            return _static_vjp(A, G)
        with enable_single_level_autograd_function():
            return _CompiledExpmVjp.apply(A, P, G)

    def expm_vmap(info: Any, in_dims: tuple, A: Tensor) -> tuple[Tensor, int]:
        return ops.expm(_front(A, in_dims[0], info.batch_size)), 0

    def expm_powers_vmap(info: Any, in_dims: tuple, A: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        return ops.expm_powers(_front(A, in_dims[0], info.batch_size)), (0, 0)

    def expm_vjp_vmap(info: Any, in_dims: tuple, A: Tensor, P: Tensor, G: Tensor) -> tuple[Tensor, int]:
        n = info.batch_size
        return ops.expm_vjp(*(_front(x, d, n) for x, d in zip((A, P, G), in_dims))), 0

    def powers_like(A: Tensor) -> Tensor:
        return A.new_empty(*A.shape[:-2], 3, A.shape[-1], A.shape[-1])

    # To change an operator's schema or what its autograd kernel records, rename the operators:
    # inductor's on-disk cache keys a compiled backward on the Dynamo graph, which names only
    # geofunc::expm, so a warm cache would call the old schema.
    lib = torch.library.Library("geofunc", "DEF")  # noqa: TOR901 (lives as long as the module)
    lib.define("expm(Tensor A) -> Tensor")
    lib.define("expm_powers(Tensor A) -> (Tensor, Tensor)")
    lib.define("expm_vjp(Tensor A, Tensor P, Tensor G) -> Tensor")
    _register_ops(lib, (
        ("expm", _expm_kernel, expm_autograd, lambda A: torch.empty_like(A, memory_format=torch.contiguous_format), expm_vmap),
        ("expm_powers", _expm_powers_kernel, expm_powers_autograd,
         lambda A: (torch.empty_like(A, memory_format=torch.contiguous_format), powers_like(A)), expm_powers_vmap),
        ("expm_vjp", _expm_vjp_kernel, expm_vjp_autograd,
         lambda A, P, G: torch.empty_like(A, memory_format=torch.contiguous_format), expm_vjp_vmap),
    ))
    globals()["_OPS_LIBRARY"] = lib
    return True


_COMPILED_OPS = _register_compiled_ops()


# Note [Op chain under torch.func]
# Under torch.func.grad/jvp, an autograd.Function pays a fixed Python cost per call (functorch
# builds a Function class per level and reads signatures): ~0.4 ms per exponential plus its
# adjoint node, more than the arithmetic of a small one. There the values can be read (through
# vmap's wrappers too, see below), so for n ≤ _CHAIN_N the degree and squarings are chosen as in eager mode and the
# evaluation runs as plain torch ops at the derivative degree (_derivative_degree: second
# derivatives as accurate as the first, as the Function's adjoint node gives them). Measured (1 thread, f32, grad of ⟨G, expm(A)⟩, Function → ops): 8×8 1.37 → 0.95 ms,
# 2×8×8 1.36 → 1.03, 32×32 1.52 → 1.08, 64×64 2.17 → 1.72, 128×128 3.98 → 3.72 (autograd: 0.98–1.06×,
# hence the bound). Under vmap the same where two or more derivative levels are active (MAML's
# inner steps, vmap inside grad inside grad; hessian): there the Function costs more still
# (functorch generates one Function class per level per call, ~0.3–0.9 ms each) and its adjoint's
# own derivatives are a chain anyway; the norms are read through the transforms' wrappers
# (_values: the whole batch's largest, the degree and squarings the Function's vmap rule would
# have chosen for the batch). MAML (issue 13's row, 25 tasks, 40×40 SO, A/B in one process):
# 78 → 64 ms, 4.97× → 4.05× the unconstrained step; grad of vmap(grad) of SO charts 0.70–0.85×
# (16×16 and 64×64, batches of 8 to 256). With one derivative level under vmap (per-sample
# gradients) the Function's adjoint, which reuses the forward's intermediates at the value's
# degree, wins on large batches (the chain: 1.16× at 256×16×16, 1.41× at 64×64×64), so it stays.
# Plain autograd, vmap alone (ensembles) and compile keep their paths. Under exactly one grad level
# the space maps do not get here with transformed tensors: they are one node whose maths runs under
# plain autograd (Note [One node under torch.func.grad] in geofunc/_fused.py); this path serves
# direct calls of expm and nested grad/jvp.
_CHAIN_N = 64


# Note [The op chain below the inner grad level]
# MAML's inner steps call the chart under grad(vmap(grad(...))): the op chain of Note [Op chain under
# torch.func] then runs every op through three levels, and under the vmap level each product of two
# (logical) n×n matrices is matmul's batch rule: expand, reshape, bmm and _unsafe_view recorded at the
# outer grad level, each differentiated again by the outer backward (the double backward, most of
# the step). There, with the top level a grad level, the level below it a vmap level and below that
# one more grad level (exactly that stack), and a real n×n generator that the top level tracks, the
# exponential is one node at the top level (a functorch _SingleLevelFunction applied directly, as
# Note [One node under torch.func.grad]'s): its forward leaves the top grad level and the vmap level
# and evaluates the same chain (the same degree, squarings and derivative degree) on the physical
# batch, (B, n, n) with B in front, as bmm at the outer grad level; its backward is the adjoint of
# that evaluation (_adjoint, torch ops on the forward's intermediates, recorded at the outer level),
# so the outer grad differentiates the same polynomial's adjoint as before: exact second derivatives.
# The value is re-batched and wrapped back. Where grad mode is off at the call, or was off where the
# inner grad level was entered (first-order MAML: vmap(grad(...)) under no_grad), the op chain's ops
# reach the outer level untracked; the node, which records there itself, is not taken. Only grad's
# own backward at the top level (the one whose graph nobody differentiates: _fused._final_backward) takes that adjoint; any other backward there (a
# user's torch.autograd.grad inside the inner function) recomputes the chain at the top level (exact
# to every order). Inside the node the degree is chosen from the evaluation's own powers (_chain_eval:
# the same choice, without choose_degree's three products). What it saves is ops, not arithmetic: the
# top level records nothing, the vmap level's batch rules and matmul's view ops are gone from the outer
# graph. Measured (issue 13's MAML row, 25 tasks, 40×40 SO, float32, 1 thread, process CPU time on a
# loaded 2-core box): after 100 meta-steps, node on/off in one process, 11 runs × 8 interleaved rounds:
# 0.867–0.923× (median 0.893; ÷ unconstrained 3.99 → 3.58); at the first meta-step, main and this in
# alternating processes, 5 pairs: 62.1 → 55.2 ms (0.86–0.95×). Per meta-step 8,794 → 6,736 aten ops,
# 1,602 → 991 autograd nodes. Meta-gradients equal the op chain's to rounding (float32 4.7e-7 relative).
def _below_inner_grad(A: Tensor) -> Tensor | None:
    """The exponential as one node at the top grad level of a grad(vmap(grad)) stack, or None (Note
    [The op chain below the inner grad level])."""
    from . import _fused  # (the one-node machinery of Note [One node under torch.func.grad])

    if not (_CHAIN_NODE and _fused.AVAILABLE) or A.ndim != 2 or A.dtype not in _FAST_DTYPES:
        return None
    if torch.autograd.forward_ad._current_level >= 0:
        return None
    F = torch._C._functorch
    top = F.peek_interpreter_stack()
    level = top.level()
    if top.key() != F.TransformType.Grad or not F.is_functorch_wrapped_tensor(A) or F.maybe_get_level(A) != level:
        return None
    if not A.requires_grad or not torch.is_grad_enabled() or not F.CGradInterpreterPtr(top).prevGradMode():
        # grad mode off here, or off where the inner grad level was entered (its ops reach the outer level
        # untracked there): the op chain, which the outer level then does not record either
        return None
    # the frame of grad_and_value that opened this level (its backward: the final one); a vjp/jacrev level
    # (whose backward may run after the level has exited) finds none, or an outer level's: the op chain
    frame = _fused._up(_fused._GRAD_CODE, sys._getframe(2))
    if frame is None or frame.f_locals.get("level") != level:
        return None
    a = F._unwrap_for_grad(A, level)
    if F.is_batchedtensor(a) and F.maybe_get_level(a) != level - 1:
        return None
    state = _ChainState()
    state.level, state.frame, state.A, state.a = level, id(frame), A, a
    allowed = F.get_single_level_autograd_function_allowed()
    F.set_single_level_autograd_function_allowed(True)
    try:
        return _ChainNode.apply(state, A)
    finally:
        F.set_single_level_autograd_function_allowed(allowed)


class _ChainState:
    __slots__ = ("level", "frame", "A", "a", "batched", "m", "s", "cache", "outer", "a1", "leaf", "g", "saved", "fcache")


def _physical(t: Tensor, vlevel: int) -> Tensor:
    """``t`` below the vmap level ``vlevel``, its batch dim in front (``t`` itself where not batched there)."""
    F = torch._C._functorch
    if F.is_batchedtensor(t) and F.maybe_get_level(t) == vlevel:
        x, bdim = F._unwrap_batched(t, vlevel)
        return x if bdim == 0 else x.movedim(bdim, 0)
    return t


@contextlib.contextmanager
def _two_levels_down() -> Any:
    """Leave the top grad level and the vmap level under it, gradients on (the outer level records)."""
    F = torch._C._functorch
    grad_layer = F.pop_dynamic_layer_stack()
    mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(True)
    try:
        vmap_layer = F.pop_dynamic_layer_stack()
        try:
            yield
        finally:
            F.push_dynamic_layer_stack(vmap_layer)
    finally:
        torch._C._set_grad_enabled(mode)
        F.push_dynamic_layer_stack(grad_layer)


def _chain_eval(A: Tensor, inplace: bool = False) -> tuple[Tensor, dict, int, int]:
    """The op chain's evaluation (Note [Op chain under torch.func]) and its intermediates, derivative degree and
    squarings. Where the plain tensor under ``A`` has ``A``'s layout (a grad level's wrapper: below the vmap
    level), the degree is chosen from the evaluation's own powers (recorded: the derivative degree is at
    least 8, so they are always needed), their norms read from the plain values: the same choice and
    values as choose_degree's, without its three products and wrapped reductions."""
    v = _values(A)
    if v.shape == A.shape and v.stride() == A.stride():
        u = _UNIT_ROUNDOFF[_real(A.dtype)]
        with torch.no_grad():
            a1 = float(_finite_max(_colnorm1(v)))
        if a1 <= 2.0**16:  # (else the powers might overflow: choose_degree rescales first)
            P2 = _mm(A, A)
            P3 = _mm(P2, A)
            P4 = _mm(P2, P2)
            m = _low_degree(a1, u)
            if m is not None:
                s = 0
            else:
                with torch.no_grad():
                    n3, n4 = _finite_max(_norms34(_values(P3), _values(P4)), dim=1).tolist()
                m, s = _pick_degree(max(n3 ** (1.0 / 3.0), n4**0.25), u)
            d = _derivative_degree(m)
            X, cache = _evaluate(A, d, s, (0, [A, P2, P3, P4]), inplace=inplace, chosen=m)
            return X, cache, d, s
    m, s, _ = choose_degree(A)
    d = _derivative_degree(m)
    X, cache = _evaluate(A, d, s, inplace=inplace, chosen=m)
    return X, cache, d, s


_CHAIN_NODE = True  # (off: the op chain; the node also needs _fused.AVAILABLE, the private functorch API)


class _ChainNode(getattr(torch.autograd.function, "_SingleLevelFunction", torch.autograd.Function)):  # type: ignore[misc]
    @staticmethod
    def forward(ctx: Any, state: _ChainState, A: Tensor) -> Tensor:  # type: ignore[override]
        F = torch._C._functorch
        with _two_levels_down():
            a = _physical(state.a, state.level - 1)
            state.batched = a is not state.a
            state.outer = _outer_frame(state, a)
            if state.outer is not None:  # Note [One node at the outer grad level]
                outs = _OuterEval.apply(state, a)
                # the intermediates on this node's ctx, not on the state: _OuterEval's node holds the state, and
                # its outputs hold that node (a cycle through the autograd graph, which gc cannot see: a leak
                # wherever this node's backward never runs, e.g. an inner loss that detaches the value or
                # returns it as has_aux)
                X, ctx.inter = outs[0], outs[1:]
            else:
                X, state.cache, state.m, state.s = _chain_eval(a)
        ctx.state = state
        if state.batched:
            X = F._add_batch_dim(X, 0, state.level - 1)
        return F._wrap_for_grad(X, state.level)

    @staticmethod
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        state = ctx.state
        if state.cache is not None and _fused._final_backward(state.frame):
            g = F._unwrap_for_grad(G, state.level)
            with _two_levels_down():
                gp = _physical(g, state.level - 1)
                if state.outer is not None:
                    allowed = F.get_single_level_autograd_function_allowed()
                    F.set_single_level_autograd_function_allowed(True)
                    try:
                        out = _OuterAdj.apply(state, state.a1, gp, *ctx.inter)
                        ctx.inter = None
                    finally:
                        F.set_single_level_autograd_function_allowed(allowed)
                else:
                    out = _adjoint(state.cache, gp, state.m, state.s)
            state.cache = None
            if out.ndim == 3:  # batched: the generator's batch or the cotangent's
                out = F._add_batch_dim(out, 0, state.level - 1)
            return None, F._wrap_for_grad(out, state.level)
        higher = torch.is_grad_enabled()  # create_graph of the backward that runs this one (read before enable_grad)
        with torch.enable_grad():  # any other backward at the top level: the chain there, exact to every order
            A = state.A.view_as(state.A)
            X = _chain_eval(A)[0]
            return None, torch.autograd.grad(X, A, G, create_graph=higher)[0]


# Note [One node at the outer grad level]
# Below the inner grad level (Note [The op chain below the inner grad level]) the chain's evaluation and its
# adjoint still run as ~150 torch ops per inner step recorded at the outer grad level (level 1), and the outer
# backward (functorch's, create_graph=True) differentiates them op by op, recording its own formulas again.
# Where the stack is exactly grad(vmap(grad)) at levels 1-3, the generator's physical tensor is a level-1
# wrapper over a plain tensor and the outer level is a grad_and_value's, they are one node each at level 1
# (functorch _SingleLevelFunctions applied directly): _OuterEval, A -> (X, P2, P4, H_1..H_{r-1}, X_0..X_{s-1})
# (the value and the intermediates the adjoint reads, as outputs, so that the engine routes their cotangents
# to the evaluation's node and runs it after the adjoint's, or with only dX when the adjoint's cotangent g
# does not depend on X), and _OuterAdj, (A, g, intermediates) -> _adjoint. Both compute on plain tensors
# with nothing recorded. Their backward, when it is the outer grad's own (_fused._final_backward), is
# hand-written: _adj_reverse (the adjoint's reverse: w.r.t. g the Fréchet derivative in the direction of the
# cotangent, w.r.t. B and the intermediates their cotangents) and _fwd_reverse (the evaluation's reverse from
# dX plus those cotangents), in place, fused products (addmm_/baddbmm_), no autograd graph: the same
# products as autograd's double backward of the chain (exact second derivatives of the same polynomial,
# squarings per matrix and the far factor included). Cotangents of an unbatched generator's intermediates
# are summed over the tasks before the evaluation's reverse multiplies them again. Any other backward at
# level 1 (a user's autograd.grad(create_graph=True) inside the outer function) recomputes the chain there
# as torch ops (exact to every order). Measured (issue 13's MAML row, 25 tasks, 40x40 SO, float32, 1 thread,
# process CPU time, node on/off in one process, interleaved, 16-20 rounds, a 2-core box at load 11-15):
# on/off 0.78-0.89 (per-round medians 0.82-0.86) after 60 and 300 meta-steps; per meta-step 6,252 -> 5,758
# aten ops, 937 -> 674 autograd nodes; meta-gradients equal the chain's to float32 rounding (1.5e-7), float64
# 1e-16. The evaluation node computes in place (its Paterson-Stockmeyer blocks and Horner steps accumulate into
# their own fresh buffers, as _Expm's forward does) and the reverses neither multiply by a dB/dA of exactly 1 nor
# form c·T + acc out of place (add_(alpha)): ~25 fresh 25x40x40 outputs fewer per call, none reused across calls.
# Measured (issue 13's MAML row, 1 thread, process CPU time, in-process A/B interleaved): the node maths on one
# meta-step's operands 0.876 (evaluation 0.72, adjoint 0.84, its reverse 0.90); the meta-step 0.964-0.972 on a
# quiet box, 0.93-0.99 loaded (A/A 0.993-1.002). Not kept: a per-thread scratch pool for the reverses'
# temporaries (0.99-1.005) and the coefficient sums as one product over a stacked buffer (0.97-1.37: buffers past
# glibc's mmap threshold fault their pages in on every call).
_OUTER_NODE = True


def _outer_frame(state: "_ChainState", a: Tensor) -> Any:
    from . import _fused

    F = torch._C._functorch
    if not _OUTER_NODE or state.level != 3 or not F.is_functorch_wrapped_tensor(a) or F.maybe_get_level(a) != 1:
        return None
    top = F.peek_interpreter_stack()
    if top is None or top.level() != 1 or top.key() != F.TransformType.Grad or not a.requires_grad:
        return None
    p = F._unwrap_for_grad(a, 1)
    if type(p) not in _PLAIN_TYPES or p.requires_grad or F.is_functorch_wrapped_tensor(p):
        return None
    f = _fused._up(_fused._GRAD_CODE, sys._getframe(1))  # the inner grad_and_value frame
    f = _fused._up(_fused._GRAD_CODE, f.f_back) if f is not None else None
    if f is None or f.f_locals.get("level") != 1:
        return None
    state.a1 = a
    return id(f)


def _acc(acc: Any, X: Tensor, Y: Tensor) -> Tensor:
    """``acc + X @ Y`` (``acc`` a fresh buffer of this module's, updated in place where the shapes allow)."""
    if acc is None:
        return _mm(X, Y)
    if acc.ndim == X.ndim == Y.ndim == 3 and acc.shape[0] == X.shape[0] == Y.shape[0]:
        return acc.baddbmm_(X, Y)
    if acc.ndim == X.ndim == Y.ndim == 2:
        return acc.addmm_(X, Y)
    XY = X @ Y
    return acc.add_(XY) if _into(acc, XY) else acc + XY


def _scaled(T: Tensor, f: Any) -> Tensor:
    """``T * f`` (``T`` itself for a factor of exactly 1: no pass over memory, no fresh buffer)."""
    return T if isinstance(f, float) and f == 1.0 else T * f


def _add_scaled(acc: Tensor, T: Tensor, c: float) -> Tensor:
    """``acc + c T`` (``acc`` a fresh buffer of this module's: in place where ``T`` broadcasts into it)."""
    return acc.add_(T, alpha=c) if _into(acc, T) else acc + c * T


def _into(acc: Tensor, T: Tensor) -> bool:
    """Whether ``T`` broadcasts into ``acc``'s shape (``acc.shape == torch.broadcast_shapes(acc.shape,
    T.shape)`` for shapes that broadcast), without ``torch.broadcast_shapes``' ~25 µs of Python: these
    reverses ask it ~150 times per MAML meta-step. (Concrete shapes: _outer_frame takes plain tensors only.)"""
    a, b = acc.shape, T.shape
    return a == b or (len(b) <= len(a) and all(y == 1 or x == y for x, y in zip(reversed(a), reversed(b))))


def _add(acc: Any, T: Any) -> Any:
    if T is None:
        return acc
    if acc is None:
        return T
    return acc.add_(T) if _into(acc, T) else acc + T


def _csum(c: list, Ts: list) -> Tensor:
    """``Σ_i c[i] Ts[i]`` (fresh)."""
    out = Ts[0] * c[0]
    for ci, T in zip(c[1:], Ts[1:]):
        out = out.add_(T, alpha=ci) if _into(out, T) else out + ci * T
    return out


def _sq_rev(b: Tensor, X: Tensor, k: int, skip: Any, lead: int) -> Tensor:
    """The cotangent through ``Y = X X`` (or ``Y = where(skip <= k, X X, X)`` before ``lead``)."""
    Xt = X.mH
    nb = _acc(_mm(b, Xt), Xt, b)
    return nb if k >= lead else torch.where(skip <= k, nb, b)


def _factor(cache: dict, s: int) -> Any:
    """dB/dA (2^-s, or per matrix 2^(skip - s)) times the far factor (Note [Too far to be a point])."""
    skip = cache.get("skip")
    f = torch.exp2(skip - s) if skip is not None else (2.0**-s if s else 1.0)
    if cache.get("far") is not None:
        f = cache["far"] * f
    return f


def _adj_saving(cache: dict, G: Tensor, m: int, s: int) -> tuple[Tensor, tuple]:
    """_adjoint (q = 4; plain tensors, no graph) and the intermediates its reverse reads."""
    q, c, r = 4, _coefs(m), m // 4
    P, Hs, Xs = cache["P"], cache["Hs"], cache["Xs"]
    skip, lead = cache.get("skip"), cache.get("lead", 0)
    Gk = [G]  # G_s, G_{s-1}, ..., G_0
    for k in range(s - 1, -1, -1):
        G = _sq_rev(G, Xs[k], k, skip, lead)
        Gk.append(G)
    GH = [G]
    GP4 = None
    P4t = P[4].mH
    for i in range(r - 1):
        GP4 = _acc(GP4, Hs[r - 2 - i].mH, GH[i])
        GH.append(_mm(GH[i], P4t))
    GP4 = _add_scaled(GP4, GH[r - 1], c[m])
    GP = [None] + [_csum([c[i * q + j] for i in range(r)], GH) for j in range(1, q)]
    P1t, P2t = P[1].mH, P[2].mH
    GP2 = _acc(_acc(_acc(GP[2], GP4, P2t), P2t, GP4), GP[3], P1t)
    GP1 = _acc(_acc(_acc(GP[1], P2t, GP[3]), GP2, P1t), P1t, GP2)
    return _scaled(GP1, _factor(cache, s)), (Gk, GH, GP2, GP[3], GP4)


def _adj_reverse(cache: dict, saved: tuple, W: Tensor, m: int, s: int) -> tuple[Tensor, Tensor, list]:
    """The reverse of _adj_saving: the gradient w.r.t. G (the Fréchet derivative in the direction W), the
    cotangent of B = P1, and those of the intermediates [P2, P4, *Hs, *Xs] (None where none)."""
    q, c, r = 4, _coefs(m), m // 4
    P, Hs, Xs = cache["P"], cache["Hs"], cache["Xs"]
    skip, lead = cache.get("skip"), cache.get("lead", 0)
    Gk, GH, GP2, GP3, GP4 = saved
    P1, P2, P4 = P[1], P[2], P[4]
    b1 = _scaled(W, _factor(cache, s))  # (read only)
    b1h = b1.mH
    bGP2 = _acc(_mm(b1, P1), P1, b1)
    bP1 = _acc(_mm(b1h, GP2), GP2, b1h)
    bP2 = _mm(GP3, b1h)
    bGP3 = _acc(_mm(P2, b1), bGP2, P1)
    bP1 = _acc(bP1, bGP2.mH, GP3)
    bGP4 = _acc(_mm(bGP2, P2), P2, bGP2)
    bP2 = _acc(_acc(bP2, bGP2.mH, GP4), GP4, bGP2.mH)
    bGP = [None, b1, bGP2, bGP3]
    bGH = [_csum([c[i * q + j] for j in range(1, q)], bGP[1:]) for i in range(r)]
    bGH[r - 1] = _add_scaled(bGH[r - 1], bGP4, c[m])
    bP4 = None
    bH: dict = {}
    bGP4h = bGP4.mH
    for i in range(r - 2, -1, -1):
        bGH[i] = _acc(_acc(bGH[i], bGH[i + 1], P4), Hs[r - 2 - i], bGP4)
        bP4 = _acc(bP4, bGH[i + 1].mH, GH[i])
        bH[i + 1] = _mm(GH[i], bGP4h)
    bG = bGH[0]
    bX: dict = {}
    for k in range(s):
        Gn = Gk[s - 1 - k]  # G_{k+1}
        bGh = bG.mH
        t = _acc(_mm(bGh, Gn), Gn, bGh)
        nb = _acc(_mm(bG, Xs[k]), Xs[k], bG)
        if k >= lead:
            bX[k], bG = t, nb
        else:
            bX[k], bG = torch.where(skip <= k, t, torch.zeros_like(t)), torch.where(skip <= k, nb, bG)
    # each intermediate's cotangent to its own shape (an unbatched generator's, from a batched cotangent: summed
    # here, before the forward's reverse multiplies it again)
    fit = lambda t, ref: t.sum_to_size(ref.shape) if t.shape != ref.shape else t
    inter = [fit(bP2, P2), fit(bP4, P4)] + [fit(bH[r - 1 - k], Hs[k]) for k in range(r - 1)] + [fit(bX[k], Xs[k]) for k in range(s)]
    return bG, bP1, inter


def _fwd_reverse(cache: dict, dX: Tensor | None, inter: Any, m: int, s: int) -> Tensor:
    """The reverse of the evaluation (plain, no graph) from the value's cotangent ``dX`` and the intermediates'
    [P2, P4, *Hs, *Xs] (None where none): the gradient w.r.t. ``B`` (the far factor applied; dB/dA not: _dA)."""
    q, c, r = 4, _coefs(m), m // 4
    P, Hs, Xs = cache["P"], cache["Hs"], cache["Xs"]
    skip, lead = cache.get("skip"), cache.get("lead", 0)
    inter = inter or [None] * (2 + (r - 1) + s)
    bP2, bP4 = inter[0], inter[1]
    bHs, bX = inter[2 : 2 + r - 1], inter[1 + r :]
    if dX is None:
        b = None
    else:
        b = dX * cache["far"] if cache.get("far") is not None else dX
    for k in range(s - 1, -1, -1):
        b = _add(None if b is None else _sq_rev(b, Xs[k], k, skip, lead), bX[k])
    if b is None:
        b = torch.zeros_like(P[1])
    P4t = P[4].mH
    bC = []
    bP4 = None if bP4 is None else bP4.clone()
    for i in range(r - 1):
        bC.append(b)
        bP4 = _acc(bP4, Hs[r - 2 - i].mH, b)
        b = _add(_mm(b, P4t), bHs[r - 2 - i])
    bC.append(b)
    bP4 = c[m] * b if bP4 is None else bP4.add_(b, alpha=c[m]) if _into(bP4, b) else bP4 + c[m] * b
    bP = [None] + [_csum([c[i * q + j] for i in range(r)], bC) for j in range(1, q)]
    bP2 = _add(bP[2], bP2)
    bP3 = bP[3]
    P1t, P2t = P[1].mH, P[2].mH
    bP2 = _acc(_acc(_acc(bP2, bP4, P2t), P2t, bP4), bP3, P1t)
    bP1 = _acc(_acc(_acc(bP[1], P2t, bP3), bP2, P1t), P1t, bP2)
    return bP1


def _dA(bB: Tensor, cache: dict, s: int, shape: torch.Size) -> Tensor:
    """dA from dB (B = A·2^-s or A·2^(skip − s)), summed to the generator's shape."""
    skip = cache.get("skip")
    da = bB * torch.exp2(skip - s) if skip is not None else (bB * 2.0**-s if s else bB)
    return da.sum_to_size(shape) if da.shape != shape else da


def _inter(cache: dict) -> list:
    return [cache["P"][2], cache["P"][4], *cache["Hs"], *cache["Xs"]]


def _level1_cache(A: Tensor, inter: Any, m: int, s: int, like: dict) -> dict:
    """The evaluation's intermediates as level-1 tensors: B from A, the others the nodes' outputs (the fallback)."""
    r = m // 4
    skip = like.get("skip")
    B = A * torch.exp2(skip - s) if skip is not None else (A * 2.0**-s if s else A)
    return {"P": [None, B, inter[0], None, inter[1]], "Hs": list(inter[2 : 2 + r - 1]), "Xs": list(inter[1 + r :]),
            "far": like.get("far"), "skip": skip, "lead": like.get("lead", 0)}


_FUNCTION = getattr(torch.autograd.function, "_SingleLevelFunction", torch.autograd.Function)


class _OuterEval(_FUNCTION):  # type: ignore[misc,valid-type]
    @staticmethod
    def forward(ctx: Any, state: _ChainState, a: Tensor) -> tuple:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        ctx.state = state
        ctx.set_materialize_grads(False)
        layer, mode = _fused._lower()
        try:
            p = F._unwrap_for_grad(a, 1)
            with torch.no_grad():
                X, cache, d, s = _chain_eval(p, inplace=True)  # (plain tensors, nothing recorded: in place)
            outs = [X, *_inter(cache)]
        finally:
            _fused._restore(layer, mode)
        state.cache, state.fcache, state.m, state.s, state.leaf = cache, cache, d, s, p
        return tuple([F._wrap_for_grad(o, 1) for o in outs])

    @staticmethod
    def backward(ctx: Any, dX: Any, *binter: Any) -> tuple:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        state = ctx.state
        if state.fcache is not None and _fused._final_backward(state.outer):
            layer, mode = _fused._lower()
            try:
                with torch.no_grad():
                    un = lambda t: None if t is None else F._unwrap_for_grad(t, 1)
                    bB = _fwd_reverse(state.fcache, un(dX), [un(t) for t in binter], state.m, state.s)
                    da = _dA(bB, state.fcache, state.s, state.leaf.shape)
            finally:
                _fused._restore(layer, mode)
            state.fcache = state.leaf = None
            return None, F._wrap_for_grad(da, 1)
        higher = torch.is_grad_enabled()  # create_graph of the backward that runs this one (read before enable_grad)
        with torch.enable_grad():  # any other backward: the chain at level 1, exact to every order
            A = state.a1.view_as(state.a1)
            X, cache, _, _ = _chain_eval(A)
            pairs = [(o, g) for o, g in zip([X, *_inter(cache)], (dX, *binter)) if g is not None]
            if not pairs:
                return None, None
            return None, torch.autograd.grad([o for o, _ in pairs], A, [g for _, g in pairs],
                                             create_graph=higher, allow_unused=True)[0]


class _OuterAdj(_FUNCTION):  # type: ignore[misc,valid-type]
    @staticmethod
    def forward(ctx: Any, state: _ChainState, a: Tensor, g: Tensor, *inter: Tensor) -> Tensor:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        ctx.state = state
        ctx.args = (a, g, inter)
        ctx.set_materialize_grads(False)
        layer, mode = _fused._lower()
        try:
            gp = F._unwrap_for_grad(g, 1) if F.is_functorch_wrapped_tensor(g) else g
            with torch.no_grad():
                gA, state.saved = _adj_saving(state.cache, gp, state.m, state.s)
            state.g = gp
        finally:
            _fused._restore(layer, mode)
        ctx.acache = state.cache
        return F._wrap_for_grad(gA, 1)

    @staticmethod
    def backward(ctx: Any, dgA: Any) -> tuple:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        state = ctx.state
        a, g, inter = ctx.args
        if dgA is None:
            return (None,) * (3 + len(inter))
        if state.saved is not None and _fused._final_backward(state.outer):
            cache = ctx.acache
            layer, mode = _fused._lower()
            try:
                with torch.no_grad():
                    dg, bP1, binter = _adj_reverse(cache, state.saved, F._unwrap_for_grad(dgA, 1), state.m, state.s)
                    dg = dg.sum_to_size(state.g.shape) if dg.shape != state.g.shape else dg
                    da = _dA(bP1, cache, state.s, F._unwrap_for_grad(a, 1).shape)
            finally:
                _fused._restore(layer, mode)
            state.saved = state.g = None
            return (None, F._wrap_for_grad(da, 1), F._wrap_for_grad(dg, 1), *[F._wrap_for_grad(t, 1) for t in binter])
        higher = torch.is_grad_enabled()  # (read before enable_grad)
        with torch.enable_grad():
            A = a.view_as(a)
            gl = g.view_as(g)
            il = [t.view_as(t) for t in inter]
            gA = _adjoint(_level1_cache(A, il, state.m, state.s, ctx.acache), gl, state.m, state.s)
            return (None, *torch.autograd.grad(gA, (A, gl, *il), dgA, create_graph=higher, allow_unused=True))


# Note [One node below a vmap over a grad level]
# MAML's query loss calls the chart under grad(vmap(...)) (one derivative level under vmap): there the
# exponential is the Function (_Expm), whose call functorch runs as its vmap rule and then a Function
# class generated for the grad level, per call, and whose backward (torch.func.grad's, always with
# create_graph) applies the adjoint node (_ExpmAdjoint) through the same machinery again, though nothing
# differentiates that backward. Where the stack is exactly grad(vmap) at levels 1-2, the generator a
# vmap-level tensor over a grad-level wrapper of a plain tensor, and the grad level a grad_and_value's,
# the exponential is one node at the grad level (a _SingleLevelFunction applied directly): its forward
# is _Expm's on the physical batch (the same choose_degree and evaluation, in place), its backward, when
# it is grad's own (_fused._final_backward), _Expm's adjoint of the forward's intermediates (plain, in
# place): the same values. Any other backward at the grad level takes _Expm's backward as before (the
# adjoint node where a graph is built: exact to every order). Measured (1 thread, float32, process CPU time,
# in-process A/B interleaved): the query-level exponential alone (grad of vmap over 25 tasks of <G, SO chart>,
# 40x40) 4.08 -> 2.85 ms; issue 13's MAML row (25 tasks, 5 inner steps, 100-150 rounds) per-round medians
# 0.960-0.984 (five runs, median 0.977) against A/A 0.989-1.011, ÷ unconstrained 2.94-3.00 -> 2.87-2.90;
# meta-gradients bit for bit those of the Function's path (float32, float64).
_QUERY_NODE = True


class _QueryState:
    __slots__ = ("frame", "a", "m", "s", "cache")


def _below_vmap(A: Tensor) -> Tensor | None:
    """The exponential as one node at the grad level of a grad(vmap) stack, or None (Note [One node below a
    vmap over a grad level])."""
    from . import _fused

    if not (_QUERY_NODE and _fused.AVAILABLE) or A.ndim != 2 or A.dtype not in _FAST_DTYPES:
        return None
    if torch.autograd.forward_ad._current_level >= 0 or not torch.is_grad_enabled():
        return None
    F = torch._C._functorch
    top = F.peek_interpreter_stack()
    if top.key() != F.TransformType.Vmap or top.level() != 2 or not F.is_batchedtensor(A) or F.maybe_get_level(A) != 2:
        return None
    a, bdim = F._unwrap_batched(A, 2)
    if not F.is_functorch_wrapped_tensor(a) or F.maybe_get_level(a) != 1 or not a.requires_grad:
        return None
    p = F._unwrap_for_grad(a, 1)
    if type(p) not in _PLAIN_TYPES or p.requires_grad or F.is_functorch_wrapped_tensor(p):
        return None
    frame = _fused._up(_fused._GRAD_CODE, sys._getframe(2))
    if frame is None or frame.f_locals.get("level") != 1:
        return None
    state = _QueryState()
    state.frame = id(frame)
    vmap_layer = F.pop_dynamic_layer_stack()
    try:
        a = a if bdim == 0 else a.movedim(bdim, 0)
        allowed = F.get_single_level_autograd_function_allowed()
        F.set_single_level_autograd_function_allowed(True)
        try:
            X = _QueryNode.apply(state, a)
        finally:
            F.set_single_level_autograd_function_allowed(allowed)
    finally:
        F.push_dynamic_layer_stack(vmap_layer)
    return F._add_batch_dim(X, 0, 2)


class _QueryNode(_FUNCTION):  # type: ignore[misc,valid-type]
    @staticmethod
    def forward(ctx: Any, state: _QueryState, a: Tensor) -> Tensor:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        layer, mode = _fused._lower()
        try:
            p = F._unwrap_for_grad(a, 1)
            with torch.no_grad():
                m, s, pre = choose_degree(p)
                X, cache = _evaluate(p, m, s, pre, inplace=True)  # (as _Expm.forward)
        finally:
            _fused._restore(layer, mode)
        state.a, state.m, state.s, state.cache = a, m, s, cache
        ctx.state = state
        return F._wrap_for_grad(X, 1)

    @staticmethod
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        from . import _fused

        F = torch._C._functorch
        state = ctx.state
        if state.cache is not None and _fused._final_backward(state.frame):
            layer, mode = _fused._lower()
            try:
                with torch.no_grad():
                    out = _adjoint_value(state.cache, F._unwrap_for_grad(G, 1), state.m, state.s)  # (as _ExpmAdjoint's value)
            finally:
                _fused._restore(layer, mode)
            state.cache = None
            return None, F._wrap_for_grad(out, 1)
        if state.cache is None:  # (a backward after grad's own: recomputed)
            state.cache = _evaluate(F._unwrap_for_grad(state.a, 1).detach(), state.m, state.s, inplace=True)[1]
        if not torch.is_grad_enabled():  # _Expm.backward's branches
            return None, _adjoint(state.cache, G, state.m, state.s, inplace=True)
        holder = _Holder()
        holder.cache = state.cache
        return None, _ExpmAdjoint.apply(state.a, G, state.m, state.s, holder)


# Note [Plain eager calls]
# Outside torch.func transforms and compile, with nothing to record (no_grad, or no input requiring
# grad, and no forward-mode level), expm evaluates directly: the Function's machinery is ~40 µs per
# call, more than a small exponential. With something to record, the Function is applied through the
# base class's apply: torch.autograd.Function.apply binds the arguments through inspect.signature on
# every call (~20 µs) before calling it, which only matters for default arguments (forward has
# none) and under functorch transforms (excluded here; a functorch wrapper that outlived its
# transform also takes Function.apply, which unwraps it).
try:
    _EXPM_APPLY = super(torch.autograd.Function, _Expm).apply
except AttributeError:  # pragma: no cover (depends on the torch version)
    _EXPM_APPLY = _Expm.apply


# Note [Compiled exponential on accelerators]
# The operators of Note [Compiled exponential] read norms into Python at run time. On the CPU that
# is a plain read; on a GPU each is a device-to-host copy that waits for the queue, and CUDA graphs
# (torch.compile(mode="reduce-overhead"), the way to launch a small model's step at once) refuse
# any such copy ("Cannot copy between CPU and CUDA tensors during CUDA graph capture"). So off the
# CPU, inside torch.compile, the exponential is the static schedule (Note [Static schedule]): all
# ops traced into the graph, no read, same backward error bound (NaN past α₃ ≈ 2300-2500, far
# beyond any generator that rebase leaves).
def _host_reads(A: Tensor) -> bool:
    """Whether the compiled exponential of ``A`` may read values at run time (on the CPU only)."""
    return A.device.type == "cpu"


def expm(A: Tensor) -> Tensor:
    """Matrix exponential of a batch of square matrices ``(..., n, n)``, real or complex; differentiable."""
    if not _plain(A):
        return torch.linalg.matrix_exp(A)
    if type(A) not in (Tensor, torch.nn.Parameter):  # tensor subclasses (DTensor): values unreadable
        return _expm_static(A)
    if torch.compiler.is_compiling():  # Note [Compiled exponential]
        return torch.ops.geofunc.expm(A) if _COMPILED_OPS and _host_reads(A) else _expm_static(A)
    if make_fx_tracing():  # Note [Traced by make_fx]: the degree is not read here
        return torch.ops.geofunc.expm(A) if _COMPILED_OPS and _host_reads(A) else _expm_static(A)
    if torch._C._functorch.peek_interpreter_stack() is None and not torch._C._functorch.is_functorch_wrapped_tensor(A):
        # Plain eager mode (Note [Plain eager calls])
        return _EXPM_APPLY(A, _Holder()) if tracks_derivatives(A) else _expm_kernel(A)
    kinds = _transforms()
    if kinds.count("Jvp") >= 2 or "Functionalize" in kinds:  # nested forward mode (see _nested_forward_mode);
        return _expm_static(A)  # torch.func.functionalize (Note [Functions under functionalize] in _fastpath.py)
    orders = len(kinds) - kinds.count("Vmap")  # derivative levels
    if (kinds and set(kinds) <= {"Grad", "Jvp", "Vmap"} and orders >= (2 if "Vmap" in kinds else 1)
            and A.shape[-1] <= _CHAIN_N):  # Note [Op chain under torch.func]
        if kinds == ["Grad", "Vmap", "Grad"]:  # Note [The op chain below the inner grad level]
            X = _below_inner_grad(A)
            if X is not None:
                return X
        m, s, _ = choose_degree(A)
        return _evaluate(A, _derivative_degree(m), s, chosen=m)[0]
    if kinds == ["Grad", "Vmap"]:  # Note [One node below a vmap over a grad level]
        X = _below_vmap(A)
        if X is not None:
            return X
    return _Expm.apply(A, _Holder())


def expm_frechet(A: Tensor, E: Tensor) -> Tensor:
    """The Fréchet derivative ``L(A, E)`` of the approximant used by :func:`expm` (eager helper)."""
    m, s, _ = choose_degree(A)
    d = _derivative_degree(m)
    _, cache = _evaluate(A, d, s, chosen=m)
    return _tangent(cache, E, d, s)


# Note [Frame exponential]
# The chart of tall n×k frames (geofunc/_linalg.py: _tall_chart) needs only the first k columns
# of expm(M) for a 2k×2k matrix of a fixed shape, M = [[T, R], [c I, 0]] (T, R k×k, c a constant
# per matrix). In plain eager mode (real dtypes; also inside the one node under torch.func.grad,
# Note [One node under torch.func.grad]) frame_expm uses both facts, with the degree and
# squarings chosen as choose_degree chooses them for M:
#
# * the powers by blocks: M² = [[T² + cR, TR], [cT, cR]] (two k×k products), M³ = M² M (M²'s first
#   k columns times M's top rows, plus c times M²'s last k columns: half a 2k×2k product; M M²,
#   the same cost, gave values ~10% further from float64), M⁴ = M² M²;
# * with no squaring (s = 0, the usual case), Paterson–Stockmeyer on the k columns: the
#   polynomials in M commute, so T_m(M) E = C₀E + M⁴(C₁E + M⁴(…)) with E = I[:, :k], each Horner
#   step a 2k×2k by 2k×k product (half of one 2k×2k product);
# * the adjoint is the reverse of exactly that evaluation, by blocks: the Horner steps' products
#   with M⁴ as one (2k × (r−1)k) by ((r−1)k × 2k) product, the gradient of M³ = M² M through the
#   first k columns only (its cotangent has no others), M² by blocks (four k×k products).
#
# Counted in k³ (one k×k product; a 2k×2k product is 8) at degree 16: forward 26 and adjoint 50,
# against 48 and 96 for expm(M) and its adjoint (counted by tests/test_expm.py). With squarings
# (s > 0) the exponential is evaluated whole (the squarings need it), from the powers already
# computed, and its adjoint is expm's. Values and gradients are those of the same polynomial at the
# same degree (the Horner products are taken in the other order: the same to rounding). A backward
# that builds a graph (double backward) goes through expm's adjoint node on M (Note [Adjoint node]):
# higher derivatives exact, as expm's. Under torch.compile the same kernels run as operators (Note
# [Compiled frame exponential]). Everywhere else (torch.func transforms, forward mode, tensor
# subclasses, complex dtypes) the chart calls expm(M) and takes its first k columns
# (frame_columns decides).
#
# Measured (1 thread, float32, A/B in one process, Stiefel at a base, raw entries ~ N(0, 1/n)):
# forward + backward 128×64 0.71–0.73× (degree 20, no squaring), under torch.func.grad 0.76–0.78×,
# forward alone 0.79×; 512×128 0.60–0.65×; 128×32 0.93–0.97×; 128×64 at the README step's operating
# point (degree 16) 0.71–0.79× (0.41–0.51 ms saved, grad and autograd alike); the README step
# itself 0.86–1.03× under grad, 0.82–0.99× with backward() (six runs: the box's noise is as large
# as the saving there). Frames of 8 and 16 columns were 2–16% slower
# (the extra small ops cost more than the products saved), hence _FRAME_K = 32 in _linalg.py.
# float32 accuracy against float64 (1,400 generators, k = 32 and 64, every (m, s) from (12, 0) to
# (20, 1)): values 1.00–1.05× expm(M)[:, :k]'s error (median per degree), gradients 0.87–1.00×. The
# first version computed M³ = M M²: values 10% further from float64 at degree 20 (M² M as expm's
# _powers does: the same), and the gradient of T summed by blocks: 4–7% further (the block sums
# as products over 2k, as expm's adjoint forms them: 2–13% closer). A degree choice of its own
# (no squaring up to θ₂₄, since the Horner steps are cheap here) was faster still but its float32
# gradients were 1.7× further from float64 where it replaced (16, 1) by (24, 0): the choice is
# expm's.


def _frame_matrix(T: Tensor, R: Tensor, c: Tensor) -> Tensor:
    """``M = [[T, R], [c I, 0]]`` (…, 2k, 2k)."""
    cI = c * _eye(T)  # T's shape where c has T's batch (…, 1, 1), as the charts' c: no expand
    bottom = torch.nn.functional.pad(cI if cI.shape == T.shape else cI.expand_as(T), (0, T.shape[-1]))  # [c I, 0]
    return torch.cat([torch.cat([T, R], dim=-1), bottom], dim=-2)


def _frame_forward(T: Tensor, R: Tensor, c: Tensor, powers: Any = None, horner: Tensor | None = None) -> tuple[Tensor | None, dict]:
    """The first k columns of ``expm(M)``, ``M = [[T, R], [c I, 0]]``, and what the adjoint needs
    (Note [Frame exponential]). Plain tensors, no graph.

    ``cache["powers"]``: the powers the degree choice computed (``M², M³, M⁴``, or expm's
    ``A_t², A_t³, A_t⁴`` past ‖M‖₁ = 2¹⁶; None for a degree chosen from ‖M‖₁ alone). ``powers``: those
    of an earlier call on the same inputs (the compiled adjoint), which then gives the same choice
    without recomputing them. ``horner``: ``(…, _FRAME_H, 2k, k)``, the Horner factors ``cache["hs"]`` of
    that call (its first ``m/4 − 1`` entries; the compiled adjoint, Note [Compiled frame exponential]):
    where the evaluation is Paterson–Stockmeyer on the k columns they are taken from it, not recomputed,
    and the columns themselves are not returned (None).
    """
    k = T.shape[-1]
    M = _frame_matrix(T, R, c)
    u = _UNIT_ROUNDOFF[_real(M.dtype)]
    a1 = _read_max(_colnorm1(M))
    m = _low_degree(a1, u)
    if m is not None:
        X, cache = _evaluate(M, m, 0, inplace=True)
        return X[..., :k], {"M": M, "m": m, "s": 0, "full": cache, "powers": None}
    if a1 > 2.0**16:  # powers could overflow: expm's own choice, which rescales first (rare)
        m, s, pre = choose_degree(M, powers)
    else:
        if powers is not None:
            P2, P3, P4 = powers
        else:
            cR = c * R
            P2 = torch.cat([torch.cat([_mm_add(cR, T, T), _mm(T, R)], dim=-1),
                            torch.cat([c * T, cR], dim=-1)], dim=-2)
            P3 = _mm(P2[..., :k], M[..., :k, :])  # M² M: M's rows below k are [c I, 0]
            if dispatch_mode_active():  # Note [In place under a dispatch mode]
                P3 = torch.cat([P3[..., :k] + P2[..., k:] * c, P3[..., k:]], dim=-1)
            else:
                P3[..., :k].add_(P2[..., k:] * c)
            P4 = _mm(P2, P2)
        m, s = _high_degree(M, P3, P4, u)
        pre = (0, [M, P2, P3, P4])
    if s > 0 or pre[0] != 0:
        X, cache = _evaluate(M, m, s, pre, inplace=True)
        return X[..., :k], {"M": M, "m": m, "s": s, "full": cache, "powers": pre[1][1:]}
    # Paterson–Stockmeyer (q = 4) on the first k columns: h_{r-1} = (C_{r-1} + c_m M⁴) E,
    # h_i = C_i E + M⁴ h_{i+1}
    r = m // 4
    if horner is not None:  # the compiled adjoint: the same factors, bit for bit, as the forward's
        return None, {"M": M, "m": m, "s": 0, "full": None, "P2": pre[1][1], "P4": pre[1][3],
                      "hs": list(horner[..., : r - 1, :, :].unbind(-3)), "powers": pre[1][1:]}
    P = [None] + [Pj[..., :k] for Pj in pre[1]]
    cf = _coefs(m)

    inplace = not dispatch_mode_active()  # Note [In place under a dispatch mode]

    def block(i: int, last: bool) -> Tensor:
        out = P[1] * cf[4 * i + 1]
        for j in (2, 3):
            out = out.add_(P[j], alpha=cf[4 * i + j]) if inplace else out.add(P[j], alpha=cf[4 * i + j])
        if last:
            out = out.add_(P[4], alpha=cf[m]) if inplace else out.add(P[4], alpha=cf[m])
        if inplace:
            out[..., :k, :].diagonal(dim1=-2, dim2=-1).add_(cf[4 * i])
        else:  # [I; 0] of the 2k × k block
            out = out + cf[4 * i] * torch.eye(out.shape[-2], out.shape[-1], dtype=out.dtype, device=out.device)
        return out

    h = block(r - 1, True)
    hs = []  # the right factors of the Horner products, in forward order
    P4 = pre[1][3]
    for i in range(r - 2, -1, -1):
        hs.append(h)
        h = _mm_add(block(i, False), P4, h)
    return h, {"M": M, "m": m, "s": 0, "full": None, "P2": pre[1][1], "P4": P4, "hs": hs, "powers": pre[1][1:]}


def _frame_full(T: Tensor, R: Tensor, c: Tensor) -> tuple[Tensor, dict]:
    """``expm(M)[..., :k]`` evaluated whole, as :func:`expm` evaluates ``M`` (its degree and squarings),
    with a cache in :func:`_frame_forward`'s form, so that :func:`_frame_adjoint` serves both (the tall
    chart's narrow frames, Note [One-node tall chart] in ``geofunc/_linalg.py``). Plain tensors, no graph."""
    M = _frame_matrix(T, R, c)
    m, s, pre = choose_degree(M)
    X, full = _evaluate(M, m, s, pre, inplace=True)
    return X[..., : T.shape[-1]], {"M": M, "m": m, "s": s, "full": full}


def _frame_adjoint(T: Tensor, R: Tensor, c: Tensor, cache: dict, G: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients with respect to ``T`` and ``R`` of ``⟨G, expm(M)[:, :k]⟩`` (reverse of
    :func:`_frame_forward`; real dtypes, no graph)."""
    k = T.shape[-1]
    m, s = cache["m"], cache["s"]
    if cache["full"] is not None:
        GM = _adjoint_value(cache["full"], torch.nn.functional.pad(G, (0, k)), m, s)[..., :k, :]  # of [G, 0]
        return GM[..., :k], GM[..., k:]
    M, P2, P4, hs = cache["M"], cache["P2"], cache["P4"], cache["hs"]
    cf = _coefs(m)
    r = m // 4
    P4t = P4.mT
    ghs = []  # cotangents of h_0, …, h_{r-2} (each pairs with the right factor h_{i+1})
    gh = G
    GP = [None, None, None, None]  # cotangents of the first k columns of M, M², M³
    for i in range(r):
        for j in (1, 2, 3):
            GP[j] = gh * cf[4 * i + j] if GP[j] is None else GP[j].add_(gh, alpha=cf[4 * i + j])
        if i < r - 1:
            ghs.append(gh)
            gh = _mm(P4t, gh)
    # M⁴: the Horner products' Σ_i g_i h_{i+1}ᵀ as one product, and c_m on the first k columns
    Hr = torch.cat(hs[::-1], dim=-1)  # h_1, …, h_{r-1}
    G4 = _mm(torch.cat(ghs, dim=-1), Hr.mT)
    G4[..., :k].add_(gh, alpha=cf[m])
    # M⁴ = M² M²
    P2t = P2.mT
    G2 = _mm_add(_mm(G4, P2t), P2t, G4)
    g3 = GP[3]
    # M³ = M² M, G₃ = [g₃, 0] (first k columns only): M² gets G₃ Mᵀ = [g₃ Tᵀ, c g₃], M (T alone) M²ᵀ G₃'s top rows
    G2[..., :k].add_(GP[2]).add_(_mm(g3, T.mT))
    G2[..., k:].add_(g3 * c)
    # M² = M M: G₂ Mᵀ + Mᵀ G₂, of which T and R take the top rows (M's first k columns are [T; c I],
    # its top rows [T, R])
    Mc = M[..., :k].mT  # k × 2k
    GT = _mm_add(_mm_add(_mm_add(GP[1][..., :k, :], P2[..., :k].mT, g3), G2[..., :k, :], M[..., :k, :].mT), Mc, G2[..., :k])
    GR = _mm_add(G2[..., :k, :k] * c, Mc, G2[..., k:])
    return GT, GR


class _FrameExpm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, T: Tensor, R: Tensor, c: Tensor) -> Tensor:  # type: ignore[override]
        F, cache = _frame_forward(T, R, c)
        cache.pop("powers", None)  # (for the compiled kernels: the adjoint reads P2 and P4 only)
        save_state(ctx, (T, R, c), cache)  # Note [Node state as saved tensors] in _fastpath.py
        return F

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        (T, R, c), cache = saved_state(ctx)
        k = T.shape[-1]
        if torch.is_grad_enabled() and torch.autograd.forward_ad._current_level >= 0:
            # a graph under a dual level (a dual cotangent: the forward had no tangents, frame_columns): the
            # chain as torch ops, which the dual level records, as _Expm's (Note [Adjoint under a dual level]);
            # the adjoint node's jvp rule raised torch's "Nested forward mode AD is not supported"
            GM = _adjoint_chain(_frame_matrix(T, R, c), torch.cat([G, torch.zeros_like(G)], dim=-1), cache["m"], cache["s"])
            return GM[..., :k, :k], GM[..., :k, k:], None
        if torch.is_grad_enabled():  # a graph is asked for: expm's adjoint node on M (exact to every order)
            holder = _Holder()
            holder.cache = cache["full"]
            GM = _ExpmAdjoint.apply(_frame_matrix(T, R, c), torch.cat([G, torch.zeros_like(G)], dim=-1),
                                    cache["m"], cache["s"], holder)
            return GM[..., :k, :k], GM[..., :k, k:], None
        GT, GR = _frame_adjoint(T, R, c, cache, G)
        return GT, GR, None


try:
    _FRAME_APPLY = super(torch.autograd.Function, _FrameExpm).apply
except AttributeError:  # pragma: no cover (depends on the torch version)
    _FRAME_APPLY = _FrameExpm.apply


def frame_expm(T: Tensor, R: Tensor, c: Tensor) -> Tensor:
    """``expm(M)[..., :, :k]`` for ``M = [[T, R], [c I, 0]]`` (T, R ``(…, k, k)``, c ``(…, 1, 1)``, no
    gradient through ``c``): plain eager mode, real dtypes only (Note [Frame exponential])."""
    if tracks_derivatives(T, R):
        return _FRAME_APPLY(T, R, c.detach())
    return _frame_forward(T, R, c)[0]


# Note [Compiled frame exponential]
# Under torch.compile the frame chart's k columns are custom operators too, geofunc::frame_cols,
# frame_cols_fwd and frame_cols_bwd, built as Note [Compiled exponential]'s: kernels that choose
# the degree and squarings at run time (as frame_expm does in eager mode), the powers M², M³, M⁴
# and the Horner factors h_1 … h_{m/4−1} of the k columns (a fixed _FRAME_H slots, zeros past m/4 − 1
# or where the evaluation was expm's) handed from the forward to the adjoint, which then makes the
# same choice and re-evaluates nothing on the Paterson–Stockmeyer path (only expm's evaluation,
# with squarings or at a low degree, is re-evaluated); the autograd kernels apply single-level
# Functions; the adjoint's own derivatives and forward mode run the static schedule on M (exact to
# every order); vmap rules move the batch to the front. A second library fragment, so that expm's
# operators keep their names (and inductor's cached graphs their meaning); all three renamed from
# frame_expm, frame_expm_powers and frame_expm_vjp when the Horner factors were added: the on-disk
# cache keys the compiled step on the Dynamo graph, which names only the values operator, so a
# warm cache under the old name called frame_expm_powers, which no longer exists (seen).
# Measured (README step, inductor, 1 thread, A/B in one process): compiled 2.64 → 2.24 ms (0.85×),
# compile time unchanged (9–11 s); handing the Horner factors over instead of re-evaluating them
# (3 products of 2k × 2k by 2k × k and 4 blocks at the step's degree 16), 0.94× (per-round median
# of 16 interleaved rounds, process CPU time; ~0.3 ms; the gradients bit for bit the same).


def _frame_static(T: Tensor, R: Tensor, c: Tensor) -> Tensor:
    """``expm(M)[..., :k]`` by the static schedule (torch ops: derivatives of every order)."""
    return _expm_static(_frame_matrix(T, R, c))[..., : T.shape[-1]]


def _frame_static_vjp(T: Tensor, R: Tensor, c: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    return _vjp(lambda T, R: _frame_static(T, R, c), (T, R), G)


def _frame_kernel(T: Tensor, R: Tensor, c: Tensor) -> Tensor:
    return _frame_forward(T, R, c)[0].contiguous()


#: Horner factors the compiled frame forward hands to its adjoint: m/4 − 1 ≤ _HIGH[-1]/4 − 1
_FRAME_H = _HIGH[-1] // 4 - 1


def _frame_fwd_kernel(T: Tensor, R: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The k columns, ``(…, 3, 2k, 2k)``: the powers the degree choice computed (zeros where it
    needed none: the adjoint then chooses from ‖M‖₁ alone again), and ``(…, _FRAME_H, 2k, k)``: the
    Horner factors of a Paterson–Stockmeyer evaluation on the k columns (its first m/4 − 1 entries;
    zeros where the evaluation was expm's, which the adjoint then re-evaluates)."""
    F, cache = _frame_forward(T, R, c)
    k = T.shape[-1]
    P = cache["powers"]
    P = torch.stack(list(P), dim=-3) if P is not None else T.new_zeros(*T.shape[:-2], 3, 2 * k, 2 * k)
    H = T.new_zeros(*T.shape[:-2], _FRAME_H, 2 * k, k)
    hs = cache.get("hs")
    if hs:
        H[..., : len(hs), :, :] = torch.stack(hs, dim=-3)
    return F.contiguous(), P, H


def _frame_bwd_kernel(T: Tensor, R: Tensor, c: Tensor, P: Tensor, H: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    _, cache = _frame_forward(T, R, c, P.unbind(-3), H)
    GT, GR = _frame_adjoint(T, R, c, cache, G)
    return GT.contiguous(), GR.contiguous()


def _register_frame_ops() -> bool:
    """Define geofunc::frame_cols, frame_cols_fwd and frame_cols_bwd (Note [Compiled frame
    exponential]); False where that is not possible (then the chart takes expm(M) under compile)."""
    if not _COMPILED_OPS:
        return False
    from torch._functorch.utils import enable_single_level_autograd_function  # present: _COMPILED_OPS
    from torch.autograd.function import _SingleLevelFunction

    ops = torch.ops.geofunc
    if hasattr(ops, "frame_cols_bwd"):  # this module imported again: already registered
        return True

    class _CompiledFrame(_SingleLevelFunction):
        @staticmethod
        def forward(T: Tensor, R: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
            with _below_autograd():
                return ops.frame_cols_fwd(T, R, c)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
            ctx.mark_non_differentiable(output[1], output[2])
            ctx.save_for_backward(*inputs, output[1], output[2])

        @staticmethod
        @backward_without_autocast
        def backward(ctx: Any, G: Tensor, _: Any, __: Any) -> tuple:  # type: ignore[override]
            T, R, c, P, H = ctx.saved_tensors
            GT, GR = ops.frame_cols_bwd(T, R, c, P, H, G)
            return GT, GR, None

    class _CompiledFrameVjp(_SingleLevelFunction):
        @staticmethod
        def forward(T: Tensor, R: Tensor, c: Tensor, P: Tensor, H: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            with _below_autograd():
                return ops.frame_cols_bwd(T, R, c, P, H, G)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            T, R, c, _, _, G = inputs
            ctx.save_for_backward(T, R, c, G)

        @staticmethod
        @backward_without_autocast
        def backward(ctx: Any, HT: Tensor, HR: Tensor) -> tuple:  # type: ignore[override]
            T, R, c, G = ctx.saved_tensors
            dT, dR, dG = _vjp(lambda T, R, G: _frame_static_vjp(T, R, c, G), (T, R, G), (HT, HR))
            return dT, dR, None, None, None, dG

    def frame_autograd(T: Tensor, R: Tensor, c: Tensor) -> Tensor:
        if _no_graph(T, R):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.frame_cols(T, R, c)
        if _forward_mode():
            return _frame_static(T, R, c)
        with enable_single_level_autograd_function():
            return _CompiledFrame.apply(T, R, c)[0]

    def frame_fwd_autograd(T: Tensor, R: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if _no_graph(T, R):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.frame_cols_fwd(T, R, c)
        with enable_single_level_autograd_function():
            return _CompiledFrame.apply(T, R, c)

    def frame_bwd_autograd(T: Tensor, R: Tensor, c: Tensor, P: Tensor, H: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        if _no_graph(T, R, G):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.frame_cols_bwd(T, R, c, P, H, G)
        if _forward_mode():
            return _frame_static_vjp(T, R, c, G)
        with enable_single_level_autograd_function():
            return _CompiledFrameVjp.apply(T, R, c, P, H, G)

    def fronted(info: Any, in_dims: tuple, *xs: Tensor) -> list[Tensor]:
        return [_front(x, d, info.batch_size) for x, d in zip(xs, in_dims)]

    def frame_vmap(info: Any, in_dims: tuple, *xs: Tensor) -> tuple[Tensor, int]:
        return ops.frame_cols(*fronted(info, in_dims, *xs)), 0

    def frame_fwd_vmap(info: Any, in_dims: tuple, *xs: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        return ops.frame_cols_fwd(*fronted(info, in_dims, *xs)), (0, 0, 0)

    def frame_bwd_vmap(info: Any, in_dims: tuple, *xs: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        return ops.frame_cols_bwd(*fronted(info, in_dims, *xs)), (0, 0)

    def cols(T: Tensor) -> Tensor:
        return T.new_empty(*T.shape[:-2], 2 * T.shape[-1], T.shape[-1])

    def powers_like(T: Tensor) -> Tensor:
        n = 2 * T.shape[-1]
        return T.new_empty(*T.shape[:-2], 3, n, n)

    def horner_like(T: Tensor) -> Tensor:
        return T.new_empty(*T.shape[:-2], _FRAME_H, 2 * T.shape[-1], T.shape[-1])

    def square(T: Tensor) -> Tensor:
        return torch.empty_like(T, memory_format=torch.contiguous_format)

    lib = torch.library.Library("geofunc", "FRAGMENT")  # noqa: TOR901 (lives as long as the module)
    lib.define("frame_cols(Tensor T, Tensor R, Tensor c) -> Tensor")
    lib.define("frame_cols_fwd(Tensor T, Tensor R, Tensor c) -> (Tensor, Tensor, Tensor)")
    lib.define("frame_cols_bwd(Tensor T, Tensor R, Tensor c, Tensor P, Tensor H, Tensor G) -> (Tensor, Tensor)")
    _register_ops(lib, (
        ("frame_cols", _frame_kernel, frame_autograd, lambda T, R, c: cols(T), frame_vmap),
        ("frame_cols_fwd", _frame_fwd_kernel, frame_fwd_autograd,
         lambda T, R, c: (cols(T), powers_like(T), horner_like(T)), frame_fwd_vmap),
        ("frame_cols_bwd", _frame_bwd_kernel, frame_bwd_autograd, lambda T, R, c, P, H, G: (square(T), square(R)),
         frame_bwd_vmap),
    ))
    globals()["_FRAME_OPS_LIBRARY"] = lib
    return True


_FRAME_OPS = _register_frame_ops()


def frame_columns(T: Tensor, R: Tensor, c: Tensor) -> Tensor | None:
    """``expm(M)[..., :k]`` for ``M = [[T, R], [c I, 0]]`` by blocks where a fast path applies (plain
    eager mode: :func:`frame_expm`; ``torch.compile``: the frame operators), else None (the caller
    takes ``expm(M)``). Plain tensors of float32/float64 only; no gradient through ``c``."""
    for X in (T, R, c):
        if type(X) not in _PLAIN_TYPES or X.dtype not in _FAST_DTYPES or X.is_meta:
            return None
    if torch.compiler.is_compiling() or make_fx_tracing():  # (Note [Traced by make_fx])
        return torch.ops.geofunc.frame_cols(T, R, c.detach()) if _FRAME_OPS and _host_reads(T) else None
    if torch._C._functorch.peek_interpreter_stack() is not None or forward_tangents(T, R):
        return None
    if any(torch._C._functorch.is_functorch_wrapped_tensor(X) for X in (T, R)):  # outlived its transform
        return None
    return frame_expm(T, R, c)
