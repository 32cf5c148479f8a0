"""When a one-node eager fast path may replace a chain of differentiable torch ops. Private.

Some maps (the sphere's chart) are a few dozen tiny ops whose cost is all per-op and
per-autograd-node overhead. In plain eager mode they run as one legacy
``autograd.Function`` with a closed-form backward (and ``jvp`` for ``torch.autograd.forward_ad``);
everywhere else (``torch.func`` transforms, ``torch.compile``, tensor subclasses, dtypes other
than float32/float64, meta tensors) the differentiable op chain runs, whose rules PyTorch
composes to every order. A fast path whose backward is asked to build a graph
(``create_graph=True``) differentiates that op chain too, so higher derivatives are the same.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as _fw_ad
from torch.utils._python_dispatch import _disable_current_modes

Tensor = torch.Tensor

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_FAST_DTYPES = (torch.float32, torch.float64)


# Note [Traced by make_fx]
# torch.func.linearize traces the jvp with make_fx (a proxy dispatch mode over real tensors), then
# folds the subgraphs that do not depend on the tangent into constants. Two things that are right in
# eager mode go wrong there: a value read into Python (a degree choice, a check skipped below a
# bound) from a tensor that depends on the traced input raises ("a tracing tensor"), and torch's
# constant folding drops an in-place op whose result is unused (``X.diagonal().add_(1)``): the
# exponential's I + B lost its I, and linearize gave tangents 20–130% off for 1×1 rank and PSD
# points, silently. So while make_fx traces, the maps compute out of place and read no values
# (as inside torch.compile). make_fx of plain eager code (tracing_mode="real", no torch.func level)
# still took the eager fast paths, whose degree choice read values: "a tracing tensor" errors (SO
# 40×40, frames with k ≥ 32), or, where the read escaped the tracer (the one-node charts), the
# trace-time degree and squarings baked into the graph (a Stiefel 16×4 chart replayed at a raw tensor
# 30× larger was 3e11 off orthonormal, silently). So no eager fast path runs while make_fx traces
# (eager_fast), and the exponential and the frame exponential are the operators that choose at run
# time, or the static schedule where those are not registered, as inside torch.compile.
# Note [Traced by make_fx before dispatch]
# make_fx(f, pre_dispatch=True) (the tracer under torch.export; public in make_fx) keeps its proxy mode on a
# stack of its own, above autograd, and the dispatch mode stack stays empty: the test above saw no trace,
# so in tracing_mode="real" the eager fast paths ran and read values, as make_fx's did before: a Stiefel
# 16×4 chart replayed at a raw tensor 30× larger was 1e6 off, a LowRank 16×12 one 1e8 off, a
# Grassmannian 8×3 one 2e2 off, silently; SO 40×40 and frames with k ≥ 32 raised "a tracing tensor"; a
# LowRank chart at bases seen by an eager call before raised it from the base factor cache's comparison
# (Note [Base factor cache] in _linalg.py). Such a trace is a make_fx trace like the other: torch's
# pre-dispatch proxy mode (one slot for the process: a list read, in eager_fast too) and then the thread's
# pre-dispatch key (so another thread's trace leaves this one's fast paths alone) mark it.
_PRE_DISPATCH = getattr(getattr(torch._C, "DispatchKey", None), "PreDispatch", None)
_KEY_INCLUDED = getattr(torch._C, "_dispatch_tls_is_dispatch_key_included", None)
_PROXY = torch._C._TorchDispatchModeKey.PROXY
_GET_MODE = torch._C._get_dispatch_mode


# torch's pre-dispatch modes (one list for the process, its entry 0 the proxy mode; torch 2.6 to 2.13): read
# first (~30 ns), the thread's dispatch key only while some thread traces (a pybind call, ~10× that)
_PRE_MODES = getattr(getattr(torch._ops, "_mode_stack_state_for_pre_dispatch", None),
                     "_ModeStackStateForPreDispatch__infra_modes", None)
if not (isinstance(_PRE_MODES, list) and _PRE_MODES):
    _PRE_MODES = None


def _pre_dispatch_tracing() -> bool:
    """Whether make_fx(pre_dispatch=True) is recording the ops (Note [Traced by make_fx before dispatch])."""
    if _PRE_MODES is not None and _PRE_MODES[0] is None:
        return False
    if _PRE_DISPATCH is None or _KEY_INCLUDED is None or not _KEY_INCLUDED(_PRE_DISPATCH):
        return False
    return torch._ops._get_dispatch_mode_pre_dispatch(_PROXY) is not None


def make_fx_tracing() -> bool:
    """Whether make_fx (``torch.func.linearize``, AOT tracing, ``pre_dispatch=True`` too) is recording the
    ops (Note [Traced by make_fx], Note [Traced by make_fx before dispatch])."""
    # (a pre-dispatch trace under another dispatch mode, a FlopCounterMode or a user's, has the regular stack
    # non-empty and no PROXY mode on it: both are read there)
    if _DISPATCH_STACK_LEN() and _GET_MODE(_PROXY) is not None:
        return True
    return _pre_dispatch_tracing()


# Note [In place under a dispatch mode]
# The exponential's eager kernels update fresh buffers in place, some through views
# (``X.diagonal().add_(c)`` adds the identity, ``P3[..., :k].add_(...)``). Under selective activation
# checkpointing (torch.utils.checkpoint with create_selective_checkpoint_contexts) every op runs through
# a TorchDispatchMode that saves the outputs of the ops its policy names and hands them back in the
# recomputation. A saved view is handed back instead of a view of the recomputed buffer, so the update
# through it lands in the forward's buffer and the recomputed one misses it; torch's check for mutated
# cached tensors does not see a mutation made through another view. With a policy that saves
# ``aten.diagonal`` (or ``aten.slice``), SO's, Stiefel's, PSD's, SL's, Hurwitz's and Unitary's gradients were
# 0.06 to 4.3 off (or NaN), silently. So while any dispatch mode is active (SAC's, make_fx's proxy
# mode, FakeTensorMode, a user's) the maps compute out of place, as inside torch.compile.
def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode is on the stack (Note [In place under a dispatch mode]); make_fx's
    proxy mode is one, so this is also true while make_fx traces. False while Dynamo traces (the stack's
    length is no tensor op it can trace: "torch.* op returned non-Tensor"; the graph is functionalized)."""
    return not torch.compiler.is_compiling() and _DISPATCH_STACK_LEN() > 0


