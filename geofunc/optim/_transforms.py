"""Small tangent transforms: weight decay, projection to the tangent space, momentum, Adam, scaling.

Each is a factory returning a :class:`~geofunc.optim.TangentTransform`. Transforms that
need geometry take the ``constraints`` mapping (as in :func:`geofunc.to_manifold`);
unconstrained entries always get the plain Euclidean rule.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Union

import optree
import torch

from .. import _pytree
from .._errors import ManifoldError, describe, real_dtype
from ._base import EmptyState, Move, Params, TangentTransform, Vectors, keep_state

__all__ = [
    "TraceState",
    "ScaleByAdamState",
    "ScaleByAMSGradState",
    "add_decayed_weights",
    "to_tangent",
    "trace",
    "scale_by_adam",
    "scale",
    "ScaleByScheduleState",
    "scale_by_schedule",
    "clip_by_global_norm",
    "masked",
    "multi_transform",
]

Tensor = torch.Tensor
#: A learning rate: a number, a 0-dim tensor, or a schedule ``count -> rate`` (``count`` the 0-dim
#: int64 tensor of updates made before this one: 0 at the first).
ScalarOrSchedule = Union[float, Tensor, Callable[[Tensor], Union[float, Tensor]]]
#: A hyperparameter: a number, or a 0-dim tensor (a learned or meta-learned value under ``torch.func``;
#: read by the checks only where its value is known: Note [Range checks read what is known]).
Scalar = Union[float, Tensor]


def _map(fn: Any, *trees: Any) -> Any:
    return optree.tree_map(fn, *trees, none_is_leaf=False)


# Note [Vectors keep their dtype]
# A hyperparameter may be a tensor (a 0-dim lr, a schedule's rate, the clip's factor, a learned momentum
# or weight decay), and type promotion lets a 0-dim tensor widen a 0-dim vector (no dimensioned operand
# wins): a 0-dim parameter (a scalar gain, a temperature) stepped with a float64 schedule, or in
# bfloat16 with a float32 rate or clip factor, came back in float64/float32, and so did its momentum
# buffer (a state of other dtypes at the next step: a recompile under torch.compile). torch.optim steps
# in place, so a parameter keeps its dtype there. Each transform's output is cast back to its input
# vector's dtype (`_keep`: Tensor.to returns the tensor itself where the dtype is already that one, so
# the usual case costs nothing); the second moment keeps the dtype of its statistic (float32 for
# bfloat16/float16 entries: Note [Adam's statistics in low precision]).
def _keep(v: Tensor, out: Tensor) -> Tensor:
    """``out`` in the dtype of the vector ``v`` it was computed from (Note [Vectors keep their dtype])."""
    return out.to(v.dtype) if isinstance(out, Tensor) and isinstance(v, Tensor) and out.dtype != v.dtype else out


def _zeros(params: Params) -> Any:
    return _map(torch.zeros_like, params)


def _count() -> Tensor:
    # On the CPU, as torch.optim hosts its step (a 0-dim CPU tensor takes part in ops on any device). On the
    # default device, a meta one (`with torch.device("meta")` around init) left radam's update raising
    # "Tensor on device meta is not on the expected device cpu!" and rsgd's state with a meta count.
    return torch.zeros((), dtype=torch.int64, device="cpu")


# Note [Sparse gradients at free entries]
# An unconstrained entry may have a sparse gradient (an nn.Embedding(sparse=True) weight; the spaces take dense
# ones only): rsgd, radam and radamw step it as its dense form (scale_by_adam's first moment keeps the formula
# for it). Two places still failed on one with torch's errors: the L2 term of rsgd and radam, G + λX ("add(sparse,
# dense) is not supported"; the sum is the same with the dense term first, bit for bit: addition commutes), and
# apply_if_finite's test of the gradients (isfinite has no sparse kernel: "Could not run 'aten::ne.Scalar' with
# arguments from the 'SparseCPU' backend"), which reads a sparse tensor's values (coalesced: duplicate indices
# summed, as the step sums them).
def add_decayed_weights(weight_decay: Scalar = 0.0, constraints: Any = None, mask: Any = None) -> TangentTransform:
    """``G + weight_decay · X``: the gradient of the penalty ``(weight_decay / 2) ‖X‖²`` added.

    Without ``constraints`` the term is ambient (L2 regularization of the Euclidean gradient, as
    ``torch.optim``'s ``weight_decay``; place it before :func:`to_tangent`). With ``constraints``
    it is the penalty's Riemannian gradient ``space.egrad_to_rgrad(X, weight_decay · X)`` on
    constrained entries (a tangent vector: zero where ``‖X‖`` is constant, as on ``Stiefel`` or
    ``Sphere``), the ambient term elsewhere: place it after :func:`scale_by_adam` for decoupled
    weight decay (:func:`radamw`).

    ``mask``: which entries decay (:func:`masked`: a pytree of bools with the structure of the
    parameters, or a prefix of it, or a callable ``mask(params)`` returning one); the others pass
    unchanged, as ``torch.optim``'s parameter groups with ``weight_decay=0`` (biases, norms).

    ``weight_decay`` >= 0, as ``torch.optim``'s (a :class:`~geofunc.ManifoldError` for one below 0 or NaN, where
    its value is known: Note [A building block checks its range]).
    """
    check_zero_dim("add_decayed_weights", weight_decay=weight_decay)
    known = _known_value(weight_decay)  # Note [A building block checks its range]
    if known is not None and not known >= 0:
        raise ManifoldError(f"add_decayed_weights: expected `weight_decay` >= 0 (as torch.optim and rsgd, radam, radamw), "
                            f"got {weight_decay!r}.")
    weight_decay = _number(weight_decay)  # Note [Numbers of any type]
    if mask is not None:
        return masked(add_decayed_weights(weight_decay, constraints), mask)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(vectors: Vectors, state: EmptyState, params: Params) -> tuple[Vectors, EmptyState]:
        if _is_number(weight_decay) and weight_decay == 0.0:  # a tensor: no branch (Note [Checking hyperparameters])
            return vectors, state
        if constraints is None:  # (the dense term first: a sparse gradient, Note [Sparse gradients at free entries])
            return _map(lambda g, x: _keep(g, weight_decay * x + g), vectors, params), state
        decay = _pytree.egrad_to_rgrad(constraints, params, _map(lambda x: weight_decay * x, params))
        return _map(lambda g, d: _keep(g, g + d), vectors, decay), state

    return TangentTransform(init, update, keep_state)


def to_tangent(constraints: Any) -> TangentTransform:
    """Euclidean gradients to Riemannian ones: ``space.egrad_to_rgrad(X, G)`` (identity where
    unconstrained; the tangent projection ``space.tangent(X, G)`` for embedded metrics)."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(vectors: Vectors, state: EmptyState, params: Params) -> tuple[Vectors, EmptyState]:
        return _pytree.egrad_to_rgrad(constraints, params, vectors), state

    return TangentTransform(init, update, keep_state)


