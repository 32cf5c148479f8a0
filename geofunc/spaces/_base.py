"""The space protocol: a frozen bag of hyperparameters whose methods are pure tensor functions.

Every concrete space is a final, frozen dataclass subclass of :class:`AbstractSpace`.
Constructor arguments are hyperparameters only (keyword arguments); sizes are read
from the tensors the methods receive. Instances are immutable, hashable and
comparable, so ``torch.compile`` treats them as constants and ``vmap`` never sees them.

Conventions shared by every space (see DESIGN.md section 2):

* a matrix space acts on the last two dimensions ``(*batch, n, k)``, a vector space
  on the last one; leading dimensions are a batch of independent points;
* ``Z`` is a raw (unconstrained) tensor, ``X`` a point, ``G`` an ambient tensor,
  ``V`` a tangent vector, ``base`` the point (or pytree of points) a chart is centred
  at, ``None`` for the canonical one;
* no method mutates an input, draws from the global RNG, branches in Python on tensor
  values or calls ``.item()``, except :meth:`check` and the eager-mode validation in
  :meth:`from_manifold`, which are skipped under ``torch.func`` transforms and
  ``torch.compile`` (where no data-dependent error can be raised).

:class:`AbstractSpace` is an abstract base (``abc``): a concrete space implements the abstract
methods ``_check_shape``, ``to_manifold``, ``_from_manifold``, ``tangent``, ``retract``,
``project`` and ``_violations`` (it cannot be instantiated otherwise), and may override
``sample``, ``rebase`` (the default re-centres through ``_from_manifold``), ``logabsdet`` and
the metric (``egrad_to_rgrad``, ``transport``, ``inner``, ``dist``, ``expmap``, ``logmap``). Every
concrete space is ``typing.final``: a variant is a constructor argument, never a subclass.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import math
import operator
from typing import Any, Callable, ClassVar, Optional, Sequence

import optree
import torch
from torch._subclasses.fake_tensor import FakeTensor

from .._dtensor import DTensor, distributed, first_dtensor, route
from .._errors import ManifoldError, describe, error, first_index, not_dense, real_value
from .._fastpath import _any_autocast, autocast_off, make_fx_tracing  # (the first two also for hyperbolic, nn, contrib)
from .._fastpath import fake_mode_active
from .._fastpath import _transforms
from .._fastpath import autocast_on as _autocast_on
from .._fused import one_node
from .._linalg import _ROUNDING, _randn, orthonormality_error, polar, real_products

__all__ = ["AbstractSpace", "default_atol", "can_check", "is_space", "LOW_PRECISION", "rounding_dtype"]

Tensor = torch.Tensor

# Base tolerances of membership tests, per dtype, for a point of size ~64; they grow
# like sqrt(size / 64) above that (rounding errors of orthogonal maps grow like sqrt(n)).
_ATOL = {
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
    torch.complex64: 1e-4,  # those of the real dtype of the parts (Note [Complex])
    torch.complex128: 1e-9,
}


def default_atol(dtype: torch.dtype, size: int = 1) -> float:
    """The default membership tolerance for ``dtype`` and a point of typical size ``size``."""
    return _ATOL.get(dtype, 1e-4) * max(1.0, math.sqrt(size / 64.0))


def shapes_only(t: Any) -> bool:
    """Whether ``t`` is a tensor with shapes but no values: on the ``meta`` device, or a ``FakeTensor``
    (a module built under ``FakeTensorMode``, whose parameters are fake Parameters). Note [Fake
    parameters]."""
    return isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, FakeTensor))


# Note [Fake parameters]
# A parameter made under FakeTensorMode (a model built there to estimate its memory or FLOPs, as
# with the meta device) is a FakeTensor that passes ``isinstance(p, nn.Parameter)`` (torch marks it
# ``_is_param``), so the Parameter exemption below took it for a concrete tensor, and registering
# any constraint on it (``gf.nn.orthogonal``, ``constrain``, ...) read its values in the membership
# checks: torch's DataDependentOutputException from every one-liner but ``symmetric``, where the meta
# device builds. Fake tensors are now treated as meta tensors are: shapes checked, values not read.
def can_check(tree: Any) -> bool:
    """Whether the tensors of ``tree`` are concrete, so that a data-dependent check may run.

    False inside ``torch.compile`` and while make_fx traces (``torch.func.linearize``: Note [Traced by
    make_fx] in ``geofunc/_fastpath.py``), for ``torch.func`` wrapped tensors (``vmap``, ``grad``,
    ``jvp``, ...), for tensor subclasses that override ``__torch_dispatch__`` (FakeTensor,
    FunctionalTensor and the other subclasses tracers use: no values to read) and for ``meta``
    tensors, where reading a value would fail or break the trace. A subclass that only overrides
    ``__torch_function__`` (torchvision's ``tv_tensors``, a user's logging tensor) holds real values:
    it is checked like a plain tensor (it used to skip the check, so ``from_manifold`` of an
    off-space point returned a raw tensor for another point without an error).
    """
    if torch.compiler.is_compiling() or make_fx_tracing():
        return False
    if fake_mode_active():  # real tensors under FakeTensorMode(allow_non_fake_inputs): the measures are fake
        return False
    for leaf in optree.tree_leaves(tree, none_is_leaf=False):
        if isinstance(leaf, torch.Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(leaf):
                return False
            if (type(leaf) is not torch.Tensor and not isinstance(leaf, (torch.nn.Parameter, DTensor))
                    and type(leaf).__torch_dispatch__ is not torch._C._disabled_torch_dispatch_impl):
                # FakeTensor, FunctionalTensor and other subclasses used by tracers.
                return False
            if shapes_only(leaf):  # meta (deferred initialization) or a fake Parameter: nothing to read
                return False
    return True


# Note [Complex]
# A space that sets ``accepts_complex = True`` takes complex64/complex128 tensors (and says so in
# its docstring): there ``ᵀ`` becomes ``ᴴ`` and the metric is the real inner product
# ``⟨U, V⟩ = Re tr(UᴴV)`` of Cⁿ ≅ R²ⁿ, so the complex space is the real manifold of the same
# points. Every other space refuses complex tensors in ``_require_float`` (every shape check
# goes through it), so to_manifold, from_manifold, tangent, retract, project, contains, check
# and sample(dtype=complex…) raise ``ManifoldError`` naming the space and the dtype.
# Gradients: for a real loss L of a complex tensor Z = X + iY, torch's autograd returns
# G = ∂L/∂X + i ∂L/∂Y (twice the conjugate Wirtinger derivative ∂L/∂Z̄), the gradient of L
# for that real inner product. So the embedded defaults below hold unchanged:
# egrad_to_rgrad(X, G) = tangent(X, G) and transport(X, Y, V) = tangent(Y, V)
# (tests/test_complex.py checks both against finite differences).


# Note [Low precision]
# bfloat16/float16 have no CPU kernels for QR, SVD, eigh, solve or slogdet, and
# torch.linalg.matrix_exp returns NaN (or, through a chart, an all-zero "point") in bfloat16.
# Eight bits of mantissa are also too few for a matrix exponential or a factorization to stay
# on the manifold. So every map of every space computes in float32 when its leading tensor
# argument is float16/bfloat16 (or when autocast is on, which would otherwise run the chart's
# products in low precision), and casts its floating results back to that dtype: a
# low-precision point is the rounding of a float32 point, on the space within the
# per-dtype tolerance of ``_ATOL`` where the point is well conditioned (an open space's point whose
# values spread by more than ~1/ε of the stored dtype can round off it: README, "bfloat16 and
# float16"). The policy is applied once, to every public map a space
# defines (``__init_subclass__``), so no space can forget it.
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Note [Floating dtypes without arithmetic]
# The float8 dtypes (float8_e4m3fn, float8_e5m2, ...; torchao's FP8 training stores weights so) are
# floating dtypes, so the dtype check let them through: to_manifold, contains and sample then raised
# torch's own NotImplementedError ('"tril" not implemented for Float8_e4m3fn', '"normal_kernel_cpu"
# ...') naming neither the space nor what it takes, and Rn passed a float8 tensor through. They have
# no arithmetic (only casts) and no rounding policy here: a ManifoldError names the dtypes a space takes.
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# Note [Dense tensors only]
# Every map computes with dense tensors (QR, SVD, eigh, matrix_exp, tril, strided views): a sparse
# tensor (torch.sparse_coo, sparse_csr/csc/bsr/bsc) or a nested one (torch.jagged, or the strided nested
# layout) has no point of a space to offer that its dense form has not. They passed the dtype check and
# then failed inside torch ("Could not run 'aten::_linalg_svd' with arguments from the 'SparseCPU'
# backend", "NestedTensorImpl doesn't support sizes", an INTERNAL ASSERT), or worse, were taken:
# Oblique.tangent, egrad_to_rgrad and transport of a COO vector returned a sparse vector off the tangent
# space (1.2 off the dense answer); from_manifold of a jagged tensor skipped the membership check (a
# tensor subclass with __torch_dispatch__: can_check is False) and returned raw tensors for an off-space
# input. What some maps computed right (the rank family's tangent of a CSR gradient, a CSR base of PSD)
# was an accident of which torch ops have sparse kernels, different per layout and per method. So the
# shape check every tensor of a method goes through (``_require_float``), the pair check's shortcut and
# the checks of the frames of a base refuse any layout but torch.strided, and nested tensors, naming the
# layout. A layout and a flag read before any value is read (~0.16 µs a tensor from Python: ~0.3 µs of
# Sphere.tangent's ~8 µs, within the noise of old and new side by side): traceable (Dynamo specializes
# both), and the same under vmap, grad, FakeTensor and meta (all strided). Quantized tensors are strided:
# their dtype (qint8, ...) is refused as any non-floating dtype is. A user with a sparse weight densifies
# it first (``X.to_dense()``); a sparse gradient of a gf.nn weight is densified by gf.nn itself (Note
# [Sparse gradients of a constrained weight] in ``geofunc/nn/_adapter.py``).
_STRIDED = torch.strided

_ONE_NODE_METHODS = ("to_manifold", "logabsdet")  # the maps a training step differentiates
_POLICY_METHODS = (
    "to_manifold",
    "_from_manifold",
    "rebase",
    "tangent",
    "retract",
    "project",
    "logabsdet",
    "egrad_to_rgrad",
    "transport",
    "inner",
    "dist",
    "sqdist",  # a space's own closed form (Sphere, Oblique): float32 as the others, not the stored dtype
    "expmap",
    "logmap",
)


def rounding_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a result computed in ``dtype`` is finally stored in (Note [Low precision])."""
    stack = _ROUNDING.dtypes
    return stack[-1] if stack else dtype


