"""DTensor arguments to the maps of a space: local work where the maths allows, else one gather.

Note [DTensor]
A ``torch.distributed.tensor.DTensor`` given to a linear-algebra op (``matrix_exp``, ``qr``,
``svd``, ``eigh``, ``solve``, ...) is silently replicated by PyTorch: every rank all-gathers
it and does the whole work. The maps of a space never let that happen implicitly; every map
(the ``_POLICY_METHODS`` of ``spaces/_base.py`` and the membership measures) takes one of three
explicit routes, chosen from the placements and shapes alone (never from values):

* **local** (no communication): every DTensor argument is sharded on *batch* dimensions only
  (``Shard(d)`` with ``d`` before the point's dimensions, or ``Replicate``), with the same
  mesh and placements; plain tensors are replicated values that broadcast along the sharded
  dimensions. A map is per point, so each rank maps its own shard: the result is a DTensor
  with the same placements.
* **gathered once**: otherwise (a point's own rows or columns are split across ranks, as FSDP2
  does with ``Shard(0)`` of a weight), each DTensor argument is all-gathered once
  (``full_tensor``), the map runs on plain tensors on every rank, and each tensor result is
  returned as a DTensor on the same mesh: with the placements of the leading DTensor argument
  when it has that argument's shape (a local slice, no communication), replicated otherwise.
  Gradients flow back through the gather as a reduce-scatter. A ``Partial`` argument (a sum
  still pending) takes this route too: its gather is the all-reduce, and its results are
  ``Replicate`` where the leading argument's placement is ``Partial``.
* **row-sharded frames** (before the gather): a tall ``Stiefel``/``Grassmannian`` frame whose
  rows are split (``Shard(-2)`` on a 1-D mesh, every argument alike, float32/float64) keeps its
  work sharded in the maps that need only k×k Gram matrices ``XᵀY = Σᵢ XᵢᵀYᵢ`` (one
  all-reduce each; its backward all-reduces the gradient): ``tangent``, ``egrad_to_rgrad``,
  ``transport`` and ``inner`` (one; the canonical metric's ``inner`` three), ``retract``
  (CholeskyQR2: two; the canonical metric's retraction, a chart, is gathered) and the measure of
  ``contains``/``check`` (one), so ``geofunc.optim`` steps on such frames without a gather. A
  NaN on any rank reaches every rank through the reduced Gram matrix. Where the result keeps
  the rows (``tangent``, ``retract``, ...) each rank's gradient of a Gram matrix is its rows'
  share and the backward all-reduces it; where the result is replicated (``inner``, the
  measures) the gradient reaching the Gram matrix is already whole on every rank and passes
  through unreduced.

The gather costs one all-gather of the point per call, and the compute is replicated. The
other maps of tall frames (the chart, the polar ``project``) and every other space gather.
``check`` (and the eager validation of ``from_manifold``) gathers the batch-shaped measures of
``contains``, so that every rank raises the same ``ManifoldError``. The leading tensor argument
(``Z``, ``X`` or ``Y``) decides whether a call takes these routes: a plain one with DTensors
after it is a ``ManifoldError`` (Note [A plain point beside DTensors]), never a silent gather.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar, cast

import optree
import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _AVAILABLE = True
except ImportError:  # torch built without distributed support: no tensor is a DTensor

    class DTensor:  # type: ignore[no-redef]
        """Stand-in for ``isinstance`` checks (never instantiated)."""

    _AVAILABLE = False

__all__ = ["DTensor", "distributed", "first_dtensor", "gather", "gathered", "like", "placed_like", "route"]

Tensor = torch.Tensor


def _dtensor_args(args: tuple, kwargs: dict) -> list:
    """The DTensor arguments, at the top level or one container deep (bases are tuples)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, DTensor):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            found.extend(t for t in a if isinstance(t, DTensor))
    return found


def first_dtensor(args: tuple, deep: bool) -> tuple[int, Any]:
    """``(i, t)``: the first DTensor ``t`` among ``args`` (at the top level, or one container deep where
    ``deep``) and the index of the argument that holds it; ``(-1, None)`` if none (Note [A plain point
    beside DTensors])."""
    for i, a in enumerate(args):
        if type(a) is Tensor:  # (the common case first: an isinstance of a Tensor subclass costs ~0.1 µs)
            continue
        if isinstance(a, DTensor):
            return i, a
        if deep and isinstance(a, (tuple, list)):
            for t in a:
                if isinstance(t, DTensor):
                    return i, t
    return -1, None


