"""Conformance cases of the complex spaces: Unitary, Hermitian, and PSD, PSSD, Stiefel, Grassmannian,
Sphere, Oblique on complex tensors.

A complex manifold is the real manifold of the same points, with the metric ``Re tr(UᴴV)``
(Note [Complex] in ``geofunc/spaces/_base.py``). So each case runs through ``_Realified``, a test
adapter that hands the space ``X[..., 0] + i X[..., 1]`` for a real ``(*batch, *point, 2)`` tensor
``X`` and returns real and imaginary parts the same way: every property of the harness (written for
real dtypes, float32 and float64) then runs on the complex maps, complex64 and complex128, and
every transform (vmap, grad, jvp, jacfwd/jacrev, hessian, compile) goes through them (torch's
``jacrev``/``jacfwd`` refuse complex *inputs*; on the real parts they apply, and that real Jacobian
is the one a non-holomorphic map has: tests/test_complex.py). The real
dimension (Unitary n², Hermitian, PSD and PSSD n², Stiefel 2nk − k², Grassmannian 2k(n − k), Sphere 2n − 1,
Oblique k(2n − 1)) is what ``check_tangent_space`` pins.

Membership predicates, dimensions, perturbations and moments below are written with
``torch.linalg`` on the complex tensors, independently of the spaces.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from helpers import TOL, TOL_LOOSE

import geofunc as gf
from geofunc._errors import ManifoldError, error
from geofunc.spaces import AbstractSpace
from geofunc.testing import SpaceCase

Tensor = torch.Tensor
Moments = dict


# ---------------------------------------------------------------------------------- the adapter
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _c(X: Any) -> Any:
    """``X[..., 0] + i X[..., 1]`` (None stays None)."""
    return None if X is None else torch.complex(X[..., 0], X[..., 1])


def _r(X: Any) -> Any:
    """Real and imaginary parts stacked last (None stays None)."""
    return None if X is None else torch.stack((X.real, X.imag), dim=-1)


@dataclasses.dataclass(frozen=True)
class _Realified(AbstractSpace):
    """Test adapter: the complex ``space`` on real ``(*batch, *point, 2)`` tensors (re, im)."""

    space: AbstractSpace

    @property
    def point_ndim(self) -> int:  # type: ignore[override]
        return self.space.point_ndim + 1

    def __repr__(self) -> str:
        return f"{self.space!r} on (re, im) pairs"

    def _check_shape(self, X: Any, what: str = "X") -> None:
        self._require_float(X, what)
        if X.ndim < 1 or X.shape[-1] != 2:
            raise error(self, f"`{what}` with a last dim of 2 (re, im)", f"shape {tuple(X.shape)}")
        try:
            self.space._check_shape(torch.empty(X.shape[:-1], dtype=_COMPLEX.get(X.dtype, X.dtype), device="meta"), what)
        except ManifoldError as e:
            raise ManifoldError(f"{self!r}: {e}") from None

    def to_manifold(self, Z, base=None):
        self._check_shape(Z, "Z")
        return _r(self.space.to_manifold(_c(Z), _c(base)))

    def _from_manifold(self, X):
        Z, base = self.space._from_manifold(_c(X))
        return _r(Z), _r(base)

    def rebase(self, Z, base):
        self._check_shape(Z, "Z")
        Z2, base2 = self.space.rebase(_c(Z), _c(base))
        return _r(Z2), _r(base2)

    def tangent(self, X, G):
        self._check_pair(X, G, "G")
        return _r(self.space.tangent(_c(X), _c(G)))

    def egrad_to_rgrad(self, X, G):
        self._check_pair(X, G, "G")
        return _r(self.space.egrad_to_rgrad(_c(X), _c(G)))

    def transport(self, X, Y, V):
        self._check_pair(X, V, "V")
        return _r(self.space.transport(_c(X), _c(Y), _c(V)))

    def inner(self, X, U, V):
        self._check_pair(X, U, "U")
        return self.space.inner(_c(X), _c(U), _c(V))

    def retract(self, X, V):
        self._check_pair(X, V, "V")
        return _r(self.space.retract(_c(X), _c(V)))

    def project(self, Y):
        self._check_shape(Y, "Y")
        return _r(self.space.project(_c(Y)))

    def sample(self, shape, *, generator=None, dtype=None, device=None):
        shape = self._sample_shape(shape, dtype)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        return _r(self.space.sample(shape[:-1], generator=generator, dtype=_COMPLEX.get(dtype, dtype), device=device))

    def contains(self, X, atol=None):
        self._check_shape(X)
        return self.space.contains(_c(X), atol)

    def check(self, X, atol=None):
        self._check_shape(X)
        try:
            self.space.check(_c(X), atol)
        except ManifoldError as e:
            raise ManifoldError(f"{self!r}: {e}") from None

    def _violations(self, X):
        return self.space._violations(_c(X))


# ------------------------------------------------------------------------- membership predicates
def _tall(X: Tensor) -> Tensor:
    return X if X.shape[-2] >= X.shape[-1] else X.mH


def _eye(X: Tensor, n: int) -> Tensor:
    return torch.eye(n, dtype=X.dtype, device=X.device)


def unitary_frames(Xr: Tensor, atol: float) -> Tensor:
    """``‖XᴴX − I‖₂ ≤ atol`` (tall form; U(n) for square ``X``)."""
    X = _tall(_c(Xr))
    return torch.linalg.matrix_norm(X.mH @ X - _eye(X, X.shape[-1]), ord=2) <= atol


def hermitian(Xr: Tensor, atol: float) -> Tensor:
    """``max|X − Xᴴ| ≤ atol·max(1, max|X|)``."""
    X = _c(Xr)
    scale = X.abs().amax((-2, -1)).clamp(min=1.0)
    return (X - X.mH).abs().amax((-2, -1)) <= atol * scale


def hermitian_psd(positive: bool) -> Callable[[Tensor, float], Tensor]:
    """Hermitian (``max|X − Xᴴ| ≤ atol·s``), ``λ_min ≥ −atol·s`` (``s = max(1, ‖X‖₂)``), and ``λ_min > 0``
    with ``positive``."""

    def pred(Xr: Tensor, atol: float) -> Tensor:
        X = _c(Xr)
        lam = torch.linalg.eigvalsh(0.5 * (X + X.mH))
        scale = lam.abs().amax(-1).clamp(min=1.0)
        ok = ((X - X.mH).abs().amax((-2, -1)) <= atol * scale) & (lam[..., 0] >= -atol * scale)
        return ok & (lam[..., 0] > 0) if positive else ok

    return pred


def on_complex_sphere(Xr: Tensor, atol: float) -> Tensor:
    return (torch.linalg.vector_norm(_c(Xr), dim=-1) - 1.0).abs() <= atol


def unit_complex_columns(Xr: Tensor, atol: float) -> Tensor:
    return ((torch.linalg.vector_norm(_c(Xr), dim=-2) - 1.0).abs() <= atol).all(-1)


# ----------------------------------------------------------------------- linearized constraints
def _re_im(X: Tensor) -> Tensor:
    return torch.stack((X.real, X.imag), -1)


def _gram_linearized(Xr: Tensor, Vr: Tensor) -> Tensor:
    """``XᴴV + VᴴX`` (tall form): zero on tangent vectors of U(n) and of complex Stiefel."""
    X, V = _c(Xr), _c(Vr)
    if X.shape[-2] < X.shape[-1]:
        X, V = X.mH, V.mH
    return _re_im(X.mH @ V + V.mH @ X)


def _horizontal(Xr: Tensor, Vr: Tensor) -> Tensor:
    """``XᴴV = 0`` (tall form): the horizontal space of the complex Grassmannian."""
    X, V = _c(Xr), _c(Vr)
    if X.shape[-2] < X.shape[-1]:
        X, V = X.mH, V.mH
    return _re_im(X.mH @ V)


def _hermitian_linearized(Xr: Tensor, Vr: Tensor) -> Tensor:
    V = _c(Vr)
    return _re_im(V - V.mH)


def _sphere_linearized(Xr: Tensor, Vr: Tensor) -> Tensor:
    """``Re(xᴴv) = 0``."""
    return (_c(Xr).conj() * _c(Vr)).real.sum(-1)


def _columns_linearized(Xr: Tensor, Vr: Tensor) -> Tensor:
    """``Re(x_jᴴ v_j) = 0`` for every column ``j``."""
    return (_c(Xr).conj() * _c(Vr)).real.sum(-2)


# ------------------------------------------------------------------------------------ dimensions
def _nk(ps: tuple[int, ...]) -> tuple[int, int]:
    n, k = ps[-3], ps[-2]  # (n, k, 2)
    return max(n, k), min(n, k)


def dim_unitary(ps: tuple[int, ...]) -> int:
    return ps[-2] ** 2


def dim_hermitian(ps: tuple[int, ...]) -> int:
    return ps[-2] ** 2


def dim_complex_stiefel(ps: tuple[int, ...]) -> int:
    n, k = _nk(ps)
    return 2 * n * k - k * k


def dim_complex_grassmannian(ps: tuple[int, ...]) -> int:
    n, k = _nk(ps)
    return 2 * k * (n - k)


def dim_complex_sphere(ps: tuple[int, ...]) -> int:
    return 2 * ps[-2] - 1


def dim_complex_oblique(ps: tuple[int, ...]) -> int:
    return ps[-2] * (2 * ps[-3] - 1)


# --------------------------------------------------------------------------------- perturbations
def _perturb_scale(factor: Callable[[float], float]) -> Callable[[Tensor, float], Tensor]:
    return lambda X, a: X * factor(a)


#: ``XᴴX − I = a I`` (tall form).
perturb_gram = _perturb_scale(lambda a: math.sqrt(1.0 + a))
#: ``‖x‖ − 1 = a`` (every column for Oblique).
perturb_norm = _perturb_scale(lambda a: 1.0 + a)


def perturb_hermitian(Xr: Tensor, a: float) -> Tensor:
    """``max|X − Xᴴ| = a·max(1, max|X|)``: ``i·t`` added to ``X[0, 0]`` (``|X − Xᴴ|₀₀ = 2t``)."""
    X = _c(Xr)
    E = torch.zeros_like(X)
    E[..., 0, 0] = 0.5j
    return _r(X + (a * X.abs().amax((-2, -1)).clamp(min=1.0))[..., None, None] * E)


def perturb_spectral_hermitian(Xr: Tensor, a: float) -> Tensor:
    """``max|X − Xᴴ| = a·max(1, ‖sym X‖₂)`` (the PSD family's measure): ``i·a·s/2`` added to ``X[0, 0]``
    (the Hermitian part, hence ``s``, is unchanged)."""
    X = _c(Xr)
    s = torch.linalg.eigvalsh(0.5 * (X + X.mH)).abs().amax(-1).clamp(min=1.0)
    E = torch.zeros_like(X)
    E[..., 0, 0] = 0.5j
    return _r(X + (a * s)[..., None, None] * E)


def perturb_negative_eigenvalue(Xr: Tensor, a: float) -> Tensor:
    """The smallest eigenvalue moved to ``−a·max(1, ‖X‖₂)`` (PSSD's measure)."""
    X = _c(Xr)
    lam, Q = torch.linalg.eigh(X)
    s = lam.abs().amax(-1).clamp(min=1.0)
    q = Q[..., :, :1]
    return _r(X + (-a * s - lam[..., 0])[..., None, None] * (q @ q.mH))


def _negate(Xr: Tensor) -> Tensor:
    return -Xr


def _off_hermitian(Xr: Tensor) -> Tensor:
    X = _c(Xr)
    return _r(X + 1j * _eye(X, X.shape[-1]))


# ------------------------------------------------------------------------------------- moments
def _parts(name: str, values: Tensor, expected: Any) -> Moments:
    """A complex statistic as two real ones (its real and imaginary parts)."""
    e = torch.as_tensor(expected, dtype=values.dtype)
    return {f"Re {name}": (values.real, e.real), f"Im {name}": (values.imag, e.imag)}


def moments_unitary_frames(Xr: Tensor) -> Moments:
    """Haar frames of U(n) (tall form n×k): ``E[X] = 0``, ``E|X_ij|² = 1/n``, ``E[X_ij²] = 0``
    (circular), ``E[X Xᴴ] = (k/n) I``; square: ``E[tr X] = 0``, ``E|tr X|² = 1`` (every n ≥ 1)."""
    X = _tall(_c(Xr))
    n, k = X.shape[-2:]
    out = {"E|X_ij|²": (X.abs() ** 2, 1.0 / n)}
    out.update(_parts("E[X]", X, 0.0))
    out.update(_parts("E[X_ij²]", X**2, 0.0))
    out.update(_parts("E[X Xᴴ]", X @ X.mH, k / n * torch.eye(n, dtype=torch.complex128)))
    if n == k:
        tr = X.diagonal(dim1=-2, dim2=-1).sum(-1)
        out.update(_parts("E[tr X]", tr, 0.0))
        out["E|tr X|²"] = (tr.abs() ** 2, 1.0)
    return out


def moments_hermitian(Xr: Tensor) -> Moments:
    """``(G + Gᴴ)/2`` for ``G`` with independent standard complex Gaussian entries (E|G_ij|² = 1):
    the diagonal real N(0, ½); off the diagonal, real and imaginary parts N(0, ¼), independent."""
    X = _c(Xr)
    n = X.shape[-1]
    d = X.diagonal(dim1=-2, dim2=-1)
    out = {"Re diag": (d.real, 0.0), "Re diag²": (d.real**2, 0.5), "Im diag": (d.imag, 0.0)}
    if n > 1:
        i, j = torch.tril_indices(n, n, -1)
        off = X[..., i, j]
        out.update({"Re off": (off.real, 0.0), "Re off²": (off.real**2, 0.25), "Im off²": (off.imag**2, 0.25),
                    "Re off · Im off": (off.real * off.imag, 0.0)})
    return out


def moments_hermitian_psd(Xr: Tensor) -> Moments:
    """``Q diag(0.5 + t) Qᴴ``, ``Q`` Haar on U(n), ``t_i`` uniform on ``((n − i − ½)/n, (n − i)/n]``
    (i = 0 .. n−1, descending): the eigenvalue means and ``E[X] = (Σ E[λ]/n) I``."""
    X = _c(Xr)
    n = X.shape[-1]
    i = torch.arange(n, dtype=torch.float64)
    m1 = 0.5 + (n - i - 0.25) / n  # the midpoints of the intervals
    lam = torch.linalg.eigvalsh(X)
    out = {"E[λ_i] (descending)": (lam.flip(-1), m1)}
    out.update(_parts("E[X]", X, m1.sum() / n * torch.eye(n, dtype=torch.complex128)))
    return out


def moments_complex_sphere(Xr: Tensor) -> Moments:
    """Uniform on the unit sphere of Cⁿ (S^{2n−1}): ``E[x] = 0``, ``E[x xᴴ] = I/n``, ``E[x_i²] = 0``,
    ``E|x_i|⁴ = 2/(n(n + 1))``, ``P(Re x_i > 0) = ½``."""
    X = _c(Xr)
    n = X.shape[-1]
    out = {"E|x_i|⁴": (X.abs() ** 4, 2.0 / (n * (n + 1))), "P(Re x_i > 0)": ((X.real > 0).to(Xr.dtype), 0.5)}
    out.update(_parts("E[x]", X, 0.0))
    out.update(_parts("E[x_i²]", X**2, 0.0))
    out.update(_parts("E[x xᴴ]", X[..., :, None] * X[..., None, :].conj(), torch.eye(n, dtype=torch.complex128) / n))
    return out


def moments_complex_oblique(Xr: Tensor) -> Moments:
    """Independent uniform unit columns of Cⁿ: ``E[X] = 0``, ``E[X Xᴴ] = (k/n) I``, ``E[XᴴX] = I``."""
    X = _c(Xr)
    n, k = X.shape[-2:]
    out = _parts("E[X]", X, 0.0)
    out.update(_parts("E[X Xᴴ]", X @ X.mH, k / n * torch.eye(n, dtype=torch.complex128)))
    out.update(_parts("E[XᴴX]", X.mH @ X, torch.eye(k, dtype=torch.complex128)))
    return out


# ----------------------------------------------------------------------------------------- cases
# As for the real PSD family (tests/cases_rank.py): project clamps eigenvalues up to a floor.
_OPEN = "an open set: project returns the nearest point of the closure pushed inside by the floor, so Y − project(Y) is not normal to a tangent space"
_BOUNDARY = "a set with boundary: project(Y) of a Gaussian Y lands on the boundary (clipped values), where the normal cone is not the normal space"
_SLACK = 1e-6  # the float64 clamp level √ε·max(1, λ₁), relative to ‖Y‖
_SOFTPLUS = 2e-3  # softplus + ε, ε = √ε_dtype: float32 differs from float64 by ~3.5e-4 by design
def _shapes(*shapes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple((*s, 2) for s in shapes)


_SQUARE = _shapes((1, 1), (2, 2), (4, 4), (2, 3, 3))
_MATRIX = _shapes((1, 1), (1, 5), (5, 1), (4, 4), (6, 3), (3, 6), (2, 5, 2))
_VECTOR = _shapes((1,), (7,), (5, 1), (4, 4))


def _unitary(case_id: str, triv: str) -> SpaceCase:
    return SpaceCase(
        case_id,
        _Realified(gf.Unitary(triv=triv)),
        shapes=_SQUARE,
        member=unitary_frames,
        tol=TOL_LOOSE,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.01 * X,
        linearized=_gram_linearized,
        smoke_shape=(3, 3, 2),
        dim=dim_unitary,
        perturb=perturb_gram,
        moments=moments_unitary_frames,
    )


def _frames(case_id: str, space: AbstractSpace, shapes, quotient: bool = False) -> SpaceCase:
    return SpaceCase(
        case_id,
        _Realified(space),
        shapes=shapes,
        member=unitary_frames,
        tol=TOL_LOOSE,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.01 * X,
        linearized=_horizontal if quotient else _gram_linearized,
        smoke_shape=(4, 2, 2),
        dim=dim_complex_grassmannian if quotient else dim_complex_stiefel,
        quotient=quotient,
        perturb=perturb_gram,
        moments=moments_unitary_frames,
    )


COMPLEX_CASES = [
    _unitary("Unitary", "expm"),
    _unitary("Unitary-cayley", "cayley"),
    SpaceCase(
        "Hermitian",
        _Realified(gf.Hermitian()),
        shapes=_SQUARE,
        member=hermitian,
        tol=TOL,
        off_manifold=_off_hermitian,
        linearized=_hermitian_linearized,
        smoke_shape=(3, 3, 2),
        dim=dim_hermitian,
        perturb=perturb_hermitian,
        moments=moments_hermitian,
    ),
    SpaceCase(
        "PSD-complex",
        _Realified(gf.PSD()),
        shapes=_SQUARE,
        member=hermitian_psd(positive=True),
        tol=TOL,
        off_manifold=_negate,
        linearized=_hermitian_linearized,
        smoke_shape=(3, 3, 2),
        dim=dim_hermitian,
        perturb=perturb_spectral_hermitian,
        moments=moments_hermitian_psd,
        project_slack=_SLACK,
        float32_shift=_SOFTPLUS,
        skip={"project_normal": _OPEN},
    ),
    SpaceCase(
        "PSSD-complex",
        _Realified(gf.PSSD()),
        shapes=_SQUARE,
        member=hermitian_psd(positive=False),
        tol=TOL,
        off_manifold=_negate,
        smooth=False,
        smoke_shape=(3, 3, 2),
        dim=dim_hermitian,
        perturb=perturb_negative_eigenvalue,
        moments=moments_hermitian_psd,
        skip={"project_normal": _BOUNDARY},
    ),
    _frames("Stiefel-complex", gf.Stiefel(), _MATRIX),
    _frames("Stiefel-complex-cayley", gf.Stiefel(triv="cayley"), _shapes((4, 4), (6, 3), (3, 6))),
    _frames("Stiefel-complex-canonical", gf.Stiefel(metric="canonical"), _MATRIX),
    _frames("Grassmannian-complex", gf.Grassmannian(), _MATRIX, quotient=True),
    SpaceCase(
        "Sphere-complex",
        _Realified(gf.Sphere()),
        shapes=_VECTOR,
        member=on_complex_sphere,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_sphere_linearized,
        smoke_shape=(2, 3, 2),
        dim=dim_complex_sphere,
        perturb=perturb_norm,
        moments=moments_complex_sphere,
    ),
    SpaceCase(
        "Oblique-complex",
        _Realified(gf.Oblique()),
        shapes=_shapes((1, 1), (4, 3), (3, 5), (2, 4, 2)),
        member=unit_complex_columns,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_columns_linearized,
        smoke_shape=(3, 2, 2),
        dim=dim_complex_oblique,
        perturb=perturb_norm,
        moments=moments_complex_oblique,
    ),
]
