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
import warnings

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


def _by_hand(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed from the weights read outside forward (gathered)."""
    h = x
    for layer in model:
        h = h @ _full(layer.weight).T + _full(layer.bias) if isinstance(layer, nn.Linear) else layer(h)
    return h


def _stepped(model: nn.Module, seed: int) -> None:
    """One SGD step (FSDP2's lazy initialization done, the raw tensors away from their charts' 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _assignments(rank: int) -> dict:
    """``module.weight = point`` on a sharded model after training began (a plain full point, the same on
    every rank, and a DTensor one), ``gf.nn.average_`` of sharded models, and deferred initialization:
    each followed by an SGD step; forward must use the weights read outside it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out: dict = {}
    g = torch.Generator().manual_seed(11)
    points = {i: space.sample(tuple(_model(0)[i].weight.shape), generator=g) for i, space in SPACES.items()}
    for kind in ("plain", "DTensor"):
        m = _shard(_model(0))
        _stepped(m, rank)
        mesh = m[0].parametrizations.weight.original.device_mesh
        try:
            for i, P in points.items():
                m[i].weight = P if kind == "plain" else distribute_tensor(P, mesh, [Shard(0)])
        except Exception as e:  # noqa: BLE001 (reported to the test, which names it)
            out[kind] = f"{type(e).__name__}: {e}"
            continue
        with torch.no_grad():
            assigned = {i: _full(m[i].weight).detach().clone() for i in SPACES}
        _stepped(m, 7 + rank)
        with torch.no_grad():
            out[kind] = {"assigned": assigned, "weights": {i: _full(m[i].weight).detach().clone() for i in SPACES},
                         "forward": m(_x()), "by hand": _by_hand(m, _x())}
    ema, m = _shard(_model(3)), _shard(_model(0))
    _stepped(m, rank)
    with torch.no_grad():
        expected = {i: space.project(0.9 * _full(ema[i].weight) + 0.1 * _full(m[i].weight))
                    for i, space in SPACES.items()}
        try:
            gnn.average_(ema, [ema, m], [0.9, 0.1])
        except Exception as e:  # noqa: BLE001
            out["average_"] = f"{type(e).__name__}: {e}"
        else:
            out["average_"] = {"expected": expected, "weights": {i: _full(ema[i].weight).clone() for i in SPACES}}
    # deferred initialization: built on the meta device, sharded, to_empty, a point assigned to each
    with torch.device("meta"):
        m = _model(0)
    m = _shard(m)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for i in SPACES:
            torch.nn.init.zeros_(m[i].bias)
    torch.manual_seed(4)  # the same samples on every rank
    try:
        for i in SPACES:
            m[i].weight = m[i].parametrizations.weight[0].sample()
    except Exception as e:  # noqa: BLE001
        out["meta"] = f"{type(e).__name__}: {e}"
    else:
        _stepped(m, rank)
        with torch.no_grad():
            out["meta"] = {"weights": {i: _full(m[i].weight).detach().clone() for i in SPACES},
                           "forward": m(_x()), "by hand": _by_hand(m, _x())}
    return out


def _root_steps(model: nn.Module, rank: int | None, reshard: bool) -> dict:
    """SGD steps, each followed by an evaluation forward and ``update_base`` of the first layer (sharded
    with its root only when ``rank`` is given: the root does not reshard after forward)."""
    out: dict = {"refusals": []}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(0)
    first = model.module if hasattr(model, "module") else model  # (FSDP1 wraps it)
    first = first[0] if isinstance(first, nn.Sequential) else first
    for _ in range(3):
        x = torch.randn(2 * 3, 4, generator=g)
        rows = slice(None) if rank is None else slice(3 * rank, 3 * rank + 3)
        opt.zero_grad()
        model(x[rows]).tanh().mean().backward()
        opt.step()
        with torch.no_grad():
            model(x)  # an evaluation forward: the root keeps its parameters unsharded
            W = _full(first.weight).clone()
        try:
            gnn.update_base(first)
        except gf.ManifoldError as e:
            out["refusals"].append(str(e))
            try:
                _, raw, bases = gnn.functional(model)
                gnn.load_functional(model, raw, bases)
            except gf.ManifoldError as e:
                out["load_functional"] = str(e)
            try:  # GeoTorch's way
                first.parametrizations.weight[0].update_base(first.parametrizations.weight.original)
            except gf.ManifoldError as e:
                out["class update_base"] = str(e)
            with torch.no_grad():
                out["kept"] = float((_full(first.weight) - W).abs().max())
            if not reshard:
                return out
            model.reshard()
            gnn.update_base(first)
    out["weight"] = _full(first.weight).detach().clone()
    return out


def _sharded_by_the_root(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for name, reshard in (("refused", False), ("resharded", True)):
        torch.manual_seed(0)
        m = nn.Sequential(gnn.orthogonal(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))
        out[name] = _root_steps(fully_shard(m, mesh=mesh), rank, reshard)
    with warnings.catch_warnings():  # FSDP1 (deprecated): marks its modules as FSDP2 does, plain parameters
        warnings.simplefilter("ignore")
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        torch.manual_seed(0)
        m = nn.Sequential(gnn.orthogonal(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))
        out["FSDP1"] = _root_steps(FullyShardedDataParallel(m, sharding_strategy=ShardingStrategy.NO_SHARD,
                                                            use_orig_params=True, device_id=torch.device("cpu")),
                                   rank, False)
    torch.manual_seed(0)
    out["constrained root"] = _root_steps(fully_shard(gnn.orthogonal(nn.Linear(4, 6)), mesh=mesh), rank, True)
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
        "assignments": _guarded(_assignments, rank),
        "sharded by the root": _guarded(_sharded_by_the_root, rank),
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


def _same_on_both_ranks(results, kind: str, key: str) -> dict:
    """The "assignments" scenario's ``kind`` entry of rank 0, asserting for both ranks: the weights ``key``
    equal across ranks (exactly), each weight on its space (1e-5), and forward using them (float32, 1e-6)."""
    r0, r1 = (_ok(r, "assignments")[kind] for r in results)
    assert isinstance(r0, dict), r0
    for r in (r0, r1):
        for i, space in SPACES.items():
            torch.testing.assert_close(r[key][i], r0[key][i], atol=0, rtol=0)
            assert member(space, r["weights"][i], 1e-5), (i, space)
        torch.testing.assert_close(r["forward"], r["by hand"], atol=1e-6, rtol=0)
    return r0


@pytest.mark.parametrize("kind", ["plain", "DTensor"])
def test_assignment_to_a_sharded_weight_is_what_forward_uses(results, kind):
    """``module.weight = point`` under FSDP2 after training began: a plain point raised torch's "Cannot
    swap t1 and t2 if they have different slots"; a DTensor one swapped in a shard FSDP2 no longer
    gathered, so forward kept the old weight and the optimizer stepped an unused one (0.33 off after one
    step). Now the point is the weight, forward uses what is read outside it (float32: 1e-6), after a step
    too, on both ranks alike (Note [Assignments to a sharded tensor])."""
    r0 = _same_on_both_ranks(results, kind, "assigned")
    g = torch.Generator().manual_seed(11)
    for i, space in SPACES.items():
        P = space.sample(tuple(_model(0)[i].weight.shape), generator=g)
        torch.testing.assert_close(r0["assigned"][i], P, atol=1e-5, rtol=0)


def test_average_of_sharded_modules(results):
    """``gf.nn.average_(ema, [ema, model], ...)`` of FSDP2 modules raised torch's "mixed torch.Tensor and
    DTensor" from the class's in_manifold; now the projection of the average, on both ranks (float32)."""
    for r in results:
        out = _ok(r, "assignments")["average_"]
        assert isinstance(out, dict), out
        for i, space in SPACES.items():
            torch.testing.assert_close(out["weights"][i], out["expected"][i], atol=1e-5, rtol=0)
            assert member(space, out["weights"][i], 1e-5), (i, space)


def test_deferred_initialization_of_a_sharded_model(results):
    """Built on the meta device, ``fully_shard``, ``to_empty``, then a sample assigned to each constrained
    weight (README's way without a checkpoint; it raised torch's swap error): on the spaces after a step,
    the same on both ranks, and forward uses them."""
    _same_on_both_ranks(results, "meta", "weights")


def test_update_base_of_a_weight_the_root_holds_unsharded(results):
    """``fully_shard(model)`` alone: after an evaluation forward the root keeps its parameters unsharded,
    and update_base wrote the new raw tensor into that copy, which FSDP2 frees, and the new base into the
    kept buffers: the next step's weight was neither point (0.09 off a one-process run after three steps,
    silently); load_functional and the class's update_base(raw) alike. Now a ManifoldError on every rank
    that says to reshard, leaving the weight as it was; after ``model.reshard()`` the run equals one
    process's (float32, 1e-5), also where the constrained module is itself the root (Note [Raw tensors
    FSDP2 holds unsharded]); FSDP1 (NO_SHARD), which marks its modules alike, is not refused."""
    torch.manual_seed(0)
    plain = nn.Sequential(gnn.orthogonal(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))
    one = _root_steps(plain, None, False)["weight"]
    torch.manual_seed(0)
    one_root = _root_steps(gnn.orthogonal(nn.Linear(4, 6)), None, False)["weight"]
    for r in results:
        out = _ok(r, "sharded by the root")
        refused = out["refused"]["refusals"]
        assert len(refused) == 1 and "reshard()" in refused[0] and "Linear.weight" in refused[0], refused
        assert "load_functional" in out["refused"]["load_functional"] and "reshard()" in out["refused"]["load_functional"]
        assert "reshard()" in out["refused"]["class update_base"], out["refused"].get("class update_base")
        assert out["refused"]["kept"] == 0.0
        assert out["resharded"]["refusals"] == refused * 3
        torch.testing.assert_close(out["resharded"]["weight"], one, atol=1e-5, rtol=0)
        assert len(out["constrained root"]["refusals"]) == 3
        assert out["FSDP1"]["refusals"] == []  # not FSDP2's unsharded copy: left as it was
        torch.testing.assert_close(out["FSDP1"]["weight"], one, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["constrained root"]["weight"], one_root, atol=1e-5, rtol=0)
