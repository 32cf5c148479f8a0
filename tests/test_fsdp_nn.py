"""geofunc.nn's state on FSDP2-sharded models across processes: 2 gloo processes on 127.0.0.1.

One 2-process job (``tests/distributed_tools.py``, as ``tests/test_fsdp.py``) runs the scenarios and
writes what each rank sees; the tests compare the ranks:

* a full state dict loaded with torch's ``set_model_state_dict(..., StateDictOptions(
  full_state_dict=True, broadcast_from_rank0=True))``, held by rank 0 alone: every rank gets the
  same bases, the source's (Note [Contiguous bases] in ``geofunc/nn/_adapter.py``: a base buffer
  stored as a transposed view reached rank 1 transposed);
* ``gf.nn.load_functional`` of ``gf.rebase``'s results (DTensor raw tensors and bases for plain base
  buffers), of plain full tensors for DTensor parameters, and a refusal that leaves the module as it
  was on both ranks (Note [Loading functional results] in ``geofunc/nn/_functional.py``).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_tools import requires_gloo, spawn_results
from helpers import FSDP2_ON_CPU, needs_torch
from reference import member
from torch import nn

import geofunc as gf
import geofunc.nn as gnn

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "FSDP2 and DTensor on the CPU (gloo)")]

WORLD = 2

#: The constrained layers: (index in the model, the space of its weight).
SPACES = {0: gf.Stiefel(), 2: gf.LowRank(rank=2), 4: gf.PSD(), 6: gf.Stiefel()}


def _model(seed: int) -> nn.Module:
    """A trained-looking constrained model: every raw tensor away from 0."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                      nn.Linear(5, 5))
    gnn.orthogonal(m[0])  # 7 × 4: a tall frame
    gnn.low_rank(m[2], "weight", 2)
    gnn.positive_definite(m[4])  # a square eigenvector frame
    gnn.orthogonal(m[6])  # square
    with torch.no_grad():
        for i in SPACES:
            Z = m[i].parametrizations.weight.original
            Z.add_(0.3 * torch.randn_like(Z))
    return m


