"""Pure shared maths: skew frames, trivializations, Haar sampling, QR/polar factors.

Every function here is a pure function of tensors, batched over leading dimensions,
with no Python branching on tensor values, so that all compose with ``torch.func``
transforms and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ._errors import ManifoldError

# the matrix exponential's one home (expm re-exported: the "expm" trivialization)
from ._expm import (_FAR, _UNIT_ROUNDOFF, _colnorm1, _frame_adjoint, _frame_forward, _frame_full, _frame_matrix, _mm, _mm_add, _one_or_nan,
                    _read_max, _real, _transforms, _values, expm, frame_columns)
from ._fastpath import (_FAST_DTYPES, _PLAIN_TYPES, backward_without_autocast, closed_form_node, derivative_mode, dispatch_mode_active,
                        eager_fast, forward_tangents, make_fx_tracing, save_state, saved_state)

Tensor = torch.Tensor
Triv = Union[str, Callable[[Tensor], Tensor]]
Finish = Callable[[Optional[Tensor]], Tensor]  # a frame from φ(generator) (frame_charts)

__all__ = [
    "skew_lower",
    "skew_lower_inverse",
    "sym_part",
    "skew_part",
    "expm",
    "cayley",
    "resolve_triv",
    "haar_stiefel",
    "haar_so",
    "chol_qr",
    "refine_frame",
    "polar",
    "poison",
    "sanitize",
    "frame_chart",
    "frame_charts",
    "eye_like",
    "wide_dtype",
    "transpose",
]


def transpose(X: Tensor) -> Tensor:
    """``Xᵀ`` of the last two dims; the conjugate transpose ``Xᴴ`` for complex ``X`` (Note [Complex]
    in ``geofunc/spaces/_base.py``), so every map written with it serves both. ``mT`` for real ``X``:
    the same view, but ``mH`` costs ~70 µs per call under ``torch.func.grad`` (torch 2.13; ``mT``: 4 µs)."""
    return X.mH if X.is_complex() else X.mT


# Note [Real products under vmap]
# The real inner product Re(Āᵢ Bᵢ) written as ``(A.conj() * B).real`` differentiates through a lazy
# conjugate view: the cotangent of A comes back conjugated (a conj bit, no copy). Where that cotangent
# reaches the input as it is, e.g. a tangent vector built from real parameters by
# ``torch.complex(re, im)``, whose backward takes ``.imag`` of it, torch (2.13) makes an
# ``aten::_neg_view``, which has no batching rule: ``jacrev``, ``hessian`` and ``vmap(grad)`` of
# ``inner(X, V, V)`` raised a RuntimeError (``jvp`` and ``jacfwd`` did not). ``Re A · Re B + Im A · Im B``
# makes no conjugate view in either direction (the inputs' own conj bits resolved first, so that
# ``.imag`` of a conjugated input is no negative view either). ``conj_physical`` would do as well but
# has no batching rule (vmap's per-sample fallback). The same for a conjugate transpose whose
# cotangent goes straight back to an input (:func:`adjoint_by_value`).
def real_products(A: Tensor, B: Tensor) -> Tensor:
    """``Re(Ā ⊙ B)`` elementwise (``A ⊙ B`` for real tensors): the terms of the real inner product
    ``Re tr(AᴴB)``, composable with every ``torch.func`` transform (Note [Real products under vmap])."""
    if not (A.is_complex() or B.is_complex()):
        return A * B
    A, B = A.resolve_conj(), B.resolve_conj()
    out = A.real * B.real
    return out + A.imag * B.imag if A.is_complex() and B.is_complex() else out


def adjoint_by_value(X: Tensor) -> Tensor:
    """``Xᴴ`` (``Xᵀ`` if real) as a new tensor rather than a conjugate view, for a product whose cotangent
    goes straight back to an input (Note [Real products under vmap])."""
    if not X.is_complex():
        return X.mT
    X = X.resolve_conj()
    return torch.complex(X.real.mT, -X.imag.mT)


def tall(X: Tensor) -> tuple[Tensor, bool]:
    """The tall form of a matrix batch and whether it was transposed (a static shape branch).

    A wide complex ``X``'s ``Xᴴ`` is ``conj(X)ᵀ`` by torch ops that vmap batches
    (``torch.complex(Re X, −Im X)``), not the lazy conjugate view ``X.mH``: that view's derivative is a
    lazy conjugate too, and the reverse of ``.imag``/``torch.complex`` on it (a complex point read from
    real parts) makes a negative view, which has no batching rule: ``vmap(grad)``, ``jacrev`` and
    ``hessian`` of a complex wide chart raised. Real tensors take ``mT`` (a view)."""
    if X.shape[-2] < X.shape[-1]:
        return (torch.complex(X.real, -X.imag).mT if X.is_complex() else X.mT), True
    return X, False


def untall(X: Tensor, transposed: bool) -> Tensor:
    # resolve_conj: a complex result is not a lazy conjugate view (whose .imag has no batching
    # rule under vmap); a no-op for real tensors
    return transpose(X).resolve_conj() if transposed else X


def wide_dtype(X: Tensor) -> torch.dtype:
    """float64 (complex128 for complex ``X``) to compute a badly conditioned map of lower-precision
    points in, rounding the result back (SO's, the Grassmannian's and PSD's affine logarithms,
    Lorentz's pair maps); ``X``'s own dtype on MPS, which has no float64."""
    if X.device.type == "mps":
        return X.dtype
    return torch.complex128 if X.is_complex() else torch.float64


def eye_like(X: Tensor, n: int | None = None) -> Tensor:
    n = X.shape[-1] if n is None else n
    return torch.eye(n, dtype=X.dtype, device=X.device)


def skew_lower(Z: Tensor, lower: bool = True) -> Tensor:
    """The skew-symmetric matrix ``L - Lᵀ`` of the strict lower (or upper) triangle ``L`` of ``Z``.

    Complex ``Z``: the skew-Hermitian ``L − Lᴴ + i·diag(Im Z)`` (the n² real coordinates of u(n)).
    """
    L = torch.tril(Z, -1) if lower else torch.triu(Z, 1)
    A = L - transpose(L)
    if Z.is_complex():
        # Note [The imaginary diagonal under torch.compile(grad)]
        # Read as diag_embed(i·diagonal(Z).imag), torch 2.13's inductor got the gradient of the chart wrong
        # under torch.compile(torch.func.grad(f)), silently: 0.5-1.5 off eager and finite differences for
        # Unitary, complex Stiefel (square; tall under vmap) and, through diagonal(Z).real, complex PSSD under
        # vmap (torch's bug: the compiled grad of (c * (diagonal(z).sum() * z)).real.sum() is 2.9 off; with
        # diagonal(z.real) it is right; aot_eager is right). So the complex maps never take the diagonal of a
        # complex tensor they differentiate: the imaginary diagonal is selected by a mask here, and the real
        # diagonals (Hermitian, the PSD/PSSD eigenvalue coordinates) are read from Z.real. Values and eager
        # derivatives are the same bit for bit (tests/test_complex.py).
        A = A + imaginary_diagonal(Z)
    return A


def imaginary_diagonal(Z: Tensor, scale: float = 1.0) -> Tensor:
    """``diag(scale·i·Im diag Z)`` of a complex square ``Z``, selected by a mask (Note [The imaginary diagonal
    under torch.compile(grad)])."""
    eye = torch.eye(Z.shape[-1], dtype=torch.bool, device=Z.device)
    # resolve_conj: the .imag of a lazy conjugate (Z = W.mH, W.conj()) is a negative view, which has no
    # batching rule (vmap raised torch's "Batching rule not implemented for aten::_neg_view"); a no-op
    # for any other Z (Note [Real products under vmap])
    Z = Z.resolve_conj()
    return torch.where(eye, (scale * 1j) * Z.imag, torch.zeros((), dtype=Z.dtype, device=Z.device))


def skew_lower_inverse(A: Tensor, lower: bool = True) -> Tensor:
    """Right inverse of :func:`skew_lower` on skew matrices: their strict lower (upper) triangle
    (with the imaginary diagonal for complex skew-Hermitian ``A``)."""
    d = 0 if A.is_complex() else 1
    return torch.tril(A, -d) if lower else torch.triu(A, d)


def sym_part(X: Tensor) -> Tensor:
    return 0.5 * (X + transpose(X))


def skew_part(X: Tensor) -> Tensor:
    return 0.5 * (X - transpose(X))


def cayley(A: Tensor) -> Tensor:
    """Cayley map ``(I − A/2)⁻¹(I + A/2)``: orthogonal for skew ``A``, with ``dφ_0 = Id``.

    Evaluated as ``2 (I − A/2)⁻¹ − I`` (the same matrix, for any ``A``): ``I + A/2 = 2I − (I − A/2)``,
    so one inverse replaces the solve with n right-hand sides, and the backward of ``inv``
    (``−M⁻ᵀ G M⁻ᵀ``, two matmuls, reusing ``M⁻¹ = (I + φ(A))/2``) replaces a transposed solve plus
    a matmul: ~1.2× faster forward + backward on CPU at n = 256…1024, same accuracy (``I − A/2``
    has singular values ≥ 1 for skew ``A``). Pure torch ops: every transform and
    ``torch.compile`` apply as they are.
    """
    I = eye_like(A)
    # inv() of a matrix with ±inf entries can return a finite, plausible matrix (and a zero gradient):
    # poison both (poisoned_zero: poison(A) alone is detached, so the gradient stayed 0). And inv() raises on an
    # exactly zero pivot, which a non-finite A (or one whose LU overflows, a raw scale ~1e30 in
    # float32) can produce: inv_ex is the same op (inv's value and derivatives, no error check, no
    # device sync) and leaves inf/NaN there instead (for a finite skew A, I − A/2 has singular
    # values ≥ 1 and never gets there in exact arithmetic; in floating point, see _cayley_far).
    return (2.0 * torch.linalg.inv_ex(I - 0.5 * A)[0] - I) * _cayley_far(A) + poisoned_zero(A)


# Note [Cayley too far to be a point]
# I − A/2 has condition number ≤ 1 + ‖A‖₂/2 for skew A, so the computed inverse, and the Cayley
# point, is off its group by ~u‖A‖/2. Past expm's bound for that error (Note [Too far to be a point] in
# geofunc/_expm.py: u·α > 1/64, float32 ‖A‖₁ ≈ 5e5) the point is finite noise: once u‖A‖ > 1 the
# identity is lost in I − A/2, which for odd n is then a singular skew matrix, and SO(3) at raw
# scale 1e15 in float32 (1e30 in float64) gave entries ~1e20. There the matrix gets NaN (value and
# gradient; a factor 1 or NaN per matrix, from ‖A‖₁ read without a graph): never a finite wrong point.
def _cayley_far(A: Tensor) -> Tensor | float:
    """1, or per matrix 1 (finite) or NaN where ``u‖A‖₁/2 > 1/64`` (Note [Cayley too far to be a point])."""
    u = _UNIT_ROUNDOFF.get(_real(A.dtype))
    if u is None or A.shape[-1] == 0:
        return 1.0
    return _one_or_nan(_colnorm1(A.detach()) <= 2.0 * _FAR / u, A.dtype)[..., None, None]


_TRIVS: dict[str, Callable[[Tensor], Tensor]] = {"expm": expm, "cayley": cayley}


def resolve_triv(triv: Triv) -> Callable[[Tensor], Tensor]:
    """Map a ``triv`` hyperparameter (``"expm"``, ``"cayley"`` or a callable) to a function; a callable's
    result is checked to be a tensor of its argument's shape and dtype (Note [A callable triv's result])."""
    if callable(triv):
        return functools.partial(_checked_triv, triv)
    return _TRIVS[triv]


# Note [A callable triv's result]
# A user's ``triv`` (skew → orthogonal) was used as it returned: one that dropped a row and column gave
# SO a (3, 3) point for a (4, 4) raw tensor, one that added a batch dim points of shape (2, 4, 4), one in
# float64 float64 points from float32, all without an error (the frame spaces raised torch's "mat1 and
# mat2 shapes cannot be multiplied" or "expected m1 and m2 to have the same dtype", a non-tensor an
# AttributeError). The shape and dtype are metadata (static under vmap and torch.compile): checked at
# each call, no value read.
def _checked_triv(triv: Callable[[Tensor], Any], A: Tensor) -> Tensor:
    Q = triv(A)
    if not isinstance(Q, Tensor) or Q.shape != A.shape or Q.dtype != A.dtype:
        got = f"a tensor of shape {tuple(Q.shape)} and dtype {Q.dtype}" if isinstance(Q, Tensor) else repr(Q)
        raise ManifoldError(f"`triv` {triv!r}: expected a result of its argument's shape {tuple(A.shape)} and dtype {A.dtype} "
                            f"(a map of skew matrices to orthogonal ones, skew-Hermitian to unitary), got {got}.")
    return Q


# Note [No generator=None]
# Every random draw of ``sample`` goes through _draw, which passes ``generator`` to torch only when
# there is one: torch.randn(shape, generator=None) takes the generator overload, whose kernel needs
# concrete sizes ("SymIntArrayRef expected to contain only concrete integers", torch 2.13), so
# inside torch.compile a sample of a symbolic shape (``M.sample(x.shape)`` once automatic dynamic
# shapes made the batch size symbolic) failed where torch.randn(x.shape) compiles.
def _draw(fn: Callable[..., Tensor], shape, generator, dtype, device) -> Tensor:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if generator is None:
        return fn(tuple(shape), dtype=dtype, device=device)
    return fn(tuple(shape), generator=generator, dtype=dtype, device=generator.device if device is None else device)


def _randn(shape, generator, dtype, device) -> Tensor:
    """A standard Gaussian of ``shape`` from ``generator`` (on its device unless ``device`` is given)."""
    return _draw(torch.randn, shape, generator, dtype, device)


def _rand(shape, generator, dtype, device) -> Tensor:
    """Uniform in [0, 1) of ``shape`` from ``generator`` (on its device unless ``device`` is given)."""
    return _draw(torch.rand, shape, generator, dtype, device)


def _sign_nonzero(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _phase(x: Tensor) -> Tensor:
    """``x/|x|`` (1 where ``x = 0``): the complex counterpart of :func:`_sign_nonzero`."""
    a = x.abs()
    return torch.where(a > 0, x / torch.where(a > 0, a, torch.ones_like(a)), torch.ones_like(x))


def haar_stiefel(shape, generator=None, dtype=None, device=None) -> Tensor:
    """Haar-uniform tall frames of shape ``(..., n, k)``, ``n >= k`` (QR of a Gaussian, signs fixed).

    Complex ``dtype``: QR of a complex Ginibre matrix with the phases of ``diag R`` moved into
    ``Q`` (Mezzadri, "How to generate random matrices from the classical compact groups", 2007).
    """
    G = _randn(shape, generator, dtype, device)
    Q, R = torch.linalg.qr(G)
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    d = _phase(diag) if diag.is_complex() else _sign_nonzero(diag)
    return Q * d.unsqueeze(-2)


def haar_so(shape, generator=None, dtype=None, device=None) -> Tensor:
    """Haar-uniform special orthogonal matrices of shape ``(..., n, n)``.

    The sign of the determinant is read from ``slogdet``: ``det`` underflows to ±0 for
    large float32 matrices (n = 512), which is how GeoTorch ends up with det −1 samples.
    """
    Q = haar_stiefel(shape, generator, dtype, device)
    sign = torch.linalg.slogdet(Q)[0]
    flip = torch.ones_like(Q[..., 0, :])
    flip = torch.cat([sign.unsqueeze(-1), flip[..., 1:]], dim=-1)
    # Note [Square samples in row-major layout]
    # QR returns Q column-major and the product keeps that layout, while the square spaces' maps
    # (SO, Unitary: the exponential chart, retractions) return row-major tensors: a compiled training
    # step (strides are guarded) compiled once for the sample and again after its first update. The
    # copy is once per sample; the values are the same. (Tall frames stay column-major: Stiefel's maps
    # return that layout, so its sample already matches them.)
    return (Q * flip.unsqueeze(-2)).contiguous()


# Note [NaN policy]
# A point with a NaN or inf entry has no well-defined image, and no map may return a plausible
# point for it (DESIGN §5); yet LAPACK-backed calls (svd, eigh, qr, cholesky, solve, slogdet)
# raise on it or return finite garbage. So every map that calls one computes
# ``f(sanitize(Y)) + poison(Y)``: the decomposition reads finite numbers, and the result is NaN
# exactly at the points whose input was not finite. ``poison`` is ``0·Σ y`` per point of the
# detached input: one pass, no allocation, traceable, no branch on values, no autograd node
# (``GLp.logabsdet`` reads n of n² raw entries: a backward through ``0·Z`` cost it 4× at n = 1024,
# ``Σ 0·y`` 1.5×). The sum overflows only for entries within a factor of the point's size of the
# largest float (3e32 in a float32 1024×1024), which count as not finite. A map whose value is
# constant adds ``0·z`` of one entry to stay in the graph. A violation plus ``poison(X)`` is NaN,
# which ``contains`` reads as False and ``check`` reports as inf. Products and elementwise maps
# need neither.
def sanitize(Y: Tensor) -> Tensor:
    """``Y`` with non-finite entries replaced by 0, for a LAPACK call (Note [NaN policy]).

    Real tensors: one ``nan_to_num`` (``where(isfinite(Y), Y, 0)`` is six ops, a cost at the sizes
    of a rank chart's r×r blocks); complex ones zero the whole entry."""
    if not Y.is_complex():
        return torch.nan_to_num(Y, nan=0.0, posinf=0.0, neginf=0.0)
    if dispatch_mode_active():  # torch's complex isfinite ands its parts in place (Note [In place under a dispatch mode])
        return torch.where(torch.isfinite(Y.real) & torch.isfinite(Y.imag), Y, torch.zeros_like(Y))
    return torch.where(torch.isfinite(Y), Y, torch.zeros_like(Y))


def poison(*tensors: Tensor | None, ndim: int = 2) -> Tensor:
    """0 per point, NaN where a point of any given tensor has a NaN/inf entry (Note [NaN policy]).

    A point is the last ``ndim`` dimensions; they are kept with size 1, so the result broadcasts
    against the points (``[..., 0, 0]`` is batch-shaped). ``None`` tensors are skipped.
    """
    dims = tuple(range(-ndim, 0))
    out = None
    for T in tensors:
        if T is not None:
            t = T.detach()
            t = (t.abs() if t.is_complex() else t).sum(dim=dims, keepdim=True) * 0.0  # real, also for complex T
            out = t if out is None else out + t
    assert out is not None
    return out


def poisoned_zero(Z: Tensor, *others: Tensor | None) -> Tensor:
    """0 per matrix, in ``Z``'s graph, ``(…, 1, 1)``: its value and its derivative are 0 where the point
    is finite and NaN where ``Z`` or one of ``others`` has a NaN/inf entry (Note [NaN policy]). Added to a
    map whose value does not read every entry of ``Z`` (a constant, a determinant of 1), it makes its
    gradient NaN there too, where ``poison`` alone (detached) leaves it finite."""
    return (Z * poison(Z, *others)).sum(dim=(-2, -1), keepdim=True)


def orthonormality_error(X: Tensor) -> Tensor:
    """``max |XᵀX − I|`` (``XᴴX`` if complex) per matrix of a tall (n ≥ k) batch (0 for k = 0)."""
    k = X.shape[-1]
    E = (transpose(X) @ X - eye_like(X, k)).abs()
    return E.sum(dim=(-2, -1)) if k == 0 else E.amax(dim=(-2, -1))  # amax has no value on an empty matrix


class _Rounding(threading.local):
    """The low-precision dtypes the results of the maps being evaluated will be rounded to (innermost
    last). Open spaces (GLp, FixedRank, PSD, ...) keep their values above a floor that must survive
    that rounding (√ε of bf16, not of float32): they read it through :func:`rounding_dtype`.

    One stack per thread: threads that share a space (``nn.DataParallel``'s replicas, a serving
    pool, a float32 training loop beside a bf16 evaluation) must not see each other's dtypes. A
    module-level list once gave a float32 ``GLp`` point the bf16 floor (0.084 off) whenever another
    thread was inside a bf16 call (tests/test_low_precision.py)."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []


_ROUNDING = _Rounding()


# Note [Bases stored in low precision]
# A bf16/fp16 call computes in float32 from the rounded base, a frame off by the dtype's rounding
# (fp16: ~1e-3). The tall chart φ(W) B amplifies that error 3–5× far from its centre, so at raw
# entries of ~10 one fp16 Stiefel point in ~1,300 came back off its space by more than fp16's 1e-2
# (1% at 100; a probe). Inside such a call (the thread's rounding stack is not empty) the frame
# chart first refines each base by one Newton–Schulz step (Note [Retractions that multiply]): the
# base is then orthonormal to float32's rounding; a float32 or float64 call is unchanged.


# Note [Retractions that multiply]
# The QR retraction qf(X + V) lands on the space to rounding whatever X's own rounding is. The group
# retractions X φ(skew(XᴴV)) (SO, Unitary, either triv; their expmap) and the canonical Stiefel step
# φ(W) X carry X's error along, and each step adds its own rounding: an optimizer's points drifted
# off the space linearly in the number of steps (a probe: radam on SO in float32 failed `contains`
# after ~1,400 steps, SO(triv="cayley") ~500, Unitary ~2,600, canonical Stiefel ~2,750; in bf16, whose
# every step rounds the point to 8 bits, SO was 0.19 off after 100 steps). So these maps refine
# by one Newton–Schulz step toward the polar factor, X (3I − XᴴX)/2 (first X; now the step's result,
# which carries X's rounding and, on long steps, φ's own error: Note [Long steps on the group] in
# geofunc/spaces/_orthogonal.py): with XᴴX = I + E, the
# refined Gram matrix is I − ¾E² + O(E³), so a point off by rounding ε comes back to ~ε² (bf16's 0.03
# to 1e-3, float32's 1e-6 below rounding), and an exact point is unchanged. Its derivative at a point
# is the tangent projection of the perturbation, so the maps' derivatives along tangent directions,
# and their first order, are as they were. Two products of k×k and n×k (n×n for the groups).
def refine_frame(X: Tensor) -> Tensor:
    """``X (3I − XᴴX)/2`` for a tall ``X`` (n ≥ k) orthonormal up to rounding: one Newton–Schulz step
    toward its polar factor (Note [Retractions that multiply])."""
    return _add_product(X, X, transpose(X) @ X, 1.5, -0.5)


_DRIFT_EPS = 64  # Note [Rebased frames refined] (geofunc/spaces/_orthogonal.py)


def refine_drifted(X: Tensor) -> Tensor:
    """The tall frames ``X`` (n ≥ k) refined by one Newton–Schulz step, ``X (3I − XᴴX)/2``, where
    ``max|XᴴX − I| > 64ε``; the others as they are, bit for bit (Note [Rebased frames refined] in geofunc/spaces/_orthogonal.py)."""
    if 0 in X.shape[-2:]:  # the empty frame is exact
        return X
    G = transpose(X) @ X  # one Gram matrix: the measure and the step's
    off = (G - eye_like(X, G.shape[-1])).abs().amax(dim=(-2, -1), keepdim=True) > _DRIFT_EPS * torch.finfo(X.dtype).eps
    return torch.where(off, _add_product(X, X, G, 1.5, -0.5), X)


def _add_product(C: Tensor, A: Tensor, B: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta C + alpha A B`` in one kernel (addmm/baddbmm) where the shapes allow, else three."""
    if C.ndim == A.ndim == B.ndim and C.shape[:-2] == A.shape[:-2] == B.shape[:-2]:
        if C.ndim == 2:
            return torch.addmm(C, A, B, beta=beta, alpha=alpha)
        if C.ndim == 3:
            return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    if beta == 1.0 and alpha == -1.0:  # (the same values as below, the scalings by ±1 being exact: two ops fewer)
        return C - A @ B
    return beta * C + alpha * (A @ B)


def chol_qr(Y: Tensor) -> Tensor:
    """Orthonormal factor of the QR decomposition (positive diagonal) of tall ``Y``.

    CholeskyQR2: two passes of ``Q = Y R^{-1}``, ``RᵀR = YᵀY``; O(n k²), smooth where
    ``Y`` has full column rank, and accurate to rounding after the second pass. A
    non-finite ``Y``, or one without a QR factor in its dtype (numerically rank-deficient), gives NaN
    (Note [Numerically rank-deficient QR]), never an exception or a finite frame off the manifold.
    """
    if Y.shape[-1] and Y.shape[-2]:  # Note [Scale of CholeskyQR]
        big = Y.detach().abs().amax(dim=(-2, -1), keepdim=True)
        nan, Y = big * 0.0, sanitize(Y / big)
    else:
        nan, Y = poison(Y), sanitize(Y)
    for _ in range(2):
        R, _ = torch.linalg.cholesky_ex(transpose(Y) @ Y, upper=True)
        Y = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return torch.addcmul(nan, Y, qr_trust(R))  # nan + Y·trust in one pass


# Note [Scale of CholeskyQR]
# Q is the same for Y and cY (c > 0), but the Gram matrix YᵀY overflows once Y's entries pass
# √(largest float)/√n: a full-rank, well-conditioned step of 1e20 (float32) was NaN (a probe found it).
# So Y is divided by its largest |entry| first (detached: Q(Y/c) = Q(Y) for a constant c, so the
# derivatives are Q's). That largest entry is also the NaN policy's test (NaN, or inf, where Y has a
# NaN or an inf: it replaces poison's sum), and the quotient is sanitized (a bad or all-zero Y gives
# zeros to LAPACK, and NaN at the end). Two small ops more than unscaled (benchmarks/REFACTOR-session-2026-12-05c.md).
# Note [Numerically rank-deficient QR]
# CholeskyQR2 is exact to rounding while the first pass's Gram matrix YᵀY (condition number cond(Y)²)
# is numerically positive definite. Past that (a retraction step X + V of rank < k, or one whose
# scale hides X: Grassmannian at 5×3 with a rank-1 V of 1e15) Cholesky stops early and leaves
# garbage in the rest of R: the "frame" was finite and 1 to 1e29 off (a zero column; entries ~1e15).
# The second pass's factor R₂ tells: its diagonal is 1 + O(cond(Y)² u) where the first pass worked.
# Per matrix the result is NaN where that diagonal is off 1 by more than 1/2. Over ~30,000 frames
# (5×3 to 64×16, steps of every rank < k at scales 1 to 1e30, float32 and float64) that left no
# finite frame more than 1/64 off; reading the Cholesky failure flags as well changed nothing but
# cost two more small ops. The check's few small ops are what a small retraction costs: a batch of
# 8 frames of 32×8 (float64) 66 → 104 µs, of 128×64 1.04× (benchmarks/compare.py). Frames it turns
# to NaN are steps without a QR factor in the dtype (or an orthonormal frame that is not that factor).
def qr_trust(R2: Tensor) -> Tensor:
    """Per matrix 1, or NaN where CholeskyQR2's second-pass factor ``R2`` says it gave no QR factor (Note
    [Numerically rank-deficient QR]); ``(…, 1, 1)``, no graph."""
    if R2.shape[-1] == 0:  # the empty frame (St(n, 0)'s one point)
        return torch.ones((), dtype=_real(R2.dtype), device=R2.device)
    d = R2.detach().diagonal(dim1=-2, dim2=-1)
    return _one_or_nan((d - 1.0).abs().amax(dim=-1) <= 0.5, R2.dtype)[..., None, None]


def frame_chart(Z: Tensor, base: Tensor | None, triv: Triv, *, horizontal: bool = False, packed: bool = False) -> Tensor:
    """The chart of tall n×k frames (n ≥ k) centred at ``base`` (None: ``I[:, :k]``): the one frame
    chart of Stiefel, Grassmannian and the rank/PSD family.

    * Square (n = k): ``base · φ(skew_lower(Z))``; ``horizontal`` (a square frame spans all of
      Rⁿ): the constant ``base``, written from ``Z`` so that NaN propagates.
    * Tall: ``φ(W(Z)) base`` with the skew generator of :func:`_tall_chart`, O(n k²).
    * ``packed``: ``Z`` holds coordinates in an orthonormal basis adapted to ``base``
      (:func:`_packed_direction`), so that the chart's differential at ``Z = 0`` is an isometry
      onto the tangent space at every base; at ``base = None`` the two readings agree.
    """
    return frame_charts([(Z, base)], triv, horizontal=horizontal, packed=packed)[0]


def frame_charts(pairs: list[tuple[Tensor, Tensor | None]], triv: Triv, *, horizontal: bool = False,
                 packed: bool = False) -> list[Tensor]:
    """:func:`frame_chart` of several ``(Z, base)`` pairs (the U and V frames of an SVD-type point).

    The same maps; the generators of equal size go through ``φ`` (``expm``, ``cayley``) as one
    batch: one call instead of one per frame (one degree choice; each call has a fixed cost, under
    ``torch.func`` more than an 8×8 exponential's arithmetic). ``expm`` picks its degree for the
    whole batch and each frame's own squarings (Note [Squarings per matrix]), so a frame may be
    evaluated at a higher degree: the same point to rounding.
    """
    if _ROUNDING.dtypes:  # a bf16/fp16 call: its bases' rounding refined first (Note [Bases stored in low precision])
        pairs = [(Z, None if base is None else refine_frame(base)) for Z, base in pairs]
    if not callable(triv) and _stackable(pairs):
        return _stacked_tall_charts(pairs, triv, horizontal, packed)
    parts = [_chart_parts(Z, base, triv, horizontal, packed) for Z, base in pairs]
    gens = [A for A, _ in parts if A is not None]
    # Note [Sizes compared, not hashed]: a set of the sizes would hash them, which under torch.compile
    # with dynamic shapes specializes each to its value (GLp, SL, square AlmostOrthogonal: one graph per
    # matrix size, then eager past the recompile limit); == adds a guard between sizes only.
    if callable(triv) or len(gens) < 2 or any(A.shape[-1] != gens[0].shape[-1] for A in gens[1:]):
        return [finish(None if A is None else resolve_triv(triv)(A)) for A, finish in parts]
    F = resolve_triv(triv)(torch.stack(torch.broadcast_tensors(*gens)))
    Fs = iter(F.unbind(0))
    return [finish(None if A is None else next(Fs)) for A, finish in parts]


def _stackable(pairs: list[tuple[Tensor, Tensor | None]]) -> bool:
    """Whether :func:`_stacked_tall_charts` applies: two or more tall frames (n > k) of one width,
    dtype and device, all plain tensors or parameters (no subclass such as DTensor), either all at
    least 2k rows tall or none taller than 4k rows."""
    if len(pairs) < 2:
        return False
    Z0 = pairs[0][0]
    k = Z0.shape[-1]
    for Z, base in pairs:
        for T in (Z, base):
            if T is None:
                continue
            if type(T) not in _PLAIN_TYPES or T.dtype != Z0.dtype or T.device != Z0.device:
                return False
        if Z.shape[-1] != k or Z.shape[-2] <= k:
            return False
    # frames narrower than 2k take the n×n generator (Note [Reduced tall chart]): stacked, padded to the
    # tallest frame, only while that stays small
    rows = [Z.shape[-2] for Z, _ in pairs]
    return min(rows) >= 2 * k or max(rows) < 4 * k


def _stacked_tall_charts(pairs: list[tuple[Tensor, Tensor | None]], triv: Triv, horizontal: bool,
                         packed: bool) -> list[Tensor]:
    """:func:`frame_charts` of tall frames of one width k as one batch: every frame's maths is a
    handful of small ops, so the U and V frames of a rank-type point (n×r and k×r) cost one set of
    ops instead of two (Note [Stacked frames])."""
    # Note [Stacked frames]
    # Frames of different heights m ≤ n are zero-padded to n rows: with Y = [Y; 0] and Z = [Z; 0]
    # every step of the chart (the packed direction, whose polar factor and (I + P_Y)⁻¹ read only
    # the top k×k block and the Gram matrices YᵀΔ, CᵀC) gives [frame; 0], exactly (the padding
    # adds exact zeros to each sum), so the first m rows are the frame. A missing base is the
    # identity frame, where the packed and plain readings agree (Δ = Z, with exact zeros), so a
    # pair with a base and one without share the packed path.
    st = _stack_pairs(pairs, triv, packed)
    n, k = st.Z.shape[-2:]
    X = _one_node_chart(st.Y, st.Z, triv, st.packed, horizontal, st.basis) if st.reduced else None
    if X is None:
        X = _tall_chain(st.Y, st.Z, triv, st.packed, horizontal, st.reduced)
    X = X.reshape((len(pairs),) + st.batch + (n, k))
    return [X[i, ..., :m, :] for i, m in enumerate(st.rows)]


class _Stacked:
    """The frames of :func:`_stacked_tall_charts` as one batch: coordinates ``Z`` and bases ``Y``
    (``(len(pairs)·B, n, k)``, zero-padded to the tallest frame's ``n`` rows), the cached packed basis
    or None, whether the packed reading applies, each frame's rows, the common batch shape, and whether
    every frame is at least 2k rows tall (else the n×n generator: Note [Reduced tall chart])."""

    __slots__ = ("Y", "Z", "basis", "packed", "rows", "batch", "reduced")


def stack_matrices(Ts: list) -> Tensor:
    """``torch.stack(Ts)`` with its leading dims flattened: ``(len · batch, n, k)``. The leading size is
    written out: ``reshape(-1, n, k)`` is ambiguous on an empty tensor, which is what ``vmap`` over an
    empty batch hands it, and ``flatten`` has no batching rule in torch.autograd.functional's
    vectorized backward."""
    S = torch.stack(Ts)
    return S.reshape(math.prod(S.shape[:-2]), S.shape[-2], S.shape[-1])


class Shape:
    """A coordinate tensor's shape alone, in the pairs of :func:`_stack_pairs` when the caller stacks the
    coordinates itself."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _stack_pairs(pairs: list[tuple[Any, Tensor | None]], triv: Triv, packed: bool, like: Tensor | None = None) -> _Stacked:
    """Stack the ``(coordinates, base)`` pairs of :func:`_stacked_tall_charts` (Note [Stacked frames]).
    ``like``: leave the coordinates to the caller (``st.Z`` None; the rank chart's node gathers them from
    its raw tensor: Note [Rank chart coordinates by index] in ``geofunc/spaces/_factorized.py``), whose
    pairs then give their shapes only (a :class:`Shape` will do) and ``like`` the dtype and device."""
    rows = [Z.shape[-2] for Z, _ in pairs]
    n, k = max(rows), pairs[0][0].shape[-1]
    shapes = [tuple(T.shape[:-2]) for pair in pairs for T in pair if T is not None]
    # one batch shape (the usual case) without torch.broadcast_shapes' Python (~5% of a LowRank(4) forward)
    # (== per shape, not list.count, whose identity test Dynamo cannot trace on symbolic shapes: dynamic=True)
    batch = shapes[0] if all(s == shapes[0] for s in shapes) else tuple(torch.broadcast_shapes(*shapes))

    def stack(Ts: list[Tensor]) -> Tensor:
        Ts = [T if T.shape[:-2] == batch else T.expand(batch + T.shape[-2:]) for T in Ts]
        return stack_matrices([T if T.shape[-2] == n else torch.nn.functional.pad(T, (0, 0, 0, n - T.shape[-2])) for T in Ts])

    st = _Stacked()
    st.Z = Z = stack([Z for Z, _ in pairs]) if like is None else None
    like = Z if like is None else like
    st.reduced = min(rows) >= 2 * k  # a narrower frame, even padded, needs the n×n generator
    st.basis = None
    if all(base is None for _, base in pairs):
        st.Y = torch.eye(n, k, dtype=like.dtype, device=like.device).expand((len(pairs) * math.prod(batch), n, k))
        packed = False  # at the identity frame the packed and plain readings agree
    else:
        cached = _cached_basis(pairs, n) if st.reduced and packed and _ONE_NODE and triv == "expm" else None
        if cached is not None:
            st.Y, st.basis = cached
        else:
            st.Y = stack([torch.eye(m, k, dtype=like.dtype, device=like.device) if base is None else base
                          for (_, base), m in zip(pairs, rows)])
    st.packed, st.rows, st.batch = packed, rows, batch
    return st


# Note [Base factor cache]
# The rank family's U and V frames are charted at bases that are data: from_manifold's, the same
# tensors step after step until a rebase. The stacked base Y and its packed basis (W, J) (the polar
# factor of its top block by an SVD, a Cholesky solve: ~30 small ops, a quarter of a LowRank(4) chart's
# forward at 10×128) are functions of the bases' values alone, so the one-node chart keeps them per
# pair of base tensors and reuses them while those tensors hold the same values. The check is by value
# (torch.equal against a copy, one op per base), not by the version counter, which writes through
# ``.data`` or a NumPy view do not bump: a hit gives bit for bit the tensors the chart would compute.
# Only calls on plain tensors (no torch.func level, no forward mode, not compiling) at constant bases on
# the CPU use it (on an accelerator the comparison would wait for the device). Under torch.func.grad,
# jvp or vmap that includes the README's step: the chart's node is a custom Function, whose forward
# runs on the plain tensors below the transforms; a base that is differentiated carries a level or
# requires grad and is never cached (tests/test_fastpaths.py compares every transform bit for bit).
# At most _BASIS_CACHE_SIZE pairs are kept, each with weak references to its bases: an entry goes when
# one of its bases is freed.
# Measured (1 thread, float32, A/B in one process, a shared and loaded box): LowRank(4) 10×128 forward
# 0.75×, forward and backward 0.64–0.81×, under torch.func.grad 0.64–0.92×; the README step 0.90–0.95×
# (grad) and 0.92–0.95× (backward()), ~0.25 ms saved in each. Values and gradients are bit for bit the same.
_BASIS_CACHE = True  # tests and benchmarks switch it off to compare
_BASIS_CACHE_SIZE = 32
_BASIS_ENTRIES: dict[tuple, tuple] = {}
_BASIS_LOCK = threading.Lock()  # threads that share a module (DataParallel's replicas, a thread pool) share the cache


# Note [Locks across fork]
# A fork copies a lock in the state it is in, and only the forking thread: where another thread was
# inside one of geofunc's cache locks (this one, _LAYOUT_LOCK and _SKETCH_LOCK in spaces/_factorized.py)
# at the fork (a DataLoader with num_workers > 0 started beside a serving or training thread), the child's copy
# stayed held by a thread the child does not have, and the child's first insertion deadlocked (its
# first chart of a new shape: a worker that hung silently). The dicts they guard are consistent at any
# fork (their operations are atomic under the GIL), so the child only needs new, free locks.
def _fresh_basis_lock() -> None:
    global _BASIS_LOCK
    _BASIS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_fresh_basis_lock)


def _cached_basis(pairs: list[tuple[Tensor, Tensor | None]], n: int) -> tuple[Tensor, tuple[Tensor, Tensor]] | None:
    """``(Y, (W, J))`` of the stacked bases of ``pairs`` (Note [Base factor cache]), or None (not cacheable:
    the caller stacks the bases and the chart computes the factors)."""
    if (not _BASIS_CACHE or torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or make_fx_tracing()):  # (the bases may be the trace's inputs: Note [The base factor cache under a dispatch mode])
        return None
    bases = [base for _, base in pairs]
    if forward_tangents(*bases):  # forward mode: tangents of the bases (Note [Dual levels and recomputation])
        return None
    Z0 = pairs[0][0]
    grad_mode = torch.is_grad_enabled()
    for B in bases:
        if (B is None or type(B) is not torch.Tensor or B.device.type != "cpu" or B.dtype not in _FAST_DTYPES
                or B.is_complex() or (grad_mode and B.requires_grad) or B.shape[:-2] != Z0.shape[:-2]):
            return None
    if dispatch_mode_active():  # Note [The base factor cache under a dispatch mode]
        with _disable_current_modes():
            return _cached_basis_values(bases, n)
    return _cached_basis_values(bases, n)


# Note [The base factor cache under a dispatch mode]
# A miss computes the factors (~30 ops), a hit compares the bases with their copies (torch.equal): a
# chart's ops depend on whether an earlier call saw its bases. A TorchDispatchMode sees them as the
# chart's. Selective activation checkpointing hands each saved op output back in the recomputation by
# (op, call index): a first forward (a miss) inside a checkpointed region, recomputed as a hit, raised
# "aten.equal.default encountered during backward but not found in storage", and a miss's saved
# outputs shifted onto the chart's own later calls of the same ops. Under FakeTensorMode with real
# bases (allow_non_fake_inputs=True) the comparison raised DataDependentOutputException. The cache is
# a function of the bases' values alone, so it runs with the modes switched off; while make_fx traces
# (the bases may be the trace's inputs) it is not used.
# Note [The base factor cache under inference mode]
# An entry made under torch.inference_mode() (an evaluation pass before training, at the bases training
# then reads) held inference tensors, and the charts after it read them: a differentiated one saves the
# stacked base and its factors for backward, and a double backward (create_graph=True: a gradient
# penalty, a Hessian-vector product) raised "Inference tensors cannot be saved for backward". An entry
# is made with inference mode off (a normal tensor reads as well under inference mode).
def _cached_basis_values(bases: list[Tensor], n: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    key = (n,) + tuple(id(B) for B in bases)
    entry = _BASIS_ENTRIES.get(key)
    if entry is not None:
        refs, copies, Y, basis = entry
        if all(r() is B for r, B in zip(refs, bases)) and all(
                C.shape == B.shape and C.dtype == B.dtype and torch.equal(C, B) for C, B in zip(copies, bases)):
            return Y, basis
        _BASIS_ENTRIES.pop(key, None)
    with torch.inference_mode(False), torch.no_grad():  # Note [The base factor cache under inference mode]
        copies = [B.detach().clone() for B in bases]
        Y = stack_matrices([C if C.shape[-2] == n else torch.nn.functional.pad(C, (0, 0, 0, n - C.shape[-2]))
                            for C in copies])
        basis = _packed_basis(Y, constant=True)

    def drop(_: Any) -> None:  # a base was freed: so is its entry
        _BASIS_ENTRIES.pop(key, None)

    with _BASIS_LOCK:
        while len(_BASIS_ENTRIES) >= _BASIS_CACHE_SIZE:
            _BASIS_ENTRIES.pop(next(iter(_BASIS_ENTRIES)), None)
        _BASIS_ENTRIES[key] = ([weakref.ref(B, drop) for B in bases], copies, Y, basis)
    return Y, basis


def _chart_parts(Z: Tensor, base: Tensor | None, triv: Triv, horizontal: bool, packed: bool) -> tuple[Tensor | None, Finish]:
    """``(A, finish)``: the frame chart of ``Z`` at ``base`` is ``finish(φ(A))`` (``A`` None: no ``φ``)."""
    n, k = Z.shape[-2], Z.shape[-1]
    if n == k:
        if horizontal:
            Y = eye_like(Z).expand_as(Z) if base is None else base
            return None, lambda _: Y + 0.0 * Z  # constant map; keeps NaN propagation and a (zero) gradient
        return skew_lower(Z), lambda R: R if base is None else base @ R
    if base is None:
        base = torch.eye(n, k, dtype=Z.dtype, device=Z.device).expand_as(Z)
        packed = False  # at the identity frame the packed and plain readings agree
    X = _one_node_chart(base, Z, triv, packed, horizontal)
    if X is not None:
        return None, lambda _: X
    if packed:
        Z = _packed_direction(base, Z)
    return _tall_chart(base, Z, triv, horizontal)


_FRAME_K = 32  # frames at least this wide take frame_columns (narrower ones were slower: Note [Frame exponential])


# Note [Reduced tall chart]
# The 2k×2k matrix M = [[Ω, −CᵀC/c], [c I, 0]] of the tall chart represents W on the basis
# A = [Y, C/c], which is singular where C = (I − YYᵀ)Z has rank < k: always when n < 2k (rank C ≤
# n − k). Along a null vector v of CᵀC the bottom block only receives (y' = c x): exp(M)'s entries
# there grow like c, are multiplied by C/c's rounding-level component along v, and the squarings
# (s ≈ log₂ ‖M‖) amplify that error. Measured (float64, Stiefel 5×3, 7×4, 9×5, 33×32; Z ~ N(0, 1)
# times a scale): ‖XᵀX − I‖ 1e-8 at scale 1e4, 1e-2 at 1e6, 1e18 at 1e8 (a finite, wrong point);
# float32 2e-2 to 7e-2 at scale 1e3. So frames with n < 2k take W itself, an n×n matrix (no larger
# than M), built skew to the last bit (B − Bᵀ): its exponential is orthogonal up to the exponential's
# own backward error, ~u‖W‖ (float64 1e-8 at scale 1e8, float32 ~2e-5 at scale 1e3), as
# torch.linalg.matrix_exp's. For Stiefel this was also faster (no 2k×2k matrix: 5×3, 9×5, 48×32, 7×4
# Grassmannian forward and backward 0.74–0.92×). The rank family's U and V frames stack on this route
# (padded with zero rows, exact as in Note [Stacked frames]) while the tallest is under 4k rows; a
# tall frame beside a narrow one otherwise takes its own path.
# Frames with n ≥ 2k keep M: C generically has rank k. Where it does not (a raw tensor whose part
# outside the base is of low rank, e.g. one rank-1 SGD step from a rebase), M degrades the same way,
# but only far out: float64 ‖XᵀX − I‖ 2e-7 at raw norm ~1e5 (20×4 and 64×16, C of rank 1 and 3),
# float32 up to 1e-4 at raw norm 100, 2e-3 at 300 and 4e-2 at 1e3 (6×2 to 64×16, C of rank 1; an
# earlier sample of ranks 1 and 3 read ≤ 5e-5 and 8e-4), then noise: past 1/64 the frame is NaN
# (Note [Reduced chart too far to be a point]; the README's "Extreme raw scales").


def _reduced(Y: Tensor) -> bool:
    """Whether the tall chart at the n×k frame ``Y`` takes the 2k×2k matrix ``M`` (n ≥ 2k) rather than the
    n×n generator ``W`` (Note [Reduced tall chart])."""
    return Y.shape[-2] >= 2 * Y.shape[-1]


def _tall_chart(Y: Tensor, Z: Tensor, triv: Triv, horizontal: bool, reduced: bool | None = None) -> tuple[Tensor, Finish]:
    """The Stiefel chart at a tall frame ``Y`` (n×k, n > k), ``φ(W(Z)) Y``, as ``(A, finish)`` (:func:`_chart_parts`).

    ``W(Z) = Y Ω Yᵀ + C Yᵀ − Y Cᵀ`` with ``Ω`` the skew matrix of the strict lower
    triangle of ``YᵀZ`` (zero if ``horizontal``, the Grassmannian) and
    ``C = (I − YYᵀ) Z``. With ``A = [Y, C/c]`` one has ``W A = A M`` for the 2k×2k
    matrix ``M = [[Ω, −CᵀC/c], [cI, 0]]``, hence ``φ(W) Y = A φ(M)[:, :k]`` for every
    analytic ``φ`` (``expm``, ``cayley``): O(n k²) work plus a 2k×2k problem, smooth at
    ``Z = 0`` (no QR of ``C``). ``c = max(10⁻³, √‖CᵀC‖₁)`` (detached; the result does not
    depend on it) balances ``M`` so that its norm is that of ``W``. A user callable ``triv`` only
    promises skew → orthogonal on n×n matrices, so it gets the full ``W``; so do frames with n < 2k
    (``reduced`` False; None: decided from ``Y``'s shape), where ``A`` is singular and ``M`` loses
    orthogonality at large generators (Note [Reduced tall chart]). For ``expm`` on frames of
    ``_FRAME_K`` or more columns, in plain eager mode and under ``torch.compile``, ``expm(M)[:, :k]``
    is evaluated by blocks on those k columns (:func:`geofunc._expm.frame_columns`, Note [Frame
    exponential]); then ``A`` is None and ``finish`` ignores its argument.
    """
    k = Y.shape[-1]
    if callable(triv) or not (_reduced(Y) if reduced is None else reduced):
        S = _mm(transpose(Y), Z)
        C = _mm_add(Z, Y, S, alpha=-1.0)
        if horizontal:
            B = C @ transpose(Y)
        else:  # W = B − Bᵀ = Y Ω Yᵀ + C Yᵀ − Y Cᵀ with Ω = skew_lower(S) = L − Lᵀ (+ i·diag(Im S) if complex)
            L = torch.tril(S, -1)
            if S.is_complex():  # the diagonal by a mask (Note [The imaginary diagonal under torch.compile(grad)])
                L = L + imaginary_diagonal(S, 0.5)
            B = (Y @ L + C) @ transpose(Y)
        return B - transpose(B), lambda R: R @ Y  # skew to the last bit (B − Bᵀ), so φ(W) is orthogonal to rounding
    C, Omega, CtC, c = _tall_generator(Y, Z, horizontal)
    if triv == "expm" and k >= _FRAME_K:
        # only the first k columns of expm(M), by blocks (Note [Frame exponential] in geofunc/_expm.py)
        F = frame_columns(Omega, -CtC / c, c)
        if F is not None:
            return None, lambda _: _trusted(_mm_add(_mm(Y, F[..., :k, :]), C / c, F[..., k:, :]), c)
    return _frame_matrix(Omega, -CtC / c, c), lambda F: _trusted(_mm_add(_mm(Y, F[..., :k, :k]), C / c, F[..., k:, :k]), c)


# Note [Reduced chart too far to be a point]
# Where C = (I − YYᵀ)Z has numerical rank < k (Note [Reduced tall chart]), the 2k×2k chart's error
# grows faster than the exponential's u·α. Measured (Stiefel 6×2, 20×4, 64×16 at a base, Z of rank
# 1, max over 5 draws of max|XᵀX − I|): float32 2e-3 at raw norm 300, 4e-2 at 1e3, 0.6 to 88 at 1e4
# and finite noise up to 1e17 at 1e5 (past ~1e6 expm's own rule gives NaN); float64 7e-3 at 1e6,
# 7 to 450 at 1e7, noise at 1e8. So the reduced route's frame is checked, max|XᵀX − I| per frame
# (one k×k Gram matrix, no graph), and is NaN past expm's bound 1/64 (value and gradient): never a
# finite frame that far off. Below it such points are off by what the README's "Extreme raw
# scales" states. The eager one-node path checks only where the exponential squared (s > 0): with
# no squaring c ≲ θ_m and the error is ~u (the README step's operating point, α ≈ 3, costs nothing);
# the op chain (transforms, Cayley, complex, a base that requires grad) where u·c² > 1e-5 (_trusted),
# and inside torch.compile, or on meta and fake tensors (nothing to read), every call.
def _tall_far(X: Tensor) -> Tensor:
    """Per tall frame 1, or NaN where ``max|XᵀX − I| > 1/64`` (Note [Reduced chart too far to be a point]);
    ``(…, 1, 1)``, no graph. A NaN frame stays NaN (NaN compares False)."""
    with torch.no_grad():
        return _one_or_nan(orthonormality_error(X) <= _FAR, X.dtype)[..., None, None]


def _trusted(X: Tensor, c: Tensor) -> Tensor:
    """The op chain's reduced frame ``X``, NaN where it is too far off (Note [Reduced chart too far to be a
    point]). Where the balancing constants ``c`` can be read (eager, also under torch.func) and
    ``u·c² ≤ 1e-5`` (float32 c ≤ 13, float64 ≤ 3e5; the error there was ≤ 1e-5) the check is skipped:
    under vmap its ops cost 8–30% of a 64×16 chart. Inside torch.compile it always runs (no read;
    measured no slower)."""
    if not (torch.compiler.is_compiling() or make_fx_tracing()):
        u = _UNIT_ROUNDOFF.get(_real(X.dtype))
        cv = _values(c)
        if u is not None and type(cv) in _PLAIN_TYPES and cv.device.type != "meta":  # values to read
            cmax = _read_max(cv.detach())
            if u * cmax * cmax <= 1e-5:
                return X
    return X * _tall_far(X)


# Note [One-node tall chart]
# In plain eager mode the tall chart at a constant base (the usual case: bases are data, only the raw
# coordinates are trained) is one autograd node (_TallChart) with a hand-written adjoint, instead of
# the differentiable ops of the packed direction, the generator, the 2k×2k exponential and the finish
# (25 of the 51 autograd nodes of a LowRank(4) point, 14 of a Stiefel point's 16, each an op forward
# and one backward): at a rank chart's sizes (8×8 exponentials) those ops' fixed costs were the
# chart's cost. The forward runs the chain's ops on plain tensors, keeping what
# the adjoint needs, except that a constant base's (I + P_Y)⁻¹ Y_botᵀ is a Cholesky solve instead of
# an inverse (_packed_basis: the same to rounding); the adjoint is the reverse of each step:
#
#   out = Y F₁ + (C/c) F₂ with F = expm(M)[:, :k]:  Ḡ_F = [Yᵀ; (C/c)ᵀ] G,  Ḡ_C = G F₂ᵀ / c
#   M = [[Ω, R], [c I, 0]] (c constant):            (Ḡ_Ω, Ḡ_R) from expm's adjoint (or the frame one's)
#   R = −CᵀC/c:                                     Ḡ_C −= C (Ḡ_R + Ḡ_Rᵀ) / c
#   Ω = skew(tril(S, −1)):                          Ḡ_S = tril(Ḡ_Ω − Ḡ_Ωᵀ, −1)   (0 if horizontal)
#   C = Δ − Y S,  S = Yᵀ Δ:                         Ḡ_S −= Yᵀ Ḡ_C,  Ḡ_Δ = Ḡ_C + Y Ḡ_S
#   Δ = Y tril(P_top, −1) + [0; C_b] + W J C_b:     Ḡ_P = [tril(Yᵀ Ḡ_Δ, −1); Ḡ_Δ,bot + Jᵀ Wᵀ Ḡ_Δ]
#
# A backward that builds a graph (double backward, Hessian-vector products, the higher-derivative
# node under torch.func.grad) differentiates the chain recomputed from the saved input, so every
# derivative order is the chain's. Everything else takes the chain: a base that requires grad,
# torch.func transforms (though the one node under grad runs this inside, on plain tensors),
# forward mode, torch.compile (inductor fuses the chain), tensor subclasses, complex dtypes, the
# Cayley map and user maps.

_ONE_NODE = True  # tests switch it off to compare with the chain


def _one_node_chart(Y: Tensor, Z: Tensor, triv: Triv, packed: bool, horizontal: bool,
                    basis: tuple[Tensor, Tensor] | None = None) -> Optional[Tensor]:
    """The tall chart at a constant base as one node (Note [One-node tall chart]), or None: take the chain.
    ``basis``: the base's ``_packed_basis(Y, constant=True)``, already known (Note [Base factor cache])."""
    if not _ONE_NODE or triv != "expm" or not _reduced(Y) or not eager_fast(Y, Z):
        return None
    if forward_tangents(Y, Z, *(basis or ())):  # forward mode: the chain (Note [Dual levels and recomputation])
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(Z) or torch._C._functorch.is_functorch_wrapped_tensor(Y):
        return None  # a wrapper that outlived its transform
    grad_mode = torch.is_grad_enabled()
    if grad_mode and Y.requires_grad:
        return None
    if not (grad_mode and Z.requires_grad):
        return _tall_forward(Y, Z, packed, horizontal, basis)[0]
    return _TALL_APPLY(Z, Y, packed, horizontal, basis)


