"""Speed of ``M.logabsdet(Z, base)`` against ``torch.linalg.slogdet``, side by side in the same run.

For each space and size: the factorized ``logabsdet`` (forward, and forward + backward), against
``slogdet(to_manifold(Z, base))`` (what a flow would otherwise compute) and against ``slogdet(X)``
of an already formed point (the decomposition alone). Ratios > 1 mean logabsdet is faster.
Timings are medians of repeated runs on this machine; rerun the whole script to compare.

    python benchmarks/bench_logabsdet.py            # n = 16, 64, 256, 512; float32
    python benchmarks/bench_logabsdet.py --quick    # n = 16, 64
    python benchmarks/bench_logabsdet.py --dtype float64 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import geofunc as gf


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(f, Z):
    def run():
        Zr = Z.detach().requires_grad_(True)
        f(Zr).sum().backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256, 512])
    p.add_argument("--quick", action="store_true", help="sizes 16 and 64 only")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    sizes = [16, 64] if a.quick else a.sizes
    spaces = [gf.GLp(), gf.PSD(), gf.AlmostOrthogonal(lam=0.5)]
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {a.dtype}, batch {a.batch}, {a.threads} thread(s), median of {a.repeat}")
    head = (f"{'space':34s} {'n':>5s} {'logabsdet':>10s} {'slogdet∘to_man':>15s} {'ratio':>7s} "
            f"{'slogdet(X)':>11s} {'ratio':>7s} | {'fwd+bwd: lad':>13s} {'slogdet∘to_man':>15s} {'ratio':>7s}")
    print(head)
    print("-" * len(head))
    for M in spaces:
        for n in sizes:
            X = M.sample((a.batch, n, n), generator=g, dtype=dtype)
            Z0, base = M.from_manifold(X)
            Z = Z0 + 0.1 * torch.randn(Z0.shape, generator=g, dtype=dtype)
            Xz = M.to_manifold(Z, base)
            with torch.no_grad():
                t_lad = _median_time(lambda: M.logabsdet(Z, base), a.repeat)
                t_full = _median_time(lambda: torch.linalg.slogdet(M.to_manifold(Z, base))[1], a.repeat)
                t_dec = _median_time(lambda: torch.linalg.slogdet(Xz)[1], a.repeat)
            b_lad = _median_time(_fwd_bwd(lambda z: M.logabsdet(z, base), Z), a.repeat)
            b_full = _median_time(_fwd_bwd(lambda z: torch.linalg.slogdet(M.to_manifold(z, base))[1], Z), a.repeat)
            err = float((M.logabsdet(Z, base).double() - torch.linalg.slogdet(Xz.double())[1]).abs().max())
            print(f"{repr(M)[:34]:34s} {n:5d} {t_lad * 1e3:8.3f}ms {t_full * 1e3:13.3f}ms {t_full / t_lad:7.1f} "
                  f"{t_dec * 1e3:9.3f}ms {t_dec / t_lad:7.1f} | {b_lad * 1e3:11.3f}ms {b_full * 1e3:13.3f}ms "
                  f"{b_full / b_lad:7.1f}   (|Δ| vs slogdet {err:.1e})")


if __name__ == "__main__":
    main()
