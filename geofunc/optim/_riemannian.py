"""The one retract-and-transport step shared by every optimizer of geofunc.optim."""

from __future__ import annotations

from typing import Any

from .. import _pytree
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
        vectors, state = transform.update(grads, state, params)
        new_params = _pytree.retract(constraints, params, vectors)
        state = transform.transport(state, lambda v: _pytree.transport(constraints, params, new_params, v))
        return new_params, state

    return Optimizer(init, update)
