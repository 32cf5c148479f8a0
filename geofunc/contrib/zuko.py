r"""Linear layers of normalizing flows built from geofunc spaces, for zuko (github.com/probabilists/zuko).

A normalizing flow needs, for each layer :math:`y = W x`, the log-determinant
:math:`\log\lvert\det W\rvert` (every density evaluation) and the inverse :math:`x = W^{-1} y` (every
sample). When :math:`W` is a point of a square geofunc space, both come from the factorization the
space is built on, with no :math:`O(n^3)` decomposition of :math:`W`:

* ``log|det W| = M.logabsdet(Z, base)``: 0 for ``SO``; :math:`\sum_i \log f(s_i)` for ``GLp``,
  square ``FixedRank``/``AlmostOrthogonal`` (:math:`W = U \operatorname{diag}(\sigma) V^\top`) and
  :math:`\sum_i \log f(\lambda_i)` for ``PSD``/``PSSD`` (:math:`W = Q \operatorname{diag}(\lambda) Q^\top`);
  exact and differentiable.
* the inverse from the same factors: :math:`W^\top y` (``SO``, square ``Stiefel``; :math:`W^H y` if complex),
  :math:`V \operatorname{diag}(\sigma)^{-1} U^\top y` (the SVD family: ``GLp``, ``FixedRank``,
  ``AlmostOrthogonal``, ``SL``, ``LowRank``), :math:`Q \operatorname{diag}(\lambda)^{-1} Q^\top y` (the
  eigen family: ``PSD``, ``PSSD``, ``PSSDFixedRank``, ``PSSDLowRank``). The frames are the bases
  that ``M.rebase(Z, base)`` returns (the chart re-centred at the point: the same :math:`W`), and
  :math:`\sigma_i = u_i^\top W v_i`. Any other square space with a ``logabsdet`` is inverted by
  ``torch.linalg.solve`` (by the inverse under ``torch.func`` transforms, where ``solve``'s second
  derivatives are wrong on torch 2.13–2.14 under ``vmap``; in float32 for a bf16/fp16 ``W``).

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

import operator
from typing import Any, Optional

import optree
import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

try:
    import zuko
    from zuko.lazy import LazyTransform
except ImportError as exc:  # pragma: no cover (depends on the environment)
    raise ImportError(
        "geofunc.contrib.zuko needs zuko: the `flows` extra (python -m pip install -e \".[flows]\") or `pip install zuko`"
    ) from exc

from .. import spaces as S
from .._errors import ManifoldError, describe, error
from .._linalg import solve_vec
from ..nn._adapter import _base_problem, _concrete, _filled, _forget_replaced_bases, _note_checked, _write_values, refine_base
from ..spaces._base import LOW_PRECISION, _autocast_on, autocast_off

__all__ = ["LinearTransform", "SpaceLinear"]

#: Spaces whose square points are orthogonal (unitary): ``W⁻¹ = Wᵀ`` (``Wᴴ``).
ORTHOGONAL = (S.SO, S.Stiefel, S.Unitary)
#: Spaces whose points are ``U diag(σ) Vᵀ`` with the frames ``(U, V)`` as ``rebase``'s base.
SVD_FAMILY = (S.GLp, S.FixedRank, S.AlmostOrthogonal, S.SL, S.LowRank)
#: Spaces whose points are ``Q diag(λ) Qᵀ`` with the frame ``Q`` as ``rebase``'s base.
EIG_FAMILY = (S.PSD, S.PSSD, S.PSSDFixedRank, S.PSSDLowRank)


def _apply(W: Tensor, x: Tensor) -> Tensor:
    """``W x`` on the last dimension of ``x`` (``W`` of shape ``(*, n, n)``)."""
    if W.ndim == 2:
        return x @ W.mT
    return (W @ x.unsqueeze(-1)).squeeze(-1)


def _apply_t(W: Tensor, y: Tensor) -> Tensor:
    """``Wᴴ y`` on the last dimension of ``y`` (``Wᵀ y`` for a real ``W``)."""
    # Note [Complex frames are inverted by Wᴴ]
    # Square complex Stiefel (U(n)), complex PSD/PSSD (Hermitian, Q diag(λ) Qᴴ) are layers too: their
    # inverses are Wᴴ and Q diag(λ)⁻¹ Qᴴ, and λᵢ = qᵢᴴ W qᵢ. With the transpose the round trip
    # W⁻¹(W x) was off by O(1) (silently: log|det| was right); conj() of a real tensor is a no-op.
    if W.ndim == 2:
        return y @ W.conj()
    return (W.mH @ y.unsqueeze(-1)).squeeze(-1)


class LinearTransform(Transform):
    r"""The bijection :math:`y = W x` on the last dimension, :math:`W = M(Z, \text{base})` a point of a
    square geofunc space ``M`` (``M.to_manifold(Z, base)``).

    * ``log_abs_det_jacobian(x, y) = M.logabsdet(Z, base)``, broadcast to the batch shape of
      ``y = W x`` (``y.shape[:-1]``: the broadcast of ``Z``'s batch and ``x``'s);
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
            raise ManifoldError(f"LinearTransform: expected a geofunc space (an instance, e.g. gf.GLp()), got {describe(space)}")
        if not isinstance(Z, Tensor):  # a Product's tuple: its logabsdet exists, but its point is no matrix
            raise error(space, "`Z` to be a tensor of square matrices (..., n, n) for LinearTransform (a Product's "
                        "points are tuples: give each factor its own layer)", describe(Z))
        # Note [Flows traced by torch.jit.trace]
        # The spaces' maps refuse torch.jit.trace (Note [Traced by torch.jit.trace] in spaces/_base.py)
        # and name gf.nn.plain(model) as a way out, which a flow cannot take: SpaceLinear is no gf.nn
        # constraint, so plain leaves it as it is, and torch.onnx.export(gf.nn.plain(flow), ...,
        # dynamo=False) met the same refusal again. The transform refuses first, naming what works
        # for a flow (torch.export, or torch.onnx.export with dynamo=True: README, Deployment).
        if torch._C._get_tracing_state() is not None:
            raise error(space, "a LinearTransform (geofunc.contrib.zuko) to be captured by torch.export.export(model, "
                        "args) or torch.onnx.export(model, args, dynamo=True) (README: geofunc.nn, deployment; "
                        "gf.nn.plain leaves a SpaceLinear as it is: it is no gf.nn constraint)",
                        "torch.jit.trace (or a tool tracing with it: torch.onnx.export(dynamo=False)), which would "
                        "replay the decisions the maps take from the traced values for every later input")
        self.space, self.Z, self.base = space, Z, base
        self.ladj = space.logabsdet(Z, base)  # validates: square, full rank, a logabsdet exists
        self._weight: Optional[Tensor] = None  # W, formed on first use
        self._grad_mode = torch.is_grad_enabled()  # ... in this grad mode (Note [Formed on first use, as at construction])
        self._inverse_factors: Optional[tuple] = None

    @property
    def weight(self) -> Tensor:
        """The matrix ``W = space.to_manifold(Z, base)``."""
        # Note [Formed on first use, as at construction]
        # W and the inverse's factors are formed lazily (sampling needs no W: the factors are
        # cheaper) and kept for the transform's life, as zuko's transforms keep what they form in
        # __init__. Formed in the grad mode of their first use, a transform first used under no_grad
        # (an evaluation sample or log_prob of the distribution that is then trained) kept a W with
        # no graph: the gradient of a later log_prob missed W's path (only log|det|'s, formed in
        # __init__, was left) and was silently wrong (2.5 off in norm 7.5 on a 3×3 GLp). They are
        # now formed in the grad mode of the construction, as ``ladj`` and zuko's own transforms are.
        if self._weight is None:
            with torch.set_grad_enabled(self._grad_mode):
                self._weight = self.space.to_manifold(self.Z, self.base)
        return self._weight

    def __repr__(self) -> str:
        return f"LinearTransform({self.space!r}, n={self.weight.shape[-1]})"

    # ------------------------------------------------------------- the maps
    # Note [Vectors checked before the product]
    # W x is a matmul on x's last dimension: an x of another size, of a batch that does not broadcast
    # with W's, or of another dtype raised torch's "mat1 and mat2 shapes cannot be multiplied (5x4
    # and 3x3)", naming neither the layer nor what it expects (and the solve family's inverse its
    # own linalg.solve message). They are checked on shapes and dtypes only (no values: compile and
    # vmap are unaffected) and named as the spaces name bad input. Under autocast the dtypes may
    # differ (a float32 W and bf16 activations: the matmul casts both), and the inverse's solve
    # takes y in W's dtype there, as autocast runs the linalg solvers in float32.
    def _check(self, x: Any, what: str) -> None:
        Z = self.Z
        n, batch = Z.shape[-1], Z.shape[:-2]
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != n:
            raise error(self.space, f"`{what}` of shape (..., {n}) (the transform acts on the last dimension with W "
                        f"of shape {tuple(Z.shape)})", describe(x))
        if batch and any(a != b and a != 1 and b != 1 for a, b in zip(reversed(batch), reversed(x.shape[:-1]))):
            raise error(self.space, f"`{what}` of a batch shape that broadcasts with W's {tuple(batch)} (shape "
                        f"{tuple(Z.shape)})", describe(x))
        if x.dtype != Z.dtype and not _autocast_on(x.device.type):
            raise error(self.space, f"`{what}` of W's dtype {Z.dtype}", describe(x))

    def _call(self, x: Tensor) -> Tensor:
        self._check(x, "x")
        return _apply(self.weight, x)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # The batch of y = W x is the broadcast of W's and x's (a batch of matrices acting on one
        # vector, or on a batch of shape (2, 1)); the inverse calls this with x and y swapped.
        return self.ladj.expand(torch.broadcast_shapes(self.ladj.shape, x.shape[:-1], y.shape[:-1]))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(W x, log|det W|)``, the pair a zuko flow asks for."""
        y = self._call(x)
        return y, self.log_abs_det_jacobian(x, y)

    def _factors(self) -> tuple:
        """``("orthogonal",)``, ``("svd", U, σ, V)``, ``("eig", Q, λ)`` or ``("solve",)``, formed once."""
        if self._inverse_factors is None:
            with torch.set_grad_enabled(self._grad_mode):  # Note [Formed on first use, as at construction]
                self._inverse_factors = self._form_factors()
        return self._inverse_factors

    def _form_factors(self) -> tuple:
        M = self.space
        if isinstance(M, ORTHOGONAL):
            return ("orthogonal",)
        if not isinstance(M, SVD_FAMILY + EIG_FAMILY):
            return ("solve",)
        # The chart re-centred at W: its base holds the frames, its raw tensor only the values, so W
        # there is cheap to form when only the inverse is wanted (sampling).
        Z2, frames = M.rebase(self.Z, self.base)
        if self._weight is None:
            self._weight = M.to_manifold(Z2, frames)
        W = self._weight
        # With autocast off, as the maps: the factors are kept for the transform's life, and
        # first formed inside a bf16 autocast region their values were bf16 products (an
        # inverse 5e-3 off in float32 after the region, where it is 1e-6)
        with autocast_off(W.device.type):
            if isinstance(M, SVD_FAMILY):
                U, V = frames
                return ("svd", U, ((U.mH @ W) * V.mT).sum(-1), V)  # σᵢ = uᵢᴴ W vᵢ
            Q = frames
            return ("eig", Q, ((Q.mH @ W) * Q.mT).sum(-1))  # λᵢ = qᵢᴴ W qᵢ (Note [Complex frames are inverted by Wᴴ])

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y, "y")
        kind, *f = self._factors()
        if kind == "orthogonal":
            return _apply_t(self.weight, y)
        if kind == "svd":
            U, sigma, V = f
            return _apply(V, _apply_t(U, y) / sigma)
        if kind == "eig":
            Q, lam = f
            return _apply(Q, _apply_t(Q, y) / lam)
        # Note [Solves under torch.func]; y.to: autocast (Note [Vectors checked before the product]); a
        # bf16/fp16 W in float32, as the spaces compute (torch has no LU in those dtypes on the CPU)
        W = self.weight
        dt = torch.float32 if W.dtype in LOW_PRECISION else W.dtype
        return solve_vec(W.to(dt), y.to(dt)).to(W.dtype)


class SpaceLinear(LazyTransform):
    r"""A zuko lazy transform :math:`y = W x`, :math:`W` on a square geofunc space, trained through its
    raw tensor.

    Holds the raw parameter ``raw`` (``n × n``) and the chart's base (buffers ``base0``, ``base1``,
    ..., as the space's base pytree has leaves); ``forward(c)`` ignores the context and returns a
    :class:`LinearTransform`. The layer starts at ``init`` (default: the identity, a point of
    ``SO``, ``GLp``, ``PSD``, ... ; any point of the space may be given). A dtype change
    (``.double()``, ``.float()``, ``.to()``) or a ``load_state_dict`` of another dtype keeps the
    matrix up to the new dtype's rounding, as ``geofunc.nn`` modules do (Note [SpaceLinear across
    dtypes]).

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
        if not isinstance(space, S.AbstractSpace):  # (a class was 'got ABCMeta')
            raise ManifoldError(f"SpaceLinear: expected a geofunc space (an instance, e.g. gf.GLp()), got {describe(space)}")
        if not isinstance(features, bool):  # any integer type, as gf.nn's sizes and ranks (a NumPy int from a config)
            try:
                features = operator.index(features)
            except TypeError:
                pass
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ManifoldError(f"SpaceLinear: expected `features` to be an int ≥ 1, got {features!r}")
        if init is not None and (not isinstance(init, Tensor) or tuple(init.shape) != (features, features)):
            got = f"a tensor of shape {tuple(init.shape)}" if isinstance(init, Tensor) else type(init).__name__
            raise ManifoldError(f"SpaceLinear: expected `init` to be None or a tensor of shape ({features}, {features}) "
                                f"(features × features), got {got}")
        self.space = space
        X = torch.eye(features) if init is None else init.detach()
        Z, base = space.from_manifold(X)
        space.logabsdet(Z, base)  # fail now if the space has no log-determinant for this shape
        self.raw = nn.Parameter(Z.detach().clone())
        self._set_base(base)

    # Note [The base rebuilt by a template]
    # ``forward`` rebuilds the base from its buffers. By ``optree.tree_unflatten`` of the spec held
    # since construction, a flow's ``log_prob`` did not compile with fullgraph=True (Dynamo's optree
    # polyfill refuses a PyTreeSpec made outside the trace: "Expected `treespec` to be an instance of
    # PyTreeSpec"). The structure is also kept as a template, the base with each tensor replaced by
    # its buffer's name (plain tuples and strings: it deep-copies and pickles without torch's LeafSpec
    # warning), mapped back by geofunc.nn's _filled (tuples written out; torch's pytree for other
    # structures), which Dynamo traces, as geofunc.nn's adapter does.
    def _set_base(self, base: Any) -> None:
        leaves, self._base_spec = optree.tree_flatten(base, none_is_leaf=False)
        self._n_base = len(leaves)
        self._template = optree.tree_unflatten(self._base_spec, [f"base{i}" for i in range(self._n_base)])
        for i, leaf in enumerate(leaves):
            self.register_buffer(f"base{i}", leaf.detach().clone())
        self._note_checked()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_template" not in state:  # a layer pickled by an earlier geofunc
            self._template = optree.tree_unflatten(self._base_spec, [f"base{i}" for i in range(self._n_base)])

    def _base_leaves(self) -> list[Tensor]:
        return [getattr(self, f"base{i}") for i in range(self._n_base)]

    def _base_buffers(self) -> list[Tensor]:
        """:meth:`_base_leaves` read from ``_buffers`` (eager only: a getattr of a module costs ~3 us)."""
        buffers = self._buffers
        return [buffers[f"base{i}"] for i in range(self._n_base)]

    # Note [SpaceLinear across dtypes]
    # The layer holds its raw tensor and base itself, not through a geofunc.nn parametrization, so
    # it does on a dtype change what a constrained module does (Notes [Raw tensors across dtypes]
    # and [Bases across dtypes] in geofunc/nn/_adapter.py), with the same helpers: the raw entries
    # whose meaning depends on the dtype (the space's ``_dtype_coords``: the values
    # ``softplus(s) + √ε`` of GLp, PSD, square FixedRank, ...) are re-expressed in the new dtype's
    # coordinates, and a base that changed dtype is re-made valid in it. Cast alone, a float64
    # GLp layer with singular values (0.69, 3.4e-4, 4.5e-5) became (0.69, 6.8e-4, 3.9e-4) in
    # float32: log|det W| moved by +2.86 nats. Now the matrix moves by the new dtype's rounding
    # only; a value below float32's floor (√ε = 3.5e-4) is lifted to it, with a warning, as in
    # geofunc.nn. A ``state_dict`` whose raw tensor has another dtype is re-expressed alike before
    # torch casts it, and the base is re-made valid after it is loaded.

    def _apply(self, fn: Any, recurse: bool = True) -> "SpaceLinear":
        """``nn.Module._apply`` (``.to()``, ``.double()``, ...) keeping the matrix across a dtype
        change (Note [SpaceLinear across dtypes])."""
        view = self.space._dtype_coords(self.raw) if _concrete(self.raw) else None
        old, s_old = self.raw.dtype, (None if view is None else view.detach().clone())
        view = None  # a view holds its base: torch.utils.swap_tensors (.to() under swap semantics) refuses it
        before = [b.dtype for b in self._base_leaves()]
        out = super()._apply(fn, recurse)
        _forget_replaced_bases(self)  # Note [Replaced bases are not kept] in geofunc/nn/_adapter.py
        Z = self.raw
        if s_old is not None and Z.dtype != old and _concrete(Z):
            _write_values(f"{type(self).__name__}.raw", self.space, self.space._dtype_coords(Z), s_old, old, Z.dtype)
        if [b.dtype for b in self._base_leaves()] != before:
            self._refine_base()
        return out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
        """``nn.Module._load_from_state_dict``; a saved raw tensor of another dtype than the layer's is
        re-expressed in the layer's dtype before torch casts it, and a base saved in another dtype is
        re-made valid in the layer's (Note [SpaceLinear across dtypes]). ``state_dict`` is
        ``load_state_dict``'s own copy: the caller's tensors are not modified."""
        key, Z = f"{prefix}raw", self.raw
        saved = state_dict.get(key)
        if (not local_metadata.get("assign_to_params_buffers", False) and _concrete(saved) and _concrete(Z)
                and saved.dtype != Z.dtype and saved.shape == Z.shape and saved.is_complex() == Z.is_complex()):
            view = self.space._dtype_coords(saved)
            if view is not None:
                new = saved.detach().to(dtype=Z.dtype, copy=True)
                _write_values(f"{type(self).__name__}.raw", self.space, self.space._dtype_coords(new), view,
                              saved.dtype, Z.dtype)
                state_dict[key] = new
        saved_bases = [state_dict.get(f"{prefix}base{i}") for i in range(self._n_base)]
        cast = any(isinstance(s, Tensor) and s.dtype != b.dtype for s, b in zip(saved_bases, self._base_leaves()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        if cast:
            self._refine_base()

    @torch.no_grad()
    def _refine_base(self) -> None:
        """Re-make the base valid in its current dtype if it is not (a valid base is kept bit for bit)."""
        leaves = self._base_leaves()
        new = optree.tree_leaves(refine_base(self.space, self.base), none_is_leaf=False)
        for buf, leaf in zip(leaves, new):
            if leaf is not buf:
                buf.copy_(leaf)

    @property
    def base(self) -> Any:
        """The chart's base, rebuilt from the buffers."""
        # Note [The base rebuilt by a template]; by geofunc.nn's _filled, not pytree.tree_map, whose
        # recursive helper left a reference cycle of 7 objects per forward for the cyclic collector
        # (as it did in geofunc.nn), and took ~10 us of a ~250 us forward
        return _filled(self._template, self._buffers)

    @property
    def weight(self) -> Tensor:
        """The current matrix ``W = space.to_manifold(raw, base)``.

        Raises:
            ManifoldError: the base buffers are off the space, as :meth:`forward` (Note [SpaceLinear's
                base checked where it changes]: W from such a base is off the space).
        """
        return self.space.to_manifold(self.raw, self._checked_base())

    def forward(self, c: Optional[Tensor] = None) -> LinearTransform:
        """The transform ``y = W x`` (the context ``c`` is ignored).

        Raises:
            ManifoldError: the base buffers are off the space (an average of bases, ``to_empty``
                without a checkpoint loaded; Note [SpaceLinear's base checked where it changes]).
        """
        return LinearTransform(self.space, self.raw, self._checked_base())

    # Note [SpaceLinear's base checked where it changes]
    # log|det W| is read from the raw diagonal alone (Σ log f(sᵢ)), and W = to_manifold(raw, base)
    # trusts its base, so a base buffer off the space made log_prob silently wrong and W off the
    # space: an EMA of a flow by AveragedModel(use_buffers=True) (or gf.nn.average_, or an average of
    # state_dicts) averages the frames of layers that were rebased (3 rebases of a 4×4 SO layer: W
    # with slogdet −0.58 and log|det| 0; GLp −1.07 against −0.20), and to_empty without a checkpoint
    # leaves them zero (SO: W = 0, log|det| 0). The base is checked as geofunc.nn checks its
    # constraints' (Note [Bases checked where they change] in geofunc/nn/_adapter.py): in eager mode
    # on readable tensors, once per change of the buffers (kept with their version counters), not
    # under torch.compile, torch.func or a trace. Construction and rebase_ write valid bases and note
    # them checked; a base changed otherwise (a dtype change, a load, an outside write) is checked at
    # the next forward.
    def _checked_base(self) -> Any:
        base = self.base
        why = _base_problem(self, base)
        if why is not None:
            names = ", ".join(f"base{i}" for i in range(self._n_base))
            raise ManifoldError(
                f"SpaceLinear on {self.space!r}: expected its base (buffers {names}) on the space, as "
                f"construction and rebase_ leave it, got {why}. An average of bases is not a base: "
                "AveragedModel(use_buffers=True), gf.nn.average_ or an average of state_dicts averages them off "
                "the space; average the matrices (layer.weight) instead and make a layer there with "
                "SpaceLinear(space, n, init=space.project(W)), or load a checkpoint's own bases. After to_empty "
                "(deferred initialization) the bases hold no values until a checkpoint is loaded."
            )
        return base

    def _note_checked(self) -> None:
        """Note the current base buffers as valid (Note [SpaceLinear's base checked where it changes])."""
        if not torch.compiler.is_compiling():
            _note_checked(self, self._base_buffers())

    @torch.no_grad()
    def rebase_(self) -> "SpaceLinear":
        """Re-centre the chart at the current point (dynamic trivialization): ``W`` is unchanged and
        the raw tensor becomes small again. Reset the optimizer's state of ``raw`` afterwards
        unless it is plain SGD."""
        Z, base = self.space.rebase(self.raw, self.base)
        self.raw.copy_(Z)
        leaves, spec = optree.tree_flatten(base, none_is_leaf=False)
        if spec == self._base_spec:
            for i, leaf in enumerate(leaves):
                getattr(self, f"base{i}").copy_(leaf)
        else:  # e.g. the canonical base (None) became an explicit one
            for i in range(self._n_base):
                delattr(self, f"base{i}")
            self._set_base(base)
        self._note_checked()
        return self

    def extra_repr(self) -> str:
        return f"{self.space!r}, features={self.raw.shape[-1]}"


del zuko  # only LazyTransform is needed from it
