"""One ``torch.nn.utils.parametrize`` adapter around any geofunc space, and the machinery around it.

:class:`Parametrization` is the only stateful object of geofunc: it holds a space (a frozen bag
of hyperparameters) and the space's ``base`` as buffers, so that ``state_dict``, ``.to()``,
``DistributedDataParallel`` and ``torch.save`` treat the base like any other buffer.

* ``forward(Z) = space.to_manifold(Z, base)``;
* ``right_inverse(X)``: ``(Z, base) = space.from_manifold(X)`` (which raises ``ManifoldError`` off
  the space), then the base buffers are overwritten in place and ``Z`` is returned; nothing is
  written before every check has passed, so a failed assignment leaves the module unchanged.

:func:`constrain` registers it on a module (the GeoTorch one-liners in ``_constraints.py`` are
thin wrappers), :func:`update_base` re-centres the chart (dynamic trivialization), and the
parametrized class that PyTorch swaps in is made picklable (``torch.save`` of a whole module).
"""

from __future__ import annotations

import copy
import itertools
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils import parametrize
from torch.optim import optimizer as _torch_optimizer
from torch.utils._python_dispatch import _disable_current_modes

from .._dtensor import DTensor, gathered, like
from .._fastpath import dispatch_mode_active, fake_mode_active
from .._errors import ManifoldError, describe, not_dense
from ..spaces._base import LOW_PRECISION, AbstractSpace, _readable, shapes_only
from ..spaces._product import Product
from ..spaces._values import softplus_inverse

#: A module type: the functions that constrain a module in place return it with its own type.
ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = [
    "Parametrization", "attach", "constrain", "update_base", "cached", "is_constrained", "parametrization_of", "refine_base",
]

Tensor = torch.Tensor


def _owner_name(module: nn.Module, tensor_name: str) -> str:
    return f"{parametrize.type_before_parametrizations(module).__name__}.{tensor_name}"


def _from_manifold(space: AbstractSpace, X: Tensor) -> tuple[Tensor, Any]:
    """``space.from_manifold(X)``; on the ``meta`` device (deferred initialization: a module built
    under ``torch.device("meta")``, then ``to_empty`` and ``load_state_dict``) only the shape is
    checked, as there are no values to check."""
    if shapes_only(X):  # (or a FakeTensor: Note [Fake parameters] in geofunc/spaces/_base.py)
        space._check_shape(X, "X")
        return space._from_manifold(X)
    return space.from_manifold(X)


# Note [Bases across dtypes]
# A base buffer holds a point (or frames) to the accuracy of the dtype it was computed in. Cast to
# a more precise dtype (``.double()``, a bf16 -> float32 round trip), it keeps the old rounding: a
# float32 frame is orthonormal to ~1e-7, off the float64 tolerance 1e-9, and every point the chart
# gives from it (and, through ``right_inverse``, every point assigned from those) stays that far
# off for good. So a base is re-made valid in its dtype whenever it is not valid there with a
# margin (violation above a quarter of ``default_atol`` of its dtype): after every dtype change
# of the module (``Parametrization._apply``), after loading a base saved in another dtype that was
# valid there (``Parametrization._load_from_state_dict``), and in ``update_base``. The point moves
# by the base's error, i.e. by the rounding of the dtype the base came from, which is all the
# accuracy the old point had anyway. A valid base is left bit for bit as it is.
#
# What a base is, each space says (``_base_kind`` and ``AbstractSpace._refine_base``, the second output of
# its ``_from_manifold``): frames, orthonormalized by the polar factor (which keeps the sign of a
# square frame's determinant: SO's det +1, the det -1 component GeoTorch's SO class accepts, GLp's
# det U det V = 1), for the orthogonal family and the rank/PSD family's U, V or Q; the point itself,
# re-made by ``project``, for Sphere, Oblique, Lorentz, PoincareBall and Birkhoff; the factors' for
# Product, GLp's for SL, PSD's for Hurwitz. A space that does not say (one outside geofunc) keeps
# its base as is, with a warning on a dtype change (its points keep the old dtype's accuracy).


def refine_base(space: AbstractSpace, base: Any, *, force: bool = False) -> Any:
    """``base`` re-made valid at the accuracy of its own dtype (Note [Bases across dtypes]): the space's
    ``_refine_base``, or ``base`` as it is where the space cannot tell."""
    out = space._refine_base(base, force)
    return base if out is NotImplemented else out


# The raw tensor (``parametrizations.<name>.original``) of a GeoTorch class registered directly with
# ``register_parametrization``, where known for sure (Note [Raw tensors across dtypes]): the Parameter
# torch hands ``right_inverse`` at registration, confirmed when torch then evaluates the class on that
# same Parameter; forgotten (the adapter is then "lost") when the class is evaluated on another
# Parameter (FSDP2's unsharded copy, ``functional_call``, a replaced raw tensor), so that a stale one
# is never written to. Strong references: a weak reference on a tensor makes ``torch.utils.swap_tensors``
# (``torch.__future__.set_swap_module_params_on_conversion``, DTensor parameters) refuse it.
_RAW: "weakref.WeakKeyDictionary[nn.Module, Tensor]" = weakref.WeakKeyDictionary()
_TENTATIVE: "weakref.WeakKeyDictionary[nn.Module, Tensor]" = weakref.WeakKeyDictionary()
_LOST: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# Adapters registered by ``attach``: their constrained module's own ``_apply`` converts their raw tensors.
_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# ids of the adapters whose raw tensors a constrained module's own ``_apply`` is converting.
_HANDLED: set[int] = set()
# The raw Parameter a GeoTorch class was last evaluated on (Note [update_base on the class] in
# ``_manifolds.py``), weakly; a constrained module's ``_apply`` holds them strongly while it converts
# (``torch.utils.swap_tensors`` refuses a tensor with a weak reference).
_LAST_RAW: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# The ParametrizationList whose raw tensor an adapter registered by ``attach`` (or restored with its
# module from a copy or a pickle) reads, weakly (Note [update_base on the class] in ``_manifolds.py``).
_OWN_CHAIN: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# Adapters that attach appended to a chain (not its first parametrization): their raw tensor is the
# previous parametrizations' output, which no dtype change can re-express (Note [Chained values across dtypes]).
_CHAINED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def own_raw(adapter: nn.Module) -> Tensor | None:
    """The raw tensor of the chain ``adapter`` was registered on (its module's own, whatever forward last
    saw), or None where unknown (a class registered with ``register_parametrization`` directly)."""
    ref = _OWN_CHAIN.get(adapter)
    plist = ref() if ref is not None else None
    if plist is None or not len(plist) or plist[0] is not adapter:
        return None
    return plist._parameters.get("original", plist._buffers.get("original"))


# Note [One adapter, one tensor]
# An adapter holds the base of one tensor's chart in its buffers, and right_inverse writes it. torch's
# transfer_parametrizations_and_params (re-exported as geofunc.nn.parametrize's) registers the source's
# adapter object itself on the target, so torch calls right_inverse on the target's weight: where that
# was a point of the space, the shared base was re-centred at it while the source's raw tensor stayed,
# and the source's weight moved silently (an orthogonal 5×5 layer: to another orthogonal matrix; then
# torch's set_ of the raw tensor gave the target that same wrong weight too); where it was not, the
# transfer raised InManifoldError about the target's weight. Registering one adapter on a second tensor
# (register_parametrization(other, "weight", layer.parametrizations.weight[0])) did the same. So an
# adapter still registered on a live chain refuses to be registered on another tensor, before anything
# is written. Known for adapters registered by attach (every constraint function, constrain) and for
# their deep copies and unpickled copies; a class registered directly with register_parametrization is
# not tracked so (its old module may be gone while its registry entry lives).
def _refuse_second_registration(adapter: nn.Module, X: Tensor, space: Any) -> None:
    """Raise ``ManifoldError`` if ``adapter`` is registered on a live chain whose raw tensor is not ``X``."""
    Z = own_raw(adapter)
    if Z is not None and Z is not X:
        raise ManifoldError(
            f"{adapter.where} constrained to {space!r}: expected a parametrization registered on one tensor, got one "
            f"already registered on another (its raw tensor of shape {tuple(Z.shape)}): its base buffers would be "
            f"shared and re-centred, silently moving the first tensor's weight. Copy the whole module "
            f"(copy.deepcopy), or constrain the new tensor with its own constraint function and load the source's "
            f"state_dict (torch's transfer_parametrizations_and_params shares the object and is not supported)."
        )


# Note [Copies keep what is known of the raw tensor]
# The registries above are keyed by the adapter object, so a copy of an adapter (``copy.deepcopy`` of a
# module whose GeoTorch class was registered directly: an EMA copy, ``AveragedModel``; ``pickle`` or
# ``torch.save`` of the class or of a module geofunc made picklable) was in none of them: its ``_apply``
# neither re-expressed its raw tensor nor warned, and ``.double()`` of the copy silently moved every
# value by the difference of the floors of "softplus" (2e-4 to 3.5e-4 for FixedRank, GLp, PSD), where
# the original moved by rounding. An adapter's pickled state (which ``deepcopy`` copies too) therefore
# carries its entry: which registry it is in and the tensor recorded there, which the copy machinery
# maps to the copy's own tensor (the raw Parameter of the copied ParametrizationList: deepcopy's memo
# and pickle's memo keep one copy per object), and ``__setstate__`` records the copy alike, so that
# ``copy.deepcopy(model).double()`` converts the copy's raw tensor at once. A copy of the adapter alone
# copies that tensor too (a Parameter nobody uses); such a copy is then registered on another module
# (torch hands its ``right_inverse`` the new Parameter), so a copy whose raw tensor was never
# confirmed by an evaluation (``_COPIED``) takes a registration as a fresh one (tentative, as any
# registration), where a confirmed adapter ignores it (an assigned Parameter is copied into the raw
# tensor it has). Evaluated on yet another tensor, a copy becomes "lost" and warns on a dtype change,
# as the original would.
_RECORD = "_geofunc_raw_record"
_COPIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _record_of(adapter: nn.Module) -> tuple:
    """``(kind, tensor, last)``: the registry ``adapter`` is in, the tensor recorded there (or None),
    and whether the raw tensor it was last evaluated on is that tensor (Note [Copies keep what is known
    of the raw tensor])."""
    if (tensor := _RAW.get(adapter)) is not None:  # (get, not `in` then [ ]: Note [Registries shared by threads])
        kind = "raw"
    elif (tensor := _TENTATIVE.get(adapter)) is not None:
        kind = "tentative"
    elif adapter in _ATTACHED:
        kind, tensor = "attached", None
    elif adapter in _LOST:
        kind, tensor = "lost", None
    elif adapter in _CHAINED:
        kind, tensor = "chained", None
    else:
        kind, tensor = None, None
    ref = _LAST_RAW.get(adapter)
    last = tensor is not None and ref is not None and ref() is tensor
    return kind, tensor, last


def _restore_record(adapter: nn.Module, record: tuple) -> None:
    kind, tensor, last = record
    if kind == "raw" and tensor is not None:
        _RAW[adapter] = tensor
        _COPIED.add(adapter)  # until an evaluation on it confirms it
    elif kind == "tentative" and tensor is not None:
        _TENTATIVE[adapter] = tensor
    elif kind == "attached":
        _ATTACHED.add(adapter)
    elif kind == "lost":
        _LOST.add(adapter)
    elif kind == "chained":
        _CHAINED.add(adapter)
    if last:
        _LAST_RAW[adapter] = weakref.ref(tensor)


def _note_registration(adapter: nn.Module, X: Tensor) -> None:
    """``right_inverse`` was handed a Parameter: maybe the one being registered (confirmed by :func:`_note_raw`)."""
    if _COPIED and adapter in _COPIED:  # a copy registered anew (Note [Copies keep what is known of the raw tensor])
        _COPIED.discard(adapter)
        _RAW.pop(adapter, None)
    if adapter not in _RAW and adapter not in _ATTACHED:
        _TENTATIVE[adapter] = X


# Note [Registries shared by threads]
# The registries above are module-level, and forward updates them: threads that evaluate one module at
# once (a serving pool over a shared model, functional_call with other Parameters in each thread) run
# _note_raw on the same adapter concurrently. Each dict operation is atomic, but a test and a later
# `del` are not: two threads that both found the adapter in _RAW both deleted it, and the second raised
# KeyError out of the module's forward (a probe, 8 threads: a few in a few thousand calls). Entries are
# therefore removed with pop(key, None) and read with get, never `in` then [ ]; what the threads write
# is the same either way (the adapter is "lost", or "raw" with the Parameter both saw), so no lock.
def _note_raw(adapter: nn.Module, Z: Tensor) -> None:
    """``forward`` was evaluated (eagerly) on the Parameter ``Z``."""
    known = _RAW.get(adapter)
    if known is Z:
        if _COPIED and adapter in _COPIED:
            _COPIED.discard(adapter)
        return
    if known is None and _TENTATIVE.get(adapter) is Z:
        _RAW[adapter] = Z
        _TENTATIVE.pop(adapter, None)  # (not del: Note [Registries shared by threads])
    elif known is not None:
        _RAW.pop(adapter, None)
        _COPIED.discard(adapter)
        _LOST.add(adapter)


def _filled(template: Any, buffers: Any) -> Any:
    """The base: ``template`` (a buffer name, None, or tuples of them) with each name replaced by its
    buffer. Written out, not torch's ``pytree.tree_map``, whose recursive helper left a reference cycle of
    7 objects per constrained forward for the cyclic collector."""
    if template is None:
        return None
    if isinstance(template, str):
        return buffers[template]
    if type(template) is tuple:
        return tuple(_filled(t, buffers) for t in template)
    return pytree.tree_map(lambda n: None if n is None else buffers[n], template)


