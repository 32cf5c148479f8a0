"""The copying problem with an orthogonal RNN (ExpRNN: the recurrent kernel lives on SO(n)).

Task (Hochreiter & Schmidhuber; Arjovsky et al.): the input is 10 symbols drawn from
{1..8}, then ``L`` blanks (0), a marker (9) and 9 more blanks; the target is ``L + 10``
blanks followed by the 10 symbols. A network that ignores the symbols can only output
blanks and guess, with cross-entropy ``10·ln 8 / (L + 20)`` per step: the memoryless
baseline. Beating it requires carrying the symbols across ``L`` steps, which an
orthogonal recurrent kernel (norm preserving, no exploding/vanishing gradients) does.

The model is ExpRNN (Lezcano-Casado & Martínez-Rubio, 2019): ``h ← modReLU(W h + U x)``
with ``W = SO().to_manifold(Z, base)``, the matrix exponential of a skew matrix built from
the raw parameter ``Z``, centred at ``base``. ``W`` is computed once per batch, outside
the time loop (what ``cached()`` does in GeoTorch). ``base`` starts at a random block
diagonal rotation (Henaff initialization). With ``--rgd`` the optimizer is SGD with a
``rebase`` after every step, i.e. Riemannian gradient descent.

Run:    python examples/copying_problem.py                       # L = 100: about 1.5 minutes on one CPU core
        python examples/copying_problem.py --L 1000 --hidden 190 --iters 4000 --batch 128   # paper size
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from tqdm import tqdm

import geofunc as gf

N_SYMBOLS = 10  # symbols to copy
N_CLASSES = 9  # outputs: blank (0) and the symbols 1..8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--L", type=int, default=100, help="number of blanks between the symbols and the marker (paper: 1000)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (paper: 190)")
    p.add_argument("--iters", type=int, default=500, help="training iterations (paper: 4000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the unconstrained parameters")
    p.add_argument("--lr-orth", type=float, default=2e-4, help="learning rate of the raw orthogonal parameter")
    p.add_argument("--triv", choices=["expm", "cayley"], default="expm")
    p.add_argument("--rgd", action="store_true", help="SGD + rebase after every step (Riemannian gradient descent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def copy_batch(batch: int, L: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(L + 20, batch)`` and targets ``(L + 20, batch)`` of the copy task, as class indices."""
    symbols = torch.randint(1, 9, (N_SYMBOLS, batch), generator=generator)
    blanks = torch.zeros(L, batch, dtype=torch.long)
    marker = torch.full((1, batch), 9, dtype=torch.long)
    tail = torch.zeros(N_SYMBOLS - 1, batch, dtype=torch.long)
    x = torch.cat([symbols, blanks, marker, tail])
    y = torch.cat([torch.zeros(L + N_SYMBOLS, batch, dtype=torch.long), symbols])
    return x, y


