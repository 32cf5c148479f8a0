# %% [markdown]
# # Quickstart
#
# geofunc puts constraints on tensors the way JAX libraries would: a **space** (a manifold,
# or a constraint set) is a small immutable object holding hyperparameters only, and
# everything it does is a pure function of tensors. This notebook shows
#
# 1. what a space is, and its three core maps `to_manifold`, `tangent` and `retract`, with a picture;
# 2. how to put constraints on the weights of an ordinary `torch.nn` model and train it with
#    **any** `torch.optim` optimizer;
# 3. the one-line `nn.Module` front end (`gf.nn.orthogonal`, as in GeoTorch).
#
# It runs in a few seconds on a CPU.

# %%
import matplotlib.pyplot as plt
import torch
from torch.func import functional_call

import geofunc as gf

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)  # every random draw in geofunc goes through a generator

# %% [markdown]
# ## 1. A space is a bag of hyperparameters
#
# `gf.Sphere(radius=1.0)` is the set of vectors of norm 1 (on the last dimension);
# `gf.SO()` the rotation matrices; `gf.Stiefel()` the matrices with orthonormal columns.
# Sizes are never given to the constructor: they are read from the tensors. Spaces are
# frozen dataclasses, so they are hashable and comparable (`torch.compile` treats them as
# constants, `vmap` never sees them).

# %%
S = gf.Sphere()
print(S, S == gf.Sphere(), hash(S) == hash(gf.Sphere()))

X = S.sample((400, 3), generator=g)  # a batch of 400 points, uniform on the sphere of R^3
print("shape", tuple(X.shape), "| all on the sphere:", bool(S.contains(X).all()))

# %% [markdown]
# ## 2. The three maps
#
# * `to_manifold(Z, base)` — the **trivialization**: any tensor `Z` of the point's shape to a
#   point, differentiably. For the sphere it is the exponential map at `base` (a point),
#   restricted to the tangent plane there; `base=None` is the first basis vector $e_1$.
#   `from_manifold(X)` inverts it: it returns `(Z, base)` with `to_manifold(Z, base) == X`.
# * `tangent(X, G)` — the orthogonal projection of an ambient vector `G` onto the tangent space
#   at `X` (for the sphere, $G - \langle G, X\rangle X$). Applied to a Euclidean gradient it
#   gives the Riemannian gradient.
# * `retract(X, V)` — a point of the space near `X + V` (first-order equal to it).
#
# The picture: the uniform sample, a base point, the curve `t ↦ to_manifold(t·v, base)` (a great
# circle: the chart maps straight lines through 0 to geodesics), an ambient vector `G`, its
# tangent projection `V`, and the retraction of `V`.

# %%
base = S.project(torch.tensor([0.3, -0.4, 0.85]))  # the nearest point of the sphere
G = torch.tensor([0.9, 0.6, 0.8])  # an arbitrary ambient vector
V = S.tangent(base, G)
print("<V, base> =", float(V @ base), "(tangent: orthogonal to the point)")

Z, b = S.from_manifold(base)
print("from_manifold(base): Z =", Z.tolist(), "; round trip error",
      float((S.to_manifold(Z, b) - base).norm()))

t = torch.linspace(0, 6.3, 200)[:, None]
curve = S.to_manifold(t * V / V.norm(), base)  # a batch of raw tensors, one per t
X2 = S.retract(base, V)

fig = plt.figure(figsize=(5.5, 5.5))
ax = fig.add_subplot(projection="3d")
ax.scatter(*X.T, s=3, alpha=0.35, label="S.sample((400, 3))")
ax.plot(*curve.T, color="C2", label="to_manifold(t·v, base)")
ax.quiver(*base, *(G - base * 0), color="gray", label="ambient G")
ax.quiver(*base, *V, color="C3", label="tangent(base, G)")
ax.scatter(*base[:, None], color="k", s=40, label="base")
ax.scatter(*X2[:, None], color="C3", s=40, marker="*", label="retract(base, V)")
ax.set_box_aspect((1, 1, 1))
ax.legend(loc="upper left", fontsize=7)
plt.show()

# %% [markdown]
# Everything works on a batch (leading dimensions), and under `torch.func` transforms. For
# instance the Jacobian of the chart at `Z = 0` is the projection onto the tangent plane at
# the base, and the chart has unit speed:

# %%
J = torch.func.jacrev(S.to_manifold)(torch.zeros(3), base)
print("jacobian at 0 == I - base baseᵀ:", torch.allclose(J, torch.eye(3) - torch.outer(base, base), atol=1e-6))

# %% [markdown]
# ## 3. Constraints on a model, any optimizer
#
# A model is an ordinary `torch.nn.Module`. A **constraints** dict maps parameter names to
# spaces; the functions of the same names at the top level (`gf.sample`, `gf.from_manifold`,
# `gf.to_manifold`, `gf.rebase`, `gf.tangent`, `gf.retract`, `gf.contains`) act on the whole
# parameter dict and pass unconstrained entries through.
#
# The recipe:
#
# 1. `params = gf.sample(constraints, dict(model.named_parameters()), generator=g)`: a starting
#    point (random points for the constrained entries, the module's values for the others);
# 2. `raw, bases = gf.from_manifold(constraints, params)`: unconstrained tensors to optimize, and
#    the points the charts are centred at;
# 3. in the loss, `gf.to_manifold(constraints, raw, bases)` gives the weights, and
#    `torch.func.functional_call` runs the model with them.
#
# The task: recover a rotation $Q \in SO(16)$ from noisy pairs $y = Qx + \varepsilon$. The
# first layer's weight lives on `SO`; the bias of the second layer is unconstrained.

