"""The one place where pytrees meet geometry: space functions lifted to parameter pytrees.

Every function here takes a ``constraints`` description and one or more pytrees with the
structure of the parameters (``dict(model.named_parameters())``, the output of
``torch.func.stack_module_state``, or any pytree optree understands), calls the space's
method on every constrained entry and passes every other entry through untouched (the
very same object, never a copy).

**Constraints.** ``constraints`` is a *prefix* of the parameter pytree whose leaves are
spaces (or ``None`` for "unconstrained"), where mappings may list only some keys:

* ``{"0.weight": gf.SO(), "2.weight": gf.Stiefel()}`` on ``dict(model.named_parameters())``
  (names as ``named_parameters()`` writes them); on a nested dict a dotted name
  ``"encoder.w"`` reaches ``params["encoder"]["w"]`` and an integer-like segment an entry
  of a list or tuple;
* ``{"encoder": {"w": gf.SO()}}`` or ``(gf.Sphere(), None)``: a structural prefix;
* a space at an inner node applies to every tensor below it, each its own entry named by
  its path (``{"layers": gf.SO()}`` on a list of square weights), except a
  :class:`~geofunc.Product`, whose point *is* the subtree (a tuple of tensors):
  ``{"pair": gf.Product(gf.SO(), gf.Sphere())}`` on ``params = {"pair": (A, b), ...}``.
  A product of *separately named* parameters needs no ``Product``: constrain each name
  (a tuple of names is not a key; see :data:`TUPLE_KEY_MSG`).

The forms combine: ``{"layers": {"0": gf.SO()}, "layers.1": gf.SO()}`` is
``{"layers.0": gf.SO(), "layers.1": gf.SO()}`` (a dotted name is merged into the mapping,
or the structural prefix, given for the subtree it reaches into). Each parameter takes one
constraint: two keys that reach the same parameter (``0`` and ``"0"``, ``"a.b"`` and
``{"a": {"b": ...}}``, a space for a whole subtree and a name below it) are a
:class:`~geofunc.ManifoldError` naming the parameter and both keys. A name that matches no
parameter, or a space that cannot take the parameter's shape, raises ``ManifoldError``
naming the parameter.

**Names.** A constrained entry is named by its path joined by ``"."``. Where results are
keyed by these names (``bases``, ``gf.contains``), two constrained entries whose paths
join to the same name (``{"a": {"b.c": X}, "a.b": {"c": Y}}``, or the keys ``0`` and
``"0"`` of one dict) would share one key: ``from_manifold``, ``to_manifold``, ``rebase``
and ``contains`` raise a ``ManifoldError`` naming both paths instead (rename a key).

**Unconstrained entries.** ``tangent``, ``egrad_to_rgrad`` and ``transport`` are the
identity there and return the vector as given (``None`` included). ``retract`` computes
``X + V`` and, as on constrained entries, needs a tensor ``V`` of the shape of ``X``:
``None`` or another shape is a ``ManifoldError`` naming the parameter (a missing step is
not skipped silently; ``gf.optim`` turns a ``None`` gradient into its own message).

**Bases.** ``bases`` is a flat ``dict`` from the *name* of a constrained entry (its path,
joined by ``"."``: the ``named_parameters()`` name for a flat dict) to its base, holding
only entries whose space returned a base (``None`` bases are left out, as are
unconstrained entries). It therefore has no ``None`` leaves, so ``torch.func.vmap(f,
in_dims=0)`` over ``(raw, bases)`` of stacked models works without an ``in_dims`` tree,
and it comes back out of ``vmap`` unchanged in form. A :class:`~geofunc.Product` entry's base
is the tuple of its factors' bases with ``()`` where a factor has none (``Rn``, ``Sym``, ...),
for the same reason (Note [Bases of products without None]). ``bases=None`` means every base is
canonical.
"""

from __future__ import annotations

import collections
import contextvars
from collections.abc import Mapping
from typing import Any, Callable, Optional

import optree
import torch

from ._dtensor import DTensor, placed_like
from ._errors import ManifoldError, describe
from ._fused import one_node
from .spaces import Product
from .spaces._base import LOW_PRECISION, AbstractSpace, is_space

__all__ = ["sample", "from_manifold", "to_manifold", "rebase", "tangent", "retract", "contains"]

PyTree = Any
Constraints = Any
Bases = dict[str, Any]
#: ``bases`` as the functions take it: the dict they return, or any mapping (read only).
BasesIn = Mapping[str, Any]

TUPLE_KEY_MSG = (
    "constraints: the key {key!r} is a tuple; keys name one parameter (or subtree) each. "
    "Independent parameters already form a product manifold: constrain each name on its own. "
    "A `Product` applies to one subtree whose value is a tuple of tensors, e.g. "
    "{{'pair': gf.Product(gf.SO(), gf.Sphere())}} on params {{'pair': (A, b)}}."
)


