"""Named optimizers: short compositions of the transforms of ``_transforms.py``."""

from __future__ import annotations

from typing import Any

from ._base import Optimizer, chain
from ._riemannian import retract_and_transport
from ._transforms import (
    Scalar,
    ScalarOrSchedule,
    TraceState,
    _count,
    add_decayed_weights,
    check_adam_hyperparameters,
    check_nesterov,
    check_nonnegative,
    check_zero_dim,
    scale_by_adam,
    scale_by_learning_rate,
    to_tangent,
    trace,
)

__all__ = ["rsgd", "radam", "radamw"]

# Note [Keyword-only where torch's order differs]
# The arguments up to the first one whose position differs from torch.optim's (and geoopt's, which
# follow torch's) are positional; the rest are keyword-only. torch.optim.SGD(params, lr, momentum,
# dampening, weight_decay, nesterov) and Adam/AdamW(params, lr, betas, eps, weight_decay, amsgrad)
# put weight_decay and amsgrad where rsgd had nesterov and radam/radamw had mask, so a call ported
# by position, rsgd(c, 0.1, 0.9, 0, 1e-4, True) as SGD(p, 0.1, 0.9, 0, 1e-4, True), ran silently with
# nesterov=1e-4 and weight_decay=True (= 1.0): 1.5 away from SGD's point after five steps. Such a
# call is now a TypeError (too many positional arguments); the rules themselves are unchanged.