def outside_modes(build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)`` with the dispatch modes switched off where any is active, except while make_fx
    traces: a cache's miss (a function of its key alone) adds no ops to a selectively checkpointed
    region's count, nor fake values to the cache (Note [Layouts under a dispatch mode])."""
    if dispatch_mode_active() and not make_fx_tracing():
        with _disable_current_modes():
            return build(*args)
    return build(*args)


def fake_mode_active() -> bool:
    """Whether a FakeTensorMode is active (Note [Cached values under FakeTensorMode] in geofunc/nn/_adapter.py)."""
    if not _DISPATCH_STACK_LEN():  # (~40 ns: the common case, no mode at all, without the mode lookup's ~200)
        return False
    key = getattr(torch._C, "_TorchDispatchModeKey", None)  # (torch 2.1+; on 2.0 any dispatch mode counts)
    if key is None:
        return dispatch_mode_active()
    return torch._C._get_dispatch_mode(key.FAKE) is not None


_DISPATCH_STACK_LEN = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


# Note [Fast paths under FakeTensorMode]
# FakeTensorMode(allow_non_fake_inputs=True) runs ops on real tensors (a model's real parameters: a memory
# or FLOP estimate of a forward or an optimizer step) and gives fake results. A fast path reads a value
# of its own intermediates (the rank family's sketch certifies by a residual, the sketched membership
# decides by bounds, the frame exponential picks its degree): from real inputs those are fake, and the
# read raised torch's DataDependentOutputException (contains of a LowRank/FixedRank/PSSDLowRank point
# ≥ 64², tangent/project/transport of the rank family ≥ 64², Stiefel/Grassmannian to_manifold with
# k ≥ 32), where the general path computes fake values as for a fake input. Under a fake mode the fast
# paths are off, as inside torch.compile.
def eager_fast(*tensors: Optional[Tensor]) -> bool:
    """Whether ``tensors`` (None entries skipped) may take an eager fast path."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # no values to read (Note [Fast paths under FakeTensorMode]) or none to bake in (Note [Traced by make_fx])
    if _DISPATCH_STACK_LEN() and (fake_mode_active() or _GET_MODE(_PROXY) is not None):
        return False
    if (_PRE_MODES is None or _PRE_MODES[0] is not None) and _pre_dispatch_tracing():  # (inlined: ~30 ns)
        return False
    dtype = None
    for T in tensors:
        if T is None:
            continue
        if type(T) not in _PLAIN_TYPES or T.dtype not in _FAST_DTYPES or T.is_meta:
            return False
        if dtype is not None and T.dtype != dtype:
            return False
        dtype = T.dtype
    return True


# Note [Values read under grad and jvp]
# eager_fast is off under every torch.func level, vmap's (where a value is no Python number) as grad's
# and jvp's, which run the eager dispatcher on wrapped tensors whose values can be read (torch.func
# documents data-dependent control flow under grad/jvp/vjp/jacrev). A branch that only skips work that is
# zero in value where a test of the values says so (SO's and Unitary's cut-cluster terms: Note [Several
# planes in the cut cluster]) may take the test there too: under grad/jvp levels alone, not compiling, no
# vmap or functionalize level, no fake or tracing mode.
def values_readable(*tensors: Optional[Tensor]) -> bool:
    """Whether a test of ``tensors``' values may decide a branch that changes no value: eager mode, or
    torch.func's grad/jvp levels only (Note [Values read under grad and jvp])."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return eager_fast(*tensors)
    if torch.compiler.is_compiling() or any(k not in ("Grad", "Jvp") for k in _transforms()):
        return False
    if _DISPATCH_STACK_LEN() and (fake_mode_active() or _GET_MODE(_PROXY) is not None):
        return False
    if (_PRE_MODES is None or _PRE_MODES[0] is not None) and _pre_dispatch_tracing():
        return False
    return all(T is None or (type(T) in _PLAIN_TYPES and not T.is_meta) for T in tensors)


