"""GeoTorch's three published examples, re-created at small sizes with one change: the import lines
(``import geofunc.nn as geotorch``, and ``from geofunc.nn.so import torus_init_`` for the example's
``from geotorch.so import torus_init_``: the package renamed, its module layout kept). Each trains for a few dozen steps;
the loss must go down and the constraint must hold, checked with ``torch.linalg`` predicates
written independently of the spaces. Written from the examples' descriptions (GEOTORCH.md §15),
not copied.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geofunc.nn as geotorch  # the only change: was `import geotorch`
from geofunc.nn.so import torus_init_  # was `from geotorch.so import torus_init_`

F32 = 1e-5  # float32 membership tolerance of an orthogonal / spherical weight after training


def _orthonormality(W: torch.Tensor) -> float:
    return float((W.T @ W - torch.eye(W.shape[1])).abs().max())


# ----------------------------------------------------------------------------- eigenvalue


class Rayleigh(nn.Module):
    """Largest eigenvalue of a symmetric matrix: maximize ``xᵀAx`` on the unit sphere."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.rand(n))
        geotorch.sphere(self, "x")
        S = self.parametrizations.x[0]  # the manifold object, as in the example
        self.x = S.sample()

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        x = self.x
        return x @ A @ x


def test_eigenvalue_example():
    torch.manual_seed(0)
    n = 60
    A = torch.rand(n, n)
    A = 0.5 * (A + A.T)
    lam_max = torch.linalg.eigvalsh(A)[-1]
    model = Rayleigh(n)
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / n)
    values = []
    for _ in range(100):
        value = model(A)
        values.append(float(value.detach()))
        opt.zero_grad()
        (-value).backward()
        opt.step()
        if abs(values[-1] - float(lam_max)) <= 1e-3:
            break
    assert abs(values[-1] - float(lam_max)) <= 1e-3, (values[0], values[-1], float(lam_max))
    assert values[-1] > values[0]
    assert abs(float(torch.linalg.vector_norm(model.x.detach())) - 1.0) <= F32


# ----------------------------------------------------------------------------- copying problem


