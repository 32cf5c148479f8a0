"""``TorchOptimizer``: a functional optimizer of ``geofunc.optim`` behind ``torch.optim.Optimizer``'s
interface, for ``nn.Module`` code (geoopt's ``ManifoldParameter`` + ``RiemannianAdam``)."""

from __future__ import annotations

import inspect
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional

import optree
import torch
from .. import _pytree
from .._errors import ManifoldError, describe, real_dtype
from ..spaces._base import is_space
from ._aliases import radamw, rsgd, upgrade_rsgd_state
from ._base import EmptyState, Optimizer, check_optimizer
from ._transforms import ScaleByScheduleState, TraceState, _keep, _known_value, _no_buffer, _number, _real, clip_factor
from ._wrappers import _all_finite, _is_count

__all__ = ["TorchOptimizer"]


# Note [A functional optimizer behind torch.optim]
# The module's parameters hold the points themselves (as geoopt's ManifoldParameter does), keyed by
# their names; `constraints` names the constrained ones. A parameter group is a functional optimizer
# built from the group's hyperparameters, read again at every step: torch.optim.lr_scheduler drives
# the learning rate (a schedule reading group["lr"]) and anything else a scheduler cycles or a user
# sets (OneCycleLR's betas or momentum, group["weight_decay"] = ... mid-run rebuild it). As in
# torch.optim, the groups and `defaults` hold every hyperparameter: the factory's keyword parameters
# with their defaults (read from its signature; the constructor's keyword arguments override them,
# and a group's own entries override those), so OneCycleLR finds radam's betas and rsgd's momentum
# (cycle_momentum; it raised "optimizer must support momentum or beta1" when the groups held only
# lr) and a key set in a group later is read (one missing at construction used to be ignored). A
# group key the factory does not take (a "name", a scheduler's "initial_lr") stays in the group and is
# not passed; for a factory with **kwargs, the keys given at construction are passed. Each group's
# hyperparameters are checked at construction by building its optimizer with them (Note [Checking
# hyperparameters]), as torch.optim checks its own. A hyperparameter change may change the state's
# structure only where the factory allows it on the state it has: rsgd's momentum to and from 0
# (Note [Momentum that may be zero]); load_state_dict compares a checkpoint's states with what the
# optimizer's init gives and names a mismatch (another factory's checkpoint).
# Constraints may name parameters that are frozen (requires_grad=False: left out, as their
# constraints are; geofunc.contrib.geoopt.constraints(model.named_parameters()) names every
# ManifoldParameter). A parameter frozen at construction is not in the optimizer: unfreezing it
# later does not train it (add it with add_param_group, as torch.optim's fine-tuning recipes do).
# Parameters without a gradient are skipped as torch.optim skips them: not moved, their state
# untouched, and each parameter's count (Adam's bias corrections, momentum's first step) is the
# number of steps it took. One functional state serves a *cohort*: parameters of a group whose steps
# were taken together so far (one cohort per group at first). A step where only some of a cohort
# have gradients splits it in two, each with its part of the state (the per-parameter entries of the
# state's pytrees, and the shared count: Note [Which entries of a state are a parameter's]); a cohort
# none of whose parameters have gradients is not stepped; a cohort that has never stepped starts
# from `init` (as torch.optim's state, created at a parameter's first gradient). So the common
# case, every parameter with a gradient at every step, is one functional update per group, and a
# transform that couples parameters (a global-norm clip in the factory) couples those stepped
# together (TorchOptimizer's own clip_by_global_norm and apply_if_finite couple the whole model:
# Note [A whole-model step]).
# The state_dict is torch.optim's (Note [TorchOptimizer's state_dict]). step is never compiled
# (torch.compiler.disable: a compiled caller runs it eagerly).
# Dynamo traces a torch.optim.Optimizer's attributes as its own optimizer object and dropped the
# assignment of the new state: torch.compile(opt.step) re-initialized the state at every step
# (Adam's moments and count restarted: 1e-4 off eager after three float64 steps, silently). For a
# compiled step, compile the functional optimizer's update (its state is an explicit argument).
class _Cohort:
    """Parameters of one group stepped together so far, their functional state (None before their
    first step) and its layout (Note [Which entries of a state are a parameter's])."""

    __slots__ = ("group", "names", "state", "layout")

    def __init__(self, group: int, names: tuple[str, ...], state: Any, layout: Optional[frozenset] = None) -> None:
        self.group, self.names, self.state, self.layout = group, names, state, layout


# Note [Which entries of a state are a parameter's]
# A cohort's functional state holds per-parameter pytrees (Adam's moments, a momentum buffer: dicts
# by parameter name, made by mapping over the parameters) beside entries shared by the cohort (a
# count) and containers of the transforms (chain's tuples, multi_transform's dict by label). Splitting
# a cohort, the state_dict's entries of each parameter and load_state_dict need to know which dicts
# are the per-parameter ones. They were recognised by their keys (exactly the cohort's names), so a
# multi_transform whose labels are the parameters' names (one transform per parameter, built from the
# constraints a factory is given) had its dict by label taken for one by parameter: a step where one
# parameter had no gradient cut the labels and left the moments inside whole, and the next update
# failed with optree's "dictionary key mismatch". Now nothing is read from the keys:
# - the layout (the paths of the per-parameter dicts) is recorded from init itself, run once more
#   (Note [Probing on meta or on the points]) with one more free parameter under a name no parameter
#   has (_PROBE): the dicts made by mapping over the parameters hold it, a dict by label does not. A
#   factory whose init takes that parameter neither on meta nor on the points has no layout, and its
#   dicts keyed by exactly the names are taken as the per-parameter ones, as before. A TraceState's buffer has the parameters' structure by construction (it is made from the
#   vectors at the first step with momentum, Note [Momentum that may be zero]), layout or not. A dict
#   that a transform keys by the constraints' names (not made by mapping over the parameters) is a
#   container, as a dict by label: its leaves are the cohort's, copied into each parameter's entries,
#   which is larger but loads and splits all the same.
# - a split gives each part the structure of its own optimizer's init (its factory given the part's
#   constraints: a dict by label built from them has the part's labels only) with the leaves at the
#   same paths in the cohort's state (_fill): no guess of which dict to cut, and a part's state is
#   what its optimizer's init gives, so it saves and loads as any. A state that does not fit that
#   structure (a leaf shaped by all the cohort's parameters) is refused with a ManifoldError.
_PROBE = "\x00probe"  # a name that no parameter has (a module's parameter names hold no NUL)


def _is_own(t: Any, path: tuple[str, ...], names: tuple[str, ...], layout: Optional[frozenset]) -> bool:
    """Whether ``t``, at ``path`` of a cohort's state, is a per-parameter dict (Note [Which entries of a
    state are a parameter's])."""
    if not isinstance(t, Mapping) or not t:
        return False
    if layout is None:
        return set(t) == set(names)
    return path in layout


def _strip(tree: Any, path: tuple[str, ...], layout: set) -> Any:
    """``tree`` without the probe's entries, the paths of the dicts that held one added to ``layout``."""
    if isinstance(tree, Mapping):
        if _PROBE in tree:
            layout.add(path)
            return {k: v for k, v in tree.items() if k != _PROBE}
        return {k: _strip(v, (*path, str(k)), layout) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_strip(v, (*path, f), layout) for f, v in zip(tree._fields, tree)))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_strip(v, (*path, str(i)), layout) for i, v in enumerate(tree))
    return tree


# Note [Probing on meta or on the points]
# The probe's init is run on the meta device where the points are large (no memory: a split of a
# stepped cohort otherwise held a second state beside the first, twice Adam's moments of a large
# model) and on the points themselves where they are small (at most _PROBE_ON_POINTS bytes), since
# an op on meta tensors costs ~0.1-0.4 ms in torch's Python reference kernels: radam's init of 200
# 16×16 parameters took 140 ms on meta and 5 ms on the CPU, once per new cohort and per split.
_PROBE_ON_POINTS = 1 << 26


def _probe(opt: Optimizer, points: Mapping[str, torch.Tensor]) -> tuple[Any, Optional[frozenset]]:
    """``(structure, layout)``: ``opt.init``'s state at ``points`` (on the meta device where they are
    large, Note [Probing on meta or on the points]) and the paths of its per-parameter dicts (``None``
    where init does not take the probe: Note [Which entries of a state are a parameter's])."""
    ref = next(iter(points.values()))
    small = sum(p.numel() * p.element_size() for p in points.values()) <= _PROBE_ON_POINTS
    for device in (None, "meta") if small else ("meta", None):
        pts = {n: p.detach().to(device="meta") if device else p for n, p in points.items()}
        try:
            layout: set = set()
            state = _strip(opt.init({**pts, _PROBE: torch.zeros(1, dtype=ref.dtype, device=device or ref.device)}),
                           (), layout)
            return state, frozenset(layout)
        except Exception:  # noqa: BLE001  (an init that refuses the probe, or does not run on meta: try the next)
            continue
    return opt.init(points), None