class _Free:
    """Marks an unconstrained subtree in a plan."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unconstrained>"


_FREE = _Free()


class _Entry:
    """Marks a constrained subtree in a plan: its name and its space."""

    __slots__ = ("name", "path", "space")

    def __init__(self, path: tuple[Any, ...], space: AbstractSpace) -> None:
        self.name = _join(path)
        self.path = path
        self.space = space

    def __repr__(self) -> str:
        return f"<{self.name}: {self.space!r}>"


def _is_plan_leaf(x: Any) -> bool:
    return isinstance(x, (_Free, _Entry))


def _join(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _children(p: Any) -> tuple[list[Any], list[Any], Callable[[list[Any]], Any]] | None:
    """One level of a pytree node: (entries, children, rebuild), or None for a leaf."""
    if isinstance(p, torch.Tensor) or optree.tree_is_leaf(p, none_is_leaf=True):
        return None
    if type(p) in (dict, collections.OrderedDict):  # keep the insertion order of the keys
        keys = list(p)
        return keys, [p[k] for k in keys], lambda cs: type(p)(zip(keys, cs))
    out = optree.tree_flatten_one_level(p, none_is_leaf=True)
    return list(out.entries), list(out.children), lambda cs: out.unflatten_func(out.metadata, cs)


def _no_such(name: str, p: Any) -> ManifoldError:
    node = _children(p)
    have = [str(e) for e in node[0]] if node is not None else []
    shown = ", ".join(repr(h) for h in have[:12]) + (", ..." if len(have) > 12 else "")
    return ManifoldError(f"constraints: no parameter named {name!r} (parameters here: {shown or 'none'}).")


def _plan(c: Any, p: Any, path: tuple[Any, ...]) -> Any:
    """A prefix of ``p`` whose leaves are ``_Entry`` (constrained) or ``_FREE``."""
    if c is None:
        return _FREE
    node = _children(p)
    if is_space(c):
        if node is None or type(c) is Product:
            return _Entry(path, c)
        # a tensor space at an inner node: every tensor below is its own constrained entry
        entries, kids, rebuild = node
        return rebuild([_plan(c, kid, path + (e,)) for e, kid in zip(entries, kids)])
    if node is None:
        where = f" for parameter {_join(path)!r}" if path else ""
        raise ManifoldError(
            f"constraints{where}: expected a space (the entry is a single tensor), got {_what(c)}."
        )
    entries, kids, rebuild = node
    if isinstance(c, Mapping):
        sub: dict[int, dict[Any, Any]] = {}
        index = _Index(entries)  # Note [Matching keys by index]
        for key, value in c.items():
            if isinstance(key, tuple):
                raise ManifoldError(TUPLE_KEY_MSG.format(key=key))
            i = index.match(key)
            if i is not None:
                spec = sub.setdefault(i, {})
                if None in spec:  # two keys naming one entry (0 and "0"): neither may silently win
                    other = next(k for k in c if k is not key and index.match(k) == i)
                    raise _twice(path + (entries[i],), other, key, path)
                spec[None] = value
                continue
            hit = None
            if isinstance(key, str):  # a dotted name reaching into a nested entry
                parts = key.split(".")
                for cut in range(1, len(parts)):
                    j = index.match(".".join(parts[:cut]))
                    if j is not None:
                        hit = (j, ".".join(parts[cut:]))
                        break
            if hit is None:
                raise _no_such(_join(path + (key,)), p)
            sub.setdefault(hit[0], {})[hit[1]] = value
        out = []
        for i, (e, kid) in enumerate(zip(entries, kids)):
            spec = sub.get(i)
            if spec is None:
                out.append(_FREE)
            elif None in spec:
                if len(spec) > 1:  # the subtree's own constraint and dotted names reaching into it
                    out.append(_plan(_merge(spec, kid, path + (e,)), kid, path + (e,)))
                else:
                    out.append(_plan(spec[None], kid, path + (e,)))
            else:
                out.append(_plan(spec, kid, path + (e,)))
        return rebuild(out)
    cnode = _children(c)
    if cnode is None or len(cnode[1]) != len(kids) or type(c) is not type(p):
        where = f" at {_join(path)!r}" if path else ""
        raise ManifoldError(
            f"constraints{where}: expected a space, None, a mapping of names, or a {type(p).__name__} of "
            f"{len(kids)} entries like the parameters, got {_what(c)}."
        )
    return rebuild([_plan(ci, kid, path + (e,)) for ci, kid, e in zip(cnode[1], kids, entries)])


def _what(c: Any) -> str:
    """A wrong constraint entry for a message: a tensor by its shape and dtype, a sequence by its length, never
    tensor values (README, "Errors")."""
    return describe(c) if isinstance(c, (torch.Tensor, tuple, list)) else f"{type(c).__name__} {c!r}"


def _match(key: Any, entries: list[Any]) -> int | None:
    """The index of the first entry that ``key`` names: equal to it, or (a string key) its ``str``."""
    for i, e in enumerate(entries):
        if key == e or (isinstance(key, str) and not isinstance(e, str) and key == str(e)):
            return i
    return None


# Note [Matching keys by index]
# _plan matched each key of a constraints mapping by a scan of the node's entries (_match), so a
# plan of a model with N parameters and M constrained ones cost O(N·M) comparisons, and every lift
# (each optimizer step makes four: egrad_to_rgrad, the second moments, retract, transport) plans
# again (now once per step: Note [One plan per step]): 2.6 ms per plan at 200 small parameters, 64 ms at 800
# (a third of a radam step there).
# _Index answers the same question, the first entry equal to the key or (a string key) whose str
# it is, from two dicts built once per node: O(N + M). An entry or key that is not hashable (a
# custom pytree node's) falls back to the scan.
class _Index:
    """``_match(key, entries)`` by lookup (Note [Matching keys by index])."""

    __slots__ = ("entries", "exact", "named")

    def __init__(self, entries: list[Any]) -> None:
        self.entries = entries
        self.exact: Optional[dict[Any, int]] = {}
        self.named: dict[str, int] = {}
        try:
            for i, e in enumerate(entries):
                self.exact.setdefault(e, i)
                if not isinstance(e, str):
                    self.named.setdefault(str(e), i)
        except TypeError:  # an unhashable entry: scan
            self.exact = None

    def match(self, key: Any) -> int | None:
        if self.exact is None:
            return _match(key, self.entries)
        try:
            i = self.exact.get(key)
        except TypeError:  # an unhashable key: scan
            return _match(key, self.entries)
        if isinstance(key, str):
            j = self.named.get(key)
            if j is not None and (i is None or j < i):
                i = j
        return i


def _twice(param: tuple[Any, ...], a: Any, b: Any, where: tuple[Any, ...]) -> ManifoldError:
    """Two keys ``a`` and ``b`` of the constraints for ``where`` reach the parameter ``param``."""
    at = f" of the constraints for {_join(where)!r}" if where else ""
    return ManifoldError(
        f"constraints: parameter {_join(param)!r} is constrained twice: the keys {a!r} and {b!r}{at} both reach it; "
        "give each parameter one constraint."
    )


def _merge(spec: dict[Any, Any], p: Any, path: tuple[Any, ...]) -> Any:
    """One mapping for the subtree ``p`` at ``path``, given both its own constraint (``spec[None]``:
    a mapping or a structural prefix) and dotted names reaching into it (the other keys of
    ``spec``). Only for that (rare) form of constraints. A space or ``None`` for the whole
    subtree plus a name below it is a real double constraint."""
    head = spec[None]
    rest = {k: v for k, v in spec.items() if k is not None}
    if isinstance(head, Mapping):
        merged = dict(head)
    else:
        node = _children(p)
        cnode = None if head is None or is_space(head) else _children(head)
        if cnode is None or node is None or type(head) is not type(p) or len(cnode[1]) != len(node[1]):
            _plan(rest, p, path)  # a name below that reaches no parameter: say that first
            if head is not None and not is_space(head):
                return head  # a malformed prefix: _plan(head) words the error
            name = next(iter(rest))
            raise ManifoldError(
                f"constraints: parameter {_join(path + (name,))!r} is constrained twice: {_join(path)!r} gives "
                f"{head!r} for every tensor below it and {_join(path + (name,))!r} names it; give each parameter "
                "one constraint (a mapping for the subtree, or a name for each of its entries)."
            )
        # a structural prefix: its entries by key, None there meaning "not constrained"
        merged = {e: ci for e, ci in zip(node[0], cnode[1]) if ci is not None}
    return _combine(merged, rest, path)


def _combine(head: dict[Any, Any], rest: Mapping[Any, Any], path: tuple[Any, ...]) -> dict[Any, Any]:
    """``head`` (a mapping for the subtree at ``path``) with the dotted names ``rest`` reaching into
    it; a key in both must map to two mappings, combined the same way. Keys that differ but
    name one entry (0 and "0", "b" and "b.c") meet again one level down, in ``_plan``."""
    merged = dict(head)
    for k, v in rest.items():
        if k in merged:
            if not (isinstance(merged[k], Mapping) and isinstance(v, Mapping)):
                raise ManifoldError(
                    f"constraints: parameter {_join(path + (k,))!r} is constrained twice: the key {k!r} in the "
                    f"constraints for {_join(path)!r} and the name {_join(path + (k,))!r} both reach it; give "
                    "each parameter one constraint."
                )
            v = _combine(merged[k], v, path + (k,))
        merged[k] = v
    return merged


# Note [One plan per step]
# An optimizer step lifts four maps over one `params` (egrad_to_rgrad, Adam's squared norms, retract,
# transport), and each planned the constraints against it again: ~1.4 ms a plan at 800 small parameters,
# four per radam step. A plan reads only the constraints and the tree's structure, and within one step
# neither changes: `retract_and_transport` runs its update inside `one_plan()`, where `_flatten` keeps the
# plan of each (constraints, tree) pair by the objects' identities (held, so an id is not reused) and
# answers the next map over the very same two objects from it. Another tree (the step's new points, a
# vector tree given first) or other constraints is planned as before; outside `one_plan` nothing is kept,
# and under torch.compile it is not entered (the plan is a trace-time cost there). The tree is still
# flattened against the kept plan's spec: a tree mutated in place within the step (no transform of
# geofunc does that) whose dict keys changed raises a ManifoldError instead of being planned again.
_PLANS: contextvars.ContextVar[Optional[dict[int, tuple[Any, Any, list[Any], Any]]]] = contextvars.ContextVar(
    "geofunc_plans", default=None)


class one_plan:
    """Within the block, each (constraints, tree) pair is planned once (Note [One plan per step])."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _PLANS.set({})

    def __exit__(self, *exc: Any) -> None:
        _PLANS.reset(self.token)


