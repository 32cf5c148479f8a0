"""``Hurwitz().from_manifold`` under ``vmap``, ``jvp`` and ``torch.compile``, one checkout per process.

    PYTHONPATH=<checkout> python benchmarks/transformed_hurwitz.py <label>

One thread, float64 and float32: projections of Gaussian matrices (a batch of 64 5×5 and 16 16×16); the median
of 10 calls (ms) of ``vmap(from_manifold)``, of ``jvp`` of it, and of the compiled map (``backend="eager"``:
the traced ops run as is; its trace time printed too), and the largest difference of the raw tensors from
eager mode's (where eager accepts every point). Run it for two checkouts in turn (Note [One sign iteration for
every right-hand side] in geofunc/spaces/_hurwitz.py; benchmarks/REFACTOR-session-2026-12-07h.md).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import geofunc as gf


def _median_ms(f, *args) -> float:
    for _ in range(2):
        f(*args)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 2)


def main(label: str) -> None:
    torch.set_num_threads(1)
    M = gf.Hurwitz()
    for dtype in (torch.float64, torch.float32):
        for b, n in ((64, 5), (16, 16)):
            g = torch.Generator().manual_seed(0)
            X = M.project(torch.randn(b, n, n, generator=g, dtype=torch.float64)).to(dtype)
            V = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(dtype)
            first = lambda x: M.from_manifold(x)[0]  # noqa: E731
            vm = torch.func.vmap(first)
            jv = lambda x, v: torch.func.jvp(first, (x,), (v,))[1]  # noqa: E731
            torch._dynamo.reset()
            t = time.perf_counter()
            comp = torch.compile(first, fullgraph=True, backend="eager")
            comp(X)
            trace_s = time.perf_counter() - t
            try:
                diff = float((vm(X) - first(X)).abs().max())
            except gf.ManifoldError:
                diff = float("nan")  # eager refuses a point (the transformed call has no check)
            print(label, str(dtype).split(".")[-1], f"{b}x{n}x{n}", "vmap ms", _median_ms(vm, X), "jvp ms",
                  _median_ms(jv, X, V), "compiled ms", _median_ms(comp, X), "trace s", round(trace_s, 1),
                  "vmap vs eager", diff, flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