class ModReLU(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.empty(features).uniform_(-0.01, 0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * F.relu(z.abs() + self.b)


class ExpRNNCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, constraint: str = "orthogonal", init: str = "sample") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.recurrent_kernel = nn.Linear(hidden_size, hidden_size, bias=False)
        self.input_kernel = nn.Linear(input_size, hidden_size)
        self.nonlinearity = ModReLU(hidden_size)
        if constraint == "orthogonal":
            geotorch.orthogonal(self.recurrent_kernel, "weight")
        elif constraint == "lowrank":
            geotorch.low_rank(self.recurrent_kernel, "weight", hidden_size)
        else:
            geotorch.almost_orthogonal(self.recurrent_kernel, "weight", 0.1, "scaled_sigmoid")
        nn.init.kaiming_normal_(self.input_kernel.weight.data, nonlinearity="relu")
        K = self.recurrent_kernel
        if init == "sample":  # the copying problem: the manifold's own torus sampler
            K.weight = K.parametrizations.weight[0].sample("torus")
        else:  # sequential MNIST: torus_init_ "à la Cayley", assigned through the parametrization

            def cayley_angles(x: torch.Tensor) -> None:
                x.uniform_(0.0, math.pi / 2.0)
                c = torch.cos(x.data)
                x.data = -torch.sqrt((1.0 - c) / (1.0 + c))

            K.weight = torus_init_(K.weight, init_=cayley_angles)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.nonlinearity(self.input_kernel(x) + self.recurrent_kernel(h))


class CopyModel(nn.Module):
    def __init__(self, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.rnn = ExpRNNCell(n_classes + 1, hidden)
        self.lin = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.rnn.hidden_size)
        out = []
        with geotorch.parametrize.cached():
            for xt in torch.unbind(x, dim=1):
                h = self.rnn(xt, h)
                out.append(self.lin(h))
        return torch.stack(out, dim=1)


def _copy_data(batch: int, L: int, K: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(1, n_classes, (batch, K))
    marker = torch.full((batch, 1), n_classes)
    x = torch.cat([seq, torch.zeros(batch, L, dtype=torch.long), marker, torch.zeros(batch, K - 1, dtype=torch.long)], 1)
    y = torch.cat([torch.zeros(batch, L + K, dtype=torch.long), seq], 1)
    return x, y


def test_copying_problem_example_with_torus_init_and_update_base_every_step():
    torch.manual_seed(0)
    n_classes, hidden, L, K = 9, 24, 20, 5
    model = CopyModel(n_classes, hidden)
    W0 = model.rnn.recurrent_kernel.weight.detach()
    # the torus sample: a block-diagonal rotation, every eigenvalue on the unit circle
    assert _orthonormality(W0) <= F32
    assert torch.allclose(torch.linalg.eigvals(W0).abs(), torch.ones(hidden), atol=1e-5)
    orth = list(model.rnn.recurrent_kernel.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in orth)]
    opt = torch.optim.Adam([{"params": rest}, {"params": orth, "lr": 2e-3, "betas": (0.9, 0.99)}], lr=1e-2)
    losses = []
    for _ in range(40):
        x, y = _copy_data(16, L, K, n_classes)
        logits = model(F.one_hot(x, n_classes + 1).float())
        loss = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        geotorch.update_base(model.rnn.recurrent_kernel, "weight")  # the example's RGD line, every step
        losses.append(float(loss.detach()))
        W = model.rnn.recurrent_kernel.weight.detach()
        assert _orthonormality(W) <= F32
        assert float(model.rnn.recurrent_kernel.parametrizations.weight.original.detach().abs().max()) == 0.0
    # from ~ln 9 (uniform) down past the blanks-only level
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert not torch.equal(model.rnn.recurrent_kernel.weight.detach(), W0)


# ----------------------------------------------------------------------------- sequential MNIST


class SeqModel(nn.Module):
    def __init__(self, hidden: int, constraint: str) -> None:
        super().__init__()
        self.rnn = ExpRNNCell(1, hidden, constraint, init="torus")
        self.lin = nn.Linear(hidden, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = pixels.new_zeros(pixels.shape[0], self.rnn.hidden_size)
        with geotorch.parametrize.cached():
            for p in torch.unbind(pixels, dim=1):
                h = self.rnn(p.unsqueeze(1), h)
        return self.lin(h)


def _digits(batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped synthetic data: 784 pixels in [0, 1], the class written as the brightness of a
    few late rows (a learnable signal after a long sequence), plus noise elsewhere."""
    y = torch.randint(0, 10, (batch,), generator=g)
    x = 0.1 * torch.rand(batch, 784, generator=g)
    x[:, -56:] += (y.float() / 9.0)[:, None]
    return x.clamp(0, 1), y


@pytest.mark.parametrize("constraint", ["orthogonal", "lowrank", "almostorthogonal"])
def test_sequential_mnist_example(constraint):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    hidden = 16
    model = SeqModel(hidden, constraint)
    K = model.rnn.recurrent_kernel
    # torus_init_ assigned through every parametrization: orthogonal, so singular values 1
    s0 = torch.linalg.svdvals(K.weight.detach())
    assert torch.allclose(s0, torch.ones(hidden), atol=1e-5)
    orth = list(K.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in orth)]
    opt = torch.optim.RMSprop([{"params": rest}, {"params": orth, "lr": 1e-3}], lr=3e-3)
    xv, yv = _digits(32, g)
    with torch.no_grad():
        before = float(F.cross_entropy(model(xv), yv))
    for _ in range(12):
        x, y = _digits(16, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach()))
    with torch.no_grad():
        after = float(F.cross_entropy(model(xv), yv))
    assert after < 0.9 * before, (before, after)
    s = torch.linalg.svdvals(K.weight.detach())
    if constraint == "orthogonal":
        assert torch.allclose(s, torch.ones(hidden), atol=F32)
    elif constraint == "almostorthogonal":
        assert bool(((s - 1).abs() <= 0.1 + 1e-6).all())
    else:  # rank ≤ hidden: no constraint left but finiteness; the start was orthogonal
        assert bool(torch.isfinite(s).all()) and float(s.max()) < 10.0
