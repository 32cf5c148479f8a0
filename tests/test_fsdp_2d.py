"""FSDP2 on a 2-D device mesh (HSDP: replicas × shards) and DTensors placed on two mesh dimensions.

4 gloo processes on 127.0.0.1, one spawn for the module (``tests/distributed_tools.py``), on a
``("replicate", "shard")`` mesh of 2 × 2:

* the constrained model of ``tests/test_fsdp.py`` under ``fully_shard(..., mesh=mesh)`` (each
  replica group shards its parameters in two, gradients are averaged over all four ranks), in both
  orders (constrain then shard, shard then constrain): the weights equal a single-process run on the
  concatenated data within ``ATOL_F32``, are the same on every rank and lie on their spaces;
* ``torch.distributed.checkpoint`` from the 4 ranks into one process: bit-equal weights;
* the pure maps on DTensors with two placements (each pair of ``Replicate``/``Shard`` on a batch
  or a matrix dimension): values and gradients equal the plain maps' (float64, to rounding); the tall frame's ``retract``, ``tangent``, ``egrad_to_rgrad``,
  ``inner`` and ``transport`` with its rows sharded over one or both mesh dimensions, and ``check``
  raising on an off point on every rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed_tools import requires_gloo, spawn
from helpers import FSDP2_ON_CPU, needs_torch
from reference import member
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import geofunc as gf
import test_fsdp as one_d

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "FSDP2 and DTensor on the CPU (gloo)")]

WORLD = 4
MESH = (2, 2)  # replicas × shards
ATOL_F32 = one_d.ATOL_F32
ATOL_F64 = 1e-13  # the pure maps in float64: measured ≤ 6e-17

ORDERS = ("constrain, shard", "shard, constrain")

#: Pure maps on 2-D DTensors: (space, the points' shape).
PURE = {
    "Stiefel": (gf.Stiefel(), (8, 6, 3)),
    "LowRank": (gf.LowRank(rank=2), (8, 6, 5)),
    "SO": (gf.SO(), (8, 4, 4)),
    "Sphere": (gf.Sphere(), (8, 6)),
}


def _placements(ndim: int) -> dict:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "replicate, shard batch": [Replicate(), Shard(0)],
        "shard batch twice": [Shard(0), Shard(0)],
        "shard batch, replicate": [Shard(0), Replicate()],
        "replicate, shard rows": [Replicate(), Shard(ndim - 2)],
        "shard batch, shard rows": [Shard(0), Shard(ndim - 2)],
    }


def _rows(rank: int) -> slice:
    """The rank's slice of a step's global batch (``test_fsdp``'s data: 2 × BATCH rows, 4 ranks)."""
    b = 2 * one_d.BATCH // WORLD
    return slice(rank * b, (rank + 1) * b)


def _training(mesh, rank: int, order: str, checkpoint: str | None) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same initialization on every rank, and as the reference's
    model = one_d._model()
    if order == "constrain, shard":
        one_d._constrain(model)
    for i in one_d.SPACES:
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    if order == "shard, constrain":
        one_d._constrain(model)
    losses = one_d._train(model, _rows(rank))
    raw = model[0].parametrizations.weight.original
    out = {"losses": losses, "weights": one_d._weights(model), "placements": str(raw.placements)}
    if checkpoint is not None:
        dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint)
    return out


def _pure(mesh, M: gf.AbstractSpace, shape: tuple) -> dict:
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(0)
    Z, base = M.from_manifold(M.sample(shape, generator=g, dtype=torch.float64))
    Z = Z + 0.1 * torch.randn(Z.shape, generator=g, dtype=torch.float64)
    G = torch.randn(M.to_manifold(Z, base).shape, generator=g, dtype=torch.float64)
    Zr = Z.clone().requires_grad_()
    want = M.to_manifold(Zr, base)
    (want_grad,) = torch.autograd.grad((want * G).sum(), Zr)
    out = {}
    for name, pl in _placements(len(shape)).items():
        d = lambda t: distribute_tensor(t, mesh, pl, src_data_rank=None)  # noqa: E731, B023
        dZ = d(Z).requires_grad_()
        Y = M.to_manifold(dZ, None if base is None else torch.utils._pytree.tree_map(d, base))
        (grad,) = torch.autograd.grad((Y * distribute_tensor(G, mesh, Y.placements, src_data_rank=None)).sum(), dZ)
        out[name] = {
            "value": float((Y.full_tensor() - want.detach()).abs().max()),
            "grad": float((grad.full_tensor() - want_grad).abs().max()),
            "placements": (str(Y.placements), str(grad.placements), str(dZ.placements)),
        }
    return out


