"""GeoTorch 0.4.0 checkpoints loaded into ``geofunc.nn`` modules (Note [GeoTorch checkpoints]).

GeoTorch's ``state_dict`` of a constrained module holds the raw tensor of its chart and the
buffers of its parametrization, laid out by GeoTorch's classes. Where that layout differs from
geofunc's, :func:`convert_geotorch_entries` evaluates GeoTorch's map on the saved tensors (the
point the GeoTorch module showed) and replaces the entries by that point's raw tensor and bases
in geofunc's chart, before ``load_state_dict`` copies them.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ManifoldError, first_index
from .._linalg import eye_like, resolve_triv, skew_lower
from ..spaces._base import LOW_PRECISION
from ._adapter import _concrete

Tensor = torch.Tensor

# Note [GeoTorch checkpoints]
# A GeoTorch user's trained models are state_dicts of GeoTorch's layout: its frames' bases are n×n
# rotations (geofunc's are the n×k frames themselves), its rank and PSD classes are ProductManifolds
# whose factor modules own the bases (keys ``0.0.base``, ``0.2.base``), its Hurwitz has three raw
# tensors and the buffers ``In`` and ``alpha``, and its Sphere's base is a unit vector whatever the
# radius. Loaded into the same model built with ``geofunc.nn`` they failed with size mismatches or
# missing keys, or gave another point without an error (``strict=False``; a Sphere of radius ≠ 1
# loaded GeoTorch's unit base as a point of the wrong sphere). A constrained module's
# ``_load_from_state_dict`` now recognizes, for each tensor constrained by a geofunc.nn class, the
# layout GeoTorch writes for that class and size (the keys and shapes under
# ``parametrizations.<name>.``, computed from the class's attributes; for a Sphere, a base of unit
# norm where the radius is not 1), evaluates GeoTorch's map on the saved tensors in float64 with the
# class's own hyperparameters (``triv``, ``f``, ``lam``, ``rank``; Hurwitz's saved ``alpha``), and
# replaces those entries by the raw tensor and bases that the class's ``right_inverse`` gives that
# point (GeoTorch's ``in_manifold``; a point the chart cannot represent raises ``ManifoldError``
# naming the checkpoint's entries), in the model's dtype (below) and on the saved device. The load then goes on
# as for a geofunc checkpoint (dtype re-expression, ``assign=True``). Layouts that coincide with
# geofunc's (SO and square Stiefel, Skew, Symmetric, SphereEmbedded, Rn, a Sphere of radius 1) are
# the same maps of the same tensors and load as they are (tests/test_geotorch_checkpoints.py, against
# GeoTorch itself). An optimizer's state saved beside the model holds moments in GeoTorch's
# coordinates: it loads, but means something else; re-create the optimizer.
#
# The dtype of the conversion is the model's, not the checkpoint's: a float32 GeoTorch point with a
# singular value (eigenvalue) between GeoTorch's floor 1e-6 and geofunc's float32 floor 3.45e-4 cannot
# be represented in a float32 chart, and the documented way out is to load it into a float64 model;
# converted in the saved float32 first and cast afterwards, it was refused against the float32 floor
# all the same. A bf16/fp16 model keeps the saved dtype's conversion: the re-expression of the raw
# tensor then lifts a value below the low-precision floor, the documented allowance of a cast.
#
# GL(n) has two components. GeoTorch's GLp is its FixedRank of full rank: Stiefel frames U, V of
# either determinant sign, so a GeoTorch ``invertible`` model starts in the det < 0 component for about
# half of the seeds (its FixedRank sampler does not fix the sign) and stays there while training.
# geofunc's GLp is det > 0 (a documented deviation), so such a checkpoint cannot be loaded into
# ``invertible``; the check in ``_convert`` says so (with the determinant's sign, rather than the
# generic advice of an assignment to "assign M.sample()", which would discard the trained point) and
# names the model that loads it: ``fixed_rank(module, tensor_name, rank=n)``, GeoTorch's GLp map with
# the same entries, whose frames take both signs.


def _frame(X: Tensor, base: Tensor, triv: Callable[[Tensor], Tensor], grassmann: bool = False) -> Tensor:
    """GeoTorch's Stiefel (Grassmannian) map of a tall raw ``X`` (n×k) at its n×n ``base``: the first k
    columns of ``base · triv(A)``, ``A`` the skew matrix of ``X`` padded to n×n (of its rows below
    the k-th, placed in the first k columns, for the Grassmannian)."""
    n, k = X.shape[-2], X.shape[-1]
    if grassmann:
        P = F.pad(X[..., k:, :], (0, n - k, k, 0))
    else:
        P = F.pad(X, (0, n - k))
    return (base @ triv(skew_lower(P)))[..., :k]


def _value_map(M: nn.Module, named: dict) -> Callable[[Tensor], Tensor]:
    """GeoTorch's map of the raw singular values (eigenvalues) for the class's ``f``: a name from
    ``named``, a callable, or the first of a pair."""
    f = M.space.f  # the name or pair given (M.f reads as the callable: Note [f and inv read as callables])
    if isinstance(f, str):
        return named[f]
    if isinstance(f, (tuple, list)):
        return f[0]
    return f


def _softplus_geotorch(x: Tensor) -> Tensor:
    return F.softplus(x) + 1e-6  # GeoTorch's ``softplus_epsilon``


def _geotorch_layout(M: nn.Module, original: Tensor) -> Optional[dict[str, tuple]]:
    """The keys (under ``parametrizations.<name>.``) and shapes of GeoTorch's state_dict for the class
    ``M`` constraining a tensor of ``original``'s shape; None where GeoTorch's layout is geofunc's."""
    from . import _manifolds as C

    size = tuple(original.shape)
    ts = tuple(getattr(M, "tensorial_size", ()) or ())
    if isinstance(M, C.Hurwitz):
        return {"original0": size, "original1": size, "original2": size, "0.In": size, "0.alpha": (),
                "0.0.0.base": size, "0.1.0.base": size}
    if isinstance(M, C._SVDManifold):
        return {"original": size, "0.0.base": ts + (M.n, M.n), "0.2.base": ts + (M.k, M.k)}
    if isinstance(M, C._EigManifold):
        return {"original": size, "0.0.base": ts + (M.n, M.n)}
    if isinstance(M, C.Stiefel) and M.n != M.k:  # Grassmannian too
        return {"original": size, "0.base": ts + (M.n, M.n)}
    if type(M) is C.Sphere and M.radius != 1.0:
        return {"original": size, "0.base": size}
    return None


