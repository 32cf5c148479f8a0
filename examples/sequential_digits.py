"""Pixel-by-pixel digit classification with an orthogonal (or almost orthogonal) RNN.

Each 8×8 image of scikit-learn's digits data set (shipped with scikit-learn, nothing is
downloaded) is read one pixel per step, 64 steps, and classified from the last hidden
state: a small version of sequential MNIST (Le et al. 2015; Arjovsky et al. 2016). The
recurrent kernel is constrained by geofunc:

* ``--constraint orthogonal``: ``W = SO(triv).to_manifold(Z, base)`` (ExpRNN);
* ``--constraint almost-orthogonal``: ``W = AlmostOrthogonal(lam).to_manifold(Z, base)``,
  singular values in ``[1 - lam, 1 + lam]``.

The raw parameter ``Z`` is an ordinary ``nn.Parameter`` updated by RMSprop (as in GeoTorch's
sequential MNIST example) with its own learning rate; ``--rebase-every k`` re-centres the
chart every ``k`` steps (a dynamic trivialization). ``--mnist DIR`` uses torchvision's MNIST
(784 steps) if it is already in ``DIR``; it is never downloaded.

Run:    python examples/sequential_digits.py
        python examples/sequential_digits.py --constraint almost-orthogonal --lam 0.3
        python examples/sequential_digits.py --mnist ./mnist --hidden 170 --epochs 70 --permute
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

import geofunc as gf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--constraint", choices=["orthogonal", "almost-orthogonal"], default="orthogonal")
    p.add_argument("--lam", type=float, default=0.2, help="almost-orthogonal: singular values in [1-lam, 1+lam]")
    p.add_argument("--triv", choices=["expm", "cayley"], default="expm")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the unconstrained parameters")
    p.add_argument("--lr-orth", type=float, default=2e-4, help="learning rate of the raw recurrent parameter")
    p.add_argument("--rebase-every", type=int, default=0, help="re-centre the chart every k steps (0: never)")
    p.add_argument("--permute", action="store_true", help="a fixed random permutation of the pixels")
    p.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke tests)")
    p.add_argument("--mnist", metavar="DIR", default=None, help="torchvision MNIST already present in DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8×8 digits as ``(N, 64)`` in [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_test = len(X) // 5
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]


def load_mnist(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from torchvision import datasets
    except ImportError:
        raise SystemExit("--mnist needs torchvision (pip install torchvision); the default data needs nothing") from None
    try:
        tr = datasets.MNIST(root, train=True, download=False)
        te = datasets.MNIST(root, train=False, download=False)
    except RuntimeError as exc:
        raise SystemExit(f"MNIST not found in {root!r} (this example never downloads): {exc}") from None
    f = lambda d: (d.data.reshape(len(d.data), -1).float() / 255.0, d.targets.long())  # noqa: E731
    return (*f(tr), *f(te))


class ModReLU(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.b = nn.Parameter(torch.empty(n).uniform_(-0.01, 0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.b)


class ConstrainedRNN(nn.Module):
    """``h ← modReLU(W h + U x)``, ``W = space.to_manifold(Z, base)``; logits from the last ``h``."""

    def __init__(self, space: gf.AbstractSpace, hidden: int, n_classes: int = 10):
        super().__init__()
        self.space = space
        self.inp = nn.Linear(1, hidden)
        # Start at a random rotation; Z = raw parameter, base = the point the chart is centred at
        # (a tensor, or a tuple of tensors for AlmostOrthogonal).
        Z, base = space.from_manifold(gf.SO().sample((hidden, hidden)))
        self.Z = nn.Parameter(Z)
        self.n_base = len(base) if isinstance(base, tuple) else None
        for i, b in enumerate(base if isinstance(base, tuple) else (base,)):
            # Buffers, so that state_dict saves the base and .to() moves it: Z means nothing
            # without the base it is read from (a plain attribute reloads another kernel).
            self.register_buffer(f"base{i}", b)
        self.act = ModReLU(hidden)
        self.out = nn.Linear(hidden, n_classes)

    @property
    def base(self):
        if self.n_base is None:
            return self.base0
        return tuple(getattr(self, f"base{i}") for i in range(self.n_base))

    def kernel(self) -> torch.Tensor:
        return self.space.to_manifold(self.Z, self.base)

    @torch.no_grad()
    def rebase(self) -> None:
        Z, base = self.space.rebase(self.Z, self.base)
        self.Z.copy_(Z)
        for i, b in enumerate(base if isinstance(base, tuple) else (base,)):
            setattr(self, f"base{i}", b)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, classes)
        W = self.kernel()  # computed once per batch, outside the time loop
        U = self.inp(pixels.unsqueeze(-1))  # (B, T, H)
        h = U.new_zeros(U.shape[0], U.shape[2])
        for t in range(U.shape[1]):
            h = self.act(h @ W.T + U[:, t])
        return self.out(h)


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(X), batch):
            logits = model(X[i : i + batch])
            loss += nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i : i + batch]).sum().item()
    return loss / len(X), correct / len(X)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Xtr, ytr, Xte, yte = load_mnist(args.mnist) if args.mnist else load_digits(args.seed)
    if args.limit:
        Xtr, ytr = Xtr[: args.limit], ytr[: args.limit]
    if args.permute:
        perm = torch.randperm(Xtr.shape[1], generator=torch.Generator().manual_seed(args.seed))
        Xtr, Xte = Xtr[:, perm], Xte[:, perm]

    if args.constraint == "orthogonal":
        space = gf.SO(triv=args.triv)
    else:
        space = gf.AlmostOrthogonal(lam=args.lam, triv=args.triv)
    model = ConstrainedRNN(space, args.hidden)
    others = [p for name, p in model.named_parameters() if name != "Z"]
    opt = torch.optim.RMSprop([{"params": others}, {"params": [model.Z], "lr": args.lr_orth}], lr=args.lr)
    print(f"{len(Xtr)} training / {len(Xte)} test sequences of {Xtr.shape[1]} steps; recurrent kernel on {space!r}")

    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.perf_counter(), 0
    best = 0.0
    bar = tqdm(range(1, args.epochs + 1), desc="epochs", unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), args.batch):
            idx = perm[i : i + args.batch]
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(others, 5.0)
            opt.step()
            step += 1
            if args.rebase_every and step % args.rebase_every == 0:
                model.rebase()
        test_loss, test_acc = evaluate(model, Xte, yte)
        best = max(best, test_acc)
        bar.set_postfix(train_loss=f"{loss.item():.3f}", test_loss=f"{test_loss:.3f}", test_acc=f"{test_acc:.3f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    train_loss, train_acc = evaluate(model, Xtr, ytr)
    test_loss, test_acc = evaluate(model, Xte, yte)
    with torch.no_grad():
        sv = torch.linalg.svdvals(model.kernel())

    print("\n== sequential_digits.py report ==")
    print(f"{args.constraint} RNN, hidden {args.hidden}, {args.epochs} epochs ({step} steps) in {elapsed:.1f} s")
    print(f"train accuracy {train_acc:.3f} (loss {train_loss:.3f})")
    print(f"test accuracy  {test_acc:.3f} (loss {test_loss:.3f}), best over epochs {best:.3f}; chance 0.100")
    print(f"singular values of the recurrent kernel in [{sv.min().item():.4f}, {sv.max().item():.4f}]")
    return {"test_acc": test_acc, "train_acc": train_acc, "sv_min": sv.min().item(), "sv_max": sv.max().item()}


if __name__ == "__main__":
    main()
