"""One autograd node per map under ``torch.func.grad``. Private.

Note [One node under torch.func.grad]
Under ``torch.func.grad`` every torch op of a chart pays the transform twice: once in the
forward (functorch's dispatch: unwrap, record, rewrap) and once in the backward, which
functorch always runs with ``create_graph=True``, so each backward formula is recorded too.
A chart is tens to hundreds of small ops (the rank family's, at small rank, ~370 forward and
backward), so the transform cost 1.9–2.6× plain autograd on the same maths (issue 13). An
``autograd.Function`` does not help: functorch builds a Function class per call and maps its
arguments with pytrees, ~0.2 ms of Python per node.

So when a map runs under exactly one ``torch.func.grad`` (or ``grad_and_value``) level and
nothing below it tracks derivatives, it becomes one node at that level (a functorch
``_SingleLevelFunction`` applied directly, as functorch's own generated Functions are):

* forward: the inputs are unwrapped to the level below (plain tensors), the map runs there under
  plain autograd on detached copies of the differentiable ones (a private graph), and the
  detached value is wrapped back;
* backward: the cotangent is unwrapped, the private graph gives the vector-Jacobian product at
  plain autograd's cost, and the result is wrapped back. When that backward is ``grad``'s own (its
  ``_autograd_grad`` frame, called from the frame that ran the forward, is on the stack), nothing
  will differentiate it and the private graph is freed. Any other backward at that level (a user's
  ``torch.autograd.grad(..., create_graph=True)`` inside the transformed function) gets the values
  through a second node, u = J(xs)ᵀ G of (cotangents G, inputs xs), whose own derivatives recompute
  the map as torch ops at the transform's level: the exact chain, to every order. They are the two
  partials, ∂/∂xs ⟨J(xs)ᵀ G, H⟩ with G held fixed and ∂/∂G = J(xs) H, taken on fresh aliases of xs
  and G. G usually depends on xs (a loss nonlinear in the point): the engine follows that path from
  the G-partial, so the xs-partial must not (it once did, counting Jᵀ L″ J V twice); and the results
  must stay functions of xs, G and H (not of detached copies) for a third derivative.

A map of a few ops is cheaper without the node (its fixed cost, ~50 µs, is more than the transform
costs for one to three ops): a space says so with ``_one_node = False`` (``Rn``, ``Sym``, ``Skew``,
``Hermitian``, ``SphereEmbedded``; under ``grad`` 0.53–0.77× the time with the node), and
``gf.to_manifold`` of a pytree of only such spaces takes no node either (``one_node``'s ``worth``).
The spectral maps (``tangent``, ``retract``, ``project`` of the rank/PSD family, the polar ``project``,
Hurwitz's) are one node too (``AbstractSpace._one_node_maps``): inside it their second-order terms are
not built for grad's own backward (Note [Lazy second-order terms] in ``geofunc/_fastpath.py``).

Everything else (no transform, ``vmap``, ``jvp``, ``vjp``/``jacrev``, nested transforms, MAML's
grad of grad, ``torch.compile``, forward-mode AD, tensor subclasses, inputs whose plain tensors
require grad) calls the map directly, as before. The decision is made per call from the
functorch interpreter stack and the Python frame of ``grad_and_value`` (so a ``vjp`` level,
whose backward may run after the level has exited, never takes this path). If PyTorch's
private functorch API moves, the import fails and every call takes the direct path.
Measured (1 thread, float32, ``grad`` of ⟨G, to_manifold(Z, base)⟩, A/B in one process; plain
autograd in brackets): Stiefel 128×64 3.58 → 2.45 ms (1.95), LowRank(4) 10×128 3.30 → 2.60 ms (1.64).
What remains under ``grad`` is functorch's own cost around the node (~75 µs per call, the ops of the
loss, and the reference cycles torch's pytree leaves per call for the garbage collector). The node's
own cost, measured on a one-op map (``grad`` with the node less ``grad`` without it), is ~68 µs a call,
most of it the engine's nested backward and the C++ apply; ``one_node``'s Python keeps to one pass over
the arguments (the node is applied to the differentiable ones only, one output tensor skips the pytree).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any, Callable

import optree
import torch
import torch.autograd.forward_ad as _fw_ad

from ._fastpath import _PLAIN_TYPES, autocast_on

Tensor = torch.Tensor

try:  # private functorch API (tested on torch 2.13); absent or moved: the direct path only
    from torch._C._functorch import (
        _unwrap_for_grad,
        _wrap_for_grad,
        get_single_level_autograd_function_allowed,
        is_functorch_wrapped_tensor,
        peek_interpreter_stack,
        set_single_level_autograd_function_allowed,
    )
    from torch._C._functorch import pop_dynamic_layer_stack, push_dynamic_layer_stack
    from torch._functorch import eager_transforms as _eager
    from torch.autograd.function import _SingleLevelFunction

    _GRAD_KEY = torch._C._functorch.TransformType.Grad
    _ENGINE = torch.autograd.Variable._execution_engine
    _GRAD_CODE = inspect.unwrap(_eager.grad_and_value_impl).__code__
    _AUTOGRAD_GRAD_CODE = inspect.unwrap(_eager._autograd_grad).__code__
    AVAILABLE = True
except Exception:  # pragma: no cover (depends on the torch version)
    AVAILABLE = False


class _Off(threading.local):
    depth = 0  # > 0 while this thread recomputes a map as torch ops (the higher-derivative path)


_OFF = _Off()

# Note [The private backward under autocast]
# Every fused map computes with autocast off (Note [Low precision] in spaces/_base.py), so its private
# graph holds float32 (float64) ops. torch.func.grad called inside an autocast region runs the node's
# backward there too, and the engine would then cast the backward formulas' products to the autocast
# dtype: the chart's gradient was a bfloat16 one (~1% off), and in float16 the backward of an eigh/expm
# chart overflowed to NaN (PSD, SO, SL from raw entries of scale ~5). The vector-Jacobian product
# is taken with autocast off, in the dtype its forward ran in. (A plain loss.backward() inside an
# autocast region runs torch's own backward formulas in the autocast dtype: docs/guide/conventions.md.)
_MAX_FRAMES = 200  # how far up the Python stack grad_and_value's frame is looked for
_ONE_TENSOR = (True,)  # the output mask of a map that returns one tensor


def _lower() -> tuple:
    """Leave the (only) grad level for the plain tensors below it, grad mode on; :func:`_restore` undoes it."""
    layer = pop_dynamic_layer_stack()
    mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(True)
    return layer, mode


def _restore(layer: Any, mode: bool) -> None:
    torch._C._set_grad_enabled(mode)
    push_dynamic_layer_stack(layer)


def _only_grad_level() -> bool:
    """Whether the functorch stack is exactly one ``grad`` level."""
    top = peek_interpreter_stack()
    return top is not None and top.level() == 1 and top.key() == _GRAD_KEY


def _up(code: Any, f: Any) -> Any:
    """The nearest frame running ``code`` from ``f`` up (at most _MAX_FRAMES), or None."""
    for _ in range(_MAX_FRAMES):
        if f is None or f.f_code is code:
            return f
        f = f.f_back
    return None


def _final_backward(grad_frame: int) -> bool:
    """Whether the running backward is ``grad_and_value``'s own (the one whose graph nobody differentiates):
    its ``_autograd_grad`` frame, called from the frame that saw the forward, is on this thread's stack."""
    f = _up(_AUTOGRAD_GRAD_CODE, sys._getframe(2))
    return f is not None and f.f_back is not None and id(f.f_back) == grad_frame


