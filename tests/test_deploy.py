"""Deployment to ONNX (README: geofunc.nn, Deployment): ``torch.onnx.export(model, args, dynamo=True)``
run by onnxruntime, against the eager module; the TorchScript exporter (``dynamo=False``) refused.

torch.export's own deployment checks (every constraint, strict or not, saved and loaded) are in
tests/test_nn.py. Each ONNX export takes 1-4 s of CPU, so a few spaces stand for the rest: the
exponential chart (SO), a hyperbolic space (PoincareBall, through the exporter's default graph
optimization), a zuko flow (GLp), and a map ONNX cannot express (the Cayley chart's inverse), exported
as ``gf.nn.plain(model)``. Last, the spaces' own maps under ``torch.export`` with a dynamic batch against
an unbatched base, point or vector (a shared base, a prototype).
"""

from __future__ import annotations

import io

import numpy as np
import onnxruntime
import pytest
import torch
import zuko
from onnx import numpy_helper
from torch import nn

import geofunc as gf
import geofunc.nn as gnn
from geofunc.contrib.zuko import SpaceLinear

# torch 2.13's ONNX exporter deep-copies the exported program, whose pytree specs warn in copyreg
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


def _run(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own graph optimizer logs what it cannot fold
    session = onnxruntime.InferenceSession(model_bytes, options)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """float32: 1e-5 relative to the output's size (a static-schedule exponential against eager's,
    in other roundings; measured ≤ 5e-6 for raw values up to scale 10)."""
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=0,
                               msg=lambda msg: f"{what}: {msg}")