def _geotorch_point(M: nn.Module, saved: dict) -> Tensor:
    """GeoTorch's ``forward`` of the class ``M`` on its saved tensors, in float64."""
    from . import _manifolds as C

    d = {k: v.detach().to(torch.float64) for k, v in saved.items()}
    if isinstance(M, C.Hurwitz):
        def pd(X: Tensor, base: Tensor) -> Tensor:  # GeoTorch's PSD factor (softplus of the diagonal)
            Q = _frame(X, base, resolve_triv(M.space.triv))
            return Q * _softplus_geotorch(X.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2) @ Q.transpose(-2, -1)

        Q = pd(d["original0"], d["0.0.0.base"])
        P = pd(d["original1"], d["0.1.0.base"])
        return P @ (skew_lower(d["original2"]) - 0.5 * Q) - d["0.alpha"] * eye_like(Q)
    X = d["original"]
    if isinstance(M, C.Sphere):
        x = d["0.base"]
        v = X - (X * x).sum(-1, keepdim=True) * x
        t = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        return M.radius * (torch.cos(t) * x + torch.special.sinc(t / math.pi) * v)
    transposed = bool(getattr(M, "transposed", False))
    if transposed:
        X = X.transpose(-2, -1)
    triv = resolve_triv(M.space.triv)
    if isinstance(M, C._SVDManifold):
        r = M.rank
        U = _frame(X.tril(-1)[..., :r], d["0.0.base"], triv)
        s = X.diagonal(dim1=-2, dim2=-1)[..., :r]
        V = _frame(X.triu(1).transpose(-2, -1)[..., :r], d["0.2.base"], triv)
        if isinstance(M, C.AlmostOrthogonal):
            s = 1.0 + M.lam * _value_map(M, {k: v[0] for k, v in C.AlmostOrthogonal.fs.items()})(s)
        elif isinstance(M, C.FixedRank):  # GLp and SL too
            s = _value_map(M, {"softplus": _softplus_geotorch})(s)
            if isinstance(M, C.SL) and isinstance(M.space.f, str):  # GeoTorch normalizes named maps only
                logs = s.log()
                s = (logs - logs.mean(-1, keepdim=True)).exp()
        W = U * s.unsqueeze(-2) @ V.transpose(-2, -1)
    elif isinstance(M, C._EigManifold):
        r = M.rank
        Q = _frame(X[..., :r], d["0.0.base"], triv)
        lam = X.diagonal(dim1=-2, dim2=-1)[..., :r]
        lam = _value_map(M, {"softplus": _softplus_geotorch})(lam) if isinstance(M, C.PSSDFixedRank) else lam.abs()
        W = Q * lam.unsqueeze(-2) @ Q.transpose(-2, -1)
    else:  # a non-square Stiefel or Grassmannian
        W = _frame(X, d["0.base"], triv, grassmann=isinstance(M, C.Grassmannian))
    return W.transpose(-2, -1) if transposed else W


