# %% [markdown]
# # The functional layer: parameter pytrees, ensembles, two ways to optimize
#
# geofunc's spaces are pure functions of tensors. At the top level the same functions act on
# whole **parameter pytrees** (`dict(model.named_parameters())`), with a `constraints` dict
# naming the constrained entries. This notebook shows
#
# 1. a functional training loop with `torch.func.functional_call`,
# 2. the two routes to optimize on a manifold: **trivialization** (any `torch.optim` optimizer on
#    raw tensors, optionally `gf.rebase`) and **Riemannian optimizers** (`gf.optim`),
# 3. an **ensemble** of 8 constrained models trained at once under `torch.func.vmap`.

# %%
import torch
import matplotlib.pyplot as plt
from torch.func import functional_call, grad, grad_and_value, vmap, stack_module_state
import geofunc as gf

torch.set_num_threads(1)
torch.manual_seed(0)  # the nn.Linear layers below initialize their biases from the global generator
g = torch.Generator().manual_seed(0)

# A toy regression problem: y = sin of a random rotation of x.
x = torch.randn(256, 8, generator=g)
R = gf.SO().sample((8, 8), generator=g)
y = torch.sin(x @ R)[:, :4]

model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
constraints = {
    "0.weight": gf.Stiefel(),   # 16 x 8 frame with orthonormal columns
    "2.weight": gf.SO(),        # 16 x 16 rotation
    "4.weight": gf.Sphere(),    # every row of the 4 x 16 read-out has unit norm
}

# %% [markdown]
# ## Points, raw tensors and bases
#
# `gf.sample` replaces the constrained entries by random points (reproducibly, from `g`); the
# biases are passed through untouched (the very same tensors). `gf.from_manifold` gives raw
# tensors and the **bases** the charts are centred at: `bases` is a flat dict
# `{name: base}` of the constrained entries that have one (no `None` inside, so it goes through
# `vmap` as is).

# %%
params = gf.sample(constraints, {k: v.detach() for k, v in model.named_parameters()}, generator=g)
raw, bases = gf.from_manifold(constraints, params)
print({k: tuple(v.shape) for k, v in raw.items()})
print(list(bases))
print(gf.contains(constraints, params))

def loss_points(p, x, y):
    return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

def loss_raw(raw, bases, x, y):
    return loss_points(gf.to_manifold(constraints, raw, bases), x, y)

# %% [markdown]
# ## Route 1: trivialization with any PyTorch optimizer
#
# Optimize the raw tensors with `torch.optim.Adam`; `to_manifold` is differentiable, so the
# constraint holds at every step by construction. Every few steps, `gf.rebase` re-centres the
# charts at the current points (the points do not change, the raw tensors become zero): this is
# GeoTorch's *dynamic trivialization*. With plain SGD and a rebase after every step it is exactly
# Riemannian gradient descent.
#
# *Optimizer state across a rebase:* the raw tensors are coordinates of the chart, so after a
# rebase Adam's moments refer to the previous chart. For SO the raw coordinates are
# body-frame (Lie algebra) coordinates, so keeping the state is a transport by left
# translation and works well; for other spaces it is an approximation that is good when the
# steps between rebases are small. Rebase rarely (every 10–100 steps), or reset the state
# after a rebase, or use route 2, which transports its state exactly.

# %%
raw_t = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
bases_t = dict(bases)
opt = torch.optim.Adam(raw_t.values(), lr=1e-2)
history_triv = []
for step in range(300):
    opt.zero_grad()
    loss = loss_raw(raw_t, bases_t, x, y)
    loss.backward()
    opt.step()
    history_triv.append(loss.item())
    if step % 50 == 49:
        with torch.no_grad():
            new_raw, bases_t = gf.rebase(constraints, {k: v.detach() for k, v in raw_t.items()}, bases_t)
            for k, v in new_raw.items():
                raw_t[k].copy_(v)
p_triv = gf.to_manifold(constraints, {k: v.detach() for k, v in raw_t.items()}, bases_t)
print(f"loss {history_triv[-1]:.4f}", gf.contains(constraints, p_triv))

# %% [markdown]
# ## Route 2: Riemannian optimizers, pure `init`/`update`
#
# `gf.optim.radam` (and `rsgd`) act on the **points** and take **Euclidean gradients**: on
# constrained entries they project onto the tangent space, move with the space's retraction and
# transport their state to the new point; on the biases they are exactly `torch.optim.Adam`.
# The state is a plain pytree of tensors; `update` is a pure function (it runs under `vmap` and
# `torch.compile`).

# %%
opt = gf.optim.radam(constraints, lr=1e-2)
p = params
state = opt.init(p)
history_radam = []
for step in range(300):
    g_p, loss = grad_and_value(loss_points)(p, x, y)
    p, state = opt.update(g_p, state, p)
    history_radam.append(loss.item())
print(f"loss {history_radam[-1]:.4f}", gf.contains(constraints, p))

# %% [markdown]
# ## An ensemble of 8 models under `vmap`
#
# `torch.func.stack_module_state` stacks the parameters of K models along a new leading
# dimension. Spaces treat leading dimensions as a batch, so **one** call of `gf.sample` on the
# stacked parameters draws K independent points, and `gf.from_manifold` / `gf.to_manifold` work on
# the stack directly. The training step is written for one model and vmapped; the optimizer
# `update` is vmapped too.
#
# *Sampling K initial points.* Outside `vmap`, call `gf.sample(constraints, stacked,
# generator=g)`: reproducible from `g`, one independent point per model. Inside `vmap`
# (e.g. when initialization is part of a vmapped function) pass `randomness="different"` to
# `vmap`: a draw of one point's shape inside `vmap` is one draw of the stacked shape from the
# generator, so the result equals sampling outside with a generator in the same state. The
# default `randomness="error"` refuses random calls, and `randomness="same"` would give all K
# models the same point.

# %%
K = 8
models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)) for _ in range(K)]
stacked, _ = stack_module_state(models)
stacked = gf.sample(constraints, {k: v.detach() for k, v in stacked.items()}, generator=g)

inside = vmap(lambda q: gf.sample(constraints, q, generator=torch.Generator().manual_seed(1)), randomness="different")(stacked)
outside = gf.sample(constraints, stacked, generator=torch.Generator().manual_seed(1))
print("inside vmap == outside:", all(torch.equal(inside[k], outside[k]) for k in constraints))

opt = gf.optim.rsgd(constraints, lr=0.1, momentum=0.9)
state = vmap(opt.init)(stacked)

def step(p, state, x, y):
    g_p, loss = grad_and_value(loss_points)(p, x, y)
    p, state = opt.update(g_p, state, p)
    return p, state, loss

vstep = vmap(step, in_dims=(0, 0, None, None))
p_ens, history_ens = stacked, []
for _ in range(200):
    p_ens, state, losses = vstep(p_ens, state, x, y)
    history_ens.append(losses)
history_ens = torch.stack(history_ens)
print("final losses:", [f"{v:.3f}" for v in history_ens[-1].tolist()])
print("all on their spaces:", all(bool(v.all()) for v in gf.contains(constraints, p_ens).values()))

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(history_triv, label="Adam on raw + rebase (route 1)")
ax.plot(history_radam, label="gf.optim.radam (route 2)")
ax.plot(history_ens.numpy(), color="gray", alpha=0.3, lw=0.8)
ax.plot([], color="gray", alpha=0.5, label="ensemble of 8, rsgd under vmap")
ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.legend()
plt.show()