def test_onnx_export_keeps_the_map_for_other_parameter_values():
    """Without the exporter's graph optimization the program holds the map (the raw tensor and the base
    are initializers named as in the state_dict): raw values written into the file after export, at
    scales 0 to 10 and for another batch size, give the eager module's output for the same values: no
    decision taken from the traced values (the exponential's degree) is baked in."""
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4)).eval()
    x = torch.randn(3, 4)
    program = torch.onnx.export(m, (x,), dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    initializers = {t.name: t for t in proto.graph.initializer}
    raw = "parametrizations.weight.original"
    assert {raw, "parametrizations.weight.0.base"} <= set(initializers), list(initializers)
    x7 = torch.randn(7, 4)
    g = torch.Generator().manual_seed(1)
    for scale in (0.0, 0.01, 1.0, 10.0):
        new = torch.randn(4, 4, generator=g) * scale
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(new)
            want = m(x7)
        initializers[raw].CopyFrom(numpy_helper.from_array(new.numpy(), raw))
        _close(_run(proto.SerializeToString(), x7), want, f"raw values at scale {scale}")


def test_onnx_export_of_a_hyperbolic_layer_with_the_default_optimization():
    """With torch.onnx.export's defaults the graph optimizer folds the map into a constant weight (as
    gf.nn.plain would); the file computes the eager output for other inputs and batch sizes."""
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(4, 3), "weight", gf.PoincareBall(c=1.0)).eval()
    x = torch.randn(3, 4)
    program = torch.onnx.export(m, (x,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    names = {t.name for t in program.model_proto.graph.initializer}
    assert "parametrizations.weight.original" not in names, names  # folded (README)
    x7 = torch.randn(7, 4) * 3
    with torch.no_grad():
        _close(_run(program.model_proto.SerializeToString(), x7), m(x7), "PoincareBall, optimized")


def test_onnx_export_of_a_map_onnx_cannot_express_fails_in_translation_and_plain_exports():
    """ONNX has no inverse (nor SVD, QR or solve): the Cayley chart stops in torch's translation, naming
    the operator (README: the constraints it concerns; LowRank's SVD alike, a larger graph to capture);
    gf.nn.plain(model) exports and computes the eager output."""
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(4, 4), "weight", gf.SO(triv="cayley")).eval()
    x = torch.randn(3, 4)
    with pytest.raises(torch.onnx.OnnxExporterError, match=r"No ONNX function found for .*aten\.linalg_inv_ex"):
        torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    program = torch.onnx.export(gnn.plain(m), (x,), dynamo=True, verbose=False)
    x2 = torch.randn(3, 4)  # another input of the traced shape (no dynamic batch here)
    with torch.no_grad():
        _close(_run(program.model_proto.SerializeToString(), x2), m(x2), "SO(triv='cayley'), plain")


def test_onnx_export_of_a_zuko_flow_log_prob_and_inverse():
    """A flow of geofunc.contrib.zuko's SpaceLinear (GLp: the inverse by the factors the chart gives, no
    decomposition in the graph) exports its log-density and its inverse; both give the eager values."""
    torch.manual_seed(0)
    flow = zuko.flows.Flow(transform=[SpaceLinear(gf.GLp(), 3)], base=zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(3), torch.ones(3), buffer=True))
    with torch.no_grad():
        flow.transform.transforms[0].raw.normal_()

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = flow

        def forward(self, x):
            d = self.flow()  # one transform: W formed once, the inverse from its factors
            return torch.cat([d.log_prob(x).unsqueeze(-1), d.transform.inv(x)], -1)

    m = Both().eval()
    x = torch.randn(5, 3)
    program = torch.onnx.export(m, (x,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    x7 = torch.randn(7, 3) * 2
    with torch.no_grad():
        _close(_run(program.model_proto.SerializeToString(), x7), m(x7), "zuko flow of GLp")


# torch 2.13 deprecates its TorchScript-based exporter, which warns once on entry and once from its own
# logging set-up (typing_extensions' @deprecated, attributed to torch.onnx's module)
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
                            "ignore:The feature will be removed:DeprecationWarning:torch.onnx._internal.torchscript_exporter.utils")
def test_torchscript_onnx_export_refuses_a_constrained_module_and_exports_plain():
    """torch.onnx.export(dynamo=False) traces with torch.jit.trace, which would bake the exponential's
    degree chosen from the traced weight into the file (Note [Traced by torch.jit.trace]): refused with a
    ManifoldError naming what works; gf.nn.plain(model) exports and gives the eager output."""
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 4)).eval()
    x = torch.randn(3, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(
                gf.ManifoldError, match=r"got torch\.jit\.trace \(or a tool tracing with it: torch\.onnx\.export\(dynamo=False\)\).*"
                                        r"torch\.export\.export\(model, args\).*gf\.nn\.plain\(model\)"):
            torch.onnx.export(m, (x,), io.BytesIO(), dynamo=False)
    f = io.BytesIO()
    torch.onnx.export(gnn.plain(m), (x,), f, dynamo=False)
    with torch.no_grad():
        _close(_run(f.getvalue(), x), m(x), "SO, plain, TorchScript exporter")


@pytest.mark.parametrize(("rank", "shape"), [(4, (4, 4)), (2, (4, 4)), (3, (6, 3))], ids=["full-square", "low-square", "full-tall"])
def test_onnx_export_of_fixed_rank_needs_full_rank_and_square(rank, shape):
    """README: FixedRank exports where it is square of full rank (its chart is GLp's); below full rank
    the chart reads the SVD of its base's frames, which ONNX lacks, square or not (README said
    'square FixedRank' exports: FixedRank(rank=2) at 4×4 does not)."""
    torch.manual_seed(0)
    m = gnn.constrain(nn.Linear(shape[1], shape[0]), "weight", gf.FixedRank(rank=rank)).eval()
    x = torch.randn(3, shape[1])
    if rank == shape[0] == shape[1]:
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
        with torch.no_grad():
            _close(_run(program.model_proto.SerializeToString(), x), m(x), f"FixedRank({rank}) {shape}")
    else:
        with pytest.raises(torch.onnx.OnnxExporterError, match=r"No ONNX function found for .*aten\._linalg_svd"):
            torch.onnx.export(m, (x,), dynamo=True, verbose=False)


def _space_maps():
    g = torch.Generator().manual_seed(0)
    so, ball, sym, sphere = gf.SO(), gf.PoincareBall(c=1.0), gf.Sym(), gf.Sphere()
    return [  # (id, f(x, y), a batch of b arguments x, the unbatched y)
        ("SO.to_manifold(Z_b, base)", so.to_manifold, lambda b: torch.randn(b, 4, 4, generator=g), so.sample((4, 4), generator=g)),
        ("PoincareBall.dist(x_b, prototype)", ball.dist, lambda b: ball.sample((b, 5), generator=g), ball.sample((5,), generator=g)),
        ("Sym.tangent(X_b, G)", sym.tangent, lambda b: sym.sample((b, 4, 4), generator=g), torch.randn(4, 4, generator=g)),
        ("Sphere.inner(x_b, u, u)", lambda x, u: sphere.inner(x, u, u), lambda b: sphere.sample((b, 3, 4), generator=g),
         torch.randn(3, 4, generator=g)),
    ]


@pytest.mark.parametrize("case", _space_maps(), ids=lambda c: c[0])
def test_torch_export_of_a_map_with_a_dynamic_batch_against_an_unbatched_argument(case):
    """Non-strict torch.export (torch's default) with torch.export.Dim on the batch: the maps compared
    a batch shape (b, n, k) with an unbatched (n, k) as tuples, which compare their first sizes, so
    export met the guard b != n and refused the program ("Constraints violated (b)! ... the generated
    guard L['x'].size()[0] != 4"; Note [Shape comparisons under a dynamic batch]). The program now
    computes the eager values for other batch sizes, the point size among them."""
    name, f, batch, y = case

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("y", y)

        def forward(self, x):
            return f(x, self.y)

    m = M()
    ep = torch.export.export(m, (batch(7),), dynamic_shapes=({0: torch.export.Dim("b")},), strict=False)
    for b in (2, 3, 4, 5, 11):
        x = batch(b)
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-6, rtol=1e-6, msg=lambda msg: f"{name}, batch {b}: {msg}")
