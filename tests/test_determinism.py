"""Reproducibility: deterministic algorithms, runs repeated in one process and in another, and a
``geofunc.nn`` training run resumed from a checkpoint.

(A sample's generator and the global RNG: ``geofunc.testing.check_sample``, every conformance case.
Optimizer checkpoints: tests/test_optim.py and tests/test_torch_optimizer.py. A batch member against
itself alone: tests/test_ensembles.py.)
"""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import optree
import pytest
import torch
from torch import nn

import geofunc as gf
import geofunc.nn as gnn

F64 = torch.float64

# Every constraint family through its own map: the exponential (orthogonal, positive_definite,
# invertible), the rank charts (low_rank), the sphere chart, Sinkhorn (Birkhoff through constrain).
CONSTRAIN = {
    "orthogonal": lambda m: gnn.orthogonal(m, "weight"),
    "low_rank": lambda m: gnn.low_rank(m, "weight", 2),
    "positive_definite": lambda m: gnn.positive_definite(m, "weight"),
    "invertible": lambda m: gnn.invertible(m, "weight"),
    "sphere": lambda m: gnn.sphere(m, "weight"),
    "birkhoff": lambda m: gnn.constrain(m, "weight", gf.Birkhoff()),
}


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)).to(F64)
    CONSTRAIN[name](m[0])
    CONSTRAIN[name](m[2])
    return m


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)


def _train(m: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    """``steps`` Adam/SGD steps on the raw parameters, ``update_base`` after every third step counted from 0."""
    x, y = _data()
    for t in range(start, start + steps):
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
        if t % 3 == 2:
            gnn.update_base(m[0], "weight")
            gnn.update_base(m[2], "weight")


def _weights(m: nn.Module) -> list[torch.Tensor]:
    return [m[0].weight.detach().clone(), m[2].weight.detach().clone()]


OPTIMIZERS = {"adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
              "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(CONSTRAIN))
def test_a_gf_nn_run_resumed_from_a_checkpoint_is_the_run_never_stopped(name, opt_name):
    """torch.optim on constrained modules, with ``update_base`` between steps: the module's and the
    optimizer's ``state_dict`` saved mid-run, loaded (``weights_only=True``) into a model built from
    another seed (another start, other bases), the same steps: the weights of the run that never
    stopped, bit for bit (the bases are buffers of the state_dict); and a second run from the same
    seed is the same run."""
    make = OPTIMIZERS[opt_name]
    a = _model(name, 0)
    opt_a = make(a)
    _train(a, opt_a, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(a, opt_a, 4, 5)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _model(name, 123)
    b.load_state_dict(saved["model"])
    opt_b = make(b)
    opt_b.load_state_dict(saved["opt"])
    _train(b, opt_b, 4, 5)
    c = _model(name, 0)
    _train(c, make(c), 0, 9)
    for x, y, z in zip(_weights(a), _weights(b), _weights(c)):
        assert torch.equal(x, y) and torch.equal(x, z)


def _run_everything() -> list[torch.Tensor]:
    """Under ``torch.use_deterministic_algorithms(True)``: every space's maps and gradients on a seeded
    batch, two geofunc.optim steps, a gf.nn model's forward, backward and Adam steps with
    ``update_base``. Returns every result."""
    out: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)
    spaces = {gf.SO(): (3, 4, 4), gf.Stiefel(): (3, 6, 3), gf.Grassmannian(): (3, 3, 6), gf.LowRank(rank=2): (3, 6, 4),
              gf.FixedRank(rank=2): (3, 6, 4), gf.PSD(): (3, 4, 4), gf.PSSD(): (3, 4, 4), gf.GLp(): (3, 4, 4),
              gf.SL(): (3, 4, 4), gf.Hurwitz(): (3, 4, 4), gf.AlmostOrthogonal(0.3): (3, 5, 5), gf.Sphere(): (3, 5),
              gf.Oblique(): (3, 5, 4), gf.Birkhoff(): (3, 4, 4), gf.PoincareBall(): (3, 4), gf.Lorentz(): (3, 4)}
    for M, shape in spaces.items():
        X = M.sample(shape, generator=g, dtype=F64)
        Z, base = M.from_manifold(X)
        Zr = (0.5 * torch.randn(X.shape, generator=g, dtype=F64)).requires_grad_()
        Y = M.to_manifold(Zr, base)
        C = torch.randn(X.shape, generator=g, dtype=F64)
        (Y * C).sum().backward()
        V = M.tangent(X, C)
        out += [X, *optree.tree_leaves((Z, base)), Y.detach(), Zr.grad, V, M.retract(X, 0.1 * V), M.project(X + 0.05 * C),
                M.egrad_to_rgrad(X, C), M.transport(X, M.retract(X, 0.1 * V), V), *optree.tree_leaves(M.rebase(Zr.detach(), base))]
    c = {"q": gf.SO(), "s": gf.Sphere(), "b": None}
    params = gf.sample(c, {"q": torch.empty(4, 4, dtype=F64), "s": torch.empty(5, dtype=F64),
                           "b": torch.randn(3, generator=g, dtype=F64)}, generator=g)
    grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    for opt in (gf.optim.rsgd(c, 0.1, momentum=0.9), gf.optim.radam(c, 0.1)):
        p, state = params, opt.init(params)
        for _ in range(2):
            p, state = opt.update(grads, state, p)
        out += optree.tree_leaves((p, state))
    for name in CONSTRAIN:
        m = _model(name, 0)
        _train(m, torch.optim.Adam(m.parameters(), lr=0.05), 0, 4)
        out += _weights(m)
    return out


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


_CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_determinism import _run_everything
torch.use_deterministic_algorithms(True)
torch.save(_run_everything(), {path!r})
"""


def test_deterministic_algorithms_repeat_bit_for_bit_in_this_process_and_another(deterministic, tmp_path):
    """Nothing raises under ``torch.use_deterministic_algorithms(True)`` (no nondeterministic op on the
    CPU), and two runs give the same tensors, bit for bit, in this process and in a fresh one (one thread
    in both). ~5 s: most of it the child's import of torch and geofunc."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, second = _run_everything(), _run_everything()
    finally:
        torch.set_num_threads(threads)
    path = str(tmp_path / "child.pt")
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(pathlib.Path(__file__).parent), path=path)],
                   check=True, timeout=300, env=env)
    child = torch.load(path, weights_only=True)
    assert len(first) == len(second) == len(child)
    for i, (x, y, z) in enumerate(zip(first, second, child)):
        assert torch.equal(x, y) and torch.equal(x, z), i
