"""geoopt's manifolds as geofunc spaces: the ``constraints`` of a model built with
``geoopt.ManifoldParameter`` s, for :class:`geofunc.optim.TorchOptimizer` or the functional optimizers.

    >>> import geoopt
    >>> from geofunc.contrib.geoopt import constraints
    >>> model = torch.nn.Linear(3, 4)
    >>> model.weight = geoopt.ManifoldParameter(geoopt.Stiefel().random(4, 3))
    >>> constraints(model.named_parameters())
    {'weight': Stiefel(triv='cayley', metric='canonical')}
    >>> opt = gf.optim.TorchOptimizer(model.named_parameters(), constraints(model.named_parameters()),
    ...                               gf.optim.radam, lr=1e-3)

geoopt is not imported: a manifold is recognised by its class (by name, along its class hierarchy,
so subclasses of geoopt's classes are recognised as what they extend) and read through the
attributes geoopt 0.5 documents (a ball's ``c``, a hyperboloid's ``k``, the SPD metric). Which maps
then equal geoopt's, and where the steps differ, is in ``docs/guide/migration-geoopt.md``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

from .. import spaces as S
from .._errors import ManifoldError, describe

__all__ = ["constraints", "space_of"]

Tensor = torch.Tensor


def _names(manifold: Any) -> list[str]:
    return [c.__name__ for c in type(manifold).__mro__]


def _curvature(manifold: Any, attr: str) -> float:
    """A fixed curvature parameter as a float; a learnable one (``learnable=True``) has no geofunc space."""
    value = getattr(manifold, attr)
    if isinstance(value, Tensor) and value.requires_grad:
        raise ManifoldError(f"geofunc.contrib.geoopt: expected a fixed curvature, got {type(manifold).__name__} with a "
                            f"learnable {attr} (geofunc's spaces hold their hyperparameters as numbers).")
    return float(value.item() if isinstance(value, Tensor) else value)


def space_of(manifold: Any) -> Optional[S.AbstractSpace]:
    """The geofunc space of a geoopt manifold (``None`` for ``Euclidean``: a free parameter).

    ===============================================  =============================================
    geoopt                                           geofunc
    ===============================================  =============================================
    ``EuclideanStiefel``                             ``Stiefel()``
    ``Stiefel()`` = ``CanonicalStiefel``             ``Stiefel(triv="cayley", metric="canonical")``
    ``Sphere``, ``SphereExact``                      ``Sphere()``
    ``PoincareBall(c)``, ``PoincareBallExact(c)``    ``PoincareBall(c=c)``
    ``Stereographic(k)``, k < 0                      ``PoincareBall(c=-k)``
    ``Lorentz(k)``                                   ``Lorentz(k=k)``
    ``SymmetricPositiveDefinite()`` (AIM)            ``PSD(metric="affine")``
    ``BirkhoffPolytope``                             ``Birkhoff()``
    ``Euclidean``                                    ``None``
    ===============================================  =============================================

    The curvature is the one geoopt computes with: its ``PoincareBall`` keeps ``c`` through a float32
    softplus, so ``PoincareBall(c=0.5)`` reads ``c = 0.49999997``, and the space takes that value (the
    maps then equal geoopt's to rounding).

    Anything else (``Scaled``, ``ProductManifold``, a ``Stereographic`` model of curvature ≥ 0, a
    learnable curvature, the Siegel spaces, a ``Sphere`` with an intersection or complement, the SPD
    manifold with another metric) raises :class:`~geofunc.ManifoldError` naming it.
    """
    names = _names(manifold)
    if "EuclideanStiefel" in names:
        return S.Stiefel()
    if "CanonicalStiefel" in names:
        return S.Stiefel(triv="cayley", metric="canonical")
    if "Sphere" in names and "Stereographic" not in names:
        if getattr(manifold, "projector", None) is not None:  # geoopt's Sphere(intersection=..., complement=...)
            raise ManifoldError(f"geofunc.contrib.geoopt: expected a geoopt Sphere without an intersection or "
                                f"complement (a sphere of a subspace has no geofunc space), got {manifold!r}.")
        return S.Sphere()
    if "PoincareBall" in names:
        return S.PoincareBall(c=_curvature(manifold, "c"))
    if "Stereographic" in names and "SphereProjection" not in names:
        k = _curvature(manifold, "k")
        if k < 0:  # the κ-stereographic model at negative curvature is the Poincaré ball of c = −κ
            return S.PoincareBall(c=-k)
    if "Lorentz" in names:
        return S.Lorentz(k=_curvature(manifold, "k"))
    if "SymmetricPositiveDefinite" in names:
        metric = str(getattr(manifold, "default_metric", "AIM"))
        if not metric.endswith("AIM"):
            raise ManifoldError(f"geofunc.contrib.geoopt: expected SymmetricPositiveDefinite with the affine-invariant "
                                f"metric (AIM; geoopt implements only its distance for the others), got {metric}.")
        return S.PSD(metric="affine")
    if "BirkhoffPolytope" in names:
        return S.Birkhoff()
    if "Euclidean" in names:
        return None
    raise ManifoldError(f"geofunc.contrib.geoopt: expected one of geoopt's EuclideanStiefel, CanonicalStiefel, Sphere, "
                        f"PoincareBall, Lorentz, SymmetricPositiveDefinite, BirkhoffPolytope or Euclidean, got "
                        f"{type(manifold).__name__} ({manifold!r}): no geofunc space (docs/guide/migration-geoopt.md).")


# Note [Pairs checked, not unpacked]
# ``for name, p in items`` unpacks whatever has two entries: a tensor of two rows (``parameters()``
# of a model whose first parameter has two rows, or a bare tensor) gave ``name, p`` two row tensors
# without a ``manifold``, and a parameter group ``{"params": ..., "lr": ...}`` (which TorchOptimizer
# takes) its two keys: the result was ``{}`` with no error, and TorchOptimizer then trained every
# parameter freely, off its manifold. A model itself raised a bare TypeError ("not iterable"). The
# items are now checked to be ``(str, Tensor)`` pairs, groups read through their ``"params"`` as
# TorchOptimizer reads them, and a module through its ``named_parameters()``.
def _named(items: Any) -> list[tuple[str, Tensor]]:
    """The ``(name, tensor)`` pairs of ``items`` (pairs, parameter groups or an ``nn.Module``)."""
    where = "geofunc.contrib.geoopt.constraints"
    if isinstance(items, torch.nn.Module):
        return list(items.named_parameters())
    if isinstance(items, (Tensor, Mapping, str)) or not isinstance(items, Iterable):
        raise ManifoldError(f"{where}: expected module.named_parameters() ((name, tensor) pairs), parameter groups "
                            f"or an nn.Module, got {describe(items)}.")
    out: list[tuple[str, Tensor]] = []
    for item in items:
        if isinstance(item, Mapping) and "params" in item:  # a parameter group, as TorchOptimizer takes
            out.extend(_named(item["params"]))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor):
            out.append(item)
        else:
            raise ManifoldError(f"{where}: expected (name, tensor) pairs, as module.named_parameters() gives (or "
                                f"parameter groups, or an nn.Module), got {describe(item)} as an item.")
    return out


# Note [ManifoldParameters sharded by FSDP2]
# torch.distributed.fsdp.fully_shard replaces each parameter of a module by a new plain nn.Parameter
# holding a DTensor, and keeps none of the old one's attributes: a ManifoldParameter's ``manifold`` is
# gone. constraints(model) after fully_shard (FSDP2's order: shard, then make the optimizer) found no
# ManifoldParameter and returned {}; TorchOptimizer then trained every point freely, with Adam: after
# 20 steps of radam(lr=0.5) an embedding on the unit Poincaré ball had points of norm 15, without a
# word. The manifolds cannot be recovered from the sharded parameters (FSDP2 keeps no reference to
# the originals), so where no parameter has a ``manifold`` and some are DTensors the call is refused,
# naming the order that works (the names do not change under fully_shard). A sharded model that
# never had a ManifoldParameter looks the same: its caller passes ``{}`` itself.
def _refuse_sharded(named: list[tuple[str, Tensor]]) -> None:
    from .._dtensor import DTensor

    sharded = [name for name, p in named if isinstance(p, DTensor)]
    if sharded:
        more = ", ..." if len(sharded) > 3 else ""
        raise ManifoldError(
            "geofunc.contrib.geoopt.constraints: expected geoopt ManifoldParameters, got DTensor parameters "
            f"without a manifold ({', '.join(repr(n) for n in sharded[:3])}{more}): "
            "torch.distributed.fsdp.fully_shard replaces every parameter by a plain DTensor Parameter and drops "
            "its geoopt manifold, so they would be trained freely, off their manifolds. Read the constraints "
            "before fully_shard: c = constraints(model); fully_shard(model); "
            "gf.optim.TorchOptimizer(model.named_parameters(), c, ...) (the names stay the same). A model "
            "without ManifoldParameters has no constraints: pass {}.")


def constraints(named_parameters: Any) -> dict[str, S.AbstractSpace]:
    """``{name: space}`` for the ``ManifoldParameter`` s among ``named_parameters`` whose manifold is
    not ``Euclidean`` (:func:`space_of`); plain tensors and Euclidean ones are left out (free).

    ``named_parameters`` is what :class:`geofunc.optim.TorchOptimizer` takes: ``(name, tensor)``
    pairs (``model.named_parameters()``) or parameter groups (dicts with a ``"params"`` entry of
    such pairs); or the ``nn.Module`` itself (its ``named_parameters()``). Anything else (a bare
    tensor, ``model.parameters()``, a dict of names) is a :class:`~geofunc.ManifoldError` (Note
    [Pairs checked, not unpacked]).

    Their values are points already (geoopt's parameters hold them), so the result goes straight to
    :class:`geofunc.optim.TorchOptimizer` with the same ``named_parameters``. Frozen parameters
    (``requires_grad=False``) are named too: ``TorchOptimizer`` leaves them out and ignores their
    constraints (and does not train one unfrozen later: add it with ``add_param_group``). A manifold
    without a geofunc space raises :class:`~geofunc.ManifoldError` naming the parameter.

    Under FSDP2, read them *before* ``fully_shard``, which replaces each parameter by a plain
    ``DTensor`` one and drops its ``manifold``: given DTensor parameters and no ``manifold`` at all
    (after ``fully_shard``), this raises :class:`~geofunc.ManifoldError` rather than return ``{}``
    (Note [ManifoldParameters sharded by FSDP2]).
    """
    out: dict[str, S.AbstractSpace] = {}
    named = _named(named_parameters)
    if not any(hasattr(p, "manifold") for _, p in named):
        _refuse_sharded(named)
    for name, p in named:
        manifold = getattr(p, "manifold", None)
        if manifold is None:
            continue
        try:
            space = space_of(manifold)
        except ManifoldError as e:
            raise ManifoldError(f"parameter {name!r}: {e}") from None
        if space is not None:
            out[name] = space
    return out