def henaff_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """Block-diagonal rotation with angles ~ U(-π, π): the Henaff initialization of ExpRNN."""
    theta = (torch.rand(n // 2, generator=generator) * 2 - 1) * math.pi
    W = torch.eye(n)
    c, s = torch.cos(theta), torch.sin(theta)
    i = torch.arange(0, 2 * (n // 2), 2)
    W[i, i], W[i + 1, i + 1], W[i, i + 1], W[i + 1, i] = c, c, -s, s
    return W


class ModReLU(nn.Module):
    """``sign(z)·relu(|z| + b)``, the nonlinearity of unitary/orthogonal RNNs."""

    def __init__(self, n: int, generator: torch.Generator):
        super().__init__()
        self.b = nn.Parameter((torch.rand(n, generator=generator) * 2 - 1) * 0.01)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.b)


class ExpRNN(nn.Module):
    def __init__(self, hidden: int, triv: str, generator: torch.Generator):
        super().__init__()
        self.space = gf.SO(triv=triv)
        self.embed = nn.Linear(N_SYMBOLS, hidden)
        nn.init.kaiming_normal_(self.embed.weight, nonlinearity="relu", generator=generator)
        Z, base = self.space.from_manifold(henaff_rotation(hidden, generator))
        self.Z = nn.Parameter(Z)  # raw, unconstrained: any optimizer can update it
        self.register_buffer("base", base)  # the point the chart is centred at
        self.act = ModReLU(hidden, generator)
        self.readout = nn.Linear(hidden, N_CLASSES)

    def kernel(self) -> torch.Tensor:
        return self.space.to_manifold(self.Z, self.base)

    @torch.no_grad()
    def rebase(self) -> None:
        Z, base = self.space.rebase(self.Z, self.base)
        self.Z.copy_(Z)
        self.base.copy_(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.kernel()  # once per sequence, not once per step
        inputs = self.embed(nn.functional.one_hot(x, N_SYMBOLS).float())  # (T, B, H)
        h = inputs.new_zeros(inputs.shape[1:])
        outs = []
        for u in inputs:
            h = self.act(h @ W.T + u)
            outs.append(h)
        return self.readout(torch.stack(outs))  # (T, B, classes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = ExpRNN(args.hidden, args.triv, g)
    others = [p for name, p in model.named_parameters() if name != "Z"]
    if args.rgd:
        opt = torch.optim.SGD([{"params": others}, {"params": [model.Z], "lr": args.lr_orth}], lr=args.lr)
    else:
        opt = torch.optim.Adam(
            [{"params": others}, {"params": [model.Z], "lr": args.lr_orth, "betas": (0.9, 0.95)}], lr=args.lr
        )
    T = args.L + 2 * N_SYMBOLS
    baseline = N_SYMBOLS * math.log(8) / T
    print(f"copying problem: L = {args.L}, sequence length {T}, memoryless baseline loss {baseline:.4f}")

    t0 = time.perf_counter()
    best = float("inf")
    losses = []
    bar = tqdm(range(1, args.iters + 1), desc="training", unit="it")
    for it in bar:
        x, y = copy_batch(args.batch, args.L, g)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.rgd:
            model.rebase()
        losses.append(loss.item())
        recent = sum(losses[-20:]) / len(losses[-20:])
        best = min(best, recent)
        acc = (logits[-N_SYMBOLS:].argmax(-1) == y[-N_SYMBOLS:]).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.4f}", baseline=f"{baseline:.4f}", copy_acc=f"{acc:.2f}")
    bar.close()
    elapsed = time.perf_counter() - t0

    with torch.no_grad():
        W = model.kernel()
        orth_err = (W.T @ W - torch.eye(args.hidden)).abs().max().item()
        x, y = copy_batch(1000, args.L, g)
        logits = model(x)
        test_loss = nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES), y.reshape(-1)).item()
        test_acc = (logits[-N_SYMBOLS:].argmax(-1) == y[-N_SYMBOLS:]).float().mean().item()

    print("\n== copying_problem.py report ==")
    print(f"ExpRNN hidden {args.hidden}, triv {args.triv}, {'RGD (SGD + rebase)' if args.rgd else 'Adam'}, "
          f"{args.iters} iterations of batch {args.batch} in {elapsed:.1f} s")
    print(f"memoryless baseline loss  {baseline:.4f}")
    print(f"final loss (last 20 its) {sum(losses[-20:]) / len(losses[-20:]):.4f}   best 20-it mean {best:.4f}")
    print(f"held-out loss             {test_loss:.4f}   symbol accuracy {test_acc:.3f} (chance 0.125)")
    print(f"recurrent kernel: max|WᵀW − I| = {orth_err:.1e}")
    beat = test_loss < baseline
    print("beats the memoryless baseline: " + ("yes" if beat else "not yet (train longer: --iters)"))
    return {"baseline": baseline, "test_loss": test_loss, "test_acc": test_acc, "orth_err": orth_err}


if __name__ == "__main__":
    main()