def _init(opt: Optimizer, points: Mapping[str, torch.Tensor]) -> tuple[Any, Optional[frozenset]]:
    """``(opt.init(points), layout)``: the state and the paths of its per-parameter dicts (:func:`_probe`)."""
    return opt.init(points), _probe(opt, points)[1]


class _Unfit(Exception):
    """A cohort's state does not fit the structure of a part's init (``_fill``)."""


def _fill(fresh: Any, old: Any, names: tuple[str, ...]) -> Any:
    """The leaves of a cohort's state ``old`` on the structure of ``fresh``, the init of a part
    ``names`` of the cohort (Note [Which entries of a state are a parameter's]); raises ``_Unfit``
    saying where they differ."""
    if isinstance(fresh, TraceState) and isinstance(old, TraceState):  # Note [Momentum that may be zero]
        if _no_buffer(old.trace):
            trace: Any = ()
        elif _no_buffer(fresh.trace):  # momentum 0 now: the buffer is kept (the parameters' structure)
            trace = {n: old.trace[n] for n in names}
        else:
            trace = _fill(fresh.trace, old.trace, names)
        return TraceState(_fill(fresh.count, old.count, names), trace)
    if isinstance(fresh, Mapping):
        if not isinstance(old, Mapping) or not set(fresh) <= set(old):
            got = f"entries {sorted(map(str, old))}" if isinstance(old, Mapping) else describe(old)
            raise _Unfit(f"{got} where that init gives entries {sorted(map(str, fresh))}")
        return {k: _fill(v, old[k], names) for k, v in fresh.items()}
    if isinstance(fresh, tuple) and hasattr(fresh, "_fields"):
        if type(old) is not type(fresh):
            raise _Unfit(f"a {type(old).__name__} where that init gives a {type(fresh).__name__}")
        return type(fresh)(*(_fill(a, b, names) for a, b in zip(fresh, old)))
    if isinstance(fresh, (tuple, list)):
        if not isinstance(old, (tuple, list)) or len(old) != len(fresh):
            raise _Unfit(f"{describe(old)} where that init gives a {type(fresh).__name__} of {len(fresh)} entries")
        return type(fresh)(_fill(a, b, names) for a, b in zip(fresh, old))
    if isinstance(fresh, torch.Tensor):
        if not isinstance(old, torch.Tensor) or old.shape != fresh.shape:
            raise _Unfit(f"{describe(old)} where that init gives shape {tuple(fresh.shape)}")
        return old
    return old if isinstance(fresh, (int, float)) else fresh


# Note [TorchOptimizer's state_dict]
# The state_dict is torch.optim's: {"state": {index: {key: tensor}}, "param_groups": [{...,
# "params": [indices], "param_names": [names]}]}, the indices numbering the parameters of the groups
# in order. A parameter's entries are the leaves of its cohort's functional state keyed by their
# path in it ("2.mu", "2.nu", "3.count": the position in the chain's tuple, then the field): its own
# entries of the per-parameter dicts, and a copy of each shared leaf (the count, as torch.optim keeps
# a "step" per parameter), plus "cohort", a 0-dim integer tensor equal for the parameters stepped
# together (a tensor: dcp.load writes a value that is not one under the key str(index)). Nothing
# else: torch.distributed.checkpoint shards only the tensors it finds in nested dicts and lists (a
# NamedTuple was pickled whole, so every rank loaded rank 0's local shards of the moments), and its
# get_state_dict keeps only "state" (re-keyed by the parameters' fully qualified names) and
# "param_groups". load_state_dict rebuilds each cohort's state on the structure of the optimizer's
# init (its NamedTuples, from the loaded hyperparameters), taking each leaf from the entries (a shared
# one from the cohort's first parameter), so a checkpoint of another factory is refused by its keys,
# and a momentum buffer present on one side only fits (Note [Momentum that may be zero]); the
# parameters of a group without entries (never stepped) form its cohort that starts from init. It maps
# the saved indices (or names) to parameters by their positions in the groups, as torch.optim does.
# `state` is a view {parameter: entries} built on each read (never by step), which torch's
# get_state_dict reads: an empty one (before the first step) makes it step once with zero gradients
# and lr 0 to create the entries that dcp.load fills in place (as for a torch.optim optimizer: Adam's
# count is then 1, and a constrained point is retracted by a zero step, which moves it by rounding).
# The shared leaves are copies, and a tensor that appears twice is copied, so that an in-place load
# writes each once. step never builds entries: the conversion is in state_dict and load_state_dict.
# The earlier formats (a list of "cohorts" holding NamedTuple states, and the first, one
# "functional_state") still load.
_COHORT = "cohort"
# What a copy or a pickle of a TorchOptimizer leaves out (Note [A copy's step is its own])
_NOT_COPIED = frozenset({"_built", "step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                         "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                         "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"})
_COUNTERS = ("notfinite_count", "last_finite", "total_notfinite")  # Note [A whole-model step]


def _leaves(tree: Any, path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], Any]]:
    """The ``(path, leaf)`` pairs of ``tree``: its tensors and numbers, under the names of the
    NamedTuples' fields, the tuples' positions and the dicts' keys (``()`` and ``None``, no buffer,
    hold none: the structure is init's)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for f, v in zip(tree._fields, tree):
            yield from _leaves(v, (*path, f))
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*path, str(i)))
    elif isinstance(tree, (torch.Tensor, int, float)):
        yield path, tree


def _key(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "state"


def _entries(tree: Any, names: tuple[str, ...], layout: Optional[frozenset]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(own, shared)``: each parameter's leaves of a cohort's functional state (its entries of the
    per-parameter dicts, Note [Which entries of a state are a parameter's]) and the leaves shared by
    the cohort (a count), keyed by path (Note [TorchOptimizer's state_dict])."""
    own: dict[str, dict[str, Any]] = {n: {} for n in names}
    shared: dict[str, Any] = {}

    def walk(t: Any, path: tuple[str, ...], buffer: bool = False) -> None:
        if _is_own(t, path, names, layout) or (buffer and isinstance(t, Mapping) and t):
            for n in names:
                own[n].update((_key(p), leaf) for p, leaf in _leaves(t[n], path))
        elif isinstance(t, Mapping):
            for k, v in t.items():
                walk(v, (*path, str(k)))
        elif isinstance(t, tuple) and hasattr(t, "_fields"):
            for f, v in zip(t._fields, t):
                walk(v, (*path, f), isinstance(t, TraceState) and f == "trace")
        elif isinstance(t, (tuple, list)):
            for i, v in enumerate(t):
                walk(v, (*path, str(i)))
        elif isinstance(t, (torch.Tensor, int, float)):
            shared[_key(path)] = t

    try:
        walk(tree, ())
    finally:  # Note [No cycle through the learning rate]: a recursive closure is a cycle holding own,
        walk = None  # type: ignore[assignment]  # broken by emptying its cell
    return own, shared


def _like(value: Any, ref: Any) -> Any:
    """A loaded tensor ``value`` on the device and in the dtype of ``ref`` (Note [Loading a state where
    its parameters are])."""
    if isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor):
        return value.to(device=ref.device, dtype=ref.dtype)
    return value


