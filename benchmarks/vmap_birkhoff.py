"""``vmap(grad)`` of ``Birkhoff().to_manifold``, one checkout per process.

    PYTHONPATH=<checkout> python benchmarks/vmap_birkhoff.py <label>

One thread, a batch of 8 matrices 16×16, float32/float64, raw scales 1 and 30: the median of 20 calls
(ms) and the largest difference from the loop of ``grad`` over the batch. Run it for two checkouts in
turn (Note [Balancing under vmap] in geofunc/spaces/_birkhoff.py; benchmarks/REFACTOR-session-2026-12-07g.md).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import geofunc as gf


def main(label: str) -> None:
    torch.set_num_threads(1)
    B = gf.Birkhoff()

    def loss(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (B.to_manifold(z) * c).sum()

    f = torch.func.vmap(torch.func.grad(loss))
    for dtype in (torch.float32, torch.float64):
        for scale in (1.0, 30.0):
            g = torch.Generator().manual_seed(0)
            Z = (scale * torch.randn(8, 16, 16, generator=g, dtype=torch.float64)).to(dtype)
            C = torch.randn(8, 16, 16, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(3):
                f(Z, C)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                f(Z, C)
                times.append(time.perf_counter() - t)
            loop = torch.stack([torch.func.grad(loss)(Z[i], C[i]) for i in range(len(Z))])
            print(label, str(dtype).split(".")[-1], scale, "vmap(grad) ms", round(1e3 * statistics.median(times), 2),
                  "vs loop", float((f(Z, C) - loop).abs().max()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
