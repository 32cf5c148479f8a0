"""Compiled Birkhoff maps, one checkout per process: compile time and the compiled call's time.

    python benchmarks/compiled_birkhoff.py                    # this checkout
    PYTHONPATH=/tmp/base python benchmarks/compiled_birkhoff.py   # another one (run both in turn)

``torch.compile(fullgraph=True)`` (inductor, one thread, CPU, float32 and float64) of ``to_manifold``
followed by the backward of a linear loss, on a batch of 8 matrices 16×16 at raw scale 1 (training
scales) and 30; compile time is the first call's; the call's time is the median of 50 after 5 warm
calls. Prints one JSON line per row (Note [Compiled balancing] in geofunc/spaces/_birkhoff.py).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import geofunc as gf


def main() -> None:
    torch.set_num_threads(1)
    B = gf.Birkhoff()
    for dtype in (torch.float32, torch.float64):
        for scale in (1.0, 30.0):
            g = torch.Generator().manual_seed(0)
            Z = (scale * torch.randn(8, 16, 16, generator=g, dtype=torch.float64)).to(dtype)
            C = torch.randn(8, 16, 16, generator=g, dtype=torch.float64).to(dtype)

            def step(z: torch.Tensor) -> torch.Tensor:
                z = z.detach().requires_grad_()
                (gz,) = torch.autograd.grad((B.to_manifold(z) * C).sum(), z)
                return gz

            torch._dynamo.reset()
            f = torch.compile(B.to_manifold, fullgraph=True)

            def compiled(z: torch.Tensor) -> torch.Tensor:
                z = z.detach().requires_grad_()
                (gz,) = torch.autograd.grad((f(z) * C).sum(), z)
                return gz

            t = time.perf_counter()
            compiled(Z)
            compile_s = time.perf_counter() - t
            times = []
            for i in range(55):
                t = time.perf_counter()
                compiled(Z)
                if i >= 5:
                    times.append(time.perf_counter() - t)
            err = float((compiled(Z) - step(Z)).abs().max())
            print(json.dumps({"dtype": str(dtype).split(".")[-1], "scale": scale, "compile_s": round(compile_s, 2),
                              "call_ms": round(1e3 * statistics.median(times), 3), "grad_vs_eager": err}), flush=True)


if __name__ == "__main__":
    main()