# Note [Loading a state where its parameters are]
# torch.optim's load_state_dict casts each loaded tensor to its parameter's device (and floating
# dtype): a checkpoint saved on cuda:0 resumes on cuda:1 or on the CPU, one of a float64 run in a
# float32 model. load_state_dict took the loaded tensors as they were: a float64 state of a float32
# model stepped its free parameters in float64 (rounded back by copy_) and refused every constrained
# one at the first step (a ManifoldError: the retraction's vector in another dtype than the point),
# and a state on another device failed there with torch's device error. _rebuild casts each leaf to
# the device and dtype of the leaf of init's state it fills (init made it from the parameter: Adam's
# float32 second moment of a bfloat16 parameter stays float32, a count stays int64), and a momentum
# buffer that init does not have (momentum now 0) to its parameter's. A tensor already there is not
# copied (Tensor.to returns it), so dcp.load's in-place entries are still the ones the state holds.
def _own_leaves(t: Any, entries: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """A parameter's part ``t`` of a fresh state with its leaves from the parameter's ``entries`` (keyed by
    path), each on the device and in the dtype of the leaf it fills (for ``_rebuild``)."""
    if isinstance(t, Mapping):
        return {k: _own_leaves(v, entries, (*path, str(k))) for k, v in t.items()}
    if isinstance(t, tuple) and hasattr(t, "_fields"):
        return type(t)(*(_own_leaves(v, entries, (*path, f)) for f, v in zip(t._fields, t)))
    if isinstance(t, (tuple, list)):
        return type(t)(_own_leaves(v, entries, (*path, str(i))) for i, v in enumerate(t))
    if isinstance(t, (torch.Tensor, int, float)):
        return _like(entries[_key(path)], t)
    return t


def _rebuild(fresh: Any, names: tuple[str, ...], entries: Mapping[str, Mapping[str, Any]],
             points: Mapping[str, torch.Tensor], layout: Optional[frozenset]) -> Any:
    """A cohort's functional state on the structure of ``fresh`` (the optimizer's init at ``points``)
    with its leaves from each parameter's ``entries``, each on the device and in the dtype of the leaf
    it fills (Note [TorchOptimizer's state_dict], Note [Loading a state where its parameters are]);
    ``None`` where the entries are not exactly its leaves (a checkpoint of another optimizer)."""
    first = entries[names[0]]

    def walk(t: Any, path: tuple[str, ...], buffer: bool = False) -> Any:
        if _is_own(t, path, names, layout) or (buffer and isinstance(t, Mapping) and t):
            return {n: _own_leaves(t[n], entries[n], path) for n in names}
        if isinstance(t, Mapping):
            return {k: walk(v, (*path, str(k))) for k, v in t.items()}
        if isinstance(t, TraceState):  # a buffer on one side only fits (Note [Momentum that may be zero])
            where = (*path, "trace")
            key = _key(where)
            if _no_buffer(t.trace) and key in first:
                trace = {n: _like(entries[n][key], points[n]) for n in names}
            elif not _no_buffer(t.trace) and not any(k == key or k.startswith(f"{key}.") for k in first):
                trace = ()
            else:
                trace = walk(t.trace, where, True)
            return TraceState(walk(t.count, (*path, "count")), trace)
        if isinstance(t, tuple) and hasattr(t, "_fields"):
            return type(t)(*(walk(v, (*path, f)) for f, v in zip(t._fields, t)))
        if isinstance(t, (tuple, list)):
            return type(t)(walk(v, (*path, str(i))) for i, v in enumerate(t))
        if isinstance(t, (torch.Tensor, int, float)):
            return _like(first[_key(path)], t)
        return t

    try:
        state = walk(fresh, ())
    except KeyError:
        return None
    finally:  # a recursive closure: a cycle holding the entries and the points (as _entries'), broken
        walk = None  # type: ignore[assignment]  # by emptying its cell
    own, shared = _entries(state, names, layout)
    if any(set(own[n]) | set(shared) != set(entries[n]) - {_COHORT} for n in names):
        return None
    return state


# Note [Hyperparameters by parameter name]
# The factory is called with the constraints of a group, or of a part of one (a split), so a
# hyperparameter that is a dict by the parameters' names (radam's mask, the labels of a factory
# built on multi_transform) is cut to the names of the parameters it is built for. Only `mask` was
# cut: a factory taking `labels={"W": "frame", "b": "free"}` for the whole model failed in
# multi_transform at the first step of a group holding some of them, or at the first step where one
# parameter had no gradient (a structure mismatch, mid-run). Any hyperparameter that is a dict
# holding every name of the cohort is cut now; other values (a callable, one value, a dict of other
# keys) are passed as they are.
def _cohort_mask(mask: Any, names: tuple[str, ...]) -> Any:
    """A hyperparameter ``mask`` (or labels) keyed by parameter names, cut to a cohort's (a callable or a
    single value is the same for any parameters): Note [Hyperparameters by parameter name]."""
    if isinstance(mask, Mapping) and all(n in mask for n in names):
        return {n: mask[n] for n in names}
    return mask


# Note [Hyperparameters changed in place]
# A group's optimizer is rebuilt when a hyperparameter differs from the one it was built with. It kept
# the group's own objects to compare with, so a mask dict (or a list of betas) changed in place,
# mask["bias"] = False, compared equal to itself: the step went on with the old mask, silently, while
# state_dict saved the new one (a run resumed from that checkpoint then took other steps), and the
# functional masked/multi_transform read their dict at every update. The values are kept as a
# snapshot (_snapshot: the containers copied, the leaves as they are; tensors are compared by
# identity), so a change in place is read at the next step, as a reassignment is.
def _zero_dim(value: Any) -> Any:
    """``value`` with its tensors of one value as 0-dim views (in tuples and dicts too; a view: a scheduled
    in-place change is seen): torch.optim takes them (Adam's betas), a factory takes 0-dim ones (a (1,) one
    broadcast a 0-dim parameter's step)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()) if value.ndim and value.numel() == 1 else value
    if isinstance(value, Mapping):
        out = {k: _zero_dim(v) for k, v in value.items()}
        changed = any(out[k] is not v for k, v in value.items())
    elif isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        out = type(value)(_zero_dim(v) for v in value)
        changed = any(a is not b for a, b in zip(out, value))
    else:
        return value
    return out if changed else value  # the object itself otherwise: one changed in place is read (Note [Hyperparameters changed in place])


def _numbers(value: Any) -> Any:
    """``value`` with its real 0-dim tensors as their numbers, for the factory's checks at construction (as
    torch.optim checks a tensor's value: a tensor β₁ = 1 made every point NaN, silently)."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and real_dtype(value) and not value.is_meta:
            return value.detach().item()  # (an int for an integer tensor)
        return value
    if isinstance(value, Mapping):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_numbers(v) for v in value)
    return value


