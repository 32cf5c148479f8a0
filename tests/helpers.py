"""Shared test constants: the one dtype-keyed tolerance table and the standard shapes of cases.

Tests import these as ``from helpers import TOL`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

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
