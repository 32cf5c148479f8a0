# %% [markdown]
# # A normalizing flow with exact log-determinants
#
# A normalizing flow models a density by an invertible map $f$ from data $x$ to a latent
# $z = f(x)$ with a simple density (a standard Gaussian):
#
# $$\log p(x) = \log \mathcal{N}\big(f(x); 0, I\big) + \log\left|\det \frac{\partial f}{\partial x}\right| .$$
#
# Every layer must be invertible and have a cheap log-determinant. Glow (Kingma & Dhariwal,
# 2018) mixes channels with invertible linear maps $W$ and computes $\log|\det W|$ from an LU
# factorization. With geofunc the linear maps live on `GLp` (invertible, $\det > 0$):
# `GLp().to_manifold(Z, base)` is a factorization $W = U \,\mathrm{diag}(\sigma)\, V^\top$ with
# $U, V$ rotations and $\sigma = \text{softplus}(\cdot) > 0$, so
# `GLp().logabsdet(Z, base)` $= \sum_i \log \sigma_i$ is exact, differentiable, and costs
# $O(n)$ instead of a determinant.
#
# The flow below alternates `GLp` linear layers with affine coupling layers (RealNVP, Dinh et
# al. 2017) and is fitted to the two-moons data set, generated here.

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import jacrev, vmap

import geofunc as gf

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)


def two_moons(n, noise=0.08, generator=None):
    t = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    data = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return data + noise * torch.randn(n, 2, generator=generator)


data = two_moons(2000, generator=g)
data = (data - data.mean(0)) / data.std(0)  # standardized

# %% [markdown]
# ## The layers
#
# * `InvertibleLinear`: $z = W x + b$ with $W$ on `GLp`; the raw tensor `Z` is an
#   `nn.Parameter`, the chart's base (a tuple of tensors for `GLp`) a constant.
# * `Coupling`: keep one coordinate, scale and shift the other by functions of the first:
#   $z_2 = x_2 e^{s(x_1)} + t(x_1)$; its log-determinant is $s(x_1)$.

# %%
GLP = gf.GLp()


class InvertibleLinear(nn.Module):
    def __init__(self, d):
        super().__init__()
        Z, self.base = GLP.from_manifold(torch.eye(d))  # start at the identity
        self.Z = nn.Parameter(Z)
        self.b = nn.Parameter(torch.zeros(d))

    def weight(self):
        return GLP.to_manifold(self.Z, self.base)

    def forward(self, x):
        return x @ self.weight().T + self.b, GLP.logabsdet(self.Z, self.base).expand(x.shape[:-1])

    def inverse(self, z):
        return torch.linalg.solve(self.weight(), (z - self.b).T).T


class Coupling(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # start at the identity map

    def forward(self, x):
        s, t = self.net(x[..., :1]).unbind(-1)
        s = torch.tanh(s)
        return torch.stack([x[..., 0], x[..., 1] * torch.exp(s) + t], -1), s

    def inverse(self, z):
        s, t = self.net(z[..., :1]).unbind(-1)
        s = torch.tanh(s)
        return torch.stack([z[..., 0], (z[..., 1] - t) * torch.exp(-s)], -1)


class Flow(nn.Module):
    def __init__(self, n_blocks=6):
        super().__init__()
        self.layers = nn.ModuleList([m for _ in range(n_blocks) for m in (InvertibleLinear(2), Coupling())])

    def forward(self, x):
        """``z = f(x)`` and ``log|det ∂f/∂x|`` per point."""
        logdet = x.new_zeros(x.shape[:-1])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x):
        z, logdet = self(x)
        return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) + logdet

    def sample(self, n, generator=None):
        z = torch.randn(n, 2, generator=generator)
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


flow = Flow()

# %% [markdown]
# ## Training: maximum likelihood with Adam

# %%
opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
losses = []
for step in range(1000):
    batch = data[torch.randint(len(data), (256,), generator=g)]
    loss = -flow.log_prob(batch).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"negative log-likelihood: {losses[0]:.3f} at the start, {sum(losses[-50:]) / 50:.3f} at the end")

# %% [markdown]
# ## Checking the log-determinants
#
# Each `GLp` layer's `logabsdet` against `torch.linalg.slogdet` of its matrix, and the whole
# flow's accumulated log-determinant against the log-determinant of its Jacobian computed by
# autodiff (`vmap(jacrev(...))`) at a few points.

# %%
with torch.no_grad():
    for i, layer in enumerate(l for l in flow.layers if isinstance(l, InvertibleLinear)):
        sign, ref = torch.linalg.slogdet(layer.weight())
        ours = GLP.logabsdet(layer.Z, layer.base)
        print(f"layer {i}: logabsdet {ours.item():+.6f}   slogdet {ref.item():+.6f}   det > 0: {sign.item() > 0}")

