"""From constrained ``nn.Module``s to the functional API (``torch.func.functional_call``, ``vmap``).

A module constrained with ``geofunc.nn`` holds, for each constrained tensor ``"0.weight"``, a raw
parameter ``"0.parametrizations.weight.original"`` and base buffers
``"0.parametrizations.weight.0.base*"``. The functional world wants a pytree keyed by the plain
names. :func:`functional` translates::

    constraints, raw, bases = gf.nn.functional(model)     # keys "0.weight", "0.bias", ...
    skeleton = gf.nn.plain(model)                          # an unparametrized copy

    def loss(raw, x, y):
        params = gf.to_manifold(constraints, raw, bases)   # points, same keys
        return F.cross_entropy(torch.func.functional_call(skeleton, params, (x,)), y)

and :func:`module_state` translates back to the parametrized module's own names, for
``torch.func.functional_call(model, gf.nn.module_state(model, raw, bases), (x,))``, which runs
the module's own parametrizations. :func:`stack` does the same for K identically constrained
modules, stacked along a new leading dimension for ``torch.func.vmap`` (PyTorch's
``stack_module_state`` refuses modules that are themselves parametrized, each of its own class; a
container of constrained layers it stacks under the parametrized names, raw tensors and bases).
``functional_call(module, {"weight": W}, args)`` with a constrained tensor's plain name is refused
(Note [functional_call with a constrained tensor's plain name] in ``_adapter.py``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, Iterable, Sequence, SupportsFloat

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils import parametrize

from .._dtensor import DTensor, gather
from .._errors import ManifoldError, describe
from ..spaces._base import _readable
from ._adapter import ModuleT, Parametrization, _concrete, _owner_name, _sharded_raw, _write_values, refine_base

__all__ = ["functional", "plain", "stack", "module_state", "load_functional", "average_"]

Tensor = torch.Tensor

_ORIGINAL = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _need_module(obj: Any, where: str, what: str = "module") -> None:
    """A ManifoldError naming ``where`` unless ``obj`` is an ``nn.Module`` (else torch's AttributeError
    from ``named_modules``, naming neither the function nor what it takes)."""
    if not isinstance(obj, nn.Module):
        raise ManifoldError(f"{where}: expected {what} to be a torch.nn.Module, got {describe(obj)}.")


def _geofunc_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, Parametrization]]:
    """Plain name -> (owner module, tensor name, adapter) for every parametrized tensor of ``module``."""
    out = {}
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for tname, plist in sub.parametrizations.items():
            key = f"{prefix}.{tname}" if prefix else tname
            if len(plist) != 1 or not isinstance(plist[0], Parametrization) or not plist.is_tensor:
                raise ManifoldError(
                    f"{key} ({_owner_name(sub, tname)}): expected a tensor parametrized by exactly one geofunc "
                    f"Parametrization (what the functional bridge supports), got {[type(p).__name__ for p in plist]}."
                )
            if not plist[0]._identity_raw:
                raise ManifoldError(
                    f"{key} ({_owner_name(sub, tname)}) constrained to {plist[0].space!r}: expected a parametrization "
                    f"whose raw tensor is its space's, got {plist[0]!r} (SO(lower=False) reads the upper triangle): "
                    "use lower=True for the functional bridge."
                )
            out[key] = (sub, tname, plist[0])
    return out


def functional(module: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """The constraints, raw parameters and bases of a constrained module, keyed by plain names.

    ``gf.to_manifold(constraints, raw, bases)`` is then the dict of values of the module's
    parameters, ready for ``torch.func.functional_call`` of :func:`plain` ``(module)``.

    Returns:
        constraints: the plain name of each constrained tensor (``"0.weight"``) to its space.
        raw: the plain name of every parameter to the module's own Parameter objects (for a
            constrained tensor: its raw parameter ``original``; like
            ``dict(module.named_parameters())``, not copies: clone them to train functionally
            without touching the module).
        bases: each constrained name whose space has a base to that base (the module's
            buffers; names of spaces without a base are left out, so that ``bases`` has no
            ``None`` leaves, as ``geofunc.from_manifold`` returns it).
    """
    _need_module(module, "functional")
    tensors = _geofunc_tensors(module)
    constraints = {k: a.space for k, (_, _, a) in tensors.items()}
    bases = {k: b for k, (_, _, a) in tensors.items() if (b := a.get_base()) is not None}
    raw: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        raw[_ORIGINAL.sub(r"\1\2", name)] = p
    for key, (sub, tname, _) in tensors.items():
        if key not in raw:  # a constrained buffer (not a Parameter)
            raw[key] = sub.parametrizations[tname].original
    return constraints, raw, bases


# Note [Tied raw tensors]
# A constraint unties tied weights (b.weight = a.weight, then orthogonal(a)): a reads the point, b the raw
# Parameter, which register_parametrization moved into a.parametrizations.weight.original (torch's own
# parametrizations and GeoTorch do the same; docs/guide/nn.md). plain() removes the parametrizations,
# which writes each point into its original Parameter, so the skeleton read the point in b as well, and
# a functional form keyed by names (one value per name) cannot say "the raw tensor here, its point
# there": plain(m)(x), functional_call(plain(m), to_manifold(*functional(m)), x) and stack's skeleton were
# 1.3 off m(x) on a 5x5 pair, silently. plain (and stack) refuse such a module by name instead; the module
# itself runs with functional_call(m, module_state(m, raw, bases), args), which keeps the tie. average_
# refuses it too: assigning the average re-centres a's chart, which rewrites the raw tensor b reads (to 0
# on SO: averaging a model with itself moved its output by 0.12).
def _refuse_tied_raw(module: nn.Module, where: str) -> None:
    """Raise where a constrained tensor's raw tensor is also reachable under another name (Note [Tied raw tensors])."""
    tensors = _geofunc_tensors(module)
    keys: dict[int, list[str]] = {}
    readers: dict[int, nn.Module] = {}  # the module whose parametrization reads each raw tensor
    for key, (sub, tname, _) in tensors.items():
        keys.setdefault(id(sub.parametrizations[tname].original), []).append(key)
        readers.setdefault(id(sub.parametrizations[tname].original), sub)
    owners = dict(module.named_modules(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) not in keys:
            continue
        match = _ORIGINAL.search(name)
        if match and owners.get(name[: match.start()]) is readers[id(t)]:
            continue  # the same parametrized module under another path (a shared submodule): reads the point
        names.setdefault(id(t), []).append(_ORIGINAL.sub(r"\1\2", name))
    for i, ks in keys.items():
        others = [n for n in dict.fromkeys(names.get(i, [])) if n != ks[0]]
        if len(ks) > 1:
            others = list(dict.fromkeys([*ks[1:], *others]))
        if others:
            key = ks[0]
            raise ManifoldError(
                f"{where}: the raw tensor of {key} (constrained to {tensors[key][2].space!r}) is also the module's "
                f"{', '.join(others)} (tied weights): expected each constrained tensor's raw Parameter under its own "
                f"name only, got it tied. The module reads the raw tensor there and the point at {key}: a copy "
                "keyed by plain names (plain, stack) cannot express that, and re-centring the chart (average_) "
                f"would rewrite the raw tensor read there. Untie them and read {key} in the other module's forward "
                f"(e.g. F.linear(h, {key})), or run the module itself: functional_call(module, "
                "gf.nn.module_state(module, raw, bases), args) keeps the tie."
            )


# Note [A replica's own class]
# torch's register_parametrization gives the module a class of its own, made on the fly, that holds the
# tensors' properties; remove_parametrizations deletes a property from that class. copy.deepcopy keeps
# the class of a module registered directly (torch's own __deepcopy__: a GeoTorch class registered with
# register_parametrization, as GeoTorch's examples do; the one-liners' copies get fresh classes), so
# plain() removed the property from the original's class too: the original module then had no weight
# (AttributeError: 'ParametrizedLinear' object has no attribute 'weight'; aliasing probe). A replica
# whose class is the original's gets a copy of it before its parametrizations are removed.
def plain(module: nn.Module) -> nn.Module:
    """An unparametrized deep copy of ``module``: each constrained tensor becomes a plain tensor of the
    same name holding its current value. Its parameter names are the keys of :func:`functional`'s ``raw``.

    Raises:
        ManifoldError: a constrained tensor's raw Parameter is tied to another name of the module
            (Note [Tied raw tensors]).
    """
    _need_module(module, "plain")
    _refuse_tied_raw(module, "plain")
    replica = copy.deepcopy(module)
    shared = {id(type(m)) for m in module.modules() if parametrize.is_parametrized(m)}
    for sub in list(replica.modules()):
        if parametrize.is_parametrized(sub):
            cls = type(sub)
            if id(cls) in shared:  # Note [A replica's own class]
                sub.__class__ = type(cls.__name__, cls.__bases__,
                                     {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
            for tname in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, tname, leave_parametrized=True)
    return replica


def module_state(module: nn.Module, raw: Mapping[str, Tensor], bases: Mapping[str, Any]) -> dict[str, Tensor]:
    """Translate ``raw`` and ``bases`` (plain names) back to the parametrized module's own names.

    ``torch.func.functional_call(module, module_state(module, raw, bases), args)`` then runs the
    module's own parametrizations on ``raw`` and ``bases`` (``"0.weight"`` becomes
    ``"0.parametrizations.weight.original"``, its base ``"0.parametrizations.weight.0.base"``).
    """
    _need_module(module, "module_state")
    tensors = _geofunc_tensors(module)
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key in tensors:
            prefix = key[: len(key) - len(tensors[key][1])]
            out[f"{prefix}parametrizations.{tensors[key][1]}.original"] = value
        else:
            out[key] = value
    for key, base in bases.items():
        if key not in tensors:
            raise KeyError(f"{key!r} is not a constrained tensor of the module")
        sub, tname, adapter = tensors[key]
        prefix = key[: len(key) - len(tname)]
        names = pytree.tree_leaves(adapter._template)
        for name, leaf in zip(names, pytree.tree_leaves(base)):
            if name is not None:
                out[f"{prefix}parametrizations.{tname}.0.{name}"] = leaf
    # The adapters' own buffers that are not bases (the GeoTorch classes' dtype reference), as the module
    # holds them: a strict functional_call asks for every buffer, and the user cannot know of these.
    for key, (sub, tname, adapter) in tensors.items():
        prefix = key[: len(key) - len(tname)]
        bases_of = set(adapter._base_names())
        for name, buf in adapter.named_buffers():
            if name not in bases_of:
                out.setdefault(f"{prefix}parametrizations.{tname}.0.{name}", buf)
    return out


def load_functional(module: ModuleT, raw: Mapping[str, Tensor], bases: Mapping[str, Any] | None = None) -> ModuleT:
    """Write ``raw`` (and ``bases``) from functional training back into the module, in place.

    The inverse of :func:`functional`: parameters keep their identity (optimizers keep
    tracking them), only their values change. All or nothing (Note [Loading functional results]):
    every value is converted to its target's kind, dtype and device and checked first (a base on its
    space), then written; values of another dtype keep their point, as ``load_state_dict`` keeps a
    checkpoint's (Note [Loading functional results across dtypes]); on a module sharded with FSDP2, a ``DTensor`` for a plain buffer (a base
    from ``gf.rebase``, sharded like the raw tensor) is gathered, a collective that every rank makes
    together, and a plain tensor for a ``DTensor`` parameter is taken as the full value.

    Raises:
        ManifoldError: a name the module does not have, a value of another shape, a complex value for
            a real tensor, a DTensor on another mesh, or a base off its space; the message names the
            tensor, and the module is left as it was.
    """
    _need_module(module, "load_functional")
    tensors = _geofunc_tensors(module)
    for key in bases or {}:
        if key not in tensors:
            raise ManifoldError(f"load_functional: expected the bases of constrained tensors of the module "
                                f"({sorted(tensors)}), got a base for {key!r}.")
    for key, base in (bases or {}).items():
        adapter = tensors[key][2]
        if pytree.tree_structure(base) != pytree.tree_structure(adapter._template):
            raise ManifoldError(f"load_functional: {key} ({adapter.where}) constrained to {adapter.space!r}: "
                                f"expected a base of structure {pytree.tree_structure(adapter._template)}, got "
                                f"{pytree.tree_structure(base)}.")
    for key, (sub, tname, _) in tensors.items():  # (Note [Raw tensors FSDP2 holds unsharded] in _adapter.py)
        _sharded_raw(sub, tname, "load_functional")
    state = module_state(module, raw, bases or {})
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    targets = {}
    for key, value in state.items():  # every check that needs no communication, on every rank alike
        target = params.get(key, buffers.get(key))
        if target is None:
            raise ManifoldError(f"load_functional: expected names of the module's parameters and bases, got {key!r} "
                                "(the module has no such tensor).")
        if not isinstance(value, torch.Tensor):
            raise ManifoldError(f"load_functional: expected a tensor for {key}, got {describe(value)}.")
        if tuple(value.shape) != tuple(target.shape):
            raise ManifoldError(f"load_functional: expected a tensor of shape {tuple(target.shape)} for {key}, "
                                f"got shape {tuple(value.shape)}.")
        if value.is_complex() and not target.is_complex():
            raise ManifoldError(f"load_functional: expected a real tensor (dtype {target.dtype}) for {key}, got "
                                f"{describe(value)}.")
        if _is_dtensor(value) and _is_dtensor(target) and value.device_mesh != target.device_mesh:
            raise ManifoldError(f"load_functional: expected a DTensor on the mesh of {key} ({target.device_mesh}), "
                                f"got one on {value.device_mesh}.")
        targets[key] = target
    with torch.no_grad():
        staged = {key: _as_target(value.detach(), targets[key]) for key, value in state.items()}  # collectives
        for key, entry in tensors.items():
            _keep_points_across_dtypes(key, entry, state, staged)
        for key, base in (bases or {}).items():
            _check_loaded_base(key, tensors[key], staged)
        for key, value in staged.items():
            targets[key].copy_(value)
    return module


# Note [Loading functional results]
# load_functional wrote each tensor with copy_ as it went, so a value it could not write (a base
# DTensor from gf.rebase on an FSDP2 module, whose base buffers are plain tensors: torch's "mixed
# torch.Tensor and DTensor") left the module with the new raw tensors and the old bases, a point
# that was neither (0.77 off; a probe). Now every value is first converted to its target: a DTensor
# for a plain tensor is gathered (full_tensor, a collective: every rank converts the same names in
# the same order, so none waits alone); a plain tensor for a DTensor is that DTensor's full value
# (the same on every rank, as a base is), sharded like it locally; a DTensor of other placements is
# redistributed; then cast to the target's dtype and device, a fresh copy (no value aliases a
# target written before it). The bases are checked on their spaces as forward would (Note [Bases
# checked where they change] in _adapter.py), and only then is anything written.
def _is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def _as_target(value: Tensor, target: Tensor) -> Tensor:
    """``value`` as a fresh tensor of ``target``'s kind (plain or DTensor, placements), dtype and device."""
    if _is_dtensor(value) and not _is_dtensor(target):
        value = value.full_tensor()
    elif _is_dtensor(target):
        from torch.distributed.tensor import Replicate

        mesh = target.device_mesh
        if not _is_dtensor(value):
            value = type(target).from_local(value.to(device=target.to_local().device), mesh,
                                            [Replicate()] * mesh.ndim, run_check=False)
        if tuple(value.placements) != tuple(target.placements):
            value = value.redistribute(mesh, target.placements)
        return value.to(dtype=target.dtype).clone()
    return value.to(dtype=target.dtype, device=target.device, copy=True)


# Note [Loading functional results across dtypes]
# A value of another dtype than its target was cast, as documented "as load_state_dict casts"; but
# load_state_dict of another dtype keeps the points (Note [Raw tensors across dtypes] and Note [Bases
# across dtypes] in _adapter.py), and the cast alone did not: the value coordinates of the "softplus"
# spaces (GLp, PSD, FixedRank, SL, PSSDFixedRank) mean another point in another dtype, so float64
# functional results written into a float32 module moved every singular value (eigenvalue) by the
# floors' difference, 3.4e-4 (float32 into bfloat16: 0.088), silently; and a base from float32
# results, orthonormal to float32's rounding, was refused by a float64 module (off its space at
# float64's tolerance) where load_state_dict re-makes it valid. A staged raw tensor of another dtype
# is now re-expressed from the given value, and a staged base whose given value had another dtype
# and was valid there is re-made valid in the target's dtype, as load_state_dict does; a base off its
# space in its own dtype is still refused by _check_loaded_base. The point moves by the rounding of
# the less precise dtype only. DTensor values and targets are left to the cast (their entries are not
# readable here; a sharded module's parameters keep one dtype).
def _keep_points_across_dtypes(key: str, entry: tuple, state: dict, staged: dict) -> None:
    """Re-express in ``staged`` the raw tensor and bases of the constrained tensor ``key`` whose values in
    ``state`` have another dtype than their targets (Note [Loading functional results across dtypes])."""
    sub, tname, adapter = entry
    pre = f"{key[: len(key) - len(tname)]}parametrizations.{tname}."
    value, new = state.get(pre + "original"), staged.get(pre + "original")
    if (value is not None and _concrete(value) and _concrete(new) and value.dtype != new.dtype
            and value.is_complex() == new.is_complex()):
        view = adapter.space._dtype_coords(value)
        if view is not None:
            _write_values(adapter.where, adapter.space, adapter.space._dtype_coords(new), view, value.dtype, new.dtype)
    names = pytree.tree_leaves(adapter._template)
    keys = [None if n is None else f"{pre}0.{n}" for n in names]
    given = [k for k in keys if k is not None]
    if not given or not all(k in state and _concrete(state[k]) and _concrete(staged[k]) for k in given):
        return
    if all(state[k].dtype == staged[k].dtype for k in given):
        return
    spec = pytree.tree_structure(adapter._template)
    if adapter.space._invalid_base(pytree.tree_unflatten([None if k is None else state[k] for k in keys], spec)) is not None:
        return  # off its space in its own dtype: _check_loaded_base refuses it
    refined = refine_base(adapter.space, pytree.tree_unflatten([None if k is None else staged[k] for k in keys], spec))
    for k, leaf in zip(keys, pytree.tree_leaves(refined)):
        if k is not None:
            staged[k] = leaf


def _check_loaded_base(key: str, entry: tuple, staged: dict) -> None:
    """Raise ``ManifoldError`` naming ``key`` where the staged base of ``key`` is off its space."""
    sub, tname, adapter = entry
    prefix = key[: len(key) - len(tname)]
    leaves = [None if n is None else staged[f"{prefix}parametrizations.{tname}.0.{n}"]
              for n in pytree.tree_leaves(adapter._template)]
    if not all(t is None or _readable(t) for t in leaves):
        return  # a DTensor or meta buffer: forward checks it where it can
    base = pytree.tree_unflatten(leaves, pytree.tree_structure(adapter._template))
    why = adapter.space._invalid_base(base)
    if why is not None:
        raise ManifoldError(f"load_functional: {key} ({adapter.where}) constrained to {adapter.space!r}: expected "
                            f"its base on the space, as gf.from_manifold and gf.rebase return it, got {why}. "
                            "Nothing was written.")


def stack(modules: Sequence[nn.Module], *, buffers: bool = False) -> tuple:
    """Stack K identically constrained modules for ``torch.func.vmap`` ensembles.

    ``base_module`` is the stateless skeleton of ``torch.func.functional_call``::

        constraints, raw, bases, skeleton = gf.nn.stack(models)
        def f(raw, bases, x):
            return functional_call(skeleton, gf.to_manifold(constraints, raw, bases), (x,))
        out = vmap(f, in_dims=(0, 0, None))(raw, bases, x)     # (K, batch, ...)

    Returns:
        constraints: the shared constraints (as :func:`functional`).
        raw: the raw parameters of every module stacked along a new leading dimension of size
            K (fresh tensors, detached; leaves with ``requires_grad`` as in the modules).
        bases: the bases of every module, stacked the same way.
        base_module: an unparametrized copy of ``modules[0]`` (see :func:`plain`), with module 0's
            buffers.
        buffers: only with ``buffers=True``, the modules' own buffers (BatchNorm's running
            statistics, ...) stacked the same way, for ``functional_call(base_module, (points,
            buffers), args)``, as ``torch.func.stack_module_state`` returns them::

                constraints, raw, bases, skeleton, buffers = gf.nn.stack(models, buffers=True)
                def f(raw, bases, buffers, x):
                    return functional_call(skeleton, (gf.to_manifold(constraints, raw, bases), buffers), (x,))
                out = vmap(f, in_dims=(0, 0, 0, None))(raw, bases, buffers, x)

    Raises:
        ManifoldError: no modules; the modules differ in constraints, names or shapes, or in their
            train/eval mode (of any submodule: Note [Modes of an ensemble]); without
            ``buffers=True``, the modules' buffers differ (every member would run with module 0's:
            Note [Buffers of an ensemble]); a constrained tensor's raw Parameter is tied to another
            name (Note [Tied raw tensors]).
    """
    modules = list(modules)
    if not modules:
        raise ManifoldError("stack: expected at least one module, got none.")
    for i, m in enumerate(modules):
        _need_module(m, "stack", f"module {i}")
    for m in modules:
        _refuse_tied_raw(m, "stack")
    triples = [functional(m) for m in modules]
    c0, r0, b0 = triples[0]
    for i, (c, r, b) in enumerate(triples[1:], 1):
        if c != c0:
            raise ManifoldError(f"stack: expected module {i} with module 0's constraints {c0}, got {c}.")
        if r.keys() != r0.keys() or any(r[k].shape != r0[k].shape for k in r0):
            raise ManifoldError(
                f"stack: expected module {i} to have module 0's parameters "
                f"{[(k, tuple(v.shape)) for k, v in r0.items()]}, got {[(k, tuple(v.shape)) for k, v in r.items()]}."
            )
        if pytree.tree_structure(b) != pytree.tree_structure(b0):
            raise ManifoldError(f"stack: module {i} has bases of another structure than module 0")
    _same_modes(modules)

    def stacked(*xs: Any) -> Any:
        if xs[0] is None:
            return None
        return torch.stack([x.detach() for x in xs])

    stacked_buffers = _stack_buffers(modules) if buffers else _same_buffers(modules)
    raw = {}
    for k in r0:
        raw[k] = torch.stack([r[k].detach() for _, r, _ in triples]).requires_grad_(r0[k].requires_grad)
    bases = pytree.tree_map(stacked, b0, *[b for _, _, b in triples[1:]])
    if buffers:
        return dict(c0), raw, bases, plain(modules[0]), stacked_buffers
    return dict(c0), raw, bases, plain(modules[0])


# Note [Modes of an ensemble]
# The skeleton is plain(modules[0]), so it has module 0's train/eval mode, and under vmap every member
# ran in it: a member put in eval mode beside a module 0 in training was evaluated with BatchNorm's batch
# statistics and with dropout, silently (0.55 off its own output; a probe). torch.func.stack_module_state
# refuses modules whose modes differ (top-level only); stack refuses a difference in any submodule's
# mode (a submodule's .eval() changes forward as much), naming it. The parametrizations' own modules
# are not compared: their mode changes nothing.
def _modes(module: nn.Module) -> dict[str, bool]:
    inner = re.compile(r"(^|\.)parametrizations(\.|$)")
    return {name: m.training for name, m in module.named_modules() if not inner.search(name)}


def _same_modes(modules: Sequence[nn.Module]) -> None:
    m0 = _modes(modules[0])
    for i, m in enumerate(modules[1:], 1):
        for name, training in _modes(m).items():
            if name in m0 and training != m0[name]:
                what = f"submodule {name!r}" if name else "the module"
                raise ManifoldError(
                    f"stack: expected module {i} in module 0's train/eval mode (the skeleton is module 0's, and "
                    f"every member runs in its mode under vmap), got {what} with training={training} where "
                    f"module 0's has training={m0[name]}: call .train() or .eval() on every module first."
                )


# Note [Buffers of an ensemble]
# stack returns the skeleton plain(modules[0]), whose buffers (BatchNorm's running statistics, ...)
# are module 0's: under vmap every member ran with them, silently (0.25 and 1.1 off module 1's and 2's
# own outputs in eval mode; a probe). torch.func.stack_module_state returns the buffers stacked. Here
# stack keeps its four results and refuses modules whose buffers differ, naming the buffer;
# stack(..., buffers=True) returns them stacked as a fifth, for functional_call(skeleton, (points,
# buffers), args) under vmap.
def _buffers(module: nn.Module) -> dict[str, Tensor]:
    """The module's own buffers (not the bases its parametrizations keep)."""
    return {k: b for k, b in module.named_buffers() if "parametrizations." not in f".{k}"}


def _same_buffers(modules: Sequence[nn.Module]) -> None:
    b0 = _buffers(modules[0])
    for i, m in enumerate(modules[1:], 1):
        b = _buffers(m)
        if b.keys() != b0.keys():
            raise ManifoldError(f"stack: expected the buffers of module 0 ({sorted(b0)}) in module {i}, got {sorted(b)}.")
        for k, v in b.items():
            if v.shape != b0[k].shape or v.dtype != b0[k].dtype or not torch.equal(v, b0[k]):
                raise ManifoldError(
                    f"stack: expected module {i}'s buffer {k!r} equal to module 0's (the skeleton carries module 0's "
                    f"buffers, so every member would run with them under vmap), got a different one, {describe(v)}: "
                    f"gf.nn.stack(modules, buffers=True) returns them stacked, for functional_call(skeleton, "
                    f"(points, buffers), args)."
                )


def _stack_buffers(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """The modules' own buffers stacked along a new leading dimension (Note [Buffers of an ensemble])."""
    bs = [_buffers(m) for m in modules]
    for i, b in enumerate(bs[1:], 1):
        if b.keys() != bs[0].keys() or any(b[k].shape != bs[0][k].shape for k in b):
            raise ManifoldError(f"stack: expected the buffers of module 0 "
                                f"({[(k, tuple(v.shape)) for k, v in bs[0].items()]}) in module {i}, got "
                                f"{[(k, tuple(v.shape)) for k, v in b.items()]}.")
    return {k: torch.stack([b[k].detach() for b in bs]) for k in bs[0]}


# Note [Averaging constrained modules]
# An average of raw tensors and bases is not an average of points: bases are not a vector space
# (an average of Stiefel frames is not a frame: forward refuses it, Note [Bases checked where they
# change]), and raw tensors of different charts (after update_base) mean different points, so
# AveragedModel and an average of state_dicts are wrong for constrained tensors. average_ averages
# the points (the weights) in the ambient space and assigns their projection onto the space (the
# extrinsic mean; for a convex space, PSD or Birkhoff, the average itself), which re-centres the
# target's chart at it; other tensors are averaged entrywise, as AveragedModel(use_buffers=True)
# does. The weights are those of an average (an EMA, a model soup): non-negative, summing to 1. A
# negative one (an extrapolation, [2, −1]) was taken, and made BatchNorm's running_var negative
# (2·1 − 3 = −1: NaN outputs in eval): an entrywise combination with a negative weight leaves the
# convex sets such tensors live in (variances ≥ 0), and no space projects a buffer back.
# The projection is the adapter's ``_project``: the space's, and for GeoTorch's classes, whose
# in_manifold can be stricter than the space (GeoTorch's bounds 1e-5, 1e-6 on the kept values, above
# float64's floor), the nearest point the class accepts (Note [Averages the class accepts]).


def _weights(weights: Any) -> list[float]:
    """``average_``'s weights as Python floats: a sequence (a NumPy array, a tensor) of real numbers. A
    string or a bool entry was read by float() ('0.5' as 0.5; 'a' raised "could not convert string to
    float"), a number alone raised "'float' object is not iterable"."""
    try:
        items = list(weights)
    except TypeError:
        raise ManifoldError(f"average_: expected `weights` to be a sequence of numbers (one per module), got "
                            f"{describe(weights)}.") from None
    out = []
    for i, x in enumerate(items):
        try:
            v = None if isinstance(x, (str, bytes, bool)) else float(x)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
            v = None
        if v is None:
            raise ManifoldError(f"average_: expected weight {i} to be a real number, got {describe(x)}.")
        out.append(v)
    return out


def average_(target: ModuleT, modules: Sequence[nn.Module], weights: Iterable[SupportsFloat] | None = None) -> ModuleT:
    """Set ``target``'s tensors to the weighted average of ``modules``' (the same architecture and
    constraints), in place; returns ``target``.

    A constrained tensor gets ``space.project(Σ wᵢ Wᵢ)`` of the modules' weights (the points, not
    their raw tensors or bases: Note [Averaging constrained modules]; for GeoTorch's classes, a kept
    value below the bound of their ``in_manifold`` lifted to twice it: Note [Averages the class
    accepts] in ``_manifolds.py``), assigned as ``target.<name> = ...`` (so its chart is re-centred
    there); every other floating parameter and buffer (BatchNorm's
    statistics too) ``Σ wᵢ tᵢ``; other buffers (``num_batches_tracked``) are the last module's.
    ``target`` may be one of ``modules``. An exponential moving average of a model that is rebased
    during training::

        ema = copy.deepcopy(model)
        ...  # after each optimizer step:
        gf.nn.average_(ema, [ema, model], [0.999, 0.001])

    and a model soup: ``gf.nn.average_(soup, models)``.

    Args:
        target: the module written to.
        modules: the modules averaged (at least one).
        weights: one non-negative number per module, summing to 1 (a list, a tensor, a NumPy array);
            default: uniform.

    Raises:
        ManifoldError: no modules, weights of another length, negative or not summing to 1, or a module whose
            tensors or constraints differ from ``target``'s; ``InManifoldError`` where the
            assignment refuses a projected point (``target`` is then left as it was);
            ``ManifoldError`` where a constrained tensor's raw Parameter of ``target`` is tied to
            another name (Note [Tied raw tensors]).
    """
    _need_module(target, "average_", "target")
    modules = list(modules)
    if not modules:
        raise ManifoldError("average_: expected at least one module to average, got none.")
    for i, m in enumerate(modules):
        _need_module(m, "average_", f"module {i}")
    w = [1.0 / len(modules)] * len(modules) if weights is None else _weights(weights)
    if len(w) != len(modules):
        raise ManifoldError(f"average_: expected {len(modules)} weights (one per module), got {len(w)}.")
    if not abs(sum(w) - 1.0) <= 1e-6:
        raise ManifoldError(f"average_: expected weights summing to 1, got {w} (sum {sum(w)}).")
    negative = [i for i, v in enumerate(w) if v < 0]
    if negative:  # Note [Averaging constrained modules]: a weighted average, a convex combination
        raise ManifoldError(f"average_: expected non-negative weights (a convex combination, as an EMA or a model "
                            f"soup), got weight {negative[0]} = {w[negative[0]]} in {w}.")
    _refuse_tied_raw(target, "average_")  # the assignment re-centres the chart: the tied name's value would jump
    ours = _geofunc_tensors(target)
    theirs = [_geofunc_tensors(m) for m in modules]
    for i, t in enumerate(theirs):
        if t.keys() != ours.keys() or any(t[k][2].space != ours[k][2].space for k in ours):
            raise ManifoldError(
                f"average_: expected module #{i} constrained as the target "
                f"({sorted((k, v[2].space) for k, v in ours.items())}), got one constrained differently: "
                f"{sorted((k, v[2].space) for k, v in t.items())}."
            )
    inner = re.compile(r"(^|\.)parametrizations\.")
    plain_t = {n: t for n, t in _plain_tensors(target) if not inner.search(n)}
    plain_m = [dict(_plain_tensors(m)) for m in modules]
    for i, d in enumerate(plain_m):
        missing = [n for n in plain_t if n not in d or d[n].shape != plain_t[n].shape]
        if missing:
            raise ManifoldError(f"average_: expected module #{i} to have the target's tensors (and their shapes), "
                                f"got one that lacks {missing}.")
    with torch.no_grad():
        # every new value first: target may be one of the modules
        # Note [Averages of sharded modules]
        # Under FSDP2 a weight read outside forward, a bias, are DTensors (and the modules may be
        # sharded differently, an EMA kept whole beside a sharded model): the class's in_manifold took
        # the projected DTensor with a plain identity (torch's "mixed torch.Tensor and DTensor"), and a
        # sum of a plain and a DTensor fails alike. Every value is gathered first (full_tensor: a
        # collective, every rank averages), averaged whole, and written back as its target's kind:
        # the point by the assignment (Note [Assignments to a sharded tensor]), the rest by _as_target.
        points = {}
        for k, (sub, tname, adapter) in ours.items():
            W = sum(wi * gather(getattr(t[k][0], t[k][1])) for wi, t in zip(w, theirs))
            points[k] = adapter._project(W)  # for GeoTorch's classes, a point in_manifold accepts
        others = {}
        for n, t in plain_t.items():
            if t.is_floating_point() or t.is_complex():
                others[n] = sum(wi * gather(d[n]) for wi, d in zip(w, plain_m))
            else:
                others[n] = gather(plain_m[-1][n]).clone()
        saved = {k: v.clone() for k, v in target.state_dict().items()}
        try:
            for n, v in others.items():
                plain_t[n].copy_(_as_target(v, plain_t[n]) if _is_dtensor(plain_t[n]) else v)
            for k, (sub, tname, _) in ours.items():
                setattr(sub, tname, points[k])  # may refuse a point (InManifoldError)
        except BaseException:
            target.load_state_dict(saved)  # all or nothing
            raise
    return target


def _plain_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())
