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
``stack_module_state`` refuses parametrized modules).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils import parametrize

from .._errors import ManifoldError
from ._adapter import Parametrization, _owner_name

__all__ = ["functional", "plain", "stack", "module_state", "load_functional"]

Tensor = torch.Tensor

_ORIGINAL = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _geofunc_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, Parametrization]]:
    """Plain name -> (owner module, tensor name, adapter) for every parametrized tensor of ``module``."""
    out = {}
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for tname, plist in sub.parametrizations.items():
            key = f"{prefix}.{tname}" if prefix else tname
            if len(plist) != 1 or not isinstance(plist[0], Parametrization) or not plist.is_tensor:
                raise ValueError(
                    f"{key} ({_owner_name(sub, tname)}) is parametrized by {[type(p).__name__ for p in plist]}: "
                    "the functional bridge supports tensors parametrized by exactly one geofunc Parametrization."
                )
            if not plist[0]._identity_raw:
                raise ValueError(
                    f"{key} ({_owner_name(sub, tname)}) is parametrized by {plist[0]!r}, whose raw tensor is not its "
                    "space's (SO(lower=False) reads the upper triangle): use lower=True for the functional bridge."
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


def plain(module: nn.Module) -> nn.Module:
    """An unparametrized deep copy of ``module``: each constrained tensor becomes a plain tensor of the
    same name holding its current value. Its parameter names are the keys of :func:`functional`'s ``raw``.
    """
    replica = copy.deepcopy(module)
    for sub in list(replica.modules()):
        if parametrize.is_parametrized(sub):
            for tname in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, tname, leave_parametrized=True)
    return replica


def module_state(module: nn.Module, raw: dict[str, Tensor], bases: dict[str, Any]) -> dict[str, Tensor]:
    """Translate ``raw`` and ``bases`` (plain names) back to the parametrized module's own names.

    ``torch.func.functional_call(module, module_state(module, raw, bases), args)`` then runs the
    module's own parametrizations on ``raw`` and ``bases`` (``"0.weight"`` becomes
    ``"0.parametrizations.weight.original"``, its base ``"0.parametrizations.weight.0.base"``).
    """
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
    return out


def load_functional(module: nn.Module, raw: dict[str, Tensor], bases: dict[str, Any] | None = None) -> nn.Module:
    """Write ``raw`` (and ``bases``) from functional training back into the module, in place.

    The inverse of :func:`functional`: parameters keep their identity (optimizers keep
    tracking them), only their values change.
    """
    with torch.no_grad():
        for key, value in module_state(module, raw, bases or {}).items():
            target = module.get_parameter(key) if key in dict(module.named_parameters()) else module.get_buffer(key)
            target.copy_(value)
    return module


def stack(modules: Sequence[nn.Module]) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any], nn.Module]:
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
        base_module: an unparametrized copy of ``modules[0]`` (see :func:`plain`).

    Raises:
        ValueError: the modules differ in constraints, names or shapes.
    """
    modules = list(modules)
    if not modules:
        raise ValueError("stack needs at least one module")
    triples = [functional(m) for m in modules]
    c0, r0, b0 = triples[0]
    for i, (c, r, b) in enumerate(triples[1:], 1):
        if c != c0:
            raise ValueError(f"stack: module {i} has constraints {c}, module 0 has {c0}")
        if r.keys() != r0.keys() or any(r[k].shape != r0[k].shape for k in r0):
            raise ValueError(
                f"stack: module {i} has parameters {[(k, tuple(v.shape)) for k, v in r.items()]}, "
                f"module 0 has {[(k, tuple(v.shape)) for k, v in r0.items()]}"
            )
        if pytree.tree_structure(b) != pytree.tree_structure(b0):
            raise ManifoldError(f"stack: module {i} has bases of another structure than module 0")

    def stacked(*xs: Any) -> Any:
        if xs[0] is None:
            return None
        return torch.stack([x.detach() for x in xs])

    raw = {}
    for k in r0:
        raw[k] = torch.stack([r[k].detach() for _, r, _ in triples]).requires_grad_(r0[k].requires_grad)
    bases = pytree.tree_map(stacked, b0, *[b for _, _, b in triples[1:]])
    return dict(c0), raw, bases, plain(modules[0])