class TraceState(NamedTuple):
    """``count``: steps taken with momentum (int64 scalar); ``trace``: the momentum buffer, a tangent
    vector (``()``, no buffer, before the first step with momentum: Note [Momentum that may be zero])."""

    count: Tensor
    trace: Any


def _is_number(x: Any) -> bool:
    """A plain Python number (not a bool, not a tensor: a traced tensor has no value to branch on)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _no_buffer(tree: Any) -> bool:
    """Whether a :class:`TraceState`'s ``trace`` is no buffer yet (``()``; ``None`` read as the same)."""
    return tree is None or (isinstance(tree, tuple) and not tree)


def _state_error(where: str, expected: str, state: Any) -> ManifoldError:
    """The error for a state that is not the one a transform's ``init`` gives (Note [Checking a state's type])."""
    return ManifoldError(f"{where}: expected its own state, {expected} (as its init gives), got "
                         f"{type(state).__name__ if state is not None else 'None'}: a state made by another "
                         f"optimizer's init, or an optimizer built with other hyperparameters.")


def _real(x: Any) -> float | None:
    """The value of a real number of any type (NumPy's, a bool) as a float; None for anything else (a
    tensor, a string, None, an int too large for a float): Note [Checking hyperparameters]."""
    if isinstance(x, numbers.Real) and not isinstance(x, torch.Tensor):
        try:
            return float(x)
        except OverflowError:
            return None
    return None


def _numpy_real_0d(x: Any) -> bool:
    """Whether ``x`` (not a tensor) is a NumPy-style 0-dim real array (``ndim`` 0, dtype kind int/uint/float)."""
    return getattr(x, "ndim", None) == 0 and getattr(getattr(x, "dtype", None), "kind", None) in ("i", "u", "f")


# Note [Values known at construction]
# torch.optim.SGD tests ``nesterov and (momentum <= 0 or dampening != 0)`` when it is built, with a tensor
# momentum or dampening too (bool() of a 0-dim tensor: a host read, on an accelerator a device sync):
# SGD(momentum=torch.tensor(0.), nesterov=True) is a ValueError. rsgd read numbers only (Note [Checking
# hyperparameters]), so that momentum, a NumPy 0-dim dampening of 0.5 or a tensor one, were taken with
# nesterov. The rule now reads a tensor too where its value is known and reading it costs nothing: a
# plain real 0-dim tensor on the CPU (no device sync; an accelerator one is not read, as a functional
# optimizer may be built inside a step or a captured CUDA graph), not requiring grad (a learned momentum
# changes: one at 0 is where it starts, with the rule's derivative there, Note [A momentum tensor that may
# be zero]), not a transform's wrapper, a fake or another subclass, and not while Dynamo or make_fx traces
# or a dispatch mode is active (no graph break, no data-dependent read). A NumPy 0-dim real array is read
# as its number. Any other tensor is the caller's, as before.
def _known_value(x: Any, *, learned: bool = False) -> float | None:
    """``x``'s value if it is known when an optimizer is built (Note [Values known at construction]): a
    number's (:func:`_real`), a NumPy 0-dim real array's, or a plain CPU real 0-dim tensor's that does not
    require grad (with ``learned``, one that does too: a range check), read outside any trace or dispatch
    mode; else None."""
    from .._fastpath import dispatch_mode_active, make_fx_tracing  # (at construction only)

    if not isinstance(x, torch.Tensor):
        if _numpy_real_0d(x):
            return _real(x.item()) if hasattr(x, "item") else None
        return _real(x)
    if (torch.compiler.is_compiling() or type(x) not in (Tensor, torch.nn.Parameter) or (x.requires_grad and not learned)
            or x.ndim != 0 or x.device.type != "cpu" or x.dtype == torch.bool or x.is_complex()
            or torch._C._functorch.is_functorch_wrapped_tensor(x) or dispatch_mode_active() or make_fx_tracing()):
        return None
    return float(x.detach().item())


def check_nonnegative(where: str, **values: Any) -> None:
    """Refuse a number below 0 (or NaN) among ``values``, and a value that is neither a number nor a tensor
    (nor, for ``lr``, a schedule) (Note [Checking hyperparameters])."""
    for what, value in values.items():
        if isinstance(value, torch.Tensor) and value.ndim != 0:  # metadata only (logical under vmap)
            # (a (2,) lr was taken here and broadcast into each entry's step: torch's size error at the first
            # update, or a step of another shape; a (1,) one silently made a 0-dim parameter's step (1,))
            kinds = "a number, a 0-dim tensor or a schedule lr(count)" if what == "lr" else "a number or a 0-dim tensor"
            raise ManifoldError(f"{where}: expected `{what}` {kinds}, got {describe(value)}.")
        if isinstance(value, torch.Tensor) and not real_dtype(value):
            # (metadata only, as the shape: a complex lr dropped its imaginary part in the step, silently (0.1j:
            # no step at all), a bool one raised torch's negation error at the first update)
            raise ManifoldError(f"{where}: expected `{what}` a real number or a real 0-dim tensor, got {describe(value)}.")
        if isinstance(value, bool):  # Note [A bool is no hyperparameter]
            raise ManifoldError(f"{where}: expected `{what}` a real number or a real 0-dim tensor, got {value!r} "
                                f"(a bool: {_bool_hint(what, value)}).")
        if isinstance(value, torch.Tensor):
            x = _known_value(value, learned=True)  # Note [Range checks read what is known]
            if x is not None and not x >= 0:
                raise ManifoldError(f"{where}: expected `{what}` >= 0 (as torch.optim), got a tensor holding {x!r}.")
            continue
        if what == "lr" and callable(value):
            continue  # not read
        x = _known_value(value)  # (a NumPy 0-dim array too, as torch.optim takes lr=np.array(0.1): Note [Numbers of any type])
        if x is None:
            kinds = "a number, a 0-dim tensor or a schedule lr(count)" if what == "lr" else "a number or a 0-dim tensor"
            raise ManifoldError(f"{where}: expected `{what}` {kinds}, got {describe(value)}.")
        if not x >= 0:
            raise ManifoldError(f"{where}: expected `{what}` >= 0 (as torch.optim), got {value!r}.")


def check_zero_dim(where: str, **values: Any) -> None:
    """Refuse a value among ``values`` that is not a real number or a real 0-dim tensor (nor a NumPy 0-dim
    real array): a tensor's shape and dtype are static (logical under vmap), so no value is read; a (2,)
    one was taken and broadcast into every entry's vectors along their last dim (Note [Numbers of any type])."""
    for what, value in values.items():
        if not _is_real_scalar(value):
            hint = f" (a bool: {_bool_hint(what, value)})" if isinstance(value, bool) else ""  # Note [A bool is no hyperparameter]
            raise ManifoldError(f"{where}: expected `{what}` a real number or a real 0-dim tensor, got "
                                f"{describe(value)}{hint}.")