# Note [A plain point beside DTensors]
# The leading tensor argument of a space's map decides its DTensor route (Note [DTensor]). A plain lead
# with a DTensor after it (PoincareBall().dist(x, y) with only y a DTensor, tangent(X, G) with G the
# DTensor gradient of a replicated plain X) used to reach the maths and fail there with torch's
# "aten.sub.Tensor got mixed torch.Tensor and DTensor", naming an aten op; it is now a ManifoldError
# naming the space, the map and both arguments, asked only once the map has failed, so a call without
# DTensors pays nothing for it (a map that runs anyway, Rn().tangent(X, G) returning the DTensor G, is
# left to run; and never a silent gather: which placement the result should have is the caller's to say). A Product's factorwise maps look at
# the top level only: a product point may hold DTensor and plain factors side by side.


def gather(tree: Any) -> Any:
    """``tree`` with every DTensor all-gathered into a plain tensor (``full_tensor``, differentiable)."""
    return optree.tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, tree, none_is_leaf=True)


def placed_like(t: Any, ref: Any) -> Any:
    """A full value ``t`` as a DTensor placed like ``ref``, holding rank 0's values on every rank
    (``distribute_tensor`` scatters from rank 0: a collective, every rank calls it); ``t`` itself
    where ``ref`` is not a DTensor. A ``Partial`` placement becomes ``Replicate``."""
    if not isinstance(ref, DTensor) or not isinstance(t, Tensor) or isinstance(t, DTensor):
        return t
    from torch.distributed.tensor import distribute_tensor

    placements = [Replicate() if p.is_partial() else p for p in ref.placements]
    return distribute_tensor(t, ref.device_mesh, placements)


def like(tree: Any, lead: Any) -> Any:
    """Plain tensors of ``tree`` (the same values on every rank) as DTensors on ``lead``'s mesh:
    with ``lead``'s placements where a tensor has ``lead``'s shape (``Replicate`` for a
    ``Partial`` one), replicated otherwise (no communication either way: a replicated tensor is
    sliced locally)."""
    mesh = lead.device_mesh
    replicated = [Replicate()] * mesh.ndim
    # A Partial placement (a sum still pending) was reduced by the gather: its results are replicated.
    placements = [Replicate() if p.is_partial() else p for p in lead.placements]

    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or isinstance(t, DTensor):
            return t
        out = DTensor.from_local(t, mesh, replicated, run_check=False)
        return out.redistribute(mesh, placements) if t.shape == lead.shape else out

    return optree.tree_map(wrap, tree, none_is_leaf=True)


def _local_route(dts: list, args: tuple, kwargs: dict, point_ndim: int) -> bool:
    """Whether every sharding is along batch dimensions only (Note [DTensor], local route)."""
    lead = dts[0]
    for t in dts:
        if t.device_mesh != lead.device_mesh or tuple(t.placements) != tuple(lead.placements):
            return False
        if t.ndim != lead.ndim:
            return False
    sharded = [p.dim for p in lead.placements if isinstance(p, Shard)]
    if not all(isinstance(p, (Shard, Replicate)) for p in lead.placements):
        return False  # Partial: a sum still to be reduced
    if any(d < 0 or d >= lead.ndim - point_ndim for d in sharded):
        return False
    # Note [Broadcast DTensors]
    # DTensors must also have lead's size along every sharded dim: a (1, n) DTensor that
    # broadcasts against a (4, n) one, both Shard(0), holds its one row on rank 0 and none on rank
    # 1, whose local (2, n) and (0, n) do not broadcast: rank 1 raised a ManifoldError about shapes
    # the caller never passed while rank 0 went on to its next collective and hung. Such an
    # argument takes the gathered route, where the shapes broadcast as the caller wrote them.
    if any(t.shape[d] != lead.shape[d] for t in dts for d in sharded):
        return False
    # Plain tensors must broadcast along the sharded dims (aligned from the right), and add no
    # leading dims: those would move the sharded dim of the result (a G of (2, 1, n, k) with X of
    # (4, n, k) sharded on dim 0 gave a (4, 2, n, k) DTensor labelled Shard(0), its values mixed up)
    for a in optree.tree_leaves((args, kwargs), none_is_leaf=False):
        if isinstance(a, Tensor) and not isinstance(a, DTensor):
            if a.ndim > lead.ndim:
                return False
            for d in sharded:
                j = d - (lead.ndim - a.ndim)
                if j >= 0 and a.shape[j] != 1:
                    return False
    return True


