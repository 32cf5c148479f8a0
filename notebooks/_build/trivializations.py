# %% [markdown]
# # Trivializations: static, dynamic, and Riemannian optimizers
#
# How does geofunc keep a weight on a manifold while a plain optimizer updates it? With a
# **trivialization**: a smooth map $\varphi: \mathbb{R}^d \to \mathcal{M}$ onto the manifold.
# Instead of minimizing $f$ on $\mathcal{M}$ we minimize $f \circ \varphi$ on a vector space,
# where any optimizer works, and every iterate $\varphi(Z)$ is on $\mathcal{M}$ by construction
# (Lezcano-Casado, *Trivializations for gradient-based optimization on manifolds*, NeurIPS 2019).
# In geofunc $\varphi$ is `M.to_manifold(Z, base)`.
#
# This notebook covers:
#
# 1. what `to_manifold` computes for `SO` and `Stiefel`;
# 2. `expm` versus `cayley` charts;
# 3. **static** (fixed `base`) versus **dynamic** trivializations (`rebase` every K steps), and
#    why "SGD + rebase every step" *is* Riemannian gradient descent;
# 4. the Riemannian optimizers `gf.optim.rsgd` and `gf.optim.radam`.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch.func import grad

import geofunc as gf

torch.set_default_dtype(torch.float64)  # exact identities below are checked to 1e-12
g = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. The chart of SO(n)
#
# For `SO(triv="expm")`, `to_manifold(Z, base) = base · expm(A)` with $A = L - L^\top$ and $L$
# the strictly lower triangle of `Z`: skew-symmetric matrices are the Lie algebra of $SO(n)$,
# and the exponential maps them onto the group. `base=None` means the identity.

# %%
M = gf.SO()
Z = torch.randn(4, 4, generator=g)
L = Z.tril(-1)
X = M.to_manifold(Z)
print("to_manifold(Z) == matrix_exp(L − Lᵀ):", torch.allclose(X, torch.linalg.matrix_exp(L - L.T)))
print("only the strict lower triangle is read:", torch.allclose(X, M.to_manifold(L)))
B = M.sample((4, 4), generator=g)
print("centred at a base:", torch.allclose(M.to_manifold(Z, B), B @ X))

# %% [markdown]
# `Stiefel` (n×k frames with orthonormal columns) uses a chart centred at the frame itself,
# costing $O(nk^2)$ instead of the $O(n^3)$ of completing the frame to a square rotation;
# `Grassmannian` is the same with the rotations inside the subspace removed (they do not move
# the subspace).

# %%
St = gf.Stiefel()
base = St.sample((50, 3), generator=g)
X = St.to_manifold(0.3 * torch.randn(50, 3, generator=g), base)
print("XᵀX = I:", torch.allclose(X.T @ X, torch.eye(3)), "| from_manifold(base) gives raw = 0:",
      bool((St.from_manifold(base)[0] == 0).all()))

# %% [markdown]
# ## 2. `expm` versus `cayley`
#
# The Cayley map $A \mapsto (I - A/2)^{-1}(I + A/2)$ is a cheaper alternative to the exponential
# (one matrix inverse instead of a Taylor polynomial with scaling and squaring). It agrees with `expm` to second order
# at 0, but it is not onto: it never reaches a rotation with eigenvalue $-1$. In 2-D the picture
# says it all: a raw coordinate $z$ gives a rotation by angle $\theta(z)$; `expm` gives
# $\theta = z$ (periodic: it covers the circle), `cayley` gives $\theta = 2\arctan(z/2)$, which
# approaches $\pm\pi$ only as $z \to \pm\infty$.

# %%
z = torch.linspace(-8, 8, 401)
Zs = torch.zeros(401, 2, 2)
Zs[:, 1, 0] = z  # the strict lower triangle of a 2×2 matrix holds one number
angles = {}
for triv in ("expm", "cayley"):
    R = gf.SO(triv=triv).to_manifold(Zs)
    angles[triv] = torch.atan2(R[:, 1, 0], R[:, 0, 0])
fig, ax = plt.subplots(figsize=(6, 3))
for triv, th in angles.items():
    ax.plot(z, th, label=triv)
ax.axhline(torch.pi, ls=":", c="gray")
ax.axhline(-torch.pi, ls=":", c="gray")
ax.set(xlabel="raw coordinate z", ylabel="rotation angle θ", title="charts of SO(2)")
ax.legend()
plt.show()

# %% [markdown]
# Time per call on a batch of 64 matrices 32×32 (on this machine):