def _flatten(constraints: Constraints, tree: PyTree, what: str) -> tuple[list[Any], Any, list[Any]]:
    """Plan leaves, the plan's spec, and the subtrees of ``tree`` at the plan's leaves."""
    plans = None if torch.compiler.is_compiling() else _PLANS.get()  # (Dynamo cannot trace ContextVar.get)
    if plans is not None:
        kept = plans.get(id(tree))
        if kept is not None and kept[0] is constraints and kept[1] is tree:
            return kept[2], kept[3], _up_to(kept[3], tree, what, what)
    plan = _plan(constraints, tree, ())
    leaves, spec = optree.tree_flatten(plan, is_leaf=_is_plan_leaf, none_is_leaf=True)
    subs = _up_to(spec, tree, what, what)
    if plans is not None:
        plans[id(tree)] = (constraints, tree, leaves, spec)
    return leaves, spec, subs


def _up_to(spec: Any, tree: PyTree, what: str, like: str) -> list[Any]:
    try:
        return spec.flatten_up_to(tree)
    except ValueError:
        # optree's own message prints the offending subtree, tensor values included: name the
        # two structures instead (tensors show as *).
        got = optree.tree_structure(tree, none_is_leaf=True)
        raise ManifoldError(
            f"`{what}` must have the structure of `{like}`: expected a tree with the prefix {spec}, got {got}."
        ) from None


class _FreeError(Exception):
    """A bad vector on an unconstrained entry (raised by ``free`` of ``_map``, which adds the name).
    ``sub``: the path below the entry (inside an unconstrained subtree)."""

    def __init__(self, expected: str, got: str, sub: tuple[Any, ...] = (), op: str = "X + V") -> None:
        super().__init__(expected, got, sub)
        self.expected, self.got, self.sub, self.op = expected, got, sub, op

    def named(self, path: tuple[Any, ...]) -> ManifoldError:
        return ManifoldError(
            f"parameter {_join(path + self.sub)!r} (unconstrained: {self.op}): expected {self.expected}, got {self.got}."
        )


