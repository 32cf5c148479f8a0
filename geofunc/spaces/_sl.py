"""The special linear group SL(n): square matrices of determinant one."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, final

import torch

from .._errors import ManifoldError, describe, error
from .._linalg import Triv, expm, logabsdet_lu, poison, poisoned_zero, sanitize
from ._base import AbstractSpace, cached_attribute, compute_cached, rounding_dtype
from ._factorized import _det_sign, spectral_svd
from ._glp import GLp

__all__ = ["SL"]

Tensor = torch.Tensor

# ``from_manifold`` lifts the smallest singular value of an SL point to at least this before
# handing it to GLp's inverse (the chart does not see the scale, see the class docstring): far
# above the floor of every value map (√ε of the stored dtype: 0.09 in bf16, 3.5e-4 in float32).
_LIFT = 0.25


def _reword(space: Any, e: ManifoldError) -> ManifoldError:
    """The message of an inner space's ``ManifoldError`` restated for ``space``."""
    msg = str(e)
    head, sep, tail = msg.partition(": expected ")
    return ManifoldError(f"{space!r}: expected {tail}" if sep else f"{space!r}: {msg}")


def _inverse(X: Tensor) -> Tensor:
    """``X⁻¹`` without LAPACK's singular-matrix exception (a singular or non-finite ``X`` gives inf/NaN)."""
    return torch.linalg.inv_ex(sanitize(X)).inverse + poison(X)


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class SL(AbstractSpace):
    r"""The special linear group: :math:`SL(n) = \{X \in \mathbb{R}^{n\times n} : \det X = 1\}`.

    Points are ``(*batch, n, n)`` tensors. The chart is :class:`GLp`'s, normalized in log scale:

    .. math::

        X = U \operatorname{diag}(\sigma) V^\top,\qquad
        \sigma_i = \exp\Big(\log f(s_i) - \tfrac1n \textstyle\sum_j \log f(s_j)\Big),

    i.e. ``to_manifold(Z, base) = Y · exp(−logabsdet_GLp(Z, base)/n)`` with ``Y =
    GLp(f, triv).to_manifold(Z, base)`` (``U``, ``V`` SO charts at ``base = (U_b, V_b)``, ``s =
    diag(Z)``; ``f`` as for :class:`GLp`: ``"softplus"``, a callable, or a pair ``(f, f_inverse)``).
    The geometric mean of the values is divided out, so ``det X = 1`` exactly in exact
    arithmetic and for every ``f`` (the values' common scale is the one direction of ``Z`` the
    chart does not see).

    * ``logabsdet(Z, base) = 0``, batch-shaped (NaN where ``Z`` or the base is not finite),
      with a zero gradient.
    * ``from_manifold(X)``: GLp's inverse of ``c·X``, ``c = max(1, 0.25/σ_min(X))`` (the chart
      is blind to ``c``: it only keeps the smallest singular value above the floor of ``f``), the
      rounding of ``det X`` taken out of the values in proportion to ``σᵢ⁻²`` (a step along the
      normal ``X⁻ᵀ``), so the round trip is as accurate as GLp's;
      ``rebase`` is GLp's (the same GLp point, so the same SL point).
    * ``tangent(X, G) = G − (tr(X⁻¹G)/‖X⁻¹‖²_F) X⁻ᵀ``: the orthogonal projection onto
      ``T_X SL = {V : tr(X⁻¹V) = 0}`` (``X⁻ᵀ`` is the normal of ``det = 1``).
    * ``project(Y)``: a canonical point, not the nearest one: ``Y``'s singular values lifted to
      ``√ε·σ₁`` (GLp's ``project`` of a det > 0 matrix) and, where ``det Y < 0``, the least one
      negated (``Y`` reflected in its least singular direction), rescaled by ``|det|^{−1/n}``;
      ``retract(X, V) = X expm(X⁻¹ tangent(X, V))`` (on SL for every ``V``, smooth, first order
      ``X + V`` for tangent ``V``).
    * ``sample``: GLp's sample (Haar frames) rescaled to determinant one.
    * Membership: ``det X > 0``, ``|log det X| / (‖X‖_F ‖X⁻¹‖_F) ≤ atol``: the relative
      distance to ``det = 1`` to first order (a computed ``det`` of an ill-conditioned matrix
      is only known to ``ε·n·cond(X)``), and ``X`` invertible in its dtype (``cond_F(X)·min(n, 4)·ε < 1``:
      every rounding of a singular matrix has ``cond_F ≥ 1/ε``). A distance, not a bound on ``det``: an
      ill-conditioned matrix far from ``det = 1`` can be near SL (``diag(1000, 1000, 1, 1, 1e-3)``, det 1000,
      is 7e-7 of its norm from SL, along ``X⁻ᵀ``), so ``contains`` takes it at float32's tolerance.

    Example::

        >>> M = SL()
        >>> X = M.to_manifold(torch.randn(4, 4, dtype=torch.float64))
        >>> round(float(torch.linalg.det(X)), 6)
        1.0
    """

    f: Any = "softplus"
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "f", self._glp.f)  # validated (and normalized) by GLp
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _glp(self) -> GLp:
        """The GLp whose chart SL normalizes (derived from the hyperparameters)."""
        try:
            return GLp(f=self.f, triv=self.triv)
        except ManifoldError as e:
            raise _reword(self, e) from None

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def _check_base(self, Z: Tensor, base: Any) -> None:
        if base is None:
            return
        n = Z.shape[-1]
        if isinstance(base, (tuple, list)):  # (before their shapes: Note [Dense tensors only] in _base.py)
            for b, what in zip(base, ("base[0]", "base[1]")):
                if isinstance(b, torch.Tensor):
                    self._require_dense(b, what)
        ok = isinstance(base, (tuple, list)) and len(base) == 2 and all(
            b is None or (isinstance(b, torch.Tensor) and b.ndim >= 2 and tuple(b.shape[-2:]) == (n, n)) for b in base
        )
        if not ok:
            raise error(self, f"`base` to be None or a pair (U, V) of ({n}, {n}) frames (as from_manifold returns)",
                        describe(base))
        if base[0] is not None:
            self._require_frame(Z, base[0], "base[0]")
        if base[1] is not None:
            self._require_frame(Z, base[1], "base[1]", base[0])

    # ------------------------------------------------------------------ the maps
    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        """``GLp.to_manifold(Z, base) · exp(−GLp.logabsdet(Z, base)/n)``."""
        self._check_shape(Z, "Z")
        self._check_base(Z, base)
        Y = self._glp.to_manifold(Z, base)
        # the trailing dims first: vmap over an empty batch fails on a 0-dim per-sample scalar op
        return Y * torch.exp(self._glp.logabsdet(Z, base)[..., None, None] / -Z.shape[-1])

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        smin = torch.linalg.svdvals(sanitize(X.detach()))[..., -1:, None]  # (see to_manifold)
        c = (_LIFT / smin).clamp(min=1.0)
        try:
            Z, base = self._glp.from_manifold(X * c)
        except ManifoldError as e:  # named as SL's (it named GLp and its floor)
            raise _reword(self, e) from None
        # Note [The determinant of a rounded SL point]: the values' product is det X = 1 only to the
        # rounding of X, ~ε·cond(X); the chart divides it out, and an even split rescaled the whole
        # matrix by (det X)^{−1/n}: float32 points from raw entries of scale 5 came back up to 5e-3 off
        # (GLp's round trip of the same points: 1e-6). The excess δ = Σ log σᵢ goes to the values in
        # proportion to σᵢ⁻² instead (to first order, the step along the normal X⁻ᵀ of det = 1: the
        # nearest point of SL), so a value moves by ~|δ|·σ_min²/σᵢ, within its own rounding εσ₁;
        # an even split where the values are equal, as before. The chart sees no common scale, so the
        # values are lifted again to _LIFT where the step moved the smallest below it.
        vm = self._glp._value_map
        s = torch.diagonal(Z, dim1=-2, dim2=-1)
        logv = torch.log(vm(s))
        delta = logv.sum(-1, keepdim=True) - s.shape[-1] * torch.log(c[..., 0])
        logv = logv - delta * torch.softmax(-2.0 * logv, dim=-1)
        logv = logv + (math.log(_LIFT) - logv.amin(-1, keepdim=True)).clamp(min=0.0)
        return Z + torch.diag_embed(vm.inverse(self, torch.exp(logv)) - s), base

    def _dtype_coords(self, Z: Tensor) -> Tensor | None:
        return self._glp._dtype_coords(Z)  # GLp's raw tensor

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """GLp's ``rebase``: the same GLp point, hence the same SL point."""
        self._check_shape(Z, "Z")
        self._check_base(Z, base)
        return self._glp.rebase(Z, base)

    def _refine_base(self, base: Any, force: bool = False) -> Any:
        """GLp's (the base is GLp's frames)."""
        return self._glp._refine_base(base, force)

    def _invalid_base(self, base: Any) -> str | None:
        """GLp's (the base is GLp's frames)."""
        return self._glp._invalid_base(base)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G − (tr(X⁻¹G)/‖X⁻¹‖²_F) X⁻ᵀ``, the orthogonal projection onto ``{V : tr(X⁻¹V) = 0}``."""
        self._check_pair(X, G, "G")
        N = _inverse(X).mT  # the normal of det = 1 at X
        coef = (N * G).sum(dim=(-2, -1)) / (N * N).sum(dim=(-2, -1))
        return G - coef[..., None, None] * N

    # Note [SL's guard judges the stored point]
    # A bf16/fp16 retract computes R in float32 and rounds it. The guard judged the float32 R, which is
    # on SL, but its rounding is not where cond(R) approaches 1/u of the stored dtype: 5×5 steps with
    # tangent vectors of scale 1.5 / 2 / 3 gave 4% / 17% / 29% finite bf16 matrices with det ≤ 0 (fp16:
    # 0.4% / 5% / 18%), not NaN as documented, which contains refused only if asked. The guard now
    # tests the rounded R at √ of the stored dtype's tolerance; float32/float64 calls are unchanged.
    # (Rigorous bounds that need no rounding, u·cond_F(R) < 1 or Skeel's u·‖|R⁻¹||R|‖ < 1, NaN'd 16% / 15%
    # of bf16 steps at scale 1, where no rounding flips det.) Under torch.compile, Inductor by default
    # (emulate_precision_casts=False) fuses R.to(bf16).float() into no rounding, so a compiled bf16 step
    # still judges the float32 R there.
    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``X expm(X⁻¹ tangent(X, V))``: on SL for every ``V`` (``det expm(A) = e^{tr A}`` and
        ``tr(X⁻¹ tangent(X, V)) = 0``), ``X + V`` to first order for tangent ``V``. NaN for a
        matrix whose exact point the dtype cannot represent (cond ≳ 1/u, from ‖X⁻¹V‖ ≳ 25 in
        float64), never a finite matrix off SL."""
        self._check_pair(X, V, "V")
        Vt = self.tangent(X, V)
        # X rescaled to det 1 first: the product carries X's rounding of det, which drifted step after
        # step until the check below made a bf16 point NaN after ~30 radam steps (Note [Retractions that
        # multiply] in geofunc/_linalg.py); an exact point is unchanged, tangent derivatives too
        X = X * torch.exp(logabsdet_lu(sanitize(X))[..., None, None] / -X.shape[-1])  # ([..., None, None] first: vmap of an empty batch)
        R = X @ expm(_inverse(X) @ Vt)
        # The exact point can be beyond what the dtype represents: cond(R) grows like e^{2‖X⁻¹V‖}, and
        # past ~1/u the computed R is no point of SL (det −1e5 from a generator of norm ~54 in float64,
        # found by rsgd with momentum diverging; ~28 suffices at n = 4). There R is NaN, per matrix,
        # rather than a finite non-member, judged by the membership test at √ of its default
        # tolerance (loose, so that an X off SL by rounding or a finite-difference step, which retract
        # extends smoothly, is not caught; det ≤ 0 always is), with no Python branching.
        # A bf16/fp16 call judges R as it will be stored (Note [SL's guard judges the stored point]).
        with torch.no_grad():
            stored = rounding_dtype(R.dtype)
            Rj = R if stored == R.dtype else R.to(stored)
            on = self.contains(Rj, atol=self._atol(Rj, None) ** 0.5)
        return R * torch.where(on, 1.0, math.nan).to(R.dtype)[..., None, None]

    def project(self, Y: Tensor) -> Tensor:
        """``Y``'s values lifted to ``√ε·σ₁`` (the least one negated where ``det Y < 0``), rescaled by
        ``|det|^{−1/n}`` (see the class docstring)."""
        self._check_shape(Y, "Y")
        # GLp's lift of small values (4ε√n·σ₁, so that its members stay put) leaves cond_F up to ~1/(4ε),
        # where SL's singular guard begins: project of a singular Y gave non-members (Note [Members are
        # fixed points of project]); SL's canonical point keeps the lift √ε·σ₁
        # Note [SL's canonical point at det < 0]
        # GLp's canonical point of a det < 0 matrix sets its least singular value to −√ε·σ₁ (the nearest
        # point of GLp's closure, pushed inside), and the rescaling to det 1 then multiplied it by
        # (|det Y|/(√ε·σ₁·σ_min))^{1/n}: 42× the input's norm at the median of random 4×4 inputs in
        # float64, 3.5× in float32 (the two dtypes disagreed), and a soup of two SL weights whose mean
        # has det < 0 (gf.nn.average_) came out 40× their scale. The least value now keeps its size
        # and takes the minus sign (Y reflected in its least singular direction, det −det Y > 0), so
        # the point is Y's scale and float32's is float64's rounded; a value at the lift is as before.
        vm = self._glp._value_map

        def g_fn(s: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
            g, dg = vm.project(s, torch.ones_like(s, dtype=torch.bool), None, math.inf)
            least = torch.arange(s.shape[-1], device=s.device) == s.shape[-1] - 1
            neg = ((_det_sign(U) * _det_sign(Vh)) < 0).unsqueeze(-1) & least
            return torch.where(neg, -g, g), torch.where(neg, -dg, dg)

        # Note [SL's canonical point is scale invariant]
        # The value map's lift is √ε·max(1, σ₁), clamped at the floor of f (absolute: GLp's points are
        # not scale invariant), but SL's canonical point is defined by the relative lift √ε·σ₁: a
        # well-conditioned Y of entries ~1e-4 in float32 (~1e-8 in float64) had every value lifted to
        # the floor, and came out 1.2 from project(Y) (float32 and float64 disagreed), and Y of entries
        # near the largest float gave NaN. Y is scaled to its largest entry first (|Y| ≤ 1 ≤ σ₁, so the
        # lift is √ε·σ₁); the rescaling by |det|^{-1/n} takes any positive factor out exactly.
        m = Y.abs().amax((-2, -1), keepdim=True)
        Yn = Y / torch.where(m > 0, m, torch.ones_like(m)).detach()
        P = spectral_svd(Yn, g_fn)
        lad = logabsdet_lu(sanitize(P))[..., None, None]  # (see to_manifold; not slogdet: Note [Solves under torch.func])
        return P * torch.exp(lad / -Y.shape[-1]) + poison(P)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """GLp's sample (Haar frames, separated singular values) rescaled to ``det = 1``."""
        shape = self._sample_shape(shape, dtype)
        P = self._glp.sample(shape, generator=generator, dtype=dtype, device=device)
        lad = torch.linalg.slogdet(P)[1]
        return P * torch.exp(lad / -shape[-1])[..., None, None]

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``0`` (batch-shaped; NaN where ``Z`` or the base is not finite; zero gradient, NaN there)."""
        self._check_shape(Z, "Z")
        self._check_base(Z, base)
        frames = () if base is None else tuple(B for B in base if B is not None)  # (U, V), checked above
        return poisoned_zero(Z, *frames)[..., 0, 0]

    # ------------------------------------------------------------------ membership
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        Xs, nan = sanitize(X), poison(X)[..., 0, 0]
        sign, lad = torch.linalg.slogdet(Xs)
        inf = torch.full_like(lad, math.inf)
        cond = torch.linalg.matrix_norm(Xs) * torch.linalg.matrix_norm(_inverse(Xs))
        rel = lad.abs() / cond
        # numerically singular (cond_F · n · ε ≥ 1): the measure above tends to 0 as X⁻¹ blows up, so
        # a singular matrix (det 1e-8 in float32) was "on SL"; no point of SL is that far from invertible
        # in its dtype (SL.retract's NaN there is this test's)
        # (tensor-tensor: vmap of an empty batch refuses a 0-dim per-sample op with a Python number)
        # Note [The singular guard of SL]: the rounding E of an exactly singular matrix has ‖E‖₂ ≤ ε‖X‖_F,
        # so its σ_min ≤ ε‖X‖_F and cond_F ≥ ‖X‖_F/σ_min ≥ 1/ε; measured, cond_F·4ε ≥ 12 for roundings of
        # singular matrices and float32 products of rank n − 1 and n/2, n = 2 to 128. The bound was
        # cond_F·n·ε, n/4 times stricter from n = 4 on: float32 chart points of SL(64) from raw entries
        # of scale 3 (cond₂ ~ 1e5, det right to 1e-4) were refused; now min(n, 4).
        singular = ~(cond < torch.full_like(lad, 1.0 / (min(Xs.shape[-1], 4) * torch.finfo(lad.dtype).eps)))
        return {
            "det(X) ≤ 0 (inf if so)": torch.where(sign <= 0, inf, torch.zeros_like(lad)) + nan,
            "|log det X| / (‖X‖_F ‖X⁻¹‖_F)": torch.where(torch.isnan(rel), inf, rel) + nan,  # singular: |−inf|/inf
            "X singular in its dtype, cond_F(X)·min(n, 4)·ε ≥ 1 (inf if so)": torch.where(singular, inf, torch.zeros_like(lad)) + nan,
        }