# Note [Numbers of any type]
# A hyperparameter that is a real number of another type than int and float passed the checks (they read
# it as its float) and then met a tensor in the update: a Fraction (numbers.Real) raised "unsupported
# operand type(s) for *: 'Fraction' and 'Tensor'" at the first update, for every hyperparameter of every
# factory, while torch.optim.Adam takes lr=Fraction(1, 20) and AdamW its weight_decay. The transforms take
# such a number as its float when they are built (_number; NumPy's scalars and 0-dim arrays too, which
# also chose other branches than the float: no lerp for an np.float32 β₁, a momentum buffer for a 0-dim
# array 0). What is no real number at all (a Decimal, which torch.optim takes and then fails on at its
# first step, a string, None, a complex or bool tensor) is refused at construction where the value is not
# otherwise checked (dampening, the transforms' factors): it passed and raised a bare TypeError from
# inside the update (a complex dampening was taken and its imaginary part dropped with a warning).
# Note [A bool is no hyperparameter]
# Python's bool is an int, so True passed every check as 1 and False as 0: rsgd(c, 0.1, weight_decay=True) decayed
# by 1.0, lr=True stepped by the whole gradient, momentum=True kept every gradient for ever, eps=True, betas=(False,
# ...), trace(True), scale(True) and a schedule returning True were taken as well, silently, while NumPy's bool,
# a bool tensor and a bool max_norm were refused. A bool where a number is expected is a call ported by position
# or a config's flag in the wrong key (the reason the factories' later arguments are keyword-only: Note
# [Keyword-only where torch's order differs]); torch.optim itself has no one answer (SGD and Adam raise "Boolean
# alpha only supported for Boolean results" at the first step for weight_decay=True, AdamW decays by 1.0, lr=True
# is a rate of 1). Every numeric hyperparameter of geofunc.optim refuses a bool at construction (a schedule's
# value at each update), as its other no-numbers; ``nesterov`` and ``amsgrad`` are the bools.
def _bool_hint(what: str, value: bool) -> str:
    """What to do instead of a bool ``value`` given as ``what`` (Note [A bool is no hyperparameter])."""
    if what == "dampening":  # rsgd(c, lr, momentum, True): optax's trace(decay, nesterov) order
        return f"pass a number; optax's trace takes nesterov second: pass nesterov={value!r} by keyword"
    return "pass a number; nesterov and amsgrad are the keyword-only flags"


def _is_real_scalar(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool: Note [A bool is no hyperparameter]), a real 0-dim tensor
    or a NumPy 0-dim real array (metadata only)."""
    if isinstance(value, Tensor):
        return value.ndim == 0 and real_dtype(value)
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Number):
        return isinstance(value, numbers.Real)
    return _numpy_real_0d(value)


def _number(x: Any) -> Any:
    """A real number of another type than int and float (a Fraction, a NumPy scalar or 0-dim array) as its
    float; anything else (an int, a float, a tensor, a schedule) as it is (Note [Numbers of any type])."""
    if isinstance(x, (int, float, Tensor)) or callable(x):
        return x
    value = _known_value(x)
    return x if value is None else value


def check_adam_hyperparameters(where: str, betas: Any, eps: Any) -> None:
    """Refuse betas outside [0, 1) and a negative eps, given as numbers, and betas that are neither numbers
    nor tensors (Note [Checking hyperparameters])."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ManifoldError(f"{where}: expected `betas` a pair (β₁, β₂), got {betas!r}.") from None
    for i, b in enumerate((b1, b2)):
        if isinstance(b, torch.Tensor):
            # (a (2,) β gave each column of a parameter its own β, silently; a bool one, which torch.optim.Adam
            # refuses, raised torch's "Subtraction ... with a bool tensor" at the first update: dtype and shape
            # are metadata, static under vmap and torch.compile)
            if b.ndim != 0 or not real_dtype(b):
                raise ManifoldError(f"{where}: expected `betas` a pair of numbers or real 0-dim tensors, got "
                                    f"β{'₁₂'[i]} {describe(b)}.")
            x = _known_value(b, learned=True)  # Note [Range checks read what is known]
            if x is not None and not 0.0 <= x < 1.0:
                raise ManifoldError(f"{where}: expected `betas` with 0 <= β{'₁₂'[i]} < 1 (β = 1 divides by its bias "
                                    f"correction 1 − βᵗ = 0), got β{'₁₂'[i]} a tensor holding {x!r}.")
            continue
        x = None if isinstance(b, bool) else _real(b)  # Note [A bool is no hyperparameter]
        if x is None:
            raise ManifoldError(f"{where}: expected `betas` a pair of numbers or 0-dim tensors, got betas={betas!r}.")
        if not 0.0 <= x < 1.0:
            raise ManifoldError(f"{where}: expected `betas` with 0 <= β{'₁₂'[i]} < 1 (β = 1 divides by its bias "
                                f"correction 1 − βᵗ = 0), got betas={betas!r}.")
    check_nonnegative(where, eps=eps)


# Note [Checking hyperparameters]
# torch.optim refuses at construction what would give NaN or do something else than asked: β₁ = 1 (the
# bias correction 1 − β₁ᵗ is 0: a NaN point after one step), β₂ = 1 (√v/0: every step silently 0), a
# negative learning rate (ascent), nesterov without momentum (plain SGD, silently). The factories here
# refuse the same with a ManifoldError naming the optimizer, the expected range and the value. Numbers
# are checked, and tensors whose value is known at construction (Note [Range checks read what is
# known]): a hyperparameter may be a schedule (a callable lr) or a tensor (a learned step size, a
# meta-learned β under torch.func.grad or vmap) whose value a traced program cannot branch on (bool() of
# a traced tensor raises); the range of such a one is the caller's. A number of another
# type (NumPy's float32, not a float) is checked as the float it is (np.float32(-0.1) ascended,
# unchecked); anything that is no number, tensor or schedule (a string, None, a list) is refused at
# construction (the first update raised a bare TypeError from inside a transform).


# Note [Range checks read what is known]
# The range checks above read a tensor hyperparameter where its value is known at construction for free
# (_known_value: a plain real 0-dim CPU tensor, outside any trace, vmap, compile or dispatch mode; no
# device sync), as torch.optim reads it: lr=torch.tensor(-0.1) stepped uphill, momentum=torch.tensor(-0.1)
# was taken, betas=(torch.tensor(1.), 0.999) gave a NaN point after one step and a tensor max_norm of -1
# reversed every gradient, all silently, where torch.optim refuses each (TorchOptimizer read them as
# numbers already). A tensor that requires grad is read too (learned=True: a range, not a rule chosen by
# value as nesterov's, Note [Values known at construction]; torch.optim refuses a negative one as well).
# Any other tensor (traced, batched, on an accelerator, a subclass) is the caller's, as before.


# Note [Checking a state's type]
# A state from another optimizer's init (radam's update given rsgd's state, a TorchOptimizer
# checkpoint of another factory) used to fail deep inside a transform with an AttributeError naming a
# field ('TraceState' object has no attribute 'mu'). The stateful transforms check the type of their
# state (an isinstance per transform and step: nothing traced, nothing per entry) and chain checks
# that it has one state per transform, so such a state is a ManifoldError at its first update.


