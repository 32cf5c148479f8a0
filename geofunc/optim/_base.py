"""The optimizer protocol: pure ``init``/``update`` pairs, and tangent transforms composed by ``chain``.

An :class:`Optimizer` moves points: ``state = opt.init(params)`` and
``params, state = opt.update(grads, state, params)``. Inside, a named optimizer is a
:func:`chain` of :class:`TangentTransform` s (each maps vectors at the current point to
vectors at the same point and carries its own state) followed by the single
retract-and-transport step of :func:`geofunc.optim.retract_and_transport`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .._errors import ManifoldError

__all__ = ["Optimizer", "TangentTransform", "EmptyState", "chain", "keep_state"]

Params = Any  # a pytree of points (tensors)
Vectors = Any  # a pytree with the structure of Params: gradients, tangent vectors, updates
OptState = Any  # a pytree of tensors (NamedTuples of tensor pytrees)
Move = Callable[[Vectors], Vectors]


class Optimizer(NamedTuple):
    """A Riemannian optimizer as two pure functions.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(grads, state, params) -> (params, state)``, with ``params`` points
        and ``grads`` Euclidean gradients (same structure as ``params``).
    """

    init: Callable[[Params], OptState]
    update: Callable[[Vectors, OptState, Params], tuple[Params, OptState]]


class TangentTransform(NamedTuple):
    """A map of vectors at the current point, with state; the building block of optimizers.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(vectors, state, params) -> (vectors, state)``.
      transport: ``transport(state, move) -> state``: after the point moved, carry every
        tangent vector held in ``state`` to the new point with ``move`` (a pytree map that
        takes vectors at the old point to vectors at the new one). Scalars and other
        statistics that are not tangent vectors are kept.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Vectors, OptState, Params], tuple[Vectors, OptState]]
    transport: Callable[[OptState, Move], OptState]


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


# Note [An optimizer, not a transform]
# A TangentTransform has init and update too, with the same arguments, but its update returns the
# vectors of the step where an Optimizer's returns the new points (optax's GradientTransformation
# returns updates; geofunc's named optimizers are transforms *and* the retraction). A transform where
# an optimizer was expected (a factory for TorchOptimizer returning a chain, optax-style, without
# retract_and_transport; apply_if_finite of a chain) ran without an error and replaced every
# parameter by its step (-lr·m̂/√v̂ for Adam), silently. The places that take an optimizer refuse a
# transform (and anything without init and update) when they get it.
def check_optimizer(where: str, opt: Any) -> None:
    """Refuse a ``TangentTransform`` (or anything without ``init`` and ``update``) where an
    :class:`Optimizer` is expected (Note [An optimizer, not a transform])."""
    if isinstance(opt, TangentTransform):
        raise ManifoldError(f"{where}: expected an Optimizer (its update returns the new points), got a TangentTransform "
                            f"(its update returns the step's vectors): wrap it as "
                            f"gf.optim.retract_and_transport(constraints, transform).")
    if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
        raise ManifoldError(f"{where}: expected an Optimizer (init and update, as gf.optim.radam(constraints, lr) "
                            f"gives), got {type(opt).__name__}.")


def keep_state(state: OptState, move: Move) -> OptState:
    """The ``transport`` of a transform whose state holds no tangent vectors."""
    del move
    return state


def chain(*transforms: TangentTransform) -> TangentTransform:
    """Apply ``transforms`` one after the other; the state is the tuple of their states."""

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(vectors: Vectors, state: tuple[OptState, ...], params: Params) -> tuple[Vectors, tuple[OptState, ...]]:
        if not isinstance(state, (tuple, list)) or hasattr(state, "_fields") or len(state) != len(transforms):
            # Note [Checking a state's type]
            got = (f"a {type(state).__name__} of {len(state)}" if isinstance(state, (tuple, list))
                   else type(state).__name__)
            raise ManifoldError(f"chain: expected its state, a tuple of {len(transforms)} states (one per transform, as "
                                f"its init gives), got {got}: a state made by another optimizer's init.")
        new_state = []
        for t, s in zip(transforms, state):
            vectors, s = t.update(vectors, s, params)
            new_state.append(s)
        return vectors, tuple(new_state)

    def transport(state: tuple[OptState, ...], move: Move) -> tuple[OptState, ...]:
        return tuple(t.transport(s, move) for t, s in zip(transforms, state))

    return TangentTransform(init, update, transport)