def _shard(model: nn.Module, layers=tuple(SPACES)) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for i in layers:
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _bases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _full(b).detach().clone() for k, b in model.named_buffers() if ".0.base" in k}


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def _broadcast_from_rank0(rank: int) -> dict:
    """A full state dict on rank 0 only (a checkpoint read there), loaded into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    src = _model(0)
    full = {k: v.detach().clone() for k, v in src.state_dict().items()} if rank == 0 else {}
    out = {"saved contiguous": [v.is_contiguous() for k, v in full.items() if ".0.base" in k],
           "source bases": _bases(src)}
    dst = _shard(_model(5))
    set_model_state_dict(dst, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    out["bases"] = _bases(dst)  # (plain buffers: no collective)
    with torch.no_grad():
        out["weights"] = {i: _full(dst[i].weight).detach().clone() for i in SPACES}
        out["source weights"] = {i: src[i].weight.detach().clone() for i in SPACES}
        out["forward"], out["source forward"] = dst(_x()), src(_x())
    return out


def _load_functional(rank: int) -> dict:
    torch.manual_seed(0)
    m = _shard(nn.Sequential(gnn.orthogonal(nn.Linear(6, 8))), layers=(0,))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))).pow(2).sum().backward()
    opt.step()  # the raw tensor away from 0
    out = {}
    W0 = _full(m[0].weight).detach().clone()
    C, raw, bases = gnn.functional(m)
    raw2, bases2 = gf.rebase(C, {k: raw[k].detach() for k in C}, bases)
    out["rebase types"] = (type(raw2["0.weight"]).__name__, type(bases2["0.weight"]).__name__)
    # a refusal: a base off its space, sharded like the raw tensor; nothing written on any rank
    state = {k: _full(v).detach().clone() for k, v in m.state_dict().items()}
    try:
        gnn.load_functional(m, raw2, {"0.weight": 2 * bases2["0.weight"]})
        out["refusal"] = None
    except gf.ManifoldError as e:
        out["refusal"] = str(e)
    out["unchanged after the refusal"] = all(torch.equal(_full(v), state[k]) for k, v in m.state_dict().items())
    # gf.rebase's DTensors (a DTensor base for a plain buffer: gathered)
    try:
        gnn.load_functional(m, raw2, bases2)
        out["error"] = None
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out["error"] = f"{type(e).__name__}: {e}"
    with torch.no_grad():
        out["moved"] = float((_full(m[0].weight) - W0).abs().max())
        out["raw max"] = float(_full(m[0].parametrizations.weight.original).abs().max())
    out["base"] = m[0].parametrizations.weight[0].base.detach().clone()
    out["base type"] = type(m[0].parametrizations.weight[0].base).__name__
    out["rebased base"] = _full(bases2["0.weight"]).detach().clone()
    # plain full tensors for the DTensor parameters (sharded locally)
    with torch.no_grad():
        _, raw, bases = gnn.functional(m)
        plain_raw = {k: _full(v).detach() + 0.1 for k, v in raw.items()}
        gnn.load_functional(m, plain_raw, {k: _full(v).detach().clone() for k, v in bases.items()})
        out["plain raw loaded"] = all(torch.equal(_full(v), plain_raw[k]) for k, v in gnn.functional(m)[1].items())
        out["raw types"] = sorted({type(v).__name__ for v in gnn.functional(m)[1].values()})
        out["weight after plain"] = _full(m[0].weight).detach().clone()
    return out


def _guarded(fn, rank: int) -> dict:
    try:
        return fn(rank)
    except Exception as e:  # noqa: BLE001 (reported to the test, which names it)
        return {"failed": f"{type(e).__name__}: {e}"}


def worker(rank: int, world: int, outdir: str) -> None:
    results = {
        "broadcast_from_rank0": _guarded(_broadcast_from_rank0, rank),
        "load_functional": _guarded(_load_functional, rank),
    }
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(worker, WORLD, tmp_path_factory.mktemp("fsdp_nn"), timeout=150)


def _ok(r: dict, name: str) -> dict:
    assert "failed" not in r[name], r[name].get("failed")
    return r[name]


def test_broadcast_from_rank0_gives_every_rank_the_sources_bases(results):
    r0, r1 = (_ok(r, "broadcast_from_rank0") for r in results)
    assert r0["saved contiguous"] and all(r0["saved contiguous"])
    assert r0["bases"].keys() == r1["bases"].keys() == r0["source bases"].keys()
    for k in r0["bases"]:
        assert torch.equal(r0["bases"][k], r0["source bases"][k]), k
        assert torch.equal(r1["bases"][k], r0["source bases"][k]), k  # not its transpose
    for i, space in SPACES.items():
        assert torch.equal(r1["weights"][i], r0["source weights"][i]), i
        assert member(space, r1["weights"][i]), (i, space)
    assert torch.equal(r0["forward"], r0["source forward"])
    assert torch.equal(r1["forward"], r0["source forward"])


def test_load_functional_of_rebased_dtensors(results):
    r0, r1 = (_ok(r, "load_functional") for r in results)
    for r in (r0, r1):
        assert r["rebase types"] == ("DTensor", "DTensor")
        assert r["error"] is None, r["error"]
        assert r["moved"] < 1e-5  # the point kept: the new raw tensor with the new base
        assert r["raw max"] == 0.0  # Stiefel's rebase: the raw tensor 0 at the point
        assert r["base type"] == "Tensor"  # the buffer stays a plain tensor
        assert torch.equal(r["base"], r["rebased base"])
    assert torch.equal(r0["base"], r1["base"])


def test_load_functional_refuses_on_every_rank_without_writing(results):
    for r in (_ok(res, "load_functional") for res in results):
        assert r["refusal"] is not None and "0.weight" in r["refusal"] and "base" in r["refusal"], r["refusal"]
        assert r["unchanged after the refusal"]


def test_load_functional_of_plain_tensors_into_dtensor_parameters(results):
    r0, r1 = (_ok(r, "load_functional") for r in results)
    for r in (r0, r1):
        assert r["plain raw loaded"] and r["raw types"] == ["DTensor"]
    assert torch.equal(r0["weight after plain"], r1["weight after plain"])