class _Call:
    """What the nodes share: the map, its arguments (flattened), its output's structure and the private graph."""

    __slots__ = ("fn", "treedef", "kw", "flat", "inner", "diff", "frame", "leaves", "outs", "out_treedef", "out_mask",
                 "out_static")

    def arguments(self, leaves: list) -> tuple:
        """``(args, kwargs)`` from the flattened ``leaves`` (the keywords flattened too only where there were any)."""
        if self.kw:
            return optree.tree_unflatten(self.treedef, leaves)
        return optree.tree_unflatten(self.treedef, leaves), {}

    def recompute(self, flat: list) -> list:
        """The map's output leaves as torch ops on ``flat`` (at whatever transform level is active)."""
        _OFF.depth += 1
        try:
            args, kwargs = self.arguments(flat)
            leaves = optree.tree_leaves(self.fn(*args, **kwargs), none_is_leaf=True)
            return [o for o, m in zip(leaves, self.out_mask) if m]
        finally:
            _OFF.depth -= 1

    def xs(self) -> list:
        """The differentiable arguments (at the grad level)."""
        return [t for t, d in zip(self.flat, self.diff) if d]

    def vjp_chain(self, Gs: tuple | list, create_graph: bool, flat: list | None = None) -> tuple:
        """The vector-Jacobian product by recomputing the map as torch ops (exact to every order), with
        respect to the differentiable entries of ``flat`` (default: the arguments themselves)."""
        flat = list(self.flat) if flat is None else flat
        xs = [t for t, d in zip(flat, self.diff) if d]
        with torch.enable_grad():
            pairs = [(o, g) for o, g in zip(self.recompute(flat), Gs) if o.requires_grad and g is not None]
            if not pairs:
                return (None,) * len(xs)
            return torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs], create_graph=create_graph,
                                       allow_unused=True)