# %%
Zb = torch.randn(64, 32, 32, generator=g)
for triv in ("expm", "cayley"):
    f = gf.SO(triv=triv).to_manifold
    f(Zb)
    t0 = time.perf_counter()
    for _ in range(20):
        f(Zb)
    print(f"{triv:7s} {1e3 * (time.perf_counter() - t0) / 20:.2f} ms")

# %% [markdown]
# ## 3. Static and dynamic trivializations
#
# A **static** trivialization keeps `base` fixed for the whole run: simple, and fine when the
# solution is not too far from the base. But far from the base the chart is distorted (the
# gradient of $f\circ\varphi$ is the Riemannian gradient pulled back through the differential
# of $\varphi$, which degrades away from 0, and `expm` even has critical points at distance
# $\pi$).
#
# A **dynamic** trivialization re-centres the chart every K steps at the current point:
# `Z, base = M.rebase(Z, base)` returns the same point with the new base, and `Z = 0` for the
# orthogonal family. At `Z = 0` the chart is an isometry to first order, so the gradient there
# *is* the Riemannian gradient, and one SGD step followed by `rebase` is exactly one step of
# Riemannian gradient descent along the chart's curve. For `SO` with `expm` and Euclidean
# gradient $G$ at $X$:
#
# $$X^+ = \exp\!\big(-\eta\,(G X^\top - X G^\top)\big)\, X .$$
#
# Let us check that identity numerically on $f(X) = \operatorname{tr}(C^\top X)$.

# %%
C = torch.randn(6, 6, generator=g)
f = lambda X: (C * X).sum()  # noqa: E731
X0 = M.sample((6, 6), generator=g)
eta = 0.1
Z, base = M.from_manifold(X0)
gZ = grad(lambda Z: f(M.to_manifold(Z, base)))(Z)
Z, base = M.rebase(Z - eta * gZ, base)
G = C  # Euclidean gradient of f
X_rgd = torch.linalg.matrix_exp(-eta * (G @ X0.T - X0 @ G.T)) @ X0
print("SGD step + rebase == exp(−η(GXᵀ − XGᵀ)) X:", torch.allclose(M.to_manifold(Z, base), X_rgd, atol=1e-12))

# %% [markdown]
# ### An experiment: reaching a far rotation
#
# Minimize $\tfrac12\|X - Q\|^2$ over $SO(6)$ from $X = I$, where the target $Q$ rotates
# three planes by 3.1, 2.5 and 1.0 radians: almost a half turn. We run plain SGD on `Z` with a
# static chart (`base = I` forever) and with `rebase` after every step, for both charts.

# %%
import math


def plane_rotations(angles, n):
    R = torch.eye(n)
    for i, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        R[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[c, -s], [s, c]])
    return R


n = 6
P = gf.SO().sample((n, n), generator=g)
Q = P @ plane_rotations([3.1, 2.5, 1.0], n) @ P.T


def run_sgd(triv, rebase_every, steps=80, lr=0.2):
    space = gf.SO(triv=triv)
    Z, base = space.from_manifold(torch.eye(n))
    loss = lambda Z, base: 0.5 * ((space.to_manifold(Z, base) - Q) ** 2).sum()  # noqa: E731
    hist = []
    for t in range(steps):
        Z = Z - lr * grad(loss)(Z, base)
        if rebase_every and (t + 1) % rebase_every == 0:
            Z, base = space.rebase(Z, base)
        hist.append(loss(Z, base).item())
    return hist


runs = {
    "expm, static": run_sgd("expm", 0),
    "expm, rebase every step (RGD)": run_sgd("expm", 1),
    "cayley, static": run_sgd("cayley", 0),
    "cayley, rebase every step": run_sgd("cayley", 1),
}
fig, ax = plt.subplots(figsize=(7, 3.5))
for (name, hist), style in zip(runs.items(), ["-", "--", "-", "--"]):
    ax.semilogy(hist, style, label=name)
ax.set(xlabel="SGD step", ylabel="½‖X − Q‖²", ylim=(1e-20, 1e2), title="SGD on the raw Z, from X = I")
ax.legend()
plt.show()
for name, hist in runs.items():
    print(f"{name:30s} final loss {hist[-1]:.2e}")