def tracks_derivatives(*tensors: Optional[Tensor]) -> bool:
    """Whether a result computed from ``tensors`` needs an autograd node: grad mode is on and one
    requires grad, or one carries a ``torch.autograd.forward_ad`` tangent."""
    if torch.is_grad_enabled() and any(T is not None and T.requires_grad for T in tensors):
        return True
    return forward_tangents(*tensors)


# Note [Dual levels and recomputation]
# The eager fast paths (one-node charts, closed-form nodes, the frame exponential) leave forward mode
# to the op chain. They asked whether a torch.autograd.forward_ad dual level was open, not whether an
# input carried a tangent at it. A forward run under an open level (a forward-gradient estimate of
# another part of the model, a level left open around a training step) then took the chain, and
# activation checkpointing (use_reentrant=False) recomputed it in the backward after the level had
# closed, on the fast path: other saved tensors, torch's CheckpointError "Recomputed values ... have
# different metadata" for the charts of Stiefel, Grassmannian, AlmostOrthogonal and the rank/PSD
# family, and the projections/retractions of nearly every matrix space. What the paths choose now
# depends on the inputs' tangents, which are the same at recomputation when the forward had none.
# (Inputs that do carry tangents still take the chain, and a recomputation after the level closed
# does not: those raise as before.)
def forward_tangents(*tensors: Optional[Tensor]) -> bool:
    """Whether a forward-AD dual level is open and one of ``tensors`` (None skipped) carries a tangent
    at it (Note [Dual levels and recomputation])."""
    if _fw_ad._current_level < 0:
        return False
    return any(T is not None and _fw_ad.unpack_dual(T).tangent is not None for T in tensors)