# Note [Momentum that may be zero]
# torch.optim.SGD creates a parameter's momentum buffer at its first step with momentum ≠ 0, as the
# gradient itself (buf = g), and a step with momentum 0 neither creates nor updates it: a scheduler
# that cycles momentum through 0 and back (OneCycleLR with base_momentum=0, or group["momentum"] set
# by hand) resumes the buffer it left. `trace` does the same with a momentum that is the number 0:
# the update returns the vectors unchanged and leaves the state as it is (count included: the count
# is of the steps with momentum, so dampening's "first step" is torch's). Its init makes no buffer
# then (trace is (), a 0-dim count only: an empty tuple, not None, which vmap takes for an output
# leaf), so rsgd(momentum=0), which always chains a trace, carries no buffer it does not need; a
# buffer made by a step with momentum is still carried to the new point at every step (transport),
# so it stays a tangent vector while momentum is 0. With one state structure for every momentum,
# TorchOptimizer can change a group's momentum to or from 0 between steps (the optimizer it rebuilds
# takes the state as it is). rsgd used to chain trace only for a momentum ≠ 0: the state of
# rsgd(momentum=0) then had no TraceState, and a momentum cycled through 0 paired the state with the
# wrong transforms (an AttributeError, or a silently wrong count). What plain SGD pays for it: a 0-dim
# count in its state, no op per step. A state of rsgd(momentum=0) from before (three transforms'
# states) is read as the same with no buffer (upgrade_rsgd_state; TorchOptimizer's checkpoints too).
# Note [A momentum tensor that may be zero]
# torch.optim.SGD compares a momentum tensor with 0 at each step (``momentum != 0``, a bool of the tensor):
# with torch.tensor(0.) it steps by the gradient and keeps no buffer, whatever the dampening. trace cannot
# branch on a tensor (it may be traced: a meta-learned momentum under torch.func.grad or vmap, a compiled
# step), so a tensor momentum always took the buffer's rule: b_t = 0·b_{t-1} + (1 − τ) g_t, every step after
# the first (1 − τ)·g where torch steps by g (rsgd and TorchOptimizer with momentum=torch.tensor(0.) and
# dampening 0.5: half the step, silently). With a tensor momentum the rule is selected by value: where the
# momentum is 0 the vectors pass and the buffer and the count (steps with momentum, dampening's "first")
# stay as they are, as torch's; elsewhere the rule above. (The count follows a momentum on another device
# than the CPU with a copy per step, as torch's bool() of it.) A number 0 is the branch above (no buffer).
# Note [Nesterov needs momentum]
# Nesterov's step g + μ b with μ = 0 is plain SGD, and with a dampening τ ≠ 0 its buffer is not Nesterov's:
# torch.optim.SGD refuses both when it is built ("Nesterov momentum requires a momentum and zero
# dampening"). rsgd refused them; the building block itself,
# trace(0, nesterov=True) (or trace(0.9, 0.5, nesterov=True)), was taken and stepped as plain SGD (or a
# dampened buffer), silently. Both read the values known at construction (Note [Values known at
# construction]): a number, a NumPy 0-dim array, a plain CPU tensor that does not require grad, outside
# a trace; anything else is the caller's (a learned momentum at 0 has the rule's derivative there).
def check_nesterov(where: str, nesterov: bool, momentum: Any, dampening: Any, what: str = "momentum") -> None:
    """Refuse ``nesterov`` with a ``momentum`` (named ``what``) <= 0 or a ``dampening`` != 0 whose value is
    known at construction (Note [Nesterov needs momentum])."""
    m, d = _known_value(momentum), _known_value(dampening)
    if nesterov and ((m is not None and m <= 0) or (d is not None and d != 0)):
        raise ManifoldError(f"{where}: expected `nesterov=True` with `{what}` > 0 and `dampening` = 0 (as torch.optim.SGD), "
                            f"got {what}={momentum!r}, dampening={dampening!r}.")