x = data[:5]
J = vmap(jacrev(lambda p: flow(p[None])[0][0]))(x)  # (5, 2, 2) Jacobians of f
_, logdet = flow(x)
print("flow log|det| vs slogdet of the autodiff Jacobian, max difference:",
      f"{(logdet - torch.linalg.slogdet(J).logabsdet).abs().max().item():.1e}")

# %% [markdown]
# ## The learned density and samples

# %%
n = 120
xs, ys = torch.meshgrid(torch.linspace(-2.2, 2.2, n), torch.linspace(-2.2, 2.2, n), indexing="xy")
with torch.no_grad():
    density = flow.log_prob(torch.stack([xs, ys], -1).reshape(-1, 2)).exp().reshape(n, n)
    samples = flow.sample(1000, generator=g)

fig, axs = plt.subplots(1, 4, figsize=(17, 3.6))
axs[0].plot(losses)
axs[0].set(title="negative log-likelihood", xlabel="step")
axs[1].scatter(*data.T, s=2, alpha=0.5)
axs[1].set(title="data (two moons)")
axs[2].pcolormesh(xs, ys, density, shading="auto")
axs[2].set(title="learned density")
axs[3].scatter(*samples.T, s=2, alpha=0.5, c="C1")
axs[3].set(title="samples from the flow")
for ax in axs[1:]:
    ax.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The same layers in zuko
#
# [zuko](https://github.com/probabilists/zuko) is a normalizing-flow library for PyTorch.
# `geofunc.contrib.zuko.SpaceLinear(space, features)` makes any square geofunc space one of its
# layers: $x \mapsto W x$ with $W$ on the space, $\log|\det W|$ from `space.logabsdet` and the
# inverse (used to sample) from the same factorization, $W^{-1} = V\,\mathrm{diag}(\sigma)^{-1} U^\top$
# for `GLp` and $W^\top$ for `SO`, with no solve. Here two `GLp` layers and a rotation are
# interleaved with zuko's own masked autoregressive transforms (the `flows` extra).

# %%
import zuko

from geofunc.contrib.zuko import SpaceLinear

torch.manual_seed(0)  # zuko's networks initialize from the global generator
zflow = zuko.flows.Flow(
    transform=[
        SpaceLinear(gf.GLp(), 2),
        zuko.flows.MaskedAutoregressiveTransform(2, hidden_features=[32, 32]),
        SpaceLinear(gf.GLp(), 2),
        zuko.flows.MaskedAutoregressiveTransform(2, hidden_features=[32, 32]),
        SpaceLinear(gf.SO(), 2),
    ],
    base=zuko.flows.UnconditionalDistribution(zuko.distributions.DiagNormal, torch.zeros(2), torch.ones(2), buffer=True),
)
opt = torch.optim.Adam(zflow.parameters(), lr=5e-3)
zlosses = []
for step in range(600):
    batch = data[torch.randint(len(data), (256,), generator=g)]
    loss = -zflow().log_prob(batch).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    zlosses.append(loss.item())
print(f"zuko flow, negative log-likelihood: {zlosses[0]:.3f} at the start, {sum(zlosses[-50:]) / 50:.3f} at the end")

with torch.no_grad():
    for layer in (t for t in zflow.transform.transforms if isinstance(t, SpaceLinear)):
        W = layer.weight
        print(f"{type(layer.space).__name__:4s} layer: logabsdet {layer().ladj.item():+.6f}   slogdet {torch.linalg.slogdet(W)[1].item():+.6f}")
    zdensity = zflow().log_prob(torch.stack([xs, ys], -1).reshape(-1, 2)).exp().reshape(n, n)
    zsamples = zflow().sample((1000,))  # through the inverses: the factorization for the geofunc layers

fig, axs = plt.subplots(1, 2, figsize=(8.5, 3.6))
axs[0].pcolormesh(xs, ys, zdensity, shading="auto")
axs[0].set(title="zuko flow: learned density")
axs[1].scatter(*zsamples.T, s=2, alpha=0.5, c="C1")
axs[1].set(title="zuko flow: samples")
for ax in axs:
    ax.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Notes
#
# * The same works with `SO` times a positive diagonal (`SO().logabsdet` is 0, so the
#   log-determinant is the sum of the log-diagonal), or with `gf.Product(gf.SO(), ...)`.
# * `logabsdet` exists for every square space where it is cheap: `SO`, `Unitary`, `SL` and
#   square `Stiefel` (0), `GLp`, `PSD`, `PSSD`, square `AlmostOrthogonal`, and `FixedRank`,
#   `LowRank` and `PSSDFixedRank` with `rank = n`.
# * With the functional API the whole flow is a pure function of its raw tensors: `vmap` it
#   over an ensemble of flows, or `torch.compile` it.
