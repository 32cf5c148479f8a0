"""FSDP2, DTensors, mixed precision and distributed checkpoints: 2 gloo processes on 127.0.0.1.

One 2-process job runs every scenario (one spawn for the module, ``tests/distributed_tools.py``)
and writes its results; the tests compare them with single-process runs computed here:

* constrain then shard, and shard then constrain, in float32: Adam steps, an ``update_base`` on
  every rank mid-training, the weight read outside forward (a DTensor sharded like the raw
  parameter), ``cached()``; the weights equal a single-process run on the concatenated data
  within ``ATOL_F32`` (the ranks' gradients are averaged in another order: rounding only) and
  lie on their spaces;
* ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the bf16 weights seen
  by forward lie on their spaces within the documented bf16 tolerance, the float32 sharded
  parameters within float32's;
* ``torch.distributed.checkpoint``: 2 processes → 1 and 1 → 2, bit-equal;
* the pure maps on DTensors (Note [DTensor] in ``geofunc/_dtensor.py``): values, gradients,
  placements and the number of collectives; replicated results of row-sharded frames (``inner``)
  and ``Partial`` DTensors;
* ``examples/fsdp_train.py`` under ``torchrun --nproc-per-node 2``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_tools import loopback_interface, requires_gloo, spawn
from helpers import FSDP2_ON_CPU, needs_torch
from reference import member
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import geofunc as gf
import geofunc.nn as gnn
from geofunc.spaces._base import default_atol

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "FSDP2 and DTensor on the CPU (gloo)")]

WORLD = 2
STEPS = 6
BATCH = 8  # per rank; the single-process reference sees WORLD * BATCH
ATOL_F32 = 1e-5  # measured ≤ 2e-7 (the ranks' gradients are averaged in a different order)

#: The constrained layers: (index in the model, the space of its weight).
SPACES = {0: gf.Stiefel(), 2: gf.LowRank(rank=2), 4: gf.PSD(), 6: gf.Sphere(radius=2.0)}


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    )


def _constrain(model: nn.Module) -> None:
    gnn.orthogonal(model[0])  # 8 × 6, tall Stiefel
    gnn.low_rank(model[2], "weight", 2)  # 5 × 8, wide: its raw tensor is stored transposed
    gnn.positive_definite(model[4])
    gnn.sphere(model[6], radius=2.0)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (every rank draws it, then keeps its slice)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * BATCH, 6, generator=g), torch.randn(WORLD * BATCH, 3, generator=g)


def _train(model: nn.Module, rows: slice) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        loss = (model(x[rows]) - y[rows]).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == STEPS // 2:
            for i in SPACES:
                gnn.update_base(model[i])  # dynamic trivialization, on every rank alike
    return losses


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _weights(model: nn.Module) -> dict[int, torch.Tensor]:
    return {i: _full(model[i].weight).detach().clone() for i in SPACES}


def reference() -> dict[int, torch.Tensor]:
    """The single-process run on the concatenated data."""
    torch.manual_seed(0)
    model = _model()
    _constrain(model)
    _train(model, slice(None))
    return _weights(model)


def _cpu_mesh():
    """The workers' mesh, named: ``fully_shard``'s default mesh is on the machine's accelerator, where
    it has one (on an H200 box these gloo workers died of SIGSEGV with it; with this mesh the file
    passed there)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _shard(model: nn.Module, **kwargs) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = _cpu_mesh()
    for i in SPACES:
        fully_shard(model[i], mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def _scenario(order: str, rank: int, checkpoint: str | None = None) -> dict:
    torch.manual_seed(0)  # the same initialization on every rank, and as the reference's
    model = _model()
    if order == "constrain, shard":
        _constrain(model)
        _shard(model)
    else:
        _shard(model)
        _constrain(model)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {"losses": _train(model, rows)}
    W = model[0].weight  # read outside forward: sharded like the raw parameter
    out["outside_type"], out["outside_placements"] = type(W).__name__, str(getattr(W, "placements", None))
    x = _data(0)[0][rows]
    with torch.no_grad():
        plain = model(x)
        with gnn.cached():
            out["cached_vs_plain"] = float((model(x) - plain).abs().max())
    out["weights"] = _weights(model)
    if checkpoint is not None:
        dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint)
    # GeoTorch's M.update_base(): the raw tensor forward last saw was FSDP's freed unsharded copy
    M, raw = model[0].parametrizations.weight[0], model[0].parametrizations.weight.original
    try:
        M.update_base()
        out["class update_base refused"] = False
    except ValueError:
        out["class update_base refused"] = True
    M.update_base(raw)  # the sharded raw parameter itself: gathered once, the point kept
    out["class update_base moved"] = float((_full(model[0].weight).detach() - out["weights"][0]).abs().max())
    return out