def _finite(t: Tensor) -> Tensor:
    """``t`` with non-finite entries 0 (multiplied by a momentum of 0, they would make the step NaN)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


# Note [A building block checks its range]
# rsgd refused a negative or NaN momentum (as torch.optim.SGD refuses a negative one), and scale_by_adam and
# clip_by_global_norm, building blocks as trace is, refuse the values outside their ranges; trace itself took
# any decay: trace(-0.5) alternated the buffer's sign (a step of -0.225 for three gradients of 1 where 0.5 gives
# 0.175), and trace(nan) gave a NaN point, silently. Likewise add_decayed_weights took a negative or NaN
# weight_decay that rsgd, radam, radamw and torch.optim refuse (a negative one pushes every point away from 0).
# Both refuse a value below 0 or NaN that is known at construction (Note [Values known at construction]: a
# number, a NumPy 0-dim array, a plain CPU tensor that does not require grad). A learned one (that requires
# grad, or a traced one) is not read: a meta-learned momentum is differentiated at 0, where central differences
# evaluate it on both sides (the rule has its derivative there: Note [A momentum tensor that may be zero]). A
# decay above 1 is taken, as torch.optim.SGD takes it; the dampening's range is not checked, as torch.optim.SGD
# does not check it; scale's factor has either sign (-lr for descent).
def trace(decay: Scalar, dampening: Scalar = 0.0, nesterov: bool = False) -> TangentTransform:
    r"""Momentum, as ``torch.optim.SGD``: :math:`b_t = \mu b_{t-1} + (1 - \tau) g_t` (:math:`b_1 = g_1`).

    Returns :math:`b_t`, or :math:`g_t + \mu b_t` with ``nesterov``. The buffer is a tangent
    vector: the retract-and-transport step carries it to the new point. With ``decay`` the number
    0 the vectors pass unchanged and the state is kept (no buffer is made; one made before is kept
    and carried), as ``torch.optim.SGD`` at a step with momentum 0 (Note [Momentum that may be zero]).

    Args:
      decay: the momentum :math:`\mu` >= 0 (a :class:`~geofunc.ManifoldError` for one below 0 or NaN, where its
        value is known: Note [A building block checks its range]).
      dampening: :math:`\tau`.
      nesterov: Nesterov momentum: needs ``decay`` > 0 and ``dampening`` = 0, as ``torch.optim.SGD``
        (a :class:`~geofunc.ManifoldError` otherwise, where their values are known: Note [Nesterov needs
        momentum]).
    """
    if isinstance(dampening, bool):
        # optax's trace(decay, nesterov) ported as trace(0.9, True) was dampening 1: a buffer that took
        # its first gradient only (b_t = μ b_{t-1} after it), silently. A dampening is a number.
        raise ManifoldError(f"trace: expected `dampening` a number (torch.optim.SGD's τ; optax's trace takes nesterov "
                            f"second: pass nesterov={dampening!r} by keyword), got {dampening!r}.")
    check_zero_dim("trace", decay=decay, dampening=dampening)
    decay, dampening = _number(decay), _number(dampening)  # Note [Numbers of any type]
    # A number of any type as the float it is (Note [Checking hyperparameters]): a NumPy 0 (np.float32(0.0)
    # from a config) made a buffer, so with a dampening τ every step after the first was (1 − τ)·g where
    # torch.optim.SGD, which compares momentum != 0, steps by g.
    off = _real(decay) == 0.0
    check_nesterov("trace", nesterov, decay, dampening, "decay")
    known = _known_value(decay)  # Note [A building block checks its range]
    if known is not None and not known >= 0:
        raise ManifoldError(f"trace: expected `decay` >= 0 (the momentum μ, as torch.optim.SGD and rsgd), got {decay!r}.")


    def init(params: Params) -> TraceState:
        return TraceState(_count(), () if off else _zeros(params))

    def update(vectors: Vectors, state: TraceState, params: Params) -> tuple[Vectors, TraceState]:
        del params
        if not isinstance(state, TraceState):
            raise _state_error("trace", "a TraceState", state)
        if off:
            return vectors, state
        if isinstance(decay, Tensor):  # Note [A momentum tensor that may be zero]
            on = decay != 0
            prev = _map(torch.zeros_like, vectors) if _no_buffer(state.trace) else state.trace
            first = state.count == 0
            new = _map(lambda g, b: _keep(g, torch.where(first, g, decay * b + (1.0 - dampening) * g)), vectors, prev)
            # while the momentum has been 0 from the start (torch keeps no buffer) the buffer holds the rule's
            # value at 0, the gradient, and a momentum that is 0 steps by g + μ·b (= g): its derivative in μ is
            # the rule's (a meta-learned momentum initialised at 0 had none: Note [A momentum tensor that may be zero])
            idle = first & ~on
            buf = _map(lambda g, n, b: torch.where(on, n, torch.where(idle, g, b)), vectors, new, prev)
            out = (_map(lambda g, b: _keep(g, g + decay * b), vectors, buf) if nesterov
                   else _map(lambda g, b, q: torch.where(on, b, _keep(g, g + decay * _finite(q))), vectors, buf, prev))
            return out, TraceState(state.count + on.to(device=state.count.device, dtype=state.count.dtype), buf)
        if _no_buffer(state.trace):  # the first step with momentum: b_1 = g_1, as torch creates its buffer
            buf = _map(torch.clone, vectors)
        elif _is_number(dampening) and dampening == 0.0:  # a tensor: the rule below (Note [Checking hyperparameters])
            # b_0 = 0 makes the first step b_1 = g_1 exactly, as torch does.
            buf = _map(lambda g, b: _keep(g, decay * b + g), vectors, state.trace)
        else:
            first = state.count == 0
            buf = _map(lambda g, b: _keep(g, torch.where(first, g, decay * b + (1.0 - dampening) * g)), vectors,
                       state.trace)
        out = _map(lambda g, b: _keep(g, g + decay * b), vectors, buf) if nesterov else buf
        return out, TraceState(state.count + 1, buf)

    def transport(state: TraceState, move: Move) -> TraceState:
        if _no_buffer(state.trace):
            return state
        return TraceState(state.count, move(state.trace))

    return TangentTransform(init, update, transport)


class ScaleByAdamState(NamedTuple):
    """``count``: steps (int64 scalar); ``mu``: first moment (tangent vectors); ``nu``: second moment
    (float32 for bfloat16/float16 entries: Note [Adam's statistics in low precision])."""

    count: Tensor
    mu: Any
    nu: Any


class ScaleByAMSGradState(NamedTuple):
    """:class:`ScaleByAdamState` with ``nu_max``, the running maximum of ``nu``
    (``scale_by_adam(..., amsgrad=True)``)."""

    count: Tensor
    mu: Any
    nu: Any
    nu_max: Any


_LOW = (torch.float16, torch.bfloat16)


def _wide(t: Any) -> Any:
    """``t`` in float32 if it is a half-precision tensor (Note [Adam's statistics in low precision])."""
    return t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t


def _free_sq(v: Tensor) -> Tensor:
    """The second-moment statistic of an unconstrained entry: ``v²`` elementwise, and for a complex
    entry the squares of its real and imaginary parts (a trailing dim of 2), as ``torch.optim.Adam``
    treats complex parameters (``view_as_real``). At least float32. A lazily conjugated gradient
    (``g.conj()``) is resolved first: ``view_as_real`` refuses one (a RuntimeError for a valid input)."""
    v = _wide(v)
    if v.is_complex():
        r = torch.view_as_real(v.resolve_conj())
        return r * r
    return v * v


# Note [Square roots of statistics]
# Adam's √v and the global norm √Σ‖g‖² are square roots of sums of squares, 0 exactly where every
# gradient they saw was 0 (a frozen or dead unit, a point at a critical point of its loss). There the
# derivative of √ is infinite and autograd multiplies it by a zero cotangent: NaN, and a meta-gradient
# through `update` (a learned step size, MAML with an optimizer in its inner loop) turns NaN without
# an error. The function itself is smooth enough there: with v = c·g² and m = c'·g, m/(√v + ε) has
# derivative c'/ε at g = 0 (the √v term is multiplied by m = 0), which a zero derivative of √ at 0
# gives. `_sqrt0` is √ of x clamped up to the dtype's smallest normal number (one op; clamp's
# derivative is 0 below its bound, and it keeps NaN): its values differ from √'s only below that
# bound, by less than 1.1e-19 in float32 (1.5e-154 in float64), far below any ε that Adam's
# denominator adds (the sum rounds to the same number for ε ≥ 1e-11 in float32). The exact-valued
# variant by `where` (three more ops a leaf) cost 4% of a `radam` step of the README's parameters;
# this one is within the noise of it (A/B in alternating processes: 1.27 ms either way).
def _sqrt0(x: Tensor) -> Tensor:
    """``√x`` with derivative 0 at ``x = 0`` (Note [Square roots of statistics])."""
    return torch.sqrt(x.clamp_min(torch.finfo(x.dtype).tiny))


def _point_sq_norm(space: Any, X: Any, V: Any) -> Any:
    """Squared Riemannian norm ``inner(X, V, V)`` per point, keeping the point's dims as size 1
    (a complex ``Rn`` entry: ``|v|²``); elementwise when unconstrained (:func:`_free_sq`). At least
    float32 (Note [Adam's statistics in low precision])."""
    if space is None:
        return _map(_free_sq, V)
    if isinstance(V, Tensor):
        d = space.point_ndim
        V = _wide(V)
        sq = space.inner(_wide(X), V, V)
        return sq.reshape(sq.shape + (1,) * d)
    factors = getattr(space, "factors", None) or getattr(space, "spaces", None)
    if factors is not None and len(factors) == len(V):  # a Product: one statistic per factor point
        return type(V)(_point_sq_norm(f, x, v) for f, x, v in zip(factors, X, V))
    return _map(_free_sq, V)


# Note [Adam's statistics in low precision]
# For bfloat16/float16 entries the second moment v (a statistic: never transported, never added to a
# point) is kept in float32, and the direction m / (√v̂ + ε) is formed in float32 and rounded once.
# In the entry's own dtype Adam breaks three ways: the bias corrections 1 − β₂ᵗ round to 0 in bfloat16
# (0.999 is 1.0 there), so every step was √v/0 → a zero step, and 0/0 = NaN at a zero gradient (geofunc
# before this note: radam never moved a bf16 parameter, silently); β₂ v rounds back to v in bfloat16
# (0.001 v is below half an ulp), so v stops decaying; and in float16 ε = 1e-8 and squares of gradients
# below ~2e-4 underflow to 0, so a zero or small gradient gave NaN/inf (torch.optim.Adam on float16
# parameters does the same). The first moment m is a tangent vector, transported with the point: it
# stays in the entry's dtype. Float32, float64 and complex entries compute exactly as before.


def scale_by_adam(
    constraints: Any, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, amsgrad: bool = False
) -> TangentTransform:
    r"""Riemannian Adam (Bécigneul & Ganea, 2019) on constrained entries, Adam elsewhere.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) \|g_t\|^2_{\text{point}}, \qquad
        u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}.

    On a constrained entry ``g`` is the Riemannian gradient and the second moment ``v`` is
    one scalar per *point* (the squared Riemannian norm ``space.inner(X, g, g)`` over the point's dims, e.g. a whole Stiefel
    frame, a row under ``Sphere``, a single entry under ``Rn``), so that ``u`` stays a
    tangent vector; each factor of a ``Product`` has its own (a complex ``Rn`` entry: ``|g|²``, so
    the step is equivariant under a phase). On an unconstrained entry the square is elementwise: plain
    Adam, with the operations in ``torch.optim.Adam``'s order (a complex entry's real and imaginary
    parts apart, as ``torch.optim.Adam`` does).
    ``m`` is transported to the new point; ``v`` is a scalar field and is kept. For bfloat16 and
    float16 entries ``v`` is kept, and ``u`` formed, in float32 (in those dtypes ``1 − β₂ᵗ`` rounds to 0
    or ``ε`` to 0); ``u`` is returned in the entry's dtype.

    ``amsgrad=True`` (Reddi, Kale & Kumar): ``v_t`` in ``u_t`` is replaced by its running maximum
    :math:`\max_{s \le t} v_s`, as ``torch.optim.Adam(amsgrad=True)`` and
    ``geoopt.optim.RiemannianAdam(amsgrad=True)`` do; kept in the state's ``nu_max``.

    References:
      Bécigneul & Ganea, *Riemannian Adaptive Optimization Methods*, ICLR 2019.
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """
    check_adam_hyperparameters("scale_by_adam", (b1, b2), eps)
    b1, b2, eps = _number(b1), _number(b2), _number(eps)  # Note [Numbers of any type]
    lerp_b1 = _is_number(b1)

    def init(params: Params) -> ScaleByAdamState | ScaleByAMSGradState:
        nu = _pytree.lift(constraints, _point_sq_norm, params, _zeros(params))
        if amsgrad:
            return ScaleByAMSGradState(_count(), _zeros(params), nu, _map(torch.zeros_like, nu))
        return ScaleByAdamState(_count(), _zeros(params), nu)

    def first_moment(g: Tensor, m: Tensor) -> Tensor:
        # torch.optim.Adam's own op (exp_avg.lerp_(grad, 1 − β₁)), one kernel, not three: its values bit for
        # bit on an unconstrained entry, and ~10% off a step of many small parameters. A tensor β₁ (a
        # meta-learned one), mixed dtypes, a complex entry or a sparse gradient (an unconstrained
        # nn.Embedding(sparse=True) weight: lerp has no sparse kernel) keep the formula.
        if (lerp_b1 and isinstance(g, Tensor) and isinstance(m, Tensor) and g.dtype == m.dtype and g.is_floating_point()
                and g.layout is torch.strided and m.layout is torch.strided):  # (lerp has no sparse kernel)
            return torch.lerp(m, g, 1.0 - b1)
        return _keep(g, b1 * m + (1.0 - b1) * g)

    def update(vectors: Vectors, state: ScaleByAdamState, params: Params) -> tuple[Vectors, ScaleByAdamState]:
        if not isinstance(state, (ScaleByAdamState, ScaleByAMSGradState)):
            raise _state_error("scale_by_adam", "a ScaleByAMSGradState" if amsgrad else "a ScaleByAdamState", state)
        count = state.count + 1
        mu = _map(first_moment, vectors, state.mu)
        sq = _pytree.lift(constraints, _point_sq_norm, params, vectors, stack=True)  # Note [Stacked entries]
        nu = _map(lambda s, v: _keep(s, b2 * v + (1.0 - b2) * s), sq, state.nu)

        corrections: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

        def bias_corrections(v: Tensor) -> tuple[Tensor, Tensor]:
            """``(1 − β₁ᵗ, √(1 − β₂ᵗ))`` in ``v``'s dtype: once per dtype and device, not per entry
            (five scalar ops per parameter, a tenth of a step's ops for a model of small parameters)."""
            key = (v.dtype, v.device)
            out = corrections.get(key)
            if out is None:
                t = count.to(v.dtype)  # v is real, at least float32 (Note [Adam's statistics in low precision])
                out = corrections[key] = (1.0 - torch.pow(b1, t), torch.sqrt(1.0 - torch.pow(b2, t)))
            return out

        def direction(m: Tensor, v: Tensor) -> Tensor:
            bc1, sqrt_bc2 = bias_corrections(v)
            w = _wide(m)
            if v.ndim == w.ndim + 1:  # an unconstrained complex entry: real and imaginary parts apart
                w = torch.view_as_real(w.resolve_conj())
                return torch.view_as_complex((w / (_sqrt0(v) / sqrt_bc2 + eps)) / bc1).to(m.dtype)
            return ((w / (_sqrt0(v) / sqrt_bc2 + eps)) / bc1).to(m.dtype)

        if not amsgrad:
            return _map(direction, mu, nu), ScaleByAdamState(count, mu, nu)
        if not isinstance(state, ScaleByAMSGradState):
            raise ManifoldError(f"scale_by_adam(amsgrad=True) expected a ScaleByAMSGradState (with nu_max), got a "
                             f"{type(state).__name__}: a state made with amsgrad=False")
        nu_max = _map(torch.maximum, state.nu_max, nu)
        return _map(direction, mu, nu_max), ScaleByAMSGradState(count, mu, nu, nu_max)

    def transport(state: ScaleByAdamState | ScaleByAMSGradState, move: Move) -> ScaleByAdamState | ScaleByAMSGradState:
        return state._replace(mu=move(state.mu))

    return TangentTransform(init, update, transport)


def _scale_by(factor: Callable[[], Scalar]) -> TangentTransform:
    """Multiply every vector by ``factor()``, read at each update."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(vectors: Vectors, state: EmptyState, params: Params) -> tuple[Vectors, EmptyState]:
        del params
        step = factor()
        return _map(lambda v: _keep(v, step * v), vectors), state

    return TangentTransform(init, update, keep_state)


def scale(step: Scalar) -> TangentTransform:
    """Multiply every vector by ``step`` (``-lr`` for descent)."""
    check_zero_dim("scale", step=step)
    step = _number(step)  # Note [Numbers of any type]
    return _scale_by(lambda: step)


class ScaleByScheduleState(NamedTuple):
    """The state of :func:`scale_by_schedule`: the number of updates made (a 0-dim int64 tensor)."""

    count: Tensor


# Note [A schedule's value is checked]
# A number or tensor given as lr is checked at construction (check_nonnegative: 0-dim, real, no bool), but a
# schedule's value was used as it came: a (3,) tensor multiplied every vector along its last dim (a rate per
# coordinate, silently; a 0-dim entry then raised "expected `V` with the shape of `X` ()"), a complex one lost
# its imaginary part with only torch's ComplexWarning (0.1j: no step at all), and None or a string raised
# "bad operand type for unary -". The value's type, shape and dtype are checked at each update (metadata:
# static under vmap and torch.compile); its range is not read (Note [Checking hyperparameters]).
def _check_rate(where: str, value: Any) -> Any:
    """``value`` if it is a real number or a real 0-dim tensor (a NumPy 0-dim real array too; one of another
    type than int and float as its float), else ManifoldError."""
    if not _is_real_scalar(value):  # no range (not read); a NumPy bool: no negation
        raise ManifoldError(f"{where}: expected a real number or a real 0-dim tensor, got {describe(value)}.")
    return _number(value)  # (a Fraction as its float: Note [Numbers of any type])


def scale_by_schedule(schedule: Callable[[Tensor], float | Tensor]) -> TangentTransform:
    """Multiply every vector by ``schedule(count)``, ``count`` the 0-dim int64 tensor of updates
    made before this one (0 at the first update, as the ``epoch`` of ``torch.optim.lr_scheduler.LambdaLR``
    and the ``count`` of optax's schedules).

    The schedule is called inside ``update``: under ``vmap`` and ``torch.compile`` (and, for a
    checkpoint that resumes bit for bit, always) write it in torch ops on ``count``
    (``torch.where``, ``torch.cos``, ``torch.clamp``), not Python branching on its value. A
    tensor rate multiplies each vector in the vector's dtype (a 0-dim vector too: Note [Vectors
    keep their dtype]).
    """

    def init(params: Params) -> ScaleByScheduleState:
        del params
        return ScaleByScheduleState(_count())

    def update(vectors: Vectors, state: ScaleByScheduleState, params: Params) -> tuple[Vectors, ScaleByScheduleState]:
        del params
        if not isinstance(state, ScaleByScheduleState):
            raise _state_error("scale_by_schedule", "a ScaleByScheduleState", state)
        step = _check_rate("scale_by_schedule: the value of `schedule(count)`", schedule(state.count))
        return _map(lambda v: _keep(v, step * v), vectors), ScaleByScheduleState(state.count + 1)

    return TangentTransform(init, update, keep_state)


# Note [A tensor learning rate is read at each update]
# A 0-dim tensor lr was negated when the optimizer was built (scale(-lr)), so the step used a copy: an
# in-place change of the tensor (lr.fill_(...) by a hand-written decay, a torch-style scheduler writing
# into a tensor rate so that a compiled update is not traced again) was ignored, silently, while every
# other tensor hyperparameter (momentum, dampening, betas, eps, weight_decay, a clip's max_norm) is read
# at each update, as torch.optim reads a tensor lr (its schedulers fill_ it). The negation is now part
# of the update: the same bits (negation is exact), the same EmptyState, and meta-gradients with
# respect to lr go through it as before.
def scale_by_learning_rate(lr: ScalarOrSchedule, where: str = "scale_by_learning_rate") -> TangentTransform:
    """``scale(-lr)`` for a number or a 0-dim tensor (a tensor read at each update: Note [A tensor
    learning rate is read at each update]); ``scale_by_schedule(-lr(count))`` for a schedule."""
    if callable(lr):
        return scale_by_schedule(lambda count: -_check_rate(f"{where}: the value of the schedule `lr(count)`", lr(count)))
    if not isinstance(lr, Tensor):
        return scale(-lr)
    check_zero_dim("scale_by_learning_rate", lr=lr)
    return _scale_by(lambda: -lr)


def clip_by_global_norm(constraints: Any, max_norm: Scalar) -> TangentTransform:
    r"""Scale all vectors by one factor so that their global norm is at most ``max_norm``.

    .. math::

        \|g\|^2 = \sum_{\text{entries}} \sum_{\text{points}} \langle g, g \rangle_X,
        \qquad g \leftarrow g \cdot \min\!\Big(1, \frac{\text{max\_norm}}{\|g\| + 10^{-6}}\Big)

    with the space's metric ``space.inner(X, g, g)`` on constrained entries (the Riemannian norm:
    place it after :func:`to_tangent`) and the Euclidean norm elsewhere, so on unconstrained entries
    it is ``torch.nn.utils.clip_grad_norm_`` (same factor, same ``1e-6``). One factor for the whole
    pytree keeps the update's direction. Under ``vmap`` over an ensemble each model is clipped by its
    own norm. The norm is formed in at least float32. A non-finite norm gives a factor of 0 (finite
    vectors become 0, non-finite ones NaN), as in torch.

    The norm is over the vectors this transform is given: inside :func:`masked` or
    :func:`multi_transform` the entries of its mask or label only; before the split in the
    :func:`chain`, every entry (the whole model's). In a factory of
    :class:`~geofunc.optim.TorchOptimizer` it is each group's (or part's); pass
    ``TorchOptimizer(..., clip_by_global_norm=max_norm)`` for the whole model's.

    Example::

        >>> c = {"w": gf.Stiefel()}
        >>> opt = gf.optim.retract_and_transport(c, gf.optim.chain(
        ...     gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 1.0),
        ...     gf.optim.scale_by_adam(c), gf.optim.scale(-1e-3)))
    """
    known = _known_value(max_norm, learned=True) if isinstance(max_norm, torch.Tensor) else None
    if known is not None and not known > 0:  # Note [Range checks read what is known]
        raise ManifoldError(f"clip_by_global_norm: expected `max_norm` > 0 (a number or a 0-dim tensor), got a tensor "
                            f"holding {known!r}.")
    if not isinstance(max_norm, torch.Tensor):  # another tensor is not read (Note [Range checks read what is known])
        # A number of any type as the float it is (NaN too): a NumPy float32 or 0-dim array of -1 was taken
        # unchecked and reversed every gradient (the step went uphill), silently; a bool or no number at all
        # was taken too (True clipped at 1; a string raised a bare TypeError at the first update).
        x = _real(max_norm)
        if x is None or isinstance(max_norm, bool) or not x > 0:
            raise ManifoldError(f"clip_by_global_norm: expected `max_norm` > 0 (a number or a 0-dim tensor), "
                                f"got {max_norm!r}.")
    check_zero_dim("clip_by_global_norm", max_norm=max_norm)  # (a (1,) one broadcast a 0-dim vector to (1,))
    max_norm = _number(max_norm)  # Note [Numbers of any type]

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(vectors: Vectors, state: EmptyState, params: Params) -> tuple[Vectors, EmptyState]:
        coef = clip_factor(constraints, params, vectors, max_norm)
        if coef is None:
            return vectors, state
        return _map(lambda v: _keep(v, v * coef), vectors), state

    return TangentTransform(init, update, keep_state)


def clip_factor(constraints: Any, params: Params, vectors: Vectors, max_norm: Any) -> Tensor | None:
    """:func:`clip_by_global_norm`'s one factor ``min(1, max_norm / (‖vectors‖ + 1e-6))`` for tangent
    ``vectors`` at ``params``, the norm over every entry given (``None`` for no entry); also
    ``TorchOptimizer(clip_by_global_norm=...)``'s, over every group (Note [A whole-model step])."""
    leaves = optree.tree_leaves(_pytree.lift(constraints, _point_sq_norm, params, vectors), none_is_leaf=False)
    if not leaves:
        return None
    total = _sqrt0(sum(s.sum() for s in leaves))  # Note [Square roots of statistics]
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


