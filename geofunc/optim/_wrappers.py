"""Wrappers of whole optimizers: ``apply_if_finite``."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import optree
import torch

from .._errors import ManifoldError
from ._base import Optimizer, Params, Vectors, check_optimizer

__all__ = ["ApplyIfFiniteState", "apply_if_finite"]

Tensor = torch.Tensor


class ApplyIfFiniteState(NamedTuple):
    """The state of :func:`apply_if_finite`.

    Attributes:
      notfinite_count: consecutive updates skipped (int64 scalar; 0 after an applied one).
      last_finite: whether the last update's gradients and points were finite (bool scalar).
      total_notfinite: updates skipped in all (int64 scalar).
      inner_state: the wrapped optimizer's state.
    """

    notfinite_count: Tensor
    last_finite: Tensor
    total_notfinite: Tensor
    inner_state: Any


def _all_finite(*trees: Any) -> Tensor:
    """One 0-dim bool tensor: every floating entry of ``trees`` is finite (True for no entry)."""
    flags = [torch.isfinite(t.coalesce().values() if t.is_sparse else t).all()  # Note [Sparse gradients at free entries]
             for t in optree.tree_leaves(trees, none_is_leaf=False)
             if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    if not flags:  # on the CPU, as the step counts (not the default device: a meta one under torch.device("meta"))
        return torch.ones((), dtype=torch.bool, device="cpu")
    return torch.stack(flags).all()


# Note [Skipping a non-finite step]
# A NaN or inf gradient (an overflow in float16, a log of 0 in the loss) makes the step's point NaN
# on every space (a retraction of a NaN vector is NaN), and the optimizer state with it: the run is
# lost at that step. torch's GradScaler skips such steps for float16 training; optax's apply_if_finite
# does it for any optimizer. Here the whole step is computed, then kept or dropped by torch.where on
# one flag (the gradients and the new points all finite): no Python branch on a value, so it runs
# under vmap (each model of an ensemble decides for itself) and torch.compile (one graph), and a
# skipped step leaves points and state exactly as they were. After more than max_consecutive_errors
# skips in a row the step is applied anyway, so that a run that cannot recover fails visibly
# instead of stalling.
def _is_count(x: Any) -> bool:
    """An integer >= 0 of any type (a NumPy integer, as gf.nn sizes take them), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


def apply_if_finite(opt: Optimizer, max_consecutive_errors: int) -> Optimizer:
    """Skip the updates whose gradients or resulting points are not finite (optax's ``apply_if_finite``).

    A skipped update leaves the points and ``opt``'s state as they were and counts it
    (:class:`ApplyIfFiniteState`); after more than ``max_consecutive_errors`` skips in a row the
    update is applied anyway (a run that cannot recover then fails visibly). The choice is made with
    ``torch.where`` on tensors, so it runs under ``vmap`` (each model decides for itself) and
    ``torch.compile`` (Note [Skipping a non-finite step]).

    The decision is one for every entry of ``opt`` (a ``multi_transform`` or ``masked`` inside it
    included: a NaN in one label's gradient skips every label's step). In a factory of
    :class:`~geofunc.optim.TorchOptimizer` it is each group's (or part's): pass
    ``TorchOptimizer(..., apply_if_finite=max_consecutive_errors)`` for one decision for the whole model.

    Example::

        >>> constraints = {"w": gf.Sphere()}
        >>> opt = gf.optim.apply_if_finite(gf.optim.radam(constraints, lr=1e-3), max_consecutive_errors=5)
        >>> params = {"w": gf.Sphere().sample((3,))}
        >>> new, state = opt.update({"w": torch.tensor([float("nan"), 0.0, 0.0])}, opt.init(params), params)
        >>> torch.equal(new["w"], params["w"])  # the non-finite step is skipped
        True
    """
    if not _is_count(max_consecutive_errors):
        raise ManifoldError(f"apply_if_finite: expected `max_consecutive_errors` an int >= 0, got {max_consecutive_errors!r}.")
    max_consecutive_errors = int(max_consecutive_errors)  # (a NumPy integer, as gf.nn sizes take them)
    check_optimizer("apply_if_finite", opt)

    def init(params: Params) -> ApplyIfFiniteState:
        leaves = [t for t in optree.tree_leaves(params, none_is_leaf=False) if isinstance(t, Tensor)]
        # The flags live with the points (torch.where); without a tensor on the CPU, as _count() (the
        # default device could be meta: flags there made every count meta through torch.where).
        device = leaves[0].device if leaves else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=device), zero.clone(), opt.init(params))

    def update(grads: Vectors, state: ApplyIfFiniteState, params: Params) -> tuple[Params, ApplyIfFiniteState]:
        new_params, new_inner = opt.update(grads, state.inner_state, params)
        finite = _all_finite(grads, new_params)
        count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        apply = finite | (count > max_consecutive_errors)

        def keep(new: Any, old: Any) -> Any:
            return torch.where(apply, new, old) if isinstance(new, Tensor) else new

        out_params = optree.tree_map(keep, new_params, params, none_is_leaf=False)
        out_inner = optree.tree_map(keep, new_inner, state.inner_state, none_is_leaf=False)
        total = state.total_notfinite + (~finite).to(state.total_notfinite.dtype)
        return out_params, ApplyIfFiniteState(count, finite, total, out_inner)

    return Optimizer(init, update)
