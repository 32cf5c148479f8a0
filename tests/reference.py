"""Reference geometry of every space, written with ``torch.linalg`` independently of geofunc.

What the conformance cases and the other tests compare the library with, so that no test
checks the library against itself:

* membership predicates ``pred(X, atol) -> Tensor[bool]`` (batch-shaped) and
  :func:`member`, which picks the predicate of a space instance (for tests that meet many
  spaces, e.g. the ``nn`` one-liners);
* dimensions ``dim(point_shape)`` of each manifold at a generic point;
* boundary perturbations ``perturb(X, amount)``: a tensor that violates the constraint by
  exactly ``amount`` in the documented measure of the space's ``contains``;
* moments ``moments(X) -> {name: (values, expected)}`` of the documented distribution of each
  space's ``sample`` (``X`` of shape ``(N, *point_shape)``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

import geofunc as gf
from geofunc.testing import documented_atol

Tensor = torch.Tensor
Moments = dict[str, tuple[Tensor, Any]]


# ==================================================================== membership predicates
def finite(X: Tensor, atol: float) -> Tensor:
    return torch.isfinite(X)


def _max_abs(X: Tensor) -> Tensor:
    return X.abs().amax((-2, -1))


def symmetric(X: Tensor, atol: float) -> Tensor:
    """``max|X − Xᵀ| ≤ atol·max(1, max|X|)``."""
    return _max_abs(X - X.mT) <= atol * _max_abs(X).clamp(min=1.0)


def hermitian(X: Tensor, atol: float) -> Tensor:
    """``max|X − Xᴴ| ≤ atol·max(1, max|X|)`` (``symmetric`` for a real ``X``)."""
    return _max_abs(X - X.mH) <= atol * _max_abs(X).clamp(min=1.0)


def skew(X: Tensor, atol: float) -> Tensor:
    """``max|X + Xᵀ| ≤ atol·max(1, max|X|)``."""
    return _max_abs(X + X.mT) <= atol * _max_abs(X).clamp(min=1.0)


def on_sphere(radius: float) -> Callable[[Tensor, float], Tensor]:
    def pred(X: Tensor, atol: float) -> Tensor:
        return (torch.linalg.vector_norm(X, dim=-1) - radius).abs() <= atol * radius

    return pred


def unit_columns(X: Tensor, atol: float) -> Tensor:
    return ((torch.linalg.vector_norm(X, dim=-2) - 1.0).abs() <= atol).all(-1)


def _tall(X: Tensor) -> Tensor:
    return X if X.shape[-2] >= X.shape[-1] else X.mH


def orthonormal(X: Tensor, atol: float) -> Tensor:
    """Orthonormal columns (rows if wide): ``‖XᴴX − I‖₂ ≤ atol`` (``XᵀX`` for real ``X``; unitary frames)."""
    Xt = _tall(X)
    k = Xt.shape[-1]
    if k == 0:  # the empty frame: nothing to check (torch 2.6's 2-norm of a 0×0 matrix raises)
        return torch.ones(X.shape[:-2], dtype=torch.bool, device=X.device)
    return torch.linalg.matrix_norm(Xt.mH @ Xt - torch.eye(k, dtype=X.dtype, device=X.device), ord=2) <= atol


def special_orthogonal(X: Tensor, atol: float) -> Tensor:
    # the sign from slogdet: det itself underflows to ±0 for large float32 matrices
    return orthonormal(X, atol) & (torch.linalg.slogdet(X)[0] > 0)


def _scale(s: Tensor) -> Tensor:
    return s[..., :1].clamp(min=1.0)


def low_rank(r: int) -> Callable[[Tensor, float], Tensor]:
    """``σ_{r+1} ≤ atol·max(1, σ₁)``."""

    def pred(X: Tensor, atol: float) -> Tensor:
        s = torch.linalg.svdvals(X)
        return (s[..., r:] <= atol * _scale(s)).all(-1)

    return pred


def fixed_rank(r: int) -> Callable[[Tensor, float], Tensor]:
    low = low_rank(r)

    def pred(X: Tensor, atol: float) -> Tensor:
        return low(X, atol) & (torch.linalg.svdvals(X)[..., r - 1] > 0)

    return pred


def glp(X: Tensor, atol: float) -> Tensor:
    return (torch.linalg.svdvals(X)[..., -1] > 0) & (torch.linalg.slogdet(X)[0] > 0)


def almost_orthogonal(lam: float) -> Callable[[Tensor, float], Tensor]:
    def pred(X: Tensor, atol: float) -> Tensor:
        s = torch.linalg.svdvals(X)
        return ((s - 1.0).abs() <= lam + atol).all(-1)

    return pred


def pssd(r: Optional[int] = None, positive: bool = False) -> Callable[[Tensor, float], Tensor]:
    """Symmetric (Hermitian), ``λ_min ≥ −atol·s``, the ``n − r`` smallest ``|λ| ≤ atol·s`` (``s = max(1, ‖X‖₂)``),
    and with ``positive`` the r-th largest ``> 0``."""

    def pred(X: Tensor, atol: float) -> Tensor:
        n = X.shape[-1]
        rr = n if r is None else r
        lam = torch.linalg.eigvalsh(0.5 * (X + X.mH))  # Hermitian for complex X
        scale = lam.abs().amax(-1).clamp(min=1.0)
        ok = _max_abs(X - X.mH) <= atol * scale
        ok = ok & (lam[..., 0] >= -atol * scale)
        if rr < n:
            ok = ok & (lam[..., : n - rr].abs().amax(-1) <= atol * scale)
        if positive:
            ok = ok & (lam[..., n - rr] > 0)
        return ok

    return pred


def det_one(X: Tensor, atol: float) -> Tensor:
    """``det X > 0`` and ``|log det X| ≤ atol·‖X‖_F‖X⁻¹‖_F`` (first-order backward error of det = 1)."""
    sign, lad = torch.linalg.slogdet(X)
    return (sign > 0) & (lad.abs() <= atol * torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(torch.linalg.inv(X)))


def alpha_stable(alpha: float) -> Callable[[Tensor, float], Tensor]:
    """``max Re λ(X) ≤ −alpha + atol·max(1, ‖X‖_F)``."""

    def pred(X: Tensor, atol: float) -> Tensor:
        return torch.linalg.eigvals(X).real.amax(-1) + alpha <= atol * torch.linalg.matrix_norm(X).clamp(min=1.0)

    return pred


def predicate(space: Any) -> Callable[[Tensor, float], Any]:
    """The independent membership predicate of a geofunc space instance."""
    table: list[tuple[type, Callable[[Any], Callable[[Tensor, float], Any]]]] = [
        (gf.SphereEmbedded, lambda M: on_sphere(M.radius)),
        (gf.Rn, lambda M: finite),
        (gf.Sym, lambda M: symmetric),
        (gf.Hermitian, lambda M: hermitian),
        (gf.Skew, lambda M: skew),
        (gf.Sphere, lambda M: on_sphere(M.radius)),
        (gf.Oblique, lambda M: unit_columns),
        (gf.SO, lambda M: special_orthogonal),
        (gf.Unitary, lambda M: orthonormal),
        (gf.Stiefel, lambda M: orthonormal),
        (gf.Grassmannian, lambda M: orthonormal),
        (gf.AlmostOrthogonal, lambda M: almost_orthogonal(M.lam)),
        (gf.GLp, lambda M: glp),
        (gf.LowRank, lambda M: low_rank(M.rank)),
        (gf.FixedRank, lambda M: fixed_rank(M.rank)),
        (gf.PSD, lambda M: pssd(positive=True)),
        (gf.PSSD, lambda M: pssd()),
        (gf.PSSDLowRank, lambda M: pssd(M.rank)),
        (gf.PSSDFixedRank, lambda M: pssd(M.rank, positive=True)),
        (gf.SL, lambda M: det_one),
        (gf.Hurwitz, lambda M: alpha_stable(M.alpha)),
        (gf.Product, lambda M: _product_predicate(M)),
        (gf.PoincareBall, lambda M: in_ball(M.c)),
        (gf.Lorentz, lambda M: on_hyperboloid(M.k)),
        (gf.Birkhoff, lambda M: doubly_stochastic),
    ]
    for cls, make in table:
        if isinstance(space, cls):
            return make(space)
    raise TypeError(f"tests/reference.py has no membership predicate for {space!r}: add one")


def _product_predicate(M: Any) -> Callable[[Any, float], Any]:
    preds = [predicate(F) for F in M.factors]

    def pred(X: Any, atol: float) -> Any:
        out = None
        for p, x in zip(preds, X):
            ok = p(x, atol)
            out = ok if out is None else out & ok
        return out

    return pred


def member(space: Any, X: Any, atol: Optional[float] = None) -> bool:
    """Whether every point of ``X`` is on ``space`` by the independent predicate, at ``atol``
    (default: the documented tolerance of ``X``'s dtype and point size)."""
    if atol is None:
        lead = X[0] if isinstance(X, (tuple, list)) else X
        p = getattr(space, "point_ndim", 2) if not isinstance(space, gf.Product) else 2
        atol = documented_atol(lead.dtype, tuple(lead.shape[lead.ndim - p:]) if p else ())
    return bool(torch.as_tensor(predicate(space)(X, atol)).all())


# ======================================================================== dimensions
def _tall_nk(ps: tuple[int, ...]) -> tuple[int, int]:
    return max(ps[-2:]), min(ps[-2:])


def dim_rn(ps: tuple[int, ...]) -> int:
    return math.prod(ps)


def dim_sym(ps: tuple[int, ...]) -> int:
    return ps[-1] * (ps[-1] + 1) // 2


def dim_skew(ps: tuple[int, ...]) -> int:
    return ps[-1] * (ps[-1] - 1) // 2


def dim_sphere(ps: tuple[int, ...]) -> int:
    return ps[-1] - 1


def dim_oblique(ps: tuple[int, ...]) -> int:
    return ps[-1] * (ps[-2] - 1)


def dim_stiefel(ps: tuple[int, ...]) -> int:
    n, k = _tall_nk(ps)
    return n * k - k * (k + 1) // 2


def dim_grassmannian(ps: tuple[int, ...]) -> int:
    n, k = _tall_nk(ps)
    return k * (n - k)


def dim_full(ps: tuple[int, ...]) -> int:
    return ps[-2] * ps[-1]


def dim_rank(r: int) -> Callable[[tuple[int, ...]], int]:
    """Matrices of rank exactly r (the generic points of rank ≤ r): ``r(n + k − r)``."""
    return lambda ps: r * (ps[-2] + ps[-1] - r)


def dim_psd_rank(r: Optional[int] = None) -> Callable[[tuple[int, ...]], int]:
    """Symmetric PSD matrices of rank exactly r: ``r n − r(r − 1)/2`` (``n(n + 1)/2`` for r = n)."""

    def dim(ps: tuple[int, ...]) -> int:
        n = ps[-1]
        rr = n if r is None else r
        return rr * n - rr * (rr - 1) // 2

    return dim


# ============================================================== boundary perturbations
def scale_by(factor: Callable[[float], float]) -> Callable[[Tensor, float], Tensor]:
    """``X · factor(amount)``."""
    return lambda X, a: X * factor(a)


#: ``|‖x‖ − r|/r = a``: the sphere, every column of the oblique manifold.
perturb_norm = scale_by(lambda a: 1.0 + a)
#: ``XᵀX − I = a I`` (tall form): the orthogonal family.
perturb_gram = scale_by(lambda a: math.sqrt(1.0 + a))


def perturb_one_column(X: Tensor, a: float) -> Tensor:
    """The oblique manifold with only column 0 off: ``|‖X[:, 0]‖ − 1| = a``, the other columns unit
    (a measure that averages over the columns instead of taking the worst one fails)."""
    s = torch.ones(X.shape[-1], dtype=X.dtype, device=X.device)
    s[0] = 1.0 + a
    return X * s


def perturb_orthogonality(X: Tensor, a: float) -> Optional[Tensor]:
    """The orthogonal family with unit columns (tall form) and columns 0 and 1 at inner product ``a``:
    ``XᵀX − I`` is ``a`` at (0, 1) and (1, 0), zero elsewhere, so ``‖XᵀX − I‖₂ = max|XᵀX − I| = a``
    (a measure of the column norms alone fails). Column 1 is rotated towards column 0 by ``asin a``
    in their plane (``det`` keeps its sign for small ``a``). None for one column."""
    wide = X.shape[-2] < X.shape[-1]
    Xt = X.mT if wide else X
    if Xt.shape[-1] < 2:
        return None
    th = math.asin(a)
    c1 = math.cos(th) * Xt[..., :, 1:2] + math.sin(th) * Xt[..., :, :1]
    Y = torch.cat([Xt[..., :, :1], c1, Xt[..., :, 2:]], dim=-1)
    return Y.mT if wide else Y


def perturb_symmetry(X: Tensor, a: float) -> Optional[Tensor]:
    """``max|X − Xᵀ| = a·max(1, max|X|)``: ``X[0, 1]`` moved (None at 1×1)."""
    if X.shape[-1] < 2:
        return None
    E = torch.zeros_like(X)
    E[..., 0, 1] = 1.0
    return X + (a * _max_abs(X).clamp(min=1.0))[..., None, None] * E


def perturb_skew(X: Tensor, a: float) -> Tensor:
    """``max|X + Xᵀ| = a·max(1, max|X|)``: ``X[0, 0]`` moved by half of it."""
    E = torch.zeros_like(X)
    E[..., 0, 0] = 1.0
    return X + (0.5 * a * _max_abs(X).clamp(min=1.0))[..., None, None] * E


def perturb_spectral_symmetry(X: Tensor, a: float) -> Optional[Tensor]:
    """``max|X − Xᵀ| = a·max(1, ‖X‖₂)`` (the PSD family's measure): ``X[0, 1]`` moved."""
    if X.shape[-1] < 2:
        return None
    s = torch.linalg.eigvalsh(X).abs().amax(-1).clamp(min=1.0)
    E = torch.zeros_like(X)
    E[..., 0, 1] = 1.0
    return X + (a * s)[..., None, None] * E


def perturb_rank(r: int) -> Callable[[Tensor, float], Optional[Tensor]]:
    """``σ_{r+1} = a·max(1, σ₁)``: a singular direction outside the rank added (None if r = min(n, k))."""

    def perturb(X: Tensor, a: float) -> Optional[Tensor]:
        if r >= min(X.shape[-2:]):
            return None
        U, s, Vh = torch.linalg.svd(X)
        c = a * s[..., 0].clamp(min=1.0)
        return X + c[..., None, None] * (U[..., :, r : r + 1] @ Vh[..., r : r + 1, :])

    return perturb


def perturb_singular_band(lam: float) -> Callable[[Tensor, float], Tensor]:
    """``max(0, max|σ − 1| − λ) = a``: the largest singular value moved to ``1 + λ + a``."""

    def perturb(X: Tensor, a: float) -> Tensor:
        U, s, Vh = torch.linalg.svd(X, full_matrices=False)
        c = 1.0 + lam + a - s[..., 0]
        return X + c[..., None, None] * (U[..., :, :1] @ Vh[..., :1, :])

    return perturb


def perturb_psd(r: Optional[int] = None) -> Callable[[Tensor, float], Tensor]:
    """PSD of rank ≤ r: with ``s = max(1, ‖X‖₂)``, a zero eigenvalue raised to ``a·s`` (rank excess) if
    ``r < n``, else the smallest eigenvalue moved to ``−a·s`` (negative)."""

    def perturb(X: Tensor, a: float) -> Tensor:
        n = X.shape[-1]
        lam, Q = torch.linalg.eigh(X)
        s = lam.abs().amax(-1).clamp(min=1.0)
        target = a * s if (r is not None and r < n) else -a * s
        q = Q[..., :, :1]
        return X + (target - lam[..., 0])[..., None, None] * (q @ q.mT)

    return perturb


def perturb_psd_fixed(r: int) -> Callable[[Tensor, float], Optional[Tensor]]:
    """PSD of rank exactly r: the rank excess of :func:`perturb_psd` if ``r < n``; at ``r = n`` (an
    open set, whose eigenvalue floor has no tolerance) the symmetry of :func:`perturb_spectral_symmetry`."""
    excess = perturb_psd(r)
    return lambda X, a: excess(X, a) if r < X.shape[-1] else perturb_spectral_symmetry(X, a)


# ======================================================================= distributions
def _uniform_moments(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and second moment of the uniform distribution on ``[lo, hi]``."""
    return (lo + hi) / 2, (lo * lo + lo * hi + hi * hi) / 3


def separated_bounds(r: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The documented law of the separated values of the rank family's ``sample``: ``t_i`` (i = 0 .. r−1,
    descending) independent and uniform on ``((r − i − ½)/r, (r − i)/r]``."""
    i = torch.arange(r, dtype=dtype)
    return (r - i - 0.5) / r, (r - i) / r


def gaussian_moments(values: Tensor, var: Any) -> Moments:
    """Centred Gaussian entries of variance ``var``: first, second and fourth moments."""
    var = torch.as_tensor(var, dtype=values.dtype)
    return {"mean": (values, 0.0), "second moment": (values**2, var), "fourth moment": (values**4, 3 * var**2)}


def _prefix(prefix: str, d: Moments) -> Moments:
    return {f"{prefix} {k}": v for k, v in d.items()}


def moments_rn(X: Tensor) -> Moments:
    """``Rn.sample``: a standard Gaussian."""
    return gaussian_moments(X.reshape(X.shape[0], -1), 1.0)


def _off_diagonal(X: Tensor) -> Tensor:
    n = X.shape[-1]
    i, j = torch.tril_indices(n, n, -1)
    return X[..., i, j]


def moments_sym(X: Tensor) -> Moments:
    """``Sym.sample = (G + Gᵀ)/2``: diagonal N(0, 1), off-diagonal N(0, ½), independent."""
    out = _prefix("diagonal", gaussian_moments(X.diagonal(dim1=-2, dim2=-1), 1.0))
    if X.shape[-1] > 1:
        out.update(_prefix("off-diagonal", gaussian_moments(_off_diagonal(X), 0.5)))
    return out


def moments_skew(X: Tensor) -> Moments:
    """``Skew.sample = (G − Gᵀ)/2``: strict lower triangle N(0, ½)."""
    if X.shape[-1] == 1:
        return {"the 1×1 entry": (X.reshape(-1, 1), 0.0)}
    return _prefix("off-diagonal", gaussian_moments(_off_diagonal(X), 0.5))


def moments_sphere(radius: float) -> Callable[[Tensor], Moments]:
    """Uniform on the sphere of radius r in Rⁿ: ``E[x] = 0``, ``E[x xᵀ] = r² I/n``,
    ``E[x_i⁴] = 3 r⁴/(n(n + 2))`` and ``P(x_i > 0) = ½``."""

    def moments(X: Tensor) -> Moments:
        n = X.shape[-1]
        eye = torch.eye(n, dtype=X.dtype)
        return {
            "E[x]": (X, 0.0),
            "E[x xᵀ]": (X[..., :, None] * X[..., None, :], radius**2 * eye / n),
            "E[x_i⁴]": (X**4, 3 * radius**4 / (n * (n + 2))),
            "P(x_i > 0)": ((X > 0).to(X.dtype), 0.5),
        }

    return moments


def moments_oblique(X: Tensor) -> Moments:
    """Independent uniform unit columns: ``E[X] = 0``, ``E[X Xᵀ] = (k/n) I``, ``E[XᵀX] = I``
    (independent columns), ``P(X_ij > 0) = ½``."""
    n, k = X.shape[-2:]
    return {
        "E[X]": (X, 0.0),
        "E[X Xᵀ]": (X @ X.mT, k / n * torch.eye(n, dtype=X.dtype)),
        "E[XᵀX]": (X.mT @ X, torch.eye(k, dtype=X.dtype)),
        "P(X_ij > 0)": ((X > 0).to(X.dtype), 0.5),
    }


def moments_so(X: Tensor) -> Moments:
    """Haar on SO(n): ``E[X] = 0``, ``E[X_ij²] = 1/n``, ``E[tr X] = 0``, ``E[(tr X)²] = 1`` for
    n ≥ 3 (2 for SO(2)); SO(1) = {1}."""
    n = X.shape[-1]
    tr = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    if n == 1:
        return {"X": (X, 1.0)}
    return {
        "E[X]": (X, 0.0),
        "E[X_ij²]": (X**2, 1.0 / n),
        "E[tr X]": (tr, 0.0),
        "E[(tr X)²]": (tr**2, 2.0 if n == 2 else 1.0),
    }


def moments_frames(X: Tensor) -> Moments:
    """Haar frames (tall form n×k, k ≤ n: the first k columns of a Haar O(n) matrix):
    ``E[X] = 0``, ``E[X_ij²] = 1/n``, ``E[X Xᵀ] = (k/n) I`` (a uniform subspace),
    ``E[tr T] = 0`` and ``E[(tr T)²] = k/n`` for the top k×k block ``T``."""
    Xt = _tall(X)
    n, k = Xt.shape[-2:]
    tr = Xt[..., :k, :].diagonal(dim1=-2, dim2=-1).sum(-1)
    return {
        "E[X]": (Xt, 0.0),
        "E[X_ij²]": (Xt**2, 1.0 / n),
        "E[X Xᵀ]": (Xt @ Xt.mT, k / n * torch.eye(n, dtype=X.dtype)),
        "E[tr T]": (tr, 0.0),
        "E[(tr T)²]": (tr**2, k / n),
    }


def _svd_moments(X: Tensor, r: int, lo: Tensor, hi: Tensor) -> Moments:
    """``X = U diag(σ) Vᵀ`` with ``U``, ``V`` Haar frames (n×r, k×r, tall form) independent of the
    singular values ``σ_i`` (descending) ~ U[lo_i, hi_i]: their means, ``E[X] = 0``,
    ``E[X_ij²] = Σ E[σ²]/(n k)`` and the singular projectors ``E[U Uᵀ] = (r/n) I``,
    ``E[V Vᵀ] = (r/k) I``."""
    Xt = _tall(X)
    n, k = Xt.shape[-2:]
    U, s, Vh = torch.linalg.svd(Xt, full_matrices=False)
    m1, m2 = _uniform_moments(lo.to(X.dtype), hi.to(X.dtype))
    out: Moments = {
        "E[σ_i]": (s[..., :r], m1),
        "E[X]": (Xt, 0.0),
        "E[X_ij²]": (Xt**2, m2.sum() / (n * k)),
    }
    if r < n:
        Ur = U[..., :r]
        out["E[U Uᵀ]"] = (Ur @ Ur.mT, r / n * torch.eye(n, dtype=X.dtype))
    if r < k:
        Vr = Vh[..., :r, :].mT
        out["E[V Vᵀ]"] = (Vr @ Vr.mT, r / k * torch.eye(k, dtype=X.dtype))
    return out


def moments_rank(r: Optional[int] = None, det_positive: bool = False) -> Callable[[Tensor], Moments]:
    """LowRank/FixedRank/GLp (r = None: full rank): singular values ``0.5 + t_i`` (``t`` as in
    :func:`separated_bounds`), Haar frames. With ``det_positive`` (GLp: the frames' determinants
    multiply to +1) the law is still invariant under ``X ↦ R X S`` for rotations ``R, S``, so the
    moments are the same, except at 1×1 where ``X = σ > 0``. At n = k = r also the sign of the
    determinant: ``P(det X > 0)`` is 1 with ``det_positive`` and ½ without (independent Haar
    frames on O(n): square ``FixedRank`` of full rank is all of GL(n), DESIGN §6.1)."""

    def moments(X: Tensor) -> Moments:
        n, k = X.shape[-2:]
        rr = min(n, k) if r is None else r
        lo, hi = separated_bounds(rr)
        out = _svd_moments(X, rr, 0.5 + lo, 0.5 + hi)
        if n == k == rr:
            out["P(det X > 0)"] = ((torch.linalg.slogdet(X)[0] > 0).to(X.dtype), 1.0 if det_positive else 0.5)
        if (n, k) == (1, 1) and det_positive:
            out["E[X]"] = (X, (1.0 + lo + hi) / 2)
        return out

    return moments


def moments_almost_orthogonal(lam: float) -> Callable[[Tensor], Moments]:
    """Singular values ``1 + 0.9 λ (2 t_i − 1)`` (``t`` as in :func:`separated_bounds`, r = min(n, k)), Haar frames."""

    def moments(X: Tensor) -> Moments:
        r = min(X.shape[-2:])
        lo, hi = separated_bounds(r)
        return _svd_moments(X, r, 1.0 + 0.9 * lam * (2 * lo - 1), 1.0 + 0.9 * lam * (2 * hi - 1))

    return moments


def moments_psd(r: Optional[int] = None) -> Callable[[Tensor], Moments]:
    """The PSD family: ``X = Q diag(0.5 + t) Qᵀ``, ``Q`` a Haar n×r frame: eigenvalue means,
    ``E[X] = (Σ E[λ]/n) I`` and the eigen-projector ``E[Q Qᵀ] = (r/n) I``."""

    def moments(X: Tensor) -> Moments:
        n = X.shape[-1]
        rr = n if r is None else r
        lo, hi = separated_bounds(rr)
        m1, _ = _uniform_moments(0.5 + lo, 0.5 + hi)
        lam, Q = torch.linalg.eigh(X)
        out: Moments = {
            "E[λ_i] (descending)": (lam.flip(-1)[..., :rr], m1),
            "E[X]": (X, m1.sum() / n * torch.eye(n, dtype=X.dtype)),
        }
        if rr < n:
            Qr = Q[..., n - rr :]
            out["E[Q Qᵀ]"] = (Qr @ Qr.mT, rr / n * torch.eye(n, dtype=X.dtype))
        return out

    return moments


# ================================================ hyperbolic spaces, doubly stochastic matrices
def in_ball(c: float) -> Callable[[Tensor, float], Tensor]:
    """The open ball ``c‖x‖² < 1`` (finite entries); open, so ``atol`` plays no role."""

    def pred(X: Tensor, atol: float) -> Tensor:
        del atol
        r2 = c * torch.linalg.vector_norm(X, dim=-1) ** 2
        return torch.isfinite(X).all(-1) & (r2 < 1.0)

    return pred


def on_hyperboloid(k: float) -> Callable[[Tensor, float], Tensor]:
    """``−x₀² + ‖x̄‖² = −k`` to a relative ``atol`` (of ``k + ‖x‖²``), and ``x₀ > 0``."""

    def pred(X: Tensor, atol: float) -> Tensor:
        q = -X[..., 0] ** 2 + torch.linalg.vector_norm(X[..., 1:], dim=-1) ** 2
        scale = k + torch.linalg.vector_norm(X, dim=-1) ** 2
        return ((q + k).abs() <= atol * scale) & (X[..., 0] > 0)

    return pred


def doubly_stochastic(X: Tensor, atol: float) -> Tensor:
    """Unit row and column sums and non-negative entries, to ``atol``."""
    ones = torch.ones(X.shape[-1], dtype=X.dtype)
    rows = torch.linalg.vector_norm(X @ ones - 1.0, ord=math.inf, dim=-1)
    cols = torch.linalg.vector_norm(X.mT @ ones - 1.0, ord=math.inf, dim=-1)
    return (rows <= atol) & (cols <= atol) & (X.amin((-2, -1)) >= -atol)


def dim_ball(ps: tuple[int, ...]) -> int:
    return ps[-1]


def dim_hyperboloid(ps: tuple[int, ...]) -> int:
    return ps[-1] - 1


def dim_birkhoff(ps: tuple[int, ...]) -> int:
    return (ps[-1] - 1) ** 2


def perturb_hyperboloid(k: float) -> Callable[[Tensor, float], Tensor]:
    """``s X`` with ``|⟨sX, sX⟩_L + k| / (k + ‖sX‖²) = a``: ``s² = k(1 + a)/(k − a‖X‖²)``."""

    def perturb(X: Tensor, a: float) -> Tensor:
        n2 = (X * X).sum(-1, keepdim=True)
        return torch.sqrt(k * (1.0 + a) / (k - a * n2)) * X

    return perturb


def perturb_marginals(X: Tensor, a: float) -> Tensor:
    """Row 0 and column 0 sum to ``1 + a``: ``X[0, 0]`` moved by ``a``."""
    E = torch.zeros_like(X)
    E[..., 0, 0] = a
    return X + E


def _wrapped_normal_moments(v: Tensor) -> Moments:
    """``v ~ N(0, I/n)`` (Riemannian coordinates at the origin): Gaussian entries of variance
    ``1/n``, uncorrelated."""
    n = v.shape[-1]
    out = gaussian_moments(v, 1.0 / n)
    out["E[v vᵀ]"] = (v[..., :, None] * v[..., None, :], torch.eye(n, dtype=v.dtype) / n)
    return out


def moments_ball(c: float) -> Callable[[Tensor], Moments]:
    """``PoincareBall.sample = exp₀(v/2)``, ``v ~ N(0, I/n)``: ``v = 2 artanh(√c‖x‖) x/(√c‖x‖)``."""

    def moments(X: Tensor) -> Moments:
        r = math.sqrt(c) * torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        return _wrapped_normal_moments(2.0 * torch.atanh(r) / r * X)

    return moments


def moments_hyperboloid(k: float) -> Callable[[Tensor], Moments]:
    """``Lorentz.sample = exp_o((0, v))``, ``v ~ N(0, I/n)``: ``v = d(o, x) x̄/‖x̄‖``,
    ``d = √k arcosh(x₀/√k)``."""

    def moments(X: Tensor) -> Moments:
        d = math.sqrt(k) * torch.acosh(X[..., :1] / math.sqrt(k))
        return _wrapped_normal_moments(d * X[..., 1:] / torch.linalg.vector_norm(X[..., 1:], dim=-1, keepdim=True))

    return moments


def moments_birkhoff(X: Tensor) -> Moments:
    """``Birkhoff.sample = S(exp Z)``, ``Z`` Gaussian: rows and columns are exchangeable, so ``E X = 11ᵀ/n``."""
    return {"E[X]": (X, 1.0 / X.shape[-1])}


def on_spaces(constraints: dict, params: dict, atol: Optional[float] = None) -> dict[str, bool]:
    """:func:`member` of every constrained entry of a flat ``{name: space}`` dict (None: unconstrained)."""
    return {k: member(M, params[k], atol) for k, M in constraints.items() if M is not None}
