"""``sample`` against the exact laws of one-dimensional statistics (not only moments).

The conformance suite z-tests first, second and fourth moments of every case's ``sample``
(``check_sample_distribution``); a sampler can match those and still be off (a wrong tail, a
law that is only marginally right, a bias along one axis). Here each statistic has a law in
closed form, and the empirical CDF of ``N`` draws is compared with it by the
Dvoretzky–Kiefer–Wolfowitz bound ``P(sup |F_N − F| > ε) ≤ 2 exp(−2 N ε²)``, exact for every
``N`` (no normal approximation): with ``ε = √(log(2/α)/(2N))`` and ``α = 1e-6`` a correct
sampler fails one statistic with probability at most 1e-6 (the analogue of |z| ≤ 4.9). With
the fixed seeds the largest of the 200 observed sup distances is 0.63 ε (DKW tail there:
2(α/2)^0.40 ≈ 6e-3, an unremarkable draw among 200; the analogue of |z| ≈ 2.7 against the
threshold 4.9). Each test takes < 0.5 s. Mutations they catch: QR without the sign fix of
``diag R`` (every frame, SO and Unitary test), a sphere from a normalized uniform cube, ``ξ^1.3``
instead of a uniform ``ξ`` in the separated values.

The laws used (``n`` the ambient dimension):

* uniform on the real sphere S² ⊂ R³: every coordinate, and ``⟨q, x⟩`` for a fixed unit ``q``, is
  uniform on ``[−1, 1]`` (Archimedes); on S³ ⊂ R⁴, ``x₁² + x₂²`` is uniform on ``[0, 1]``;
* uniform on the complex sphere of Cⁿ: ``|x₁|² ~ Beta(1, n − 1)``, ``arg x₁`` uniform;
* Haar on SO(2): the angle is uniform; on SO(3) the rotation angle θ has CDF ``(θ − sin θ)/π``;
* a Haar k-frame of Rⁿ (tall form; Stiefel, Grassmannian, the frames of the rank and PSD
  families): the squared norm of a row, of ``qᵀX`` for a fixed unit ``q`` (left invariance) and
  ``X r`` for a fixed unit ``r`` (right invariance, a uniform unit vector) are ``Beta(k/2, (n−k)/2)``
  and ``Beta(1/2, (n−1)/2)`` laws, taken where they have closed forms (``Beta(1, 1)``, ``Beta(1, 2)``);
  complex frames: ``Beta(k, n − k)`` (integer parameters: a binomial sum);
* the separated values of the rank and PSD families: independent, uniform on their intervals
  (``reference.separated_bounds``);
* the wrapped normal of ``PoincareBall``/``Lorentz`` in dimension 2: ``2 d(o, x)² ~ χ²₂``, CDF ``1 − e^{−t/2}``.
"""

from __future__ import annotations

import math

import pytest
import torch
import reference as ref
from reference import separated_bounds

import geofunc as gf

F64 = torch.float64
ALPHA = 1e-6


def _dkw(values: torch.Tensor, cdf, what: str) -> None:
    """``sup |F_N − F| ≤ ε(N, α)`` for the draws ``values`` (1-d) and the exact CDF ``cdf``."""
    x = values.detach().to(F64).reshape(-1).sort().values
    N = x.numel()
    F = cdf(x).clamp(0.0, 1.0)
    i = torch.arange(1, N + 1, dtype=F64)
    d = float(torch.maximum(i / N - F, F - (i - 1) / N).max())
    eps = math.sqrt(math.log(2.0 / ALPHA) / (2.0 * N))
    assert d <= eps, f"{what}: sup|F_N − F| = {d:.4f} over {N} draws > ε = {eps:.4f} (false-alarm rate {ALPHA:g})"


def _uniform(lo: float, hi: float):
    return lambda x: (x - lo) / (hi - lo)


def _beta_int(a: int, b: int):
    """CDF of Beta(a, b) for integers a, b ≥ 1: ``Σ_{j=a}^{a+b−1} C(a+b−1, j) xʲ (1−x)^{a+b−1−j}``."""
    m = a + b - 1
    return lambda x: sum(math.comb(m, j) * x**j * (1 - x) ** (m - j) for j in range(a, m + 1))


def _semicircle(x: torch.Tensor) -> torch.Tensor:
    """CDF of a coordinate of a uniform unit vector of R⁴ (density (2/π)√(1 − x²) on [−1, 1])."""
    x = x.clamp(-1.0, 1.0)
    return 0.5 + (x * torch.sqrt(1.0 - x * x) + torch.asin(x)) / math.pi