def _unit_rows(base: Tensor) -> bool:
    """Every vector along the last dimension has norm 1 to the dtype's rounding (GeoTorch's Sphere base)."""
    norm = torch.linalg.vector_norm(base.detach().to(torch.float64), dim=-1)
    tol = 64 * torch.finfo(base.dtype).eps * max(base.shape[-1], 1)
    return bool(((norm - 1.0).abs() <= tol).all())


def _convert(M: nn.Module, saved: dict, ref: Tensor, keys: str,
             dtype: Optional[torch.dtype] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The raw tensor and base buffers (dtype ``dtype``, default ``ref``'s, on ``ref``'s device) of
    GeoTorch's point on ``saved``."""
    from . import _manifolds as C

    dtype = ref.dtype if dtype is None else dtype
    _refuse_torch_orthogonal(M, saved, keys)
    with torch.no_grad():
        W = _geotorch_point(M, saved)
        if isinstance(M, C.GLp) and bool(torch.isfinite(W).all()):
            _refuse_negative_det(M, W, keys)
        W = W.to(dtype)
        if not bool(torch.isfinite(W).all()):
            raise ManifoldError(f"{M.where}: expected a GeoTorch checkpoint whose point is finite, got "
                                f"non-finite values from the entries {keys}.")
        scratch = copy.deepcopy(M)  # the class's right_inverse, writing its own buffers, not M's
        for name, buf in list(scratch._buffers.items()):
            if buf is not None and (buf.is_floating_point() or buf.is_complex()):
                scratch._buffers[name] = torch.empty(buf.shape, dtype=dtype, device=ref.device)
        try:
            Z = scratch.right_inverse(W)
        except ManifoldError as e:
            raise ManifoldError(f"{M.where}: loading GeoTorch's entries {keys}: {e}") from None
        # A float32 checkpoint converted in a float64 model: frames orthonormal to float32's rounding,
        # re-made valid in float64 as a load across dtypes does (Note [Bases across dtypes]).
        scratch._refresh_base()
    return Z, {name: scratch._buffers[name] for name in M._base_names()}


# Note [Checkpoints of torch's own orthogonal]
# torch.nn.utils.parametrizations.orthogonal writes GeoTorch's layout for a non-square weight too: the
# raw n×k tensor ``original`` and an n×n ``0.base``. Its "matrix_exp" and "cayley" maps are GeoTorch's
# (the skew part of the lower triangle, padded, at the base; tested), but its default for a non-square
# real weight, "householder", reads the same entries as Householder reflectors with the diagonal's
# signs: such a checkpoint was converted with GeoTorch's map and loaded silently as another weight
# (0.44 off on a trained 6×3 layer; without the conversion it was a size mismatch). Which map wrote
# it is not in the checkpoint, but torch's right_inverse returns -I as the raw tensor, and neither map
# trains its diagonal (matrix_exp's A = X - Xᴴ cancels it, householder reads its sign through .int()),
# so every diagonal entry of a torch checkpoint is exactly ±1, while GeoTorch's map ignores the
# diagonal and its right_inverse returns 0 there. Such a checkpoint is refused, saying how to load it
# with either map; a square one is SO's layout, geofunc's own, and its default map ("matrix_exp") is
# SO's: it loads as it is (an explicit "householder" square checkpoint cannot be told apart).
def _refuse_torch_orthogonal(M: nn.Module, saved: dict, keys: str) -> None:
    """Raise ``ManifoldError`` where the entries of a non-square ``Stiefel`` are a checkpoint of
    ``torch.nn.utils.parametrizations.orthogonal`` (Note [Checkpoints of torch's own orthogonal])."""
    from . import _manifolds as C

    if not isinstance(M, C.Stiefel) or isinstance(M, C.Grassmannian) or "original" not in saved:
        return
    X = saved["original"].detach()
    d = X.diagonal(dim1=-2, dim2=-1)
    if d.numel() == 0 or not bool((d.abs() == 1).all()):
        return
    # (a class registered directly is handed its raw tensor without the key: keys names its bases only)
    raw = next((k for k in keys.split(", ") if k.endswith("original")), "the raw tensor (`original`)")
    raise ManifoldError(
        f"{M.where}: loading the entries {keys}: expected GeoTorch 0.4.0's layout, whose map ignores the raw "
        f"tensor's diagonal (0 after its right_inverse), got a raw tensor whose diagonal is all ±1: a checkpoint of "
        "torch.nn.utils.parametrizations.orthogonal, which writes this layout too, with a map the checkpoint does "
        "not name. Saved with orthogonal_map='matrix_exp' or 'cayley' (GeoTorch's maps: build this model with the "
        f"same triv), set the diagonal of {raw} to 0 (the map ignores it) and load it; saved with 'householder' "
        "(torch's default for a non-square weight), another map of the same entries, load it into the model built "
        "with torch's orthogonal and assign its weight to this one (module.weight = W)."
    )


def _refuse_negative_det(M: nn.Module, W: Tensor, keys: str) -> None:
    """Raise ``ManifoldError`` where GeoTorch's ``GLp`` point ``W`` (float64) has det < 0 (Note [GeoTorch
    checkpoints], GL(n)'s two components)."""
    sign = torch.linalg.slogdet(W)[0]
    bad = sign < 0
    if not bool(bad.any()):
        return
    at = f" (first at batch index {first_index(bad)})" if bad.ndim else ""
    n = W.shape[-1]
    raise ManifoldError(
        f"{M.where}: loading GeoTorch's entries {keys}: expected a point of GLp (det > 0), got a point with "
        f"det < 0{at}: GeoTorch's GLp (its `invertible`) takes both components of GL(n) and a model that starts "
        "at det < 0 (about half of GeoTorch's random starts) stays there, while geofunc's GLp is the matrices of "
        "positive determinant, which cannot represent it. GeoTorch's GLp is its FixedRank of full rank, with the "
        f"same map and the same checkpoint entries: constrain the weight with geofunc.nn.fixed_rank(module, "
        f"tensor_name, rank={n}) (the class API: FixedRank(size, rank={n})), which takes both signs of the "
        "determinant, and load the checkpoint into that model."
    )


def _conversion_dtype(saved: Tensor, raw: Tensor) -> torch.dtype:
    """The dtype GeoTorch's point is converted in: the model's (Note [GeoTorch checkpoints]); the saved
    one for a bf16/fp16 model, whose cast then lifts a value below its floor as a dtype change does."""
    return saved.dtype if raw.dtype in LOW_PRECISION or not raw.is_floating_point() else raw.dtype


def _matches(M: nn.Module, saved: dict, layout: Optional[dict]) -> bool:
    from . import _manifolds as C

    if layout is None or not all(_concrete(v) and not v.is_complex() for v in saved.values()):
        return False
    if {k: tuple(v.shape) for k, v in saved.items()} != layout:
        return False
    # a geofunc Sphere's base has the radius as its norm; GeoTorch's, 1
    return not isinstance(M, C.Sphere) or _unit_rows(saved["0.base"])


def convert_geotorch_entries(M: nn.Module, plist: nn.Module, state_dict: dict, pre: str) -> None:
    """Replace GeoTorch's entries under ``pre`` (``<prefix>parametrizations.<name>.``) of ``state_dict``
    for the class ``M`` by geofunc's (Note [GeoTorch checkpoints]); nothing where they are not
    GeoTorch's layout. For a module constrained by a one-liner (or ``constrain``): its own
    ``_load_from_state_dict``, before torch loads the raw tensor."""
    from . import _manifolds as C

    if not isinstance(M, C._Manifold) or len(plist) != 1:
        return
    saved = {k[len(pre):]: v for k, v in state_dict.items()
             if k.startswith(pre) and (k[len(pre):].startswith("original") or k[len(pre):].startswith("0."))}
    if not _matches(M, saved, _geotorch_layout(M, plist.original)):
        return
    ref = saved["original0" if "original0" in saved else "original"]
    keys = ", ".join(pre + k for k in sorted(saved))
    Z, bases = _convert(M, saved, ref, keys, _conversion_dtype(ref, plist.original))
    for k in saved:
        del state_dict[pre + k]
    state_dict[pre + "original"] = Z
    for name, t in bases.items():
        state_dict[pre + "0." + name] = t


def convert_geotorch_bases(M: nn.Module, raw: Tensor, state_dict: dict, pre: str, assign: bool) -> bool:
    """The same for a class registered directly with ``register_parametrization`` (no constrained
    module's hook): called from the class's own ``_load_from_state_dict`` (``pre`` its prefix), when
    torch has already copied the saved raw tensor into ``raw``, which is re-written in place. Returns
    whether the entries were GeoTorch's (and so converted)."""
    from . import _manifolds as C

    if not isinstance(M, C._Manifold) or isinstance(M, C.Hurwitz):  # three raw tensors: torch's key error
        return False
    saved = {"0." + k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
    saved["original"] = raw.detach()
    if not _matches(M, saved, _geotorch_layout(M, raw)):
        return False
    keys = ", ".join(pre + k[2:] for k in sorted(saved) if k != "original")
    if assign:
        raise ManifoldError(f"{M.where}: loading GeoTorch's entries {keys} with assign=True into a class registered "
                            "directly: expected assign=False (the raw tensor is re-written in place), or the "
                            "constraint registered by a geofunc.nn one-liner or geofunc.nn.constrain.")
    Z, bases = _convert(M, saved, raw, keys)
    with torch.no_grad():
        raw.copy_(Z)
    for k in saved:
        if k != "original":
            del state_dict[pre + k[2:]]
    for name, t in bases.items():
        state_dict[pre + name] = t
    return True