def dtype_for_message(x: Tensor) -> str:
    """``x``'s dtype for an error message: in a bf16/fp16 call (computed in float32) the stored dtype
    too, so a refusal names the dtype the caller passed (Note [Low precision])."""
    stored = _ROUNDING.dtypes[-1] if _ROUNDING.dtypes else None
    return f"{x.dtype}" if stored is None else f"{stored}, computed in {x.dtype}: {x.dtype} or {stored}"


# Note [A product of several dtypes]
# A Product's factors may have different dtypes. Its maps take the policy too, with the first
# factor as the lead: for a bf16 first factor and a float32 second one, every float32 result was
# rounded to bf16 (to_manifold, retract, tangent, project of the float32 factor came back bf16,
# while the same factors in the other order kept their dtypes). A tuple of several dtypes (a nested
# Product's tensors counted) has no lead: the Product's map runs as it is, and each factor's own map applies the policy to its part.
def _lead(args: tuple) -> Any:
    """The tensor whose dtype a call returns in: the first tensor argument (or first entry of a tuple
    whose tensors share its dtype: Note [A product of several dtypes])."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (tuple, list)) and a and isinstance(a[0], torch.Tensor):
            dtype = a[0].dtype
            for t in a:
                if isinstance(t, torch.Tensor):
                    if t.dtype != dtype:
                        return None
                elif isinstance(t, (tuple, list)) and any(  # a Product's factor that is a Product
                        isinstance(u, torch.Tensor) and u.dtype != dtype for u in optree.tree_leaves(t)):
                    return None
            return a[0]
    return None


# Note [Tensors given by keyword]
# The lead was looked for among the positional arguments only: M.to_manifold(Z=z) of a bf16 z skipped
# the policy, and torch.linalg.matrix_exp/eigh in bf16 gave NaN points (SO, Stiefel, PSD, GLp); under
# autocast a float32 z given so came back bf16, computed by bf16 products (Stiefel raised a KeyError).
# Arguments given by keyword join the positional ones in the map's own parameter order (read once,
# when the map is wrapped); a call without keywords pays nothing more.
def _parameter_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of the method ``fn``'s parameters that may be given by position, its first (``self``) left out."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        names = tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds)
    except (TypeError, ValueError):  # a callable without a signature: its tensors by position only
        return ()
    return names[1:]


def _in_order(args: tuple, kwargs: dict, names: tuple[str, ...]) -> tuple:
    """``args`` and then the keyword arguments of ``names`` that follow them, in ``names``' order."""
    return args + tuple([kwargs[n] for n in names[len(args):] if n in kwargs])


def _upcast(tree: Any, dtypes: tuple[torch.dtype, ...] = LOW_PRECISION) -> Any:
    return optree.tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in dtypes else t, tree, none_is_leaf=True
    )


# Note [Arguments of another dtype]
# Which arguments a map's policy computes in float32. Under autocast a map is an op of autocast's
# float32 list, as torch.linalg's are: beside a float32 or low-precision lead its bf16/fp16 arguments
# are cast to float32 (dist(X, Y) of a float32 point and a bf16 activation, retract of a float32 point
# and a bf16 step, computed in float32 and returned in the lead's dtype), as torch casts an op's
# inputs there; beside a float64 or complex lead nothing is cast (autocast leaves float64 alone), so the
# dtype check names the tensor given: it named its float32 copy ('got … dtype torch.float32'), a dtype
# the caller never passed. Outside autocast only tensors of the lead's own dtype are computed in float32:
# a bf16 point takes a float32 vector (an optimizer's float32 gradient, as for unconstrained entries:
# Note [The dtype of an unconstrained step] in geofunc/_pytree.py) but not an fp16 one, which was taken
# silently (rounded to bf16) while a float32 point refused a bf16 one. A dtype comparison only.
def _cast_dtypes(lead: torch.dtype, low: bool, autocast: bool) -> tuple[torch.dtype, ...]:
    """The dtypes of the arguments a map computes in float32 (Note [Arguments of another dtype])."""
    if autocast:
        return LOW_PRECISION if low or lead == torch.float32 else ()
    return (lead,)


def _downcast(tree: Any, dtype: torch.dtype) -> Any:
    return optree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t, tree, none_is_leaf=True
    )


# Note [Traced by torch.jit.trace]
# torch.jit.trace records the tensor operations of one call and replays them; every Python decision
# taken from the values in that call is kept for all later inputs. Many maps take such decisions in
# eager mode, where they are right (the exponential's Taylor degree and squarings, the rank charts'
# and Sinkhorn's schedules, skipped checks): traced, they are wrong for other values, silently. A
# module traced under torch.no_grad() (the usual recipe before torch.jit.save) whose weight was
# traced at its chart's centre (raw tensor 0: degree 1) computed I + A for every later raw tensor A,
# so SO(4) gave outputs 0.4e-3 to 39 off the eager module's after a load_state_dict or a fine-tuning
# step (LowRank 4e7, PSD 4e3), with no warning; with grad mode on, the trace held Python Functions
# that torch.jit.save refuses. torch.export (strict or not) captures the maps without reading values
# (tests/test_nn.py checks other parameter values), and torch 2.13 deprecates torch.jit.trace, so
# the maps refuse to be traced by it, naming the way that works. (No tracer reads the state here
# except torch.jit's; Dynamo traces the call, so fullgraph holds.)
def _refuse_jit_trace(space: Any, name: str) -> ManifoldError:
    return ManifoldError(
        f"{space!r}.{name.lstrip('_')}: expected to be captured by torch.export.export (strict or not) or run "
        "by torch.compile, got torch.jit.trace (or a tool tracing with it: torch.onnx.export(dynamo=False)), "
        "which would replay the decisions this map takes from the traced values (the degree and squarings of a "
        "matrix exponential, iteration counts) for every later input: silently wrong for other parameter "
        "values. Export the model with torch.export.export(model, args) (README: geofunc.nn, deployment), or "
        "trace gf.nn.plain(model), whose weights are plain tensors."
    )


