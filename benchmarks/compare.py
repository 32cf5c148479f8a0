"""Before/after timings of a refactor: the public maps of every space, for two checkouts, in one run.

    git worktree add --detach /tmp/protocol-base main   # the code before
    python benchmarks/compare.py /tmp/protocol-base      # writes benchmarks/REFACTOR.md

Each checkout is imported in its own worker process (``PYTHONPATH`` = that checkout), one thread,
float64 on the CPU; both workers stay up, and every timing is taken from the two of them in turn,
``--repeats`` times (the order swapped each time), each the fastest single call of a short burst;
an entry is the best of them. A load from other processes on the machine only adds time, so it
drops out of the minimum, and it hits both sides alike. Timed per space (a batch of 8 points of a moderate size):
``to_manifold`` followed by the backward of a linear loss (at a base from ``from_manifold``),
``from_manifold`` (with its eager membership check), ``retract`` and ``tangent``. ``--maps`` adds
differentiated variants: ``retract+grad`` / ``tangent+grad`` / ``project+grad`` (plain autograd,
the backward of a linear loss in ``V``, ``X``, ``Y``) and ``retract+func.grad`` (``torch.func.grad``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# (name, expression building the space, point shape); ``gf`` is the checkout's geofunc.
SPACES = [
    ("Rn", "gf.Rn()", (16, 16)),
    ("Sym", "gf.Sym()", (16, 16)),
    ("Skew", "gf.Skew()", (16, 16)),
    ("Sphere", "gf.Sphere()", (64,)),
    ("SphereEmbedded", "(getattr(gf, 'SphereEmbedded', None) or gf.nn.SphereEmbeddedSpace)()", (64,)),
    ("Oblique", "gf.Oblique()", (32, 8)),
    ("SO", "gf.SO()", (16, 16)),
    ("Stiefel", "gf.Stiefel()", (32, 8)),
    ("Grassmannian", "gf.Grassmannian()", (32, 8)),
    ("Stiefel-128x64", "gf.Stiefel()", (128, 64)),  # frames of ≥ 32 columns: Note [Frame exponential]
    ("Grassmannian-96x32", "gf.Grassmannian()", (96, 32)),
    ("AlmostOrthogonal", "gf.AlmostOrthogonal(lam=0.5)", (32, 8)),
    ("GLp", "gf.GLp()", (16, 16)),
    ("SL", "gf.SL()", (16, 16)),
    ("LowRank", "gf.LowRank(rank=4)", (32, 16)),
    ("FixedRank", "gf.FixedRank(rank=4)", (32, 16)),
    ("LowRank-32", "gf.LowRank(rank=32)", (96, 64)),
    ("FixedRank-square", "gf.FixedRank(rank=16)", (16, 16)),
    ("PSD", "gf.PSD()", (16, 16)),
    ("PSSD", "gf.PSSD()", (16, 16)),
    ("PSSDLowRank", "gf.PSSDLowRank(rank=4)", (16, 16)),
    ("PSSDFixedRank", "gf.PSSDFixedRank(rank=4)", (16, 16)),
    ("Hurwitz", "gf.Hurwitz(alpha=0.1)", (16, 16)),
    ("PoincareBall", "gf.PoincareBall()", (64,)),
    ("Lorentz", "gf.Lorentz()", (64,)),
    ("Birkhoff", "gf.Birkhoff()", (16, 16)),
]
MAPS = ("to_manifold+grad", "from_manifold", "retract", "tangent")
EXTRA_MAPS = ("retract+grad", "retract+func.grad", "tangent+grad", "project+grad")
BATCH = 8
THRESHOLD = 1.10  # a ratio above it is a slowdown to fix or explain

# The worker: builds every space's inputs, then answers "space map" lines with the fastest single
# call of a burst of calls (seconds): a call that was preempted is slower, never faster.
WORKER = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import geofunc as gf

def burst(fn, n):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

calls = {}
g = torch.Generator().manual_seed(0)
for name, expr, shape in json.loads(sys.argv[1]):
    M = eval(expr)
    shape = (BATCH,) + tuple(shape)
    X = M.sample(shape, generator=g, dtype=torch.float64)
    Z, base = M.from_manifold(X)
    Z = (Z + 0.1 * torch.randn(Z.shape, generator=g, dtype=torch.float64)).requires_grad_()
    C = torch.randn(X.shape, generator=g, dtype=torch.float64)
    G = torch.randn(X.shape, generator=g, dtype=torch.float64)
    V = 0.1 * M.tangent(X, G)

    def chart(M=M, Z=Z, base=base, C=C):
        Z.grad = None
        (M.to_manifold(Z, base) * C).sum().backward()

    Vr, Xr = V.clone().requires_grad_(), X.clone().requires_grad_()
    Yr = (X + 0.01 * G).requires_grad_()
    fgrad = torch.func.grad(lambda v, M=M, X=X, C=C: (M.retract(X, v) * C).sum())
    calls[name] = {
        "to_manifold+grad": chart,
        "from_manifold": lambda M=M, X=X: M.from_manifold(X),
        "retract": lambda M=M, X=X, V=V: M.retract(X, V),
        "tangent": lambda M=M, X=X, G=G: M.tangent(X, G),
        "retract+grad": lambda M=M, X=X, Vr=Vr, C=C: torch.autograd.grad((M.retract(X, Vr) * C).sum(), Vr),
        "retract+func.grad": lambda fgrad=fgrad, V=V: fgrad(V),
        "tangent+grad": lambda M=M, Xr=Xr, G=G, C=C: torch.autograd.grad((M.tangent(Xr, G) * C).sum(), Xr),
        "project+grad": lambda M=M, Yr=Yr, C=C: torch.autograd.grad((M.project(Yr) * C).sum(), Yr),
    }
sizes = {}
print("ready", flush=True)
for line in sys.stdin:
    space, m = line.split()
    fn = calls[space][m]
    if (space, m) not in sizes:  # calls per burst: about 5 ms
        fn(); fn()
        n = max(1, int(BURST / burst(fn, 3)))
        sizes[space, m] = n
    print(burst(fn, sizes[space, m]), flush=True)
"""