def _collision(a: _Entry, b: _Entry) -> ManifoldError:
    return ManifoldError(
        f"constraints: the constrained entries at the paths {a.path!r} and {b.path!r} are both named {a.name!r} "
        "(a path joined by '.'), the key of `bases` and of gf.contains: one would overwrite the other. "
        "Rename a key so that the joined names differ."
    )


def _add(X: Any, V: Any) -> Any:
    """``X + V`` on an unconstrained entry (``gf.retract``): ``V`` a tensor of the shape of ``X``."""
    if isinstance(X, torch.Tensor):
        if isinstance(V, torch.Tensor) and V.shape == X.shape:
            return _sum(X, V)
        # (under torch.compile too: shapes are static there, and X + V would broadcast a wrong-shaped V
        # silently: Note [Vectors at unconstrained entries])
        raise _vector_error(X, V, "X + V")
    if X is not None and _children(X) is None:  # a non-tensor leaf (a Python number): as torch.add takes it
        try:
            return torch.add(X, V)
        except (TypeError, RuntimeError):
            raise _FreeError(f"`V` that adds to `X` ({describe(X)})", describe(V)) from None
    out, xspec = _over_subtree(X, V, _add, "X + V")
    return xspec.unflatten(out)


def _over_subtree(X: Any, V: Any, leaf: Callable[[Any, Any], Any], op: str) -> tuple[list, Any]:
    """``leaf(x, v)`` over the leaves of an unconstrained subtree ``X`` and the matching ones of ``V``,
    a mismatch or a leaf's error named by its path; the results and ``X``'s tree spec."""
    paths, xs, xspec = optree.tree_flatten_with_path(X, none_is_leaf=False)
    try:
        vs = xspec.flatten_up_to(V)
    except ValueError:
        got = optree.tree_structure(V, none_is_leaf=True)
        raise _FreeError(f"`V` with the structure of `X` {xspec}", str(got), op=op) from None
    out = []
    for path, x, v in zip(paths, xs, vs):
        try:
            out.append(leaf(x, v))
        except _FreeError as err:
            raise _FreeError(err.expected, err.got, path + err.sub, op=op) from None
    return out, xspec


def _vector_error(X: torch.Tensor, V: Any, op: str) -> Optional[_FreeError]:
    """Why ``V`` is not a vector at the unconstrained tensor ``X`` (None if it is): a tensor of its
    shape and device, of its dtype or float32 for a bf16/fp16 ``X`` (Note [The dtype of an
    unconstrained step])."""
    if not isinstance(V, torch.Tensor):
        return _FreeError("`V` to be a tensor", describe(V), op=op)
    if V.shape != X.shape:
        return _FreeError(f"`V` with the shape of `X` {tuple(X.shape)}", f"shape {tuple(V.shape)}", op=op)
    if V.device != X.device:
        return _FreeError(f"`V` on the device of `X` ({X.device})", f"{describe(V)} on {V.device}", op=op)
    if V.dtype != X.dtype and not (X.dtype in LOW_PRECISION and V.dtype == torch.float32):
        also = " or torch.float32" if X.dtype in LOW_PRECISION else ""
        return _FreeError(f"`V` of the dtype of `X` ({X.dtype}{also})", describe(V), op=op)
    return None


