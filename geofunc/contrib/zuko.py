r"""Linear layers of normalizing flows built from geofunc spaces, for zuko (github.com/probabilists/zuko).

A normalizing flow needs, for each layer :math:`y = W x`, the log-determinant
:math:`\log\lvert\det W\rvert` (every density evaluation) and the inverse :math:`x = W^{-1} y` (every
sample). When :math:`W` is a point of a square geofunc space, both come from the factorization the
space is built on, with no :math:`O(n^3)` decomposition of :math:`W`:

* ``log|det W| = M.logabsdet(Z, base)``: 0 for ``SO``; :math:`\sum_i \log f(s_i)` for ``GLp``,
  square ``FixedRank``/``AlmostOrthogonal`` (:math:`W = U \operatorname{diag}(\sigma) V^\top`) and
  :math:`\sum_i \log f(\lambda_i)` for ``PSD``/``PSSD`` (:math:`W = Q \operatorname{diag}(\lambda) Q^\top`);
  exact and differentiable.
* the inverse from the same factors: :math:`W^\top y` (``SO``, square ``Stiefel``),
  :math:`V \operatorname{diag}(\sigma)^{-1} U^\top y` (the SVD family),
  :math:`Q \operatorname{diag}(\lambda)^{-1} Q^\top y` (the eigen family). The frames are the bases
  that ``M.rebase(Z, base)`` returns (the chart re-centred at the point: the same :math:`W`), and
  :math:`\sigma_i = u_i^\top W v_i`. Any other square space with a ``logabsdet`` is inverted by
  ``torch.linalg.solve`` (by the inverse under ``torch.func`` transforms, where ``solve``'s second
  derivatives are wrong on torch 2.13–2.14 under ``vmap``).

:class:`LinearTransform` is the transform itself (a :class:`torch.distributions.Transform`, which
is what zuko's transforms are); :class:`SpaceLinear` is the zuko lazy transform (an ``nn.Module``
holding the raw parameter and the chart's base) that goes into ``zuko.flows.Flow``. The raw tensor
is trained by any optimizer; ``SpaceLinear.rebase_()`` re-centres the chart (dynamic
trivialization) without changing the layer.

Example::

    >>> import torch, zuko, geofunc as gf
    >>> from geofunc.contrib.zuko import SpaceLinear
    >>> flow = zuko.flows.Flow(
    ...     transform=[SpaceLinear(gf.GLp(), 2), zuko.flows.MaskedAutoregressiveTransform(2, hidden_features=[16]),
    ...                SpaceLinear(gf.SO(), 2)],
    ...     base=zuko.flows.UnconditionalDistribution(
    ...         zuko.distributions.DiagNormal, torch.zeros(2), torch.ones(2), buffer=True),
    ... )
    >>> flow().log_prob(torch.randn(5, 2)).shape
    torch.Size([5])

zuko is imported by this module only (the ``flows`` extra:
``python -m pip install -e ".[flows]"``); ``import geofunc`` never imports it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints
from torch.utils import _pytree

try:
    import zuko
    from zuko.lazy import LazyTransform
except ImportError as exc:  # pragma: no cover (depends on the environment)
    raise ImportError(
        "geofunc.contrib.zuko needs zuko: the `flows` extra (python -m pip install -e \".[flows]\") or `pip install zuko`"
    ) from exc

from .. import spaces as S
from .._errors import ManifoldError
from .._linalg import solve_vec

__all__ = ["LinearTransform", "SpaceLinear"]

#: Spaces whose square points are orthogonal: ``W⁻¹ = Wᵀ``.
ORTHOGONAL = (S.SO, S.Stiefel)
#: Spaces whose points are ``U diag(σ) Vᵀ`` with the frames ``(U, V)`` as ``rebase``'s base.
SVD_FAMILY = (S.GLp, S.FixedRank, S.AlmostOrthogonal)
#: Spaces whose points are ``Q diag(λ) Qᵀ`` with the frame ``Q`` as ``rebase``'s base.
EIG_FAMILY = (S.PSD, S.PSSD, S.PSSDFixedRank)


def _apply(W: Tensor, x: Tensor) -> Tensor:
    """``W x`` on the last dimension of ``x`` (``W`` of shape ``(*, n, n)``)."""
    if W.ndim == 2:
        return x @ W.mT
    return (W @ x.unsqueeze(-1)).squeeze(-1)


def _apply_t(W: Tensor, y: Tensor) -> Tensor:
    """``Wᵀ y`` on the last dimension of ``y``."""
    if W.ndim == 2:
        return y @ W
    return (W.mT @ y.unsqueeze(-1)).squeeze(-1)


class LinearTransform(Transform):
    r"""The bijection :math:`y = W x` on the last dimension, :math:`W = M(Z, \text{base})` a point of a
    square geofunc space ``M`` (``M.to_manifold(Z, base)``).

    * ``log_abs_det_jacobian(x, y) = M.logabsdet(Z, base)`` (broadcast to ``x.shape[:-1]``);
    * the inverse by the factorization of ``W`` (see the module docstring); it is computed on first
      use and kept for the life of the transform.

    Args:
        space: a square space with ``logabsdet`` (``SO``, ``GLp``, ``PSD``, square ``FixedRank``, ...).
        Z: the raw tensor, shape ``(*, n, n)``.
        base: the chart's base (``None``: the canonical one).

    Raises:
        ManifoldError: ``space`` has no ``logabsdet`` for ``Z``'s shape (not square, or rank < n).

    Example::

        >>> import torch, geofunc as gf
        >>> t = LinearTransform(gf.GLp(), torch.randn(3, 3, dtype=torch.float64))
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> y, ladj = t.call_and_ladj(x)
        >>> torch.allclose(t.inv(y), x), torch.allclose(ladj, torch.linalg.slogdet(t.weight)[1].expand(5))
        (True, True)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, space: S.AbstractSpace, Z: Tensor, base: Any = None, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        if not isinstance(space, S.AbstractSpace):
            raise ManifoldError(f"LinearTransform: expected a geofunc space, got {type(space).__name__}")
        self.space, self.Z, self.base = space, Z, base
        self.ladj = space.logabsdet(Z, base)  # validates: square, full rank, a logabsdet exists
        self._weight: Optional[Tensor] = None  # W, formed on first use
        self._inverse_factors: Optional[tuple] = None

    @property
    def weight(self) -> Tensor:
        """The matrix ``W = space.to_manifold(Z, base)``."""
        if self._weight is None:
            self._weight = self.space.to_manifold(self.Z, self.base)
        return self._weight

    def __repr__(self) -> str:
        return f"LinearTransform({self.space!r}, n={self.weight.shape[-1]})"

    # ------------------------------------------------------------- the maps
    def _call(self, x: Tensor) -> Tensor:
        return _apply(self.weight, x)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ladj.expand(x.shape[:-1])

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(W x, log|det W|)``, the pair a zuko flow asks for."""
        return self._call(x), self.log_abs_det_jacobian(x, x)

    def _factors(self) -> tuple:
        """``("orthogonal",)``, ``("svd", U, σ, V)``, ``("eig", Q, λ)`` or ``("solve",)``."""
        if self._inverse_factors is None:
            M = self.space
            if isinstance(M, ORTHOGONAL):
                self._inverse_factors = ("orthogonal",)
            elif isinstance(M, SVD_FAMILY + EIG_FAMILY):
                # The chart re-centred at W: its base holds the frames, its raw tensor only the
                # values, so W there is cheap to form when only the inverse is wanted (sampling).
                Z2, frames = M.rebase(self.Z, self.base)
                if self._weight is None:
                    self._weight = M.to_manifold(Z2, frames)
                W = self._weight
                if isinstance(M, SVD_FAMILY):
                    U, V = frames
                    sigma = ((U.mT @ W) * V.mT).sum(-1)  # σᵢ = uᵢᵀ W vᵢ
                    self._inverse_factors = ("svd", U, sigma, V)
                else:
                    Q = frames
                    lam = ((Q.mT @ W) * Q.mT).sum(-1)  # λᵢ = qᵢᵀ W qᵢ
                    self._inverse_factors = ("eig", Q, lam)
            else:
                self._inverse_factors = ("solve",)
        return self._inverse_factors

    def _inverse(self, y: Tensor) -> Tensor:
        kind, *f = self._factors()
        if kind == "orthogonal":
            return _apply_t(self.weight, y)
        if kind == "svd":
            U, sigma, V = f
            return _apply(V, _apply_t(U, y) / sigma)
        if kind == "eig":
            Q, lam = f
            return _apply(Q, _apply_t(Q, y) / lam)
        return solve_vec(self.weight, y)  # Note [Solves under torch.func]


class SpaceLinear(LazyTransform):
    r"""A zuko lazy transform :math:`y = W x`, :math:`W` on a square geofunc space, trained through its
    raw tensor.

    Holds the raw parameter ``raw`` (``n × n``) and the chart's base (buffers ``base0``, ``base1``,
    ..., as the space's base pytree has leaves); ``forward(c)`` ignores the context and returns a
    :class:`LinearTransform`. The layer starts at ``init`` (default: the identity, a point of
    ``SO``, ``GLp``, ``PSD``, ... ; any point of the space may be given).

    Args:
        space: a square space with ``logabsdet``.
        features: ``n``, the dimension of the flow.
        init: the initial matrix (``None``: the identity).

    Example::

        >>> import torch, geofunc as gf
        >>> layer = SpaceLinear(gf.PSD(), 3)
        >>> t = layer()
        >>> torch.allclose(t(torch.ones(3)), torch.ones(3), atol=1e-5)  # starts at the identity
        True
    """

    def __init__(self, space: S.AbstractSpace, features: int, init: Optional[Tensor] = None) -> None:
        super().__init__()
        if not isinstance(space, S.AbstractSpace):
            raise ManifoldError(f"SpaceLinear: expected a geofunc space, got {type(space).__name__}")
        self.space = space
        X = torch.eye(features) if init is None else init.detach()
        Z, base = space.from_manifold(X)
        space.logabsdet(Z, base)  # fail now if the space has no log-determinant for this shape
        self.raw = nn.Parameter(Z.detach().clone())
        self._set_base(base)

    def _set_base(self, base: Any) -> None:
        leaves, self._base_spec = _pytree.tree_flatten(base)
        self._n_base = len(leaves)
        for i, leaf in enumerate(leaves):
            self.register_buffer(f"base{i}", leaf.detach().clone())

    @property
    def base(self) -> Any:
        """The chart's base, rebuilt from the buffers."""
        return _pytree.tree_unflatten([getattr(self, f"base{i}") for i in range(self._n_base)], self._base_spec)

    @property
    def weight(self) -> Tensor:
        """The current matrix ``W = space.to_manifold(raw, base)``."""
        return self.space.to_manifold(self.raw, self.base)

    def forward(self, c: Optional[Tensor] = None) -> LinearTransform:
        """The transform ``y = W x`` (the context ``c`` is ignored)."""
        return LinearTransform(self.space, self.raw, self.base)

    @torch.no_grad()
    def rebase_(self) -> "SpaceLinear":
        """Re-centre the chart at the current point (dynamic trivialization): ``W`` is unchanged and
        the raw tensor becomes small again. Reset the optimizer's state of ``raw`` afterwards
        unless it is plain SGD."""
        Z, base = self.space.rebase(self.raw, self.base)
        self.raw.copy_(Z)
        leaves, spec = _pytree.tree_flatten(base)
        if spec == self._base_spec:
            for i, leaf in enumerate(leaves):
                getattr(self, f"base{i}").copy_(leaf)
        else:  # e.g. the canonical base (None) became an explicit one
            for i in range(self._n_base):
                delattr(self, f"base{i}")
            self._set_base(base)
        return self

    def extra_repr(self) -> str:
        return f"{self.space!r}, features={self.raw.shape[-1]}"


del zuko  # only LazyTransform is needed from it
