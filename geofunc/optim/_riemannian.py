"""The one retract-and-transport step shared by every optimizer of geofunc.optim."""

from __future__ import annotations

from typing import Any

import optree
import torch

from .. import _pytree
from .._errors import ManifoldError
from ._base import Optimizer, OptState, Params, TangentTransform, Vectors

__all__ = ["retract_and_transport"]


def retract_and_transport(constraints: Any, transform: TangentTransform) -> Optimizer:
    r"""An optimizer from a tangent transform: move along its output, then carry its state along.

    One step from the point :math:`X` with Euclidean gradient :math:`G`:

    .. math::

        (U, s') = \text{transform.update}(G, s, X), \qquad
        X^+ = R_X(U), \qquad
        s^+ = \text{transform.transport}(s', P_{X^+})

    with :math:`R` = ``space.retract`` on constrained entries (``X + U`` elsewhere) and the
    vector transport :math:`P_{X^+}` = ``space.transport(X, X⁺, ·)`` (for embedded metrics the
    orthogonal projection onto the new tangent space; identity on unconstrained entries). The transform is
    responsible for making ``G`` tangent first (:func:`~geofunc.optim.to_tangent`).
    """

    def init(params: Params) -> OptState:
        return transform.init(params)

    def update(grads: Vectors, state: OptState, params: Params) -> tuple[Params, OptState]:
        if torch.compiler.is_compiling():
            return step(grads, state, params)
        with _pytree.one_plan():  # the four maps over `params` plan it once (Note [One plan per step])
            return step(grads, state, params)

    def step(grads: Vectors, state: OptState, params: Params) -> tuple[Params, OptState]:
        try:
            vectors, state = transform.update(grads, state, params)
            new_params = _pytree.retract(constraints, params, vectors)
        except (ValueError, TypeError):  # optree's structure mismatch (or an op on None) names no parameter: say which
            _check_grads(grads, params)
            raise
        state = transform.transport(state, lambda v: _pytree.transport(constraints, params, new_params, v))
        return new_params, state

    return Optimizer(init, update)


def _check_grads(grads: Vectors, params: Params) -> None:
    """Raise a ``ManifoldError`` naming the parameters whose gradient is missing (``None``, e.g. a
    frozen parameter) or that ``grads`` has and ``params`` lacks; return if the structures agree."""
    want = {_pytree._join(p) for p in optree.tree_paths(params, none_is_leaf=False)}
    paths, leaves, _ = optree.tree_flatten_with_path(grads, none_is_leaf=True)
    got = {_pytree._join(p) for p, g in zip(paths, leaves) if g is not None}
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no gradient (None or absent) for {', '.join(map(repr, missing))}: torch.optim skips such a "
                         "parameter; here pass torch.zeros_like(it), or leave it out of params and of the optimizer state")
        if extra:
            parts.append(f"gradients for {', '.join(map(repr, extra))}, which params does not have")
        raise ManifoldError("`grads` must have the structure of `params`: " + "; ".join(parts) + ".")