def _snapshot(value: Any) -> Any:
    """``value`` with its dicts, lists and tuples copied (Note [Hyperparameters changed in place])."""
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_snapshot(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same (tensors by identity: no elementwise ``==``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an object without a usable ==: rebuild)
        return False


def _factory_keys(factory: Callable[..., Optimizer]) -> tuple[dict[str, Any], Optional[frozenset[str]]]:
    """``(defaults, accepted)``: the keyword parameters of ``factory`` after its first (the
    constraints) other than ``lr``, with their defaults, and the names it accepts (``None`` when it
    takes ``**kwargs`` or has no signature to read)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, None
    params = list(sig.parameters.values())[1:]
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "lr"]
    defaults = {p.name: p.default for p in keyword if p.default is not p.empty}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return defaults, None
    return defaults, frozenset(p.name for p in keyword)


def _mismatch(saved: Any, fresh: Any) -> Optional[str]:
    """Where a loaded functional state ``saved`` differs in structure from ``fresh`` (the optimizer's
    init): ``None`` if it fits. A missing momentum buffer on either side fits (Note [Momentum that may
    be zero]); tensors must have the shapes of init's."""
    if isinstance(saved, torch.Tensor) and isinstance(fresh, torch.Tensor):
        return (None if saved.shape == fresh.shape
                else f"a tensor of shape {tuple(saved.shape)} where its init gives shape {tuple(fresh.shape)}")
    if hasattr(fresh, "_fields") or hasattr(saved, "_fields"):
        if type(saved) is not type(fresh):
            return f"a {type(saved).__name__} where its init gives a {type(fresh).__name__}"
    elif _no_buffer(saved) or _no_buffer(fresh):
        return None
    if isinstance(fresh, Mapping):
        if not isinstance(saved, Mapping) or set(saved) != set(fresh):
            return (f"{describe(saved) if not isinstance(saved, Mapping) else 'entries ' + str(sorted(saved))} where its "
                    f"init gives entries {sorted(fresh)}")
        return next((m for k in fresh if (m := _mismatch(saved[k], fresh[k])) is not None), None)
    if isinstance(fresh, (tuple, list)):
        if not isinstance(saved, (tuple, list)) or len(saved) != len(fresh):
            return f"{describe(saved)} where its init gives a {type(fresh).__name__} of {len(fresh)} entries"
        return next((m for a, b in zip(saved, fresh) if (m := _mismatch(a, b)) is not None), None)
    if isinstance(saved, torch.Tensor) or isinstance(fresh, torch.Tensor):
        return f"{describe(saved)} where its init gives {describe(fresh)}"
    return None


def _fit(saved: Any, fresh: Any) -> Any:
    """``saved`` with the state of a constant learning rate (``EmptyState``, from ``scale(-lr)``) in
    place of the ``ScaleByScheduleState`` that the group's learning rate, a schedule here, has: the
    first checkpoints hold one (its count is not read: the rate is the group's)."""
    if type(saved) is EmptyState and type(fresh) is ScaleByScheduleState:
        return fresh
    if hasattr(saved, "_fields") and type(saved) is type(fresh):
        return type(saved)(*(_fit(a, b) for a, b in zip(saved, fresh)))
    if type(saved) in (tuple, list) and isinstance(fresh, (tuple, list)) and len(saved) == len(fresh):
        return type(saved)(_fit(a, b) for a, b in zip(saved, fresh))
    return saved


def _pairs(items: Iterable[Any], where: str, frozen: Optional[list[str]] = None) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of ``items`` that require grad (the names of the others appended
    to ``frozen``); a clear error for anything else (a bare tensor: ``model.parameters()`` where
    ``model.named_parameters()`` is needed)."""
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise ManifoldError(f"{where}: expected (name, tensor) pairs, as module.named_parameters() gives, "
                                f"got {describe(item) if isinstance(item, torch.Tensor) else repr(item)}.")
        if item[1].requires_grad:
            out.append(item)
        elif frozen is not None:
            frozen.append(item[0])
    return out


# Note [Constraints in a group]
# add_param_group takes the new parameters' constraints in the group ("constraints": {name: space}), and
# a group given at construction in that form kept them as a hyperparameter the factory does not take:
# passed to nothing, its parameters were stepped as free ones and left their spaces, silently (and
# the spaces sat in the state_dict's param_groups). A group's "constraints" join the constructor's
# (a name constrained in both is refused), as add_param_group's do.
def _named_groups(params: Any, frozen: list[str], constraints: dict[str, Any]) -> list[tuple[list[tuple[str, torch.Tensor]], dict]]:
    """``[(named parameters that require grad, the group's other keys)]`` from ``(name, tensor)``
    pairs (one group) or from dicts ``{"params": pairs, "constraints": {name: space}, **hyperparameters}``;
    the names of frozen parameters are appended to ``frozen``, the groups' constraints added to
    ``constraints`` (Note [Constraints in a group])."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        groups = []
        for g in items:
            if not isinstance(g, Mapping) or "params" not in g:
                raise ManifoldError(f"TorchOptimizer: expected parameter groups as dicts with a 'params' entry of "
                                    f"(name, tensor) pairs, got {g!r}.")
            own = dict(g.get("constraints") or {})
            twice = sorted(set(own) & set(constraints))
            if twice:
                raise ManifoldError(f"TorchOptimizer: expected each parameter's constraint once (in `constraints` or in "
                                    f"its group's \"constraints\"), got {', '.join(map(repr, twice))} in both.")
            constraints.update(own)
            groups.append((_pairs(g["params"], "TorchOptimizer", frozen),
                           {k: v for k, v in g.items() if k not in ("params", "constraints")}))
        return groups
    return [(_pairs(items, "TorchOptimizer", frozen), {})]


# Note [torch.optim's flags in a group]
# A group key the factory does not take stays in the group and is not passed (Note [A functional optimizer
# behind torch.optim]), as torch.optim keeps a group's unknown keys. But a group ported from torch.optim may
# hold one of torch.optim's own flags that changes what its step computes: {"params": ..., "maximize": True}
# descended here where torch.optim.SGD and Adam ascend, silently (the constructor's maximize=True was refused,
# as a keyword the factory does not take), and Adam's decoupled_weight_decay=True (AdamW's step) gave the L2
# term. Such a flag, set in a group (at construction, in add_param_group, or later, before a step), is refused
# where the factory does not take it; False or None (a group copied from a torch.optim optimizer's
# param_groups) and the flags that change only how torch computes (foreach, fused, capturable) are taken.
# decoupled_weight_decay=True is what radamw computes (torch.optim.AdamW's own groups hold it True): taken there.
_TORCH_FLAGS = {
    "maximize": "geofunc.optim's steps descend; to ascend, negate the loss",
    "decoupled_weight_decay": "torch.optim.Adam's switch to AdamW's step; use gf.optim.radamw",
    "differentiable": "step runs under torch.no_grad(); differentiate through a functional optimizer's update "
                      "(gf.optim.radam(...).update under torch.func.grad) instead",
}


class TorchOptimizer(torch.optim.Optimizer):
    """A ``geofunc.optim`` optimizer stepping the parameters of an ``nn.Module`` in place.

    Args:
        params: ``module.named_parameters()`` (or any ``(name, tensor)`` pairs), or parameter groups:
            dicts ``{"params": (name, tensor) pairs, "lr": ..., **hyperparameters}`` (each a
            hyperparameter of its own, as ``torch.optim``'s groups; a key the factory does not take,
            e.g. ``"name"``, is kept in the group and not passed), which may carry ``"constraints":
            {name: space}`` for their parameters, as in ``add_param_group``. Parameters with
            ``requires_grad=False`` are left out, for good: one frozen here and unfrozen later is
            never trained (add it then with ``add_param_group``).
        constraints: ``{name: space}`` for the parameters that hold points of a space (their
            values must be points: checked here); every other parameter is free. Constraints for
            frozen parameters are ignored (those of
            ``geofunc.contrib.geoopt.constraints(model.named_parameters())`` for a model with a
            frozen part).
        optimizer: a factory of ``geofunc.optim`` with the signature of :func:`~geofunc.optim.radam`
            (``optimizer(constraints, lr=..., **kwargs)``): ``rsgd``, ``radam``, ``radamw`` or your own,
            returning a :class:`~geofunc.optim.Optimizer` (a transform goes through
            :func:`~geofunc.optim.retract_and_transport`). It is called with the constraints of the
            parameters stepped together: a group's, and from a step where only some of a group's
            parameters have a gradient on, each part's (the parts are stepped apart from then on,
            each with its own step count, as ``torch.optim`` counts each parameter's steps). So build
            labels and masks from them, as functions of the parameters, or take them as
            hyperparameters (a dict by name for the whole model, ``mask=`` or a factory's ``labels=``,
            is cut to the parameters it is built for), not closed over as a dict of the whole model
            (that fails at the first such step); what the factory couples across parameters
            (``clip_by_global_norm``'s norm, ``apply_if_finite``'s skip) is each group's, then each
            part's: for the whole model's, pass ``clip_by_global_norm`` and ``apply_if_finite`` to
            ``TorchOptimizer`` itself (below). ``lr`` is a schedule reading the group's rate
            (``scale_by_schedule(lambda t: -lr(t))``).
        lr: the learning rate, the groups' default (schedulers of ``torch.optim.lr_scheduler`` change
            ``param_groups[i]["lr"]`` between steps).
        clip_by_global_norm: ``max_norm`` (a number > 0, or a tensor of one value > 0), or None (the default: no clip). The
            gradients of every parameter stepped (all groups, all parts) are scaled by one factor
            ``min(1, max_norm / (‖g‖ + 1e-6))`` before the factories see them, ``‖g‖²`` the sum over
            those parameters of the squared Riemannian norm of the Riemannian gradient on
            constrained ones (``space.inner(X, r, r)``, ``r = space.egrad_to_rgrad(X, G)``) and of the
            Euclidean one elsewhere: :func:`~geofunc.optim.clip_by_global_norm` over the whole model
            (on free parameters ``torch.nn.utils.clip_grad_norm_``). The ``.grad`` tensors are left
            as they are; a factory's own ``weight_decay`` is added after the clip, as torch's is
            after ``clip_grad_norm_``.
        apply_if_finite: ``max_consecutive_errors`` (an int >= 0), or None (the default). A step
            whose gradients or new points are not all finite, in any group, is skipped for every
            group: no parameter moves, no state or step count changes (``state_dict`` is as before
            it), as :func:`~geofunc.optim.apply_if_finite` of one optimizer of the whole model; after
            more than ``max_consecutive_errors`` skips in a row the step is applied anyway. The
            counters, ``notfinite_count`` (skips in a row), ``last_finite`` and ``total_notfinite``,
            are properties and entries of every parameter group (so ``state_dict`` saves them). One
            host sync per step (as ``torch.amp.GradScaler``'s ``step``). Note [A whole-model step].
        **kwargs: the other hyperparameters' defaults, passed to ``optimizer`` (``momentum``,
            ``betas``, ``weight_decay``, ...). The groups (and ``defaults``) hold every keyword
            parameter of ``optimizer`` with its default, as ``torch.optim``'s groups do, so a
            scheduler (``OneCycleLR`` cycling ``betas`` or ``momentum``) or a line
            ``group["weight_decay"] = 0.1`` changes it: each is read from its group at every step.
            They are checked here, as ``torch.optim`` checks them (a ``ManifoldError``).

    ``step(closure=None)`` steps every parameter that has a ``.grad``; one without is skipped, as
    ``torch.optim`` skips it (not moved, its state untouched, its own step count: Note [A functional
    optimizer behind torch.optim]). ``zero_grad``, ``state_dict`` / ``load_state_dict`` (in
    ``torch.optim``'s format, so ``torch.distributed.checkpoint`` and its ``get_state_dict`` /
    ``set_state_dict`` save and load sharded states: Note [TorchOptimizer's state_dict]), ``state``,
    ``add_param_group`` (the group may carry ``"constraints": {name: space}`` for its parameters)
    and learning-rate schedulers work as for ``torch.optim`` optimizers.

    Example::

        >>> model = torch.nn.Linear(8, 4, bias=True)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(gf.Stiefel().sample((4, 8)))
        >>> opt = gf.optim.TorchOptimizer(model.named_parameters(), {"weight": gf.Stiefel()}, gf.optim.radam, lr=1e-2)
        >>> loss = model(torch.randn(16, 8)).pow(2).sum()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> bool(gf.Stiefel().contains(model.weight))
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        constraints: Mapping[str, Any],
        optimizer: Callable[..., Optimizer],
        lr: float | torch.Tensor,
        *,
        clip_by_global_norm: Any = None,
        apply_if_finite: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if (isinstance(optimizer, (Optimizer, str)) or not callable(optimizer)
                or (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer))):
            got = ("an Optimizer already built (pass its factory, its hyperparameters as keywords)"
                   if isinstance(optimizer, Optimizer) else
                   f"the torch.optim class {optimizer.__name__} (its geofunc.optim counterpart: radam for Adam, radamw "
                   f"for AdamW, rsgd for SGD)" if isinstance(optimizer, type) else repr(optimizer))
            raise ManifoldError(f"TorchOptimizer: expected `optimizer` a factory of geofunc.optim (gf.optim.radam, rsgd, "
                                f"radamw, or a function (constraints, lr, **hyperparameters) returning a "
                                f"gf.optim.Optimizer), got {got}.")
        if clip_by_global_norm is not None:
            # A tensor too (a scheduled max_norm), read once here: the step runs eagerly, and a negative one
            # reversed every gradient (the step went uphill), several values failed at the first step.
            if isinstance(clip_by_global_norm, torch.Tensor):
                T = clip_by_global_norm
                ok = (T.numel() == 1 and real_dtype(T)
                      and (T.is_meta or bool(T.detach().reshape(()) > 0)))
            else:
                x = _real(clip_by_global_norm)
                ok = x is not None and not isinstance(clip_by_global_norm, bool) and x > 0
            if not ok:
                got = clip_by_global_norm
                if isinstance(got, torch.Tensor):
                    got = (f"a tensor holding {got.detach().reshape(()).item()!r}" if got.numel() == 1 and not got.is_meta
                           else describe(got))
                else:
                    got = repr(got)
                raise ManifoldError(f"TorchOptimizer: expected `clip_by_global_norm` a number > 0 (the max_norm of the "
                                    f"whole model's gradient; a tensor of one value > 0) or None, got {got}.")
            # (a (1,) one broadcast every gradient; a Fraction raised a TypeError at the first step: Note [Numbers of any type])
            clip_by_global_norm = _number(_zero_dim(clip_by_global_norm))
        if apply_if_finite is not None:
            if not _is_count(apply_if_finite):
                raise ManifoldError(f"TorchOptimizer: expected `apply_if_finite` an int >= 0 (the whole model's "
                                    f"max_consecutive_errors) or None, got {apply_if_finite!r}.")
            apply_if_finite = int(apply_if_finite)  # (a NumPy integer, as gf.nn sizes take them)
        frozen: list[str] = []
        constraints = dict(constraints)
        groups = _named_groups(params, frozen, constraints)  # Note [Constraints in a group]
        named = [np for g, _ in groups for np in g]
        if not named:
            raise ManifoldError("TorchOptimizer: expected parameters that require grad, got none.")
        self._names: list[str] = []
        self._constraints: dict[str, Any] = {}
        self._check_new(named, constraints, frozen)
        factory_defaults, self._accepts = _factory_keys(optimizer)
        unknown_keys = sorted(set(kwargs) - self._accepts) if self._accepts is not None else []
        if unknown_keys:
            raise ManifoldError(f"TorchOptimizer: expected hyperparameters of {getattr(optimizer, '__name__', optimizer)!s} "
                                f"({', '.join(sorted(self._accepts))}), got {', '.join(map(repr, unknown_keys))}.")
        self._building = True  # torch.optim.Optimizer.__init__ calls add_param_group for each group
        super().__init__([{"params": [p for _, p in g], **over} for g, over in groups], {"lr": lr, **factory_defaults, **kwargs})
        self._building = False
        self._factory = optimizer
        self._hyper_keys = (set(factory_defaults) | set(kwargs) | {k for _, over in groups for k in over}) - {"lr"}
        self._group_names = [tuple(n for n, _ in g) for g, _ in groups]
        self._names = [n for names in self._group_names for n in names]
        self._constraints = {n: constraints.get(n) for n in self._names}
        self._cohorts = [_Cohort(i, names, None) for i, names in enumerate(self._group_names) if names]
        self._built: dict[tuple[int, tuple[str, ...]], tuple[dict, Optimizer]] = {}
        self._max_norm, self._max_errors = clip_by_global_norm, apply_if_finite  # Note [A whole-model step]
        self._set_counters(0, True, 0)
        for i in range(len(self.param_groups)):
            self._check_group(i)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer's keeps only defaults, state and param_groups: a deepcopy or pickle lost
        # the names and cohorts. The built functional optimizers close over this object: rebuilt.
        # Note [A copy's step is its own]: an instance attribute `step` is the wrapper a torch.optim
        # lr_scheduler puts on the optimizer it is given, which steps that optimizer through a weak
        # reference: copied, it made the copy's step() step the original (the copy's parameters did not
        # move, silently; "'NoneType' object has no attribute '_opt_called'" once the original was gone),
        # and pickle refused it. The hooks registered on the instance (register_step_pre_hook, ...)
        # went with it too: the copy's step ran the original's hooks, and a lambda hook made the
        # optimizer unpicklable. Both are left out, as torch.optim's own __getstate__ leaves them out
        # (its __setstate__ makes the hook dicts anew, empty).
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._built = {}

    def _check_new(self, named: list[tuple[str, torch.Tensor]], constraints: Mapping[str, Any], frozen: list[str]) -> None:
        """Refuse repeated names, constraints for parameters not given (those of frozen parameters
        are ignored), and constrained values off their spaces."""
        names = [n for n, _ in named]
        repeated = sorted({n for n in names if names.count(n) > 1 or n in self._names})
        if repeated:
            raise ManifoldError(f"TorchOptimizer: expected distinct parameter names, got {', '.join(map(repr, repeated))} "
                                f"more than once.")
        # Note [A tensor under two names]
        # A tied weight listed under each of its names (module.named_parameters(remove_duplicate=False))
        # was two parameters of one tensor: each stepped from the same point and the last write won, so
        # with a constraint under one name only the free step overwrote the constrained one (a point
        # off its space, silently; torch.optim only warns of duplicates), and a mask or group that
        # differs between the names did the same. A tensor is taken once, as torch.optim will.
        seen = {id(t): n for n, t in self._named().items()} if self._names else {}
        for n, t in named:
            if id(t) in seen:
                raise ManifoldError(f"TorchOptimizer: expected each parameter once, got one tensor as {seen[id(t)]!r} and "
                                    f"{n!r} (a tied weight: module.named_parameters() lists it once).")
            seen[id(t)] = n
        unknown = sorted(set(constraints) - set(names) - set(frozen))
        if unknown:
            raise ManifoldError(f"TorchOptimizer: expected constraints for parameters that require grad "
                                f"({', '.join(names)}), got constraints for {', '.join(map(repr, unknown))}.")
        with torch.no_grad():
            for n, p in named:
                space = constraints.get(n)
                if space is not None and not is_space(space):  # (it was "'str' object has no attribute 'contains'")
                    raise ManifoldError(f"TorchOptimizer: constraints for parameter {n!r}: expected a space (the entry "
                                        f"is a single tensor) or None, got {_pytree._what(space)}.")
                if space is not None and not bool(space.contains(p.detach()).all()):
                    raise ManifoldError(f"TorchOptimizer: expected parameter {n!r} to be a point of {space!r} "
                                        f"(assign one, e.g. space.sample(shape) or space.project(W)), got "
                                        f"{describe(p.detach())} off it.")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group ``{"params": (name, tensor) pairs, "constraints": {name: space}, **hyperparameters}``
        (``constraints`` optional: its parameters free otherwise), as ``torch.optim`` does."""
        if getattr(self, "_building", True):
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        constraints = dict(group.pop("constraints", None) or {})
        if "params" not in group:
            raise ManifoldError("TorchOptimizer.add_param_group: expected a dict with a 'params' entry of "
                                "(name, tensor) pairs.")
        frozen: list[str] = []
        named = _pairs(group.pop("params"), "TorchOptimizer.add_param_group", frozen)
        if not named:
            raise ManifoldError("TorchOptimizer.add_param_group: expected parameters that require grad, got none.")
        self._check_new(named, constraints, frozen)
        super().add_param_group({"params": [p for _, p in named], **group})
        self._set_counters(*self._counters())  # Note [A whole-model step]: in every group
        names = tuple(n for n, _ in named)
        self._hyper_keys |= set(group) - {"lr"}
        self._group_names.append(names)
        self._names.extend(names)
        self._constraints.update({n: constraints.get(n) for n in names})
        self._cohorts.append(_Cohort(len(self.param_groups) - 1, names, None))
        try:
            self._check_group(len(self.param_groups) - 1)
        except Exception:  # leave the optimizer as it was
            self.param_groups.pop()
            del self._group_names[-1], self._names[-len(names):], self._cohorts[-1]
            for n in names:
                del self._constraints[n]
            raise

    def _check_flags(self, i: int) -> None:
        """Refuse a flag of torch.optim's in group ``i`` that the factory does not take and that changes what
        torch.optim's step computes, set (Note [torch.optim's flags in a group])."""
        if getattr(self, "_accepts", None) is None:  # a factory with **kwargs is given the group's keys
            return
        group = self.param_groups[i]
        for key, hint in _TORCH_FLAGS.items():
            if key in self._accepts or key not in group:
                continue
            value = group[key]
            try:
                unset = value is None or not bool(value)  # (None, False, NumPy's False, a 0)
            except Exception:  # noqa: BLE001  (no truth value: a tensor of several values is not unset)
                unset = False
            if unset or (key == "decoupled_weight_decay" and self._factory is radamw):  # AdamW's step: radamw's
                continue
            raise ManifoldError(f"TorchOptimizer: expected no `{key}` in parameter group {i} ({self._factory_name} does "
                                f"not take it: {hint}), got {key}={value!r}.")

    def _hyper(self, group: dict) -> dict[str, Any]:
        """The hyperparameters of ``group`` that the factory takes (Note [A functional optimizer behind torch.optim])."""
        accepts = getattr(self, "_accepts", None)
        keys = self._hyper_keys if accepts is None else accepts
        return {k: group[k] for k in sorted(keys) if k in group}

    def _check_group(self, i: int) -> None:
        """Build group ``i``'s optimizer with its hyperparameters as numbers, so that the factory checks
        them (its learning rate included) now, as torch.optim does at construction."""
        group, names = self.param_groups[i], self._group_names[i]
        self._check_flags(i)  # Note [torch.optim's flags in a group]
        for k in self._hyper(group):  # torch.optim's one-value tensors (Adam's betas) as 0-dim views, as lr below
            group[k] = _zero_dim(group[k])
        hyper = self._hyper(group)
        hyper = {k: _cohort_mask(v, names) for k, v in hyper.items()}  # Note [Hyperparameters by parameter name]
        constraints = {n: self._constraints[n] for n in names}
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # as torch.optim takes it; a factory does not read a tensor (it may be
            # traced), so its value is checked here as the number's: a negative one stepped uphill, silently
            if lr.numel() != 1 or not real_dtype(lr):
                raise ManifoldError(f"TorchOptimizer: expected `lr` a number >= 0 or a real tensor of one value, got "
                                    f"{describe(lr)}.")
            group["lr"] = _zero_dim(lr)
            lr = _numbers(group["lr"])
        check_optimizer(f"TorchOptimizer: the factory {self._factory_name}",
                        self._factory(constraints, lr=lr, **{k: _numbers(v) for k, v in hyper.items()}))
        # Note [The learning rate a factory is given]
        # The steps build the factory with lr a schedule reading the group's rate (what a scheduler
        # changes), the check above with the rate itself (so that it is checked). A factory written
        # for a number (chain(..., scale(-lr))) passed the check and failed at the first step with
        # Python's "bad operand type for unary -: 'function'" from inside it. It is built here the
        # way the steps build it too, and a failure is named.
        try:
            self._factory(constraints, lr=lambda count: group["lr"], **hyper)
        except ManifoldError:
            raise
        except Exception as e:  # noqa: BLE001  (whatever the factory raised: named, chained)
            raise ManifoldError(f"TorchOptimizer: expected the factory {self._factory_name} to take `lr` as a schedule "
                                f"(a function of the update count, as every step gives it, reading the group's rate: "
                                f"gf.optim.scale_by_schedule(lambda t: -lr(t)), or lr passed on to gf.optim.radam), got "
                                f"{type(e).__name__} ({e}) building it with one.") from e

    def _named(self) -> dict[str, torch.Tensor]:
        return {n: p for names, g in zip(self._group_names, self.param_groups) for n, p in zip(names, g["params"])}

    # Note [No cycle through the learning rate]
    # The functional optimizers of the cohorts are kept in self._built, and their learning rate is a
    # schedule reading self.param_groups (what a scheduler changes). A closure over self made a cycle
    # (self -> _built -> the chain's closures -> the schedule -> self): after `del model, opt` the
    # parameters and the moments stayed alive until the cyclic garbage collector ran (a sweep of
    # fifteen 512x512 trials with gc on kept 5 alive), where torch.optim's optimizers go at once.
    # The schedule holds self weakly; _built lives and dies with self, so the reference is live
    # whenever the schedule is called. Likewise a recursive local function is a cycle (the function
    # and the cell holding it) that keeps every variable it closes over: _entries' walk held the
    # state read by state_dict() and .state (the moments of that step, past it), _rebuild's the
    # loaded entries and the parameters; each empties its own cell when done.
    def _functional(self, cohort: _Cohort) -> Optimizer:
        """The functional optimizer of a cohort with its group's hyperparameters now (rebuilt when a
        scheduler changed one; the learning rate is a schedule reading the group)."""
        i = cohort.group
        group = self.param_groups[i]
        hyper = self._hyper(group)
        key = (i, cohort.names)
        # compared as cut to the cohort: a whole-model mask is read once per parameter and step, not
        # once per cohort (a model split into one cohort per parameter)
        kwargs = {k: _cohort_mask(v, cohort.names) for k, v in hyper.items()}  # Note [Hyperparameters by parameter name]
        built = self._built.get(key)
        if built is not None and built[0].keys() == kwargs.keys() and all(_same(built[0][k], v) for k, v in kwargs.items()):
            return built[1]
        snapshot = {k: _snapshot(v) for k, v in kwargs.items()}  # Note [Hyperparameters changed in place]
        if (kwargs.get("nesterov") and "momentum" in kwargs
                and _known_value(kwargs["momentum"]) == 0.0):  # Note [Nesterov at momentum 0] (what rsgd and trace read)
            kwargs["nesterov"] = False
        # Note [No cycle through the learning rate]: the schedule reads the groups through a weak
        # reference, so the optimizer (its parameters, its state) goes with its last reference
        ref = weakref.ref(self)
        opt = self._factory({n: self._constraints[n] for n in cohort.names},
                            lr=lambda count, i=i: ref().param_groups[i]["lr"], **kwargs)
        self._built[key] = (snapshot, opt)
        return opt

    # Note [A whole-model step]
    # Each cohort (a group, or a part of one) is stepped by its own functional optimizer, so what a
    # factory couples across parameters is the cohort's: clip_by_global_norm's norm, apply_if_finite's
    # skip (a NaN in one group's gradient skipped that group's step and let the others step on, as
    # optax's multi_transform with the wrapper inside each label does). optax users expect the wrapper
    # outside: one norm over every leaf, one skip for the whole step. TorchOptimizer's own
    # clip_by_global_norm and apply_if_finite give that: the norm over every parameter stepped
    # (Riemannian on the constrained ones, with the functional clip's formula, clip_factor), its factor
    # applied to the Euclidean gradients (egrad_to_rgrad is linear, so the factories' to_tangent of the
    # scaled gradient is the scaled Riemannian gradient; scaling the Riemannian one instead would apply
    # egrad_to_rgrad twice, wrong for a non-embedded metric); and each cohort's update computed, then
    # all written or none by the functional apply_if_finite's rule (gradients as given and new points
    # finite), its counters the optimizer's own. The choice is a Python branch on one flag (step is
    # eager: a sync, as GradScaler's step), so a skipped step leaves the points, the states and a
    # cohort never stepped (no state yet) exactly as they were; the cohorts a split made at that step
    # keep the split (their states are the same values). The counters are entries of every parameter
    # group ("notfinite_count", "last_finite", "total_notfinite", the same in each; the properties
    # read the first), so the state_dict saves them: torch.distributed.checkpoint keeps only "state"
    # and "param_groups", its flattened form rebuilds the groups from the keys of the live ones, and a
    # parameter's entries exist only once it has stepped. load_state_dict takes the first saved
    # group's (a checkpoint without them starts them at 0; an optimizer without apply_if_finite
    # ignores them). A step with no gradient at all steps nothing and changes no counter.
    # Note [Nesterov at momentum 0]
    # torch.optim.SGD refuses nesterov=True without momentum when it is built, and a group whose momentum
    # a scheduler takes to 0 later (OneCycleLR or CyclicLR with base_momentum=0, a momentum warm-up
    # written by hand) steps as plain SGD there. rsgd checks at every build, and a group is rebuilt when
    # a hyperparameter changes: the step where the momentum reached 0 raised rsgd's ManifoldError,
    # mid-run. The group's rsgd is built without nesterov at momentum 0, the same steps (trace(0) passes
    # the vectors unchanged, nesterov or not: Note [Momentum that may be zero]); construction still
    # refuses it, as torch does. So is any factory's that takes `momentum` and `nesterov` (its own chain
    # of trace(momentum, nesterov=nesterov), which refuses the same: Note [Nesterov needs momentum]).
    # Note [Hyperparameters refused before any parameter moves]
    # A group's optimizer is rebuilt at a step where a hyperparameter changed, and the factory checks it then
    # (a momentum set to -0.5 by hand or by a schedule, a bool weight decay): it was built cohort by cohort,
    # each stepped and written before the next was built, so a refused hyperparameter in a later group left the
    # earlier groups stepped (their points moved, their states and counts advanced) and the call raised; the
    # retry once it was fixed stepped them a second time, silently. Every stepping cohort's optimizer is built
    # before any is stepped (the same optimizers, the same order; nothing more is held).
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        return _eager_step(self, closure)  # Note [A functional optimizer behind torch.optim]: never compiled

    @torch.no_grad()
    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i in range(len(self.param_groups)):  # (before any parameter moves)
            self._check_flags(i)  # Note [torch.optim's flags in a group]: one set after construction
        params = self._named()
        for n, p in params.items():
            if p.grad is not None and p.grad.is_sparse:
                raise ManifoldError(f"TorchOptimizer: expected a dense gradient for {n!r}, got a sparse one.")
        cohorts = []  # the splits first: one refused moves nothing
        for co in self._cohorts:
            stepped = tuple(n for n in co.names if params[n].grad is not None)
            if len(stepped) == len(co.names) or not stepped:
                cohorts.append(co)
            else:  # split: the skipped part keeps its state as it is
                skipped = _Cohort(co.group, tuple(n for n in co.names if params[n].grad is None), None)
                cohorts += [self._part(co, skipped, params), self._part(co, _Cohort(co.group, stepped, None), params)]
        self._cohorts = cohorts
        stepping = [co for co in cohorts if params[co.names[0]].grad is not None]
        if not stepping:
            return loss
        grads = {n: params[n].grad.detach() for co in stepping for n in co.names}
        given = grads
        if getattr(self, "_max_norm", None) is not None:  # Note [A whole-model step]
            grads = self._clipped(grads, params)
        whole = getattr(self, "_max_errors", None) is not None
        pending = []
        # Note [Hyperparameters refused before any parameter moves]: every cohort's optimizer built first
        opts = [self._functional(co) for co in stepping]
        for co, opt in zip(stepping, opts):
            points = {n: params[n].detach() for n in co.names}
            g = {n: grads[n] for n in co.names}
            state, layout = (co.state, co.layout) if co.state is not None else _init(opt, points)
            new, state = opt.update(g, state, points)
            # Note [A state that holds a parameter] (the gradients given, and the clipped ones)
            state = _unaliased(state, [*points.values(), *g.values(), *(given[n] for n in co.names if given is not grads)])
            if whole:  # kept until every group's step is known
                pending.append((co, new, state, layout))
                continue
            co.state, co.layout = state, layout
            for n in co.names:
                params[n].copy_(new[n])
        if whole and not self._whole_step_applies(given, [new for _, new, _, _ in pending]):
            return loss  # Note [A whole-model step]: points and states as they were
        for co, new, state, layout in pending:
            co.state, co.layout = state, layout
            for n in co.names:
                params[n].copy_(new[n])
        return loss

    def _clipped(self, grads: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``grads`` scaled by one factor so that the whole model's norm is at most ``clip_by_global_norm``
        (the Riemannian norm of the Riemannian gradient on constrained parameters: Note [A whole-model step])."""
        constraints = {n: self._constraints[n] for n in grads}
        points = {n: params[n].detach() for n in grads}
        coef = clip_factor(constraints, points, _pytree.egrad_to_rgrad(constraints, points, grads), self._max_norm)
        return grads if coef is None else {n: _keep(g, g * coef) for n, g in grads.items()}

    def _whole_step_applies(self, grads: Mapping[str, torch.Tensor], new: list[Any]) -> bool:
        """Whether the step is applied (``apply_if_finite``'s rule on the whole model's gradients and new
        points; one host sync), its counters updated (Note [A whole-model step])."""
        finite = bool(_all_finite(grads, new))
        count, _, total = self._counters()
        count = 0 if finite else count + 1
        self._set_counters(count, finite, total + (not finite))
        return finite or count > self._max_errors

    def _counters(self) -> tuple[int, bool, int]:
        """``(notfinite_count, last_finite, total_notfinite)`` of ``apply_if_finite`` (the first group's;
        ``(0, True, 0)`` without it): Note [A whole-model step]."""
        if getattr(self, "_max_errors", None) is None or not self.param_groups:
            return 0, True, 0
        g = self.param_groups[0]
        return int(g.get(_COUNTERS[0], 0)), bool(g.get(_COUNTERS[1], True)), int(g.get(_COUNTERS[2], 0))

    def _set_counters(self, count: int, finite: bool, total: int) -> None:
        """Write ``apply_if_finite``'s counters into every group (nothing without it)."""
        if getattr(self, "_max_errors", None) is None:
            return
        for g in self.param_groups:
            g.update(zip(_COUNTERS, (count, finite, total)))

    @property
    def notfinite_count(self) -> int:
        """With ``apply_if_finite``: the steps skipped in a row (0 after an applied one); 0 without."""
        return self._counters()[0]

    @property
    def last_finite(self) -> bool:
        """With ``apply_if_finite``: whether the last step's gradients and new points were finite."""
        return self._counters()[1]

    @property
    def total_notfinite(self) -> int:
        """With ``apply_if_finite``: the steps whose gradients or new points were not finite, in all."""
        return self._counters()[2]

    def _part(self, co: _Cohort, part: _Cohort, params: Mapping[str, torch.Tensor]) -> _Cohort:
        """``part`` (some of ``co``'s parameters) with its part of ``co``'s state, on the structure of
        its own optimizer's init (Note [Which entries of a state are a parameter's])."""
        if co.state is None:
            return part
        structure, part.layout = _probe(self._functional(part), {n: params[n].detach() for n in part.names})
        try:
            part.state = _fill(structure, co.state, part.names)
        except _Unfit as e:
            raise ManifoldError(f"TorchOptimizer.step: expected the state of {self._factory_name} for the parameters "
                                f"{list(co.names)} to split by parameter (some have a gradient, some not), "
                                f"into the state of its init for {list(part.names)}, got {e} (a state "
                                f"that does not split: give every parameter a gradient, zeros for the unused).") from None
        return part

    @property
    def state(self) -> defaultdict:
        """``{parameter: {key: tensor, ...}}``, each stepped parameter's entries of ``state_dict``, as
        ``torch.optim``'s ``state`` (a view built on each read, the functional states being the
        optimizer's own: writing into it changes nothing; load a state with ``load_state_dict``)."""
        params = self._named() if getattr(self, "_cohorts", None) is not None else {}
        return defaultdict(dict, {params[n]: e for n, e in self._param_entries().items()})

    @state.setter
    def state(self, value: Any) -> None:
        if value:  # torch.optim.Optimizer.__init__ sets an empty one
            raise ManifoldError("TorchOptimizer.state is a view of its functional states: load a state with "
                                "load_state_dict.")

    def _param_entries(self) -> dict[str, dict[str, Any]]:
        """Each stepped parameter's entries, by name (Note [TorchOptimizer's state_dict])."""
        out: dict[str, dict[str, Any]] = {}
        seen: set[int] = set()

        def once(t: Any) -> Any:  # a tensor held twice is copied: an in-place load writes each once
            if isinstance(t, torch.Tensor):
                if id(t) in seen:
                    return t.clone()
                seen.add(id(t))
            return t

        stepped = [co for co in getattr(self, "_cohorts", None) or [] if co.state is not None]
        for k, co in enumerate(stepped):
            own, shared = _entries(co.state, co.names, getattr(co, "layout", None))
            for n in co.names:
                entries = {key: once(v) for key, v in own[n].items()}
                entries.update((key, v.clone() if isinstance(v, torch.Tensor) else v) for key, v in shared.items())
                entries[_COHORT] = torch.tensor(k, device="cpu")  # a tensor: dcp.load sets other values under str(index)
                out[n] = entries
        return out

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s format (Note [TorchOptimizer's state_dict]): ``{"state": {index: {key: tensor,
        ...}}, "param_groups": [{**hyperparameters, "params": [index, ...], "param_names": [name, ...]}]}``,
        a parameter's entries the leaves of its functional state (``"2.mu"``, ``"2.nu"``, ...), a copy of
        its cohort's shared ones (the count, ``"2.count"``) and ``"cohort"`` (a 0-dim integer tensor,
        the same for the parameters stepped together); none before its first step. A callable
        hyperparameter (a ``mask`` function) is not saved, as ``LambdaLR`` saves no function: the
        optimizer that loads it keeps its own (Note [Callable hyperparameters]). The hooks of
        ``register_state_dict_pre_hook`` / ``_post_hook`` run as in ``torch.optim`` (Note [Hooks of
        state_dict and load_state_dict])."""
        for pre_hook in _hooks(self, "_optimizer_state_dict_pre_hooks"):
            pre_hook(self)
        entries = self._param_entries()
        index, groups, state = 0, [], {}
        for g, names in zip(self.param_groups, self._group_names):
            groups.append({k: v for k, v in g.items() if k != "params" and not callable(v)}  # Note [Callable hyperparameters]
                          | {"params": list(range(index, index + len(names))), "param_names": list(names)})
            state.update((index + i, entries[n]) for i, n in enumerate(names) if n in entries)
            index += len(names)
        out = {"state": state, "param_groups": groups}
        for post_hook in _hooks(self, "_optimizer_state_dict_post_hooks"):
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of this optimizer's format, or of the earlier ones (``"cohorts"``,
        ``"functional_state"``); the parameters are matched by their positions in the groups (their
        saved indices or names, as ``torch.distributed.checkpoint.state_dict`` gives them, are keys).
        The hooks of ``register_load_state_dict_pre_hook`` (which may return a new ``state_dict``: e.g.
        one that renames the saved parameters) and ``_post_hook`` run as in ``torch.optim``."""
        state_dict = dict(state_dict)  # shallow, as torch.optim: a pre-hook may write into it
        for pre_hook in _hooks(self, "_optimizer_load_state_dict_pre_hooks"):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = list(state_dict.get("param_groups", []))
        if "state" in state_dict:
            saved = ([n for g in groups for n in g["param_names"]] if all("param_names" in g for g in groups)
                     else None)
            fits = (len(groups) == len(self.param_groups)
                    and [len(g.get("params", ())) for g in groups] == [len(n) for n in self._group_names]
                    and (saved is None or saved == self._names))
            if saved is None:
                saved = f"{sum(len(g.get('params', ())) for g in groups)} parameters"
        else:
            saved = state_dict.get("names")
            fits = list(saved or []) == self._names and len(groups) == len(self.param_groups)
        if not fits:
            raise ManifoldError(f"TorchOptimizer.load_state_dict: expected a state for the parameters "
                                f"{self._names} in {len(self.param_groups)} group(s), got one for "
                                f"{saved} in {len(groups)}.")
        before = [dict(g) for g in self.param_groups]
        for group, saved_group in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved_group.items() if k not in ("params", "param_names", *_COUNTERS)})
        first = groups[0] if groups else {}  # Note [A whole-model step]: a checkpoint without them starts them anew
        self._set_counters(int(first.get(_COUNTERS[0], 0)), bool(first.get(_COUNTERS[1], True)),
                           int(first.get(_COUNTERS[2], 0)))
        try:
            self._load_cohorts(state_dict)
        except Exception:  # a refused checkpoint leaves the optimizer as it was
            for group, old in zip(self.param_groups, before):
                group.clear()
                group.update(old)
            self._built.clear()
            raise
        for post_hook in _hooks(self, "_optimizer_load_state_dict_post_hooks"):
            post_hook(self)

    @property
    def _factory_name(self) -> str:
        return getattr(self._factory, "__name__", repr(self._factory))

    def _refuse(self, co: _Cohort, where: str) -> ManifoldError:
        return ManifoldError(f"TorchOptimizer.load_state_dict: expected the state of {self._factory_name}'s init for the "
                             f"parameters {list(co.names)} (group {co.group}), got {where}: a checkpoint of "
                             f"another optimizer, or of other hyperparameters.")

    def _saved_cohorts(self, state_dict: dict[str, Any]) -> list[tuple[_Cohort, Optional[dict[str, Mapping]]]]:
        """The cohorts of a ``state_dict`` of torch.optim's format, each with its parameters' entries, in
        the order of their "cohort" (then the groups' parameters without any, never stepped, with ``None``)."""
        stepped: dict[tuple[int, Any], dict[str, Mapping[str, Any]]] = {}
        out: list[tuple[_Cohort, Optional[dict[str, Mapping[str, Any]]]]] = []
        state = state_dict["state"]
        for i, (names, group) in enumerate(zip(self._group_names, state_dict["param_groups"])):
            unstepped: list[str] = []
            for key, n in zip(group["params"], names):
                entries = state.get(key)
                if not entries:
                    unstepped.append(n)
                    continue
                if _COHORT not in entries:
                    raise ManifoldError(f"TorchOptimizer.load_state_dict: expected the entries of parameter {n!r} "
                                        f"to hold its {_COHORT!r}, got the keys {sorted(map(str, entries))}.")
                stepped.setdefault((i, int(entries[_COHORT])), {})[n] = entries
            if unstepped:
                out.append((_Cohort(i, tuple(unstepped), None), None))
        order = sorted(stepped, key=lambda key: (key[1], key[0]))
        return [(_Cohort(i, tuple(stepped[i, k]), None), stepped[i, k]) for i, k in order] + out

    def _load_cohorts(self, state_dict: dict[str, Any]) -> None:
        self._built.clear()
        params = self._named()
        if "state" in state_dict:
            cohorts = []
            for co, entries in self._saved_cohorts(state_dict):
                cohorts.append(co)
                if entries is None:
                    continue
                points = {n: params[n].detach() for n in co.names}
                opt = self._functional(co)
                with torch.no_grad():
                    fresh, co.layout = _init(opt, points)
                co.state = _rebuild(fresh, co.names, entries, points, co.layout)
                if co.state is None:
                    own, shared = _entries(fresh, co.names, co.layout)
                    got, want = sorted(set(entries[co.names[0]]) - {_COHORT}), sorted(own[co.names[0]] | shared)
                    raise self._refuse(co, f"the entries {got} where its init gives {want}")
                where = _mismatch(co.state, fresh)
                if where is not None:
                    raise self._refuse(co, where)
            self._cohorts = cohorts
            return
        if "cohorts" in state_dict:  # the format before torch.optim's (NamedTuple states)
            cohorts = [_Cohort(c["group"], tuple(c["names"]), c["state"]) for c in state_dict["cohorts"]]
        else:  # the first format (one group, one state)
            cohorts = [_Cohort(0, tuple(self._names), state_dict["functional_state"])]
        for co in cohorts:  # Note [A functional optimizer behind torch.optim]: a state of this optimizer's init
            if co.state is None:
                continue
            if self._factory is rsgd:
                co.state = upgrade_rsgd_state(co.state)
            opt, points = self._functional(co), {n: params[n].detach() for n in co.names}
            with torch.no_grad():
                fresh, co.layout = _init(opt, points)
            co.state = _fit(co.state, fresh)
            where = _mismatch(co.state, fresh)
            if where is not None:
                raise self._refuse(co, where)
        self._cohorts = cohorts


