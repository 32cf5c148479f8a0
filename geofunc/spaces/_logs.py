"""The scalar functions of the closed-form logarithms (Note [Logarithms as spectral maps]).

Private. Each returns ``(f, f′, f″)`` at a tensor of eigenvalues, for :func:`spectral_eigh`: a
series where the closed form cancels, the closed form elsewhere, accurate to a few ulps throughout.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

# Note [Logarithms as spectral maps]
# The logarithms are written as a matrix times a spectral map of a Hermitian matrix, so that their
# derivatives (first and second, every transform) come from Daleckii–Krein (spectral_eigh), finite
# where eigenvalues repeat, and never from eigenvectors or singular vectors, whose derivatives are
# undefined there (at Y = X every eigenvalue repeats).
# * The groups (SO, Unitary): for a unitary R = XᴴY with eigenvalues e^{iθⱼ}, |θⱼ| < π, the
#   Hermitian part S = (R + Rᴴ)/2 and the skew part K = (R − Rᴴ)/2 share R's eigenvectors, with
#   eigenvalues cos θⱼ and i sin θⱼ. So log R = K φ(S) with φ(c) = arccos(c)/√(1 − c²) = θ/sin θ,
#   the same for θ and −θ (φ(S) acts as that scalar on each eigenspace of S, which may join the two).
#   φ is analytic at c = 1 (θ = 0): in u = 1 − c, φ = Σ cⱼ uʲ with cⱼ = 2ʲ(j!)²/(2j + 1)!
#   (radius 2: the cut locus θ = π).
# * The Grassmannian: with C = XᴴY (invertible below the cut locus, principal angles < π/2) and
#   M = (Y − XC)C⁻¹ = U diag(tan θ) Wᴴ, the logarithm is U diag(θ) Wᴴ = M h(MᴴM) with
#   h(a) = arctan(√a)/√a = Σ (−1)ʲ aʲ/(2j + 1) (radius 1), analytic at a = 0.


def _series(x: Tensor, coeffs: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, p′, p″)`` of the polynomial ``Σ coeffs[j] xʲ`` (Horner)."""
    p = torch.zeros_like(x)
    dp = torch.zeros_like(x)
    d2p = torch.zeros_like(x)
    for c in reversed(coeffs):
        d2p = d2p * x + 2.0 * dp
        dp = dp * x + p
        p = p * x + c
    return p, dp, d2p


_PHI = [2.0 ** j * math.factorial(j) ** 2 / math.factorial(2 * j + 1) for j in range(20)]
_ATAN = [(-1.0) ** j / (2 * j + 1) for j in range(20)]


def theta_over_sin(c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``φ(c) = arccos(c)/√(1 − c²)`` (θ/sin θ at c = cos θ) and its first two derivatives in ``c``:
    the series about c = 1 for |1 − c| < 0.1 (so also a little past 1, where an input off the group
    puts an eigenvalue, analytically continued), the closed form below; ``c`` is clamped at −1
    (φ = ∞ there, the cut locus)."""
    c = c.clamp(min=-1.0)
    u = 1.0 - c
    near = u.abs() < 0.1
    p, dp, d2p = _series(torch.where(near, u, torch.zeros_like(u)), _PHI)
    cf = torch.where(near, torch.zeros_like(c), c)  # the closed form away from c = 1
    s = torch.sqrt((1.0 - cf) * (1.0 + cf))  # 1 ± c exact to rounding near either end
    th = torch.acos(cf)
    f = th / s
    d = s - th * cf
    df_u = d / s**3  # dφ/du = −dφ/dc
    d2f = (th * s * s - 3.0 * cf * d) / s**5
    return torch.where(near, p, f), -torch.where(near, dp, df_u), torch.where(near, d2p, d2f)


def theta_over_sin_cs(c: Tensor, s: Tensor, cut: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`theta_over_sin` at ``c = cos θ`` with ``sin θ = s`` (≥ 0) given too: the closed form reads
    θ = atan2(s, c) and sin θ from ``s``, not from ``1 − c²``, which has lost π − θ where θ nears π
    (Note [Group logarithms near the cut locus] in geofunc/spaces/_orthogonal.py); the series about
    c = 1 as there. ``s = 0`` away from c = 1 gives φ = ∞ (the cut locus), except where ``cut`` is
    True: there φ and its derivatives are 0 (the caller supplies the log on the cut locus)."""
    c = c.clamp(min=-1.0)
    u = 1.0 - c
    near = u.abs() < 0.1
    p, dp, d2p = _series(torch.where(near, u, torch.zeros_like(u)), _PHI)
    cf = torch.where(near, torch.zeros_like(c), c)  # the closed form away from c = 1
    sf = torch.where(near, torch.ones_like(s), s)
    th = torch.atan2(sf, cf)
    f = th / sf
    d = sf - th * cf
    df_u = d / sf**3  # dφ/du = −dφ/dc
    d2f = (th * sf * sf - 3.0 * cf * d) / sf**5
    f, df, d2f = torch.where(near, p, f), -torch.where(near, dp, df_u), torch.where(near, d2p, d2f)
    if cut is None:
        return f, df, d2f
    z = torch.zeros_like(f)
    return torch.where(cut, z, f), torch.where(cut, z, df), torch.where(cut, z, d2f)


def atan_ratio(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``h(a) = arctan(√a)/√a`` and its first two derivatives: the series for |a| < 0.1 (a rounding
    below 0 analytically continued), the closed form for a ≥ 0.1."""
    near = a < 0.1
    p, dp, d2p = _series(torch.where(near, a, torch.zeros_like(a)), _ATAN)
    af = torch.where(near, torch.ones_like(a), a)
    r = torch.sqrt(af)
    f = torch.atan(r) / r
    q = 1.0 / (1.0 + af)
    df = (q - f) / (2.0 * af)
    d2f = (-q * q - 3.0 * df) / (2.0 * af)
    return torch.where(near, p, f), torch.where(near, dp, df), torch.where(near, d2p, d2f)