# Note [Lazy second-order terms]
# The spectral maps (Note [Second derivatives of spectral maps] in geofunc/_linalg.py) are exact to
# second order through a term that is zero in value and in first derivative: only a second
# derivative reads it. Built as torch ops it costs more than the map's first-order chain (LowRank(4)
# 128×10 retract, forward and backward under plain autograd: 0.68 → 1.86 ms). So where it can be,
# the term is not built:
# * nothing differentiates (no grad mode or no input requiring grad, no forward-mode level; or
#   only vmap levels above plain tensors that track nothing): "none", the value alone (the
#   first-order terms are skipped too: an optimizer's retract under no_grad, 0.6–0.8× its time);
# * plain eager autograd: "lazy". The SVD/eigh maps and the polar factor are one node
#   (closed_form_node): the forward computes the value alone, a backward that builds no graph is the
#   first-order term's adjoint written out (a few products: differentiated project/retract
#   0.69–0.90× the time of the old chain of torch ops), and one with create_graph=True
#   differentiates the map recomputed as torch ops, both terms, so every derivative past the first
#   is the chain's (the rank family's tangent too: its thin frames' adjoint written out, with the
#   exact projector map as the chain). Where the first-order part stays torch ops (Hurwitz's
#   abscissa), the second-order term is one node that passes the first-order
#   result through and computes only under create_graph=True (add_second_order; ~0.05–0.1 ms);
# * under a single torch.func.grad level the maps are one node (AbstractSpace._one_node_maps, Note
#   [One node under torch.func.grad] in geofunc/_fused.py) that runs them in plain autograd: lazy
#   again, and a backward at that level other than grad's own recomputes the chain;
# * under one torch.func.jvp level (and vmap levels: jvp, jacfwd, linearize) with nothing below it
#   tracking derivatives: "first", the first-order terms as torch ops and not the second-order one.
#   Forward mode at a single level carries first derivatives only, and the term's tangent is zero
#   there (bilinear in the zero-valued dY), so leaving it out changes no value and no tangent; built,
#   it was 70% of the work (Stiefel, Grassmannian and LowRank(4) project and retract 1024×16 under
#   jvp: 131 n·k² of matmul FLOPs, 38 without it; LowRank's tangent 161 → 68; the forward alone is
#   2). A Grad or second Jvp level anywhere in the stack (hessian, jvp of grad, jacfwd of jacfwd)
#   keeps the chain. Only callers that pass ``first=True`` (the SVD/eigh maps, the polar factor) get it;
# * inside torch.compile with grad mode off and no forward-mode level (a compiled optimizer step or
#   rebase under no_grad): "none", as in eager mode (Note [Compiled maps that nothing differentiates]);
# * everything else (plain-eager forward-mode AD, vjp/jacrev, nested transforms, torch.compile with
#   grad mode on): "chain", the term as torch ops.
#
# Note [Compiled maps that nothing differentiates]
# Inside torch.compile every call took the chain: no compiler removes terms that are zero in value
# (D = Y − Y.detach() is not known to be 0), so a compiled step that differentiates nothing carried
# every map's first- and second-order terms (float64, under no_grad, captured graph ÷ eager matmul
# FLOPs: LowRank(4) 256×16 retract/project 24×, tangent 27×; PSSDLowRank(3) 9–37×; Stiefel project
# 30×). What Dynamo shows while it traces (measured, torch 2.13): the functorch interpreter stack is
# never empty, even for a plain call, and wrapped tensors read requires_grad=False inside a traced
# torch.func.grad/vjp, so neither says "nothing differentiates"; but grad mode (on inside every
# traced grad/vjp/jacrev body, which enable it) and the forward-mode level (open inside a traced
# jvp/jacfwd, or a user's dual_level) are read faithfully, and grad mode is part of the compiled
# graph's guards. So "none" exactly where grad mode is off and no forward-mode level is open (a
# compiled update, rebase or projection called under torch.no_grad()). With grad mode on, the chain
# as before: the functional optimizers' update stays differentiable, so a compiled training step
# that should skip the terms wraps its update in torch.no_grad() (README, torch.compile).
def derivative_mode(*tensors: Optional[Tensor], first: bool = False) -> str:
    """How a map with a second-order term computes derivatives for ``tensors``: ``"none"`` (nothing
    differentiates: the value alone), ``"lazy"`` (plain eager autograd: the map as one node,
    :func:`closed_form_node`, or the term as one, :func:`add_second_order`), ``"first"`` (the
    first-order terms as torch ops, no second-order one) or ``"chain"`` (the terms as torch ops).
    Under ``torch.func``, "none" where only ``vmap`` levels are active and no plain tensor below them
    tracks derivatives, and with ``first=True`` (a caller that can leave its second-order term out)
    "first" where one ``jvp`` level is (with ``vmap`` levels); "chain" there otherwise."""
    if torch.compiler.is_compiling():  # Note [Compiled maps that nothing differentiates]
        return "none" if not torch.is_grad_enabled() and _fw_ad._current_level < 0 else "chain"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        kinds = _transforms()
        if _only_batching(tensors, kinds):
            return "none"
        return "first" if first and _sole_jvp(tensors, kinds) else "chain"
    if eager_fast(*tensors):
        if not tracks_derivatives(*tensors):
            return "none"
        if not forward_tangents(*tensors):  # Note [Dual levels and recomputation]
            return "lazy"
    return "chain"