if AVAILABLE:

    class _Fused(_SingleLevelFunction):
        # Applied to the differentiable arguments only (the others, and the plain tensors under every
        # argument, travel in the _Call), with the forward and its context in one call: no setup_context.
        @staticmethod
        def forward(ctx: Any, call: _Call, *xs: Any) -> tuple:  # type: ignore[override]
            ctx.call = call
            layer, mode = _lower()
            try:
                leaves = [t.detach().requires_grad_() if d else t for t, d in zip(call.inner, call.diff)]
                args, kwargs = call.arguments(leaves)
                out = call.fn(*args, **kwargs)
                if type(out) is Tensor:  # one tensor: no pytree (method returns it as it is)
                    call.out_treedef, call.out_mask, outs = None, _ONE_TENSOR, [out]
                else:
                    out_leaves, call.out_treedef = optree.tree_flatten(out, none_is_leaf=True)
                    call.out_mask = [isinstance(o, Tensor) for o in out_leaves]  # other leaves (None, numbers) pass through
                    call.out_static = [o for o, m in zip(out_leaves, call.out_mask) if not m]
                    outs = [o for o, m in zip(out_leaves, call.out_mask) if m]
                ptrs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, Tensor)}
                # never alias an input (a custom Function's outputs are new tensors)
                values = [o.detach().clone() if o.untyped_storage().data_ptr() in ptrs else o.detach() for o in outs]
            finally:
                _restore(layer, mode)
            call.leaves, call.outs = leaves, outs
            return tuple([_wrap_for_grad(v, 1) for v in values])

        @staticmethod
        def backward(ctx: Any, *Gs: Tensor) -> tuple:  # type: ignore[override]
            call: _Call = ctx.call
            outs = call.outs
            if outs is not None and not any([o.requires_grad for o in outs]):  # a constant of the inputs
                return (None,) * len(ctx.needs_input_grad)
            if outs is None or not _only_grad_level():  # pragma: no cover
                grads = call.vjp_chain(Gs, torch.is_grad_enabled())  # (not reached by grad: the exact chain)
            elif _final_backward(call.frame):  # grad's own backward, run once: the private graph is freed
                grads = _private_vjp(call, Gs, retain=False)
                call.leaves = call.outs = None
            elif torch.is_grad_enabled():  # a graph is asked for: one more node
                allowed = get_single_level_autograd_function_allowed()
                set_single_level_autograd_function_allowed(True)
                try:
                    grads = _FusedAdjoint.apply(call, len(Gs), *Gs, *call.xs())
                finally:
                    set_single_level_autograd_function_allowed(allowed)
            else:
                grads = _private_vjp(call, Gs)
            return (None, *grads)

    def _private_vjp(call: _Call, Gs: tuple, retain: bool = True) -> tuple:
        """The vector-Jacobian product from the private graph, wrapped at the grad level (``retain``: keep
        the graph for another backward)."""
        outs, gs = [], []
        for o, g in zip(call.outs, Gs):
            if o.requires_grad and g is not None:
                outs.append(o)
                gs.append(_unwrap_for_grad(g, 1))
        xs = tuple([t for t, d in zip(call.leaves, call.diff) if d])
        layer, mode = _lower()
        try:  # torch.autograd.grad without its Python argument handling (~30 µs): the engine itself
            if xs and autocast_on(xs[0].device.type):  # Note [The private backward under autocast]
                with torch.autocast(xs[0].device.type, enabled=False):
                    vals = _ENGINE.run_backward(tuple(outs), tuple(gs), retain, False, xs, True, False)
            else:
                vals = _ENGINE.run_backward(tuple(outs), tuple(gs), retain, False, xs, True, False)
            vals = [torch.zeros_like(x) if v is None else v for v, x in zip(vals, xs)]
        finally:
            _restore(layer, mode)
        return tuple([_wrap_for_grad(v, 1) for v in vals])

    class _FusedAdjoint(_SingleLevelFunction):
        """The backward of :class:`_Fused` as one node of ``(cotangents, inputs)``: its value from the
        private graph, its own derivatives (a double backward) from the map recomputed as torch ops."""

        @staticmethod
        def forward(call: _Call, n: int, *Gs_xs: Tensor) -> tuple:  # type: ignore[override]
            return _private_vjp(call, Gs_xs[:n])

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            ctx.call, n = inputs[0], inputs[1]
            ctx.Gs = inputs[2 : 2 + n]

        @staticmethod
        def backward(ctx: Any, *H: Tensor) -> tuple:  # type: ignore[override]
            # The node is u = J(xs)ᵀ G. Its derivatives are two partials: ∂/∂xs ⟨J(xs)ᵀ G, H⟩ with G held
            # fixed, and ∂/∂G = J(xs) H. G usually depends on xs itself (through the loss and _Fused's
            # output): the engine adds that path from the G-part, so the xs-part must not contain it, or
            # the loss-curvature term Jᵀ L″ J V is counted twice. Both partials come from one chain on
            # fresh aliases of xs and G: the only paths to an alias run through the recomputed chain, yet
            # the aliases (so both results) stay functions of xs, G and H for the next order.
            call, Gs = ctx.call, ctx.Gs
            higher = torch.is_grad_enabled()  # create_graph of the backward that runs this one
            want = [i for i, g in enumerate(Gs) if ctx.needs_input_grad[2 + i]]
            n_x = sum(call.diff)
            with torch.enable_grad():
                flat = [t.view_as(t) if d else t for t, d in zip(call.flat, call.diff)]
                Ga = list(Gs)
                for i in want:
                    Ga[i] = Gs[i].view_as(Gs[i])
                v = call.vjp_chain(Ga, create_graph=True, flat=flat)
                pairs = [(vi, hi) for vi, hi in zip(v, H) if vi is not None and hi is not None and vi.requires_grad]
                if not pairs:
                    return (None,) * (len(Gs) + n_x + 2)
                wrt = [t for t, d in zip(flat, call.diff) if d] + [Ga[i] for i in want]
                d = torch.autograd.grad([p[0] for p in pairs], wrt, [p[1] for p in pairs], create_graph=higher,
                                        allow_unused=True)
            dG = [None] * len(Gs)
            for i, di in zip(want, d[n_x:]):
                dG[i] = di
            return (None, None, *dG, *d[:n_x])