# Note [The dtype of an unconstrained step]
# ``retract`` on an unconstrained entry keeps the parameter's dtype, with the rule of the constrained
# entries (Note [Low precision] in geofunc/spaces/_base.py): ``V`` of ``X``'s dtype, or float32 for a
# bf16/fp16 ``X`` (summed in float32, rounded back). Torch's promotion silently turned a bf16 bias into
# a float32 one (and a float32 one into float64) while the constrained weight of the same call stayed
# bf16 (or was refused): a gf.optim step of a bf16 model with float32 gradients left every unconstrained
# parameter float32. A dtype comparison only (static under torch.compile and vmap).
def _sum(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``X + V`` in the dtype of ``X`` (Note [The dtype of an unconstrained step])."""
    if V.dtype == X.dtype and V.device == X.device:  # the common case
        return X + V
    err = _vector_error(X, V, "X + V")
    if err is not None:
        raise err
    return (X + V).to(X.dtype)  # a float32 V at a bf16/fp16 X


# Note [Vectors at unconstrained entries]
# tangent, egrad_to_rgrad and transport are the identity on an unconstrained entry, and took whatever
# came there: a gradient of another shape (radam broadcast a (1,) gradient over a (3,) bias, silently,
# where rsgd's X + V refused it), an integer one (Adam raised torch.finfo's TypeError), a NumPy array
# (AttributeError: 'is_complex'); gf.tangent returned a list as the tangent vector of a bias. They now
# check the vector as retract checks it (Note [The dtype of an unconstrained step]): a tensor of X's
# shape and device, of X's dtype or float32 for a bf16/fp16 X, returned as it is. None passes (retract,
# and an optimizer's step, name a missing gradient). Metadata comparisons only (nothing traced; the
# usual case is one comparison each of shape, dtype and device), so a tensor entry is checked under
# torch.compile as well: skipped there, a compiled radam or retract broadcast a (1,) gradient over a
# (3,) bias silently while the eager step refused it.
_IDENTITY = "the identity on V"


def _vector_at(X: Any, V: Any) -> Any:
    """``V`` itself, checked as a vector at the unconstrained entry ``X`` (Note [Vectors at unconstrained entries])."""
    if isinstance(V, torch.Tensor) and isinstance(X, torch.Tensor):
        if V.shape == X.shape and V.dtype == X.dtype and V.device == X.device:  # the usual case
            return V
    if V is None:
        return V
    if isinstance(X, torch.Tensor):  # under torch.compile too (metadata only, static there)
        err = _vector_error(X, V, _IDENTITY)
        if err is not None:
            raise err
        return V
    if X is None or _children(X) is None:  # a non-tensor leaf (a Python number): as before
        return V
    # A subtree under torch.compile too (Dynamo traces optree's flatten, as retract's _add already did): with
    # the check skipped there, a compiled radam broadcast a (1,) gradient over a nested (3,) bias silently
    # and gf.tangent returned it as the bias's vector, where the eager calls raise
    _over_subtree(X, V, _vector_at, _IDENTITY)
    return V


def _named(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a space method; in eager mode prefix a ManifoldError with the parameter's name."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except ManifoldError as e:
        raise ManifoldError(f"parameter {name!r}: {e}") from None


def _shape_of(X: Any) -> Any:
    if isinstance(X, torch.Tensor):
        return X.shape
    return optree.tree_map(lambda t: t.shape, X)


def _first_leaf(X: Any) -> torch.Tensor:
    return optree.tree_leaves(X)[0]


# Note [Stacked entries]
# An optimizer step lifts four maps (egrad_to_rgrad, Adam's squared norms, retract, transport) over every
# constrained entry, one space call each: with many small parameters (800 Stiefel 6x2 / Sphere(8) / SO(3)
# frames, a transformer's heads, an ensemble's layers) a step was the Python and dispatch overhead of
# some 40 ops per entry (a retraction alone 30-40 ops), not arithmetic, 1.7x geoopt's RiemannianAdam. A
# space's maps take leading dims as a batch, so the entries of one space, shape and dtype are one batch:
# _stacked maps them in one call (torch.stack per argument, one call, unbind) where every argument is a
# plain CPU tensor outside any transform (eager; no vmap, torch.func.grad, DTensor or other subclass, no
# autograd graph to build) and the space is one whose maps are measured batch for batch the same as one
# by one: Stiefel, Sphere and SO (the same bits, except the retractions through a matrix exponential, SO's
# and Stiefel's canonical metric's, whose degree is picked from the batch: within 3 ulp,
# tests/test_optim_stacked.py), Grassmannian and Oblique (the same bits: CholeskyQR2's scale and its
# trust check are per matrix, Oblique's normalization and its zero-column rule per column, so a zero,
# rank-deficient, NaN or 1e150 member beside normal ones gives what it gives alone). Adam's squared
# norm of a column-major vector (a frame's layout) is summed in another order once stacked (torch.stack
# makes it contiguous): within 2 ulp, for every stacked space. Anything else, a group of one,
# a group whose entries are not points of the space on their own (their stack could be one: 3 scalars
# on Sphere() are a (3,) vector), a space with a user's `triv` (it may not take a batch as each matrix)
# or an unhashable hyperparameter, and any error of the batched call (the per-entry call then raises it
# with the parameter's name) take the per-entry path. Each result is cloned out of the group's tensor,
# a tensor of its own as one by one (its storage, its autograd version counter): 10-20% of the stacked
# step (radam over 800 small parameters 54 → 60 ms, 0.70x geoopt's RiemannianAdam; REFACTOR-session-2026-12-06g).
# Only small entries stack (at most _STACK_MAX_NUMEL elements each): the gain is the per-call overhead,
# the cost the copies (torch.stack of every argument, the clones) and batched kernels that run slower over
# many large matrices than over each; above ~4-8k elements an entry's own arithmetic outweighs its
# overhead, and a group of large entries stepped 1.2-3.8x slower than one by one (radam, 16 entries, one
# thread: Stiefel 512x128 50 → 102 ms, Sphere(262144) 30 → 113 ms), its extra peak memory 2.4x (rsgd over 16
# Stiefel 2048x512 float32: 205 → 490 MB above the parameters').
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_STACKABLE: tuple[type, ...] = ()
_STACK_MAX_NUMEL = 4096  # elements of an entry (its batch included); larger ones map one by one (Note [Stacked entries])


def _stackable() -> tuple[type, ...]:
    global _STACKABLE
    if not _STACKABLE:
        from .spaces import SO, Grassmannian, Oblique, Sphere, Stiefel

        _STACKABLE = (Stiefel, Sphere, SO, Grassmannian, Oblique)
    return _STACKABLE


def _stacked(leaves: list[Any], cols: list[list[Any]], fn: Callable[..., Any]) -> dict[int, Any]:
    """``{leaf index: fn(entry, *args)}`` for the entries mapped as batches (Note [Stacked entries]). A nested
    tensor (whose shape torch cannot give) is left to the per-entry call, which refuses it by name (Note
    [Dense tensors only] in ``geofunc/spaces/_base.py``)."""
    kinds = _stackable()
    grad = torch.is_grad_enabled()
    groups: dict[Any, list[int]] = {}
    first, rest = cols[0], cols[1:]
    for i, e in enumerate(leaves):
        if type(e) is not _Entry or type(e.space) not in kinds:
            continue
        x = first[i]
        if (type(x) not in _PLAIN or not x.is_cpu or x.is_nested or x.numel() > _STACK_MAX_NUMEL
                or (grad and x.requires_grad) or (_wrapped is not None and _wrapped(x))):
            continue
        shape, dtype = x.shape, x.dtype
        for col in rest:  # the other arguments: plain tensors of the point's shape and dtype
            a = col[i]
            if (type(a) not in _PLAIN or not a.is_cpu or a.dtype != dtype or a.is_nested or a.shape != shape
                    or (grad and a.requires_grad) or (_wrapped is not None and _wrapped(a))):
                break
        else:
            if callable(getattr(e.space, "triv", None)):  # a user's map: it may not take a batch as each matrix
                continue
            try:
                groups.setdefault((e.space, shape, dtype), []).append(i)
            except TypeError:  # an unhashable hyperparameter: one by one
                continue
    done: dict[int, Any] = {}
    for (space, _, _), idx in groups.items():
        if len(idx) < 2:
            continue
        try:
            # An entry's own point shape first: a stack of entries that are not points can be one (3 scalars
            # on Sphere() a (3,) vector, 3 (3,) ones on SO() a 3x3 matrix), mapped silently as one point
            space._check_shape(first[idx[0]])
            res = fn(leaves[idx[0]], *[torch.stack([col[i] for i in idx]) for col in cols])
        except Exception:  # the per-entry call raises it, naming the parameter
            continue
        if type(res) is not torch.Tensor or res.ndim == 0 or res.shape[0] != len(idx):
            continue
        # Each result its own tensor, as one by one: views of the group's would share its storage (a
        # torch.save of one parameter wrote the group's) and its autograd version counter (an in-place
        # change of one made backward through another raise "modified by an inplace operation").
        done.update(zip(idx, (t.clone() for t in res.unbind(0))))
    return done


def _map(
    constraints: Constraints,
    fn: Callable[..., Any],
    tree: PyTree,
    *rests: PyTree,
    names: tuple[str, ...] = ("params",),
    check: str | None = None,
    free: Callable[..., Any] = lambda X, *rest: X,
    keyed: dict[str, _Entry] | None = None,
    stack: bool = False,
    same_shape: bool = False,
) -> PyTree:
    """The one lift: ``fn(entry, *subtrees)`` at every constrained entry, ``free(*subtrees)`` elsewhere.

    ``rests`` have the structure of ``tree`` (``names`` name ``tree`` and each of them in error
    messages); ``check`` names the first subtree in the eager shape check of its space (``None``:
    no check). A ``ManifoldError`` of ``fn`` is prefixed with the parameter's name, a
    ``_FreeError`` of ``free`` becomes one naming the parameter. ``keyed``: the caller keys
    results by entry name; it is filled with ``{name: entry}`` and two entries of one name raise
    (one dict operation per constrained entry). ``stack``: ``fn`` maps a batch of points as each of
    them (a space's method), so entries of one space, shape and dtype may be mapped in one call
    (Note [Stacked entries]). ``same_shape``: each of ``rests`` at a constrained entry has the shape of
    its point, as at an unconstrained one (Note [Vectors of another shape at constrained entries]).
    """
    leaves, spec, subs = _flatten(constraints, tree, names[0])
    cols = [subs] + [_up_to(spec, r, n, names[0]) for r, n in zip(rests, names[1:])]
    done = _stacked(leaves, cols, fn) if stack and not torch.compiler.is_compiling() else None
    out = []
    for e, *args in zip(leaves, *cols):
        if done:
            r = done.get(len(out), done)
            if r is not done:
                out.append(r)
                continue
        if isinstance(e, _Free):
            try:
                out.append(free(*args))
            except _FreeError as err:  # name the parameter only now: free entries carry no name
                raise err.named(spec.paths()[len(out)]) from None
            continue
        if keyed is not None:
            if keyed.setdefault(e.name, e) is not e:
                raise _collision(keyed[e.name], e)
        if check is not None and not torch.compiler.is_compiling():
            # also for a non-tensor entry (None, a tuple under a non-Product space, ...): the
            # space's check names what it expected instead of a later IndexError/AttributeError.
            _named(e.name, e.space._check_shape, args[0], check)
        if same_shape:  # metadata only: under torch.compile and vmap too (Note [Vectors of another shape at constrained entries])
            for what, a in zip(names[1:], args[1:]):
                if _other_shape(args[0], a):
                    raise ManifoldError(f"parameter {e.name!r}: {e.space!r}: expected `{what}` with the shape of "
                                        f"`{names[0]}` {_shapes(args[0])}, got shape {_shapes(a)}.")
        out.append(_named(e.name, fn, e, *args))
    return spec.unflatten(out)


# Note [Vectors of another shape at constrained entries]
# A space's maps take leading dims as a batch and broadcast them, so gf.retract, gf.tangent,
# gf.egrad_to_rgrad and gf.transport took at a constrained entry a vector of another shape than its
# point, while they refuse one at an unconstrained entry (Note [Vectors at unconstrained entries]) and
# gf.retract's docstring promises the refusal "on constrained ones" too: a (2, 5, 3) gradient (per-example
# gradients not reduced, an ensemble's fed to one model) made a Stiefel (5, 3) parameter a batch of two
# points after one rsgd or radam step, and a (5, 3) or (1, 5, 3) gradient for a (2, 5, 3) batch of points
# stepped every point by the same one, silently. The four maps check that every other argument at a
# constrained entry has the shape of the point (per factor of a Product): a shape comparison per entry,
# metadata only (static under torch.compile, logical under vmap); a value that is no tensor is left to
# the space, which names what it expected.
def _other_shape(X: Any, V: Any) -> bool:
    """Whether ``V`` is a tensor (or a tuple of them, a Product's) of another shape than the point ``X``."""
    if isinstance(X, torch.Tensor):
        return isinstance(V, torch.Tensor) and not (X.is_nested or V.is_nested) and V.shape != X.shape
    if isinstance(X, (tuple, list)) and isinstance(V, (tuple, list)):
        return len(X) == len(V) and any(_other_shape(x, v) for x, v in zip(X, V))
    return False


def _shapes(X: Any) -> Any:
    """``X``'s shape as a tuple (a tuple of them for a Product's tuple) for a message."""
    if isinstance(X, (tuple, list)):
        return tuple(_shapes(x) for x in X)
    return tuple(X.shape) if isinstance(X, torch.Tensor) else describe(X)


# --------------------------------------------------------------------------- public API
# Note [Sampling DTensors]
# A DTensor entry (a parameter sharded by FSDP2 or ``distribute_tensor``) is replaced by a DTensor
# with its mesh and placements, not by a plain tensor of its full shape: that mixed plain and
# DTensor entries in one tree (PyTorch's error at the next map) and, where the ranks' generators
# differ (the global RNG of each process), gave every rank another point of what was one sharded
# tensor. The full point is drawn on every rank and ``distribute_tensor`` scatters rank 0's draw,
# so the ranks hold one point, whatever their generators (one collective per entry).
# Note [Sampling products like their entries]
# A Product's factors may have their own dtypes and devices (its docstring), while Product.sample
# takes one dtype and device for all: gf.sample passed the first factor's, so the other factors of
# an entry (A float64, b float32) came back float64, and a complex factor beside a real one
# (Product(Unitary(), SO()) on (complex64, float32)) raised ("SO is a real space, got complex64").
# A product entry is drawn factor by factor, each like its own tensor, in Product.sample's order
# (the same draws from the generator: the same points where the dtypes agree), errors naming the
# factor as Product's do.
def _sample_like(space: Any, X: Any, generator: torch.Generator | None) -> Any:
    """A point of ``space`` with the shape, dtype and device of the entry ``X`` (per factor of a
    ``Product``: Note [Sampling products like their entries])."""
    if type(space) is Product and isinstance(X, (tuple, list)) and len(X) == len(space.factors):
        return space._each(lambda M, x: _sample_like(M, x, generator), tuple(X))
    ref = _first_leaf(X)
    return space.sample(_shape_of(X), generator=generator, dtype=ref.dtype, device=ref.device)


def sample(constraints: Constraints, params: PyTree, *, generator: torch.Generator | None = None) -> PyTree:
    """Replace every constrained entry of ``params`` by a random point of its space.

    Each point has the shape, dtype and device of the entry it replaces (leading
    dimensions are a batch: on stacked parameters of K models this draws K independent
    points); unconstrained entries are returned as they are. Draws come from
    ``generator`` only (``None``: the global generator). A DTensor entry gives a DTensor
    with its mesh and placements holding rank 0's draw on every rank (a collective: every rank
    calls ``sample``).
    """

    def draw(e: _Entry, X: Any) -> Any:
        ref = _first_leaf(X)
        point = _sample_like(e.space, X, generator)
        if isinstance(ref, DTensor):  # Note [Sampling DTensors]
            return optree.tree_map(placed_like, point, X, none_is_leaf=True)
        return point

    return _map(constraints, draw, params, check="X")


# Note [Bases of products without None]
# `bases` leaves out the entries whose base is None so that vmap(f, in_dims=0) over (raw, bases) of stacked
# models needs no in_dims tree (the module docstring): vmap refuses a None leaf, in its inputs (in_dims=0)
# and in its outputs. A Product's base is the tuple of its factors' bases, None for a factor without one
# (Rn, Sym, Skew, Hermitian, SphereEmbedded), so a Product(SO(), Rn()) entry put a None leaf in `bases`:
# vmap(gf.from_manifold), vmap(gf.to_manifold) over the bases and vmap(gf.rebase) raised, where the same
# factors constrained apart worked. In `bases` such a factor's base is () (a node without leaves, in
# torch's pytree and optree; no space's base is an empty tuple), and a Product whose factors have no base
# at all has none; the maps read () back as None, and still take None itself.
def _stored_base(space: Any, base: Any) -> Any:
    """``base`` as ``bases`` holds it: a Product's factors' None bases as () (Note [Bases of products without None])."""
    if base is None or type(space) is not Product or not isinstance(base, (tuple, list)):
        return base
    parts = [_stored_base(M, b) for M, b in zip(space.factors, base)]
    if all(p is None for p in parts):
        return None
    return tuple(() if p is None else p for p in parts)


def _given_base(space: Any, base: Any) -> Any:
    """``base`` as the space takes it: () for a Product's factor is None (Note [Bases of products without None])."""
    if type(space) is not Product or not isinstance(base, (tuple, list)) or len(base) != len(space.factors):
        return base
    return tuple(None if isinstance(b, tuple) and not b else _given_base(M, b) for M, b in zip(space.factors, base))


def from_manifold(constraints: Constraints, params: PyTree) -> tuple[PyTree, Bases]:
    """``(raw, bases)`` with ``to_manifold(constraints, raw, bases) == params``.

    ``raw`` has the structure of ``params`` (unconstrained entries are the same objects);
    ``bases`` is a dict ``{name: base}`` of the constrained entries that have a base.
    Raises ``ManifoldError`` naming the parameter if a constrained entry is off its space
    (in eager mode).
    """
    bases: Bases = {}

    def inverse(e: _Entry, X: Any) -> Any:
        Z, base = e.space.from_manifold(X)
        base = _stored_base(e.space, base)
        if base is not None:
            bases[e.name] = base
        return Z

    return _map(constraints, inverse, params, check="X", keyed={}), bases


def _centred(constraints: Constraints, raw: PyTree, bases: BasesIn | None, fn: Callable[..., Any]) -> PyTree:
    """``_map`` of ``fn(entry, Z, base)`` over ``raw`` with each entry's base; every key of
    ``bases`` must name a constrained entry (checked in eager mode)."""
    if bases is None:
        bases = {}
    elif not isinstance(bases, Mapping):
        raise ManifoldError(
            f"`bases` must be the dict returned by gf.from_manifold / gf.rebase (or None), got {type(bases).__name__}."
        )
    names: dict[str, _Entry] = {}

    def call(e: _Entry, Z: Any) -> Any:
        return fn(e, Z, _given_base(e.space, bases.get(e.name)))

    out = _map(constraints, call, raw, names=("raw",), check="Z", keyed=names)
    unknown = [] if torch.compiler.is_compiling() else [key for key in bases if key not in names]
    if unknown:
        raise ManifoldError(f"`bases` has an entry {unknown[0]!r} that no constraint names (constrained: {sorted(names)}).")
    return out


def to_manifold(constraints: Constraints, raw: PyTree, bases: BasesIn | None = None) -> PyTree:
    """Map every constrained entry of ``raw`` to its space, centred at ``bases[name]``."""
    return _to_manifold_node(constraints, raw, bases)


def _to_manifold(constraints: Constraints, raw: PyTree, bases: BasesIn | None) -> PyTree:
    return _centred(constraints, raw, bases, lambda e, Z, base: e.space.to_manifold(Z, base))


def _worth_a_node(constraints: Constraints, raw: PyTree = None, bases: BasesIn | None = None) -> bool:
    """Whether a space of ``constraints`` fuses its map (``AbstractSpace._one_node``): a tree of only
    cheap maps (``Rn``, ``Sym``, ...) is cheaper as their few ops under ``torch.func.grad``."""
    if is_space(constraints):
        return constraints._one_node
    if isinstance(constraints, Mapping):
        return any(_worth_a_node(c) for c in constraints.values())
    node = _children(constraints)  # any other container (a list, a tuple, a registered pytree node)
    return node is not None and any(_worth_a_node(c) for c in node[1])


# Under torch.func.grad the whole pytree is one node (Note [One node under torch.func.grad]).
_to_manifold_node = one_node(_to_manifold, worth=_worth_a_node)


def rebase(constraints: Constraints, raw: PyTree, bases: BasesIn | None = None) -> tuple[PyTree, Bases]:
    """Dynamic trivialization: the same points, re-centred so that the raw entries are small.

    ``to_manifold(constraints, *rebase(constraints, raw, bases))`` equals
    ``to_manifold(constraints, raw, bases)``; for SO, Stiefel, Grassmannian, Sphere and
    Oblique the new raw entries are zero and the bases are the points themselves.
    Unconstrained entries pass through.
    """
    new_bases: Bases = {}

    def recentre(e: _Entry, Z: Any, base: Any) -> Any:
        Z2, base2 = e.space.rebase(Z, base)
        new_bases[e.name] = _stored_base(e.space, base2)
        return Z2

    out = _centred(constraints, raw, bases, recentre)
    return out, {k: b for k, b in new_bases.items() if b is not None}


def tangent(constraints: Constraints, params: PyTree, grads: PyTree) -> PyTree:
    """Project ``grads`` onto the tangent spaces at ``params`` (identity on unconstrained entries).

    For Euclidean gradients this is the Riemannian gradient of the embedded metric.
    """
    return _map(constraints, lambda e, X, G: e.space.tangent(X, G), params, grads, names=("params", "grads"), free=_vector_at,
                same_shape=True)


def egrad_to_rgrad(constraints: Constraints, params: PyTree, grads: PyTree) -> PyTree:
    """Riemannian gradients at ``params`` of Euclidean ``grads`` (``space.egrad_to_rgrad``;
    identity on unconstrained entries). Equal to :func:`tangent` for embedded metrics."""
    return _map(constraints, lambda e, X, G: e.space.egrad_to_rgrad(X, G), params, grads, names=("params", "grads"),
                free=_vector_at, stack=True, same_shape=True)


def transport(constraints: Constraints, params: PyTree, new_params: PyTree, vectors: PyTree) -> PyTree:
    """Carry tangent ``vectors`` at ``params`` to ``new_params`` (``space.transport``; identity
    on unconstrained entries)."""
    return _map(constraints, lambda e, X, Y, V: e.space.transport(X, Y, V), params, new_params, vectors,
                names=("params", "new_params", "vectors"), free=lambda X, Y, V: _vector_at(X, V), stack=True,
                same_shape=True)


def retract(constraints: Constraints, params: PyTree, vectors: PyTree) -> PyTree:
    """Move ``params`` along ``vectors``: ``space.retract`` on constrained entries, ``X + V`` elsewhere.

    Every entry needs a vector of its shape: ``None`` (a missing gradient) or another shape is a
    ``ManifoldError`` naming the parameter, on unconstrained entries as on constrained ones.
    """
    return _map(constraints, lambda e, X, V: e.space.retract(X, V), params, vectors, names=("params", "vectors"),
                free=_add, stack=True, same_shape=True)


def contains(constraints: Constraints, params: PyTree, atol: float | None = None) -> dict[str, torch.Tensor]:
    """``{name: space.contains(X)}`` for every constrained entry: batch-shaped boolean tensors.

    Usable under ``vmap``; ``all(bool(v.all()) for v in gf.contains(c, p).values())`` is the
    eager verdict.
    """
    out: dict[str, torch.Tensor] = {}

    def member(e: _Entry, X: Any) -> None:
        out[e.name] = e.space.contains(X, atol)

    _map(constraints, member, params, check="X", keyed={})
    return out


def lift(constraints: Constraints, fn: Callable[..., Any], tree: PyTree, *rests: PyTree, stack: bool = False) -> PyTree:
    """``fn(space, *subtrees)`` at every entry of ``tree`` (``space`` is None where unconstrained).

    The generic lift behind the optimizers' per-point statistics: ``rests`` have the
    structure of ``tree``; the result has the structure of ``tree`` down to the entries.
    ``stack``: ``fn(space, ...)`` maps a batch of points as each of them (Note [Stacked entries]).
    Library-internal (not re-exported at the top level).
    """
    return _map(constraints, lambda e, *args: fn(e.space, *args), tree, *rests,
                names=("params",) + ("tree",) * len(rests), free=lambda *args: fn(None, *args), stack=stack)