def _transforms() -> list[str]:
    """The kinds (``"Grad"``, ``"Jvp"``, ``"Vmap"``, …) of the active ``torch.func`` levels (if the
    private API moved: two forward-mode levels, so that ``expm`` takes the static schedule and
    :func:`derivative_mode` the exact chain). Read from the C++ stack: ~2 µs, where
    ``retrieve_all_functorch_interpreters`` wraps each level in Python (~18 µs)."""
    try:
        return [i.key().name for i in (torch._C._functorch.get_interpreter_stack() or ())]
    except Exception:  # pragma: no cover (private API moved: be safe)
        return ["Jvp", "Jvp"]


# Note [Functions under functionalize]
# torch.func.functionalize has no rule for a custom autograd.Function (torch 2.13's
# custom_function_call raises "NYI: Functionalize rule for custom_function_call"), so every map
# through the matrix exponential (SO, Stiefel, PSD, GLp, the rank family, Hurwitz, ...) or Sinkhorn
# (Birkhoff) raised under functionalize(f), make_fx(functionalize(f)) included, though the README
# says the maps compose with every torch.func transform. With a Functionalize level anywhere in the
# stack those two take their op chains instead (the static exponential, Sinkhorn's Newton steps), as
# under nested forward mode: plain torch ops, which functionalize (and every level around it) handles,
# with the same values and exact derivatives. The other Functions run in plain eager mode only.
def functionalizing() -> bool:
    """Whether a ``torch.func.functionalize`` level is active (Note [Functions under functionalize])."""
    return torch._C._functorch.peek_interpreter_stack() is not None and "Functionalize" in _transforms()


def _only_batching(tensors: tuple[Optional[Tensor], ...], kinds: list[str]) -> bool:
    """Whether the active torch.func levels (``kinds``, :func:`_transforms`) are ``vmap`` only and
    nothing below them differentiates."""
    if _fw_ad._current_level >= 0 or any(kind != "Vmap" for kind in kinds):
        return False
    return _nothing_below(tensors)


def _sole_jvp(tensors: tuple[Optional[Tensor], ...], kinds: list[str]) -> bool:
    """Whether the active torch.func levels (``kinds``) are one ``jvp`` level and ``vmap`` levels, and
    nothing below them differentiates (Note [Lazy second-order terms]: "first")."""
    if kinds.count("Jvp") != 1 or any(kind not in ("Jvp", "Vmap") for kind in kinds):
        return False
    return _nothing_below(tensors)


def _nothing_below(tensors: tuple[Optional[Tensor], ...]) -> bool:
    """Whether no plain tensor under the torch.func wrappers of ``tensors`` requires grad."""
    try:
        f = torch._C._functorch
        if torch.is_grad_enabled():
            for T in tensors:
                while T is not None and f.is_functorch_wrapped_tensor(T):
                    T = f.get_unwrapped(T)
                if T is not None and T.requires_grad:
                    return False
        return True
    except Exception:  # pragma: no cover (private API moved: take the exact chain)
        return False


# Note [Backward formulas under autocast]
# geofunc's autograd Functions run their forward inside a space map, with autocast off (Note [Low
# precision] in spaces/_base.py), so in float32 or float64. Their backward ran in whatever autocast
# state the backward was called in: loss.backward() inside a float16 autocast region cast the matrix
# exponential's adjoint to float16, where the powers of a generator of norm ~10 overflow (NaN
# gradients for SO, SL and PSD from raw entries of scale ~5), and Sinkhorn's implicit adjoint solved
# in float16 (Birkhoff's gradient 10x off). As torch.amp.custom_bwd does for a Function whose
# forward ran under autocast, each backward runs in its forward's state: autocast off. (torch's own
# backward formulas between them still follow the region: README/docs, call backward after it.)
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})
# One call for "is autocast on for any device" (~0.2 µs; torch.compile traces it): the fast
# path of every map tests only this and the dtype.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a device autocast does not know)."""
    if _any_autocast is not None and not _any_autocast():
        return False
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


