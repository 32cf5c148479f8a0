"""Conformance cases of the rank family (LowRank, FixedRank, GLp, AlmostOrthogonal, PSD, PSSD,
PSSDLowRank, PSSDFixedRank, Product).

Owner: rank engineer. Membership predicates use ``torch.linalg`` (``svdvals``, ``eigvalsh``,
``slogdet``) independently of the spaces' own ``contains``. ``Product`` points are tuples, which
the tensor-based suite cannot draw, so it runs through ``_Columns``: a test adapter that lays the
factors side by side as column blocks of one tensor and calls ``Product``'s maps on the blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from helpers import SHAPES_MATRIX, SHAPES_SQUARE, TOL

import geofunc as gf
from geofunc._errors import error
from geofunc.spaces import AbstractSpace
from geofunc.testing import SpaceCase

Tensor = torch.Tensor

EXP = (torch.exp, torch.log)


# ------------------------------------------------------------------ membership predicates
def _scale(s: Tensor) -> Tensor:
    return s[..., :1].clamp(min=1.0)


def _low_rank(r: int):
    def member(X: Tensor, atol: float) -> Tensor:
        s = torch.linalg.svdvals(X)
        return (s[..., r:] <= atol * _scale(s)).all(-1)

    return member


def _fixed_rank(r: int):
    low = _low_rank(r)

    def member(X: Tensor, atol: float) -> Tensor:
        return low(X, atol) & (torch.linalg.svdvals(X)[..., r - 1] > 0)

    return member


def _glp(X: Tensor, atol: float) -> Tensor:
    return (torch.linalg.svdvals(X)[..., -1] > 0) & (torch.linalg.slogdet(X)[0] > 0)


def _almost_orthogonal(lam: float):
    def member(X: Tensor, atol: float) -> Tensor:
        s = torch.linalg.svdvals(X)
        return ((s - 1.0).abs() <= lam + atol).all(-1)

    return member


def _pssd(r: int | None = None, positive: bool = False):
    def member(X: Tensor, atol: float) -> Tensor:
        n = X.shape[-1]
        rr = n if r is None else r
        lam = torch.linalg.eigvalsh(0.5 * (X + X.mT))
        scale = lam.abs().amax(-1).clamp(min=1.0)
        ok = (X - X.mT).abs().amax((-2, -1)) <= atol * scale
        ok = ok & (lam[..., 0] >= -atol * scale)
        if rr < n:
            ok = ok & (lam[..., : n - rr].abs().amax(-1) <= atol * scale)
        if positive:
            ok = ok & (lam[..., n - rr] > 0)
        return ok

    return member


# ------------------------------------------------------------------- off-manifold inputs
def _raise_rank(r: int):
    def off(X: Tensor) -> Tensor | None:
        n, k = X.shape[-2:]
        if r >= min(n, k):
            return None  # every matrix has rank ≤ min(n, k)
        c = 2.0 * (torch.linalg.matrix_norm(X) + 1.0)[..., None, None]
        return X + c * torch.eye(n, k, dtype=X.dtype)  # c(I + X/c): full rank

    return off


def _zero(X: Tensor) -> Tensor:
    return 0.0 * X


def _negate_first_row(X: Tensor) -> Tensor:
    sign = torch.ones(X.shape[-2], dtype=X.dtype)
    sign[0] = -1.0
    return X * sign[:, None]


def _negate(X: Tensor) -> Tensor:
    return -X


def _times4(X: Tensor) -> Tensor:
    return 4.0 * X


# ---------------------------------------------------------------------- Product adapter
@dataclasses.dataclass(frozen=True)
class _Columns(AbstractSpace):
    """Test adapter: ``Product`` on the column blocks ``[X_1 | X_2 | ...]`` of one ``(*batch, n, Σ widths)`` tensor."""

    product: gf.Product
    n: int
    widths: tuple

    def __repr__(self) -> str:
        return repr(self.product)

    def _check_shape(self, X: Any, what: str = "X") -> None:
        self._require_matrix(X, what)
        if tuple(X.shape[-2:]) != (self.n, sum(self.widths)):
            raise error(self, f"`{what}` of shape (..., {self.n}, {sum(self.widths)})", f"shape {tuple(X.shape)}")

    def _split(self, X: Tensor, what: str = "X") -> tuple:
        self._check_shape(X, what)
        out, a = [], 0
        for w in self.widths:
            out.append(X[..., a : a + w])
            a += w
        return tuple(out)

    def _cat(self, parts: tuple) -> Tensor:
        return torch.cat(parts, dim=-1)

    def to_manifold(self, Z, base=None):
        return self._cat(self.product.to_manifold(self._split(Z, "Z"), base))

    def from_manifold(self, X):
        Zs, bs = self.product.from_manifold(self._split(X))
        return self._cat(Zs), bs

    def _from_manifold(self, X):
        Zs, bs = self.product._from_manifold(self._split(X))
        return self._cat(Zs), bs

    def rebase(self, Z, base):
        Zs, bs = self.product.rebase(self._split(Z, "Z"), base)
        return self._cat(Zs), bs

    def tangent(self, X, G):
        return self._cat(self.product.tangent(self._split(X), self._split(G, "G")))

    def retract(self, X, V):
        return self._cat(self.product.retract(self._split(X), self._split(V, "V")))

    def project(self, Y):
        return self._cat(self.product.project(self._split(Y, "Y")))

    def sample(self, shape, *, generator=None, dtype=None, device=None):
        shape = self._sample_shape(shape)
        self._check_shape(torch.empty(shape, dtype=dtype or torch.get_default_dtype(), device="meta"), "shape")
        shapes = tuple(shape[:-1] + (w,) for w in self.widths)
        return self._cat(self.product.sample(shapes, generator=generator, dtype=dtype, device=device))

    def contains(self, X, atol=None):
        return self.product.contains(self._split(X), atol)

    def check(self, X, atol=None):
        self.product.check(self._split(X), atol)

    def _violations(self, X):
        return self.product._violations(self._split(X))


_PRODUCT = _Columns(gf.Product(gf.GLp(), gf.PSD(), gf.LowRank(rank=1), gf.AlmostOrthogonal(lam=0.5)), 3, (3, 3, 2, 4))


def _product_member(X: Tensor, atol: float) -> Tensor:
    parts = _PRODUCT._split(X)
    return _glp(parts[0], atol) & _pssd(positive=True)(parts[1], atol) & _low_rank(1)(parts[2], atol) & _almost_orthogonal(0.5)(parts[3], atol)


def _product_off(X: Tensor) -> Tensor:
    return torch.cat([_negate_first_row(X[..., :3]), X[..., 3:]], dim=-1)


_SQUARE_FULL = ((1, 1), (2, 2), (3, 3), (2, 3, 3))
_RANK2 = ((4, 4), (6, 3), (3, 6), (2, 3, 5, 2))

RANK_CASES: list[SpaceCase] = [
    # ------------------------------------------------------------------ SVD type
    SpaceCase("LowRank-1", gf.LowRank(rank=1), SHAPES_MATRIX, _low_rank(1), TOL, off_manifold=_raise_rank(1),
              smoke_shape=(4, 3)),
    SpaceCase("LowRank-2", gf.LowRank(rank=2), _RANK2, _low_rank(2), TOL, off_manifold=_raise_rank(2),
              smoke_shape=(4, 3)),
    SpaceCase("LowRank-2-cayley", gf.LowRank(rank=2, triv="cayley"), ((5, 3), (3, 5)), _low_rank(2), TOL,
              off_manifold=_raise_rank(2), smoke_shape=(4, 3)),
    SpaceCase("LowRank-full", gf.LowRank(rank=3), ((3, 3), (2, 3, 3)), _low_rank(3), TOL, has_logabsdet=True,
              smoke_shape=(3, 3)),
    SpaceCase("FixedRank-1", gf.FixedRank(rank=1), SHAPES_MATRIX, _fixed_rank(1), TOL, off_manifold=_zero,
              smoke_shape=(4, 3)),
    SpaceCase("FixedRank-2", gf.FixedRank(rank=2), ((2, 2), *_RANK2), _fixed_rank(2), TOL, off_manifold=_zero,
              smoke_shape=(4, 3)),
    SpaceCase("FixedRank-square", gf.FixedRank(rank=3), ((3, 3), (2, 3, 3)), _glp, TOL,
              off_manifold=_negate_first_row, has_logabsdet=True, smoke_shape=(3, 3)),
    SpaceCase("FixedRank-exp", gf.FixedRank(rank=2, f=EXP), ((4, 3), (2, 5)), _fixed_rank(2), TOL,
              off_manifold=_zero, raw_scales=(1.0,), smoke_shape=(4, 3)),
    SpaceCase("GLp", gf.GLp(), SHAPES_SQUARE, _glp, TOL, off_manifold=_negate_first_row, has_logabsdet=True,
              smoke_shape=(3, 3)),
    SpaceCase("GLp-exp-cayley", gf.GLp(f=EXP, triv="cayley"), _SQUARE_FULL, _glp, TOL,
              off_manifold=_negate_first_row, has_logabsdet=True, raw_scales=(1.0,), smoke_shape=(3, 3)),
    SpaceCase("AlmostOrthogonal", gf.AlmostOrthogonal(lam=0.5), SHAPES_MATRIX, _almost_orthogonal(0.5), TOL,
              off_manifold=_times4, smoke_shape=(4, 3)),
    SpaceCase("AlmostOrthogonal-square", gf.AlmostOrthogonal(lam=0.3, f="sigmoid"), _SQUARE_FULL,
              _almost_orthogonal(0.3), TOL, off_manifold=_times4, has_logabsdet=True, smoke_shape=(3, 3)),
    SpaceCase("AlmostOrthogonal-0", gf.AlmostOrthogonal(lam=0.0), ((1, 1), (4, 4), (5, 2), (2, 5), (2, 3, 4, 3)),
              _almost_orthogonal(0.0), TOL, off_manifold=_times4, smoke_shape=(4, 3)),
    SpaceCase("AlmostOrthogonal-1-tanh", gf.AlmostOrthogonal(lam=1.0, f="tanh"), ((3, 3), (5, 2), (2, 5)),
              _almost_orthogonal(1.0), TOL, off_manifold=_times4, smoke_shape=(4, 3)),
    # ---------------------------------------------------------------- eigen type
    SpaceCase("PSD", gf.PSD(), SHAPES_SQUARE, _pssd(positive=True), TOL, off_manifold=_negate, has_logabsdet=True,
              smoke_shape=(3, 3)),
    SpaceCase("PSD-exp-cayley", gf.PSD(f=EXP, triv="cayley"), _SQUARE_FULL, _pssd(positive=True), TOL,
              off_manifold=_negate, has_logabsdet=True, raw_scales=(1.0,), smoke_shape=(3, 3)),
    SpaceCase("PSSD", gf.PSSD(), SHAPES_SQUARE, _pssd(), TOL, off_manifold=_negate, has_logabsdet=True,
              smooth=False, smoke_shape=(3, 3)),
    SpaceCase("PSSDLowRank-1", gf.PSSDLowRank(rank=1), SHAPES_SQUARE, _pssd(1), TOL, off_manifold=_negate,
              smooth=False, smoke_shape=(3, 3)),
    SpaceCase("PSSDLowRank-2", gf.PSSDLowRank(rank=2), ((2, 2), (4, 4), (2, 3, 5, 5)), _pssd(2), TOL,
              off_manifold=_negate, smooth=False, smoke_shape=(4, 4)),
    SpaceCase("PSSDFixedRank-2", gf.PSSDFixedRank(rank=2), ((2, 2), (4, 4), (2, 3, 5, 5)), _pssd(2, positive=True),
              TOL, off_manifold=_negate, smoke_shape=(4, 4)),
    SpaceCase("PSSDFixedRank-full", gf.PSSDFixedRank(rank=3), ((3, 3), (2, 3, 3)), _pssd(3, positive=True), TOL,
              off_manifold=_negate, has_logabsdet=True, smoke_shape=(3, 3)),
    # ---------------------------------------------------------------------- Product
    SpaceCase("Product", _PRODUCT, ((3, 12), (2, 3, 12)), _product_member, TOL, off_manifold=_product_off,
              smoke_shape=(3, 12)),
]