def rsgd(
    constraints: Any,
    lr: ScalarOrSchedule,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    *,  # Note [Keyword-only where torch's order differs]
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
    mask: Any = None,
) -> Optimizer:
    r"""Riemannian SGD with momentum; ``torch.optim.SGD`` on unconstrained entries, step for step.

    With :math:`\eta` = ``lr``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``,
    :math:`\lambda` = ``weight_decay``, :math:`P_X` = ``space.egrad_to_rgrad(X, ·)`` (the
    tangent projection for embedded metrics), :math:`T_{X_{t+1}}` =
    ``space.transport(X_t, X_{t+1}, ·)`` and :math:`R_X` = ``space.retract(X, ·)``:

    .. math::

        g_t = P_{X_t}(G_t + \lambda X_t), \quad
        b_t = \mu\, b_{t-1} + (1 - \tau) g_t \ (b_1 = g_1), \quad
        X_{t+1} = R_{X_t}(-\eta\, d_t), \quad b_t \leftarrow T_{X_{t+1}}(b_t)

    with :math:`d_t = b_t` (:math:`g_t + \mu b_t` if ``nesterov``; :math:`g_t` if
    :math:`\mu = 0`). On unconstrained entries :math:`P` is the identity and :math:`R_X(V) = X + V`.

    ``lr`` is a number, a 0-dim tensor (read at each update, as every tensor hyperparameter: a change
    in place takes effect at the next one, as ``torch.optim`` reads a tensor ``lr``), or a schedule
    ``lr(count)`` of the 0-dim int64 tensor of updates made before this one (0 at the first): then step :math:`t` uses :math:`\eta_t` =
    ``lr(t)``, as ``torch.optim.SGD(lr=base)`` stepped with ``LambdaLR(opt, f)`` uses
    ``base * f(t)`` (:func:`~geofunc.optim.scale_by_schedule`; the count is in the state).

    ``mask``: the entries that ``weight_decay`` applies to (a pytree of bools with the structure of
    the parameters or a prefix of it, or a callable of the parameters; default all), as a parameter
    group with ``weight_decay=0`` for the others (:func:`~geofunc.optim.masked`).

    The state always holds a :class:`~geofunc.optim.TraceState`; its buffer is made at the first
    step with momentum ≠ 0 (none for ``momentum=0``), and a step with momentum 0 keeps it, as
    ``torch.optim.SGD`` (Note [Momentum that may be zero]). Plain numbers are checked as
    ``torch.optim.SGD`` checks them (``lr``, ``momentum``, ``weight_decay`` >= 0, which also reads a
    0-dim CPU tensor, outside a trace; ``nesterov`` needs ``momentum`` > 0 and ``dampening`` = 0, which
    also reads one that does not require grad): a :class:`~geofunc.ManifoldError` otherwise.

    Example::

        >>> opt = gf.optim.rsgd({"w": gf.Sphere()}, lr=0.1, momentum=0.9)
        >>> params = {"w": gf.Sphere().sample((3,))}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.randn(3)}, state, params)
        >>> bool(gf.Sphere().contains(params["w"]))
        True
    """
    check_nonnegative("rsgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    check_zero_dim("rsgd", dampening=dampening)  # (a number's range is torch.optim.SGD's: not checked)
    # NumPy's numbers too (torch.optim.SGD refuses np.float32(0.0)), and tensors whose value is known now
    check_nesterov("rsgd", nesterov, momentum, dampening)  # (Note [Values known at construction])
    # trace(0) holds no buffer and passes the vectors unchanged (Note [Momentum that may be zero])
    opt = retract_and_transport(constraints, chain(add_decayed_weights(weight_decay, mask=mask), to_tangent(constraints),
                                                   trace(momentum, dampening, nesterov), scale_by_learning_rate(lr, "rsgd")))

    def update(grads: Any, state: Any, params: Any) -> Any:
        return opt.update(grads, upgrade_rsgd_state(state), params)

    return Optimizer(opt.init, update)


def upgrade_rsgd_state(state: Any) -> Any:
    """A state of ``rsgd(momentum=0)`` from before it always chained a trace (three transforms' states)
    as the current one (no momentum buffer); any other state as it is."""
    if isinstance(state, tuple) and len(state) == 3 and not isinstance(state[2], TraceState):
        return (state[0], state[1], TraceState(_count(), ()), state[2])
    return state


def radam(
    constraints: Any,
    lr: ScalarOrSchedule,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    *,  # Note [Keyword-only where torch's order differs]
    mask: Any = None,
    amsgrad: bool = False,
) -> Optimizer:
    r"""Riemannian Adam (Bécigneul & Ganea, 2019); ``torch.optim.Adam`` on unconstrained entries.

    :math:`g_t = P_{X_t}(G_t + \lambda X_t)`, then the moments of
    :func:`~geofunc.optim.scale_by_adam` (second moment: one squared norm per point on
    constrained entries, elementwise elsewhere), :math:`X_{t+1} = R_{X_t}(-\eta\, u_t)` and
    the first moment is carried to :math:`X_{t+1}` by ``space.transport`` (:math:`P` =
    ``space.egrad_to_rgrad``; the projections for embedded metrics).
    ``lr`` is a number, a 0-dim tensor, or a schedule of the update count, and ``mask`` selects the
    entries that ``weight_decay`` applies to, as in :func:`rsgd`. ``amsgrad=True``: the running
    maximum of the second moment in the denominator, as ``torch.optim.Adam(amsgrad=True)`` and
    ``geoopt.optim.RiemannianAdam(amsgrad=True)``. Numbers, and 0-dim CPU tensors outside a trace, are
    checked as ``torch.optim.Adam`` checks them (``lr``, ``eps``, ``weight_decay`` >= 0, ``0 <= β < 1``): a
    :class:`~geofunc.ManifoldError` otherwise.

    References:
      Bécigneul & Ganea, *Riemannian Adaptive Optimization Methods*, ICLR 2019.
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    """
    check_nonnegative("radam", lr=lr, weight_decay=weight_decay)
    check_adam_hyperparameters("radam", betas, eps)
    b1, b2 = betas
    return retract_and_transport(
        constraints,
        chain(add_decayed_weights(weight_decay, mask=mask), to_tangent(constraints), scale_by_adam(constraints, b1, b2, eps, amsgrad),
              scale_by_learning_rate(lr, "radam")),
    )


def radamw(
    constraints: Any,
    lr: ScalarOrSchedule,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.01,
    *,  # Note [Keyword-only where torch's order differs]
    mask: Any = None,
    amsgrad: bool = False,
) -> Optimizer:
    r"""Riemannian Adam with decoupled weight decay; ``torch.optim.AdamW`` on unconstrained entries.

    :math:`X_{t+1} = R_{X_t}\big(-\eta\,(u_t + \lambda\, \operatorname{grad} \tfrac12\|X_t\|^2)\big)`
    with :math:`u_t` the direction of :func:`radam` (without its L2 term) and
    :math:`\operatorname{grad}\tfrac12\|X\|^2` = ``space.egrad_to_rgrad(X, X)`` the Riemannian
    gradient of the squared norm (:func:`~geofunc.optim.add_decayed_weights` with ``constraints``):
    :math:`X` itself on unconstrained entries, so there the step is AdamW's
    :math:`X (1 - \eta\lambda) - \eta u_t` (Loshchilov & Hutter); zero where the norm is constant
    on the space (``Stiefel``, ``SO``, ``Sphere``); a shrinking tangent step elsewhere (``PSD``,
    ``LowRank``, ``GLp``). ``weight_decay`` defaults to AdamW's 0.01. ``lr`` as in :func:`rsgd`.
    ``mask``: the entries that decay (default all; e.g. ``lambda p: {k: not k.endswith("bias") for k in p}``
    for no decay on biases, as AdamW with two parameter groups), as in :func:`rsgd`. ``amsgrad`` as
    in :func:`radam`. Hyperparameters are checked as in :func:`radam`.

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    check_nonnegative("radamw", lr=lr, weight_decay=weight_decay)
    check_adam_hyperparameters("radamw", betas, eps)
    b1, b2 = betas
    return retract_and_transport(
        constraints,
        chain(to_tangent(constraints), scale_by_adam(constraints, b1, b2, eps, amsgrad),
              add_decayed_weights(weight_decay, constraints, mask), scale_by_learning_rate(lr, "radamw")),
    )
