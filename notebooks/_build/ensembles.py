# %% [markdown]
# # Ensembles: K constrained models trained at once under `vmap`
#
# A deep ensemble trains K copies of a model from different initializations and averages
# them; the spread of their predictions is a cheap uncertainty estimate. With stateful
# parametrizations (GeoTorch) this means a Python loop over K modules. In geofunc a constraint
# is a pure function, so the K models can be *stacked* (`torch.func.stack_module_state`) and
# one training step written for a single model runs on all of them with `torch.func.vmap`:
# one batched kernel per operation instead of K small ones.
#
# Here: K small MLPs, each with an orthogonal hidden layer, trained with Riemannian Adam
# (`gf.optim.radam`) on a 1-D regression problem; vmapped training against a loop, for time
# and result.

# %%
import copy
import time

import matplotlib.pyplot as plt
import optree
import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import geofunc as gf

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)

# %% [markdown]
# ## Data and model
#
# Noisy samples of $\sin(2x)$ on two intervals, with a gap in the middle where the models
# should disagree.

# %%
x = torch.cat([torch.rand(40, 1, generator=g) * 2.5 - 3.0, torch.rand(40, 1, generator=g) * 2.5 + 0.5])
y = torch.sin(2 * x) + 0.1 * torch.randn(x.shape, generator=g)
grid = torch.linspace(-3.5, 3.5, 200)[:, None]

H = 32


def make_model():
    return torch.nn.Sequential(
        torch.nn.Linear(1, H), torch.nn.Tanh(), torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, 1)
    )


constraints = {"2.weight": gf.SO()}  # the hidden H×H layer is a rotation

K = 16
models = [make_model() for _ in range(K)]
stacked, _ = stack_module_state(models)  # each tensor gets a leading dimension K
stacked = {k: v.detach() for k, v in stacked.items()}
skeleton = copy.deepcopy(models[0]).to("meta")  # the architecture only, no data
params = gf.sample(constraints, stacked, generator=g)  # K independent random rotations in one call
print({k: tuple(v.shape) for k, v in params.items()})

# %% [markdown]
# ## One training step, for one model
#
# Written for a single model (unbatched tensors): Euclidean gradients by `torch.func`, then a
# Riemannian Adam step on the points. `vmap` turns it into a step for the whole ensemble.

# %%
opt = gf.optim.radam(constraints, lr=0.02)


def loss_fn(p, x, y):
    return torch.nn.functional.mse_loss(functional_call(skeleton, p, (x,)), y)


def train_step(p, state, x, y):
    grads, loss = grad_and_value(loss_fn)(p, x, y)
    p, state = opt.update(grads, state, p)
    return p, state, loss


ensemble_step = vmap(train_step, in_dims=(0, 0, None, None))  # same data, K models
loop_step = lambda p, state, x, y: optree.tree_map(  # noqa: E731
    lambda *ts: torch.stack(ts), *[train_step(*optree.tree_map(lambda t: t[i], (p, state)), x, y) for i in range(K)]
)


def train(step, params, steps):
    """``steps`` steps of ``step``; returns the points, the losses and the median time per step."""
    state = vmap(opt.init)(params)
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, loss = step(params, state, x, y)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return params, torch.stack(losses), sorted(times)[len(times) // 2]


# %% [markdown]
# ## vmap versus a loop
#
# Both ways for 15 steps from the same starting points: the loop runs the unbatched step
# once per model. We report the median time of one ensemble step (the first steps include
# one-off tracing costs; the machine may be busy).

# %%
STEPS = 15
p_vmap, _, t_vmap = train(ensemble_step, params, STEPS)
p_loop, _, t_loop = train(loop_step, params, STEPS)
diff = max((a - b).abs().max().item() for a, b in zip(optree.tree_leaves(p_vmap), optree.tree_leaves(p_loop)))
print(f"one step of {K} models: vmap {1e3 * t_vmap:.1f} ms, loop {1e3 * t_loop:.1f} ms (speed-up ×{t_loop / t_vmap:.1f})")
print(f"largest difference between the two after {STEPS} steps: {diff:.1e}")

# %% [markdown]
# The same numbers (up to float32 rounding of batched versus unbatched kernels), and faster:
# the loop pays the Python and kernel-launch overhead K times per step. The gap grows with K,
# and on a GPU.
#
# ## Train the ensemble

# %%
t0 = time.perf_counter()
p_vmap, losses_vmap, _ = train(ensemble_step, params, 600)
print(f"{K} models × 600 steps under vmap: {time.perf_counter() - t0:.1f} s")
W = p_vmap["2.weight"]
print(f"every hidden layer orthogonal: max|WᵀW − I| = {(W.mT @ W - torch.eye(H)).abs().max():.1e};",
      "contains:", bool(gf.contains(constraints, p_vmap)["2.weight"].all()))

# %% [markdown]
# ## The ensemble's prediction

# %%
preds = vmap(functional_call, in_dims=(None, 0, None))(skeleton, p_vmap, (grid,)).squeeze(-1)  # (K, 200)
mean, std = preds.mean(0), preds.std(0)

fig, axs = plt.subplots(1, 3, figsize=(14, 3.5))
axs[0].semilogy(losses_vmap.detach(), lw=0.8, alpha=0.7)
axs[0].set(title=f"training loss of the {K} models", xlabel="step")
for j in range(K):
    axs[1].plot(grid, preds[j].detach(), lw=0.7, alpha=0.6)
axs[1].scatter(x, y, s=8, c="k", zorder=3)
axs[1].set(title="each model", ylim=(-2.5, 2.5))
axs[2].plot(grid, mean.detach(), c="C0", label="ensemble mean")
axs[2].fill_between(grid[:, 0], (mean - 2 * std).detach(), (mean + 2 * std).detach(), alpha=0.3, label="± 2 std")
axs[2].plot(grid, torch.sin(2 * grid), "k:", label="sin(2x)")
axs[2].scatter(x, y, s=8, c="k", zorder=3)
axs[2].set(title="ensemble", ylim=(-2.5, 2.5))
axs[2].legend(fontsize=8)
plt.tight_layout()
plt.show()

fig, ax = plt.subplots(figsize=(4, 2.5))
ax.barh(["loop", "vmap"], [1e3 * t_loop, 1e3 * t_vmap], color=["C1", "C0"])
ax.set(xlabel="milliseconds", title=f"one training step of {K} models")
plt.tight_layout()
plt.show()

# %% [markdown]
# The spread of the members (the shaded band) is the ensemble's uncertainty estimate; it is
# widest away from the data, at the ends of the interval.
#
# ## Notes
#
# * `gf.sample(constraints, stacked, generator=g)` draws the K points in one call: leading
#   dimensions are a batch for every space. Inside `vmap`, use `randomness="different"` to
#   draw per model.
# * The same pattern works with raw tensors and any optimizer written functionally:
#   `gf.from_manifold(constraints, stacked)` gives stacked raw tensors and bases, and
#   `vmap(grad(loss))(raw, bases, ...)` gives per-model gradients.
# * `gf.nn` modules: `gf.nn.stack` stacks several constrained modules for this kind of
#   training (see the *functional_layer* notebook).