def _plain_beside_dtensor(space: Any, name: str, names: tuple[str, ...], args: tuple, kwargs: dict, lead: Any) -> ManifoldError | None:
    """The ManifoldError for a DTensor after the plain leading tensor, or None if there is none (Note [A
    plain point beside DTensors]; asked only once the map has failed: nothing on the way in)."""
    ordered = _in_order(args, kwargs, names) if kwargs else args
    i, dt = first_dtensor(ordered, not space._factorwise_maps)
    if dt is None:
        return None
    j = next((k for k, a in enumerate(ordered) if a is lead or isinstance(a, (tuple, list)) and any(t is lead for t in a)), -1)
    arg = lambda k: f"`{names[k]}`" if 0 <= k < len(names) else f"argument {k}" if k >= 0 else "tensor"  # noqa: E731
    return ManifoldError(
        f"{space!r}.{name.lstrip('_')}: expected the leading tensor argument {arg(j)} to be a DTensor where {arg(i)} "
        f"is one (the leading argument decides how DTensors are mapped: Note [DTensor] in geofunc/_dtensor.py; "
        f"distribute it, or pass {arg(i)} as a plain tensor with .full_tensor()), got a plain {arg(j)} "
        f"({describe(lead)}) beside a DTensor {arg(i)} ({describe(dt)}).")


