"""Riemannian optimizers as pure functions, in the optax style.

``opt = gf.optim.rsgd(constraints, lr)``; ``state = opt.init(params)``;
``params, state = opt.update(grads, state, params)``, with ``params`` points and ``grads``
Euclidean gradients. Named optimizers are chains of small tangent transforms followed by
one shared retract-and-transport step.
"""

import torch as _torch

from ._aliases import radam as radam, radamw as radamw, rsgd as rsgd
from ._base import (
    EmptyState as EmptyState,
    Optimizer as Optimizer,
    TangentTransform as TangentTransform,
    chain as chain,
    keep_state as keep_state,
)
from ._riemannian import retract_and_transport as retract_and_transport
from ._wrappers import ApplyIfFiniteState as ApplyIfFiniteState, apply_if_finite as apply_if_finite
from ._module import TorchOptimizer as TorchOptimizer
from ._transforms import (
    ScaleByAdamState as ScaleByAdamState,
    ScaleByAMSGradState as ScaleByAMSGradState,
    ScaleByScheduleState as ScaleByScheduleState,
    TraceState as TraceState,
    add_decayed_weights as add_decayed_weights,
    clip_by_global_norm as clip_by_global_norm,
    masked as masked,
    multi_transform as multi_transform,
    scale as scale,
    scale_by_adam as scale_by_adam,
    scale_by_schedule as scale_by_schedule,
    to_tangent as to_tangent,
    trace as trace,
)

# Note [Loading optimizer state]
# An optimizer's state is NamedTuples of tensors. torch.load's default (weights_only=True since torch 2.6)
# refuses every class it was not told about, so a checkpoint of a training run (params and state, saved with
# torch.save) would not load without the caller allowlisting geofunc's classes. They only hold tensors and
# build from their fields: geofunc allowlists them itself (torch >= 2.4; older torch loads them with
# weights_only=False, its default before 2.6).
if hasattr(_torch.serialization, "add_safe_globals"):
    _torch.serialization.add_safe_globals([EmptyState, TraceState, ScaleByAdamState, ScaleByAMSGradState, ScaleByScheduleState,
                                           ApplyIfFiniteState])

__all__ = [
    "ApplyIfFiniteState",
    "EmptyState",
    "Optimizer",
    "ScaleByAdamState",
    "ScaleByAMSGradState",
    "ScaleByScheduleState",
    "TangentTransform",
    "TorchOptimizer",
    "TraceState",
    "add_decayed_weights",
    "apply_if_finite",
    "clip_by_global_norm",
    "chain",
    "keep_state",
    "masked",
    "multi_transform",
    "radam",
    "radamw",
    "retract_and_transport",
    "rsgd",
    "scale",
    "scale_by_adam",
    "scale_by_schedule",
    "to_tangent",
    "trace",
]
