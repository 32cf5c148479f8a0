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

from typing import Optional

import torch
import torch.autograd.forward_ad as _fw_ad

Tensor = torch.Tensor

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_FAST_DTYPES = (torch.float32, torch.float64)


def eager_fast(*tensors: Optional[Tensor]) -> bool:
    """Whether ``tensors`` (None entries skipped) may take an eager fast path."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
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


def tracks_derivatives(*tensors: Optional[Tensor]) -> bool:
    """Whether a result computed from ``tensors`` needs an autograd node: grad mode is on and one
    requires grad, or a ``torch.autograd.forward_ad`` dual level is open (inputs may be duals)."""
    if torch.is_grad_enabled() and any(T is not None and T.requires_grad for T in tensors):
        return True
    return _fw_ad._current_level >= 0