class _Worker:
    def __init__(self, root: pathlib.Path, spaces: list, burst: float) -> None:
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = WORKER.replace("BURST", repr(burst)).replace("BATCH", repr(BATCH))
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spaces)], env=env, cwd=str(root), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", root

    def time(self, space: str, m: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{space} {m}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=pathlib.Path, help="checkout of the code before (e.g. a worktree of main)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--burst", type=float, default=0.05, help="seconds of calls per timing")
    ap.add_argument("--spaces", nargs="*", help="only these rows (default: all)")
    ap.add_argument("--maps", nargs="*", choices=MAPS + EXTRA_MAPS, help=f"only these maps (default: {', '.join(MAPS)})")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "REFACTOR.md")
    args = ap.parse_args()
    maps = tuple(args.maps) if args.maps else MAPS
    spaces = [[n, e, list(sh)] for n, e, sh in SPACES if not args.spaces or n in args.spaces]
    workers = {side: _Worker(root, spaces, args.burst) for side, root in (("base", args.base), ("branch", ROOT))}
    best: dict[str, dict] = {"base": {}, "branch": {}}

    def measure(space: str, m: str, repeats: int) -> None:
        for i in range(repeats):
            for side in ("base", "branch") if i % 2 == 0 else ("branch", "base"):
                cur = best[side].setdefault(space, {})
                cur[m] = min(workers[side].time(space, m), cur.get(m, float("inf")))

    def ratio(space: str, m: str) -> float:
        return best["branch"][space][m] / best["base"][space][m]

    try:
        for space, _, _ in spaces:
            for m in maps:
                measure(space, m, args.repeats)
            print(f"{space} done", file=sys.stderr)
        # A confirmation pass: an entry above the threshold gets 3x the repeats more (the minima
        # can only go down); what stays above it is a real slowdown, or is explained in the notes.
        flagged = [(space, m) for space, _, _ in spaces for m in maps if ratio(space, m) > THRESHOLD]
        for space, m in flagged:
            measure(space, m, 3 * args.repeats)
    finally:
        for w in workers.values():
            w.close()
    rev = subprocess.run(["git", "-C", str(args.base), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    lines = [
        "# Refactor timings: before (main) and after (this branch), side by side",
        "",
        f"`python benchmarks/compare.py <checkout of main>` (base at `{rev}`): float64, CPU, one thread, a batch "
        f"of {BATCH} points per call; each entry the fastest call of {args.repeats} bursts of ~{args.burst * 1e3:g} ms, taken from the "
        "two checkouts in turn (see the script's docstring). Ratio = after / before: above 1 is slower.",
        "",
        "| space | " + " | ".join(f"{m} before (µs) | after (µs) | ratio" for m in maps) + " |",
        "| --- | " + " | ".join("---: | ---: | ---:" for _ in maps) + " |",
    ]
    worst = []
    for space, _, _ in spaces:
        row = [space]
        for m in maps:
            b, a = best["base"][space][m], best["branch"][space][m]
            mark = "*" if (space, m) in flagged else ""
            row += [f"{b * 1e6:.0f}", f"{a * 1e6:.0f}", f"{a / b:.2f}{mark}"]
            worst.append((a / b, space, m))
        lines.append("| " + " | ".join(row) + " |")
    worst.sort(reverse=True)
    lines += [
        "",
        f"`*`: above {THRESHOLD:.2f} after the first {args.repeats} repeats, measured {3 * args.repeats} more times.",
        "Largest ratios: " + ", ".join(f"{s} {m} {r:.2f}" for r, s, m in worst[:5]) + ".",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