# %% [markdown]
# The static Cayley chart stalls: the target is close to a rotation by $\pi$, which the Cayley
# map centred at $I$ reaches only as $\|Z\| \to \infty$, so the optimizer chases it along
# an ever flatter chart. Re-centring fixes it: each chart only has to cover one small step.
# The exponential chart is onto, and here the static run does as well as the dynamic one;
# in general the distortion of a static chart grows with the distance from its base.
#
# Rules of thumb: re-centring is cheap for the orthogonal family (it is one `to_manifold`), so
# rebase often with SGD; with Adam, rebase every few dozen steps (Adam's moments are expressed
# in the old chart and `rebase` does not transport them), or use `gf.optim.radam` below.
#
# With the pytree API the same is `raw, bases = gf.rebase(constraints, raw, bases)`, and with
# `gf.nn` modules `gf.nn.update_base(module, "weight")`.
#
# ## 4. Riemannian optimizers
#
# `geofunc.optim` works on the points directly, in the optax style: `opt.init(params)` and
# `params, state = opt.update(grads, state, params)` with *Euclidean* gradients. Constrained
# entries move by `tangent` → optimizer rule → `retract`, and the optimizer state (momentum,
# Adam's first moment) is transported to the new point; unconstrained entries get exactly
# `torch.optim.SGD` / `torch.optim.Adam`.

# %% [markdown]
# The problem: the top-k eigenvectors of a symmetric matrix $A$, i.e. maximize
# $\operatorname{tr}(X^\top A X)$ over `Stiefel` frames $X \in \mathbb{R}^{n\times k}$; the
# optimum is the sum of the $k$ largest eigenvalues.

# %%
n, k = 60, 4
U = gf.SO().sample((n, n), generator=g)
eigenvalues = torch.cat([torch.tensor([1.0, 0.9, 0.8, 0.7]), 0.5 * torch.rand(n - k, generator=g)])
A = U @ torch.diag(eigenvalues) @ U.T
optimum = eigenvalues[:k].sum()
X_init = St.sample((n, k), generator=g)


def gap(X):
    return (optimum - torch.trace(X.T @ A @ X)).item()


# Reference: SGD on Z with a rebase every step (Riemannian gradient descent through the chart)
Z, base = St.from_manifold(X_init)
sgd_rebase = []
for t in range(60):
    Z = Z - 1.0 * grad(lambda Z: -torch.trace(St.to_manifold(Z, base).T @ A @ St.to_manifold(Z, base)))(Z)
    Z, base = St.rebase(Z, base)
    sgd_rebase.append(gap(St.to_manifold(Z, base)))

constraints = {"X": gf.Stiefel()}
loss = lambda p: -torch.trace(p["X"].T @ A @ p["X"])  # noqa: E731
curves = {}
for name, opt in {
    "rsgd(lr=1.0)": gf.optim.rsgd(constraints, lr=1.0),
    "rsgd(lr=0.5, momentum=0.5)": gf.optim.rsgd(constraints, lr=0.5, momentum=0.5),
    "radam(lr=0.1)": gf.optim.radam(constraints, lr=0.1),
}.items():
    params = {"X": X_init}
    state = opt.init(params)
    hist = []
    for t in range(60):
        params, state = opt.update(grad(loss)(params), state, params)
        hist.append(gap(params["X"]))
    curves[name] = hist
    print(f"{name:28s} final gap {hist[-1]:.2e}, on the manifold: {bool(gf.contains(constraints, params)['X'])}")

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, hist in curves.items():
    ax.semilogy(hist, label=name)
ax.semilogy(sgd_rebase, "k:", label="SGD on Z + rebase every step")
ax.set(xlabel="step", ylabel="optimum − tr(XᵀAX)", title=f"top-{k} eigenvectors of a {n}×{n} matrix")
ax.legend()
plt.show()

# %% [markdown]
# `rsgd` without momentum and "SGD on `Z` + `rebase` every step" follow different curves on
# the manifold (a retraction along the projected gradient versus the chart's curve), but they
# are the same method to first order, and they converge alike. Momentum, transported from
# point to point, speeds it up. `radam` is built for noisy stochastic gradients; on this
# deterministic, well-conditioned problem it is the slowest of the three.
#
# The optimizers are pure functions of tensors, so they run under `torch.func.vmap` (one
# optimizer for a whole ensemble, see the *ensembles* notebook) and `torch.compile`.
#
# ## Summary
#
# | you want | do |
# | --- | --- |
# | a constraint and your usual optimizer | `to_manifold` in the loss, optimize the raw tensors (static) |
# | better conditioning far from the start | also `rebase` every K steps (dynamic) |
# | Riemannian gradient descent | SGD + `rebase` every step, or `gf.optim.rsgd` |
# | adaptive Riemannian methods | `gf.optim.radam` |
# | cheaper charts | `triv="cayley"` (not onto: fine with frequent rebasing) |