def _tall(X: torch.Tensor) -> torch.Tensor:
    return X if X.shape[-2] >= X.shape[-1] else X.mH


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_sphere_coordinates_are_uniform_archimedes(dtype) -> None:
    N = 20000
    g = torch.Generator().manual_seed(1)
    for M in (gf.Sphere(), gf.Sphere(radius=2.5), gf.SphereEmbedded(radius=2.0)):
        r = M.radius
        X = M.sample((N, 3), generator=g, dtype=dtype).to(F64) / r
        q = torch.tensor([1.0, -2.0, 2.0], dtype=F64) / 3.0
        for name, v in (("x₁", X[:, 0]), ("x₃", X[:, 2]), ("⟨q, x⟩", X @ q)):
            _dkw(v, _uniform(-1.0, 1.0), f"{M!r} on S² {dtype}: {name}")
        Y = M.sample((N, 4), generator=g, dtype=dtype).to(F64) / r
        _dkw(Y[:, 0] ** 2 + Y[:, 3] ** 2, _uniform(0.0, 1.0), f"{M!r} on S³ {dtype}: x₁² + x₄²")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
def test_complex_sphere_and_unitary_entries(dtype) -> None:
    N = 20000
    g = torch.Generator().manual_seed(2)
    x = gf.Sphere().sample((N, 4), generator=g, dtype=dtype).to(torch.complex128)
    _dkw(x[:, 1].abs() ** 2, _beta_int(1, 3), f"complex Sphere in C⁴ {dtype}: |x₂|²")
    _dkw(torch.angle(x[:, 3]), _uniform(-math.pi, math.pi), f"complex Sphere {dtype}: arg x₄")
    U = gf.Unitary().sample((N, 3, 3), generator=g, dtype=dtype).to(torch.complex128)
    _dkw(U[:, 0, 0].abs() ** 2, _beta_int(1, 2), f"Unitary(3) {dtype}: |X₁₁|²")
    _dkw(torch.angle(U[:, 2, 1]), _uniform(-math.pi, math.pi), f"Unitary(3) {dtype}: arg X₃₂")
    _dkw(torch.angle(torch.linalg.det(U)), _uniform(-math.pi, math.pi), f"Unitary(3) {dtype}: arg det X")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_so_rotation_angles(dtype) -> None:
    N = 20000
    g = torch.Generator().manual_seed(3)
    X = gf.SO().sample((N, 2, 2), generator=g, dtype=dtype).to(F64)
    _dkw(torch.atan2(X[:, 1, 0], X[:, 0, 0]), _uniform(-math.pi, math.pi), f"SO(2) {dtype}: angle")
    X = gf.SO().sample((N, 3, 3), generator=g, dtype=dtype).to(F64)
    c = ((X.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    _dkw(torch.arccos(c), lambda t: (t - torch.sin(t)) / math.pi, f"SO(3) {dtype}: rotation angle")


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.complex64, torch.complex128],
                         ids=["float32", "float64", "complex64", "complex128"])