# Note [Masks and labels]
# torch.optim chooses per parameter through parameter groups (no weight decay on biases and norms, a
# smaller rate for a constrained layer); optax through masked and multi_transform, which geofunc.optim
# follows. A mask (labels) is a pytree of Python bools (labels) with the parameters' structure, or a
# prefix of it (one value for a whole subtree), or a callable of the parameters that returns one:
# static values, so the choice is made once per trace (vmap, torch.compile) and never reads a tensor.
# The inner transform sees every entry, with the vectors of the entries it does not own set to zero:
# what couples entries (clip_by_global_norm's norm) then sees only its own (as optax's; a norm over
# every entry is a clip placed before the split in the chain), and a state keeps the
# parameters' structure (its entries of the others are never used), so transport, vmap and checkpoints
# need nothing new. The entries it does not own get the vectors unchanged (masked) or another
# transform's (multi_transform).
def _broadcast(prefix: Any, params: Params, what: str, ok: Callable[[Any], bool], expected: str) -> Any:
    """``prefix`` (or ``prefix(params)``) broadcast to the structure of ``params``, its leaves checked by
    ``ok``. Only ``tree_map`` (no tree specs as values: Dynamo cannot hold them), so it traces."""
    tree = prefix(params) if callable(prefix) else prefix

    def leaf(value: Any, sub: Any) -> Any:
        if not ok(value):
            raise ManifoldError(f"{what}: expected leaves that are {expected}, got {value!r}.")
        return optree.tree_map(lambda _: value, sub, none_is_leaf=False)

    try:
        return optree.tree_map(leaf, tree, params, none_is_leaf=False)
    except ManifoldError:
        raise
    except ValueError:
        raise ManifoldError(f"{what}: expected a tree with the structure of the parameters or a prefix of it, got "
                            f"{optree.tree_structure(tree, none_is_leaf=False)} for parameters "
                            f"{optree.tree_structure(params, none_is_leaf=False)}.") from None


