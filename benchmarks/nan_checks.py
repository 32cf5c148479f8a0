"""Per-call time of the maps whose Note [NaN policy] checks were added on 2026-12-08 (benchmarks/REFACTOR-session-2026-12-08.md).

Run it once per checkout, in turn, and compare the medians::

    for r in 1 2 3 4 5; do for w in <before> <after>; do echo "$w $(PYTHONPATH=$w python benchmarks/nan_checks.py)"; done; done

float64, one thread; each entry the median of 7 bursts of 0.3 s of calls, in µs.
"""

import statistics
import time

import torch

import geofunc as gf

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
H, B, P = gf.Lorentz(), gf.Birkhoff(), gf.PSD(metric="affine")
X, Y = (H.sample((1024, 8), generator=g, dtype=torch.float64) for _ in range(2))
XB = B.sample((64, 8, 8), generator=g, dtype=torch.float64)
UB = B.tangent(XB, torch.randn(64, 8, 8, generator=g, dtype=torch.float64))
XP = P.sample((64, 8, 8), generator=g, dtype=torch.float64)
UP = P.tangent(XP, torch.randn(64, 8, 8, generator=g, dtype=torch.float64))
CASES = {
    "Lorentz.project": lambda: H.project(Y),
    "Lorentz.dist": lambda: H.dist(X, Y),
    "Birkhoff.inner": lambda: B.inner(XB, UB, UB),
    "PSDaffine.inner": lambda: P.inner(XP, UP, UP),
}
out = {}
for name, f in CASES.items():
    for _ in range(20):
        f()
    times = []
    for _ in range(7):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            f()
            n += 1
        times.append((time.perf_counter() - t0) / n * 1e6)
    out[name] = round(statistics.median(times), 1)
print(out)
