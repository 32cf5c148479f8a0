"""Shared test constants: the one dtype-keyed tolerance table and the standard shapes of cases.

Tests import these as ``from helpers import TOL`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import pytest
import torch

#: Comparisons of maps that are exact up to rounding (normalizations, triangles, QR/polar of
#: well-conditioned inputs): ``atol = rtol = TOL[dtype]``.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}

#: For maps through an iterative/spectral routine (expm, eigh, SVD of moderately
#: conditioned inputs) whose float32 error grows with the size.
TOL_LOOSE = {torch.float32: 1e-3, torch.float64: 1e-7}

#: Float64 tolerance of identities that hold to rounding (RGD identities, closed forms).
TIGHT = 1e-12

DTYPES = (torch.float32, torch.float64)

#: Full shapes (batch included) of a matrix space: 1×1, a row, a column, square, tall,
#: wide, and a batched wide 5×2 stack.
SHAPES_MATRIX = ((1, 1), (1, 5), (5, 1), (4, 4), (6, 3), (3, 6), (2, 3, 5, 2))
#: Full shapes of a square-matrix space.
SHAPES_SQUARE = ((1, 1), (2, 2), (4, 4), (2, 3, 5, 5))
#: Full shapes of a vector space (last dim): S^0 points, a single vector, batches.
SHAPES_VECTOR = ((1,), (7,), (5, 1), (1, 5), (4, 4), (2, 3, 5, 2))


#: ``(major, minor)`` of the torch the suite runs on.
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

#: Dynamo traces optree's functions (gf.to_manifold of a pytree, gf.optim, inside torch.compile):
#: 2.11 and 2.13 do; 2.6's Dynamo breaks the graph at optree's C functions.
COMPILE_PYTREES = (2, 11)
#: FSDP2 (fully_shard) on the CPU (the gloo tests): 2.11 and 2.13 run it; 2.6's needs a CUDA stream.
FSDP2_ON_CPU = (2, 11)


def needs_torch(version: tuple[int, int], why: str) -> pytest.MarkDecorator:
    """Skip on a torch older than ``version``, where the feature under test needs a newer one (README,
    "Supported versions", names each); the suite runs on torch 2.13 in CI, so nothing skips there."""
    return pytest.mark.skipif(TORCH_VERSION < version, reason=f"needs torch >= {version[0]}.{version[1]}: {why}")


def collect_all_garbage() -> None:
    """Collect cyclic garbage until a collection finds none (at most 10 rounds). One collection can free
    objects whose weakref callbacks release more: torch.compile's guards on an object a previous test
    left behind drop its compiled graph (FakeTensors, ShapeEnv, ~1400 objects) only when that object is
    collected, so a test that counts the garbage its own code makes starts from a settled heap."""
    import gc

    for _ in range(10):
        if not gc.collect():
            return