# Note [Callable hyperparameters]
# A group may hold a callable hyperparameter: radam's and radamw's `mask`, as documented
# (`mask=lambda p: {k: not k.endswith("bias") for k in p}`), or a custom factory's. The state_dict held
# it in "param_groups", so torch.save of a run's checkpoint raised PicklingError for a lambda or a local
# function, and one of a module-level function did not load with torch.load's default weights_only=True
# (an unsupported global), nor under torch.distributed.checkpoint. As torch's LambdaLR leaves its
# functions out of its state_dict, a callable value is left out of the saved groups: load_state_dict
# keeps the group's own value for a key the checkpoint does not have, so the optimizer built to resume,
# with the same mask, resumes bit for bit. (A mask given as a dict of bools by name is data: saved.)


# Note [Hooks of state_dict and load_state_dict]
# TorchOptimizer writes its own state_dict and load_state_dict (torch.optim's format from the functional
# states), and torch.optim runs the hooks registered with register_state_dict_pre_hook / _post_hook and
# register_load_state_dict_pre_hook / _post_hook inside its own: they were registered and never called,
# silently (a pre-hook that renames a checkpoint's parameters, torch's documented way to load one
# saved under other names, did nothing). They run here at the same points and with the same
# arguments: a post-hook of state_dict and a pre-hook of load_state_dict may return a new dict.
def _hooks(opt: torch.optim.Optimizer, attribute: str) -> list[Callable[..., Any]]:
    """The hooks registered on ``opt`` under ``attribute`` (none on a torch without that kind)."""
    return list(getattr(opt, attribute, {}).values())