def _own(vectors: Vectors, owned: Any) -> Vectors:
    """``vectors`` with the entries not ``owned`` set to zero."""
    return _map(lambda v, o: v if o else torch.zeros_like(v), vectors, owned)


def masked(inner: TangentTransform, mask: Any) -> TangentTransform:
    """Apply ``inner`` to the entries where ``mask`` is True; the others pass unchanged (optax's ``masked``).

    ``mask``: a pytree of Python bools with the structure of the parameters or a prefix of it
    (``{"encoder": True, "bias": False}``), or a callable ``mask(params)`` returning one. ``inner``
    sees the others' vectors as zero, so what it couples across entries (a global norm) is over the
    masked ones only (for a norm over every entry, place :func:`clip_by_global_norm` before it in
    the :func:`chain`); its state has the parameters' structure (Note [Masks and labels]).

    Example::

        >>> c = {"weight": gf.Stiefel(), "bias": None}
        >>> no_decay_on_biases = lambda p: {k: not k.endswith("bias") for k in p}
        >>> decay = gf.optim.masked(gf.optim.add_decayed_weights(1e-2, c), no_decay_on_biases)
        >>> params = {"weight": gf.Stiefel().sample((4, 3)), "bias": torch.ones(4)}
        >>> vectors, _ = decay.update({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, decay.init(params), params)
        >>> vectors["bias"]
        tensor([0., 0., 0., 0.])
    """

    def update(vectors: Vectors, state: Any, params: Params) -> tuple[Vectors, Any]:
        m = _broadcast(mask, params, "masked: `mask`", lambda v: isinstance(v, bool), "Python bools")
        out, state = inner.update(_own(vectors, m), state, params)
        return _map(lambda o, v, keep: o if keep else v, out, vectors, m), state

    return TangentTransform(inner.init, update, inner.transport)