def _tall_forward(Y: Tensor, P: Tensor, packed: bool, horizontal: bool,
                  basis: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
    """The tall chart's frame from plain tensors (the chain's ops, no graph) and what its adjoint needs."""
    k = Y.shape[-1]
    W = J = None
    if packed:
        W, J = _packed_basis(Y, constant=True) if basis is None else basis
        D = _packed_apply(Y, W, J, P)
    else:
        D = P
    C, Omega, CtC, c = _tall_generator(Y, D, horizontal, plain=True)
    nc = -c
    R = CtC / nc  # −CᵀC/c, bit for bit; −c is kept for the adjoint
    # expm(M)'s first k columns as the chain takes them: by blocks from _FRAME_K columns on, else whole
    F, cache = (_frame_forward if k >= _FRAME_K else _frame_full)(Omega, R, c)
    Cc = C / c
    out = _mm_add(_mm(Y, F[..., :k, :]), Cc, F[..., k:, :])
    far = _tall_far(out) if cache["s"] > 0 else None  # Note [Reduced chart too far to be a point]
    if far is not None:
        out = out * far
    return out, {"W": W, "J": J, "C": C, "Cc": Cc, "c": c, "nc": nc, "Omega": Omega, "R": R, "F": F, "cache": cache,
                 "packed": packed, "horizontal": horizontal, "far": far}


def _tall_adjoint(st: dict, Y: Tensor, G: Tensor) -> Tensor:
    """The gradient of ``⟨G, chart⟩`` with respect to the chart's coordinates at the base ``Y`` (Note
    [One-node tall chart])."""
    C, Cc, c, F = st["C"], st["Cc"], st["c"], st["F"]
    k = Y.shape[-1]
    if st["far"] is not None:  # a NaN frame's gradient is NaN too
        G = G * st["far"]
    Yt = Y.mT
    GF = torch.cat([_mm(Yt, G), _mm(Cc.mT, G)], dim=-2)
    GO, GR = _frame_adjoint(st["Omega"], st["R"], c, st["cache"], GF)
    # The sums in the chain's order (products first, then added): fusing GC + Y GS into one addmm left
    # float32 gradients ~14% further from float64 (Grassmannian 40×8), GD being a projection of GC.
    GCtC = GR / st["nc"]  # −Ḡ_R/c
    GC = _mm(G, F[..., k:, :].mT) / c + _mm(C, GCtC + GCtC.mT)
    GS = -_mm(Yt, GC)
    if not st["horizontal"]:
        GS = GS + torch.tril(GO - GO.mT, -1)
    GD = GC + _mm(Y, GS)
    if not st["packed"]:
        return GD
    W, J = st["W"], st["J"]
    top = torch.tril(_mm(Yt, GD), -1)
    bottom = GD[..., k:, :] + _mm(J.mT, _mm(W.mT, GD))
    return torch.cat([top, bottom], dim=-2)


def _tall_chain(Y: Tensor, Z: Tensor, triv: Triv, packed: bool, horizontal: bool, reduced: bool | None = None) -> Tensor:
    """The tall chart as differentiable torch ops (what every mode but the one node runs)."""
    if packed:
        Z = _packed_direction(Y, Z)
    A, finish = _tall_chart(Y, Z, triv, horizontal, reduced)
    return finish(None if A is None else resolve_triv(triv)(A))


class _TallChart(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, P: Tensor, Y: Tensor, packed: bool, horizontal: bool,  # type: ignore[override]
                basis: tuple[Tensor, Tensor] | None = None) -> Tensor:
        out, st = _tall_forward(Y, P, packed, horizontal, basis)
        st["cache"].pop("powers", None)  # (for the compiled kernels: the adjoint reads P2 and P4 only)
        # Y too: an in-place change of the base before the backward is an error; the state as saved
        # tensors under saved-tensor hooks (Note [Node state as saved tensors] in geofunc/_fastpath.py)
        save_state(ctx, (P, Y), st)
        return out

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        (P, Y), st = saved_state(ctx)
        if torch.is_grad_enabled():  # a graph is asked for: the chain, recomputed (exact to every order)
            with torch.enable_grad():
                out = _tall_chain(Y, P, "expm", st["packed"], st["horizontal"])
                GP = torch.autograd.grad(out, P, G, create_graph=True)[0]
        else:
            GP = _tall_adjoint(st, Y, G)
            if GP.shape != P.shape:  # a base with more batch dimensions than the coordinates
                GP = GP.sum_to_size(P.shape)
        return GP, None, None, None, None


try:  # the C++ apply, without Function.apply's per-call argument binding (as _expm's _FRAME_APPLY)
    _TALL_APPLY = super(torch.autograd.Function, _TallChart).apply
except AttributeError:  # pragma: no cover (depends on the torch version)
    _TALL_APPLY = _TallChart.apply


def _tall_generator(Y: Tensor, Z: Tensor, horizontal: bool, plain: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(C, Ω, CᵀC, c)`` of the tall chart's ``M = [[Ω, −CᵀC/c], [c I, 0]]`` (:func:`_tall_chart`)."""
    S = _mm(transpose(Y), Z)
    C = _mm_add(Z, Y, S, alpha=-1.0)
    Omega = torch.zeros_like(S) if horizontal else skew_lower(S)
    # ‖M‖ ~ max(c, ‖CᵀC‖/c): c = √‖CᵀC‖₁ balances the two blocks, so ‖M‖ ~ ‖W‖ and the
    # exponential needs no more squarings than W's own; the floor keeps C/c finite at C = 0.
    CtC = _mm(transpose(C), C)
    # (‖·‖₁ as the columns' largest 1-norm: bit for bit linalg.matrix_norm(ord=1), whose composite
    # under grad with dynamic shapes hit an internal assert of torch 2.11's fake tensors, and one op
    # fewer than _colnorm1's abs, sum and amax)
    # (``plain``: tensors without a graph or tangents, as the one-node chart's forward has: no detach)
    c = torch.linalg.vector_norm(CtC if plain else CtC.detach(), 1, dim=-2, keepdim=True).amax(dim=-1, keepdim=True)
    return C, Omega, CtC, c.sqrt().clamp(min=1e-3)


# Note [Polar ties relative to σ₁]
# The polar factor is scale invariant (polar(c·A) = polar(A), c > 0), and so is SO's projection: their
# rank deficiency is relative, σᵢ + σⱼ below √ε·σ₁. The tolerance was √ε·max(1, σ₁), absolute below
# σ₁ = 1, and clamped the derivative's denominators for every full-rank input of small norm: the
# float32 gradient of Stiefel.project at a 6×3 input of entries ~1e-4 was 32% off, ~1e-5 92% off
# (float64: 0 from entries ~1e-12 on, SO(2) and Stiefel alike), silently. A = 0 keeps √ε.
# The relative tolerance stops at σ₁ = tiny^¼ (float32 3e-10, float64 1e-77): below it the second-order
# term (~1/σ², zero in value) overflowed, and its 0·inf made the first derivative NaN wherever it is
# computed (create_graph, torch.func): Stiefel/SO/AlmostOrthogonal.project at a float32 input of entries
# ~1e-20 (float64 ~1e-300) gave a NaN gradient, full rank or not. There the gradient is 0 as before.
def relative_tie_tol(s: Tensor) -> Tensor:
    """``√ε·max(σ₁, tiny^¼)`` (``(…, 1)``) of singular values ``s`` (``√ε`` where ``σ₁ = 0``): the tie
    tolerance of a scale-invariant SVD map (Note [Polar ties relative to σ₁])."""
    return torch.where(s.amax(-1, keepdim=True) > 0, spectral_tie_tol(s), math.sqrt(torch.finfo(s.dtype).eps))


def spectral_tie_tol(s: Tensor) -> Tensor:
    """``√ε·max(max|s|, tiny^¼)`` (``(…, 1)``): the spectral maps' default tie tolerance (Note [Spectral ties
    relative to the spectrum] in geofunc/spaces/_factorized.py); :func:`relative_tie_tol` is it with ``√ε``
    at a zero input."""
    fi = torch.finfo(s.dtype)
    return math.sqrt(fi.eps) * s.abs().amax(-1, keepdim=True).clamp(min=fi.tiny ** 0.25)


def polar(A: Tensor) -> Tensor:
    """Orthogonal polar factor ``U_p`` of ``A = U_p P`` (``P = (AᵀA)^{1/2}``; a tall or square ``A``, a wide
    one by its transpose; ``ᴴ`` if complex): the nearest frame in Frobenius norm, also where ``A`` is
    singular.

    Value ``U Vᵀ`` from the thin SVD ``U Σ Vᵀ`` of ``A.detach()``; exact first derivative (every
    transform) added as a term that is zero in value (Note [Polar derivative]). Where ``σᵢ + σⱼ``
    (or, tall, ``σᵢ``) is below ``√ε·σ₁`` (rank deficient: the factor is not unique there,
    any choice is orthogonal) the denominator is clamped to it, so derivatives stay finite. Second
    derivatives are exact too (Note [Second derivatives of spectral maps]). NaN/inf input gives NaN.
    """
    if A.shape[-2] < A.shape[-1]:
        return untall(polar(tall(A)[0]), True)
    mode = derivative_mode(A, first=True)
    if mode == "lazy":  # one plain-autograd node (Note [Lazy second-order terms])
        return closed_form_node(lambda: _polar(A, "vjp"), lambda a: _polar(a, "chain"), A)
    return _polar(A, mode)


def _polar(A: Tensor, mode: str) -> Any:
    """:func:`polar` of a tall or square ``A`` in ``mode`` (as ``_spectral_svd`` in
    ``geofunc/spaces/_factorized.py``: "none", "first", "chain" or "vjp")."""
    A0 = A.detach()
    U, s, Vh = torch.linalg.svd(sanitize(A0), full_matrices=False)
    Up = _mm(U, Vh) + poison(A0)
    if mode == "none":  # a constant base (the usual case), or vmap alone: the terms are 0 in value
        return Up
    tol = relative_tie_tol(s).unsqueeze(-1)  # Note [Polar ties relative to σ₁]
    den = (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp(min=tol)
    tall_ = A.shape[-2] > A.shape[-1]
    if mode == "vjp":

        def vjp(G: Tensor, U: Tensor, s: Tensor, Vh: Tensor, den: Tensor, tol: Tensor) -> Tensor:
            # the adjoint of the first-order term below (its tensors saved: Note [Node state as saved tensors])
            GV = G @ transpose(Vh)
            Gt = transpose(U) @ GV
            X = Gt / den
            gA = U @ (X - transpose(X))
            if tall_:
                gA = gA + (GV - U @ Gt) / s.unsqueeze(-2).clamp(min=tol)
            return gA @ Vh

        return Up, vjp, (U, s, Vh, den, tol)
    D = A - A0  # zero in value (NaN where A is not finite); carries every tangent
    DV = D @ transpose(Vh)
    M = transpose(U) @ DV  # Uᵀ dA V
    B = M - transpose(M)  # Vᵀ(U_pᵀ dA − dAᵀ U_p)V
    out = Up + U @ (B / den) @ Vh  # U_p Ξ = U_p V Ξ̃ Vᵀ = U Ξ̃ Vᵀ
    R = DV - U @ M if tall_ else None  # (I − UUᵀ) dA V
    if R is not None:  # the part of dA outside range(U): (I − UUᵀ) dA V Σ⁻¹ Vᵀ
        out = out + (R / s.unsqueeze(-2).clamp(min=tol)) @ Vh
    if mode == "first":  # one forward-mode level: the first-order term alone (Note [Lazy second-order terms])
        return out
    ones, zeros = torch.ones_like(s), torch.zeros_like(s)  # the SVD map of g = 1 (Note [Second derivatives of spectral maps])
    return out + _svd_second_order(U, s, Vh, ones, zeros, M, R, tol)


# Note [Polar derivative]
# The polar factor Q = U Vᵀ of A = U Σ Vᵀ (n ≥ k, full rank) is smooth in A, also where singular
# values repeat (at every frame itself: Σ = I), but torch.linalg.svd's backward divides by the gaps
# σᵢ² − σⱼ² and is NaN or wrong there (project of SO, Stiefel, Grassmannian and Unitary at a point on
# the space: NaN; near one, errors ~ε/δ² at distance δ; complex project under vmap(grad) raised in the
# SVD backward's phase check). The first derivative in closed form: with E = Uᵀ dA V (ᴴ if complex),
#   dQ = U Ξ̃ Vᵀ + (I − UUᵀ) dA V Σ⁻¹ Vᵀ,   Ξ̃ᵢⱼ = (E − Eᵀ)ᵢⱼ / (σᵢ + σⱼ),
# from QᵀdA − dAᵀQ = ΩP + PΩ (Ω = QᵀdQ skew, P = V Σ Vᵀ) and the part of dA outside range(U) (tall).
# It is added as a term that is zero in value (dA = A − A.detach()), so every transform sees it;
# the second-order term is that of the SVD map with g = 1 (Note [Second derivatives of spectral maps]).


# Note [Second derivatives of spectral maps]
# A spectral map F(S) = Q diag(h(λ)) Qᵀ of a symmetric (Hermitian) S = Q diag(λ) Qᵀ has, with
# Ẽ = Qᵀ dS Q (Daleckii–Krein, first and second order),
#   dF = Q (Ẽ ∘ Γ) Qᵀ,   ½ d²F = Q S₂ Qᵀ,   (S₂)ₗₚ = Σₘ Ẽₗₘ Ẽₘₚ h[λₗ, λₘ, λₚ],
# Γ the first divided differences h[λₗ, λₘ] and h[·,·,·] the second ones. Where λₗ ≠ λₚ,
# h[λₗ, λₘ, λₚ] = (Γₗₘ − Γₘₚ)/(λₗ − λₚ), so S₂ = ((Ẽ∘Γ)Ẽ − Ẽ(Ẽ∘Γ))/(λₗ − λₚ): two matrix products,
# no n×n×n tensor. Where they tie (|λₗ − λₚ| ≤ √ε·max(1, |λ|), as the first-order term's ties),
# h[λₗ, λₘ, λₗ] = (h′(λₗ) − Γₗₘ)/(λₗ − λₘ) =: Hₗₘ (h″/2 where λₘ ties too: 0 for every value map's
# projection, piecewise linear; the logarithms' h″ otherwise), and S₂ = ½((Ẽ∘H)Ẽ + Ẽ(Ẽ∘H)ᵀ) there.
# Finite at every tie; near ties of a smooth h: Note [Near ties of smooth spectral maps].
# The SVD maps U diag(g) Vᵀ of a tall n×k Y are the spectral map of the dilation [[0, Y], [Yᵀ, 0]]
# (eigenvalues ±sᵢ with vectors (uᵢ; ±vᵢ)/√2, and 0 on (w; 0), w ⊥ range U) with h odd
# (h(±sᵢ) = ±gᵢ, h = 0 on the complement). In the 2k eigenvectors (uᵢ; ±vᵢ)/√2,
# Ẽ = [[Sym A, −Skew A], [Skew A, −Sym A]] with A = Uᵀ dY V; the complement enters only through
# R = (I − UUᵀ) dY V (its block of Ẽ is [R, −R]/√2 in an orthonormal basis W of it, and Ẽ's
# complement–complement block is 0), so neither W nor any n×n matrix is formed: O(nk² + k³).
# The output is the top-right block of the dilation's Q S₂ Qᵀ. The term ½d²F[dY, dY] is added in
# the forward pass, zero in value (dY = Y − Y.detach()): its first derivative is 0 there and its
# second is exactly d²F, under autograd and every torch.func transform. Third and higher
# derivatives are not the map's. Tested against finite differences of the map's first derivative
# (tests/test_second_derivatives.py; the conformance property gradgradcheck: tangent, retract, project).


# Note [Near ties of smooth spectral maps]
# Γ = (hₗ − hₘ)/(λₗ − λₘ) carries the rounding of h, ε|h|/δ at a gap δ, and H = (h′ₗ − Γ)/δ then
# ε|h|/δ²: just above the tie tolerance (δ ≈ √ε) H was O(1) off for every h that is not piecewise
# linear (PSD's affine maps through X^±½, exp, log, √; SO's and the Grassmannian's logarithms):
# Hessian-vector products in the base of the affine transport and expmap 20–30% off where X's
# eigenvalues were 3e-8 apart (1e-4 at 1e-6; the transport 0.2% where Y was 1e-7 from X), of SO's logmap
# 15% at rotation angles 3e-8 apart, of the Grassmannian's 5% at principal angles 3e-8 apart. Given h″, pairs closer than x·s are near ties, s
# = |h′/h″| (capped at max(1, |λ|)) the scale on which h varies (λ for powers and the logarithm, 1 for
# exp), and take endpoint formulas without cancellation: Γ = (h′ₗ + h′ₘ)/2 + (λₗ − λₘ)(h″ₘ − h″ₗ)/12
# (the trapezoid rule with its end correction, error O(δ⁴h⁽⁵⁾)) below x = ε^⅕, H = (2h″ₗ + h″ₘ)/6
# (h[λₗ, λₘ, λₗ] = ∫₀¹ (1 − t) h″(λₗ + t(λₘ − λₗ)) dt with h″ linear, error O(δ²h⁽⁴⁾)) below
# x = (24ε)^⅓, where S₂ also takes (λₗ, λₚ) as tied (error O(δ²)); each formula is exact for a cubic
# and each switch balances truncation against rounding (against mpmath for √, 1/√, exp, log at
# eigenvalues 1e-3 to 30: H ≤ 1e-9 relative in float64 where it was up to 8e-4, Γ ≤ 1e-13; in float32
# H ≤ 6e-3 at gaps up to λ/10 where it was up to 0.4, Γ ≤ 1e-5 where it was up to 3e-3).

# Note [Zero singular values of a tall SVD map]
# The complement's rows of S₂ need h[0, λ_q, λ_p] (the complement's 0, then the dilation's ±s).
# For λ_p ≠ 0 it is (h[0, λ_q] − h[λ_q, λ_p])/(0 − λ_p). Where λ_p ties with 0 (a zero, or below
# the tie tolerance, singular value of Y) it is h[λ_q, 0, λ_p] = (h[λ_q, 0] − h[0, λ_p])/(λ_q − λ_p), and
# h[0, λ_p] = h′ at that value, g′ of it. Taking h[0, λ_q, 0] = h[λ_q, 0]/λ_q there instead (as
# before) assumed h′(0) = 0: right where the zero value is truncated (g = g′ = 0, LowRank(r) below
# min(n, k)), wrong where it is kept. LowRank(min(n, k)) on a non-square matrix is the identity
# (h(λ) = λ, every h[·,·,·] = 0), yet at a point with a zero singular value its second derivative
# came out 2.6 (also the wide one, through its transpose); square matrices have no complement.


def _divided(num: Tensor, dgi: Tensor, dgj: Tensor, den: Tensor, tol: Tensor) -> Tensor:
    """``num / den`` (a divided difference), ``(dgi + dgj)/2`` where ``|den| ≤ tol`` (ties)."""
    close = den.abs() <= tol
    return torch.where(close, 0.5 * (dgi + dgj), num / torch.where(close, torch.ones_like(den), den))


def _second_divided(lam: Tensor, h: Tensor, dh: Tensor, tol: Tensor,
                    d2h: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Γ, H, tie, safe)`` of the spectrum ``lam`` with values ``h``, slopes ``dh``: Γ the first divided
    differences (mean slope at ties), ``Hₗₘ = h[λₗ, λₘ, λₗ]`` (0 if ``d2h`` is None: a piecewise linear
    ``h``), the mask of the pairs that ``S₂`` takes as tied, and ``λₗ − λₚ`` with 1 there (a safe
    divisor). With the second derivatives ``d2h``, pairs closer than ``h``'s own scale are near ties
    (Note [Near ties of smooth spectral maps])."""
    dl = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    tie = dl.abs() <= tol
    if d2h is None:
        safe = torch.where(tie, torch.ones_like(dl), dl)
        gam = _divided(h.unsqueeze(-1) - h.unsqueeze(-2), dh.unsqueeze(-1), dh.unsqueeze(-2), dl, tol)
        return gam, torch.where(tie, torch.zeros_like(dl), (dh.unsqueeze(-1) - gam) / safe), tie, safe
    # Note [Near ties of smooth spectral maps]
    eps = torch.finfo(lam.dtype).eps
    a = dh.abs()
    scale = torch.minimum(torch.where(d2h != 0, a / d2h.abs(), torch.full_like(a, math.inf)), lam.abs().clamp(min=1.0))
    scale = torch.minimum(scale.unsqueeze(-1), scale.unsqueeze(-2))
    near1 = tie | (dl.abs() <= eps**0.2 * scale)  # Γ by the corrected trapezoid rule
    near2 = tie | (dl.abs() <= (24 * eps) ** (1 / 3) * scale)  # H by Hermite's rule; S₂'s ties
    dhi, dhj, d2i, d2j = dh.unsqueeze(-1), dh.unsqueeze(-2), d2h.unsqueeze(-1), d2h.unsqueeze(-2)
    gam = torch.where(near1, 0.5 * (dhi + dhj) + dl * (d2j - d2i) / 12,
                      (h.unsqueeze(-1) - h.unsqueeze(-2)) / torch.where(near1, torch.ones_like(dl), dl))
    safe = torch.where(near2, torch.ones_like(dl), dl)
    H = torch.where(near2, (2 * d2i + d2j) / 6, (dhi - gam) / safe)
    return gam, H, near2, safe


def _second_core(Et: Tensor, gam: Tensor, H: Tensor, tie: Tensor, safe: Tensor) -> Tensor:
    """``S₂`` of Note [Second derivatives of spectral maps] for ``Ẽ`` (Hermitian) without a complement."""
    EG, EH = Et * gam, Et * H
    return torch.where(tie, 0.5 * (EH @ Et + Et @ transpose(EH)), (EG @ Et - Et @ EG) / safe)


def _svd_second_order(U: Tensor, s: Tensor, Vh: Tensor, g: Tensor, dg: Tensor, A: Tensor, R: Optional[Tensor],
                      tol: Tensor) -> Tensor:
    """``½ d²F[dY, dY]`` of ``F = U diag(g) Vᴴ`` (the SVD's spectral map, ``g`` odd-extended) with
    ``A = Uᴴ dY V`` and ``R = (I − UUᴴ) dY V`` (None: square, no complement); Note [Second derivatives
    of spectral maps]. Zero in value; batch of n×k like ``U @ Vh``."""
    k = s.shape[-1]
    lam, h, dh = torch.cat([s, -s], -1), torch.cat([g, -g], -1), torch.cat([dg, dg], -1)
    gam, H, tie, safe = _second_divided(lam, h, dh, tol)
    Sy, Sk = 0.5 * (A + transpose(A)), 0.5 * (A - transpose(A))
    Et = torch.cat([torch.cat([Sy, -Sk], -1), torch.cat([Sk, -Sy], -1)], -2)
    S2 = _second_core(Et, gam, H, tie, safe)
    if R is not None:  # the complement (eigenvalue 0 of the dilation, h = 0 there)
        t = tol.squeeze(-1)
        nz = lam.abs() > t
        lam_safe = torch.where(nz, lam, torch.ones_like(lam))
        g0 = torch.where(nz, h / lam_safe, dh)  # h[λ, 0]
        eta = torch.where(nz, (dh - g0) / lam_safe, torch.zeros_like(lam))  # h[λ, 0, λ]
        h30 = torch.where(tie, 0.5 * (eta.unsqueeze(-1) + eta.unsqueeze(-2)), (g0.unsqueeze(-1) - g0.unsqueeze(-2)) / safe)  # h[λₗ, 0, λₚ]
        RR = transpose(R) @ R
        C2 = 0.5 * torch.cat([torch.cat([RR, -RR], -1), torch.cat([-RR, RR], -1)], -2)
        S2 = S2 + h30 * C2
        RT = torch.cat([R, -R], -1) * (1.0 / math.sqrt(2.0))  # W's rows of the dilation's Ẽ, mapped back by W
        # h[0, λ_q, λ_p]: at a zero λ_p through h[λ_q, 0, λ_p], which reads h′ there (Note [Zero singular
        # values of a tall SVD map])
        WS = torch.where(nz.unsqueeze(-2), ((RT * g0.unsqueeze(-2)) @ Et - RT @ (Et * gam)) / (-lam_safe).unsqueeze(-2),
                         RT @ (Et * h30))
        B = 0.5 * (S2[..., :k, :k] - S2[..., :k, k:] + S2[..., k:, :k] - S2[..., k:, k:])
        return (U @ B + (WS[..., :k] - WS[..., k:]) * (1.0 / math.sqrt(2.0))) @ Vh
    B = 0.5 * (S2[..., :k, :k] - S2[..., :k, k:] + S2[..., k:, :k] - S2[..., k:, k:])
    return U @ B @ Vh


def _packed_direction(Y: Tensor, P: Tensor) -> Tensor:
    """The ambient direction ``Δ`` of *packed* coordinates ``P`` (n×r, top r×r strictly lower) at a tall frame ``Y``.

    The ``dim St(n, r)`` numbers of ``P`` are coordinates in an orthonormal basis adapted to ``Y``:
    ``L = tril(P[:r], −1)`` (r×r) and ``C_b = P[r:]`` ((n−r)×r) give ``Δ = Y L + N C_b``, where ``N``
    (n×(n−r)) is an orthonormal basis of ``range(Y)⊥``: the last n − r columns of the block
    Householder reflection ``H = I − W (I + P_Y)⁻¹ Wᵀ``, ``W = E S − Y``, ``E = I[:, :r]``,
    ``S = −U_p`` with ``Y_top = U_p P_Y`` the polar decomposition of the top r×r block
    (``SᵀY_top = −P_Y`` is symmetric, so ``WᵀW = 2(I + P_Y) ⪰ 2I`` and ``H E S = Y``). Applied
    implicitly, ``N C_b = [0; C_b] + W J C_b`` with ``J = (I + P_Y)⁻¹ Y_botᵀ`` (r×(n−r), from the base
    alone), so ``Δ = Y L + [0; C_b] + W (J C_b)``: O(n r²), no n×n matrix, for any ``Y`` (also where
    ``Y_top`` is singular). The tall chart of ``Δ`` then has ``Ω = L − Lᵀ`` and ``C = N C_b``: its differential
    at ``P = 0`` maps the packed coordinates isometrically onto ``T_Y St(n, r)`` with the canonical
    metric ``½‖Ω‖² + ‖C‖²`` (Frobenius: √2 on the ``L`` entries, 1 on ``C_b``), at every base. At
    ``Y = I[:, :r]`` (``N = [0; I]``) ``Δ = P``: GeoTorch's chart. Exact to all orders in ``P``; in
    ``Y`` exact to second order (``U_p`` from :func:`polar`).
    """
    W, J = _packed_basis(Y)
    return _packed_apply(Y, W, J, P)


def _packed_basis(Y: Tensor, constant: bool = False) -> tuple[Tensor, Tensor]:
    """The base-only factors ``(W, J)`` of :func:`_packed_direction`: ``W = E S − Y`` (n×r) and
    ``J = (I + P_Y)⁻¹ Y_botᵀ`` (r×(n−r)).

    ``constant`` (a base nothing differentiates, Note [One-node tall chart]): ``J`` by a Cholesky solve
    (``I + P_Y`` is symmetric, its eigenvalues in [1, 2] for an orthonormal base) instead of an inverse
    and a product, ~3× cheaper at r = 4. Either way ``I + P_Y`` is formed from the computed polar
    factor: read off its SVD (``V (I + Σ)⁻¹ Vᵀ``) it disagreed with ``W`` by rounding, and float32
    gradients came out ~12% further from float64."""
    r = Y.shape[-1]
    Ytop, Ybot = Y[..., :r, :], Y[..., r:, :]
    S = -polar(Ytop)
    K = eye_like(S, r) - sym_part(_mm(transpose(S), Ytop))  # I + P_Y
    # Base-only factors first, so that P meets three products and no solve: Δ = Y L + [0; C_b] + W (J C_b).
    if constant:
        J = torch.cholesky_solve(transpose(Ybot), torch.linalg.cholesky_ex(K)[0])
    else:
        # (I + P_Y)⁻¹ Y_botᵀ, r×(n−r); I + P_Y ⪰ I: the inverse exists, so inv_ex (inv's error check is a
        # device-to-host read on a GPU, which CUDA graphs refuse; same values)
        J = _mm(torch.linalg.inv_ex(K)[0], transpose(Ybot))
    W = torch.nn.functional.pad(S, (0, 0, 0, Y.shape[-2] - r)) - Y  # E S − Y
    return W, J


def _packed_apply(Y: Tensor, W: Tensor, J: Tensor, P: Tensor) -> Tensor:
    """``Δ = Y L + [0; C_b] + W (J C_b)`` from the base's factors (:func:`_packed_basis`)."""
    r = Y.shape[-1]
    Cb = P[..., r:, :]
    return _mm_add(_mm_add(torch.nn.functional.pad(Cb, (0, 0, r, 0)), Y, torch.tril(P[..., :r, :], -1)), W, _mm(J, Cb))


# Note [Solves under torch.func]
# torch.linalg.solve (and solve_ex) give wrong second derivatives under vmap(hessian) and
# vmap(jacfwd(jacrev)) in torch 2.13 and 2.14 (a 3×3 system: 1.4e4 relative error against a
# loop), which made Birkhoff's vmap(hessian) 2.6e3 off; lu_factor_ex + lu_solve in Birkhoff's
# projection was wrong too (8.6e6, and under vmap(jacrev(jacrev))); torch.cholesky_inverse's forward-mode
# derivative is wrong even without vmap (74% off −P⁻¹EP⁻¹; Hurwitz.from_manifold). The inverse is right under
# every transform, so under a vmap level (jacrev, jacfwd and hessian are vmaps too) and torch.compile the
# solves of derivative paths go through it. Elsewhere (plain eager mode, and torch.func.grad, vjp, jvp and
# their nestings without a vmap level) they keep solve_ex: right there, cheaper (inverse: 1.04–1.10×
# Birkhoff's backward at 16×128×128), and more accurate where the system is ill-conditioned. The inverse
# under torch.func.grad had made Birkhoff's float32 gradients next to a vertex (retract with steps of
# V/X ~ 80) 1e-3 to 2e-2 off float64 relative to their largest entry, against ~1e-5 under autograd.
# Forward-mode nestings are wrong without vmap too (torch 2.13; pytorch#196695–196697): jvp of jvp
# and grad of jvp through linalg.solve (2× off), slogdet and det (second derivatives dropped:
# slogdet under vmap(hessian) 45 off on a 3×3). So differentiable log|det| is `logabsdet_lu` (the LU
# factors' derivatives are right under every nesting and vmap), and a solve that must be right to
# second order under any transform (Grassmannian.logmap's) is the inverse; solve_vec takes the inverse
# under forward mode too (a jvp level or a forward_ad dual level: Birkhoff's transport and Riemannian
# gradient were 5% off under jvp of jvp).
def _reverse_only() -> bool:
    """Eager mode with no ``vmap``, ``jvp`` or forward-AD level (plain autograd, ``grad``, ``vjp`` and
    their nestings): where torch's solve and slogdet are right to every order (Note [Solves under
    torch.func])."""
    return (not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level < 0
            and (torch._C._functorch.peek_interpreter_stack() is None or not {"Vmap", "Jvp"} & set(_transforms())))


def logabsdet_lu(A: Tensor) -> Tensor:
    """``log|det A|`` from an LU factorization (``-inf`` where ``A`` is singular, no error): the same value
    as ``slogdet(A)[1]``, whose second derivatives are wrong under forward-mode nestings (Note [Solves
    under torch.func]); the LU factors' are right under every transform. Always LU, also where
    slogdet would be right (plain autograd, 5% cheaper for SL.project): one kernel in every mode, so
    that ``vmap`` of a map equals the batched call (slogdet there differed by 1e-9, relative)."""
    return torch.linalg.lu_factor_ex(A).LU.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def solve_vec(A: Tensor, b: Tensor) -> Tensor:
    """``A⁻¹ b`` (``b``: ``(..., n)``); a singular ``A`` gives inf/NaN, no error."""
    if _reverse_only():
        return lu_solve_vec(A, b)
    return (torch.linalg.inv_ex(A)[0] @ b.unsqueeze(-1)).squeeze(-1)


def lu_solve_vec(A: Tensor, b: Tensor) -> Tensor:
    """:func:`solve_vec` by LU wherever it runs: more accurate than the inverse, but only where nothing
    differentiates it forward-over-reverse under vmap (Note [Solves under torch.func])."""
    return torch.linalg.solve_ex(A, b.unsqueeze(-1))[0].squeeze(-1)