# Note [A state that holds a parameter]
# The functional optimizers are pure, and a transform may keep in its state the points or vectors it
# was given (optax's lookahead keeps the slow weights, a "previous point" or "previous gradient"
# for a step-size rule): in a functional run those tensors never change. TorchOptimizer gives
# update the parameters' own storage (detached) and their .grad, then writes the new points into
# the parameters in place, and zero_grad(set_to_none=False) or the next backward writes into .grad:
# a state entry that was one of them changed with it, silently (the remembered point was the new
# one after every step). The state returned by update is checked against the storages of the points
# and gradients it was given, and an entry that shares one is copied: one storage comparison per
# tensor of the state and step, no copy where nothing is shared (the built-in transforms share none).
# (init's state is checked by the same call after the first update: it is replaced by it.)
def _storage(t: torch.Tensor) -> Optional[int]:
    """The address of ``t``'s storage (``None`` where it has none to read: a tensor subclass)."""
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001  (a DTensor or another subclass without one storage)
        return None


def _unaliased(state: Any, given: list[torch.Tensor]) -> Any:
    """``state`` with a copy of each tensor that shares the storage of one of ``given`` (Note [A state
    that holds a parameter])."""
    taken = {_storage(t) for t in given} - {None, 0}
    leaves, spec = optree.tree_flatten(state, none_is_leaf=False)
    shared = [isinstance(t, torch.Tensor) and _storage(t) in taken for t in leaves]
    if not any(shared):
        return state
    return optree.tree_unflatten(spec, [t.clone() if s else t for t, s in zip(leaves, shared)])


@torch.compiler.disable  # (a plain function: on torch 2.6 the decorator does not bind as a method)
def _eager_step(opt: TorchOptimizer, closure: Optional[Callable[[], Any]]) -> Any:
    return opt._step(closure)