def multi_transform(transforms: dict[Any, TangentTransform], labels: Any) -> TangentTransform:
    """Each entry moved by the transform of its label (optax's ``multi_transform``; ``torch.optim``'s
    parameter groups).

    ``labels``: a pytree of labels (keys of ``transforms``) with the structure of the parameters or a
    prefix of it, or a callable ``labels(params)`` returning one. Each transform sees the vectors of
    the entries of other labels as zero (a global norm is its own label's: for the norm over every
    entry, place :func:`clip_by_global_norm` before the ``multi_transform`` in the :func:`chain`) and
    keeps its state, a dict by label (Note [Masks and labels]). A label without entries is allowed;
    an entry whose label has no transform raises ``ManifoldError``. :func:`apply_if_finite` wraps
    an optimizer, so around one with a ``multi_transform`` it skips the whole step.

    Example::

        >>> c = {"w": gf.Stiefel(), "b": None}
        >>> opt = gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c), gf.optim.multi_transform(
        ...     {"frame": gf.optim.chain(gf.optim.scale_by_adam(c), gf.optim.scale(-1e-2)),
        ...      "free": gf.optim.chain(gf.optim.trace(0.9), gf.optim.scale(-1e-3))},
        ...     {"w": "frame", "b": "free"})))
    """
    if not isinstance(transforms, dict) or not transforms:
        raise ManifoldError(f"multi_transform: expected a non-empty dict of transforms by label, got {transforms!r}.")
    keys = list(transforms)

    def init(params: Params) -> dict:
        return {k: transforms[k].init(params) for k in keys}

    def update(vectors: Vectors, state: dict, params: Params) -> tuple[Vectors, dict]:
        lab = _broadcast(labels, params, "multi_transform: `labels`", lambda v: v in transforms,
                         f"keys of `transforms` ({', '.join(map(repr, keys))})")
        out, new = vectors, {}
        for k in keys:
            owned = _map(lambda v, k=k: v == k, lab)
            vk, new[k] = transforms[k].update(_own(vectors, owned), state[k], params)
            out = _map(lambda o, v, own: v if own else o, out, vk, owned)
        return out, new

    def transport(state: dict, move: Move) -> dict:
        return {k: transforms[k].transport(state[k], move) for k in keys}

    return TangentTransform(init, update, transport)