def _from_local(tree: Any, lead: Any) -> Any:
    """Results of the local route as DTensors with ``lead``'s placements; the global size of a
    sharded (batch) dimension is ``lead``'s, the others are the local ones."""
    mesh, placements = lead.device_mesh, lead.placements
    sharded = {p.dim for p in placements if isinstance(p, Shard)}

    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or isinstance(t, DTensor):
            return t
        if any(d >= t.ndim for d in sharded):  # a result without lead's batch dims
            return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
        shape = torch.Size(lead.shape[d] if d in sharded else n for d, n in enumerate(t.shape))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)

    return optree.tree_map(wrap, tree, none_is_leaf=True)


# ----------------------------------------------------------------------------- row-sharded frames
class _SumOverRanks(torch.autograd.Function):
    """An all-reduce (sum) over ``group``; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _SumToReplicated(torch.autograd.Function):
    """An all-reduce (sum) over ``group`` whose result leaves the map replicated (``inner``, the
    measures): the gradient that reaches it is a replicated DTensor's, the whole gradient on every
    rank, so it passes through unchanged (summing it, as :class:`_SumOverRanks` does for a Gram
    matrix used by row-sharded results, counted it once per rank)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


def _frame_tangent(space: Any, gram: Callable[..., Tensor], X: Tensor, G: Tensor) -> Tensor:
    """``G − X sym(XᵀG)`` (Stiefel) or ``G − X XᵀG`` (Grassmannian), as their ``tangent``."""
    from .spaces import Stiefel

    S = gram(X, G)
    return G - X @ (0.5 * (S + S.mT) if type(space) is Stiefel else S)  # final classes: no ABCMeta check


def _frame_retract(space: Any, gram: Callable[..., Tensor], X: Tensor, V: Tensor) -> Tensor:
    """CholeskyQR2 of ``X + V``, as ``geofunc._linalg.chol_qr``: ``Y R⁻¹`` is row-wise and
    ``RᵀR = YᵀY`` a Gram matrix."""
    from ._linalg import qr_trust

    Y = X + V
    for _ in range(2):
        R, _ = torch.linalg.cholesky_ex(gram(Y, Y), upper=True)
        Y = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return Y * qr_trust(R)  # NaN where there is no QR factor (Note [Numerically rank-deficient QR])


def _frame_violations(space: Any, gram: Callable[..., Tensor], X: Tensor) -> dict[str, Tensor]:
    """``max |XᵀX − I|`` (``XᴴX`` if complex), as ``FrameSpace._violations`` (the same name)."""
    I = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)  # noqa: E741
    E = (gram(X, X) - I).abs()
    err = E.sum(dim=(-2, -1)) if X.shape[-1] == 0 else E.amax(dim=(-2, -1))  # 0 for the empty frame
    return {("max|XᴴX − I|" if X.is_complex() else "max|XᵀX − I|"): err}