# Note [Autocast off in one graph]
# An ExitStack of torch.autocast contexts cannot be traced by Dynamo ("setattr() is not supported on type
# autocast"): under torch.autocast, torch.compile(fullgraph=True) of geofunc.hyperbolic's functions, which
# turned autocast off through autocast_off, raised Unsupported while the spaces' maps (torch.autocast for
# their lead's device) compiled. Where autocast is on for one device (always, for autocast_off(device)),
# autocast_off returns that torch.autocast context itself; the ExitStack is left for several devices.
def autocast_off(*device_types: str) -> Any:
    """A context with autocast disabled for those of ``device_types`` where it is on (every device
    autocast knows if none is given); a no-op context where it is on for none."""
    on = [d for d in (device_types or tuple(_AUTOCAST_DEVICES)) if autocast_on(d)]
    if not on:
        return contextlib.nullcontext()
    if len(on) == 1:  # the context itself: Dynamo traces torch.autocast, not an ExitStack (Note [Autocast off in one graph])
        return torch.autocast(on[0], enabled=False)
    stack = contextlib.ExitStack()
    for d in on:
        stack.enter_context(torch.autocast(d, enabled=False))
    return stack


def backward_without_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A Function's ``backward`` run with autocast off, as its forward ran (Note [Backward formulas under autocast])."""

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        if _any_autocast is None or not _any_autocast():
            return backward(ctx, *grads)
        with autocast_off():
            return backward(ctx, *grads)

    return run


# Note [Node state as saved tensors]
# A one-node fast path keeps what its backward needs: the tall chart's generator and the frame
# exponential's powers and Horner steps, the rank chart's frames, a closed form's SVD or eigen
# factors, Hurwitz's eigenvectors. Kept on context attributes (or in a closure there), those tensors
# are invisible to torch.autograd.graph.saved_tensors_hooks: activation checkpointing
# (torch.utils.checkpoint, use_reentrant=False), which frees what the hooks pack and recomputes it in
# backward, freed none of them (a checkpointed Stiefel 512×32 chart kept 3.9× its raw tensor's bytes
# alive, 64×32 16×, 41× with squarings; LowRank(2) 24×8 4.9×), and save_on_cpu left them on the
# accelerator. So where saved-tensor hooks are active when the forward runs, the state goes through
# ctx.save_for_backward with the node's inputs (save_state: the tensors found in nested dicts, lists
# and tuples, in a flat list, an input among them saved once; saved_state rebuilds it), and every
# hook sees it. Checkpointing's recomputation runs under its own hooks, so it saves the same tensors
# in the same order. Without hooks the state stays on the context, as before: while the graph lives
# both hold the same memory, and saving it always (15 tensors for a Stiefel 128×64 chart, ~25 for a
# LowRank one, with the walk) cost ~30 µs per node, 1 thread: several percent of those charts. (The
# exponential's own node saves its intermediates always: Note [Intermediates as saved tensors] in
# _expm.py.) What must stay one object stays on the context: the private graph of a value map
# differentiated by autograd and its leaf (r values; unpacked, the leaf would be another tensor).
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saving_hooks() -> bool:
    """Whether saved-tensor hooks (checkpointing, save_on_cpu, a user's) are active (~0.3 µs)."""
    return _top_hooks is None or _top_hooks(False) is not None