@contextlib.contextmanager
def _single_process():
    """DCP warns that it assumes a single process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        # (torch 2.6: "torch.distributed is unavailable or uninitialized, assuming ...")
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable or uninitialized)",
                                category=UserWarning)
        # torch 2.6's DCP file writer touches storages through the deprecated TypedStorage
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        yield


def _no_dist(fn, value: bool) -> dict:
    """``{"no_dist": value}`` where ``fn`` (``dcp.save``/``dcp.load``) takes it; torch 2.6's does not (it
    reads a missing process group as one process by itself)."""
    return {"no_dist": value} if "no_dist" in inspect.signature(fn).parameters else {}


def _load(model: nn.Module, checkpoint: str) -> None:
    """``torch.distributed.checkpoint`` load into ``model`` (sharded or not), in place."""
    state = get_model_state_dict(model)
    with _single_process():
        dcp.load(state, checkpoint_id=checkpoint, **_no_dist(dcp.load, not dist.is_initialized()))
    set_model_state_dict(model, state)


def _load_scenario(checkpoint: str) -> dict:
    """A checkpoint of one process loaded into a sharded model of another initialization."""
    torch.manual_seed(5)
    model = _model()
    _constrain(model)
    _shard(model)
    _load(model, checkpoint)
    return {"weights": _weights(model), "state": _full_state(model)}


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _full(v).detach().clone() for k, v in model.state_dict().items()}


def _bf16_scenario(rank: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    torch.manual_seed(0)
    model = _model()
    _constrain(model)
    _shard(model, mp_policy=policy)
    seen = {}
    # Inside forward (after FSDP's pre-forward unshard) the weight is computed from bf16 raw tensors.
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, m.weight.detach().clone()))
             for i in SPACES]
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    losses = _train(model, rows)
    for h in hooks:
        h.remove()
    return {"losses": losses, "bf16_weights": seen, "weights": _weights(model)}


#: The pure maps on DTensors: (space, point shape, placement of the points).
PURE = {
    "Stiefel, batch-sharded": (gf.Stiefel(), (4, 8, 3), 0),  # Shard(0) of a batch: local
    "SO, batch-sharded": (gf.SO(), (2, 2, 4, 4), 1),
    "Sphere, batch-sharded": (gf.Sphere(), (6, 5), 0),
    "Stiefel, row-sharded": (gf.Stiefel(), (8, 3), 0),  # a frame's own rows split: Gram all-reduces
    "Grassmannian, batched and row-sharded": (gf.Grassmannian(), (2, 9, 2), 1),
    "Stiefel, column-sharded": (gf.Stiefel(), (8, 3), 1),  # one gather per argument
    "Stiefel canonical, batch-sharded": (gf.Stiefel(metric="canonical"), (4, 8, 3), 0),
    "Stiefel canonical, row-sharded": (gf.Stiefel(metric="canonical"), (8, 3), 0),
    "PSD, row-sharded": (gf.PSD(), (4, 4), 0),
    "PSD affine-invariant, batch-sharded": (gf.PSD(metric="affine"), (4, 3, 3), 0),
    "PSD affine-invariant, row-sharded": (gf.PSD(metric="affine"), (4, 4), 0),
    "LowRank, column-sharded": (gf.LowRank(rank=2), (6, 4), 1),
}


def _pure_maps(M: gf.AbstractSpace, shape: tuple, dim: int) -> dict:
    """Each map on DTensors sharded on ``dim`` vs on the plain tensors: values, placements,
    gradients and the number of collectives (``CommDebugMode``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(7)  # the same tensors on every rank
    X = M.sample(shape, generator=g)
    Z, G = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    W = torch.randn(shape, generator=g)  # weights of a scalar loss, for gradients
    d = lambda t: distribute_tensor(t, mesh, [Shard(dim)], src_data_rank=None)  # noqa: E731
    calls = {
        "to_manifold": lambda Z, X, G: M.to_manifold(Z),
        "tangent": lambda Z, X, G: M.tangent(X, G),
        "egrad_to_rgrad": lambda Z, X, G: M.egrad_to_rgrad(X, G),  # the metric's (PSD-affine's XGX, canonical G − XGᵀX)
        "retract": lambda Z, X, G: M.retract(X, 0.1 * M.tangent(X, G)),
        "project": lambda Z, X, G: M.project(Z),
        "round trip": lambda Z, X, G: M.to_manifold(*M.from_manifold(X)),
    }
    out = {}
    for name, f in calls.items():
        dargs = [d(t).requires_grad_() for t in (Z, X, G)]
        with CommDebugMode() as comm:
            Y = f(*dargs)
        dgrads = torch.autograd.grad((Y * d(W)).sum(), dargs, allow_unused=True)
        pargs = [t.clone().requires_grad_() for t in (Z, X, G)]
        Yp = f(*pargs)
        pgrads = torch.autograd.grad((Yp * W).sum(), pargs, allow_unused=True)
        out[name] = {
            "placements": str(Y.placements),
            "error": float((Y.full_tensor() - Yp).detach().abs().max()),
            "grad error": max(float((a.full_tensor() - b).abs().max())
                              for a, b in zip(dgrads, pgrads) if b is not None),
            "collectives": comm.get_total_counts(),
        }
    # a plain vector with one more batch dim than the point (it broadcasts): the local route labelled the
    # result's first dim as the sharded one, a (4, 2, ...) DTensor of mixed-up values for a (2, 4, ...) one
    nb = len(shape) - M.point_ndim
    G2 = torch.randn((2,) + (1,) * nb + tuple(shape[nb:]), generator=g)
    Yb = M.tangent(d(X), G2)
    out["broadcast"] = (tuple(Yb.shape), float((Yb.full_tensor() - M.tangent(X, G2)).abs().max()))
    if dim < nb:  # a DTensor of one point along the sharded batch dim, which broadcasts: rank 1 held
        # none of it, raised on the local shapes (2, ...) and (0, ...), and rank 0 hung (Note [Broadcast DTensors])
        G1 = G.narrow(dim, 0, 1)
        Y1 = M.tangent(d(X), d(G1))
        out["broadcast DTensor"] = (tuple(Y1.shape), float((Y1.full_tensor() - M.tangent(X, G1)).abs().max()))
    with CommDebugMode() as comm:
        inside = M.contains(d(X))
    out["contains"] = bool(inside.full_tensor().all())
    if isinstance(M, (gf.Stiefel, gf.Grassmannian)):
        # a rank-1 step at a scale that hides X has no QR factor: NaN on every route, never a finite
        # frame off the manifold (Note [Numerically rank-deficient QR]; the row route's own CholeskyQR2)
        V = (1e15 * torch.randn(shape[:-1] + (1,), generator=g)).expand(shape).clone()
        out["no QR factor"] = [bool(torch.isnan(M.retract(d(X), d(V)).full_tensor()).all()),
                               bool(torch.isnan(M.retract(X, V)).all())]
    out["measures"] = len(M._violations(X))  # the named measures of contains/check
    try:  # an off point is refused as in eager mode on plain tensors
        M.from_manifold(d(-2 * X - 1))
        out["off point refused"] = False
    except gf.ManifoldError:
        out["off point refused"] = True
    out["contains collectives"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    return out


def _optimizers_on_dtensors() -> dict:
    """Two steps of rsgd (momentum, also with a schedule), radam, radamw and radam after a global-norm
    clip on a row-sharded Stiefel frame and batch-sharded spheres, as DTensors and as plain tensors:
    points and collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (WORLD,))
    d = lambda t: distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    constraints = {"w": gf.Stiefel(), "s": gf.Sphere()}
    params = {"w": gf.Stiefel().sample((8, 3), generator=g), "s": gf.Sphere().sample((4, 5), generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(2)]
    out = {}
    clipped = gf.optim.retract_and_transport(constraints, gf.optim.chain(
        gf.optim.to_tangent(constraints), gf.optim.clip_by_global_norm(constraints, 0.5),
        gf.optim.scale_by_adam(constraints), gf.optim.scale(-0.1)))
    def race(opt, params, grads) -> dict:  # two steps on DTensors and on plain tensors
        p, state = dict(params), opt.init(params)
        pd = {k: d(v) for k, v in params.items()}
        state_d = opt.init(pd)
        with CommDebugMode() as comm:
            for G in grads:
                pd, state_d = opt.update({k: d(v) for k, v in G.items()}, state_d, pd)
        for G in grads:
            p, state = opt.update(G, state, p)
        return {"error": max(float((pd[k].full_tensor() - p[k]).abs().max()) for k in p),
                "collectives": {str(k): v for k, v in comm.get_comm_counts().items()}}

    for name, opt in [("rsgd", gf.optim.rsgd(constraints, 0.1, momentum=0.9)), ("radam", gf.optim.radam(constraints, 0.1)),
                      ("rsgd-schedule", gf.optim.rsgd(constraints, lambda n: 0.1 * (n + 1) / 2, momentum=0.9)),
                      ("radamw", gf.optim.radamw(constraints, 0.1, weight_decay=0.1)), ("radam-clip", clipped),
                      ("radam-finite", gf.optim.apply_if_finite(gf.optim.radam(constraints, 0.1), 2))]:
        out[name] = race(opt, params, grads)
    # the affine-invariant metric on batch-sharded SPD matrices: each rank steps its own points
    out["radam-psd-affine"] = race(gf.optim.radam({"P": gf.PSD(metric="affine")}, 0.1),
                                   {"P": gf.PSD().sample((4, 3, 3), generator=g)},
                                   [{"P": torch.randn(4, 3, 3, generator=g)} for _ in range(2)])
    # the canonical metric on a row-sharded frame: its inner and gradient by Gram matrices, its
    # retraction (a chart) gathered
    out["radam-stiefel-canonical"] = race(gf.optim.radam({"w": gf.Stiefel(metric="canonical")}, 0.1),
                                          {"w": params["w"]}, [{"w": G["w"]} for G in grads])
    return out


def _replicated_results_and_partial() -> dict:
    """Gradients of maps whose results are replicated on a row-sharded frame (``inner``: its Gram
    matrix's gradient is whole on every rank, not to be summed over them), and maps of a ``Partial``
    DTensor (a sum still pending, reduced by the gather): values, gradients and placements against
    the plain maps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(11)
    out = {}
    for M, shape in [(gf.Stiefel(), (8, 3)), (gf.Stiefel(metric="canonical"), (8, 3)), (gf.Grassmannian(), (2, 9, 2))]:
        X = M.sample(shape, generator=g)
        U, V = M.tangent(X, torch.randn(shape, generator=g)), M.tangent(X, torch.randn(shape, generator=g))
        dargs = [distribute_tensor(t, mesh, [Shard(len(shape) - 2)], src_data_rank=None).requires_grad_()
                 for t in (U, V)]
        val = M.inner(distribute_tensor(X, mesh, [Shard(len(shape) - 2)], src_data_rank=None), *dargs)
        dgrads = torch.autograd.grad(val.sum(), dargs)
        pargs = [t.clone().requires_grad_() for t in (U, V)]
        pgrads = torch.autograd.grad(M.inner(X, *pargs).sum(), pargs)
        out[f"{M!r} inner"] = {
            "placements": str(val.placements),
            "error": float((val.detach().full_tensor() - M.inner(X, U, V)).abs().max()),
            "grad error": max(float((a.full_tensor() - b).abs().max()) for a, b in zip(dgrads, pgrads)),
        }
    for M, shape in [(gf.Sphere(), (4, 5)), (gf.Stiefel(), (6, 3)), (gf.PSD(), (2, 3, 3))]:
        Z = torch.randn(shape, generator=g)
        try:
            dZ = DTensor.from_local(Z / WORLD, mesh, [Partial()], run_check=False).requires_grad_()
            Y = M.to_manifold(dZ)
            (dgrad,) = torch.autograd.grad(Y.full_tensor().sum(), dZ)
            pZ = Z.clone().requires_grad_()
            (pgrad,) = torch.autograd.grad(M.to_manifold(pZ).sum(), pZ)
            out[f"{M!r} Partial"] = {
                "placements": str(Y.placements),
                "error": float((Y.detach().full_tensor() - M.to_manifold(Z)).abs().max()),
                "grad error": float((dgrad.full_tensor() - pgrad).abs().max()),
            }
        except Exception as e:  # noqa: BLE001  (reported by the test)
            out[f"{M!r} Partial"] = f"{type(e).__name__}: {e}"
    return out


#: Every constraint function, for FSDP2's bf16 policy: (name, call, weight shape (out, in)).
CONSTRAINTS = [
    ("orthogonal, tall", gnn.orthogonal, (8, 3)),
    ("orthogonal, wide", gnn.orthogonal, (3, 8)),
    ("orthogonal, square", gnn.orthogonal, (5, 5)),
    ("grassmannian", gnn.grassmannian, (8, 3)),
    ("almost_orthogonal", lambda m: gnn.almost_orthogonal(m, "weight", 0.3), (6, 4)),
    ("invertible", gnn.invertible, (5, 5)),
    ("sln", gnn.sln, (5, 5)),
    ("alpha_stable", lambda m: gnn.alpha_stable(m, "weight", alpha=0.1), (5, 5)),
    ("low_rank", lambda m: gnn.low_rank(m, "weight", 2), (5, 8)),
    ("fixed_rank", lambda m: gnn.fixed_rank(m, "weight", 2), (8, 5)),
    ("positive_definite", gnn.positive_definite, (5, 5)),
    ("positive_semidefinite", gnn.positive_semidefinite, (5, 5)),
    ("positive_semidefinite_low_rank", lambda m: gnn.positive_semidefinite_low_rank(m, "weight", 2), (5, 5)),
    ("positive_semidefinite_fixed_rank", lambda m: gnn.positive_semidefinite_fixed_rank(m, "weight", 2), (5, 5)),
    ("sphere", gnn.sphere, (4, 6)),
    ("skew", gnn.skew, (5, 5)),
    ("symmetric", gnn.symmetric, (5, 5)),
]


def _bf16_every_constraint() -> dict:
    """Each constraint function on a Linear under ``MixedPrecisionPolicy(bf16, float32)``, constrain
    then shard: two SGD steps; the bf16 weight forward sees, and the float32 one after."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for name, constrain, (n_out, n_in) in CONSTRAINTS:
        torch.manual_seed(0)
        layer = nn.Linear(n_in, n_out, bias=False)
        constrain(layer)
        fully_shard(layer, mesh=_cpu_mesh(), mp_policy=policy)
        seen = []
        layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
        opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
        x = torch.randn(4, n_in)
        for _ in range(2):
            opt.zero_grad()
            layer(x).float().pow(2).mean().backward()
            opt.step()
        out[name] = {"bf16": seen[-1], "float32": _full(layer.weight).detach().clone()}
    return out


def _ancestor_sharded() -> dict:
    """Shard then constrain where only an ancestor was passed to fully_shard: refused, unchanged."""
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 6))
    fully_shard(model, mesh=_cpu_mesh())
    before = model[0].weight.full_tensor().detach().clone()
    try:
        gnn.orthogonal(model[0])
        refused = False
    except gf.ManifoldError:
        refused = True
    after = model[0].weight.full_tensor()
    return {"refused": refused, "unchanged": torch.equal(before, after), "plain": not gnn.is_constrained(model[0])}


def _hurwitz_checks_inside_from_manifold() -> dict:
    """``Hurwitz.from_manifold`` of a batch-sharded DTensor whose point 3 (rank 1's) passes ``check``
    but has no numerically positive definite certificate: only rank 1 raised (Note [Checks inside a map on
    DTensors])."""
    from torch.distributed.tensor import Shard, distribute_tensor

    M, mesh = gf.Hurwitz(), _cpu_mesh()
    X = -torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    good = distribute_tensor(X, mesh, [Shard(0)], src_data_rank=None)
    Z, base = M.from_manifold(good)
    X[3] = torch.diag(torch.tensor([-1.0, 0.0, -2.0], dtype=torch.float64))
    d = distribute_tensor(X, mesh, [Shard(0)], src_data_rank=None)
    out = {"contains": bool(M.contains(d).full_tensor().all()),
           "round trip": float((M.to_manifold(Z, base).full_tensor() - good.full_tensor()).abs().max())}
    try:
        M.from_manifold(d)
        out["from_manifold"] = None
    except gf.ManifoldError as e:
        out["from_manifold"] = str(e)
    return out

def _sample_dtensors(rank: int) -> dict:
    """``gf.sample`` of a sharded and a replicated entry, each rank's global generator seeded
    differently: it returned plain tensors of the full shape, another point on each rank."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _cpu_mesh()
    params = {"w": distribute_tensor(torch.zeros(7, 3), mesh, [Shard(0)]),
              "s": distribute_tensor(torch.zeros(3, 5), mesh, [Replicate()]), "b": torch.zeros(2)}
    torch.manual_seed(rank)
    out = gf.sample({"w": gf.Stiefel(), "s": gf.Sphere()}, params)
    return {k: (type(v).__name__, str(getattr(v, "placements", None)), _full(v).clone()) for k, v in out.items()}


def _hurwitz_check_message() -> dict:
    """``Hurwitz.check`` of a batch-sharded DTensor whose point 3 (rank 1's) is off the space: the message's
    largest eigenvalue real part was computed on the DTensor (rank 0 named its own points' -1e-5 for the bad
    point's 5, rank 1 raised torch's sharding error for nonzero)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    X = -torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    X[3] = torch.diag(torch.tensor([-1.0, 5.0, -2.0], dtype=torch.float64))
    try:
        gf.Hurwitz().check(distribute_tensor(X, _cpu_mesh(), [Shard(0)], src_data_rank=None))
    except Exception as e:  # noqa: BLE001  (reported to the test)
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}

def worker(rank: int, world: int, outdir: str) -> None:
    results = {
        "sample": _sample_dtensors(rank),
        "hurwitz check": _hurwitz_check_message(),
        "ancestor sharded": _ancestor_sharded(),
        "constrain, shard": _scenario("constrain, shard", rank, os.path.join(outdir, "checkpoint-2")),
        "1 → 2": _load_scenario(os.path.join(outdir, "checkpoint-1")),
        "shard, constrain": _scenario("shard, constrain", rank),
        "bf16": _bf16_scenario(rank),
        "bf16, every constraint": _bf16_every_constraint(),
        "pure": {k: _pure_maps(*v) for k, v in PURE.items()},
        "optimizers": _optimizers_on_dtensors(),
        "replicated results, Partial": _replicated_results_and_partial(),
        "hurwitz checks": _hurwitz_checks_inside_from_manifold(),
    }
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


def _one_process_checkpoint(checkpoint: str) -> dict:
    """A trained single-process model, saved with ``torch.distributed.checkpoint`` (no process group)."""
    torch.manual_seed(1)
    model = _model()
    _constrain(model)
    _train(model, slice(None))
    with _single_process():
        dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint, **_no_dist(dcp.save, True))
    return {"weights": _weights(model), "state": _full_state(model)}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def saved_by_one(outdir):
    return _one_process_checkpoint(str(outdir / "checkpoint-1"))


@pytest.fixture(scope="module")
def results(outdir, saved_by_one):
    spawn(worker, WORLD, outdir, timeout=180)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("order", ["constrain, shard", "shard, constrain"])
def test_fsdp_training_equals_one_process(results, order):
    ref = reference()
    r0, r1 = (r[order] for r in results)
    assert r0["losses"] != r1["losses"]  # the ranks did see different data
    for i, space in SPACES.items():
        assert torch.equal(r0["weights"][i], r1["weights"][i]), i  # one model, gathered alike
        torch.testing.assert_close(r0["weights"][i], ref[i], atol=ATOL_F32, rtol=0)
        assert member(space, r0["weights"][i]), (i, space)


@pytest.mark.parametrize("name", [c[0] for c in CONSTRAINTS])
def test_fsdp_bf16_policy_every_constraint(results, name):
    """Every constraint function under FSDP2's bf16 policy: the bf16 weight forward sees within the
    documented bf16 tolerance, the float32 sharded parameters' weight within float32's."""
    _, constrain, (n_out, n_in) = next(c for c in CONSTRAINTS if c[0] == name)
    space = gnn.parametrization_of(constrain(nn.Linear(n_in, n_out, bias=False))).space
    for r in results:
        out = r["bf16, every constraint"][name]
        Wb, W = out["bf16"], out["float32"]
        assert Wb.dtype == torch.bfloat16 and W.dtype == torch.float32
        assert member(space, Wb.float(), default_atol(Wb.dtype, max(Wb.shape))), space
        assert member(space, W), space


def test_shard_then_constrain_needs_the_module_itself_sharded(results):
    for r in results:
        assert r["ancestor sharded"] == {"refused": True, "unchanged": True, "plain": True}


@pytest.mark.parametrize("order", ["constrain, shard", "shard, constrain"])
def test_fsdp_weight_outside_forward_and_cached(results, order):
    for r in results:
        out = r[order]
        assert out["outside_type"] == "DTensor" and "Shard(dim=0)" in out["outside_placements"]
        assert out["cached_vs_plain"] == 0.0
        assert out["class update_base refused"]  # never a silent update of a freed copy
        assert out["class update_base moved"] <= 1e-6


def test_fsdp_bf16_mixed_precision_stays_on_the_spaces(results):
    for r in results:
        out = r["bf16"]
        assert all(torch.isfinite(torch.tensor(out["losses"])))
        assert out["losses"][-1] < out["losses"][0]
        for i, space in SPACES.items():
            Wb = out["bf16_weights"][i]
            assert Wb.dtype == torch.bfloat16
            # on the space within the documented bf16 tolerance (Note [Low precision])
            assert member(space, Wb.float(), default_atol(Wb.dtype, max(Wb.shape))), (i, space)
            assert member(space, out["weights"][i]), (i, space)  # the float32 parameters: float32's


@pytest.mark.parametrize("case", list(PURE))
def test_pure_maps_on_dtensors(results, case):
    """Batch-sharded: every rank maps its own points, no collective. A point's own rows or columns
    sharded: one all-gather per DTensor argument (Note [DTensor]), results sharded like the input.
    Values and gradients equal the plain maps' (float32: the same kernels on the same numbers,
    except the local route's smaller batches)."""
    M, shape, dim = PURE[case]
    batch = dim < len(shape) - M.point_ndim
    rows = isinstance(M, (gf.Stiefel, gf.Grassmannian)) and dim == len(shape) - 2
    for r in results:
        out = r["pure"][case]
        assert out.pop("contains") and out.pop("off point refused")
        assert out.pop("no QR factor", [True, True]) == [True, True]
        bshape, berr = out.pop("broadcast")
        assert bshape == (2, *shape) and berr <= 1e-6, (bshape, berr)
        if batch:
            bshape, berr = out.pop("broadcast DTensor")
            assert bshape == shape and berr <= 1e-6, (bshape, berr)
        measures = out.pop("measures")
        contains_collectives = out.pop("contains collectives")
        for name, o in out.items():
            assert o["placements"] == f"(Shard(dim={dim}),)", name
            assert o["error"] <= 1e-6 and o["grad error"] <= 1e-5, (name, o)
            # at most one all-gather per sharded argument of each call (retract: tangent's two, then
            # X and V; round trip: X for the check, X, then Z and a base sharded like X); a
            # row-sharded frame's tangent and retract: k×k all-reduces only (1, then 1 + 2)
            gathers = {"to_manifold": 1, "tangent": 2, "egrad_to_rgrad": 2, "retract": 4, "project": 1, "round trip": 4}[name]
            if batch:  # from_manifold's check gathers each per-point measure (SO: 2), so every rank raises
                assert o["collectives"] == (measures if name == "round trip" else 0), (name, o)
            elif rows and name in ("tangent", "egrad_to_rgrad", "retract"):
                assert o["collectives"] == {"tangent": 1, "egrad_to_rgrad": 1, "retract": 3}[name], (name, o)
            else:
                assert 1 <= o["collectives"] <= gathers, (name, o)
        if batch:
            assert contains_collectives == {}
        elif rows:  # the Gram matrix, reduced once
            assert sum(contains_collectives.values()) == 1 and "gather" not in str(contains_collectives)


def test_checkpoint_2_processes_to_1(results, outdir):
    """``torch.distributed.checkpoint`` of the sharded model, loaded into one unsharded process."""
    torch.manual_seed(9)
    model = _model()
    _constrain(model)
    _load(model, str(outdir / "checkpoint-2"))
    saved = results[0]["constrain, shard"]["weights"]
    for i in SPACES:
        assert torch.equal(model[i].weight.detach(), saved[i]), i


def test_checkpoint_1_process_to_2(results, saved_by_one):
    """A single-process checkpoint loaded into the sharded model: raw tensors and bases bit-equal."""
    for r in results:
        loaded = r["1 → 2"]
        assert loaded["state"].keys() == saved_by_one["state"].keys()
        for k, v in saved_by_one["state"].items():
            assert torch.equal(loaded["state"][k], v), k
        for i in SPACES:
            assert torch.equal(loaded["weights"][i], saved_by_one["weights"][i]), i


def test_fsdp_train_example_under_torchrun():
    """``examples/fsdp_train.py`` under ``torchrun --standalone --nproc-per-node 2`` (gloo, loopback),
    a few bf16 steps with an ``update_base``: weights on their spaces, the checkpoint reloads equal.
    The launcher and its workers are one process group, killed together if it overruns."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, GLOO_SOCKET_IFNAME=loopback_interface(), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "fsdp_train.py"), "--steps", "4", "--rebase-every", "2", "--bf16"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 150 s")
    assert proc.returncode == 0, out
    assert "== fsdp_train.py report ==" in out, out
    assert out.count("on the space: True") == 4 and "on the space: False" not in out, out
    assert "weights equal: True" in out, out


def test_sample_of_dtensor_entries(results):
    """``gf.sample`` gives a DTensor entry a DTensor placed like it, one point on every rank
    (rank 0's draw: the ranks' generators differ), on the space (Note [Sampling DTensors])."""
    want = {"w": ("DTensor", "(Shard(dim=0),)"), "s": ("DTensor", "(Replicate(),)"), "b": ("Tensor", "None")}
    for r in results:
        for k, (kind, placements) in want.items():
            assert r["sample"][k][:2] == (kind, placements), (k, r["sample"][k][:2])
            assert torch.equal(r["sample"][k][2], results[0]["sample"][k][2]), k
    assert member(gf.Stiefel(), results[0]["sample"]["w"][2]) and member(gf.Sphere(), results[0]["sample"]["s"][2])


def test_hurwitz_check_of_a_dtensor_names_the_bad_points_eigenvalue(results):
    """Every rank raises the plain check's ManifoldError, naming the first bad point's eigenvalue (5)."""
    X = -torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    X[3] = torch.diag(torch.tensor([-1.0, 5.0, -2.0], dtype=torch.float64))
    with pytest.raises(gf.ManifoldError) as plain:
        gf.Hurwitz().check(X)
    for r in results:
        assert r["hurwitz check"] == {"type": "ManifoldError", "message": str(plain.value)}, r["hurwitz check"]

def test_riemannian_optimizers_on_dtensors(results):
    """rsgd and radam (also with a schedule, radamw, a clip and apply_if_finite; radam on the affine-invariant
    PSD) on DTensors equal the plain steps; the
    row-sharded frame costs only k×k all-reduces (per step: egrad_to_rgrad 1, retract 2, transport 1,
    and radam's inner 1), the batch-sharded spheres nothing but the clip's one global sum."""
    for r in results:
        for name, o in r["optimizers"].items():
            assert o["error"] <= 1e-6, (name, o)
            if name == "radam-psd-affine":  # batch-sharded: local, no collective
                assert o["collectives"] == {}, o
                continue
            if name == "radam-stiefel-canonical":  # per step: the gradient 1, inner 3, transport 1; the chart gathers X, V
                assert o["collectives"] == {"c10d.allreduce_": 10, "c10d_functional.all_gather_into_tensor": 4}, o
                continue
            want = {"rsgd": 8, "radam": 10, "rsgd-schedule": 8, "radamw": 12, "radam-clip": 12, "radam-finite": 10}[name]
            # radamw: the decay's egrad_to_rgrad, 1 more per step; the clip: the frame's inner (1 per
            # step) and the global norm's sum over the sharded spheres (a Partial reduced once per step);
            # apply_if_finite: radam's, and the finiteness flags of the sharded tensors (3 scalars a step)
            extra = {"radam-clip": {"c10d_functional.all_reduce": 2},
                     "radam-finite": {"c10d_functional.all_reduce": 6}}.get(name, {})
            assert o["collectives"] == {"c10d.allreduce_": want, **extra}, (name, o)


def test_replicated_results_and_partial_dtensors(results):
    """``inner`` of a row-sharded frame (a replicated result of all-reduced Gram matrices): its
    gradients equal the plain map's (they were ``WORLD`` times larger: the replicated gradient was
    summed over the ranks). A ``Partial`` DTensor takes the gathered route (the gather reduces it)
    and gives replicated results (it was PyTorch's error: no redistribution to ``Partial``)."""
    for r in results:
        for name, o in r["replicated results, Partial"].items():
            assert isinstance(o, dict), (name, o)
            assert o["placements"] == "(Replicate(),)", (name, o)
            assert o["error"] <= 1e-6 and o["grad error"] <= 1e-5, (name, o)


def test_hurwitz_checks_inside_from_manifold_raise_on_every_rank(results):
    """A point that passes ``check`` but not Hurwitz's eager certificate, held by rank 1: every rank raises the
    plain call's ManifoldError (rank 0 returned and went on); a good batch still maps back."""
    M = gf.Hurwitz()
    X = -torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    X[3] = torch.diag(torch.tensor([-1.0, 0.0, -2.0], dtype=torch.float64))
    with pytest.raises(gf.ManifoldError) as plain:
        M.from_manifold(X)
    for r in results:
        out = r["hurwitz checks"]
        assert out["contains"] and out["round trip"] <= 1e-12, out
        assert out["from_manifold"] == str(plain.value), out