def _frame_transport(space: Any, gram: Callable[..., Tensor], X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``tangent(Y, V)``, the default transport of the embedded metric."""
    return _frame_tangent(space, gram, Y, V)


def _canonical(space: Any) -> bool:
    """Whether the frame space has Stiefel's canonical metric (Note [The metrics of Stiefel])."""
    return getattr(space, "metric", "embedded") == "canonical"


def _frame_rgrad(space: Any, gram: Callable[..., Tensor], X: Tensor, G: Tensor) -> Tensor:
    """The embedded metric's tangent projection, or the canonical metric's ``G − X GᵀX``, as
    ``egrad_to_rgrad``."""
    if _canonical(space):
        return G - X @ gram(G, X)
    return _frame_tangent(space, gram, X, G)


def _frame_inner(space: Any, gram: Callable[..., Tensor], X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``tr(UᵀV)`` (the embedded metric), ``− ½ tr((XᵀU)ᵀ XᵀV)`` with the canonical one, as ``inner``."""
    out = gram(U, V).diagonal(dim1=-2, dim2=-1).sum(-1)
    if _canonical(space):
        out = out - 0.5 * (gram(X, U) * gram(X, V)).sum(dim=(-2, -1))
    return out


_ROW_SHARDED = {
    "tangent": _frame_tangent,
    "egrad_to_rgrad": _frame_rgrad,
    "transport": _frame_transport,
    "inner": _frame_inner,
    "retract": _frame_retract,
    "_violations": _frame_violations,
}
#: The maps that depend on the metric, and the metrics whose row-sharded formulas are above: any
#: other metric (a new one included) takes the gathered route, never another metric's formula.
_METRIC_MAPS = {
    "inner": ("embedded", "canonical"),
    "egrad_to_rgrad": ("embedded", "canonical"),
    "retract": ("embedded",),
}
#: The row-sharded maps whose results are replicated (no row dimension): their Gram matrices'
#: gradients are whole on every rank already (:class:`_SumToReplicated`).
_REPLICATED_RESULT = frozenset({"inner", "_violations"})


def _row_sharded(self: Any, name: str, dts: list, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
    """The row-sharded implementation of ``self.name`` for these arguments, if it applies."""
    from .spaces import Grassmannian, Stiefel

    if name not in _ROW_SHARDED or kwargs or type(self) not in (Stiefel, Grassmannian):
        return None
    metric = getattr(self, "metric", "embedded")
    if name in _METRIC_MAPS and metric not in _METRIC_MAPS[name]:  # e.g. the canonical retraction, a chart: gathered
        return None
    lead = dts[0]
    if lead.ndim < 2 or lead.shape[-2] <= lead.shape[-1] or lead.device_mesh.ndim != 1:
        return None
    if tuple(lead.placements) != (Shard(lead.ndim - 2),) or lead.dtype not in (torch.float32, torch.float64):
        return None
    if len(dts) != len(args) or any(t.shape != lead.shape or t.placements != lead.placements for t in dts):
        return None
    return _ROW_SHARDED[name]


# Note [Checks inside a map on DTensors]
# The local route maps each rank's own points, so a map that checks values and raises (Hurwitz's
# _from_manifold: its eager certificate and round-trip checks, beyond the measures check gathers) raised
# on the rank holding the bad point only: a batch of 4 sharded on 2 ranks whose point 3 passes check but
# has no numerically positive definite certificate (diag(-1, 0, -2)) raised on rank 1 while rank 0
# returned its shard's raw tensors and went on to its next collective, to wait there until the timeout
# (the plain call refuses the batch). A space names such maps in ``_gathered_maps``; a DTensor takes the
# gathered route for them (one all-gather; from_manifold and rebase are rare: a start, an update_base),
# every rank checks the whole batch and raises the same error.
def route(fn: Callable[..., Any], self: Any, args: tuple, kwargs: dict) -> Any:
    """Call the space map ``fn`` on DTensor arguments by the routes of Note [DTensor]."""
    dts = _dtensor_args(args, kwargs)
    if not dts:
        return fn(self, *args, **kwargs)
    lead = dts[0]
    rows = _row_sharded(self, fn.__name__, dts, args, kwargs)
    if rows is not None:
        self._check_shape(lead, "X")
        group = lead.device_mesh.get_group()
        reduce = _SumToReplicated if fn.__name__ in _REPLICATED_RESULT else _SumOverRanks
        gram = lambda A, B: reduce.apply(A.mT @ B, group)  # noqa: E731  XᵀY = Σᵢ XᵢᵀYᵢ
        with torch.autocast(lead.device.type, enabled=False):
            out = rows(self, gram, *(t.to_local() for t in args))
        return _from_local(out, lead)
    if _local_route(dts, args, kwargs, self.point_ndim) and fn.__name__ not in getattr(self, "_gathered_maps", ()):
        unwrap = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        out = fn(self, *optree.tree_map(unwrap, args, none_is_leaf=True),
                 **optree.tree_map(unwrap, kwargs, none_is_leaf=True))
        return _from_local(out, lead)
    return like(fn(self, *gather(args), **gather(kwargs)), lead)


def distributed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a space map whose first argument is a point so that a DTensor point takes :func:`route`."""
    if not _AVAILABLE:
        return fn

    @functools.wraps(fn)
    def method(self: Any, X: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(X, DTensor):
            return route(fn, self, (X, *args), kwargs)
        return fn(self, X, *args, **kwargs)

    return method


_F = TypeVar("_F", bound=Callable[..., Any])


def gathered(fn: _F) -> _F:
    """Wrap a method so that DTensor arguments are gathered once and its tensor results returned
    like the first of them (the gathered route of Note [DTensor], always): for the ``nn``
    adapters, whose base buffers are replicated plain tensors."""

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        dts = _dtensor_args(args, kwargs)
        if not dts:
            return fn(self, *args, **kwargs)
        return like(fn(self, *gather(args), **gather(kwargs)), dts[0])

    return cast(_F, method)  # the identity on fn's type: the nn adapters' methods keep their signatures
