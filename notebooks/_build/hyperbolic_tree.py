# %% [markdown]
# # Hyperbolic embeddings of a tree
#
# A complete binary tree of depth $h$ has $2^h$ leaves at distance $2h$ from each other. In the
# Euclidean plane the points at distance $\le r$ from a centre fill an area $\propto r^2$, so the
# leaves crowd together and the distances cannot all be right; in the hyperbolic plane the area
# grows like $e^r$, as the tree does, and trees embed with arbitrarily low distortion
# (Sarkar, 2011). This notebook embeds a tree of 31 nodes in the Poincaré disk with
# `geofunc.optim.radam`, compares with the Euclidean plane and with the Lorentz model, and
# draws the disk.
#
# The only geometry the optimizer sees is the space's `egrad_to_rgrad` (the Poincaré metric
# rescales the Euclidean gradient by $(1 - \|x\|^2)^2/4$), `inner`, `retract` (the exponential
# map) and `transport` (parallel transport of Adam's first moment).

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch.func import grad

import geofunc as gf
from geofunc import hyperbolic as hyp

torch.manual_seed(0)
F64 = torch.float64


def binary_tree(depth):
    """Parent of every node (node 0 is the root) and the matrix of tree distances."""
    n = 2 ** (depth + 1) - 1
    parent = [-1] + [(i - 1) // 2 for i in range(1, n)]
    D = torch.full((n, n), math.inf, dtype=F64)
    D.fill_diagonal_(0.0)
    for i in range(1, n):
        D[i, parent[i]] = D[parent[i], i] = 1.0
    for k in range(n):  # Floyd–Warshall
        D = torch.minimum(D, D[:, k : k + 1] + D[k : k + 1, :])
    return parent, D


parent, D = binary_tree(4)
n = len(parent)
I, J = torch.triu_indices(n, n, 1)
d_tree = D[I, J]
print(f"{n} nodes, {len(d_tree)} pairs, diameter {int(d_tree.max())}")

# %% [markdown]
# ## The loss and the optimizer
#
# We ask the embedding distances to equal the tree distances $d_T$ (relative stress), and
# measure the result by the mean **distortion** of the ratios (scale-free):
#
# $$\text{stress} = \operatorname{mean}_{i<j} \Big(\frac{d(x_i, x_j) - d_T(i, j)}{d_T(i, j)}\Big)^2, \qquad
# \text{distortion} = \operatorname{mean}_{i<j} \Big|\frac{r_{ij}}{\bar r} - 1\Big|, \quad r_{ij} = \frac{d(x_i, x_j)}{d_T(i, j)} .$$
#
# The stress is not convex, so we optimize 8 random starts at once: the constraint acts on the
# last dimension, and the leading dimensions (starts, nodes) are a batch of independent points.

# %%
def embed(space, steps=300, lr=0.3, starts=8, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = 0.3 * torch.randn(starts, n, dim, generator=g, dtype=F64)
    if space is None:  # the Euclidean plane: plain Adam (radam on unconstrained entries)
        constraints, params = {}, {"x": Z}
        dist = lambda x: torch.linalg.vector_norm(x[:, I] - x[:, J], dim=-1)  # noqa: E731
    else:
        constraints, params = {"x": space}, {"x": space.to_manifold(Z)}
        dist = lambda x: space.dist(x[:, I], x[:, J])  # noqa: E731

    def stress(x):  # one value per start
        return (((dist(x) - d_tree) / d_tree) ** 2).mean(-1)

    def loss(p):
        return stress(p["x"]).sum()

    opt = gf.optim.radam(constraints, lr=lr)
    state = opt.init(params)
    history = []
    for step in range(steps):
        params, state = opt.update(grad(loss)(params), state, params)
        if step % 10 == 9:
            history.append((step + 1, float(stress(params["x"]).min())))
    r = dist(params["x"]) / d_tree
    distortion = (r / r.mean(-1, keepdim=True) - 1).abs().mean(-1)
    best = int(distortion.argmin())
    return params["x"][best], float(distortion[best]), history


X_ball, dist_ball, hist_ball = embed(gf.PoincareBall())
X_plane, dist_plane, hist_plane = embed(None)
X_lorentz, dist_lorentz, hist_lorentz = embed(gf.Lorentz(), dim=3)
print(f"mean distortion: Poincaré disk {dist_ball:.3f}, Lorentz model {dist_lorentz:.3f}, Euclidean plane {dist_plane:.3f}")

# %% [markdown]
# Both hyperbolic models (isometric to each other: `lorentz_to_poincare` maps the second
# embedding into the disk) end well below the Euclidean plane; they follow different
# optimization paths (the coordinates, hence Adam's per-point step sizes, differ) and may
# stop in different local optima of the stress.

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for hist, style, label in ((hist_ball, "-", "Poincaré disk"), (hist_lorentz, "--", "Lorentz model"), (hist_plane, "-", "Euclidean plane")):
    ax.semilogy(*zip(*hist), style, label=label)
ax.set_xlabel("radam step")
ax.set_ylabel("relative stress (best start)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The picture
#
# Edges are drawn as hyperbolic geodesics, $t \mapsto \exp_x(t \log_x y)$: arcs of circles
# orthogonal to the boundary. All edges have (nearly) the same hyperbolic length, although
# they shrink in the Euclidean picture as they approach the boundary.

# %%
def draw(ax, X, title, hyperbolic=True):
    t = torch.linspace(0, 1, 30, dtype=F64)[:, None]
    for child in range(1, n):
        x, y = X[parent[child]], X[child]
        if hyperbolic:
            curve = hyp.expmap(x.expand(30, 2), t * hyp.logmap(x, y))
        else:
            curve = x + t * (y - x)
        ax.plot(curve[:, 0], curve[:, 1], color="0.5", lw=1)
    depth = [int(D[0, i]) for i in range(n)]
    ax.scatter(X[:, 0], X[:, 1], c=depth, cmap="viridis", s=30, zorder=3)
    if hyperbolic:
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="k", lw=1))
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.axis("off")


fig, axes = plt.subplots(1, 3, figsize=(12, 4))
draw(axes[0], X_ball, f"Poincaré disk (distortion {dist_ball:.3f})")
draw(axes[1], hyp.lorentz_to_poincare(X_lorentz), f"Lorentz model, mapped to the disk ({dist_lorentz:.3f})")
draw(axes[2], X_plane, f"Euclidean plane ({dist_plane:.3f})", hyperbolic=False)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Larger radii in float32
#
# Scaling the distances from the origin by 3 (Möbius scalar multiplication) pushes the leaves
# to within $10^{-5}$ of the boundary in $1 - \|x\|^2$. The distances computed in float32 from
# the float32 points are still those of the points (the formulas never subtract numbers of
# size 1), and gradients stay finite. geoopt keeps float32 points at a norm of at most
# $1 - 4\cdot 10^{-3}$ and would clamp these leaves.

# %%
X32 = hyp.project(hyp.mobius_scalar_mul(3.0, X_ball)).float()  # distances from the origin × 3
gaps = 1 - (X32.double() ** 2).sum(-1)
d32 = gf.PoincareBall().dist(X32[I], X32[J]).double()
d64 = gf.PoincareBall().dist(X32[I].double(), X32[J].double())
print(f"smallest gap 1 - ‖x‖² = {float(gaps.min()):.1e}")
print(f"largest relative error of float32 distances: {float(((d32 - d64).abs() / d64).max()):.1e}")
Xg = X32.clone().requires_grad_(True)
(gx,) = torch.autograd.grad(gf.PoincareBall().dist(Xg[I], Xg[J]).sum(), Xg)
print("finite gradients:", bool(torch.isfinite(gx).all()))