class _Slot:
    """A tensor's place among a node's saved tensors (:func:`save_state`)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def _stash(x: Any, flat: list, seen: dict) -> Any:
    if isinstance(x, torch.Tensor):
        i = seen.get(id(x))
        if i is None:
            i = seen[id(x)] = len(flat)
            flat.append(x)
        return _Slot(i)
    t = type(x)
    if t is dict:
        return {k: _stash(v, flat, seen) for k, v in x.items()}
    if t is list or t is tuple:
        return t([_stash(v, flat, seen) for v in x])
    return x


def _unstash(x: Any, flat: tuple) -> Any:
    t = type(x)
    if t is _Slot:
        return flat[x.i]
    if t is dict:
        return {k: _unstash(v, flat) for k, v in x.items()}
    if t is list or t is tuple:
        return t([_unstash(v, flat) for v in x])
    return x


def save_state(ctx: Any, inputs: tuple, state: Any) -> None:
    """``ctx.save_for_backward(*inputs)`` and the node's ``state`` (tensors in nested dicts, lists and
    tuples), saved with them where saved-tensor hooks are active (Note [Node state as saved tensors])."""
    if saving_hooks():
        flat = list(inputs)  # an input in the state is saved once (it may be None: not a tensor)
        ctx.state = _stash(state, flat, {id(x): i for i, x in enumerate(inputs) if x is not None})
        ctx.n_saved = len(inputs)
        ctx.save_for_backward(*flat)
    else:
        ctx.state, ctx.n_saved = state, None
        ctx.save_for_backward(*inputs)


def saved_state(ctx: Any) -> tuple[tuple, Any]:
    """The inputs and the state :func:`save_state` saved."""
    saved = ctx.saved_tensors
    n = ctx.n_saved
    if n is None:
        return saved, ctx.state
    return saved[:n], _unstash(ctx.state, saved)


class _SecondOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, term: Callable[..., Tensor], out: Tensor, state: tuple,  # type: ignore[override]
                *xs: Tensor) -> Tensor:
        ctx.term = term
        save_state(ctx, xs, state)  # Note [Node state as saved tensors]
        return out.clone()  # not a view: callers may modify the result in place

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        need = ctx.needs_input_grad[3:]
        if not torch.is_grad_enabled() or not any(need):  # no graph is built: the term's first derivative is 0
            return (None, G, None) + (None,) * len(need)
        xs, state = saved_state(ctx)
        wrt = [x for x, n in zip(xs, need) if n]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(ctx.term(*xs, *state), wrt, G, create_graph=True, allow_unused=True))
        return (None, G, None, *[next(grads) if n else None for n in need])


def add_second_order(term: Callable[..., Tensor], out: Tensor, *xs: Tensor, state: tuple = ()) -> Tensor:
    """``out + term(*xs, *state)`` for a term that is zero in value and in first derivative (Note [Lazy
    second-order terms]): ``out`` passed through one node, whose backward adds the term's
    vector-Jacobian product in ``xs`` (recomputed from ``xs`` and the tensors ``state``, which are not
    differentiated) only when it builds a graph (``create_graph=True``). ``term`` holds no tensor
    itself (Note [Node state as saved tensors]). Plain eager autograd only (``derivative_mode`` "lazy")."""
    return _SecondOrderOnly.apply(term, out, state, *xs)


class _ClosedForm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, compute: Callable[[], tuple[Tensor, Callable[..., Any], tuple]],  # type: ignore[override]
                chain: Callable[..., Tensor], *Ys: Tensor) -> Tensor:
        out, ctx.vjp, state = compute()
        ctx.chain = chain
        save_state(ctx, Ys, state)  # Note [Node state as saved tensors]
        return out

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple:  # type: ignore[override]
        need = ctx.needs_input_grad[2:]
        if not any(need):
            return (None, None) + (None,) * len(need)
        Ys, state = saved_state(ctx)  # (the inputs' versions checked: Note [Version checks of a closed form])
        if torch.is_grad_enabled():  # a graph is wanted (create_graph=True): differentiate the op chain
            wrt = [Y for Y, n in zip(Ys, need) if n]
            with torch.enable_grad():
                grads = iter(torch.autograd.grad(ctx.chain(*Ys), wrt, G, create_graph=True, allow_unused=True))
            return (None, None, *[next(grads) if n else None for n in need])
        g = ctx.vjp(G, *state)
        g = (g,) if len(need) == 1 else g
        return (None, None, *[gi if n else None for gi, n in zip(g, need)])


# Note [Version checks of a closed form]
# The closed-form vector-Jacobian product reads the forward's tensors (its state), some of them
# detached aliases of the inputs (the rank family's tangent keeps G's), which autograd does not
# version-check: an input modified in place after the forward (G.mul_(2) before loss.backward())
# gave a gradient computed from the new values, silently (LowRank(2) tangent: 0.5 off in norm ~2).
# Unpacking the saved inputs first raises torch's own error ("one of the variables needed for
# gradient computation has been modified by an inplace operation") there, as any torch op would.
def closed_form_node(compute: Callable[[], tuple[Tensor, Callable[..., Any], tuple]], chain: Callable[..., Tensor],
                     *Ys: Tensor) -> Tensor:
    """A map of ``Ys`` as one plain-autograd node (``derivative_mode`` "lazy"; Note [Lazy second-order
    terms]): ``compute()`` returns its value, the closed-form vector-Jacobian product of its first
    derivative, ``vjp(G, *state)`` (a tensor for one input, a tuple of one per input otherwise), and the
    tuple ``state`` of the tensors that product reads (``vjp`` holds none itself: Note [Node state as
    saved tensors]); a backward that builds a graph differentiates ``chain(*Ys)``, the map as torch ops
    (first- and second-order terms), instead."""
    return _ClosedForm.apply(compute, chain, *Ys)