# %%
n = 16
Q = gf.SO().sample((n, n), generator=g)
x = torch.randn(512, n, generator=g)
y = x @ Q.T + 0.01 * torch.randn(512, n, generator=g)

model = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False), torch.nn.Linear(n, n))
with torch.no_grad():  # make the second layer the identity so the first must learn Q
    model[1].weight.copy_(torch.eye(n))
    model[1].bias.zero_()
constraints = {"0.weight": gf.SO()}
params = gf.sample(constraints, {k: v.detach() for k, v in model.named_parameters()}, generator=g)
raw, bases = gf.from_manifold(constraints, params)
raw = {k: v.clone().requires_grad_(k != "1.weight") for k, v in raw.items()}  # freeze layer 1's weight


def loss_fn(raw, x, y):
    p = gf.to_manifold(constraints, raw, bases)
    return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)


opt = torch.optim.Adam([v for v in raw.values() if v.requires_grad], lr=0.1)  # any torch optimizer
losses, orth_errors = [], []
for step in range(300):
    opt.zero_grad()
    loss = loss_fn(raw, x, y)
    loss.backward()
    opt.step()
    with torch.no_grad():
        W = gf.to_manifold(constraints, raw, bases)["0.weight"]
        losses.append(loss.item())
        orth_errors.append((W.T @ W - torch.eye(n)).abs().max().item())

print(f"final loss {losses[-1]:.2e};  ‖W − Q‖ = {(W - Q).norm():.2e};  max|WᵀW − I| = {orth_errors[-1]:.1e}")
print("contains:", gf.contains(constraints, gf.to_manifold(constraints, raw, bases)))

fig, axs = plt.subplots(1, 2, figsize=(10, 3.2))
axs[0].semilogy(losses)
axs[0].set(title="training loss (Adam on the raw tensors)", xlabel="step")
axs[1].semilogy(orth_errors, color="C1")
axs[1].set(title="max |WᵀW − I| (float32)", xlabel="step", ylim=(1e-9, 1e-3))
plt.tight_layout()
plt.show()

# %% [markdown]
# The weight is orthogonal to float32 rounding at every step, whatever the optimizer does to
# the raw tensor: the constraint holds by construction, not by projection.
#
# **Re-centring (dynamic trivialization).** The chart is centred at `bases`; far from it the
# chart gets distorted. `gf.rebase(constraints, raw, bases)` returns the same point in a chart
# centred at the current point (raw = 0 for `SO`). Calling it every step with SGD is Riemannian
# gradient descent. See the *trivializations* notebook.

# %%
raw2, bases2 = gf.rebase(constraints, {k: v.detach() for k, v in raw.items()}, bases)
same = torch.allclose(gf.to_manifold(constraints, raw2, bases2)["0.weight"], W, atol=1e-5)
print("same point after rebase:", same, "| raw is now zero:", bool((raw2["0.weight"] == 0).all()))

# %% [markdown]
# ## 4. The `nn.Module` front end
#
# If you prefer GeoTorch's style, `gf.nn` registers the same spaces as
# `torch.nn.utils.parametrize` parametrizations: one line per constraint, and the module
# trains with any optimizer as usual.
#
# As in GeoTorch, `orthogonal` on a square weight is the whole orthogonal group $O(n)$
# (`Stiefel`): its random initial point is a rotation (determinant $+1$, as GeoTorch's), but
# any orthogonal matrix can be assigned, a reflection too, and the chart never leaves the
# component of its base, so from a reflection it could never reach our target $Q \in SO(n)$.
# Assigning a rotation fixes the component (the assignment goes through `from_manifold`, which
# re-centres the chart there); alternatively, `gf.nn.constrain(layer, "weight", gf.SO())`
# constrains to rotations from the start.

# %%
torch.manual_seed(0)
layer = torch.nn.Linear(n, n, bias=False)
gf.nn.orthogonal(layer, "weight")  # a random rotation; any orthogonal matrix may be assigned
layer.weight = torch.eye(n)  # start at a rotation, in the component of Q
opt = torch.optim.Adam(layer.parameters(), lr=0.1)
for step in range(150):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(layer(x), y)
    loss.backward()
    opt.step()
W = layer.weight.detach()
print(f"loss {loss.item():.2e}; max|WᵀW − I| = {(W.T @ W - torch.eye(n)).abs().max():.1e}; det W = {torch.linalg.det(W):+.3f}")

# %% [markdown]
# ## Where next
#
# * **trivializations** — how `to_manifold` works, static vs dynamic charts, `expm` vs `cayley`,
#   Riemannian optimizers (`gf.optim.rsgd`, `gf.optim.radam`);
# * **ensembles** — many constrained models trained at once under `vmap`;
# * **meta_learning** — MAML with an orthogonal layer: `vmap` over tasks and `grad` of `grad`;
# * **normalizing_flow** — exact `log|det W|` for invertible layers;
# * **functional_layer** — moving between `gf.nn` modules and the functional API.
