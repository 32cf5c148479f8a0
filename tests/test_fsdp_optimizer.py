"""``gf.optim.TorchOptimizer`` checkpoints under FSDP2: 2 gloo processes on 127.0.0.1.

One 2-process job (``tests/distributed_tools.py``) trains a model whose layers are ``fully_shard``-ed
(its parameters DTensors, ``Shard(0)``), with a constrained weight on ``Stiefel`` and one on the
``Sphere``, and heads that some steps skip (so that the optimizer's cohorts split:
Note [A functional optimizer behind torch.optim]). Mid-run it checkpoints the optimizer with
``torch.distributed.checkpoint`` by two routes, loads each into a fresh model and optimizer, and
trains on; the tests compare with the uninterrupted run:

* ``get_state_dict(model, opt)`` / ``set_state_dict`` (torch's distributed state-dict API), with
  ``dcp.save`` / ``dcp.load``: it raised ``KeyError: 'state'``;
* ``dcp.save({"optim": opt.state_dict()})`` / ``dcp.load`` then ``opt.load_state_dict``: the
  functional states were NamedTuples, pickled whole, so each rank loaded rank 0's local shards of
  the moments (6e-2 off), and the resumed run was 4e-2 off the uninterrupted one.

Each rank saves and loads its own shards: the loaded state equals the saved one bit for bit, and the
resumed run equals the uninterrupted one (float32, ``ATOL``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed_tools import requires_gloo, spawn_results
from helpers import FSDP2_ON_CPU, needs_torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

import geofunc as gf

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "FSDP2 and DTensor on the CPU (gloo)")]

WORLD = 2
BATCH = 4  # per rank
ATOL = 1e-6  # float32; the runs do the same operations in the same order: measured 0
SPACES = {"trunk.weight": gf.Stiefel(), "a.weight": gf.Sphere()}
#: the heads each step uses: b starts late, a skips a step (the cohorts split)
USES = ["a", "a", "ab", "b", "ab", "ab"]
SAVE_AT = 4  # steps before the checkpoint
FACTORIES = {"radam": (gf.optim.radam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
             "rsgd": (gf.optim.rsgd, dict(lr=0.05, momentum=0.9, dampening=0.1))}
ROUTES = ["get_state_dict", "state_dict"]


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, use: str) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return sum(getattr(self, k)(h) for k in use)


def _model(mesh, seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Heads()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, space in SPACES.items():
            p = model.get_parameter(k)
            p.copy_(space.sample(p.shape, generator=g))
    for m in (model.trunk, model.a, model.b, model):
        fully_shard(m, mesh=mesh)
    return model


def _optimizer(model: nn.Module, name: str) -> gf.optim.TorchOptimizer:
    factory, kwargs = FACTORIES[name]
    return gf.optim.TorchOptimizer(model.named_parameters(), SPACES, factory, **kwargs)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rows: slice) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(WORLD * BATCH, 6, generator=g), torch.randn(WORLD * BATCH, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        ((model(x[rows], USES[s]) - y[rows]) ** 2).mean().backward()
        opt.step()


def _max_diff(a: dict, b: dict) -> float:
    """The largest difference between two flat state dicts (``_flat``), DTensors compared by their local
    shards (any format: the test must fail on the earlier one); inf where their keys differ."""
    if a.keys() != b.keys():
        return float("inf")
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    return max((float((local(a[k]) - local(b[k])).abs().max()) if isinstance(a[k], torch.Tensor)
                else float(a[k] != b[k])) for k in a)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}


def _route(mesh, name: str, route: str, rows: slice, checkpoint: str) -> dict:
    """Train SAVE_AT steps, checkpoint by ``route``, load into a fresh model and optimizer, train on."""
    out: dict = {}
    model = _model(mesh, seed=0)
    opt = _optimizer(model, name)
    _steps(model, opt, range(SAVE_AT), rows)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _flat(opt.state_dict()).items()}
    fresh = _model(mesh, seed=7)  # another starting point, and an optimizer that never stepped
    fresh_opt = _optimizer(fresh, name)
    if route == "get_state_dict":
        try:
            model_sd, optim_sd = get_state_dict(model, opt)
        except Exception as e:  # noqa: BLE001  (reported to the test, which names it)
            out["error"] = f"{type(e).__name__}: {e}"
            return out
        example = optim_sd["state"]["trunk.weight"]
        out["entry types"] = sorted({type(v).__name__ for v in example.values()})
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        dcp.save({"model": get_model_state_dict(model), "optim": opt.state_dict()}, checkpoint_id=checkpoint)
        _steps(fresh, fresh_opt, range(2, 3), rows)  # a state of the structure to load into (every head used)
        model_sd, optim_sd = get_model_state_dict(fresh), fresh_opt.state_dict()
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        fresh.load_state_dict(model_sd)
        fresh_opt.load_state_dict(optim_sd)
    out["state diff"] = _max_diff(saved, _flat(fresh_opt.state_dict()))
    _steps(fresh, fresh_opt, range(SAVE_AT, len(USES)), rows)
    out["resumed"] = _full(fresh)
    return out


def _flat(sd: dict) -> dict:
    """A state dict's leaves by path (its parameters as the optimizer numbers them)."""
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(sd)
    return {torch.utils._pytree.keystr(p): v for p, v in leaves}


def worker(rank: int, world: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results: dict = {}
    for name in FACTORIES:
        model = _model(mesh, seed=0)
        _steps(model, _optimizer(model, name), range(len(USES)), rows)
        results[name] = {"uninterrupted": _full(model)}
        for route in ROUTES:
            results[name][route] = _route(mesh, name, route, rows, os.path.join(outdir, f"{name}-{route}"))
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(worker, WORLD, tmp_path_factory.mktemp("fsdp_optimizer"), timeout=150)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_get_state_dict_and_set_state_dict_under_fsdp2(results, name):
    """``get_state_dict(model, opt)`` (it raised ``KeyError: 'state'``) gives the optimizer's entries
    as DTensors (sharded like their parameters) and plain counts; ``dcp.save``, then ``dcp.load`` into
    a fresh optimizer's ``get_state_dict`` and ``set_state_dict``: the state of every rank is the saved
    one, bit for bit, and the resumed run is the uninterrupted one."""
    for rank, r in enumerate(results):
        out = r[name]["get_state_dict"]
        assert "error" not in out, out.get("error")
        assert out["entry types"] == ["DTensor", "Tensor"], out["entry types"]
        assert out["state diff"] == 0.0, (rank, out["state diff"])
        for k, p in out["resumed"].items():
            torch.testing.assert_close(p, r[name]["uninterrupted"][k], atol=ATOL, rtol=0, msg=f"rank {rank}: {k}")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_dcp_of_the_state_dict_resumes_under_fsdp2(results, name):
    """``dcp.save({"optim": opt.state_dict()})``, ``dcp.load`` into another optimizer's ``state_dict``
    and ``load_state_dict``: each rank loads its own shards (rank 0's, 6e-2 off, before), and the
    resumed run is the uninterrupted one (4e-2 off before)."""
    for rank, r in enumerate(results):
        out = r[name]["state_dict"]
        for k, p in out["resumed"].items():
            torch.testing.assert_close(p, r[name]["uninterrupted"][k], atol=ATOL, rtol=0, msg=f"rank {rank}: {k}")
        assert out["state diff"] == 0.0, (rank, out["state diff"])