def _names_in(template: Any) -> list[str]:
    """The buffer names of a base template, in leaf order (as ``_filled``, without a pytree call)."""
    if template is None:
        return []
    if isinstance(template, str):
        return [template]
    if type(template) is tuple:
        return [n for t in template for n in _names_in(t)]
    return [n for n in pytree.tree_leaves(template) if n is not None]


def _raw_missing(prefix: str, args: tuple) -> bool:
    """Whether the raw tensor of the ParametrizationList above ``prefix`` (``<tensor>.<index>.``) was missing
    from the checkpoint (strict=False): the parent loaded first and recorded it in ``missing_keys``, and
    the raw tensor then still holds the module's own values, not a checkpoint's to re-express."""
    missing = args[2] if len(args) > 2 and isinstance(args[2], list) else ()
    parent = prefix[:-1].rpartition(".")[0]
    return (parent + "." if parent else "") + "original" in missing


class Parametrization(nn.Module):
    """A geofunc space as a ``torch.nn.utils.parametrize`` parametrization.

    Args:
        space: any geofunc space (an ``AbstractSpace`` instance).
        base: the base the chart is centred at, as returned by ``space.from_manifold``: ``None``,
            a tensor or a pytree (tuple, dict, ...) of tensors and ``None``. Its tensors become the
            buffers ``base`` (a single tensor) or ``base0``, ``base1``, ... (in pytree leaf order).
        where: what the parametrization constrains, e.g. ``"Linear.weight"``, for error messages.
        shape: the shape of the constrained tensor; assignments of another shape are refused.
    """

    #: Whether ``forward``'s input is the space's own raw tensor (the functional bridge needs it).
    _identity_raw = True
    #: Registered directly with ``register_parametrization`` (not by :func:`attach`): its ``_apply`` then
    #: re-expresses the raw tensor itself, as the GeoTorch classes' (Note [Raw tensors across dtypes]).
    _direct_raw = False

    def __init__(self, space: AbstractSpace, base: Any = None, *, where: str = "tensor", shape: Any = None) -> None:
        super().__init__()
        if not isinstance(space, AbstractSpace):
            raise TypeError(f"Parametrization expects a geofunc space, got {space!r}")
        self.space = space
        self.where = where
        self.shape = None if shape is None else tuple(shape)
        self._adopt_base(base)

    def _adopt_base(self, base: Any) -> None:
        """Make the buffers of ``base`` (``base``, or ``base0``, ``base1``, ... in pytree leaf order) and the
        template of its structure: at construction, or at registration where the adapter was built
        without a base (Note [A parametrization built without its base])."""
        leaves = [leaf for leaf in pytree.tree_leaves(base) if leaf is not None]
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{self.space!r}: a base must be a pytree of tensors, got a leaf {leaf!r}")
        names = ["base"] if len(leaves) == 1 else [f"base{i}" for i in range(len(leaves))]
        it = iter(names)
        # The structure of the base with every tensor replaced by its buffer name (picklable).
        self._template = pytree.tree_map(lambda leaf: None if leaf is None else next(it), base)
        for name, leaf in zip(names, leaves):  # contiguous: Note [Contiguous bases]
            self.register_buffer(name, leaf.detach().clone(memory_format=torch.contiguous_format))

    # -------------------------------------------------------------------- copies
    def __getstate__(self) -> dict:
        """``nn.Module``'s state, with the adapter's entry in the raw-tensor registries (Note [Copies
        keep what is known of the raw tensor]); ``deepcopy`` copies it as well."""
        state = super().__getstate__()
        record = _record_of(self)
        if record[0] is not None:
            state[_RECORD] = record
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        record = state.pop(_RECORD, None)
        super().__setstate__(state)
        self._contiguous_bases()  # a module pickled by an earlier geofunc (Note [Contiguous bases])
        if record is not None:
            _restore_record(self, record)

    # Note [Scripted by torch.jit.script]
    # TorchScript compiles a module's forward from its source, and neither torch.nn.utils.parametrize
    # nor a space's maps (pytrees, dataclasses, value-dependent schedules, torch.library operators) are
    # scriptable: torch.jit.script of a constrained module failed deep inside, on a line of geofunc's
    # source ("Unknown type name 'nn.Parameter'"; once that had happened in a process, "Can't redefine
    # method: forward on class ...Parametrization" for every later module), naming neither the tensor nor
    # a way out. torch.jit.script asks each submodule's __prepare_scriptable__ first: this one refuses
    # with what to use instead (torch 2.13 deprecates torch.jit.script too).
    def __prepare_scriptable__(self) -> "Parametrization":
        raise ManifoldError(
            f"{self.where} constrained to {self.space!r}: expected to be captured by torch.export.export "
            "(strict or not) or run by torch.compile, got torch.jit.script, which cannot compile "
            "torch.nn.utils.parametrize or geofunc's maps. Export the model with torch.export.export(model, "
            "args) (README: geofunc.nn, deployment), or script gf.nn.plain(model), whose weights are plain tensors."
        )

    # -------------------------------------------------------------------- base
    def get_base(self) -> Any:
        """The current base, rebuilt from the buffers (``None`` for spaces without one)."""
        return _filled(self._template, self._buffers)

    def _set_base(self, base: Any) -> None:
        """Overwrite the base buffers in place (the caller has validated ``base``: forward need not
        check it again, Note [Bases checked where they change])."""
        with torch.no_grad():
            for name, leaf in zip(pytree.tree_leaves(self._template), pytree.tree_leaves(base)):
                if name is not None:
                    getattr(self, name).copy_(leaf)
        if not torch.compiler.is_compiling():  # Note [update_base in compiled code]
            _note_checked(self, self._base_buffers())

    def _base_names(self) -> list[str]:
        return _names_in(self._template)

    def _contiguous_bases(self) -> None:
        """Replace each base buffer that is not contiguous by a contiguous copy (Note [Contiguous bases])."""
        for name in self._base_names():
            t = self._buffers.get(name)
            if t is not None and not t.is_contiguous():
                self._buffers[name] = t.contiguous()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Parametrization":
        """``nn.Module._apply`` (``.to()``, ``.double()``, ``.float()``, ...), then, if a base buffer
        changed dtype, the base re-made valid in its new dtype (Note [Bases across dtypes]): the
        point moves by the old dtype's rounding. The raw tensor (owned by the enclosing
        ``ParametrizationList``, converted after this module) is re-expressed in the new dtype's
        coordinates by the constrained module, or here for a GeoTorch class registered directly with
        ``register_parametrization`` (Note [Raw tensors across dtypes])."""
        before = {n: self._buffers[n].dtype for n in self._base_names() if self._buffers.get(n) is not None}
        # Note [Swapped raw tensors of a class registered directly]
        # Under torch's swap semantics (torch.__future__.set_swap_module_params_on_conversion(True)), which
        # DTensor parameters always take, the enclosing ParametrizationList swaps its raw Parameter after this
        # _apply, and torch.utils.swap_tensors refuses a tensor with a weak reference: the one forward leaves
        # in _LAST_RAW (Note [update_base on the class] in _manifolds.py). A constrained module's own _apply
        # lifts it while it converts; a class registered directly with register_parametrization has none,
        # so after one forward its module's .double() / .to() raised "_apply(): Couldn't swap
        # ParametrizationList.original". The reference is dropped here (the next forward records it again).
        if id(self) not in _HANDLED:
            _LAST_RAW.pop(self, None)
        # A GeoTorch class registered directly with register_parametrization: no constrained-module
        # override converts its raw tensor (Note [Raw tensors across dtypes]); it is re-expressed here.
        handled = id(self) in _HANDLED or not self._identity_raw
        raw = None if handled else _RAW.get(self)
        view = self.space._dtype_coords(raw) if raw is not None and _concrete(raw) else None
        old = raw.dtype if view is not None else None
        if view is not None:
            view = view.detach().clone()
        out = super()._apply(fn, recurse)
        _forget_replaced_bases(self)  # Note [Replaced bases are not kept]
        self._contiguous_bases()  # .to(memory_format=torch.channels_last) of a 4-d base (Note [Contiguous bases])
        moved = [n for n, d in before.items() if self._buffers[n] is not None and self._buffers[n].dtype != d]
        new = self._buffers[moved[0]].dtype if moved else None
        if view is not None and moved and raw.dtype == old and new != old:
            # Not converted yet: ParametrizationList._apply converts its parameters after its children, so
            # the coordinates of the new dtype are written now, in the old dtype, and torch casts them.
            _write_values(self.where, self.space, self.space._dtype_coords(raw), view, old, new)
        elif (moved and not handled and raw is None and self in _CHAINED and self._moves_with_floor(before[moved[0]], new)):
            warnings.warn(_chained_message(self, before[moved[0]], new), stacklevel=2)  # Note [Chained values across dtypes]
        elif (moved and not handled and raw is None and (self in _LOST or self in _TENTATIVE or self in _ATTACHED)
              and self._moves_with_floor(before[moved[0]], new)):
            warnings.warn(
                f"{self.where} constrained to {self.space!r}: its base changed dtype to {new} but geofunc.nn does not "
                "know its raw tensor (a class registered with register_parametrization, then evaluated on another "
                "tensor than the one registered; or .to() called on module.parametrizations rather than on the "
                "module), so the raw values are not re-expressed in the new dtype and every "
                f"value moves by the difference of the floors of \"softplus\" ({self.space._coords_floor(before[moved[0]]):.2g} -> "
                f"{self.space._coords_floor(new):.2g}). Use the geofunc.nn constraint functions or gf.nn.constrain, or assign the "
                "weight again after the cast.",
                stacklevel=2,
            )
        if moved and all(_readable(self._buffers[n]) for n in moved):
            if not self._refresh_base():
                warnings.warn(
                    f"{self.where} constrained to {self.space!r}: its base changed dtype to "
                    f"{self._buffers[moved[0]].dtype} and geofunc.nn cannot re-make the base of a space that is not "
                    "geofunc's valid in it; its points keep the accuracy of the old dtype. Assign a point of the "
                    "new dtype (module.<name> = space.project(module.<name>)) to re-centre the chart.",
                    stacklevel=2,
                )
        return out

    def _moves_with_floor(self, old: torch.dtype, new: torch.dtype) -> bool:
        """Whether this space's values mean other points in ``new`` than in ``old`` (the floors of "softplus")."""
        return (self.space._dtype_coords(torch.empty((2, 2) if self.shape is None else self.shape, device="meta")) is not None
                and self.space._coords_floor(old) != self.space._coords_floor(new))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """``nn.Module``'s, then: a base saved in another dtype and valid there is re-made valid in the
        buffers' dtype, as a dtype change of the module does (Note [Bases across dtypes]); one that was
        not valid even in its own dtype (an average of bases) is left as loaded, and forward refuses it
        (Note [Bases checked where they change]). GeoTorch's bases of a class registered directly are
        first replaced by geofunc's (Note [GeoTorch checkpoints] in ``_geotorch_checkpoints.py``)."""
        known = _RAW.get(self)
        raw = _TENTATIVE.get(self) if known is None else known
        assign = bool(args and args[0].get("assign_to_params_buffers", False))
        converted = False
        if raw is not None and _concrete(raw):
            from ._geotorch_checkpoints import convert_geotorch_bases

            converted = convert_geotorch_bases(self, raw, state_dict, prefix, assign)
        if known is not None and self not in _ATTACHED and not converted and not assign and not _raw_missing(prefix, args):
            self._reexpress_loaded_raw(known, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._contiguous_bases()  # assign=True of a checkpoint of an earlier geofunc (Note [Contiguous bases])
        saved = {n: state_dict.get(prefix + n) for n in self._base_names()}
        if not saved or not all(_concrete(t) for t in saved.values()):
            return
        if all(t.dtype == self._buffers[n].dtype for n, t in saved.items() if self._buffers.get(n) is not None):
            return
        base = pytree.tree_map(lambda n: None if n is None else saved[n], self._template)
        if self.space._invalid_base(base) is None:
            self._refresh_base()

    # Note [A class registered directly loads across dtypes]
    # A constrained module re-expresses a saved raw tensor of another dtype before torch casts it
    # (_load_keeping_points). A class registered directly has no such module: its ParametrizationList, the
    # class's parent, loads first and casts the saved raw tensor as torch casts it, so a float32 checkpoint
    # loaded into a float64 GLp/PSD/FixedRank/SL/PSSDFixedRank layer moved every value by the difference of
    # the floors of "softplus" (3.4e-4), silently, where .double() of the same layer moved it by rounding.
    # torch hands the class only its own entries (its bases), not the raw tensor's, so the saved raw
    # tensor's dtype is read from the saved bases, which follow their raw tensor's dtype in every
    # checkpoint geofunc writes (registration, .to(), load). The raw tensor (known for sure: _RAW) already
    # holds the cast values: exact for a cast to a wider dtype, rounded once to the new dtype otherwise;
    # they are re-expressed as a dtype change does (Note [Raw tensors across dtypes]).
    def _reexpress_loaded_raw(self, raw: Tensor, state_dict: dict, prefix: str) -> None:
        saved = [state_dict.get(prefix + n) for n in self._base_names()]
        if not saved or not all(_concrete(t) for t in saved) or not _concrete(raw):
            return
        old = saved[0].dtype
        if old.is_complex and not raw.is_complex():  # Note [Complex and real dtypes of a constrained module]
            raise ManifoldError(
                f"{self.where} constrained to {self.space!r}: expected the saved base {prefix}{self._base_names()[0]} "
                f"of a real dtype, as the module's ({raw.dtype}), got dtype {old}: a complex checkpoint has no real "
                "counterpart on the space. torch's ParametrizationList loaded the raw tensor before this class saw "
                "its entries (it dropped the imaginary parts), so the layer is not usable: load a checkpoint of its "
                "own dtype, or make the layer complex first.")
        if any(t.dtype != old for t in saved) or old == raw.dtype or saved[0].is_complex() != raw.is_complex():
            return
        view = self.space._dtype_coords(raw)
        if view is None:
            return
        _write_values(self.where, self.space, view, view.detach().to(old), old, raw.dtype)

    def _refresh_base(self) -> bool:
        """Re-make the base valid in its current dtype if it is not (Note [Bases across dtypes]); False
        where the space cannot tell what its base is."""
        with torch.no_grad():
            base = self.get_base()
            new = self.space._refine_base(base)
            if new is NotImplemented:
                return False
            if any(a is not b for a, b in zip(pytree.tree_leaves(base), pytree.tree_leaves(new))):
                self._set_base(new)
        return True

    def _check_base(self, base: Any) -> None:
        new = pytree.tree_structure(base)
        old = pytree.tree_structure(self._template)
        # torch's pytree reads None as a leaf: a template None where the base has a tensor is the same
        # structure to it, and _set_base would drop that tensor (Note [A parametrization built without its base])
        if new != old or any((n is None) != (b is None) for n, b in
                             zip(pytree.tree_leaves(self._template), pytree.tree_leaves(base))):
            raise ManifoldError(
                f"{self.where} constrained to {self.space!r}: expected a base of structure {old}, got {new}."
            )
        for name, leaf in zip(pytree.tree_leaves(self._template), pytree.tree_leaves(base)):
            if name is None:
                continue
            buf = getattr(self, name)
            if leaf.shape != buf.shape:
                raise ManifoldError(
                    f"{self.where} constrained to {self.space!r}: expected a base {name} of shape "
                    f"{tuple(buf.shape)}, got shape {tuple(leaf.shape)}."
                )

    # -------------------------------------------------------------------- maps
    # A sharded raw tensor (a DTensor: the parameter of a module under FSDP2, outside forward) is
    # gathered once and the results sharded like it; the base buffers are replicated plain tensors.
    @gathered
    def forward(self, Z: Tensor) -> Tensor:
        if self._direct_raw and isinstance(Z, nn.Parameter) and not torch.compiler.is_compiling():
            _note_raw(self, Z)  # Note [Raw tensors across dtypes]
        return self.space.to_manifold(Z, self.checked_base())

    def checked_base(self) -> Any:
        """:meth:`get_base`, checked on the space once per change of its buffers (Note [Bases checked
        where they change]); raises ``ManifoldError`` for a base off the space."""
        base = self.get_base()
        why = _base_problem(self, base)
        if why is not None:
            raise ManifoldError(
                f"{self.where} constrained to {self.space!r}: expected its base (buffers "
                f"{', '.join(self._base_names())}) on the space, as from_manifold, rebase and assignments leave "
                f"it, got {why}. An average of bases is not a base: AveragedModel(use_buffers=True) or an average "
                "of state_dicts averages them off the space. Average the points instead with "
                "gf.nn.average_(target, modules, weights) (an EMA: gf.nn.average_(ema, [ema, model], [d, 1 - d])), "
                "or assign a point (module.<name> = space.project(W)), or load a checkpoint's own bases. After "
                "to_empty (deferred initialization) the bases hold no values until then: assign each constrained "
                "tensor a point or load a checkpoint before reading it."
            )
        return base

    def _check_value(self, X: Any, registering: bool = False) -> None:
        """Type, shape and (unless ``registering``) the dtype and device of the base buffers; only
        real base buffers are compared (a space without a base takes any dtype, as GeoTorch's)."""
        space = self.space
        if not isinstance(X, torch.Tensor):
            raise ManifoldError(f"{self.where} constrained to {space!r}: expected a tensor, got {describe(X)}.")
        if not_dense(X):  # Note [Dense tensors only] in geofunc/spaces/_base.py
            raise ManifoldError(f"{self.where} constrained to {space!r}: expected a dense (strided) tensor, got {describe(X)}.")
        if self.shape is not None and tuple(X.shape) != self.shape:
            raise ManifoldError(
                f"{self.where} constrained to {space!r}: expected a tensor of shape {self.shape}, "
                f"got shape {tuple(X.shape)}."
            )
        ref = next(iter(self._base_buffers()), None)
        if ref is not None and not registering and (X.dtype != ref.dtype or X.device != ref.device):
            raise ManifoldError(self._dtype_message(X, ref))

    def _project(self, W: Tensor) -> Tensor:
        """The point ``average_`` assigns for the ambient ``W`` (Note [Averaging constrained modules] in
        ``_functional.py``): the space's ``project``."""
        return self.space.project(W)

    def _dtype_message(self, X: Tensor, ref: Tensor) -> str:
        return (f"{self.where} constrained to {self.space!r}: expected dtype {ref.dtype} on {ref.device}, "
                f"got dtype {X.dtype} on {X.device}.")

    def _dtype_error(self, X: Tensor, ref: Tensor) -> ManifoldError:
        """The error for an assignment of another dtype or device than the weight's (Note [Assignments of
        another dtype])."""
        return ManifoldError(self._dtype_message(X, ref))

    def _shape_message(self, X: Tensor, shape: tuple[int, ...]) -> str:
        return f"{self.where} constrained to {self.space!r}: expected a tensor of shape {shape}, got shape {tuple(X.shape)}."

    def _shape_error(self, X: Tensor, shape: tuple[int, ...]) -> ManifoldError:
        """The error for an assignment of another shape than the weight's (Note [Assignments of another
        shape])."""
        return ManifoldError(self._shape_message(X, shape))

    def _base_buffers(self) -> list[Tensor]:
        return [self._buffers[n] for n in self._base_names() if self._buffers.get(n) is not None]

    def _follow(self, X: Tensor) -> None:
        """At registration on a tensor of another dtype or device than the buffers (a class built in
        the default dtype, registered on a float64 weight without ``.to()``): re-make the buffers in
        the tensor's dtype and device, as ``.to()`` would (Note [Bases across dtypes]); the base is
        then overwritten with ``X``'s own, computed in ``X``'s dtype. Call only after every check has
        passed (a failed registration changes nothing)."""
        for name, buf in list(self._buffers.items()):
            if buf is None or not (buf.is_floating_point() or buf.is_complex()):
                continue
            if buf.dtype != X.dtype or buf.device != X.device:
                self._buffers[name] = buf.to(device=X.device, dtype=X.dtype, memory_format=torch.contiguous_format)

    @gathered
    def right_inverse(self, X: Tensor) -> Tensor:
        """Raw coordinates of the point ``X``; re-centres the base at ``X`` (mutates the buffers).

        Raises ``ManifoldError`` (and changes nothing) if ``X`` has the wrong shape, dtype or
        device, or lies off the space.
        """
        registering = isinstance(X, nn.Parameter)  # torch hands right_inverse the tensor being registered
        if registering:
            _refuse_second_registration(self, X, self.space)  # Note [One adapter, one tensor]
        self._check_value(X, registering)
        try:
            Z, base = _from_manifold(self.space, X)
        except ManifoldError as e:
            raise ManifoldError(f"{self.where}: {e}") from None
        if registering and not self._base_names() and any(b is not None for b in pytree.tree_leaves(base)):
            # Note [A parametrization built without its base]
            # `register_parametrization(layer, "weight", Parametrization(space))`, as GeoTorch's classes are
            # registered, builds the adapter without a base (None: the canonical chart). For a space whose
            # from_manifold returns one (Sphere, Stiefel, ...: (zeros, X)), its tensors had no buffer, and
            # _set_base dropped them silently: the weight was to_manifold(0, None), not the registered point,
            # and every later assignment was ignored alike. The base is adopted here, once, at registration
            # (torch calls right_inverse on the tensor being registered), where the adapter's state is made.
            self._adopt_base(base)
        self._check_base(base)
        if registering:
            self._follow(X)
            # Registered directly, its raw tensor is known as a GeoTorch class's is, so that a dtype change
            # re-expresses the values of "softplus" (a float32 GLp weight moved by 3.4e-4 under .double(),
            # without a warning); attach, which registers through here too, clears the flag.
            self._direct_raw = True
            _note_registration(self, X)
        self._set_base(base)
        # torch stores the result with ``original.set_(Z)``: never let it alias the caller's tensor.
        # Contiguous: a wide space's raw tensor is a transposed view, which FSDP2 cannot shard.
        return Z.detach().clone(memory_format=torch.contiguous_format)

    @gathered
    def rebase(self, Z: Tensor) -> Tensor:
        """Re-centre the chart at the current point ``to_manifold(Z, base)``; return the new ``Z``.
        The new base is re-made valid in its dtype if it is not (Note [Bases across dtypes])."""
        with torch.no_grad():
            Z2, base = self.space.rebase(Z, self.get_base())
            self._check_base(base)
            self._set_base(refine_base(self.space, base))  # valid in the current dtype (Note [Bases across dtypes])
        return Z2

    def extra_repr(self) -> str:
        return f"{self.space!r}, where={self.where!r}"


# ----------------------------------------------------------------------------- pickling
# ``register_parametrization`` swaps the module's class for a subclass created on the fly,
# which pickle cannot find by name, and torch makes ``__getstate__`` raise. For modules that
# geofunc constrains we give that class a reduction that rebuilds the module from its
# pre-parametrization class and its ``__dict__``, then re-injects the parametrized class and
# properties (fresh closures, so a deep copy does not share the original's cache key).


def _new_module(cls: type) -> nn.Module:
    return cls.__new__(cls)


# Note [Pickling constrained RNNs]
# nn.RNN/LSTM/GRU keep, besides their parameters, ``_flat_weights`` (the weights handed to the fused
# kernel) and ``_flat_weight_refs`` (weak references to them, to notice a replaced weight); after a
# forward, ``_flat_weights`` holds the constrained weights themselves, computed tensors. The module's
# ``__dict__`` could therefore be neither pickled (``torch.save(model)``: "cannot pickle
# 'weakref.ReferenceType' object", on every constrained RNN) nor deep-copied after a forward (torch
# refuses to deepcopy a non-leaf tensor). Both are derived state: the reduction leaves them out and the
# copy rebuilds them as registration leaves them, the raw tensor in place of each constrained weight
# and a weak reference to it, which the RNN's next forward sees as a changed weight and replaces by
# the constrained value (nothing is evaluated while copying).


def _state_of(module: nn.Module) -> dict:
    """``module.__dict__`` for pickling and deepcopy, less the derived state of an RNN (Note [Pickling
    constrained RNNs])."""
    state = module.__dict__
    if isinstance(module, nn.RNNBase) and "_flat_weights" in state:
        state = dict(state)
        state.pop("_flat_weight_refs", None)
        state["_flat_weights"] = [None] * len(state["_flat_weights"])
    return state


def _rebuild_flat_weights(obj: nn.Module) -> None:
    """An RNN's ``_flat_weights`` and ``_flat_weight_refs`` after unpickling (Note [Pickling constrained RNNs])."""
    if not isinstance(obj, nn.RNNBase) or "_flat_weights_names" not in obj.__dict__:
        return
    weights = []
    for name in obj._flat_weights_names:
        if parametrize.is_parametrized(obj, name):  # its raw tensor (the first, for weight_norm's two)
            weights.append(next(obj.parametrizations[name].parameters(), None))
        else:
            weights.append(obj._parameters.get(name))
    obj.__dict__["_flat_weights"] = weights
    obj.__dict__["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in weights]


def _restore_parametrized(obj: nn.Module, state: dict) -> None:
    obj.__setstate__(state)
    parametrize._inject_new_class(obj)
    for tensor_name in obj.parametrizations:
        parametrize._inject_property(obj, tensor_name)
    _rebuild_flat_weights(obj)
    _make_picklable(obj)
    for _, plist, M in _geofunc_plists(obj):  # its own _apply converts their raw tensors, as attach records
        _ATTACHED.add(M)
        _OWN_CHAIN[M] = weakref.ref(plist)
        _RAW.pop(M, None)
        _TENTATIVE.pop(M, None)
        _COPIED.discard(M)


def _reduce_ex(self: nn.Module, protocol: int):
    cls = parametrize.type_before_parametrizations(self)
    return (_new_module, (cls,), _state_of(self), None, None, _restore_parametrized)


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    if id(self) in memo:
        return memo[id(self)]
    replica = _new_module(parametrize.type_before_parametrizations(self))
    memo[id(self)] = replica
    _restore_parametrized(replica, copy.deepcopy(_state_of(self), memo))
    return replica


# Note [Shallow copies of constrained modules]
# The reduction above is a 6-tuple (its last entry a state setter, which pickle honours), but the copy
# module's _reconstruct takes no state setter: copy.copy of a constrained module raised "TypeError:
# _reconstruct() takes from 4 to 7 positional arguments but 8 were given", naming neither the module nor
# a way out. ``__copy__`` makes the shallow copy nn.Module's own copy.copy makes (a new object whose
# ``__dict__`` is a shallow copy: parameters, buffers and submodules, the ParametrizationList among
# them, are shared), with a parametrized class and properties of its own, as an unpickled module has.
def _copy(self: nn.Module) -> nn.Module:
    replica = _new_module(parametrize.type_before_parametrizations(self))
    _restore_parametrized(replica, dict(_state_of(self)))
    return replica


def _make_picklable(module: nn.Module) -> None:
    """Make the parametrized class of ``module`` picklable, let its dtype changes and
    ``load_state_dict`` keep its points (Note [Raw tensors across dtypes]), and let :func:`cached`
    see new raw tensors (Note [A cache that sees new raw tensors])."""
    cls = type(module)
    _check_cached_values(module)
    if cls.__dict__.get("__reduce_ex__") is not _reduce_ex:
        cls.__reduce_ex__ = _reduce_ex
        cls.__deepcopy__ = _deepcopy
        cls.__copy__ = _copy
    if cls.__dict__.get("_apply") is not _apply_keeping_points:
        cls._apply = _apply_keeping_points
        cls._load_from_state_dict = _load_keeping_points


# ----------------------------------------------------------------------------- contiguous bases
# Note [Contiguous bases]
# A frame's base comes out of from_manifold as a transposed view (column-major: stride (1, n)), and
# the buffers kept that layout. torch's set_model_state_dict(..., StateDictOptions(full_state_dict=True,
# broadcast_from_rank0=True)) broadcasts a tensor's storage in memory order into a contiguous tensor,
# so every rank but 0 received the transpose of each base: for a square frame (orthogonal n x n,
# PSD's eigenvectors) still a valid base, so no error, and the ranks computed different functions
# (2.2 apart on one input; a probe); for a tall frame rank 1 alone raised ManifoldError while rank 0
# waited in a collective. The raw tensors were already contiguous (FSDP2 refuses others). So a
# base buffer is contiguous wherever one is made or replaced: at construction (a contiguous clone),
# when registration re-makes the buffers in the weight's dtype (_follow), after every _apply (a
# dtype change keeps the layout; .to(memory_format=torch.channels_last) would change a 4-d one),
# after load_state_dict (assign=True puts the saved tensor itself in place: one saved by an earlier
# geofunc is not contiguous) and on unpickling. Everything else writes into the buffers in place
# (_set_base: assignment, update_base, rebase, refresh across dtypes; torch's load_state_dict
# without assign; GeoTorch checkpoints, converted into fresh contiguous buffers), keeping their
# layout. A checkpoint saved by an earlier geofunc and broadcast from rank 0 is still received
# transposed: torch ships it before any module hook runs; load it, save it again, then broadcast.


# ----------------------------------------------------------------------------- checked bases
# Note [Bases checked where they change]
# A point is to_manifold(raw, base) and to_manifold does not validate its base (nothing data-dependent
# may raise in traced code; README, Known limitations), so a base buffer off the space gave weights
# off the space, silently: AveragedModel(use_buffers=True) (an EMA of a constrained model) averages
# the Stiefel base frames (measured: the EMA weight 0.38 off Stiefel after 40 steps with an
# update_base every 5), as does an average of state_dicts (model soups, checkpoint averaging), a
# checkpoint edited by hand, or buffers overwritten by a generic init. A module's forward therefore
# checks its base (the space's _invalid_base: orthonormal frames, or a point by contains, at the
# dtype's default tolerance) in eager mode on readable tensors, once per change: the buffers
# themselves and their version counters are kept (strongly: a weak reference on a tensor makes
# torch.utils.swap_tensors refuse it), and a forward with the same, unmodified buffers costs one
# comparison. from_manifold, rebase, update_base and assignments write valid bases, so only such
# outside writes raise. Under torch.compile and torch.func transforms (values unreadable) nothing
# is checked, as before; nor under torch.jit.trace (a read would be baked into the trace).
_CHECKED_BASES: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _base_problem(owner: Any, base: Any) -> str | None:
    """Why ``owner``'s ``base`` (its buffers ``owner._base_buffers()``) is off ``owner.space``, or None: valid
    (then noted checked), checked before at the buffers' current versions, no base, or one not read now
    (under torch.compile, a trace or a torch.func transform): Note [Bases checked where they change]."""
    if (base is None or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return None
    leaves = owner._base_buffers()
    seen = _CHECKED_BASES.get(owner)
    if seen is not None and len(seen) == len(leaves) and all(
            a is b and a._version == v for (a, v), b in zip(seen, leaves)):
        return None
    if dispatch_mode_active():  # Note [The base check under a dispatch mode]
        with _disable_current_modes():
            why = owner.space._invalid_base(base)
    else:
        why = owner.space._invalid_base(base)
    if why is None:
        _note_checked(owner, leaves)
    return why


# Note [The base check under a dispatch mode]
# The check runs in the first forward after a change of the buffers, and not in the next ones: a
# forward's ops depend on whether it is the first. A TorchDispatchMode active around that forward sees
# the check's ops as the model's. Selective activation checkpointing (create_selective_checkpoint_contexts)
# hands each saved op output back in the recomputation by (op, call index), and the recomputation runs
# no check: every later call of the check's ops got another call's output. A positive_definite layer
# whose first forward ran under a policy saving the non-pointwise ops got a gradient 100% off, silently
# (a low_rank one raised "aten.equal.default encountered during backward but not found in storage").
# Under FakeTensorMode(allow_non_fake_inputs=True) with real parameters (a memory or FLOP estimate) the
# check of the real buffers computed fake values and raised torch's DataDependentOutputException. The
# check is not part of the model: it runs with the modes switched off, on the buffers' real values
# (fake or meta buffers have none to read and are not checked, as before).


# Note [Replaced bases are not kept]
# The registry above holds the buffers it checked, strongly. Once nn.Module._apply replaced them (a device
# move: a CUDA -> CPU offload, .to("meta"), to_empty; a dtype change that needs no re-making), the old ones
# (a frame base is as large as its weight) stayed alive until the owner's next eager forward, and for ever
# where none came (an offloaded model, a meta copy): offloading a constrained model did not free its bases'
# memory. An owner's _apply therefore drops its entry when its buffers were replaced; the new buffers are
# checked at the next forward, as after any change of them.
def _forget_replaced_bases(owner: nn.Module) -> None:
    """Drop ``owner``'s entry in the checked-bases registry if ``_apply`` replaced its base buffers."""
    seen = _CHECKED_BASES.get(owner)
    leaves = owner._base_buffers()
    if seen is not None and (len(seen) != len(leaves) or any(a is not b for (a, _), b in zip(seen, leaves))):
        _CHECKED_BASES.pop(owner, None)


def _note_checked(owner: nn.Module, leaves: list) -> None:
    """Note ``owner``'s base buffers ``leaves`` valid at their current versions."""
    try:
        _CHECKED_BASES[owner] = [(b, b._version) for b in leaves]
    except RuntimeError:  # an inference tensor has no version counter: checked at every call
        _CHECKED_BASES.pop(owner, None)


# ----------------------------------------------------------------------------- the cache
# Note [A cache that sees new raw tensors]
# torch.nn.utils.parametrize.cached() keys a cached value by (module, tensor name) alone, so inside the
# block a value outlives the tensors it was computed from. Silently wrong, and geofunc's functional
# bridge makes the first case common: torch.func.functional_call(module, new_params, x) inside the
# block returned the weight of the module's own parameters (every snapshot of an ensemble evaluated
# in one cached loop gave the first one's output); an optimizer step or a load_state_dict inside the
# block left the old weight in use; a value first computed under no_grad was then used with grad
# enabled, so the weight's parameters got no gradient. For the tensors that geofunc constrains,
# the property reads the cache only while a stamp matches: grad mode, and for every parameter and
# buffer of the tensor's parametrization chain (the raw tensor, the bases) the tensor itself (held,
# compared by identity: an id alone was reused by the next transform's wrapper, found on torch 2.6),
# its version counter (in-place updates), storage (a dtype or device change swaps it) and requires_grad
# (unfreezing in the block reused the frozen value: no gradient; a probe), the
# chain's length, and the chain itself (held too: the key's id(module) is given to the next module once
# one is freed, and a stamp of the freed module's own unchanged tensors handed its weight to the new
# one: models built, evaluated and dropped in one cached loop; a probe). Anything else computes the
# value anew and caches that (one entry per tensor: the held tensors live until the block ends). Inside one forward the tensors do not change, so an RNN's time loop still computes the map once
# (tests/test_nn.py); the check costs ~2 µs a read (benchmarks/REFACTOR-checked-cache.md). Under
# torch.compile, tracing and scripting, torch's own property runs (as before). Other
# parametrizations of the module (spectral_norm, whose forward updates its buffers in place) keep
# torch's cache as it is.
_STAMP = object()  # the third element of the stamp's key in parametrize._cache


# Note [Cached values across threads]
# torch's cache is one dict for the process, and cached() switches it on for every thread (a global
# count): in a serving pool where one thread is inside a block, the other threads read and write it too.
# A value computed with grad enabled carries its thread's graph, which that thread's backward frees: a
# second thread whose stamp matched (same module, same tensors, grad on) reused it, and whichever
# backward ran second raised "Trying to backward through the graph a second time" (a probe: 8 threads
# over a shared model, some inside cached(): a third of the calls failed, threads outside any block
# too). With grad enabled a value is therefore cached per thread: its key holds the thread's own token
# (an object, not threading.get_ident(), which a new thread reuses). Values computed without grad have no
# graph and are shared by all threads, as before. And a thread outside any block caches too while another
# thread is inside one, so its second backward through an unchanged weight (gradient accumulation: two
# batches, then one step) met the same error, in a thread that had asked for no cache. So a backward
# that runs the node which computed a cached value (and so frees its graph, unless retain_graph) drops
# that entry: the next read computes the value anew. Inside one thread's own block this changes nothing
# but that error (gradient accumulation in a block now works; torch's cache alone raises it): an RNN's
# time loop still reads the weight many times and runs backward once.
# A thread's entries go with the thread: its thread-local storage is freed when it ends, and with it a
# sentinel whose finalizer drops the cache entries keyed by that thread's token (a new thread per
# request, evaluating with grad and running no backward, added one value and its graph per thread
# while another thread held a block open: 41 entries after 40 threads; leaks probe).
class _ThreadToken(threading.local):
    def __init__(self) -> None:
        self.token = object()
        self.sentinel = _Sentinel()
        weakref.finalize(self.sentinel, _drop_thread_entries, self.token).atexit = False  # (none at exit)


class _Sentinel:
    """An object that lives exactly as long as its thread's ``_ThreadToken`` storage."""


def _drop_thread_entries(token: object) -> None:
    """Drop the cache entries (values and stamps) keyed by the token of a thread that has ended."""
    cache = parametrize._cache
    for key in list(cache):  # (a copy: other threads may be writing)
        if isinstance(key, tuple) and len(key) >= 3 and key[2] is token:
            cache.pop(key, None)


_THREAD = _ThreadToken()


def _forget_after_backward(value: Tensor, key: tuple, stamp: Any) -> None:
    """Drop the cache entry ``key`` once a backward runs ``value``'s node (Note [Cached values across threads])."""
    fn = value.grad_fn if isinstance(value, torch.Tensor) else None
    if fn is None:
        return

    def forget(*_: Any) -> None:
        cache = parametrize._cache  # (torch replaces it when the last block ends)
        if cache.get(key + (_STAMP,)) is stamp:
            cache.pop(key, None)
            cache.pop(key + (_STAMP,), None)

    fn.register_hook(forget)


# Note [Cached values in checkpointed regions]
# Activation checkpointing without reentrancy (torch.utils.checkpoint, use_reentrant=False) runs its region
# under saved-tensor hooks, replays it in backward under other hooks, and requires both runs to save the
# same tensors. Inside a cached() block the first read of a weight inside the region computed the chart
# (its saved tensors counted) and cached it; the replay read the cache, computed nothing, and torch raised
# "A different number of tensors was saved during the original forward and recomputation" at backward.
# A weight read before the region was served from the cache in the region's forward, and where the
# backward ran after the block had ended the replay computed the chart: torch's "Recomputed values ...
# have different metadata" (and so for a region that read a weight twice, first inside). A cache of the
# region's own cannot be kept alike in both runs: the replay may run after the block, where nothing is
# cached. So inside a checkpointed region (its hooks are torch.utils.checkpoint's) the chain is evaluated
# at each read, in the forward and in the replay, and the cache is neither read nor written: the region
# computes what it computes without cached() (an RNN loop inside the region evaluates the chart at each
# step; read the weight once outside the loop to avoid that). A reentrant checkpoint (use_reentrant=True)
# runs its region under no_grad and replays it inside backward with grad, without hooks: the replay read
# the value cached with grad before the region, whose graph the checkpoint's own inner backward then
# freed, and the outer backward through it (the weight used outside the region too) raised "Trying to
# backward through the graph a second time". Inside a backward pass the chain is therefore evaluated at
# each read too. Other saved-tensor hooks (save_on_cpu, a user's) replay nothing and keep the cache.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _uncached_here() -> bool:
    """Whether a read now is in a checkpointed region or a backward pass, where the cache is neither read
    nor written (Note [Cached values in checkpointed regions])."""
    if torch._C._current_graph_task_id() != -1:
        return True
    hooks = _top_hooks(False) if _top_hooks is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def _storage(t: Tensor) -> Any:
    try:
        return t.data_ptr()
    except RuntimeError:  # a functorch wrapper or a subclass without storage: identity and version decide
        return None


def _stamp(plist: nn.Module) -> tuple | None:
    """What a cached value of ``plist`` depends on (:func:`_holds` checks it), or None where a tensor
    cannot say (no cache then): grad mode, the chain's length and the chain, and where each parameter and buffer
    sits, the tensor itself (held and compared by ``is``, not by ``id``: a functorch wrapper of a
    finished transform is freed, and a new one may get its address), its version and storage."""
    entries = []
    stack = [plist]
    while stack:
        mod = stack.pop()
        for tensors in (mod._parameters, mod._buffers):
            for name, t in tensors.items():
                if t is not None:
                    try:
                        version = t._version
                    except RuntimeError:  # an inference tensor has no version counter
                        return None
                    entries.append((tensors, name, t, version, _storage(t), t.requires_grad))
        stack.extend(m for m in mod._modules.values() if m is not None)
    return torch.is_grad_enabled(), len(plist._modules), entries, plist


# Note [Cached values edited in place]
# A read of a constrained tensor outside cached() computes a fresh value, so an in-place edit of what was
# read (`with torch.no_grad(): layer.weight.mul_(2)`, `layer.weight.clamp_(...)`) changes nothing the module
# uses, as with torch's parametrizations and GeoTorch. Inside cached() the value read is the cached one:
# the edit changed it, no raw tensor or base moved, so every later read in the block, forward included,
# was served the edited value, off the space (an SO(4) weight doubled: 0.95 off and refused by
# in_manifold; a probe), silently, and backward ran through the chart at the unedited point (torch's own
# cache, and so GeoTorch's, does the same). The value's own version counter (which detach() shares) is
# therefore part of its stamp: a value edited in place is not served again, and the next read computes it
# anew from the raw tensor and bases, as outside the block. (torch's own in-place writes, the renorm of
# nn.Embedding(max_norm=...), recompute at the next read alike.) Not seen: edits through `.data`, which
# autograd does not count, and a value computed under inference_mode (an inference tensor has no version
# counter), as for the raw tensors (README: geofunc.nn).
def _value_version(value: Any) -> int | None:
    """The version counter of a cached value, or None where it has none (an inference tensor)."""
    try:
        return value._version
    except (AttributeError, RuntimeError):
        return None


def _holds(stamp: Any, plist: nn.Module, value: Any = None) -> bool:
    """Whether nothing in ``stamp`` changed, ``value`` (the cached value) included: Note [Cached values
    edited in place] (the module dicts are read directly: ``parameters()`` and ``buffers()`` cost ~10 µs
    a call, this ~1 µs)."""
    if stamp is None or stamp[3] is not plist or stamp[0] != torch.is_grad_enabled() or stamp[1] != len(plist._modules):
        return False  # (another chain: a new module at a freed one's id, Note [A cache that sees new raw tensors])
    if value is not None and stamp[4] is not None and _value_version(value) != stamp[4]:
        return False  # edited in place since it was cached (Note [Cached values edited in place])
    for tensors, name, t, version, storage, requires_grad in stamp[2]:
        if tensors.get(name) is not t or t._version != version or t.requires_grad != requires_grad:
            return False
        if storage is not None and t.data_ptr() != storage:  # (None: a wrapper, which has none)
            return False
    return True


# Note [Assignments of another dtype]
# An adapter compares an assigned point's dtype and device with its base buffers (``_check_value``), so
# that ``module.weight = X.double()`` on a float32 weight raises ManifoldError, as documented. A space
# without a base (Skew, Sym, SphereEmbedded, Rn) has nothing to compare with, and its class's
# ``right_inverse`` takes any dtype on purpose (GeoTorch's ``Skew().right_inverse(X)`` is also called
# on its own, outside a module); so the assignment reached torch's own check after the inverse, a
# plain ValueError ("The tensor returned by `right_inverse` has dtype ..."), or for an integer
# SphereEmbedded point a RuntimeError from ``vector_norm``. The property that geofunc gives each tensor
# it constrains (below) now compares the point with the raw tensor first, which has the weight's dtype
# and device, and raises the adapter's own error (an ``InManifoldError`` for the GeoTorch classes)
# before anything is computed or written. A complex point for a real weight is left to the adapter,
# whose message names the real space (Note [Complex weights] in ``_manifolds.py``). A class registered
# directly with ``register_parametrization`` has torch's property, not this one: it raises torch's
# ValueError, as GeoTorch's does.


# Note [Assignments of another shape]
# GeoTorch's Skew.right_inverse takes any square batch whatever the class's size (it is also called on
# its own, outside a module), and geofunc.nn.Skew keeps that (tests/test_nn_assign.py). Through a
# module, though, torch's parametrize then re-shapes the raw Parameter in place (``original.set_``):
# ``layer.weight = X`` with a 4×4 (or a (2, 3, 3) batch) skew X on a Linear(3, 3) "succeeded", and the
# layer failed at its next forward, the optimizer holding state of the old shape. Every other
# geofunc.nn class refuses such a point in right_inverse (its size check). The property geofunc gives
# the tensors it constrains compares an assigned point's shape with the raw tensor's (the point's shape
# for a space without a base, the only adapters this runs for), so the assignment raises before
# anything is written; ``Skew.right_inverse`` called on its own, and a class registered directly with
# ``register_parametrization`` (torch's property), still take any square batch, as GeoTorch's.


# Note [Assignments to a sharded tensor]
# Under FSDP2 the raw tensor is a DTensor Parameter whose local shard is a view of FSDP2's own buffer,
# the one its all-gather reads (FSDPParam._sharded_param_data). torch's ParametrizationList.right_inverse
# stores the new raw tensor with torch.utils.swap_tensors for a tensor subclass: with a plain point (a
# sample, an average, update_base of a chain) it raised torch's "Cannot swap t1 and t2 if they have
# different slots"; with a DTensor point it swapped in a new local shard, which FSDP2 no longer read:
# the weight read outside forward was the point, forward kept using the old one, and the optimizer
# stepped a shard nothing gathered (0.33 off after one step, silently). So an assignment to a sharded
# raw tensor runs the chain's right_inverse as torch does and then *copies* the result into the raw
# tensor's own shard, in place (as update_base does). A plain value is a full point, the same on every
# rank (as load_functional takes one for a DTensor parameter): the new raw tensor is sliced locally
# (``like``, no communication); a DTensor value is gathered by the adapter and redistributed to the
# raw tensor's placements (collectives: every rank assigns).
def _assign_sharded(plist: nn.Module, value: Tensor) -> None:
    """``plist.right_inverse(value)`` written into the DTensor raw tensor ``plist.original`` in place
    (Note [Assignments to a sharded tensor])."""
    T = plist.original
    with torch.no_grad():
        Z = value
        for p in reversed(plist):
            Z = p.right_inverse(Z)
        Z = like(Z, T) if not isinstance(Z, DTensor) else Z
        if tuple(Z.placements) != tuple(T.placements) or Z.device_mesh != T.device_mesh:
            Z = Z.redistribute(T.device_mesh, T.placements)
        if Z.dtype != T.dtype or tuple(Z.shape) != tuple(T.shape):
            raise ValueError(f"The tensor returned by `right_inverse` has dtype {Z.dtype} and shape "
                             f"{tuple(Z.shape)} while `original` has dtype {T.dtype} and shape {tuple(T.shape)}")
        T.copy_(Z)


# Note [Raw tensors FSDP2 holds unsharded]
# Outside forward an FSDP2 state's parameters are usually its sharded DTensors, but a state that did not
# reshard (the root's, whose reshard_after_forward FSDP2 sets False: fully_shard(model) alone, then an
# evaluation forward; or reshard_after_forward=False) leaves its modules holding the unsharded plain
# copies, which FSDP2 frees at its next reshard without writing them back. update_base and assignments
# wrote the new raw tensor into that copy and the new base into the (replicated, kept) buffers: at the
# reshard the raw tensor went back to the sharded old one under the new base, a point that was neither
# (0.09 off a one-process run after three steps, silently). So where the raw tensor of a module FSDP2
# manages (``_is_fsdp_managed_module``, set by fully_shard on every module it manages) is one of FSDP2's
# unsharded parameters (not FSDP1's, which marks its modules alike and keeps plain parameters), the write
# is refused, on every rank alike, with a ManifoldError saying to call ``reshard()`` (FSDP2's
# public method) on the fully_shard-ed module first. Not resharded here: inside a forward, where FSDP2
# unshards on purpose, that would pull the parameters from under it.
def _fsdp2_unsharded(T: Any) -> bool:
    """Whether ``T`` is the unsharded parameter of an FSDP2 state (``FSDPParam._unsharded_param``, private
    to PyTorch: README, deviations), found through the registry of ``fully_shard``'s states. Only asked
    where fully_shard's ``_is_fsdp_managed_module`` mark is on the module (FSDP1 sets it too, whose
    parameters are no DTensors: it is left as it was)."""
    if not isinstance(T, torch.Tensor) or isinstance(T, DTensor):
        return False
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - a torch without them has no FSDP2 either
        return False
    for ref in list(_module_state_mapping.values()):
        state = ref()
        group = state._fsdp_param_group if isinstance(state, FSDPState) else None
        if group is not None and any(getattr(p, "_unsharded_param", None) is T for p in group.fsdp_params):
            return True
    return False


def _sharded_raw(module: nn.Module, tensor_name: str, what: str) -> None:
    """Make sure ``module.<tensor_name>``'s raw tensor is FSDP2's sharded DTensor, not the unsharded copy a
    state that did not reshard left (Note [Raw tensors FSDP2 holds unsharded])."""
    plist = module.parametrizations[tensor_name]
    if not (getattr(plist, "_is_fsdp_managed_module", False) or getattr(module, "_is_fsdp_managed_module", False)):
        return
    if not plist.is_tensor or not _fsdp2_unsharded(plist.original):
        return
    raise ManifoldError(
        f"{what} of {_owner_name(module, tensor_name)}: expected its raw tensor to be FSDP2's sharded parameter "
        f"(a DTensor), got the unsharded copy FSDP2 holds after a forward that did not reshard (the root "
        f"module's, or reshard_after_forward=False), which FSDP2 frees without writing it back. Call "
        f"reshard() on the fully_shard-ed module that holds it first (model.reshard()), or pass the "
        f"constrained module itself to fully_shard."
    )


def _check_assigned(plist: nn.Module, X: Any) -> None:
    """Raise the adapter's error if ``X``, assigned to the tensor of ``plist``, has another dtype (or,
    for plain tensors, device) than its raw tensor, where the adapter has no base buffer to compare
    with (Note [Assignments of another dtype])."""
    if not isinstance(X, torch.Tensor) or not getattr(plist, "is_tensor", False) or len(plist) != 1:
        return
    if not_dense(X):  # (no shape to compare: the adapter's right_inverse refuses
        return  # it by name, Note [Dense tensors only] in geofunc/spaces/_base.py)
    M, Z = plist[0], plist.original
    if not isinstance(M, Parametrization) or M._base_buffers() or not isinstance(Z, torch.Tensor):
        return
    if X.is_complex() and not Z.is_complex():
        return
    plain = type(X) in (torch.Tensor, nn.Parameter) and type(Z) in (torch.Tensor, nn.Parameter)
    # a meta point for a raw tensor with values (or the reverse) is another device too: torch's set_ raised
    # its "Attempted to set the storage ... to a storage on different device" after the space's inverse
    if X.dtype != Z.dtype or (plain and X.device != Z.device):
        raise M._dtype_error(X, Z)
    if tuple(X.shape) != tuple(Z.shape):  # Note [Assignments of another shape]
        raise M._shape_error(X, tuple(Z.shape))


# Note [Sparse gradients of a constrained weight]
# nn.Embedding(sparse=True) and nn.EmbeddingBag(sparse=True) give their weight a sparse (COO)
# gradient. A constrained weight is the chart's output, and the chart's backward cannot take one: torch
# raised from inside it ("sparse transpose: transposed dimensions must be sparse" for Skew, PSD and the
# frames, "Sparse division requires a scalar ... divisor" for Sphere; torch's own parametrizations
# fail alike), so such a layer could not be trained with a constraint. The raw tensor's gradient is
# dense whatever the weight's is (the chart mixes the rows; Sphere's rows are independent but its
# chart is computed whole), so the value read from a module whose ``sparse`` attribute is true passes
# through an identity whose backward densifies the gradient: the gradients of sparse=False. (An
# optimizer for sparse gradients, SparseAdam, then refuses the raw tensor's dense one, by name.) A
# tensor hook cannot do it (autograd refuses a hook that changes the layout), and the identity returns
# a copy, not its input: a view made inside a custom Function may not be modified in place, and the
# embedding's max_norm renormalizes its weight in place. Only modules with such an attribute pay for
# it (one dict read otherwise: nothing for a Linear); torch.compile, tracing and scripting get torch's
# property as before.
class _DenseGradient(torch.autograd.Function):
    generate_vmap_rule = True  # (under torch.func a module_state of such a module runs it)

    @staticmethod
    def forward(X: Tensor) -> Tensor:
        return X.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, G: Tensor) -> Tensor:
        return G.to_dense() if G.layout != torch.strided else G


def _dense_gradient(module: nn.Module, value: Tensor) -> Tensor:
    """``value``, through an identity that densifies its gradient where ``module`` hands its tensor
    sparse gradients (Note [Sparse gradients of a constrained weight])."""
    if (module.__dict__.get("sparse") is True and isinstance(value, torch.Tensor) and value.requires_grad
            and torch.is_grad_enabled()):
        return _DenseGradient.apply(value)
    return value


# Note [Cached values in compiled and exported code]
# Inside torch.compile and torch.export (strict or not: both are "compiling") the property ran torch's
# own, whose cache is a global dict keyed by (module, name): a value cached by an eager read before the
# compiled call was read by the trace as a tensor from outside, so torch.export inside a gf.nn.cached()
# block wrote the eager weight into the program as a constant (the raw Parameter no longer an input, or
# an input left unused): the exported module ignored any new raw values loaded into it (2.2 off for an
# SO(4) layer), silently. And the traced value that torch's cache stores from compiled code is a real
# tensor after the call, which the next compiled call in the block read back: after an optimizer step
# a compiled layer kept the old weight (2.1 off), where the eager property recomputes (Note [A cache
# that sees new raw tensors]). So compiled and exported code evaluates the chain at each read and
# neither reads nor writes the cache: the graph computes the weight from the raw tensor and bases it
# is given. (Repeated reads in one traced forward, an RNN's time loop, trace the map once per read.)


# Note [Cached values under FakeTensorMode]
# FakeTensorMode(allow_non_fake_inputs=True) runs a model with its real parameters and computes fake
# values (memory and FLOP estimates). Inside a gf.nn.cached() block the stamp of such a value matched
# (the same real raw tensor and bases, unchanged): the next real forward in the block read the
# FakeTensor weight, its output and loss were FakeTensors, and backward wrote a FakeTensor into the
# raw Parameter's .grad (loss.item() then raised DataDependentOutputException). Under a fake mode the
# chain is evaluated at each read and the cache neither read nor written, as in compiled code.
# Note [Fused optimizer steps in a cached block]
# torch's fused optimizers (``Adam(fused=True)``, AdamW, SGD, Adagrad; torch 2.13) write the new
# parameters without bumping their autograd version counter (the foreach and for-loop steps bump it),
# and leave identity and storage as they were: every part of the stamp above still matched, so inside
# ``cached()`` a value read under no_grad before such a step (an evaluation) was served after it, the
# old weight, silently (0.14 off after one Adam step on a 4×4 orthogonal layer; aliasing probe). The
# with-grad value was not affected (a backward drops it: Note [Cached values across threads]). While a
# cache block is open, a step post-hook on every optimizer bumps the version counters of the parameters
# that a fused group holds, as an in-place op would: the stamp then sees the step. Outside a block, and
# for optimizers without a fused group, the hook only reads a flag. A compiled step (torch.compile of
# ``opt.step``, any backend) runs the hook inside the trace, where a version bump is no op of the graph
# (is_compiling: nothing was bumped, the read after the step was 0.17 off, silently): the bump is left
# to eager code there (a graph break after the step's own, only for a fused group in an open block).
def _fused_step_bumps_versions(optimizer: Any, args: Any, kwargs: Any) -> None:
    if not parametrize._cache_enabled:
        return
    groups = [group for group in optimizer.param_groups if group.get("fused")]
    if groups:
        _bump_versions(groups)


def _bump_fused_versions(groups: list) -> None:
    for group in groups:
        for p in group["params"]:  # (a Parameter subclass too: its own counter is the one the stamp reads)
            if isinstance(p, torch.Tensor):
                _increment_version(p)


_bump_versions = getattr(torch.compiler, "disable", lambda f: f)(_bump_fused_versions)  # (eager, also in a trace)


_increment_version = getattr(torch.autograd.graph, "increment_version", None)  # (torch ≥ 2.1; fused CPU steps: 2.4)
_register_step_hook = getattr(_torch_optimizer, "register_optimizer_step_post_hook", None)  # (torch ≥ 2.0)
if _increment_version is not None and _register_step_hook is not None:
    _register_step_hook(_fused_step_bumps_versions)


# Note [functional_call with a constrained tensor's plain name]
# torch.func.functional_call(module, {"weight": W}, args) swaps each named tensor in with setattr; for a
# constrained tensor that is an assignment, right_inverse under no_grad: the call computed with the point
# W (to rounding), but no gradient reached W (a hypernetwork's output: None, silently; the raw Parameter
# got one instead, for a chart the call then left), and at the end torch's restore assigned the weight
# read before the call, re-centring the chart: the raw Parameter and bases were rewritten (an SO(4)
# layer after three SGD steps: raw 0.40 and base 0.44 moved, weight kept) under the optimizer's
# momentum and Adam moments, a training silently changed by an evaluation. Under vmap it raised torch's
# "vmap over torch.allclose isn't supported", under torch.func.grad "... mutate a captured Tensor"
# (GeoTorch does all the same: torch's parametrize). Such a swap is therefore refused, by name, before
# anything is written (torch's swap_tensors_dict then swaps back what it had swapped): the module runs
# on given raw tensors and bases with functional_call(module, gf.nn.module_state(module, raw, bases), args),
# and on given points with functional_call(gf.nn.plain(module), {"weight": W, ...}, args). A swap is told
# from an assignment by its caller, torch's swap_tensor (private to PyTorch: README, deviations); a
# torch that swaps otherwise assigns as before.
try:
    from torch.nn.utils._named_member_accessor import swap_tensor as _torch_swap_tensor

    _SWAP_CODE = _torch_swap_tensor.__code__
except (ImportError, AttributeError):  # pragma: no cover - another torch
    _SWAP_CODE = None


@torch.compiler.disable  # (run as Python under torch.compile: Dynamo warned of sys._getframe at each assignment)
def _swapped_in_by_functional_call() -> bool:
    """Whether the assignment running now is torch's swap of a named tensor (functional_call), found among
    the few frames above the property's setter (nn.Module.__setattr__, a subclass's, then swap_tensor;
    torch.compiler.disable's wrapper below them all)."""
    if _SWAP_CODE is None:
        return False
    try:
        f = sys._getframe(1)
    except ValueError:  # (no such frame)
        return False
    for _ in range(8):
        if f is None:
            return False
        if f.f_code is _SWAP_CODE:
            return True
        f = f.f_back
    return False


def _refuse_functional_call(module: nn.Module, tensor_name: str) -> None:
    raise ManifoldError(
        f"functional_call of {_owner_name(module, tensor_name)}, a constrained tensor: expected its raw tensor's "
        f"name (parametrizations.{tensor_name}.original, with its bases: torch.func.functional_call(module, "
        f"gf.nn.module_state(module, raw, bases), args)) or a point for an unparametrized copy "
        f"(functional_call(gf.nn.plain(module), {{..., '{tensor_name}': W}}, args)), got the plain name "
        f"'{tensor_name}', which torch would assign through right_inverse under no_grad: no gradient would reach "
        f"the value given, and restoring the module afterwards would re-centre its chart (rewriting the raw "
        f"Parameter and bases under the optimizer's state). Nothing was swapped."
    )


def _checked_property(tensor_name: str, torch_property: property) -> property:
    fget = torch_property.fget
    fset = torch_property.fset

    def set_parametrized(self: nn.Module, value: Any) -> None:
        plist = self._modules["parametrizations"]._modules[tensor_name]
        if _swapped_in_by_functional_call():  # Note [functional_call with a constrained tensor's plain name]
            _refuse_functional_call(self, tensor_name)
        _check_assigned(plist, value)
        _sharded_raw(self, tensor_name, "an assignment")
        if isinstance(value, torch.Tensor) and plist.is_tensor and isinstance(plist.original, DTensor):
            _assign_sharded(plist, value)
        else:
            fset(self, value)

    def get_parametrized(self: nn.Module) -> Tensor:
        if torch.compiler.is_compiling():  # Note [Cached values in compiled and exported code]
            return self._modules["parametrizations"]._modules[tensor_name]()
        if torch.jit.is_scripting() or torch._C._get_tracing_state() is not None:
            return fget(self)  # torch's: its errors for tracing and scripting
        if not parametrize._cache_enabled:
            return _dense_gradient(self, fget(self))
        plist = self._modules["parametrizations"]._modules[tensor_name]  # (nn.Module's __getattr__: ~1 µs)
        if fake_mode_active():
            return _dense_gradient(self, plist())  # Note [Cached values under FakeTensorMode]
        if _uncached_here():  # Note [Cached values in checkpointed regions]
            return _dense_gradient(self, plist())
        # with grad: one entry per thread (Note [Cached values across threads])
        key = (id(self), tensor_name, _THREAD.token) if torch.is_grad_enabled() else (id(self), tensor_name)
        cache = parametrize._cache
        value = cache.get(key)
        if value is not None and _holds(cache.get(key + (_STAMP,)), plist, value):
            return value
        stamp = _stamp(plist)  # before the value: what it is computed from
        value = _dense_gradient(self, plist())
        if stamp is not None:  # and the value's own version (Note [Cached values edited in place])
            stamp = (*stamp, _value_version(value))
        cache[key] = value
        cache[key + (_STAMP,)] = stamp
        if len(key) == 3:  # with grad (Note [Cached values across threads])
            _forget_after_backward(value, key, stamp)
        return value

    get_parametrized._geofunc_checked = True  # type: ignore[attr-defined]
    return property(get_parametrized, set_parametrized)


def _check_cached_values(module: nn.Module) -> None:
    """Give each tensor of ``module`` that geofunc constrains the checked cached property."""
    cls = type(module)
    for tensor_name, plist in getattr(module, "parametrizations", {}).items():
        prop = cls.__dict__.get(tensor_name)
        if (isinstance(prop, property) and not getattr(prop.fget, "_geofunc_checked", False)
                and any(isinstance(p, Parametrization) for p in plist)):
            setattr(cls, tensor_name, _checked_property(tensor_name, prop))


# ----------------------------------------------------------------------------- raw tensors across dtypes
# Note [Raw tensors across dtypes]
# The value coordinates of the "softplus" spaces (FixedRank, GLp, PSD, PSSDFixedRank, and SL through
# its GLp) are raw numbers s whose value is softplus(s) + ε, ε = √eps of the raw tensor's dtype (of
# the stored dtype for bf16/fp16: Note [Low precision]); Hurwitz's W has ε = √eps of bf16/fp16 and 0 for
# float32/float64 (the space's ``_coords_floor``; Note [Hurwitz floor of the stored dtype]). The same s is another value in another
# dtype: cast alone, every singular value or eigenvalue would move by the difference of the floors
# (+0.088 to bfloat16, −3.4e-4 to float64), far beyond the rounding. So when the raw tensor of such a
# space changes dtype (``.to()``, ``.double()``, ``.bfloat16()``, ...), its value coordinates are
# re-expressed: s' = f_new⁻¹(f_old(s)), computed in float64 from the values before the cast. The
# point then changes by the new dtype's rounding only, except that a value below the new dtype's
# floor is lifted to it (one unit of the new dtype's rounding above it, so that its coordinate is
# finite and still trains): the documented allowance of bf16/fp16 (README, Known limitations), and a
# warning for float32/float64 (a float64 value below float32's floor). The raw tensor is changed in
# place after torch's own conversion, so it stays the Parameter object torch's ``_apply`` keeps
# (optimizers hold it; their state is left as torch leaves it), by the constrained module's own
# ``_apply`` (installed with the pickling support on the class torch injects, so deep copies and
# unpickled modules have it too). A GeoTorch class registered directly with
# ``register_parametrization`` has no such module override: its adapter writes the new coordinates
# into its raw tensor (known as ``_RAW`` above) just before ``ParametrizationList._apply`` casts it,
# and warns where it does not know the raw tensor. A ``state_dict`` whose raw tensor has
# another dtype than the module's is re-expressed alike when it is loaded (``load_state_dict``
# would otherwise cast it); its bases are cast by torch and re-made valid by ``update_base``
# (Note [Bases across dtypes]). The frames and every other space's coordinates do not depend on the
# dtype and are left to torch.


# Note [Chained values across dtypes]
# A "softplus" space appended to a tensor's chain (positive_definite on a weight already constrained by
# symmetric, by another constraint function or by a torch parametrization) reads its value coordinates
# from the previous parametrizations' output, not from a stored tensor: a dtype change (.double(),
# .half(), load_state_dict of another dtype) cannot re-express them, and every eigenvalue (singular
# value) moved by the difference of the floors, 3.5e-4 for float32 -> float64, silently (the README
# promised rounding only). Nothing the chain exposes maps re-expressed coordinates back to the raw tensor
# in general, so such a cast warns (the adapter's _apply; load_state_dict of another dtype in
# _load_keeping_points), naming the remedy: assign the weight again after the cast.
def _chained_message(adapter: nn.Module, old: torch.dtype, new: torch.dtype) -> str:
    return (f"{adapter.where} constrained to {adapter.space!r}: its tensor changed dtype from {old} to {new}, but it is not "
            "the first parametrization of its tensor's chain, so its raw values (the previous parametrizations' output) "
            "are not re-expressed in the new dtype and every value moves by the difference of the floors of "
            f"\"softplus\" ({adapter.space._coords_floor(old):.2g} -> {adapter.space._coords_floor(new):.2g}). Assign the weight again after the cast "
            "(module.<name> = weight_before.to(dtype)), or constrain the tensor with this space first.")


def _concrete(t: Any) -> bool:
    """A plain tensor or Parameter whose values can be read and written (not meta, fake, a DTensor or under torch.func)."""
    return (type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta
            and not torch._C._functorch.is_functorch_wrapped_tensor(t) and (t.is_floating_point() or t.is_complex()))


def _reexpress(space: Any, s: Tensor, old: torch.dtype, new: torch.dtype) -> tuple[Tensor, Tensor]:
    """Value coordinates ``s`` of a raw tensor of dtype ``old`` re-expressed for a raw tensor of dtype
    ``new`` (float64 work): ``(s', lifted)``, ``lifted`` marking values below ``new``'s floor (the space's
    ``_coords_floor``; one unit of the new dtype's rounding where that floor is 0)."""
    f_old, f_new = space._coords_floor(old), space._coords_floor(new)
    x = torch.nn.functional.softplus(s.detach().to(torch.float64)) + (f_old - f_new)
    x_min = (f_new or 1.0) * torch.finfo(new).eps  # one unit of the new dtype's rounding above its floor
    lifted = x < x_min
    x = x.clamp(min=x_min)
    return softplus_inverse(x), lifted


def _write_values(where: str, space: Any, view: Tensor | None, s_old: Tensor, old: torch.dtype, new: torch.dtype) -> None:
    """Overwrite the value coordinates ``view`` (of a raw tensor) with ``s_old``, coordinates of a raw
    tensor of dtype ``old``, re-expressed for dtype ``new``; warn where a value is lifted to the floor of
    a float32/float64 ``new`` (Note [Raw tensors across dtypes])."""
    if view is None or space._coords_floor(old) == space._coords_floor(new):
        return
    s_new, lifted = _reexpress(space, s_old, old, new)
    with torch.no_grad():
        view.copy_(s_new.to(device=view.device))
    if new not in LOW_PRECISION and bool(lifted.any()):
        lowest = float((torch.nn.functional.softplus(s_old.detach().double()) + space._coords_floor(old))[lifted].min())
        warnings.warn(
            f"{where} constrained to {space!r}: a value {lowest:.3g} is below the floor {space._coords_floor(new):.3g} of "
            f"geofunc's \"softplus\" in {new} (softplus + √eps of the dtype) and was lifted to it when the raw tensor "
            f"changed dtype from {old} to {new}.",
            stacklevel=4,
        )


def _geofunc_plists(module: nn.Module) -> list[tuple[str, nn.Module, Parametrization]]:
    """``(tensor_name, ParametrizationList, adapter)`` of every tensor of ``module`` whose raw tensor is a geofunc space's."""
    plists = module._modules.get("parametrizations")
    out = []
    for name, plist in ([] if plists is None else plists.items()):
        first = plist[0] if len(plist) else None
        if getattr(plist, "is_tensor", False) and isinstance(first, Parametrization) and first._identity_raw:
            out.append((name, plist, first))
    return out


def _super(self: nn.Module, name: str, ours: Callable[..., Any]) -> Any:
    """``super()`` past the class that holds ``ours`` as ``name`` (the parametrized class torch injected):
    ``type(self)`` may be a subclass of it (FSDP2's ``fully_shard`` subclasses the module's class)."""
    for cls in type(self).__mro__:
        if cls.__dict__.get(name) is ours:
            return super(cls, self)
    return super(type(self), self)


# Note [Complex and real dtypes of a constrained module]
# ``module.to(torch.float32)`` casts a complex parameter to real by dropping its imaginary part (torch
# warns once per process). For a complex constrained tensor that is no point of anything: its raw tensor
# and base lost their imaginary parts, the base was re-made orthonormal (Note [Bases across dtypes]), and
# the weight became another real point, 0.3-0.7 away from both W and Re W, silently (complex Stiefel,
# Grassmannian, Sphere, PSD, PSSD; Unitary and Hermitian raised only at the next read). The other way,
# ``.to(torch.complex64)`` of a real-only space (SO, GLp, ...) made its raw tensor and base complex, and the
# next read raised torch's NotImplementedError ("gt_cpu" not implemented for 'ComplexFloat', from the base's
# determinant sign) or a ManifoldError that named no tensor. Both are refused here, before the module or
# any of its tensors is converted; a real point of a space that takes complex tensors becomes complex
# exactly (real frames are unitary ones), as before. ``load_state_dict`` of a complex checkpoint into the
# real module is refused alike (``_load_keeping_points``), before that module's tensors are loaded;
# ``assign=True`` replaces the tensors and is left alone. Only the constrained module's own ``_apply`` is
# this one: a parent's ``.to()`` walks its children in order, and those before this module are converted
# by then (the message says "of this module").
def _require_dtype_kind_kept(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
    """Raise ``ManifoldError`` if ``fn`` (an ``_apply`` conversion) turns a constrained complex raw tensor of
    ``module`` real, or a real one complex where its space is real (Note [Complex and real dtypes of a
    constrained module])."""
    for name, plist, M in _geofunc_plists(module):
        Z = plist.original
        if not isinstance(Z, Tensor) or not (Z.is_floating_point() or Z.is_complex()):
            continue
        new = fn(torch.empty((0,) * Z.dim(), dtype=Z.dtype, device=Z.device)).dtype
        if Z.is_complex() and not new.is_complex:
            raise ManifoldError(
                f"{M.where} constrained to {M.space!r}: expected a conversion that keeps it complex, got dtype "
                f"{Z.dtype} -> {new}: a complex point has no real counterpart on the space (casting would drop the "
                "imaginary parts of its raw tensor and base, giving another point). Nothing of this module was converted "
                "(modules a parent converted before it keep the new dtype); build the real module and assign it a real "
                "point instead.")
        if not Z.is_complex() and new.is_complex and not M.space.accepts_complex:
            raise ManifoldError(
                f"{M.where} constrained to {M.space!r}: expected a real floating dtype, got dtype {Z.dtype} -> {new}: "
                f"{type(M.space).__name__} is a real space. Nothing of this module was converted (modules a parent "
                "converted before it keep the new dtype).")


def _apply_keeping_points(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` of a constrained module, whose raw tensors keep their points across a dtype
    change (Note [Raw tensors across dtypes]); a change between real and complex dtypes that the
    points cannot follow raises ``ManifoldError`` before anything is converted (Note [Complex and
    real dtypes of a constrained module])."""
    if recurse:
        _require_dtype_kind_kept(self, fn)
    snaps, handled = [], []
    for name, plist, M in _geofunc_plists(self) if recurse else []:
        Z = plist.original
        view = M.space._dtype_coords(Z) if _concrete(Z) else None
        if view is not None:
            snaps.append((name, Z.dtype, view.detach().clone()))
            handled.append(id(M))
    view = Z = None  # a view holds its base: torch.utils.swap_tensors (.to() under swap semantics) refuses shared tensors
    # Nor may a weak reference exist while torch swaps: held strongly meanwhile, made weak again after.
    last = {M: _LAST_RAW.pop(M)() for _, _, M in _geofunc_plists(self) if M in _LAST_RAW}
    _HANDLED.update(handled)
    # An RNN's _apply ends with _init_flat_weights, which evaluates every constrained weight: on to_empty's
    # uninitialized memory (deferred initialization) the base check raised before load_state_dict could fill
    # it. Its flat weights are rebuilt without evaluating anything instead (Note [Pickling constrained RNNs]);
    # the next forward replaces them by the constrained values, as after registration.
    rnn = isinstance(self, nn.RNNBase) and "_flat_weights_names" in self.__dict__
    if rnn:
        self.__dict__["_init_flat_weights"] = lambda: _rebuild_flat_weights(self)
    try:
        out = _super(self, "_apply", _apply_keeping_points)._apply(fn, recurse)
    finally:
        _HANDLED.difference_update(handled)
        if rnn:
            self.__dict__.pop("_init_flat_weights", None)
        for M, T in last.items():
            if T is not None:
                _LAST_RAW[M] = weakref.ref(T)
    for name, old, s_old in snaps:
        plist = self.parametrizations[name]
        Z, M = plist.original, plist[0]
        if Z.dtype != old and _concrete(Z):
            _write_values(M.where, M.space, M.space._dtype_coords(Z), s_old, old, Z.dtype)
    return out


def _load_keeping_points(self: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
    """``nn.Module._load_from_state_dict`` of a constrained module: a saved raw tensor of another dtype
    than the module's is re-expressed in the module's dtype before torch casts it (Note [Raw tensors
    across dtypes]). ``state_dict`` is ``load_state_dict``'s own copy; the saved tensor is not modified.
    Entries in GeoTorch's layout are first replaced by geofunc's for the same points (Note [GeoTorch
    checkpoints] in ``_geotorch_checkpoints.py``)."""
    from ._geotorch_checkpoints import convert_geotorch_entries

    for name, plist, M in _geofunc_plists(self):
        convert_geotorch_entries(M, plist, state_dict, f"{prefix}parametrizations.{name}.")
    if not local_metadata.get("assign_to_params_buffers", False):
        for name, plist, M in _geofunc_plists(self):
            key = f"{prefix}parametrizations.{name}.original"
            saved, Z = state_dict.get(key), plist.original
            if not (_concrete(saved) and _concrete(Z)) or saved.dtype == Z.dtype or saved.shape != Z.shape:
                continue
            for A in list(plist)[1:]:  # Note [Chained values across dtypes]
                if A in _CHAINED and A._moves_with_floor(saved.dtype, Z.dtype):
                    warnings.warn(_chained_message(A, saved.dtype, Z.dtype), stacklevel=4)
            if saved.is_complex() and not Z.is_complex():  # Note [Complex and real dtypes of a constrained module]
                raise ManifoldError(
                    f"{M.where} constrained to {M.space!r}: expected a saved raw tensor {key} of a real dtype, as the "
                    f"module's ({Z.dtype}), got dtype {saved.dtype}: a complex point has no real counterpart on the space "
                    "(loading would drop the imaginary parts of its raw tensor and base, giving another point). Nothing "
                    "of this module was loaded.")
            if saved.is_complex() != Z.is_complex():
                continue
            view = M.space._dtype_coords(saved)
            if view is None:
                continue
            new = saved.detach().to(dtype=Z.dtype, copy=True)
            _write_values(M.where, M.space, M.space._dtype_coords(new), view, saved.dtype, Z.dtype)
            state_dict[key] = new
    _super(self, "_load_from_state_dict", _load_keeping_points)._load_from_state_dict(state_dict, prefix, local_metadata, *args)


# ----------------------------------------------------------------------------- registration


class NoSuchTensorError(AttributeError, ValueError):
    """``module`` has no tensor of that name: an ``AttributeError`` as GeoTorch's (its one-liners
    read ``getattr(module, tensor_name)``) and a ``ValueError`` as ``register_parametrization``'s."""


def _resolve_tensor(module: nn.Module, tensor_name: str, space: Any) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    if not isinstance(tensor_name, str):
        raise TypeError(f"tensor_name must be a string, got {tensor_name!r}")
    known = (
        tensor_name in module._parameters
        or tensor_name in module._buffers
        or parametrize.is_parametrized(module, tensor_name)
    )
    if not known or getattr(module, tensor_name) is None:
        names = [n for n, _ in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        names = [n for n in names if not n.startswith("parametrizations.")]
        # The wording of torch.nn.utils.parametrize.register_parametrization; GeoTorch's class too.
        raise NoSuchTensorError(
            f"Module '{parametrize.type_before_parametrizations(module).__name__}' does not have a parameter, "
            f"a buffer, or a parametrized element with name '{tensor_name}' (cannot constrain it to {space!r}; "
            f"its tensors are: {', '.join(names) or 'none'})."
        )
    T = getattr(module, tensor_name)
    if isinstance(T, nn.parameter.UninitializedTensorMixin):  # nn.LazyLinear, nn.LazyConv2d, ... before a forward
        what = space if isinstance(space, str) else repr(space)
        raise ManifoldError(
            f"cannot constrain {_owner_name(module, tensor_name)} to {what}: expected a tensor with a shape, got an "
            f"uninitialized parameter of a lazy module (its shape is set by the first forward): run one forward "
            f"pass first, then constrain it."
        )
    if not_dense(T):  # Note [Dense tensors only] in geofunc/spaces/_base.py
        what = space if isinstance(space, str) else repr(space)  # (torch's copy_ of the initial point raised)
        raise ManifoldError(f"cannot constrain {_owner_name(module, tensor_name)} to {what}: expected a dense "
                            f"(strided) tensor, got {describe(T)}.")
    return T


# the real space of a complex-only one, named in constrain's refusal (a user's own complex-only space: none)
_REAL_COUNTERPART = {"Unitary": ", or use the real space SO", "Hermitian": ", or use the real space Sym"}


def constrain(
    module: ModuleT,
    tensor_name: str,
    space: AbstractSpace,
    *,
    init: Tensor | Callable[[Tensor], Tensor] | None = None,
) -> ModuleT:
    """Constrain ``module.<tensor_name>`` to ``space`` with ``torch.nn.utils.parametrize``.

    The tensor becomes ``space.to_manifold(Z, base)`` of a raw parameter
    ``module.parametrizations.<tensor_name>.original`` (``Z``) and buffers
    ``module.parametrizations.<tensor_name>.0.base*`` (the base).

    Args:
        module: the module that owns the tensor.
        tensor_name: the name of a parameter or buffer of ``module`` (possibly already parametrized,
            in which case the space is appended to its chain).
        space: any geofunc space.
        init: the initial point: ``None`` draws ``space.sample`` on the tensor's shape, dtype and
            device (from the global RNG, as ``torch.nn.init`` does); a tensor is used as is; a
            callable receives the current value and returns the point.

    Returns:
        ``module``.

    Raises:
        ManifoldError: the space cannot take the tensor's shape, or the initial point is off it;
            the message names the module's tensor, the space, what was expected and what was got.
        ValueError: ``module`` has no tensor ``tensor_name`` (as ``register_parametrization``; also an
            ``AttributeError``, as GeoTorch's).
    """
    if not isinstance(space, AbstractSpace):
        raise TypeError(f"expected a geofunc space, got {space!r}")
    T = _resolve_tensor(module, tensor_name, space)
    where = _owner_name(module, tensor_name)
    what = f"{where} (a tensor of shape {tuple(T.shape)} and dtype {T.dtype})"
    if isinstance(space, Product):  # its points are tuples: no one tensor holds one
        raise ManifoldError(f"cannot constrain {what} to {space!r}: expected a space whose points are tensors; a "
                            f"Product's points are tuples of tensors (constrain each tensor to its factor).")
    if space._complex_only and not T.dtype.is_complex:  # its sample would be complex: name the cause, not the sample
        raise ManifoldError(
            f"cannot constrain {what} to {space!r}: expected a tensor of a complex dtype (complex64 or complex128), "
            f"got dtype {T.dtype}: {type(space).__name__} takes complex tensors only (make the module complex, "
            f"e.g. dtype=torch.complex64{_REAL_COUNTERPART.get(type(space).__name__, '')}).")
    try:
        if init is None:
            X = space.sample(tuple(T.shape), dtype=T.dtype, device=T.device)
        elif callable(init):
            with torch.no_grad():
                X = init(T.detach())
        else:
            X = init
        Z, base = _from_manifold(space, X)
    except ManifoldError as e:
        raise ManifoldError(f"cannot constrain {what}: {e}") from None
    if tuple(X.shape) != tuple(T.shape) or X.dtype != T.dtype:
        raise ManifoldError(
            f"cannot constrain {what} to {space!r}: expected an initial point of shape {tuple(T.shape)} and "
            f"dtype {T.dtype}, got {describe(X)}."
        )
    adapter = Parametrization(space, base, where=where, shape=T.shape)
    return attach(module, tensor_name, adapter, Z, X)


def attach(module: ModuleT, tensor_name: str, adapter: nn.Module, Z: Tensor | None, X: Tensor, *,
           keep: bool = False) -> ModuleT:
    """Register ``adapter`` on ``module.<tensor_name>`` so that its value becomes the point ``X``.

    ``Z`` is ``X``'s raw tensor if already known; otherwise the adapter's ``right_inverse`` computes
    it where needed. On an already parametrized tensor the existing chain is asked to output ``Z``;
    where it cannot (``orthogonal`` twice: the first Stiefel refuses the second's zero raw tensor;
    ``weight_norm`` maps it to NaN, 0 / ‖0‖), ``X`` itself is assigned
    through the existing chain and the adapter maps the chain's value to its point, as GeoTorch's
    registration does (the value is then a point of the adapter's space, not ``X``; an ``X`` the
    existing chain refuses raises, as in GeoTorch). A failure leaves the module as it was. The
    parametrized class is made picklable. ``keep`` (an adapter that keeps the tensor's values, as
    ``symmetric``): on an already parametrized tensor, nothing is assigned and the adapter is appended
    to the chain as it is, as GeoTorch does with its ``Symmetric`` (which has no inverse).
    """
    T = getattr(module, tensor_name)
    chained = parametrize.is_parametrized(module, tensor_name)
    fsdp = _fsdp_param(module, tensor_name, T) if isinstance(T, DTensor) and not chained else None
    with torch.no_grad():
        if chained and keep:
            pass
        elif chained:
            # The existing chain should output Z so that ours outputs X; else GeoTorch's way.
            if Z is None:
                Z = adapter.right_inverse(X)  # raises if X is off the adapter's space
            # Note [A failed try leaves the chain as it was]
            # Evaluating the chain at Z runs its parametrizations' forwards, which may update their
            # state: spectral_norm's power iteration at Z = 0 (Stiefel's, Sphere's raw tensor) turns
            # its _u, _v into zero vectors, and every later value, GeoTorch's way at X included, is
            # then 0 / 0. So the chain's tensors are kept and put back before the fallback and on
            # every failure (which then leaves the module as it was).
            snapshot = _snapshot(module.parametrizations[tensor_name])
            try:
                setattr(module, tensor_name, Z.to(T.device))
                outputs_z = _finite_or_unknown(getattr(module, tensor_name))
            except ManifoldError:
                outputs_z = False
            if not outputs_z:  # a chain that refuses Z, or maps it to NaN (weight_norm at Z = 0)
                _restore(snapshot)
                setattr(module, tensor_name, X.to(T.device))
                if not _finite_or_unknown(getattr(module, tensor_name)):
                    _restore(snapshot)
                    raise ManifoldError(
                        f"cannot constrain {_owner_name(module, tensor_name)} to {getattr(adapter, 'space', adapter)!r}: "
                        f"the parametrizations already on it ({_chain_names(module, tensor_name)}) output "
                        f"non-finite values for its initial point and for that point's raw tensor."
                    )
        else:
            saved = T.detach().clone()
            T.copy_(like(X, T) if isinstance(T, DTensor) else X)  # torch calls adapter.right_inverse on it
    try:
        parametrize.register_parametrization(module, tensor_name, adapter)
    except Exception:
        if not chained:
            with torch.no_grad():
                T.copy_(saved)
        elif not keep:
            _restore(snapshot)
        raise
    if parametrize.is_parametrized(module, tensor_name) and module.parametrizations[tensor_name][-1] is adapter and chained:
        _CHAINED.add(adapter)  # Note [Chained values across dtypes]
    if parametrize.is_parametrized(module, tensor_name) and module.parametrizations[tensor_name][0] is adapter:
        # The module's own _apply / _load_from_state_dict keep its points (Note [Raw tensors across dtypes]).
        _ATTACHED.add(adapter)
        _OWN_CHAIN[adapter] = weakref.ref(module.parametrizations[tensor_name])
        _RAW.pop(adapter, None)
        _TENTATIVE.pop(adapter, None)
        if isinstance(adapter, Parametrization):
            adapter._direct_raw = False
    if fsdp is not None:
        # Shard then constrain: FSDP2 swaps the unsharded parameter into the module and name it had
        # at fully_shard time (module.weight, now the parametrized property); the parameter itself
        # (the same object) is now the raw tensor parametrizations.<tensor_name>.original.
        fsdp._module_info.module, fsdp._module_info.param_name = module.parametrizations[tensor_name], "original"
    _make_picklable(module)
    return module


def _snapshot(plist: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the raw tensors and the buffers of a chain of parametrizations (Note [A failed try
    leaves the chain as it was])."""
    return [(t, t.detach().clone()) for t in itertools.chain(plist.parameters(), plist.buffers())]


def _restore(snapshot: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for t, value in snapshot:
            t.copy_(value)


def _finite_or_unknown(Y: Tensor) -> bool:
    """False only for a tensor whose values can be read and hold a NaN or an infinity."""
    return not _concrete(Y) or bool(torch.isfinite(Y).all())


def _chain_names(module: nn.Module, tensor_name: str) -> str:
    return ", ".join(type(p).__name__ for p in module.parametrizations[tensor_name])


def _fsdp_param(module: nn.Module, tensor_name: str, T: Tensor) -> Any:
    """FSDP2's record of ``module``'s sharded parameter ``T`` (private to PyTorch: README, deviations);
    raises ``ManifoldError`` if ``module`` itself was not passed to ``fully_shard``."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    state = _get_module_fsdp_state(module)
    group = None if state is None else state._fsdp_param_group
    for p in [] if group is None else group.fsdp_params:
        if p.sharded_param is T:
            return p
    raise ManifoldError(
        f"cannot constrain {_owner_name(module, tensor_name)}: expected the module itself to be sharded with "
        "fully_shard (its parameter is a DTensor of a sharded ancestor, whose FSDP2 state geofunc cannot "
        "update), got a DTensor parameter of an unsharded module. Constrain before fully_shard, or call "
        "fully_shard(module) on the constrained module itself."
    )


def parametrization_of(module: nn.Module, tensor_name: str = "weight") -> Parametrization:
    """The geofunc :class:`Parametrization` of ``module.<tensor_name>`` (raises if there is none)."""
    if parametrize.is_parametrized(module, tensor_name):
        for p in module.parametrizations[tensor_name]:
            if isinstance(p, Parametrization):
                return p
    raise ManifoldError(f"parametrization_of: expected a tensor constrained by geofunc, got "
                        f"{_owner_name(module, tensor_name)}, {_constraint_state(module, tensor_name)}.")


def _constraint_state(module: nn.Module, tensor_name: str) -> str:
    """What ``module.<tensor_name>`` is, for a message refusing a tensor geofunc does not constrain."""
    if parametrize.is_parametrized(module, tensor_name):
        return f"parametrized by {[type(p).__name__ for p in module.parametrizations[tensor_name]]} only"
    T = getattr(module, tensor_name, None) if isinstance(tensor_name, str) else None
    return f"an unconstrained {describe(T)}" if isinstance(T, torch.Tensor) else "not a tensor of the module"


def is_constrained(module: nn.Module, tensor_name: str | None = None) -> bool:
    """Whether ``module`` (or its tensor ``tensor_name``) carries a geofunc constraint."""
    if not parametrize.is_parametrized(module, tensor_name):
        return False
    names = [tensor_name] if tensor_name is not None else list(module.parametrizations)
    return any(isinstance(p, Parametrization) for n in names for p in module.parametrizations[n])


# Note [update_base in compiled code]
# update_base (gf.nn.update_base, or a class's update_base/rebase) inside torch.compile(fullgraph=True)
# raised torch's Unsupported at the first call: refining the new base (Note [Bases across dtypes]) asks
# _readable whether its values may be read, and Dynamo cannot trace the functorch C predicate there.
# A traced tensor's values cannot be read anyway (refining decides by a comparison of values), so
# _readable answers False while compiling: the base is re-centred as in eager mode and kept as the
# chart gives it; only the re-making of a base not valid in its dtype (one loaded from a checkpoint of
# another dtype) is left to eager code, as forward's check of the base is (Note [Bases checked where
# they change]). _set_base then leaves the record of checked buffers alone: tracing its write made
# Dynamo guard on the registry's length (a second graph at the second call), and the in-place copies
# bump the buffers' versions, so the next eager forward checks them once.
#
# Note [update_base of a product]
# GeoTorch's update_base assigns the current value to the tensor, so it re-centres any parametrization with
# a right_inverse, among them a user's subclass of ProductManifold (GeoTorch's building block for new
# spaces: forward(X1, ..., Xk) combines the factors, right_inverse splits a point into them). Here it
# refused such a tensor ("parametrized by ['MySpace'] only"): parametrization_of looks for an adapter in
# the chain itself, and the product's adapters are its children. A chain counts as geofunc's where any
# module in it (the chain's entries or their submodules) is a geofunc adapter; the assignment then goes
# through the user's right_inverse and the factors' ones, as in GeoTorch.
def update_base(layer: ModuleT | None = None, tensor_name: str = "weight", *, module: ModuleT | None = None) -> ModuleT:
    """Dynamic trivialization: re-centre the chart of ``layer.<tensor_name>`` at its current value.

    GeoTorch's ``update_base(layer, tensor_name)`` (``tensor_name`` defaults to ``"weight"``;
    ``module=`` is accepted for ``layer``, geofunc's earlier name). The value of the tensor does
    not change (exactly, for the orthogonal family and spheres; to rounding for factorized
    spaces), unless the base was not valid in its dtype (a float32 base loaded into a float64
    module): it is then re-made valid there, moving the point by its error (Note [Bases across
    dtypes]); the raw parameter becomes ``space.rebase``'s new coordinates (zero for SO, Stiefel,
    Grassmannian, Sphere) and the base buffers the new base. The raw parameter is updated in
    place, so optimizers keep tracking it; their state (momentum, Adam moments) is kept as is,
    as in GeoTorch: reset it if the chart moved far. Returns the module.

    The current value is computed from the raw parameter, never read from a
    :func:`cached` value, and the cached entry (if any) is dropped. It also runs inside
    ``torch.compile(fullgraph=True)``, where a base not valid in its dtype is not re-made valid (call
    it once in eager mode after loading one; Note [update_base in compiled code]).
    """
    if module is not None:
        if layer is not None and layer is not module:
            raise TypeError("update_base: give the module once (as `layer`; `module=` is its old name)")
        layer = module
    if layer is None:
        raise TypeError("update_base() missing the module: update_base(layer, tensor_name)")
    module = layer
    if not parametrize.is_parametrized(module, tensor_name):
        raise ManifoldError(f"update_base: expected a tensor constrained by geofunc, got "
                            f"{_owner_name(module, tensor_name)}, {_constraint_state(module, tensor_name)}.")
    _sharded_raw(module, tensor_name, "update_base")
    plist = module.parametrizations[tensor_name]
    first = plist[0]
    with torch.no_grad():
        if isinstance(first, Parametrization) and plist.is_tensor:
            plist.original.copy_(first.rebase(plist.original))
        else:
            if not any(isinstance(m, Parametrization) for p in plist for m in p.modules()):
                parametrization_of(module, tensor_name)  # raises: geofunc is not involved
            # a chain with a geofunc adapter, or a module built of them (a subclass of
            # geofunc.nn.ProductManifold, GeoTorch's way to define a space): Note [update_base of a product]
            setattr(module, tensor_name, plist().detach())
    parametrize._cache.pop((id(module), tensor_name), None)
    parametrize._cache.pop((id(module), tensor_name, _THREAD.token), None)  # Note [Cached values across threads]
    return module


#: ``with gf.nn.cached(): ...`` evaluates every parametrized tensor at most once inside the block
#: (``torch.nn.utils.parametrize.cached``); gradients flow through the cached value. Use it
#: around loops that reuse a constrained weight (RNN time loops, weight sharing). A cached value
#: of a tensor geofunc constrains is reused only while its raw tensor and bases are unchanged
#: (Note [A cache that sees new raw tensors]): functional_call with other parameters, in-place
#: updates, assignments and dtype changes inside the block recompute it; one computed with grad
#: serves only its own thread, until a backward frees its graph (Note [Cached values across threads]).
cached = parametrize.cached
