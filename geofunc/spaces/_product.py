"""Products of spaces: points are tuples, every map acts factor-wise."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, final

import torch

from .._errors import ManifoldError, describe, error
from ._base import AbstractSpace, _broadcast, _broadcastable

__all__ = ["Product"]

Tensor = torch.Tensor


class _Shape:
    """A batch shape where :meth:`Product._require_broadcast` reads a result's ``shape``."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple) -> None:
        self.shape = shape


@final
@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Product(AbstractSpace):
    r"""The product :math:`M_1 \times \dots \times M_k`: points are tuples ``(X_1, ..., X_k)``, ``X_i ∈ M_i``.

    ``Product(M1, ..., Mk)`` (or ``Product([M1, ..., Mk])``). Every map acts factor-wise:
    ``to_manifold((Z_1, ..., Z_k), (b_1, ..., b_k)) = (M_1.to_manifold(Z_1, b_1), ...)``;
    ``from_manifold`` and ``rebase`` return ``(tuple of raw tensors, tuple of bases)`` (``base=None``:
    every factor's canonical base); ``tangent``, ``retract``, ``project`` pair up the tuples;
    ``sample(shapes)`` takes one full shape per factor; ``contains`` is the ``&`` of the factors'
    (batch shapes must broadcast); ``logabsdet`` is the sum of the factors' (the determinant of the
    block-diagonal matrix); ``inner`` and ``sqdist`` the sums of the factors', ``expmap`` and
    ``logmap`` the factors' and ``dist`` the product distance ``√(Σ dist_i²)``, where every factor
    has them. Factors may have different shapes, batch dims and dtypes. Errors
    name the product and the factor.

    Example::

        >>> M = Product(gf.SO(), gf.Sphere())
        >>> X = M.to_manifold((torch.randn(3, 3), torch.randn(4)))
        >>> [x.shape for x in X]
        [torch.Size([3, 3]), torch.Size([4])]
    """

    factors: tuple

    def __init__(self, *factors: Any, **kwargs: Any) -> None:
        # `factors=` by keyword: the dataclass field's name, which dataclasses.replace (and copy.replace)
        # pass (Product(factors=(M1, M2)) == Product(M1, M2)); it raised TypeError.
        if kwargs:
            if set(kwargs) != {"factors"} or factors:
                raise TypeError(f"Product takes its factors by position (Product(M1, M2)) or as factors=(M1, M2), "
                                f"got {len(factors)} positional and keywords {sorted(kwargs)}")
            factors = (kwargs["factors"],)
        if len(factors) == 1 and isinstance(factors[0], (tuple, list)):
            factors = tuple(factors[0])
        object.__setattr__(self, "factors", tuple(factors))
        if not factors:
            raise error(self, "at least one factor space", "none")
        for i, M in enumerate(factors):
            if not isinstance(M, AbstractSpace):
                raise error(self, f"factor {i} to be a geofunc space", describe(M))

    def __repr__(self) -> str:
        return f"Product({', '.join(repr(M) for M in self.factors)})"

    @property
    def _complex_only(self) -> bool:  # type: ignore[override]
        """A factor's points are complex only: ``sample``'s one dtype cannot be bfloat16/float16."""
        return any(M._complex_only for M in self.factors)

    # ------------------------------------------------------------------ helpers
    def _tuple(self, X: Any, what: str) -> tuple:
        k = len(self.factors)
        if not isinstance(X, (tuple, list)) or len(X) != k:
            raise error(self, f"`{what}` to be a tuple of {k} entries (one per factor)", describe(X))
        return tuple(X)

    def _bases(self, base: Any) -> tuple:
        return (None,) * len(self.factors) if base is None else self._tuple(base, "base")

    def _refine_base(self, base: Any, force: bool = False) -> Any:
        """Each factor's :meth:`~AbstractSpace._refine_base` (NotImplemented if one factor's is)."""
        out = tuple(M._refine_base(b, force) for M, b in zip(self.factors, self._bases(base)))
        return NotImplemented if any(b is NotImplemented for b in out) else out

    def _invalid_base(self, base: Any) -> str | None:
        """The first factor's :meth:`~AbstractSpace._invalid_base`, with its index."""
        for i, (M, b) in enumerate(zip(self.factors, self._bases(base))):
            why = M._invalid_base(b)
            if why is not None:
                return f"factor {i} ({M!r}): {why}"
        return None

    # Note [DTensor factors of a product]
    # Every map of a product is its factors' maps, each of which routes its own DTensor arguments (Note
    # [DTensor] in geofunc/_dtensor.py), and combines their batch-shaped results with torch ops, which
    # DTensor runs on any placement. Routed here too, by the product's point_ndim (2, whatever the
    # factors'), a tuple of batch-sharded points took the gathered route: Product(PoincareBall(),
    # Lorentz()) on (B, n) and (B, n + 1) points, both Shard(0), all-gathered them on every call and
    # returned the second factor Replicate (not of the leading tensor's shape), so a sharded table
    # was whole on every rank after one optimizer step. The product takes no route of its own
    # (``_factorwise_maps``): each factor maps its own shard and keeps its placements.
    _factorwise_maps: ClassVar[bool] = True

    def _each(self, fn: Callable[..., Any], *args: tuple) -> tuple:
        out = []
        for i, (M, *a) in enumerate(zip(self.factors, *args)):
            try:
                out.append(fn(M, *a))
            except ManifoldError as e:
                raise ManifoldError(f"{self!r}: factor {i}: {e}") from None
        return tuple(out)

    def _require_broadcast(self, parts: tuple, method: str) -> None:
        """Factors' batch-shaped results of ``method`` whose batch shapes do not broadcast are a
        ``ManifoldError`` naming them (a bare RuntimeError from ``&`` or ``+`` otherwise), as are
        ones that pair up both by trailing and by leading dims (Note [Batches of different ranks])."""
        shape = parts[0].shape
        for p in parts[1:]:
            if not _broadcastable(shape, p.shape):
                got = ", ".join(f"factor {i}: {tuple(q.shape)}" for i, q in enumerate(parts))
                raise error(self, f"factors whose batch shapes broadcast (`{method}` combines their results)",
                            f"batch shapes {got}")
            shape = _broadcast([shape, p.shape])
        shapes = [tuple(p.shape) for p in parts]
        r = max(len(s) for s in shapes)
        if any(0 < len(s) < r and any(d != 1 for d in s) for s in shapes):
            lead = shapes[0] + (1,) * (r - len(shapes[0]))
            for s in shapes[1:]:
                t = s + (1,) * (r - len(s))
                if not _broadcastable(lead, t):
                    return  # only the trailing reading broadcasts: it is the one meant
                lead = _broadcast([lead, t])
            if len({s[0] for s in shapes if any(d != 1 for d in s)}) > 1:
                return  # leading sizes differ (a 1 against n): no stack vmap reads (it maps equal sizes); trailing meant
            got = ", ".join(f"factor {i}: {s}" for i, s in enumerate(shapes))
            raise error(self, f"factors whose batch shapes pair their points one way (`{method}` combines their "
                              "results; Note [Batches of different ranks])",
                        f"batch shapes {got}, which broadcast both by trailing dims (torch's rule) and by leading "
                        "dims (a stack of models, as vmap reads them), pairing other points; add singleton dims "
                        "to say which, or vmap over the stacked dim")

    # Note [Batches of different ranks]
    # A product's batch-shaped results (contains, inner, dist, sqdist, logabsdet, check) combine the factors'
    # by broadcasting their batch shapes, which aligns trailing dims. Where factors' batches have different
    # ranks, that is not how a stack reads them: K stacked models (torch.func.stack_module_state) with a
    # Product(SO(), Rn()) entry (weight, bias) have batch shapes (K,) and (K, n), and for K = n torch's rule
    # paired weight j with entry j of every model's bias: gf.contains reported column j (one entry of each
    # model) where model j's weight was off SO, and inner summed across models, silently, while vmap over
    # the stack (and the same factors constrained apart) pair model k with model k. Batch shapes that
    # broadcast both ways, a shorter one not all ones, are refused; where only one reading broadcasts
    # (a (3, 1) batch with a (2,) one: trailing) it is taken, as before, and so is the trailing one where
    # the leading reading would broadcast a leading 1 against n (a (3,) batch with a (1, 3) one): vmap maps
    # equal sizes only, so no stack reads them that way.

    def _fold(self, parts: tuple, method: str, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``op`` over the factors' batch-shaped results of ``method`` (checked by :meth:`_require_broadcast`)."""
        self._require_broadcast(parts, method)
        out = parts[0]
        for p in parts[1:]:
            out = op(out, p)
        return out

    def _check_shape(self, X: Any, what: str = "X") -> None:
        self._each(lambda M, x: M._check_shape(x, what), self._tuple(X, what))

    # --------------------------------------------------------------------- maps
    def to_manifold(self, Z: Any, base: Any = None) -> tuple:
        return self._each(lambda M, z, b: M.to_manifold(z, b), self._tuple(Z, "Z"), self._bases(base))

    def from_manifold(self, X: Any) -> tuple[tuple, tuple]:
        pairs = self._each(lambda M, x: M.from_manifold(x), self._tuple(X, "X"))
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def _from_manifold(self, X: Any) -> tuple[tuple, tuple]:
        pairs = self._each(lambda M, x: M._from_manifold(x), self._tuple(X, "X"))
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def rebase(self, Z: Any, base: Any) -> tuple[tuple, tuple]:
        pairs = self._each(lambda M, z, b: M.rebase(z, b), self._tuple(Z, "Z"), self._bases(base))
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def tangent(self, X: Any, G: Any) -> tuple:
        return self._each(lambda M, x, g: M.tangent(x, g), self._tuple(X, "X"), self._tuple(G, "G"))

    def retract(self, X: Any, V: Any) -> tuple:
        return self._each(lambda M, x, v: M.retract(x, v), self._tuple(X, "X"), self._tuple(V, "V"))

    def egrad_to_rgrad(self, X: Any, G: Any) -> tuple:
        return self._each(lambda M, x, g: M.egrad_to_rgrad(x, g), self._tuple(X, "X"), self._tuple(G, "G"))

    def transport(self, X: Any, Y: Any, V: Any) -> tuple:
        return self._each(lambda M, x, y, v: M.transport(x, y, v), self._tuple(X, "X"), self._tuple(Y, "Y"),
                          self._tuple(V, "V"))

    def inner(self, X: Any, U: Any, V: Any) -> Tensor:
        """The product metric: the sum of the factors' ``inner`` (batch-shaped)."""
        parts = self._each(lambda M, x, u, v: M.inner(x, u, v), self._tuple(X, "X"), self._tuple(U, "U"),
                           self._tuple(V, "V"))
        return self._fold(parts, "inner", torch.add)

    # Note [Closed forms of a product]
    # The geodesics of a product (with the product metric, ``inner`` above) are the tuples of the
    # factors' geodesics, so ``expmap`` and ``logmap`` act factor-wise and the distance is
    # √(Σ dist_i²). They exist where every factor has them: a factor without a closed form raises
    # its own ManifoldError, with its index (``_each``). ``sqdist`` is the sum of the factors'
    # ``sqdist`` (each smooth at Y = X, where the square root of ``dist`` is not), not ``dist²``.
    def expmap(self, X: Any, V: Any) -> tuple:
        """The factors' ``expmap`` (Note [Closed forms of a product])."""
        return self._each(lambda M, x, v: M.expmap(x, v), self._tuple(X, "X"), self._tuple(V, "V"))

    def logmap(self, X: Any, Y: Any) -> tuple:
        """The factors' ``logmap`` (Note [Closed forms of a product])."""
        return self._each(lambda M, x, y: M.logmap(x, y), self._tuple(X, "X"), self._tuple(Y, "Y"))

    def sqdist(self, X: Any, Y: Any) -> Tensor:
        """The sum of the factors' ``sqdist`` (batch-shaped; Note [Closed forms of a product])."""
        parts = self._each(lambda M, x, y: M.sqdist(x, y), self._tuple(X, "X"), self._tuple(Y, "Y"))
        return self._fold(parts, "sqdist", torch.add)

    def dist(self, X: Any, Y: Any) -> Tensor:
        """``√(Σ dist_i²)`` of the factors' ``dist`` (batch-shaped; Note [Closed forms of a product])."""
        parts = self._each(lambda M, x, y: M.dist(x, y), self._tuple(X, "X"), self._tuple(Y, "Y"))
        if len(parts) == 1:
            return parts[0]
        self._require_broadcast(parts, "dist")
        return torch.linalg.vector_norm(torch.stack(torch.broadcast_tensors(*parts)), dim=0)

    def project(self, Y: Any) -> tuple:
        return self._each(lambda M, y: M.project(y), self._tuple(Y, "Y"))

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> tuple:
        shapes = self._tuple(shape, "shape")
        return self._each(lambda M, s: M.sample(s, generator=generator, dtype=dtype, device=device), shapes)

    def logabsdet(self, Z: Any, base: Any = None) -> Tensor:
        parts = self._each(lambda M, z, b: M.logabsdet(z, b), self._tuple(Z, "Z"), self._bases(base))
        return self._fold(parts, "logabsdet", torch.add)

    # --------------------------------------------------------------- membership
    def contains(self, X: Any, atol: float | None = None) -> Tensor:
        parts = self._each(lambda M, x: M.contains(x, atol), self._tuple(X, "X"))
        return self._fold(parts, "contains", torch.logical_and)

    def check(self, X: Any, atol: float | None = None) -> None:
        X = self._tuple(X, "X")
        self._each(lambda M, x: M.check(x, atol), X)
        self._batch_shape(X, "check")  # Note [A product's batch in check]

    # Note [A product's batch in check]
    # ``contains`` (and ``inner``, ``dist``, ...) refuse a tuple whose factors' batch shapes do not broadcast
    # (tests/test_odd_inputs.py): there is no batch of product points to answer for. ``check`` checked each
    # factor on its own and passed such a tuple silently (a (3, 4) batch of sphere points with a (2,) Rn
    # batch), where ``contains`` of the same tuple raised. It now refuses it with the same error.
    def _batch_shape(self, X: tuple, method: str) -> tuple:
        """The broadcast batch shape of the factors' points ``X`` (a ManifoldError naming ``method`` where the
        factors' batch shapes do not broadcast)."""
        parts = tuple(_Shape(M._batch_shape(tuple(x), method) if isinstance(M, Product) else tuple(x.shape[: x.ndim - M.point_ndim]))
                      for M, x in zip(self.factors, X))
        self._require_broadcast(parts, method)
        return _broadcast([p.shape for p in parts])

    def _violations(self, X: Any) -> dict[str, Tensor]:
        """The factors' measures under their own names (a name repeated by a later factor gets `` [factor i]``)."""
        out: dict[str, Tensor] = {}
        for i, d in enumerate(self._each(lambda M, x: M._violations(x), self._tuple(X, "X"))):
            for name, v in d.items():
                out[name if name not in out else f"{name} [factor {i}]"] = v
        return out