def _row_sharded_frame(mesh) -> dict:
    """A tall frame's maps with its rows sharded over one or both mesh dimensions."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    M = gf.Stiefel()
    g = torch.Generator().manual_seed(1)
    X = M.sample((12, 3), generator=g, dtype=torch.float64)
    U, V = (M.tangent(X, torch.randn(12, 3, generator=g, dtype=torch.float64)) for _ in range(2))
    E = torch.randn(12, 3, generator=g, dtype=torch.float64)
    maps = {
        "retract": lambda X, U, V, E: M.retract(X, U),
        "tangent": lambda X, U, V, E: M.tangent(X, E),
        "egrad_to_rgrad": lambda X, U, V, E: M.egrad_to_rgrad(X, E),
        "inner": lambda X, U, V, E: M.inner(X, U, V),
        "transport": lambda X, U, V, E: M.transport(X, M.retract(X, U), V),
    }
    out = {}
    for name, pl in {"replicate, shard rows": [Replicate(), Shard(0)], "shard rows twice": [Shard(0), Shard(0)],
                     "shard rows, replicate": [Shard(0), Replicate()]}.items():
        d = lambda t: distribute_tensor(t, mesh, pl, src_data_rank=None)  # noqa: E731, B023
        errs = {}
        for f_name, f in maps.items():
            got = f(d(X), d(U), d(V), d(E))
            errs[f_name] = float((got.full_tensor() - f(X, U, V, E)).abs().max())
        M.check(d(X))  # on the space: no error
        try:
            M.check(d(1.1 * X))
            errs["off point refused"] = False
        except gf.ManifoldError:
            errs["off point refused"] = True
        out[name] = errs
    return out


def worker(rank: int, world: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard"))
    results = {order: _training(mesh, rank, order, os.path.join(outdir, "checkpoint") if order == ORDERS[0] else None)
               for order in ORDERS}
    results["pure"] = {k: _pure(mesh, *v) for k, v in PURE.items()}
    results["rows"] = _row_sharded_frame(mesh)
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2d")


@pytest.fixture(scope="module")
def results(outdir):
    spawn(worker, WORLD, outdir, timeout=240)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The single-process run on the concatenated data (``test_fsdp``'s global batch)."""
    return one_d.reference()


@pytest.mark.parametrize("order", ORDERS)
def test_hsdp_training_equals_one_process(results, reference, order):
    runs = [r[order] for r in results]
    assert len({tuple(r["losses"]) for r in runs}) == WORLD  # every rank saw its own rows
    assert runs[0]["placements"] == "(Replicate(), Shard(dim=0))"  # HSDP: replicated, then sharded
    for i, space in one_d.SPACES.items():
        for r in runs[1:]:
            assert torch.equal(runs[0]["weights"][i], r["weights"][i]), i  # one model, gathered alike
        torch.testing.assert_close(runs[0]["weights"][i], reference[i], atol=ATOL_F32, rtol=0)
        assert member(space, runs[0]["weights"][i]), (i, space)


def test_hsdp_checkpoint_4_processes_to_1(results, outdir):
    torch.manual_seed(3)  # another initialization: the load must replace it
    model = one_d._model()
    one_d._constrain(model)
    one_d._load(model, str(outdir / "checkpoint"))
    for i in one_d.SPACES:
        assert torch.equal(model[i].weight.detach(), results[0][ORDERS[0]]["weights"][i]), i


@pytest.mark.parametrize("case", sorted(PURE))
def test_pure_maps_on_2d_dtensors(results, case):
    for name, r in results[0]["pure"][case].items():
        # float64 rounding: a rank maps its own slice of the batch, whose products may take other kernels
        assert r["value"] <= ATOL_F64 and r["grad"] <= ATOL_F64, (case, name, r)
        y_placements, grad_placements, z_placements = r["placements"]
        assert grad_placements == z_placements, (case, name, r)  # the gradient is sharded like Z
    for other in results[1:]:
        assert other["pure"][case] == results[0]["pure"][case]


def test_row_sharded_frame_on_2d_meshes(results):
    for name, errs in results[0]["rows"].items():
        assert errs.pop("off point refused"), name
        for f_name, err in errs.items():
            assert err <= ATOL_F64, (name, f_name, err)  # the plain maps' values to rounding