def _fusable(flat: list) -> tuple[list, list, list] | None:
    """``(inner, diff, xs)``: the plain tensors below the grad level (other leaves as they are), which
    entries of ``flat`` are differentiable there, and those entries; or None: call directly."""
    if _fw_ad._current_level >= 0:
        return None
    inner, diff, xs = [], [], []
    for t in flat:
        if isinstance(t, Tensor):
            if is_functorch_wrapped_tensor(t):
                i = _unwrap_for_grad(t, 1)
                if type(i) not in _PLAIN_TYPES or i.requires_grad or is_functorch_wrapped_tensor(i):
                    return None
                inner.append(i)
                if t.requires_grad:
                    diff.append(True)
                    xs.append(t)
                else:
                    diff.append(False)
                continue
            if type(t) not in _PLAIN_TYPES or t.requires_grad:
                return None
        inner.append(t)
        diff.append(False)
    return (inner, diff, xs) if xs else None


def one_node(fn: Callable[..., Any], worth: Callable[..., bool] | None = None) -> Callable[..., Any]:
    """Wrap a map returning a tensor (or a pytree of tensors) so that it is one node under ``torch.func.grad``
    (Note [One node under torch.func.grad]); elsewhere it is called directly. ``worth(*args, **kwargs)``,
    if given, is asked under ``grad`` whether this call's maths is worth a node (False: a few ops,
    cheaper as they are)."""
    if not AVAILABLE:  # pragma: no cover
        return fn

    @functools.wraps(fn)
    def method(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or _OFF.depth:
            return fn(*args, **kwargs)
        top = peek_interpreter_stack()  # (_only_grad_level and _grad_frame, inline: this runs on every call)
        if top is None or top.level() != 1 or top.key() != _GRAD_KEY:
            return fn(*args, **kwargs)
        frame = _up(_GRAD_CODE, sys._getframe(1))  # grad_and_value's frame
        if frame is None or (worth is not None and not worth(*args, **kwargs)):
            return fn(*args, **kwargs)
        if kwargs:
            flat, treedef = optree.tree_flatten((args, kwargs), none_is_leaf=True)
        else:
            flat, treedef = optree.tree_flatten(args, none_is_leaf=True)
        split = _fusable(flat)
        if split is None:
            return fn(*args, **kwargs)
        call = _Call()
        call.fn, call.treedef, call.kw, call.flat, call.frame = fn, treedef, bool(kwargs), flat, id(frame)
        call.inner, call.diff, xs = split
        allowed = get_single_level_autograd_function_allowed()
        set_single_level_autograd_function_allowed(True)
        try:
            outs = _Fused.apply(call, *xs)
        finally:
            set_single_level_autograd_function_allowed(allowed)
        if call.out_treedef is None:
            return outs[0]
        it, static = iter(outs), iter(call.out_static)
        return optree.tree_unflatten(call.out_treedef, [next(it) if m else next(static) for m in call.out_mask])

    return method