@pytest.mark.parametrize("space", [gf.Stiefel(), gf.Grassmannian(), gf.Stiefel(metric="canonical")], ids=repr)
def test_frames_rows_and_invariance(space, dtype) -> None:
    """Tall and wide frames: the row law (real 4×2: U(0, 1); complex 5×2: Beta(2, 3)), the law of
    ``qᵀX`` for a fixed unit ``q`` and of ``X r`` for a fixed unit ``r``."""
    N = 8000
    g = torch.Generator().manual_seed(4)
    n, k = (5, 2) if dtype.is_complex else (4, 2)
    row = _beta_int(2, 3) if dtype.is_complex else _uniform(0.0, 1.0)
    col = _beta_int(2, 3) if dtype.is_complex else _uniform(0.0, 1.0)  # two coordinates of a unit vector of Cⁿ / R⁴
    wide = torch.complex128 if dtype.is_complex else F64
    for shape in ((n, k), (k, n)):
        X = _tall(space.sample((N, *shape), generator=g, dtype=dtype).to(wide))
        q = torch.arange(1.0, n + 1, dtype=F64).to(wide)
        q = q / torch.linalg.vector_norm(q)
        r = torch.tensor([3.0, -4.0], dtype=F64).to(wide) / 5.0
        ctx = f"{space!r} {shape} {dtype}"
        _dkw((X[:, -1, :].abs() ** 2).sum(-1), row, f"{ctx}: |last row|²")
        if dtype.is_complex:
            _dkw(torch.angle(X[:, 0, 0]), _uniform(-math.pi, math.pi), f"{ctx}: arg X₁₁")
        else:  # a coordinate of a uniform unit vector of R⁴: density ∝ √(1 − x²)
            _dkw(X[:, 0, 0], _semicircle, f"{ctx}: X₁₁")
            _dkw(X[:, 2, 1], _semicircle, f"{ctx}: X₃₂")
        _dkw(((q.conj() @ X).abs() ** 2).sum(-1), row, f"{ctx}: |qᴴX|²")
        Xr = X @ r
        _dkw((Xr[:, :2].abs() ** 2).sum(-1) if not dtype.is_complex else (Xr[:, 0].abs() ** 2),
             col if not dtype.is_complex else _beta_int(1, n - 1), f"{ctx}: X r")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_rank_family_values_and_frames(dtype) -> None:
    """LowRank/FixedRank(2) on 6×4 and 4×6: σ_i uniform on their intervals, the left frame (6×2) row
    law Beta(1, 2), the right frame (4×2) row law U(0, 1); PSSDLowRank(2) on 4×4: eigenvalues and the
    frame's row law U(0, 1)."""
    N = 8000
    g = torch.Generator().manual_seed(5)
    lo, hi = separated_bounds(2)
    for M in (gf.LowRank(2), gf.FixedRank(2)):
        for shape in ((6, 4), (4, 6)):
            X = _tall(M.sample((N, *shape), generator=g, dtype=dtype).to(F64))
            U, s, Vh = torch.linalg.svd(X, full_matrices=False)
            ctx = f"{M!r} {shape} {dtype}"
            for i in range(2):
                _dkw(s[:, i], _uniform(0.5 + float(lo[i]), 0.5 + float(hi[i])), f"{ctx}: σ_{i}")
            _dkw((U[:, 0, :2] ** 2).sum(-1), _beta_int(1, 2), f"{ctx}: |row of U|²")
            _dkw((Vh[:, :2, 0] ** 2).sum(-1), _uniform(0.0, 1.0), f"{ctx}: |row of V|²")
    X = gf.PSSDLowRank(2).sample((N, 4, 4), generator=g, dtype=dtype).to(F64)
    lam, Q = torch.linalg.eigh(X)
    for i in range(2):
        _dkw(lam[:, 3 - i], _uniform(0.5 + float(lo[i]), 0.5 + float(hi[i])), f"PSSDLowRank(2) {dtype}: λ_{i}")
    _dkw((Q[:, 1, 2:] ** 2).sum(-1), _uniform(0.0, 1.0), f"PSSDLowRank(2) {dtype}: |row of Q|²")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_wrapped_normals_in_dimension_two(dtype) -> None:
    """``2 d(o, x)² ~ χ²₂`` (``v ~ N(0, I/2)``, ``d = ‖v‖``), and the direction is uniform."""
    N = 20000
    g = torch.Generator().manual_seed(6)
    chi2 = lambda t: 1.0 - torch.exp(-t / 2.0)  # noqa: E731
    for M in (gf.PoincareBall(), gf.PoincareBall(c=0.5)):
        x = M.sample((N, 2), generator=g, dtype=dtype).to(F64)
        d = 2.0 / math.sqrt(M.c) * torch.atanh(math.sqrt(M.c) * torch.linalg.vector_norm(x, dim=-1))
        _dkw(2.0 * d**2, chi2, f"{M!r} {dtype}: 2 d²")
        _dkw(torch.atan2(x[:, 1], x[:, 0]), _uniform(-math.pi, math.pi), f"{M!r} {dtype}: direction")
    for M in (gf.Lorentz(), gf.Lorentz(k=2.0)):
        x = M.sample((N, 3), generator=g, dtype=dtype).to(F64)
        d = math.sqrt(M.k) * torch.acosh((x[:, 0] / math.sqrt(M.k)).clamp(min=1.0))
        _dkw(2.0 * d**2, chi2, f"{M!r} {dtype}: 2 d²")
        _dkw(torch.atan2(x[:, 2], x[:, 1]), _uniform(-math.pi, math.pi), f"{M!r} {dtype}: direction")


@pytest.mark.parametrize(
    "space,point",
    [(gf.Rn(), (4,)), (gf.Sphere(), (4,)), (gf.Stiefel(), (4, 2)), (gf.LowRank(rank=2), (4, 3)), (gf.PSD(), (3, 3)),
     (gf.PoincareBall(), (3,)), (gf.Lorentz(), (3,)), (gf.Birkhoff(), (3, 3))],
    ids=lambda v: repr(v) if isinstance(v, gf.AbstractSpace) else "")
def test_compiled_sample_of_a_symbolic_shape_compiles_once(space, point):
    """``sample(x.shape)`` inside a compiled function whose batch size changes (default ``dynamic=None``)
    compiles one static and one dynamic graph, as ``torch.randn(x.shape)`` does. ``_sample_shape`` read
    every size with ``operator.index``, which guards a symbolic size to its value (one graph per batch
    size: Note [Symbolic sample shapes]), and the draws passed ``generator=None`` to torch, whose
    generator overload refuses symbolic sizes (Note [No generator=None]). The Gaussian, uniform
    (separated values of the rank family) and hyperbolic/Birkhoff draws are all reached."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: space.sample(x.shape, dtype=x.dtype), backend="eager", fullgraph=True)
    for B in [3, 4, 5, 6]:
        X = f(torch.zeros(B, *point, dtype=torch.float64))
        assert X.shape == (B, *point) and ref.member(space, X, 1e-9)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()
