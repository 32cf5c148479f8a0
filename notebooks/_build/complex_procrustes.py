# %% [markdown]
# # Unitary Procrustes: optimizing over complex matrices
#
# Given complex matrices $A$ and $B$, find the unitary matrix that best maps one onto the other:
#
# $$\min_{U \in U(n)} \|UA - B\|_F^2 = \|A\|^2 + \|B\|^2 - 2\,\operatorname{Re}\operatorname{tr}(U^H B A^H).$$
#
# Its solution is closed-form: with the SVD $BA^H = W\Sigma V^H$, $U^\star = WV^H$ and the
# minimum is $\|A\|^2 + \|B\|^2 - 2\sum_i \sigma_i$. That makes it a clean test of Riemannian
# optimization on complex spaces. This notebook solves it with `geofunc.optim.rsgd` and
# `geofunc.optim.radam` on `gf.Unitary()`, then on the complex Stiefel manifold (a $n\times k$
# frame, $U^H U = I_k$), then for a batch of problems at once under `torch.func.vmap`.
#
# A complex space is the real manifold of its points, with the metric
# $\langle U, V\rangle = \operatorname{Re}\operatorname{tr}(U^H V)$. For a real loss, torch's
# gradient in a complex tensor is $\partial L/\partial X + i\,\partial L/\partial Y$, the gradient
# for that metric, so the optimizers use it as they use a real one.

# %%
import matplotlib.pyplot as plt
import torch
from torch.func import grad, vmap

import geofunc as gf

torch.manual_seed(0)
C128 = torch.complex128
g = torch.Generator().manual_seed(0)

n = 6
A = torch.randn(n, 10, generator=g, dtype=C128)
B = torch.randn(n, 10, generator=g, dtype=C128)
W, S, Vh = torch.linalg.svd(B @ A.mH)
U_star = W @ Vh
best = (A.abs() ** 2).sum() + (B.abs() ** 2).sum() - 2 * S.sum()
print(f"closed-form minimum {best.item():.6f}; U* unitary: {bool(gf.Unitary().contains(U_star))}")

# %% [markdown]
# ## On U(n)
#
# The parameters are points; `opt.update` takes torch's (Euclidean) gradient, turns it into the
# Riemannian one with the space's `egrad_to_rgrad` ($X\,\mathrm{skew}(X^H G)$), steps along the
# retraction $X\exp(\mathrm{skew}(X^H V))$ and transports the optimizer state.

# %%
def loss(p):
    return (p["U"] @ A - B).abs().pow(2).sum()


def solve(space, opt, shape, steps=400, seed=1):
    c = {"U": space}
    p = gf.sample(c, {"U": torch.empty(shape, dtype=C128)}, generator=torch.Generator().manual_seed(seed))
    state = opt(c).init(p)
    gaps = []
    for _ in range(steps):
        p, state = opt(c).update(grad(loss)(p), state, p)
        gaps.append((loss(p) - best).item())
    return p["U"], gaps


optimizers = {
    "rsgd (momentum 0.9)": lambda c: gf.optim.rsgd(c, lr=0.01, momentum=0.9),
    "radam": lambda c: gf.optim.radam(c, lr=0.1, betas=(0.9, 0.99)),
}
runs = {name: solve(gf.Unitary(), opt, (n, n)) for name, opt in optimizers.items()}
for name, (U, gaps) in runs.items():
    print(f"{name:20s} gap {gaps[-1]:.2e}   ‖U − U*‖ = {torch.linalg.matrix_norm(U - U_star):.2e}   "
          f"‖UᴴU − I‖ = {torch.linalg.matrix_norm(U.mH @ U - torch.eye(n, dtype=C128)):.1e}")

# %% [markdown]
# The left panel shows the gap to the closed-form minimum; the right one the eigenvalues of the
# solution, which lie on the unit circle (a unitary matrix is $e^{A}$ with $A$ skew-Hermitian,
# eigenvalues $e^{i\theta}$), against those of $U^\star$.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
for name, (_, gaps) in runs.items():
    ax1.semilogy([max(v, 1e-16) for v in gaps], label=name)
ax1.set_xlabel("step")
ax1.set_ylabel("loss − minimum")
ax1.set_title("Unitary Procrustes on U(6)")
ax1.legend()
t = torch.linspace(0, 2 * torch.pi, 200)
ax2.plot(torch.cos(t), torch.sin(t), color="0.8")
ev_star = torch.linalg.eigvals(U_star)
ev = torch.linalg.eigvals(runs["radam"][0])
ax2.scatter(ev_star.real, ev_star.imag, s=120, facecolors="none", edgecolors="k", label="U*")
ax2.scatter(ev.real, ev.imag, s=20, color="C1", label="radam")
ax2.set_aspect("equal")
ax2.set_title("eigenvalues")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On the complex Stiefel manifold
#
# With $U$ an $n\times k$ frame ($U^H U = I_k$) and $A$ now $k \times m$, the minimiser is the
# polar factor of $BA^H$ ($n \times k$): `gf.Stiefel()` takes complex tensors with the same
# maps, $^\top$ read as $^H$.

# %%
k = 3
A = torch.randn(k, 10, generator=g, dtype=C128)
best = (A.abs() ** 2).sum() + (B.abs() ** 2).sum() - 2 * torch.linalg.svdvals(B @ A.mH).sum()
U_star = gf.Stiefel().project(B @ A.mH)  # the polar factor: the nearest frame
U, gaps = solve(gf.Stiefel(), optimizers["radam"], (n, k))
print(f"gap {gaps[-1]:.2e}, ‖U − U*‖ = {torch.linalg.matrix_norm(U - U_star):.2e}")

# %% [markdown]
# ## A batch of problems under vmap
#
# Everything is a pure function of tensors, so a batch of 16 independent problems is one
# `vmap` of the whole optimization step (no Python loop over problems).

# %%
As = torch.randn(16, n, 10, generator=g, dtype=C128)
Bs = torch.randn(16, n, 10, generator=g, dtype=C128)
c = {"U": gf.Unitary()}
opt = gf.optim.rsgd(c, lr=0.01, momentum=0.9)


def step(p, state, A, B):
    G = grad(lambda p: (p["U"] @ A - B).abs().pow(2).sum())(p)
    return opt.update(G, state, p)


p = {"U": gf.Unitary().sample((16, n, n), generator=g, dtype=C128)}
state = vmap(opt.init)(p)
for _ in range(400):
    p, state = vmap(step)(p, state, As, Bs)
Ws, _, Vhs = torch.linalg.svd(Bs @ As.mH)
err = torch.linalg.matrix_norm(p["U"] - Ws @ Vhs)
print(f"16 problems: max ‖U − U*‖ = {err.max():.2e}")
