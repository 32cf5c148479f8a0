"""Conformance cases of the rank family (LowRank, FixedRank, GLp, AlmostOrthogonal, PSD, PSSD,
PSSDLowRank, PSSDFixedRank, Product).

Membership predicates, dimensions, boundary perturbations and sample moments come from
``tests/reference.py`` (``torch.linalg``: ``svdvals``, ``eigvalsh``, ``slogdet``, independently of
the spaces' own ``contains``). ``Product`` points are tuples, which
the tensor-based suite cannot draw, so it runs through ``_Columns``: a test adapter that lays the
factors side by side as column blocks of one tensor and calls ``Product``'s maps on the blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import reference as ref
import torch
from helpers import SHAPES_MATRIX, SHAPES_SQUARE, TOL

import geofunc as gf
from geofunc._errors import error
from geofunc.spaces import AbstractSpace
from geofunc.testing import SpaceCase

Tensor = torch.Tensor

EXP = (torch.exp, torch.log)


# ------------------------------------------------------------------ membership predicates
_low_rank = ref.low_rank
_fixed_rank = ref.fixed_rank
_glp = ref.glp
_almost_orthogonal = ref.almost_orthogonal
_pssd = ref.pssd


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

    # the metric is the Product's (the sum of the factors'), not the adapter's default: else the
    # properties of the metric and the transport never reached Product.inner/egrad_to_rgrad/transport
    def egrad_to_rgrad(self, X, G):
        return self._cat(self.product.egrad_to_rgrad(self._split(X), self._split(G, "G")))

    def inner(self, X, U, V):
        return self.product.inner(self._split(X), self._split(U, "U"), self._split(V, "V"))

    def transport(self, X, Y, V):
        return self._cat(self.product.transport(self._split(X), self._split(Y, "Y"), self._split(V, "V")))

    def sample(self, shape, *, generator=None, dtype=None, device=None):
        shape = self._sample_shape(shape, dtype)
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


def _product_dim(ps: tuple[int, ...]) -> int:
    return ref.dim_full((3, 3)) + ref.dim_psd_rank()((3, 3)) + ref.dim_rank(1)((3, 2)) + ref.dim_full((3, 4))


def _product_perturb(X: Tensor, a: float) -> Tensor:
    """The LowRank(1) factor (columns 6:8) off by ``a`` (the other factors are open sets)."""
    return torch.cat([X[..., :6], ref.perturb_rank(1)(X[..., 6:8], a), X[..., 8:]], dim=-1)


def _product_moments(X: Tensor) -> dict:
    """Independent factors, each with its own documented distribution."""
    parts = _PRODUCT._split(X)
    out = {}
    for name, fn, x in (("GLp", ref.moments_rank(det_positive=True), parts[0]), ("PSD", ref.moments_psd(), parts[1]),
                        ("LowRank(1)", ref.moments_rank(1), parts[2]),
                        ("AlmostOrthogonal(0.5)", ref.moments_almost_orthogonal(0.5), parts[3])):
        out.update({f"{name}: {k}": v for k, v in fn(x).items()})
    return out


_SQUARE_FULL = ((1, 1), (2, 2), (3, 3), (2, 3, 3))
_RANK2 = ((4, 4), (6, 3), (3, 6), (2, 3, 5, 2))

# Open sets: `project` clamps values up to max(floor, √ε·σ₁) (and flips the sign of the smallest
# for det < 0): the nearest point of the closure pushed inside by that margin, not a nearest point.
_OPEN = "an open set: project returns the nearest point of the closure pushed inside by the floor, so Y − project(Y) is not normal to a tangent space"
_BOUNDARY = "a set with boundary: project(Y) of a Gaussian Y lands on the boundary (clipped values), where the normal cone is not the normal space"
_SINGULAR = "project(Y) of a Gaussian Y may have rank < r, a singular point of the rank ≤ r set where `tangent` is not its tangent space"
_NO_TOL = "an open set whose membership (σ_min above the floor of f; GLp: det > 0) has no tolerance-sized boundary"
_INCOMPLETE = ("the embedded metric is incomplete: expmap(X, V) = X + V leaves the cone (NaN) for ‖V‖ ≥ λ_min(X); "
               "its geodesics within the geodesic radius are checked by expmap_geodesic, logmap, transport_parallel")
_SLACK = 1e-6  # the float64 clamp level √ε·max(1, σ₁) ~ 1.5e-8 σ₁ per value, relative to ‖Y‖
# softplus + ε with ε = √ε_dtype: the float32 map differs from the float64 one by ~3.5e-4 by design.
_SOFTPLUS = 2e-3

RANK_CASES: list[SpaceCase] = [
    # ------------------------------------------------------------------ SVD type
    SpaceCase("LowRank-1", gf.LowRank(rank=1), SHAPES_MATRIX, _low_rank(1), TOL, off_manifold=_raise_rank(1),
              smoke_shape=(4, 3), dim=ref.dim_rank(1), perturb=ref.perturb_rank(1), moments=ref.moments_rank(1)),
    SpaceCase("LowRank-2", gf.LowRank(rank=2), _RANK2, _low_rank(2), TOL, off_manifold=_raise_rank(2),
              smoke_shape=(4, 3), dim=ref.dim_rank(2), perturb=ref.perturb_rank(2), moments=ref.moments_rank(2)),
    SpaceCase("LowRank-2-cayley", gf.LowRank(rank=2, triv="cayley"), ((5, 3), (3, 5)), _low_rank(2), TOL,
              off_manifold=_raise_rank(2), smoke_shape=(4, 3), dim=ref.dim_rank(2), perturb=ref.perturb_rank(2),
              moments=ref.moments_rank(2)),
    SpaceCase("LowRank-full", gf.LowRank(rank=3), ((3, 3), (2, 3, 3)), _low_rank(3), TOL, has_logabsdet=True,
              smoke_shape=(3, 3), dim=ref.dim_full, moments=ref.moments_rank(3),
              skip={"membership": "rank ≤ 3 on 3×3 matrices is every matrix: no tolerance to flip at"}),
    SpaceCase("FixedRank-1", gf.FixedRank(rank=1), SHAPES_MATRIX, _fixed_rank(1), TOL, off_manifold=_zero,
              smoke_shape=(4, 3), dim=ref.dim_rank(1), perturb=ref.perturb_rank(1), moments=ref.moments_rank(1),
              project_slack=_SLACK, float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN}),
    SpaceCase("FixedRank-2", gf.FixedRank(rank=2), ((2, 2), *_RANK2), _fixed_rank(2), TOL, off_manifold=_zero,
              smoke_shape=(4, 3), dim=ref.dim_rank(2), perturb=ref.perturb_rank(2), moments=ref.moments_rank(2),
              project_slack=_SLACK, float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN}),
    # All of GL(3): `sample` draws both signs of det (pinned by the moments), so the points of the
    # (8, 3, 3) batch include det < 0 ones (all 11 points of a sign: probability 2⁻¹⁰).
    SpaceCase("FixedRank-square", gf.FixedRank(rank=3), ((3, 3), (2, 3, 3), (8, 3, 3)), _fixed_rank(3), TOL,
              off_manifold=_zero, has_logabsdet=True, smoke_shape=(3, 3), dim=ref.dim_full,
              moments=ref.moments_rank(3), project_slack=_SLACK,
              float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN, "membership": _NO_TOL}),
    SpaceCase("FixedRank-exp", gf.FixedRank(rank=2, f=EXP), ((4, 3), (2, 5)), _fixed_rank(2), TOL,
              off_manifold=_zero, raw_scales=(1.0,), smoke_shape=(4, 3), dim=ref.dim_rank(2),
              perturb=ref.perturb_rank(2), moments=ref.moments_rank(2), project_slack=_SLACK,
              skip={"project_normal": _OPEN}),
    SpaceCase("GLp", gf.GLp(), SHAPES_SQUARE, _glp, TOL, off_manifold=_negate_first_row, has_logabsdet=True,
              smoke_shape=(3, 3), dim=ref.dim_full, moments=ref.moments_rank(det_positive=True), project_slack=_SLACK,
              float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN, "membership": _NO_TOL}),
    SpaceCase("GLp-exp-cayley", gf.GLp(f=EXP, triv="cayley"), _SQUARE_FULL, _glp, TOL,
              off_manifold=_negate_first_row, has_logabsdet=True, raw_scales=(1.0,), smoke_shape=(3, 3),
              dim=ref.dim_full, moments=ref.moments_rank(det_positive=True), project_slack=_SLACK,
              skip={"project_normal": _OPEN, "membership": _NO_TOL}),
    SpaceCase("AlmostOrthogonal", gf.AlmostOrthogonal(lam=0.5), SHAPES_MATRIX, _almost_orthogonal(0.5), TOL,
              off_manifold=_times4, smoke_shape=(4, 3), dim=ref.dim_full,
              perturb=ref.perturb_singular_band(0.5), moments=ref.moments_almost_orthogonal(0.5),
              skip={"project_normal": _BOUNDARY}),
    SpaceCase("AlmostOrthogonal-square", gf.AlmostOrthogonal(lam=0.3, f="sigmoid"), _SQUARE_FULL,
              _almost_orthogonal(0.3), TOL, off_manifold=_times4, has_logabsdet=True, smoke_shape=(3, 3),
              dim=ref.dim_full, perturb=ref.perturb_singular_band(0.3),
              moments=ref.moments_almost_orthogonal(0.3), skip={"project_normal": _BOUNDARY}),
    SpaceCase("AlmostOrthogonal-0", gf.AlmostOrthogonal(lam=0.0), ((1, 1), (4, 4), (5, 2), (2, 5), (2, 3, 4, 3)),
              _almost_orthogonal(0.0), TOL, off_manifold=_times4, smoke_shape=(4, 3), dim=ref.dim_stiefel,
              perturb=ref.perturb_singular_band(0.0), moments=ref.moments_almost_orthogonal(0.0)),
    SpaceCase("AlmostOrthogonal-1-tanh", gf.AlmostOrthogonal(lam=1.0, f="tanh"), ((3, 3), (5, 2), (2, 5)),
              _almost_orthogonal(1.0), TOL, off_manifold=_times4, smoke_shape=(4, 3), dim=ref.dim_full,
              perturb=ref.perturb_singular_band(1.0), moments=ref.moments_almost_orthogonal(1.0),
              skip={"project_normal": _BOUNDARY}),
    # ---------------------------------------------------------------- eigen type
    SpaceCase("PSD", gf.PSD(), SHAPES_SQUARE, _pssd(positive=True), TOL, off_manifold=_negate, has_logabsdet=True,
              smoke_shape=(3, 3), dim=ref.dim_psd_rank(), perturb=ref.perturb_spectral_symmetry,
              moments=ref.moments_psd(), project_slack=_SLACK, float32_shift=_SOFTPLUS,
              skip={"project_normal": _OPEN, "expmap": _INCOMPLETE},
              transport="parallel"),  # the embedded metric is flat: the identity is the parallel transport
    # the affine-invariant metric (geoopt's SymmetricPositiveDefinite): the same chart, another metric
    SpaceCase("PSD-affine", gf.PSD(metric="affine"), SHAPES_SQUARE, _pssd(positive=True), TOL, off_manifold=_negate,
              has_logabsdet=True, smoke_shape=(3, 3), dim=ref.dim_psd_rank(), perturb=ref.perturb_spectral_symmetry,
              moments=ref.moments_psd(), project_slack=_SLACK, float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN},
              transport="parallel"),
    SpaceCase("PSD-exp-cayley", gf.PSD(f=EXP, triv="cayley"), _SQUARE_FULL, _pssd(positive=True), TOL,
              off_manifold=_negate, has_logabsdet=True, raw_scales=(1.0,), smoke_shape=(3, 3),
              dim=ref.dim_psd_rank(), perturb=ref.perturb_spectral_symmetry, moments=ref.moments_psd(),
              project_slack=_SLACK, skip={"project_normal": _OPEN, "expmap": _INCOMPLETE}),
    SpaceCase("PSSD", gf.PSSD(), SHAPES_SQUARE, _pssd(), TOL, off_manifold=_negate, has_logabsdet=True,
              smooth=False, smoke_shape=(3, 3), dim=ref.dim_psd_rank(), perturb=ref.perturb_psd(),
              moments=ref.moments_psd(), skip={"project_normal": _BOUNDARY}),
    SpaceCase("PSSDLowRank-1", gf.PSSDLowRank(rank=1), SHAPES_SQUARE, _pssd(1), TOL, off_manifold=_negate,
              smooth=False, smoke_shape=(3, 3), dim=ref.dim_psd_rank(1), perturb=ref.perturb_psd(1),
              moments=ref.moments_psd(1), skip={"project_normal": _SINGULAR}),
    SpaceCase("PSSDLowRank-2", gf.PSSDLowRank(rank=2), ((2, 2), (4, 4), (2, 3, 5, 5)), _pssd(2), TOL,
              off_manifold=_negate, smooth=False, smoke_shape=(4, 4), dim=ref.dim_psd_rank(2),
              perturb=ref.perturb_psd(2), moments=ref.moments_psd(2), skip={"project_normal": _SINGULAR}),
    SpaceCase("PSSDFixedRank-2", gf.PSSDFixedRank(rank=2), ((2, 2), (4, 4), (2, 3, 5, 5)), _pssd(2, positive=True),
              TOL, off_manifold=_negate, smoke_shape=(4, 4), dim=ref.dim_psd_rank(2), perturb=ref.perturb_psd_fixed(2),
              moments=ref.moments_psd(2), project_slack=_SLACK, float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN}),
    SpaceCase("PSSDFixedRank-full", gf.PSSDFixedRank(rank=3), ((3, 3), (2, 3, 3)), _pssd(3, positive=True), TOL,
              off_manifold=_negate, has_logabsdet=True, smoke_shape=(3, 3), dim=ref.dim_psd_rank(),
              perturb=ref.perturb_psd_fixed(3), moments=ref.moments_psd(3), project_slack=_SLACK,
              float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN}),
    # ---------------------------------------------------------------------- Product
    SpaceCase("Product", _PRODUCT, ((3, 12), (2, 3, 12)), _product_member, TOL, off_manifold=_product_off,
              smoke_shape=(3, 12), dim=_product_dim, perturb=_product_perturb, moments=_product_moments,
              project_slack=_SLACK, float32_shift=_SOFTPLUS, skip={"project_normal": _OPEN}),
]