def _in_float32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a space map with the low-precision policy (Note [Low precision]); refuse torch.jit.trace
    (Note [Traced by torch.jit.trace])."""
    names = _parameter_names(fn)  # Note [Tensors given by keyword]

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch._C._get_tracing_state() is not None:  # Note [Traced by torch.jit.trace]
            raise _refuse_jit_trace(self, fn.__name__)
        lead = _lead(_in_order(args, kwargs, names) if kwargs else args)
        if lead is None:
            return fn(self, *args, **kwargs)
        if isinstance(lead, DTensor) and not self._factorwise_maps:  # local or gathered once (Note [DTensor])
            return route(method, self, args, kwargs)
        try:  # (free unless raised: Note [A plain point beside DTensors] is asked only on failure)
            low = lead.dtype in LOW_PRECISION
            if not low and (_any_autocast is not None and not _any_autocast()):
                return fn(self, *args, **kwargs)
            autocast = _autocast_on(lead.device.type)
            if not (low or autocast):
                return fn(self, *args, **kwargs)
            cast = _cast_dtypes(lead.dtype, low, autocast)  # Note [Arguments of another dtype]
            if low:
                _ROUNDING.dtypes.append(lead.dtype)
            try:
                with torch.autocast(lead.device.type, enabled=False):
                    out = fn(self, *_upcast(args, cast), **_upcast(kwargs, cast))
            finally:
                if low:
                    _ROUNDING.dtypes.pop()
            return _downcast(out, lead.dtype) if low else out
        except Exception as e:
            err = None if isinstance(lead, DTensor) else _plain_beside_dtensor(self, fn.__name__, names, args, kwargs, lead)
            if err is None:
                raise
            raise err from e

    method._low_precision_policy = True  # type: ignore[attr-defined]
    return method


# Note [Shape comparisons under a dynamic batch]
# Python compares tuples (torch.Size too) item by item before it compares their lengths, so
# `X.shape != Y.shape` for a batch (b, n, k) and an unbatched (n, k) asks `b != n`. Under torch.export
# with a dynamic batch (torch.export.Dim, non-strict: torch's default) that question is a guard on the
# batch, which export refuses ("Constraints violated (b)! ... satisfy the generated guard
# L['x'].size()[0] != n"): every map of a space given a batch and an unbatched base, point or vector
# (to_manifold with a shared base, dist to a prototype, tangent, inner, ...) failed to export. Shapes
# are compared with their lengths first, or as batch dims aligned from the right (_broadcastable).
def _broadcastable(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two shapes broadcast (``torch.broadcast_shapes`` without its ~15 µs of Python)."""
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def _broadcast(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The broadcast of shapes known to broadcast (``torch.broadcast_shapes`` without its Python)."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, x in enumerate(s, n - len(s)):
            if x != 1:
                out[i] = x
    return tuple(out)


class cached_attribute:
    """``functools.cached_property`` without its lock: computed on first access, then an entry of the
    instance's ``__dict__`` (a frozen dataclass's too), which shadows this non-data descriptor.

    Python 3.11's ``cached_property`` computes under an ``RLock``, which ``torch.compile`` cannot
    trace: ``torch.compile(f, fullgraph=True)`` of a map of a space made moments before (no eager call
    yet, so nothing cached) raised ``Unsupported context manager`` for ``GLp``, ``SL``, ``PSD``,
    ``FixedRank``, ``PSSDFixedRank``, ``AlmostOrthogonal`` and ``Hurwitz`` (tests/test_protocol.py).
    Two threads that both miss compute the same immutable value from the same frozen fields; the
    last write wins, harmlessly."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        # the class's names of cached attributes, its bases' too, read by compute_cached: a tuple, where
        # walking vars(klass) (a mappingproxy) inside a trace failed on torch 2.11's Dynamo
        owner._cached_names = (*getattr(owner, "_cached_names", ()), name)

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value
        return value


def compute_cached(obj: Any) -> None:
    """Compute every :class:`cached_attribute` of ``obj`` not computed yet: a space's ``__post_init__``
    calls it, so that a space made outside ``torch.compile`` never computes one while being traced
    (a derived space made inside a trace, ``Hurwitz``'s ``PSD``, cannot be stored into a space made
    before it: Dynamo's "Reconstruction failure")."""
    for name in getattr(type(obj), "_cached_names", ()):
        if name not in obj.__dict__:
            getattr(obj, name)


def _value_repr(v: Any) -> str:
    """A field's repr, callables by their module and name (``torch.exp``, not ``<built-in method exp of
    type object at 0x7f…>``): the same in every process, so a space's repr (its error messages, test ids)
    is too."""
    if isinstance(v, tuple):
        return "(" + ", ".join(map(_value_repr, v)) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(map(_value_repr, v)) + "]"
    if callable(v) and not isinstance(v, (type, _Space)) and hasattr(v, "__qualname__"):
        module = getattr(v, "__module__", None)
        name = v.__name__ if module == "torch" else v.__qualname__  # torch.exp: _VariableFunctionsClass.exp
        return f"{module}.{name}" if module else name
    if isinstance(v, torch.Tensor):  # a tensor hyperparameter (refused by most spaces): described, not dumped
        return describe(v)
    return repr(v)


def _space_repr(self: Any) -> str:
    """A space's repr, as a dataclass's but with :func:`_value_repr` for the values."""
    fields = ", ".join(f"{f.name}={_value_repr(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__qualname__}({fields})"



class _Space:
    """The plain (non-ABC) root of :class:`AbstractSpace`, for :func:`is_space`."""

    __slots__ = ()


def is_space(x: Any) -> bool:
    """Whether ``x`` is a space: ``isinstance(x, AbstractSpace)`` written so that Dynamo traces it
    (it cannot trace ``ABCMeta.__instancecheck__``, which ``isinstance`` on an ABC calls; the
    plain root class has no such hook)."""
    return isinstance(x, _Space)


def _readable(t: Any) -> bool:
    """A concrete floating tensor whose values may be read (not meta, fake, functorch-wrapped or a DTensor;
    nothing is while Dynamo traces: Note [update_base in compiled code] in ``geofunc/nn/_adapter.py``)."""
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor and not t.is_meta
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and (t.is_floating_point() or t.is_complex()))


# Note [The sign of a base]
# A chart `base · φ(A)` (SO) or `U_b φ(A) diag(f(s)) φ(B)ᵀ V_bᵀ` (GLp, SL) has det of the sign of
# det(base) (of det U_b det V_b): an orthonormal base of the other sign is no base of the space, and
# every raw tensor then maps to a matrix of det < 0, silently (to_manifold does not read the base's
# values). `from_manifold`, `rebase` and `project` never make one, but a buffer written by hand or a
# state_dict of another space's layer (a square Stiefel's, O(n), or FixedRank's) can hold one; the
# polar refinement keeps the sign, so it is refused where the orthonormality of a base is
# (`_invalid_base`: a `gf.nn` module's forward, once per change of its buffers). The frames are
# orthonormal here, so the sign of each determinant is well read (|det| = 1).
def _base_sign_error(base: Any) -> str | None:
    """Why the orthonormal square frames of ``base`` are not of determinant product +1, or None."""
    frames = [B for B in optree.tree_leaves(base) if _readable(B) and B.ndim >= 2 and B.shape[-1] == B.shape[-2] > 0]
    if not frames:
        return None
    sign = functools.reduce(operator.mul, (torch.linalg.slogdet(B.float() if B.dtype in LOW_PRECISION else B)[0] for B in frames))
    if bool((sign > 0).all()):
        return None
    what = "det(base)" if len(frames) == 1 else "det(base[0])·det(base[1])"
    return f"orthonormal frames with {what} = −1 (the chart's points would have det < 0)"


def _frame_error(B: Tensor) -> tuple[Tensor, float]:
    """``(max |BᴴB − I|`` of the shorter side's Gram per frame, the default tolerance of ``B``'s dtype):
    bf16/fp16 in float32, and never under autocast (a bf16 Gram of a float32 frame is 1e-2 off)."""
    Bf = B.float() if B.dtype in LOW_PRECISION else B
    with autocast_off(B.device.type):
        err = orthonormality_error(Bf if Bf.shape[-2] >= Bf.shape[-1] else Bf.mT)
    return err, default_atol(B.dtype, max(B.shape[-2:]))


def _refine_frame(B: Tensor, force: bool) -> Tensor:
    """An orthonormal frame (tall or wide) re-made orthonormal in its dtype by its polar factor, unless it
    already is with a margin (:meth:`AbstractSpace._refine_base`); bf16/fp16 in float32, and never
    under autocast (``update_base`` inside an autocast region read a float32 frame's bf16 Gram as
    2e-3 off, and re-made it by a bf16 polar factor: a Stiefel weight 3e-3 off its space)."""
    if 0 in B.shape[-2:]:  # the empty frame (St(n, 0)'s one point) is exact in every dtype
        return B
    if not force:
        err, tol = _frame_error(B)
        if bool((err <= 0.25 * tol).all()):
            return B
    with autocast_off(B.device.type):
        return polar(B.float() if B.dtype in LOW_PRECISION else B).to(B.dtype)


# Note [Real hyperparameters]
# A real hyperparameter (``radius``, ``c``, ``k``, ``alpha``, ``lam``) is stored as the Python float it
# stands for, as ``rank`` is stored as the int (``validate_rank``): a NumPy scalar kept as given broke
# ``torch.compile(fullgraph=True)`` (Dynamo traced ``Lorentz(k=np.float32(2))``'s ``k`` as a symbolic
# float it could not guard on; ``AlmostOrthogonal(lam=np.float64(0.5))`` met a data-dependent branch),
# and a ``Fraction`` was accepted and failed in every map (``Fraction * Tensor``). Any ``numbers.Real``
# but a bool whose float is finite is taken; a tensor (0-d included) is not, so spaces stay constants.
# The checks are comparisons only: a space built inside a compiled function from a float argument
# (``lambda r, z: Sphere(radius=r).to_manifold(z)``) gets that argument as a symbolic float from the
# argument's second value on (Dynamo's automatic dynamic shapes), and Dynamo traces ``<`` on one
# (a guard) but not ``math.isfinite``, which raised "torch.* op returned non-Tensor" at every later call.
def real_hyperparameter(space: Any, name: str, expected: str, *, low: float = 0.0, strict: bool = False,
                        high: float | None = None) -> None:
    """Check the real hyperparameter ``name`` of ``space`` (in ``[low, high]``, ``low`` excluded if
    ``strict``) and store it as a Python float (Note [Real hyperparameters]); else raise
    ``ManifoldError`` with ``expected``."""
    value = getattr(space, name)
    x = real_value(value)
    if not (-math.inf < x < math.inf and (x > low if strict else x >= low) and (high is None or x <= high)):
        raise error(space, expected, describe(value))
    object.__setattr__(space, name, x)


# Note [Hyperparameters by keyword]
# DESIGN §1: a space's constructor takes hyperparameters, by keyword. The dataclasses say so
# (``kw_only=True``); a required first hyperparameter (``rank``, ``lam``) may also come first by
# position, as the DESIGN table writes it (``LowRank(4)``). The keyword rule catches a GeoTorch
# habit that would otherwise be silent: GeoTorch's classes take the tensor's size first
# (``Sphere(size=5)``, ``Stiefel(size=(n, k))``), and ``gf.Sphere(5)`` read positionally was a
# sphere of radius 5. ``AbstractSpace.__new__`` runs before the generated ``__init__`` and words the
# refusal (Python's own "takes 1 positional argument but 2 were given" counts ``self``). It only
# pre-empts a call ``__init__`` would refuse anyway, so a user's space with its own positional
# ``__init__`` (or ``Product(M1, M2)``'s ``*factors``) is untouched.
_POSITIONAL: dict[type, float] = {}


def _positional_count(cls: type) -> float:
    """How many positional arguments ``cls.__init__`` takes (inf for ``*args``), cached per class."""
    n = _POSITIONAL.get(cls)
    if n is None:
        import inspect

        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
        kinds = inspect.Parameter
        n = math.inf if any(p.kind is kinds.VAR_POSITIONAL for p in params) else float(
            sum(p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD) for p in params))
        _POSITIONAL[cls] = n
    return n


def _positional_message(cls: type, args: tuple) -> str:
    names = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    n = int(_positional_count(cls))
    name, got = cls.__qualname__, ", ".join(_value_repr(a) for a in args)
    if not names:
        head = f"{name} takes no hyperparameters ({name}())"
    else:
        takes = f", only `{names[0]}` also by position" if n == 1 else f", {n} by position" if n else ""
        head = f"{name} takes its hyperparameters by keyword ({name}({', '.join(f'{k}=...' for k in names)}){takes})"
    return (f"{head}, got {len(args)} positional argument{'s' * (len(args) > 1)} ({got}). Sizes are read from the "
            "tensors the maps receive: a size argument, as GeoTorch's classes take, has no counterpart here.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbstractSpace(_Space, abc.ABC):
    """A manifold (or constraint set) as pure functions of tensors. Abstract."""

    #: Number of trailing dimensions a point occupies (2 for matrices, 1 for vectors).
    point_ndim: ClassVar[int] = 2
    #: Whether the space takes complex tensors (Note [Complex]); False: they raise ``ManifoldError``.
    accepts_complex: ClassVar[bool] = False
    #: Whether the points are complex only (Unitary, Hermitian: ``sample(dtype=float32)`` is complex64).
    _complex_only: ClassVar[bool] = False
    #: Whether ``to_manifold``/``logabsdet`` become one autograd node under ``torch.func.grad`` (Note
    #: [One node under torch.func.grad], ``geofunc/_fused.py``). False for maps of a few ops (a copy of
    #: a triangle, a normalization), where the node's fixed cost is more than the transform's cost
    #: for those ops. Read when a class is created, for the maps that class itself defines: set it in
    #: the body of the class that defines ``to_manifold``.
    _one_node: ClassVar[bool] = True
    #: Further maps that are one node under ``torch.func.grad``: the spectral maps, whose exact
    #: second-order terms plain autograd builds only for a second derivative (Note [Lazy second-order
    #: terms], ``geofunc/_fastpath.py``), e.g. ``("tangent", "retract", "project")``.
    _one_node_maps: ClassVar[tuple[str, ...]] = ()
    #: Maps whose eager checks read values beyond the measures of ``check`` (and may raise): a batch-sharded
    #: DTensor takes the gathered route for them, so that every rank checks the whole batch and raises alike
    #: (Note [Checks inside a map on DTensors], ``geofunc/_dtensor.py``).
    _gathered_maps: ClassVar[frozenset[str]] = frozenset()

    #: Whether every map delegates to other spaces' maps, point by point (``Product``): DTensor arguments
    #: then take no route here, each factor's map takes its own (Note [DTensor factors of a product]).
    _factorwise_maps: ClassVar[bool] = False

    #: What a base of this space is, for :meth:`_refine_base`: ``"frames"`` (every base tensor an
    #: orthonormal n×k frame, k ≤ n, or k×n rows), ``"point"`` (the base is a point of the space), or
    #: None (no base, or a composite space that overrides :meth:`_refine_base`).
    _base_kind: ClassVar[str | None] = None

    #: Whether the determinants of the base's square frames must multiply to +1 (``SO``: ``det B``;
    #: ``GLp``, ``SL``: ``det U_b det V_b``): the chart's point has that sign of determinant, so an
    #: orthonormal base of the other sign maps every raw tensor off the space (Note [The sign of a base]).
    _base_det_positive: ClassVar[bool] = False

    #: Whether a matrix with an empty dimension (n×0, 0×k) is a point shape: the space is then the
    #: single empty matrix (St(n, 0), Gr(n, 0)), every map returns an empty tensor and every point is
    #: on it. False: such shapes raise ``ManifoldError`` (GeoTorch fails on them in its own ways).
    _empty_points: ClassVar[bool] = False

    __repr__ = _space_repr  # in the class body, so @dataclass keeps it

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if args and len(args) > _positional_count(cls):  # Note [Hyperparameters by keyword]
            raise TypeError(_positional_message(cls, args))
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _apply_policy(cls)
        # A value derived from the hyperparameters written as CONTRIBUTING.md says, a
        # functools.cached_property, computes under an RLock on Python 3.11, which Dynamo cannot
        # trace: torch.compile(fullgraph=True) of a user's space failed until something had read it
        # eagerly. Each becomes a cached_attribute (lock-free, its value the instance's own as before).
        for name, attr in list(vars(cls).items()):
            if isinstance(attr, functools.cached_property):
                cached = cached_attribute(attr.func)
                setattr(cls, name, cached)
                cached.__set_name__(cls, name)
        # Inherited, it would lose to the repr a subclass's own @dataclass writes: set it on the class
        # before that runs (which then keeps it). A class's hand-written repr (Product's) stays.
        if "__repr__" not in cls.__dict__ and cls.__repr__ is _space_repr:
            cls.__repr__ = _space_repr  # type: ignore[method-assign]

    # ------------------------------------------------------------------ shapes
    @abc.abstractmethod
    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        """Raise ``ManifoldError`` if the trailing dimensions of ``X`` are not a point's."""

    def _require_float(self, X: Any, what: str, got: str | None = None) -> None:
        """``X`` must be a floating tensor; complex too where the space accepts it (Note [Complex]).
        ``got``: what the message says was given (default: ``X`` described; built only to raise)."""
        if not isinstance(X, torch.Tensor):
            raise error(self, f"`{what}` to be a tensor", describe(X))
        if X.layout is not _STRIDED or X.is_nested:  # not_dense inlined (every call): Note [Dense tensors only]
            self._require_dense(X, what)
        if X.dtype in _FLOATS:
            return
        self._require_float_dtype(X.dtype, what, got or describe(X))

    def _require_dense(self, X: Tensor, what: str) -> None:
        """``X`` must be a dense (torch.strided, not nested) tensor (Note [Dense tensors only])."""
        if not_dense(X):
            hint = "" if X.is_nested else " (`.to_dense()` makes one of a sparse tensor)"
            raise error(self, f"`{what}` to be a dense (strided) tensor{hint}", describe(X))

    def _require_float_dtype(self, dtype: torch.dtype, what: str, got: str) -> None:
        """:meth:`_require_float` of a dtype (``sample``'s ``dtype``: no tensor of it is made, as a
        complex32 one warns "ComplexHalf support is experimental" before the refusal)."""
        if dtype in _FLOATS:
            return
        if dtype.is_floating_point:  # Note [Floating dtypes without arithmetic]
            raise error(self, f"`{what}` of dtype float32 or float64 (bfloat16 and float16 are computed in float32; "
                        f"{dtype} has no arithmetic to compute with)", got)
        if dtype == torch.complex32 and self.accepts_complex:
            raise error(self, f"`{what}` of dtype complex64 or complex128 (or real floating)", got)
        if dtype.is_complex and not self.accepts_complex:
            raise error(
                self, f"`{what}` of a real floating dtype (float32 or float64); {type(self).__name__} is a real space", got
            )
        if not dtype.is_complex:
            kinds = "float32, float64, complex64 or complex128" if self.accepts_complex else "float32 or float64"
            raise error(self, f"`{what}` of a floating dtype ({kinds})", got)

    def _require_complex(self, X: Tensor, what: str) -> None:
        """For spaces of complex points only (Unitary, Hermitian): ``X`` must be complex64/complex128."""
        if not X.dtype.is_complex:
            raise error(self, f"`{what}` of a complex dtype (complex64 or complex128)", describe(X))

    def _require_matrix(self, X: Any, what: str = "X", square: bool = False) -> tuple[int, int]:
        """Check ``X`` is a (batch of) floating matrices, square if asked; return ``(n, k)``."""
        self._require_float(X, what)
        if X.ndim < 2:
            shape = "square matrices (..., n, n)" if square else "matrices (..., n, k)"
            raise error(self, f"`{what}` to be {shape}", f"a tensor of shape {tuple(X.shape)}")
        n, k = X.shape[-2], X.shape[-1]
        if square and n != k:
            raise error(self, f"`{what}` to be square matrices (..., n, n)", f"shape {tuple(X.shape)}")
        if (n == 0 or k == 0) and not self._empty_points:
            raise error(self, f"`{what}` with non-empty matrix dimensions", f"shape {tuple(X.shape)}")
        return n, k

    def _require_vector(self, X: Any, what: str = "X") -> int:
        self._require_float(X, what)
        if X.ndim < 1 or X.shape[-1] == 0:
            raise error(self, f"`{what}` to be non-empty vectors (..., n)", f"shape {tuple(X.shape)}")
        return X.shape[-1]

    # Note [Symbolic sample shapes]
    # Inside torch.compile, ``sample(x.shape)`` receives the sizes of ``x`` as SymInts once automatic
    # dynamic shapes has made them symbolic. ``operator.index`` of a SymInt asks for its value, which
    # guards the size to it: a compiled function drawing a sample of its input's batch size recompiled
    # at every new batch size (every space, 4 sizes, 4 graphs, where ``torch.randn(x.shape)`` compiles
    # 2). Ints and SymInts are kept as they are (Dynamo reads ``isinstance(d, int)`` without a guard,
    # and ``d < 0`` of a size is decided by its range); other integers (NumPy's) go through ``index``.
    def _sample_shape(self, shape: Any, dtype: torch.dtype | None = None) -> tuple[int, ...]:
        """``shape`` of :meth:`sample` as a tuple, checked as a point shape of the space.

        An int ``n`` is ``(n,)`` (as ``torch.randn(n)``); anything but non-negative integers, or
        a shape the space cannot take, raises ``ManifoldError`` (not a TypeError).
        """
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        try:  # a symbolic size (a tensor's shape under torch.compile) is kept: Note [Symbolic sample shapes]
            out = tuple(d if isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool) else operator.index(d)
                        for d in shape)
        except TypeError:
            out = None
        if out is None or any(d < 0 for d in out) or any(isinstance(d, bool) for d in shape):
            raise error(self, "`shape` to be a tuple (or torch.Size, or int) of non-negative integers", repr(shape))
        if dtype is not None:  # (else the shape's check below named `shape` for a bad dtype)
            if not isinstance(dtype, torch.dtype):
                raise error(self, "`dtype` to be a torch.dtype", repr(dtype))
            self._require_float_dtype(dtype, "dtype", str(dtype))
        self._check_shape(torch.empty(out, dtype=dtype or torch.get_default_dtype(), device="meta"), "shape")
        return out

    # Note [A pair of one shape]
    # The checks of a vector Y at a point X (_check_shape of Y, _require_same_shape, _require_base_like) read
    # Y's type, shape, dtype and device only. Where those are X's, X's own check has decided them: Y passes.
    # The usual pair (a gradient or step of its parameter's shape) then costs one shape comparison instead of
    # three checks, which with many small parameters were an eighth of an optimizer step (800 entries, five
    # pairs each per step). Eager only: under torch.compile the comparisons are left as they were (Note
    # [Shape comparisons under a dynamic batch]).
    def _check_pair(self, X: Tensor, Y: Tensor, what_y: str) -> None:
        """Shape checks of ``tangent(X, G)`` / ``retract(X, V)``: both points' shapes, ``Y``
        with ``X``'s point shape and batch dims that broadcast, and ``X``'s dtype and device (as
        :meth:`_require_base_like`: a mixed pair would otherwise fail inside a product with torch's
        unnamed error, or be silently promoted, depending on the space)."""
        self._check_shape(X, "X")
        if (isinstance(X, torch.Tensor) and type(Y) is type(X) and Y.dtype == X.dtype and Y.device == X.device
                and Y.layout is _STRIDED and not Y.is_nested  # (X's are checked: Note [Dense tensors only])
                and not torch.compiler.is_compiling() and Y.shape == X.shape):
            return  # Note [A pair of one shape]
        self._check_shape(Y, what_y)
        self._require_same_shape(X, Y, "X", what_y)
        if Y.dtype != X.dtype or Y.device != X.device:
            self._require_base_like(X, Y, what_y, "X")

    # Note [A result per point of the batch]
    # A map of several arguments broadcasts their batch dims, as torch's operators do, and returns one
    # result per point of that batch: inner(X, U, V) of 3 points and one shared vector is 3 numbers.
    # A map that reads only some of its arguments (an embedded metric's inner reads no point,
    # Sym.tangent is sym(G) wherever X is, the projection transport never reads X) broadcast only
    # those, and returned 1 number for the 3 points: a sum over the batch silently a third of what it
    # is (found by check_broadcast). Such maps pass their result through _over_batch, which expands it
    # (a copy, not a stride-0 view that an in-place update would refuse) where the batch differs:
    # a shape comparison, nothing else, in the common case of arguments of one batch.
    def _over_batch(self, out: Tensor, *args: Tensor, point: bool = True) -> Tensor:
        """``out`` over the broadcast batch dims of ``args`` (points and vectors of this space), where
        the map that computed it read only some of them (Note [A result per point of the batch]);
        ``point=False``: ``out`` is batch-shaped (``inner``)."""
        ref = out.shape if point else args[0].shape  # (batch-shaped: computed from arguments of one shape)
        # (ndim first: shapes of different lengths compare their leading sizes, a dynamic batch against a
        # point size, a guard that torch.export refuses: Note [Shape comparisons under a dynamic batch])
        if all(a.ndim == len(ref) and a.shape == ref for a in args):  # the common case, one batch: ~0.3 µs
            return out
        d = self.point_ndim
        batch = _broadcast([a.shape[: a.ndim - d] for a in args])
        nb = out.ndim - d if point else out.ndim
        if nb == len(batch) and tuple(out.shape[:nb]) == batch:
            return out
        return out.expand(batch + tuple(out.shape[nb:])).contiguous()

    def _require_base(self, Z: Tensor, base: Any) -> None:
        """A ``base`` is None or a tensor of ``Z``'s point shape whose batch dims broadcast."""
        if base is None:
            return
        if not isinstance(base, torch.Tensor):
            raise error(self, "`base` to be None or a tensor (a point of the space)", describe(base))
        self._check_shape(base, "base")
        self._require_same_shape(Z, base, "Z", "base")
        self._require_base_like(Z, base)

    def _require_base_like(self, Z: Tensor, base: Tensor, what: str = "base", what_z: str = "Z") -> None:
        """A base tensor has ``Z``'s dtype and device: a mixed pair would otherwise fail inside a product with a raw
        ``RuntimeError`` or be silently promoted, depending on the space. A dtype comparison only (no
        values read: traceable, vmap-safe; a DTensor's dtype is its local one). Low-precision
        arguments are compared after the float32 upcast of a low-precision leading argument (Note
        [Low precision]): a bfloat16 ``Z`` takes a float32 ``base``, a float32 ``Z`` no bfloat16 one."""
        if base.dtype != Z.dtype:
            raise error(self, f"`{what}` of the dtype of `{what_z}` ({dtype_for_message(Z)})", describe(base))
        if base.device != Z.device:  # torch's own error names neither the space nor the argument
            raise error(self, f"`{what}` on the device of `{what_z}` ({Z.device})", f"{describe(base)} on {base.device}")

    def _require_frame(self, Z: Tensor, B: Tensor, what: str, *others: Tensor | None) -> None:
        """A frame ``B`` of a base (shape ``(…, n, r)``, already checked) has ``Z``'s dtype and device, and
        batch dims that broadcast with those of the matrix ``Z`` and of the base's ``others`` frames: a
        mismatch would otherwise fail inside a product with torch's unnamed error."""
        self._require_base_like(Z, B, what)
        for A, name in ((Z, "Z"), *((A, "the other frame") for A in others if A is not None)):
            if not _broadcastable(A.shape[:-2], B.shape[:-2]):
                raise error(self, f"`{what}` with batch dims broadcastable with those of {name} {tuple(A.shape[:-2])}",
                            f"shape {tuple(B.shape)}")

    def _refine_base(self, base: Any, force: bool = False) -> Any:
        """``base`` re-made valid at the accuracy of its own dtype (Note [Bases across dtypes] in
        ``geofunc/nn/_adapter.py``): frames by their polar factor (which keeps the sign of a square
        frame's determinant), a point by :meth:`project`. Without ``force`` a base already valid with a
        margin (a quarter of the default tolerance) is returned as is, the same tensors. Tensors whose
        values cannot be read (meta, fake, under ``torch.func``, DTensors) are returned as they are.
        ``NotImplemented`` where the space does not say what its base is (``_base_kind`` None)."""
        if base is None:
            return None
        if self._base_kind == "frames":
            return optree.tree_map(lambda B: _refine_frame(B, force) if _readable(B) and B.ndim >= 2 else B, base)
        if self._base_kind == "point":
            if not _readable(base) or (not force and bool(self.contains(base, atol=0.25 * self._atol(base, None)).all())):
                return base
            return self.project(base)
        return NotImplemented

    def _invalid_base(self, base: Any) -> str | None:
        """Why ``base`` is not a base of this space at its dtype's default tolerance (what
        :meth:`_refine_base` would re-make, well beyond a dtype's rounding), or None: valid, values
        that cannot be read (meta, fake, under ``torch.func``, DTensors), or a space that does not
        say what its base is. Frames: ``max |BᴴB − I|`` (the shorter side's Gram); a point:
        :meth:`contains`."""
        if base is None:
            return None
        if self._base_kind == "frames":
            for B in optree.tree_leaves(base):
                if not _readable(B) or B.ndim < 2 or 0 in B.shape[-2:]:
                    continue
                err, tol = _frame_error(B)
                worst = float(err.max()) if err.numel() else 0.0
                if not worst <= tol:  # NaN too
                    return (f"a frame of shape {tuple(B.shape)} with max|BᴴB − I| = {worst:.3g} > {tol:.3g} "
                            f"(its columns are not orthonormal)")
            if self._base_det_positive:
                return _base_sign_error(base)
            return None
        if self._base_kind == "point":
            if not _readable(base):
                return None
            try:
                self.check(base)
            except ManifoldError as e:
                return "a point off the space: " + str(e).partition(", got ")[2].rstrip(".")
        return None

    def _dtype_coords(self, Z: Tensor) -> Tensor | None:
        """The view of the raw tensor ``Z`` whose entries mean other points in another dtype (the values
        ``softplus(s) + √ε`` of the dtype), which a dtype change of a module re-expresses (Note [Raw
        tensors across dtypes] in ``geofunc/nn/_adapter.py``); None (the default) where there are none."""
        return None

    def _coords_floor(self, dtype: torch.dtype) -> float:
        """The floor of the values of :meth:`_dtype_coords` for a raw tensor of ``dtype``: ``f = softplus(s) + floor``
        (the "softplus" spaces' √ε of the dtype; Hurwitz's W: √ε of bf16/fp16 only)."""
        from ._values import floor_eps  # (_values imports this module)

        return floor_eps(dtype)

    def _require_no_base(self, base: Any) -> None:
        """A space whose chart has no centre takes ``base=None`` only."""
        if base is not None:
            raise error(self, "`base` to be None (the space has no chart centre)", describe(base))

    def _require_same_shape(self, X: Tensor, Y: Tensor, what_x: str, what_y: str) -> None:
        """``Y`` must have ``X``'s point shape and batch dims that broadcast with ``X``'s."""
        d = self.point_ndim
        # (X.ndim - d: a slice [-d:] is the whole shape for d = 0, Rn's, which then refused a G that broadcasts)
        if tuple(X.shape[X.ndim - d:]) != tuple(Y.shape[Y.ndim - d:]):  # tuples: torch.Size == goes through sym_eq
            raise error(
                self,
                f"`{what_y}` with the point shape of `{what_x}` {tuple(X.shape[X.ndim - d:])}",
                f"shape {tuple(Y.shape)}",
            )
        if not (X.ndim == Y.ndim and X.shape == Y.shape) and not _broadcastable(  # (lengths first: Note [Shape
                X.shape[: X.ndim - d], Y.shape[: Y.ndim - d]):  # comparisons under a dynamic batch])
            raise error(
                self,
                f"`{what_y}` with batch dims broadcastable with those of `{what_x}` {tuple(X.shape[: X.ndim - d])}",
                f"shape {tuple(Y.shape)}",
            )

    # --------------------------------------------------------------- the maps
    @abc.abstractmethod
    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        """The trivialization: a raw tensor ``Z`` (the point's shape) to a point on the space."""

    def from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        """Right inverse of :meth:`to_manifold`: ``to_manifold(*from_manifold(X)) == X``.

        Raises ``ManifoldError`` if ``X`` is off the space (in eager mode; under
        ``torch.func`` transforms and ``torch.compile`` the value check is skipped).
        """
        self._check_shape(X, "X")
        if can_check(X):
            self.check(X)
        return self._from_manifold(X)

    @abc.abstractmethod
    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        """:meth:`from_manifold` without the membership check (pure, traceable)."""

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """The same point re-centred: ``to_manifold(*rebase(Z, base)) == to_manifold(Z, base)``."""
        return self._from_manifold(self.to_manifold(Z, base))

    @abc.abstractmethod
    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """Orthogonal projection of the ambient ``G`` onto the tangent space at ``X``."""

    @abc.abstractmethod
    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """A retraction: a point near ``X + V``, equal to it to first order."""

    # ------------------------------------------------------------ the metric
    # Embedded defaults: the metric is the ambient (Frobenius) one restricted to the tangent
    # spaces. A space with another metric (the Poincaré ball, ...) overrides these; the
    # optimizers of geofunc.optim use only egrad_to_rgrad, inner, retract and transport.
    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """The Riemannian gradient at ``X`` of a function whose Euclidean gradient is ``G``.

        Embedded metric (default): :meth:`tangent` ``(X, G)``, the orthogonal projection.
        """
        return self.tangent(X, G)

    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """A vector transport of ``V ∈ T_X M`` to ``T_Y M`` (default: ``tangent(Y, V)``, the projection)."""
        self._check_pair(X, Y, "Y")  # X is not read, but checked: a wrong one is the caller's mistake
        self._check_pair(Y, V, "V")  # (named: tangent's own check calls it G)
        return self._over_batch(self.tangent(Y, V), X, Y, V)

    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """The metric ``⟨U, V⟩_X`` of tangent vectors at ``X``, batch-shaped.

        Embedded metric (default): ``Re tr(UᴴV)``, summed over the point's dimensions.
        """
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        P = real_products(U, V)  # Note [Real products under vmap] (geofunc/_linalg.py)
        out = P.sum(dim=tuple(range(-self.point_ndim, 0))) if self.point_ndim else P
        return self._over_batch(out, X, U, V, point=False)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """The geodesic distance, batch-shaped (only where it has a closed form)."""
        raise ManifoldError(f"{self!r}: dist has no closed form implemented for this space.")

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """The Riemannian exponential map at ``X`` (only where it has a closed form)."""
        raise ManifoldError(f"{self!r}: expmap has no closed form implemented for this space; use retract.")

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """The Riemannian logarithm at ``X`` of ``Y`` (only where it has a closed form)."""
        raise ManifoldError(f"{self!r}: logmap has no closed form implemented for this space.")

    def sqdist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``dist(X, Y)²``, batch-shaped, as ``inner(X, L, L)`` with ``L = logmap(X, Y)``: as smooth as the
        logarithm, with exact first and second derivatives at ``Y = X``, where ``dist`` (a norm) has
        none and ``dist(X, Y) ** 2`` has a NaN second derivative. For losses of distances (a Fréchet
        mean, a proximal term under ``grad`` of ``grad``). Where ``logmap`` has a closed form."""
        L = self.logmap(X, Y)
        return self.inner(X, L, L)

    @abc.abstractmethod
    def project(self, Y: Tensor) -> Tensor:
        """The nearest point to ``Y`` on the space (a canonical point for open spaces)."""

    def sample(
        self,
        shape: Any,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> Tensor:
        """A random point of full tensor shape ``shape`` (batch included), from ``generator``.

        Default: :meth:`project` of a standard Gaussian (uniform for ``Sphere`` and ``Oblique``;
        the Gaussian itself for ``Rn``); spaces with a Haar measure or a factorization override it.
        """
        return self.project(_randn(self._sample_shape(shape, dtype), generator, dtype, device))

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``log|det to_manifold(Z, base)|`` from the factorization (square spaces only)."""
        # the rank family's wording: 'expected <what logabsdet takes> for logabsdet, got <what was given>'
        raise error(self, "a space with a factorized determinant for logabsdet (SO, Unitary, GLp, SL, PSD, the square "
                          "Stiefel and rank spaces; geofunc.testing.implements(space, 'logabsdet') tells)",
                    f"{self!r}, which has none (torch.linalg.slogdet gives log|det X| of a square point)")

    # ------------------------------------------------------------- membership
    @abc.abstractmethod
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        """Named, batch-shaped, non-negative measures of how far ``X`` is off the space."""

    def _measure(self, X: Tensor) -> dict[str, Tensor]:
        """``_violations`` of ``X`` computed in float32 for low-precision ``X`` (Note [Low precision]);
        the tolerance stays the one of ``X``'s own dtype."""
        low = X.dtype in LOW_PRECISION
        if not (low or _autocast_on(X.device.type)):
            return self._violations(X)
        if low:
            _ROUNDING.dtypes.append(X.dtype)
        try:
            with torch.autocast(X.device.type, enabled=False):
                return self._violations(_upcast(X))
        finally:
            if low:
                _ROUNDING.dtypes.pop()

    def _size(self, X: Tensor) -> int:
        """Typical size used to scale the default tolerance."""
        return max(X.shape[-self.point_ndim :]) if X.ndim else 1

    def _atol(self, X: Tensor, atol: float | None) -> float:
        if atol is None:
            return default_atol(X.dtype, self._size(X))
        try:
            tol = float(atol)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one value
            tol = None
        except OverflowError:  # an int too large for a float (10**400): inf, as atol=inf (it raised the OverflowError)
            tol = math.inf if atol > 0 else None
        # a negative or NaN atol refuses every point; float() also read a string ('1e-3') as a number
        if tol is None or isinstance(atol, (bool, str, bytes)) or not tol >= 0.0:
            raise error(self, "`atol` to be None or a number ≥ 0", describe(atol))
        return tol

    def contains(self, X: Tensor, atol: float | None = None) -> Tensor:
        """Per-point membership test: a boolean tensor of the batch shape (vmap-able)."""
        self._check_shape(X, "X")
        tol = self._atol(X, atol)
        out = None
        for v in self._measure(X).values():
            ok = v <= tol  # NaN compares False: a NaN point is never on the space
            out = ok if out is None else out & ok
        assert out is not None
        return out

    def check(self, X: Tensor, atol: float | None = None) -> None:
        """Eager validation: raise ``ManifoldError`` naming the measured violation, else return."""
        self._check_shape(X, "X")
        self._check_readable(X)
        only = shapes_only(X)
        if only or fake_mode_active():  # (torch's "item() on meta tensors" or DataDependentOutputException
            # otherwise; from_manifold skips the check there)
            where = ("on the meta device" if X.is_meta else "that is a FakeTensor" if only
                     else "under a FakeTensorMode (its measures are fake)")
            raise error(self, "a point with values to measure", f"{describe(X)} {where} (shapes only)")
        tol = self._atol(X, atol)
        for name, v in self._measure(X).items():
            if isinstance(v, DTensor):  # batch-shaped, small: every rank then raises alike
                v = v.full_tensor()
            bad = ~(v <= tol)
            if bool(bad.any()):
                vd = v.detach()
                worst = torch.where(torch.isnan(vd), torch.full_like(vd, float("inf")), vd).max()
                where = ""
                if v.ndim:
                    idx = first_index(bad)
                    where = f" (first at batch index {idx})"
                nan = bool(torch.isnan(vd).any())
                raise error(self, "a point on the space", f"{describe(X)} with {_violation(name, float(worst), tol, nan)}{where}")

    # Note [check under vmap]
    # ``check`` reads values (``bool``), which vmap cannot: inside ``vmap`` (an ensemble's per-member function)
    # every call, on a point or off it, raised torch's "data-dependent control flow" RuntimeError, naming
    # neither the space nor ``contains``. Under ``grad`` and ``jvp`` the values are there and it checks.
    # Only a point batched by a vmap level is unreadable: a tensor closed over (a constant point, a base
    # buffer: ``from_manifold(X0)`` inside the vmapped function) has its values, and was checked before.
    def _check_readable(self, X: Tensor) -> None:
        if (torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling()
                and "Vmap" in _transforms() and _vmap_batched(X)):  # (eager without transforms: one C call)
            raise error(self, "`check` outside torch.func.vmap (it reads the values, which vmap cannot: there use "
                              "`contains(X)`, batch-shaped booleans, or check the stacked points before vmap)",
                        f"{describe(X)} under vmap")


def _vmap_batched(X: Any) -> bool:
    """Whether ``X`` is batched by a vmap level (under grad/jvp wrappers too); True if unsure."""
    f = torch._C._functorch
    for _ in range(64):
        if not isinstance(X, torch.Tensor) or not f.is_functorch_wrapped_tensor(X):
            return False
        if f.is_batchedtensor(X):
            return True
        try:
            X = f.get_unwrapped(X)
        except Exception:  # noqa: BLE001 - (private API moved: refuse, as before)
            return True
    return True


_INDICATOR_MARKS = ("; inf if so)", " (inf if so)", " (NaN if any)")


def indicator_condition(name: str) -> Optional[str]:
    """The condition an indicator measure ``name`` states (``"det(X) ≤ 0 (inf if so)"`` → ``"det(X) ≤ 0"``,
    ``"x₀ ≤ 0 (lower sheet; inf if so)"`` → ``"x₀ ≤ 0 (lower sheet)"``), or None for another measure."""
    for mark in _INDICATOR_MARKS:
        if name.endswith(mark):
            return name[: -len(mark)] + (")" if mark.startswith(";") else "")
    return None


def _violation(name: str, worst: float, tol: float, nan: bool) -> str:
    """How :meth:`AbstractSpace.check` states a measure ``name`` past ``tol`` (``worst``: its largest value,
    NaN read as inf; ``nan``: whether it has NaN). ``"name = v > atol = t"``, or the condition alone for
    an indicator (a measure named ``"… (inf if so)"`` that is inf where the condition holds, or
    ``"… (NaN if any)"`` that is NaN there: :func:`indicator_condition`), so that it does not read
    ``det(X) ≤ 0 (inf if so) = inf > atol = 0.0001``; a NaN elsewhere is said as NaN (non-finite
    entries), not as inf."""
    cond = indicator_condition(name)
    if cond is not None:
        if worst == math.inf and nan == name.endswith(" (NaN if any)"):
            return cond
        if nan:
            return f"{cond}: NaN (undefined: non-finite entries?)"
    if nan:
        return f"{name} = NaN (undefined: non-finite entries?)"
    return f"{name} = {worst:.3g} > atol = {tol:.3g}"


# Note [Raw tensors and bases in row-major layout]
# A compiled training step guards the strides of its tensor inputs, so a raw tensor or base of another
# layout than the step saw first compiles a second graph (with inductor, seconds to a minute), once
# per layout. from_manifold returned its input's layout (zeros_like(X), base = X: QR's column-major
# Stiefel, Grassmannian and Oblique samples) and LAPACK's column-major frames (the SVD's U, V of the
# rank family, GLp, SL, AlmostOrthogonal; eigh's Q of the PSD family and Hurwitz), while rebase returned
# the charts' row-major outputs, and a wide frame space's rebase the transpose of a tall one: a step
# fed by from_manifold and then by gf.rebase compiled twice (every space with a base but SO, the
# hyperbolic ones, Sphere and Birkhoff; found by the recompile probe). Size-1 dimensions count too
# (Dynamo guards their strides): a (1, 5) raw tensor of stride (1, 1), the transpose of a column, and
# the elementwise step's (5, 1) output were a second graph at the second step. So the tensors
# from_manifold and rebase return are row-major with the strides torch.empty gives their shape, as an
# elementwise optimizer step keeps them: a copy only where a map produced another layout (once per
# from_manifold; a wide frame's rebase), a view where a size-1 dimension has another stride, nothing
# otherwise (the tensor itself: a leaf that an identity chart returns stays that leaf). Same values;
# DTensors keep their own layout.
def _row_major(x: Any) -> Any:
    """The tensors of ``x`` (a tensor, or tuples of them: ``(Z, base)``, a product's) with the strides
    ``torch.empty`` gives their shapes (Note [Raw tensors and bases in row-major layout]); anything else
    as it is. Written out: optree.tree_map took ~10 µs for a pair."""
    if type(x) is tuple:
        return tuple([_row_major(y) for y in x])
    if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
        return x
    if not x.is_contiguous():
        return x.contiguous()
    if 1 in x.shape and x.stride() != _dense_strides(x.shape):  # (is_contiguous ignores the strides of size-1 dims)
        return x.view(x.numel()).view(x.shape)
    return x  # the tensor itself: a leaf stays a leaf (a Parameter through an identity chart)


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` has."""
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _row_major_out(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``_from_manifold`` or ``rebase``: their tensors row-major (Note [Raw tensors and bases in row-major layout])."""

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _row_major(fn(self, *args, **kwargs))

    return method


def _apply_policy(cls: type) -> None:
    """Wrap the maps ``cls`` itself defines with the low-precision policy (Note [Low precision])
    and the DTensor routes (Note [DTensor] in ``geofunc/_dtensor.py``; the measures of ``contains``
    and ``check`` take the routes only); ``_from_manifold`` and ``rebase`` return row-major tensors
    (Note [Raw tensors and bases in row-major layout])."""
    for name in _POLICY_METHODS:
        fn = cls.__dict__.get(name)
        if fn is not None and callable(fn) and not getattr(fn, "_low_precision_policy", False):
            fn = _in_float32(fn)
            if (name in _ONE_NODE_METHODS and cls._one_node) or name in cls._one_node_maps:
                fn = one_node(fn)  # Note [One node under torch.func.grad] (geofunc/_fused.py)
            if name in ("_from_manifold", "rebase"):
                fn = _row_major_out(fn)
                fn._low_precision_policy = True  # type: ignore[attr-defined]
            setattr(cls, name, fn)
    fn = cls.__dict__.get("_violations")
    if fn is not None and not getattr(fn, "_low_precision_policy", False):
        setattr(cls, "_violations", distributed(fn))
    fn = cls.__dict__.get("sample")
    if fn is not None and not getattr(fn, "_low_precision_policy", False):
        setattr(cls, "sample", _sample_in_float32(fn))


def _sample_in_float32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``sample(dtype=float16/bfloat16)`` draws in float32 and rounds (Note [Low precision]); every
    ``sample`` computes with autocast off, as the maps do (under ``torch.autocast`` a float32 sample
    came back in bf16, computed by bf16 products, and ``SL``'s raised from a bf16 ``slogdet``)."""

    @functools.wraps(fn)
    def sample(self: Any, shape: Any, *, generator: Any = None, dtype: Any = None, device: Any = None) -> Any:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise error(self, "`generator` to be None or a torch.Generator", describe(generator))
        if device is not None and not isinstance(device, torch.device):
            try:  # (a bad device string was torch's RuntimeError from inside the sampler)
                torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise error(self, "`device` to be None, a torch.device, a device string or index", repr(device)) from None
        if dtype is None and torch.get_default_dtype() in LOW_PRECISION:
            # (a bf16/fp16 default dtype is the dtype asked for: without this, dtype=None drew and computed in
            # bf16, and every sampler through QR or LU raised torch's "geqrf_cpu not implemented for 'BFloat16'")
            dtype = torch.get_default_dtype()
        if dtype in LOW_PRECISION:
            if self._complex_only:  # (it drew complex64: a silent dtype change; torch has no complex bf16/fp16)
                raise error(self, "`dtype` float32, float64, complex64 or complex128 (complex points: there is "
                            "no complex dtype of bfloat16 or float16)", str(dtype))
            _ROUNDING.dtypes.append(dtype)
            try:
                with autocast_off():
                    out = fn(self, shape, generator=generator, dtype=torch.float32, device=device)
            finally:
                _ROUNDING.dtypes.pop()
            return _downcast(out, dtype)
        with autocast_off():
            return fn(self, shape, generator=generator, dtype=dtype, device=device)

    sample._low_precision_policy = True  # type: ignore[attr-defined]
    return sample


_apply_policy(AbstractSpace)
