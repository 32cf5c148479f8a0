"""The pytree lift (geofunc/_pytree.py): constraints by name or prefix, pass-through, bases, errors."""

from __future__ import annotations

import warnings

import numpy as np

import optree
import pytest
import torch
from helpers import COMPILE_PYTREES, needs_torch
from reference import member, on_spaces
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as torch_pytree

import geofunc as gf

F64 = torch.float64


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).to(F64)


CONSTRAINTS = {"0.weight": gf.Stiefel(), "2.weight": gf.SO(triv="cayley"), "4.weight": gf.Sphere(), "2.bias": gf.Rn()}


def _params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return gf.sample(CONSTRAINTS, {k: v.detach() for k, v in _model().named_parameters()}, generator=generator)


def _close(a, b, tol=1e-12) -> None:
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def test_roundtrip_passthrough_and_bases(generator):
    params = {k: v.detach() for k, v in _model().named_parameters()}
    points = gf.sample(CONSTRAINTS, params, generator=generator)
    assert list(points) == list(params)  # key order kept
    for k in ("0.bias", "4.bias"):
        assert points[k] is params[k]  # unconstrained: the same object
    assert all(on_spaces(CONSTRAINTS, points).values())
    assert set(gf.contains(CONSTRAINTS, points)) == set(CONSTRAINTS)
    raw, bases = gf.from_manifold(CONSTRAINTS, points)
    assert raw["0.bias"] is points["0.bias"]
    # bases: only constrained entries with a base (Rn has none); no None leaves anywhere
    assert set(bases) == {"0.weight", "2.weight", "4.weight"}
    back = gf.to_manifold(CONSTRAINTS, raw, bases)
    assert back["4.bias"] is raw["4.bias"]
    _close(back, points)
    raw2, bases2 = gf.rebase(CONSTRAINTS, raw, bases)
    _close(gf.to_manifold(CONSTRAINTS, raw2, bases2), points)
    for k in bases2:
        assert bool((raw2[k] == 0).all())


def test_rebase_moves_the_base(generator):
    points = _params(generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, points)
    step = {k: 0.1 * torch.randn(v.shape, generator=generator, dtype=F64) for k, v in raw.items()}
    moved = {k: raw[k] + step[k] for k in raw}
    target = gf.to_manifold(CONSTRAINTS, moved, bases)
    raw2, bases2 = gf.rebase(CONSTRAINTS, moved, bases)
    _close(gf.to_manifold(CONSTRAINTS, raw2, bases2), target, tol=1e-10)
    for k in ("0.weight", "2.weight", "4.weight"):
        assert bool((raw2[k] == 0).all())
        torch.testing.assert_close(bases2[k], target[k], atol=1e-10, rtol=0)
    assert raw2["0.bias"] is moved["0.bias"]


def test_tangent_retract_over_tree(generator):
    points = _params(generator)
    G = {k: torch.randn(v.shape, generator=generator, dtype=F64) for k, v in points.items()}
    V = gf.tangent(CONSTRAINTS, points, G)
    assert V["0.bias"] is G["0.bias"]  # identity where unconstrained
    _close(gf.tangent(CONSTRAINTS, points, V), V)  # a projection
    new = gf.retract(CONSTRAINTS, points, {k: 0.1 * v for k, v in V.items()})
    torch.testing.assert_close(new["0.bias"], points["0.bias"] + 0.1 * G["0.bias"])
    assert all(on_spaces(CONSTRAINTS, new).values())


def test_nested_prefix_and_dotted_names(generator):
    tree = {
        "enc": {"w": torch.zeros(3, 3, dtype=F64), "b": torch.zeros(3, dtype=F64)},
        "layers": [torch.zeros(5, 2, dtype=F64), torch.zeros(2, dtype=F64)],
        "pair": (torch.zeros(4, dtype=F64), torch.zeros(4, 4, dtype=F64)),
    }
    by_name = {"enc.w": gf.SO(), "layers.0": gf.Stiefel(), "pair.0": gf.Sphere()}
    by_prefix = {"enc": {"w": gf.SO()}, "layers": [gf.Stiefel(), None], "pair": (gf.Sphere(), None)}
    a = gf.sample(by_name, tree, generator=torch.Generator().manual_seed(1))
    b = gf.sample(by_prefix, tree, generator=torch.Generator().manual_seed(1))
    _close(a, b, tol=0)
    assert a["enc"]["b"] is tree["enc"]["b"] and a["pair"][1] is tree["pair"][1]
    assert set(gf.contains(by_prefix, a)) == {"enc.w", "layers.0", "pair.0"}
    raw, bases = gf.from_manifold(by_prefix, a)
    assert set(bases) == {"enc.w", "layers.0", "pair.0"}
    _close(gf.to_manifold(by_name, raw, bases), a)
    # a whole list of parameters constrained by one space (each entry its own point)
    lst = {"ws": [torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)]}
    s = gf.sample({"ws": gf.SO()}, lst, generator=generator)
    assert all(member(gf.SO(), w) for w in s["ws"])
    assert set(gf.contains({"ws": gf.SO()}, s)) == {"ws.0", "ws.1"}


@pytest.mark.parametrize(
    "constraints, tree",
    [
        ({0: gf.SO(), "0": gf.Sym()}, [torch.zeros(3, 3, dtype=F64)]),  # an int and a str key, one list entry
        ({"0": gf.Sym(), 0: gf.SO()}, [torch.zeros(3, 3, dtype=F64)]),  # either order
        ({0: gf.SO(), "0": gf.Sym()}, {0: torch.zeros(3, 3, dtype=F64)}),  # a dict with int keys
        ({"a.b": gf.SO(), "a": {"b": gf.Sym()}}, {"a": {"b": torch.zeros(3, 3, dtype=F64)}}),  # dotted and nested
    ],
    ids=["int-str", "str-int", "int-keyed-dict", "dotted-nested"],
)
def test_two_keys_for_one_entry_are_a_manifold_error(constraints, tree):
    """Two constraint keys that name one parameter are refused, whatever their form and order (an int
    and a str key used to let the last one win, silently)."""
    for fn in (lambda: gf.sample(constraints, tree), lambda: gf.from_manifold(constraints, tree)):
        with pytest.raises(gf.ManifoldError, match="constrained twice"):
            fn()


def test_product_on_a_subtree(generator):
    space = gf.Product(gf.SO(), gf.Sphere())
    tree = {"pair": (torch.zeros(3, 3, dtype=F64), torch.zeros(4, dtype=F64)), "b": torch.zeros(2, dtype=F64)}
    c = {"pair": space}
    p = gf.sample(c, tree, generator=generator)
    assert isinstance(p["pair"], tuple) and member(space, p["pair"])
    assert set(gf.contains(c, p)) == {"pair"}
    raw, bases = gf.from_manifold(c, p)
    _close(gf.to_manifold(c, raw, bases), p)


def test_sample_of_a_product_keeps_each_factors_dtype():
    """A Product's factors may have their own dtypes: ``gf.sample`` draws each like its own tensor
    (it gave every factor the first one's dtype: float64 for a float32 factor, and raised for a
    real factor beside a complex one), with the draws of ``Product.sample`` where the dtypes agree."""
    space = gf.Product(gf.SO(), gf.Sphere())
    tree = {"pair": (torch.zeros(3, 3, dtype=F64), torch.zeros(2, 4, dtype=torch.float32))}
    p = gf.sample({"pair": space}, tree, generator=torch.Generator().manual_seed(0))
    assert [x.dtype for x in p["pair"]] == [F64, torch.float32]
    assert member(space, p["pair"])
    mixed = gf.Product(gf.Unitary(), gf.SO())
    tree = {"pair": (torch.zeros(3, 3, dtype=torch.complex64), torch.zeros(3, 3, dtype=torch.float32))}
    p = gf.sample({"pair": mixed}, tree, generator=torch.Generator().manual_seed(0))
    assert [x.dtype for x in p["pair"]] == [torch.complex64, torch.float32]
    assert member(mixed, p["pair"])
    same = {"pair": (torch.zeros(3, 3, dtype=F64), torch.zeros(4, dtype=F64))}
    p = gf.sample({"pair": space}, same, generator=torch.Generator().manual_seed(1))
    q = space.sample(((3, 3), (4,)), generator=torch.Generator().manual_seed(1), dtype=F64)
    _close(p["pair"], q, tol=0)


def test_errors_name_the_parameter():
    params = {k: v.detach() for k, v in _model().named_parameters()}
    with pytest.raises(gf.ManifoldError, match=r"no parameter named '1\.weight'"):
        gf.sample({"1.weight": gf.SO()}, params)
    with pytest.raises(gf.ManifoldError, match=r"parameter '0\.weight'.*square"):
        gf.sample({"0.weight": gf.SO()}, params)  # 6 x 4
    with pytest.raises(gf.ManifoldError, match=r"parameter '4\.bias'"):
        gf.to_manifold({"4.bias": gf.SO()}, params)  # a vector for a matrix space
    with pytest.raises(gf.ManifoldError, match=r"parameter '0\.weight'.*point on the space"):
        gf.from_manifold({"0.weight": gf.Stiefel()}, {"0.weight": torch.ones(6, 4, dtype=F64)})
    with pytest.raises(gf.ManifoldError, match="tuple"):
        gf.sample({("0.weight", "2.weight"): gf.SO()}, params)
    with pytest.raises(gf.ManifoldError, match="no constraint names"):
        gf.to_manifold({"2.weight": gf.SO()}, params, {"0.weight": torch.eye(6)})
    with pytest.raises(gf.ManifoldError, match="structure"):
        gf.tangent({"2.weight": gf.SO()}, params, {"2.weight": params["2.weight"]})


def test_a_space_on_a_missing_tensor_and_structure_errors_without_tensor_dumps():
    # A space on a None entry (e.g. a bias=None slot) raised a bare IndexError from gf.sample.
    params = {"w": torch.zeros(3, 3, dtype=F64), "b": None}
    for fn in (lambda: gf.sample({"b": gf.SO()}, params),
               lambda: gf.from_manifold({"b": gf.SO()}, params),
               lambda: gf.to_manifold({"b": gf.SO()}, params),
               lambda: gf.contains({"b": gf.SO()}, params)):
        with pytest.raises(gf.ManifoldError, match=r"parameter 'b': SO\(triv='expm'\): expected `[XZ]` to be a tensor"):
            fn()
    # A structure mismatch names the structures, never prints tensor values (DESIGN.md §5).
    secret = torch.full((3, 3), 12345.678, dtype=F64)
    with pytest.raises(gf.ManifoldError, match="structure") as info:
        gf.tangent({"w": gf.SO()}, {"w": torch.eye(3, dtype=F64), "v": secret}, {"w": secret})
    assert "12345" not in str(info.value) and "tensor(" not in str(info.value), str(info.value)
    # A tensor given where a space belongs (a params dict passed as constraints) is named by shape too.
    for constraints, params, want in (({"w": secret}, {"w": torch.eye(3, dtype=F64)}, r"parameter 'w'.*shape \(3, 3\)"),
                                      (secret, {"w": torch.eye(3, dtype=F64)}, r"shape \(3, 3\)"),
                                      ((secret,), [torch.eye(3, dtype=F64)], r"got a tuple of 1 entries")):
        with pytest.raises(gf.ManifoldError, match=want) as info:
            gf.sample(constraints, params)
        assert "12345" not in str(info.value) and "tensor(" not in str(info.value), str(info.value)


def test_containers_are_pytrees_for_torch_and_optree(generator):
    points = _params(generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, points)
    opt = gf.optim.radam(CONSTRAINTS, 1e-2)
    state = opt.init(points)
    for tree in (bases, state, gf.contains(CONSTRAINTS, points)):
        for leaves in (torch_pytree.tree_leaves(tree), optree.tree_leaves(tree)):
            assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
        assert len(torch_pytree.tree_leaves(tree)) == len(optree.tree_leaves(tree))


def test_vmap_over_raw_and_bases_of_stacked_models(generator):
    model = _model()
    K = 4
    stacked = {k: torch.stack([v.detach()] * K) for k, v in model.named_parameters()}
    points = gf.sample(CONSTRAINTS, stacked, generator=generator)  # K independent points
    raw, bases = gf.from_manifold(CONSTRAINTS, points)  # batched spaces: no vmap needed
    x = torch.randn(5, 4, generator=generator, dtype=F64)

    def loss(raw, bases, x):
        p = gf.to_manifold(CONSTRAINTS, raw, bases)
        return functional_call(model, p, (x,)).square().mean()

    # in_dims=0 over whole (raw, bases): bases has no None leaves
    vals, grads = vmap(torch.func.grad_and_value(loss), in_dims=(0, 0, None))(raw, bases, x)[::-1]
    for i in range(K):
        ri = {k: v[i] for k, v in raw.items()}
        bi = {k: v[i] for k, v in bases.items()}
        torch.testing.assert_close(vals[i], loss(ri, bi, x), atol=1e-12, rtol=1e-12)
        _close({k: v[i] for k, v in grads.items()}, grad(loss)(ri, bi, x))
    # from_manifold inside vmap returns a vmap-able (None-free) bases dict too
    raw_v, bases_v = vmap(lambda p: gf.from_manifold(CONSTRAINTS, p))(points)
    _close(bases_v, bases)


def test_bases_of_a_product_with_a_factor_without_a_base_vmap(generator):
    """A Product's base holds None for a factor without one (Rn, Sym, ...): ``bases`` of a Product(SO(), Rn())
    entry had a None leaf, and vmap over (raw, bases) of stacked models, or of gf.from_manifold, raised,
    where the factors constrained apart worked. Note [Bases of products without None] in geofunc/_pytree.py."""
    K = 3
    c = {"pair": gf.Product(gf.SO(), gf.Rn()), "nest": gf.Product(gf.Sphere(), gf.Product(gf.Sym(), gf.Rn())),
         "free": gf.Product(gf.Rn(), gf.Sym())}
    tree = {"pair": (torch.zeros(K, 3, 3, dtype=F64), torch.zeros(K, 1, dtype=F64)),
            "nest": (torch.zeros(K, 4, dtype=F64), (torch.zeros(K, 2, 2, dtype=F64), torch.zeros(K, 1, dtype=F64))),
            "free": (torch.zeros(K, 1, dtype=F64), torch.zeros(K, 2, 2, dtype=F64))}
    points = gf.sample(c, tree, generator=generator)
    raw, bases = gf.from_manifold(c, points)
    assert set(bases) == {"pair", "nest"}  # no factor of "free" has a base: no entry, as for Rn alone
    for tree_ in (bases, gf.rebase(c, raw, bases)[1]):
        assert all(isinstance(x, torch.Tensor) for x in torch_pytree.tree_leaves(tree_))
        assert all(isinstance(x, torch.Tensor) for x in optree.tree_leaves(tree_, none_is_leaf=True))
    _close(gf.to_manifold(c, raw, bases), points)
    _close(vmap(lambda r, b: gf.to_manifold(c, r, b))(raw, bases), points)
    raw_v, bases_v = vmap(lambda p: gf.from_manifold(c, p))(points)
    _close(bases_v, bases)
    _close(raw_v, raw)
    raw2, bases2 = vmap(lambda r, b: gf.rebase(c, r, b))(raw, bases)
    _close(gf.to_manifold(c, raw2, bases2), points)
    # the factors' own form (None for a factor's base) is still taken
    given = {"pair": (bases["pair"][0], None), "nest": (bases["nest"][0], None)}
    _close(gf.to_manifold(c, raw, given), points)


def test_sample_is_reproducible_and_vmap_different(generator):
    params = {k: v.detach() for k, v in _model().named_parameters()}
    a = gf.sample(CONSTRAINTS, params, generator=torch.Generator().manual_seed(3))
    b = gf.sample(CONSTRAINTS, params, generator=torch.Generator().manual_seed(3))
    _close(a, b, tol=0)
    # K points inside vmap: randomness="different" draws one batch from the generator
    K = 3
    stacked = {k: torch.stack([v] * K) for k, v in params.items()}
    inside = vmap(
        lambda p: gf.sample(CONSTRAINTS, p, generator=torch.Generator().manual_seed(5)), randomness="different"
    )(stacked)
    assert all(on_spaces(CONSTRAINTS, inside).values())
    for k in CONSTRAINTS:
        assert not torch.allclose(inside[k][0], inside[k][1])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda p: gf.sample(CONSTRAINTS, p))(stacked)  # default randomness="error"


@needs_torch(COMPILE_PYTREES, "Dynamo tracing optree")
def test_compiles_fullgraph(generator):
    points = _params(generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, points)

    def f(raw, bases):
        r2, b2 = gf.rebase(CONSTRAINTS, raw, bases)
        return gf.to_manifold(CONSTRAINTS, r2, b2)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(raw, bases)
    _close(out, points, tol=1e-10)


def test_from_manifold_on_meta_tensors_checks_shapes_only():
    """Deferred initialization: meta tensors have no values, so only shapes are validated."""
    params = {"w": torch.empty(5, 3, device="meta"), "b": torch.empty(3, device="meta")}
    raw, bases = gf.from_manifold({"w": gf.Stiefel()}, params)
    assert raw["w"].is_meta and raw["w"].shape == (5, 3)
    with pytest.raises(gf.ManifoldError, match="parameter 'w'"):
        gf.from_manifold({"w": gf.SO()}, params)


@pytest.mark.parametrize(
    "params, one",
    [
        ({"a": {"b.c": torch.zeros(3, 3, dtype=F64)}, "a.b": {"c": torch.zeros(3, 3, dtype=F64)}}, "a"),  # dotted keys
        ({0: torch.zeros(3, 3, dtype=F64), "0": torch.zeros(3, 3, dtype=F64)}, 0),  # an int and a str key
        ({"x": {"y.z": torch.zeros(3, 3, dtype=F64), "y": {"z": torch.zeros(3, 3, dtype=F64)}}}, "x.y.z"),  # nested
    ],
    ids=["dotted", "int-str", "nested"],
)
def test_entries_whose_names_collide_are_a_manifold_error(params, one, generator):
    """Two constrained entries whose paths join to one name shared one key of `bases` (the second
    base overwrote the first: a wrong point, silently) and of gf.contains (an entry dropped)."""
    c = gf.SO()  # at the root: every tensor its own entry
    points = gf.sample(c, params, generator=generator)  # keys nothing by name: fine
    raw = {k: v for k, v in points.items()}
    for fn in (lambda: gf.from_manifold(c, points), lambda: gf.contains(c, points),
               lambda: gf.to_manifold(c, raw), lambda: gf.rebase(c, raw)):
        with pytest.raises(gf.ManifoldError, match=r"are both named .*Rename a key") as info:
            fn()
        assert "paths" in str(info.value)
    # one of the two unconstrained: no collision, and the round trip holds
    c2 = {one: gf.SO()}
    assert len(gf.contains(c2, points)) == 1
    raw, bases = gf.from_manifold(c2, points)
    _close(gf.to_manifold(c2, raw, bases), points, tol=1e-12)


@pytest.mark.parametrize(
    "constraints",
    [
        {"layers": {"0": gf.SO()}, "layers.1": gf.Sym()},
        {"layers.1": gf.Sym(), "layers": {0: gf.SO()}},  # either order, an int key
        {"layers": [gf.SO(), None], "layers.1": gf.Sym()},  # a structural prefix and a name
        {"net": {"layers": {"0": gf.SO()}}, "net.layers.1": gf.Sym(), "layers": {"0": gf.SO()}, "layers.1": gf.Sym()},
        {"net": {"layers": {"0": gf.SO()}}, "net.layers": {"1": gf.Sym()}, "layers": {"0": gf.SO(), "1": gf.Sym()}},
    ],
    ids=["mapping", "int-key", "prefix", "deep", "two-mappings"],
)
def test_a_subtree_mapping_and_dotted_names_into_it_merge(constraints, generator):
    """`{"layers": {"0": SO}, "layers.1": SO}` said 'layers' was constrained twice; it is
    `{"layers.0": SO, "layers.1": SO}`."""
    tree = {"layers": [torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)], "b": torch.zeros(2, dtype=F64)}
    if "net" in constraints:
        tree["net"] = {"layers": [torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)]}
    flat = {"layers.0": gf.SO(), "layers.1": gf.Sym()}
    if "net" in constraints:
        flat.update({"net.layers.0": gf.SO(), "net.layers.1": gf.Sym()})
    a = gf.sample(constraints, tree, generator=torch.Generator().manual_seed(2))
    b = gf.sample(flat, tree, generator=torch.Generator().manual_seed(2))
    _close(a, b, tol=0)
    assert set(gf.contains(constraints, a)) == set(flat)
    raw, bases = gf.from_manifold(constraints, a)
    _close(gf.to_manifold(flat, raw, bases), a)


@pytest.mark.parametrize(
    "constraints, message",
    [
        ({"layers": {"0": gf.SO()}, "layers.0": gf.Sym()},
         r"'layers\.0' is constrained twice: the key '0' in the constraints for 'layers' and the name 'layers\.0'"),
        ({"layers": {0: gf.SO()}, "layers.0": gf.Sym()}, r"'layers\.0' is constrained twice: the keys 0 and '0'"),
        ({"layers": [gf.SO(), None], "layers.0": gf.Sym()}, r"'layers\.0' is constrained twice"),
        ({"layers": gf.SO(), "layers.1": gf.Sym()},
         r"'layers\.1' is constrained twice: 'layers' gives SO\(.*\) for every tensor"),
        ({"layers": None, "layers.1": gf.Sym()}, r"'layers\.1' is constrained twice: 'layers' gives None"),
        ({"a": {"b": {"c": gf.SO()}}, "a.b": {"c": gf.Sym()}}, r"'a\.b\.c' is constrained twice"),
        ({"layers": gf.SO(), "layers.7": gf.Sym()}, r"no parameter named 'layers\.7'"),
    ],
    ids=["same-key", "int-str", "prefix", "space-and-name", "none-and-name", "two-mappings", "no-such"],
)
def test_a_real_double_constraint_names_the_parameter_and_both_keys(constraints, message):
    tree = {"layers": [torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)],
            "a": {"b": {"c": torch.zeros(3, 3, dtype=F64)}}}
    with pytest.raises(gf.ManifoldError, match=message):
        gf.sample(constraints, tree)


def test_retract_on_unconstrained_entries_names_the_parameter(generator):
    """A None vector was a bare TypeError and a wrong shape a bare RuntimeError (or, broadcasting, a
    parameter of another shape); constrained entries already raised a ManifoldError naming the
    parameter. tangent / egrad_to_rgrad / transport are the identity there: None passes through."""
    c = {"w": gf.SO()}
    p = gf.sample(c, {"w": torch.empty(3, 3, dtype=F64), "b": torch.zeros(2, dtype=F64),
                      "sub": {"u": [torch.zeros(4, dtype=F64), None]}}, generator=generator)
    V = {"w": torch.zeros(3, 3, dtype=F64), "b": torch.ones(2, dtype=F64),
         "sub": {"u": [torch.ones(4, dtype=F64), None]}}
    out = gf.retract(c, p, V)
    torch.testing.assert_close(out["b"], p["b"] + 1)
    torch.testing.assert_close(out["sub"]["u"][0], p["sub"]["u"][0] + 1)
    assert out["sub"]["u"][1] is None
    for fn in (gf.tangent, gf.egrad_to_rgrad):
        assert fn(c, p, {**V, "b": None})["b"] is None
    assert gf.transport(c, p, p, {**V, "b": None})["b"] is None
    cases = [
        ({**V, "b": None}, r"parameter 'b' \(unconstrained: X \+ V\): expected `V` to be a tensor, got None"),
        ({**V, "b": torch.zeros(3, dtype=F64)},
         r"parameter 'b' .*expected `V` with the shape of `X` \(2,\), got shape \(3,\)"),
        ({**V, "b": torch.zeros(5, 2, dtype=F64)}, r"parameter 'b' .*\(2,\), got shape \(5, 2\)"),  # broadcasts
        ({**V, "b": torch.zeros(1, dtype=F64)}, r"parameter 'b' .*\(2,\), got shape \(1,\)"),  # broadcasts
        ({**V, "sub": {"u": [torch.zeros(5, dtype=F64), None]}}, r"parameter 'sub\.u\.0' .*\(4,\), got shape \(5,\)"),
        ({**V, "sub": {"u": [None, None]}}, r"parameter 'sub\.u\.0' .*to be a tensor, got None"),
        ({**V, "sub": {"v": None}}, r"parameter 'sub' .*structure"),
        ({**V, "w": None}, r"parameter 'w': SO\(triv='expm'\): expected `V` to be a tensor, got None"),
    ]
    for vec, message in cases:
        with pytest.raises(gf.ManifoldError, match=message):
            gf.retract(c, p, vec)


def test_vectors_at_unconstrained_entries_are_checked_as_retract_checks_them(generator):
    """Regression (Note [Vectors at unconstrained entries] in geofunc/_pytree.py): tangent, egrad_to_rgrad
    and transport are the identity on an unconstrained entry and took anything there: gf.tangent returned
    a (4,) vector (or a list) for a (3,) bias, radam broadcast a (1,) bias gradient over the bias silently
    (rsgd refused it in X + V), and an integer or NumPy gradient raised torch.finfo's TypeError or an
    AttributeError inside Adam. Each is now the ManifoldError retract gives, naming the parameter; a
    vector of the entry's shape and dtype (or float32 beside bf16) is returned as it is, None too."""
    c = {"w": gf.Stiefel(), "b": None}
    p = {"w": gf.Stiefel().sample((4, 3), generator=generator), "b": torch.zeros(3), "sub": [torch.zeros(2)]}
    V = {"w": torch.zeros(4, 3), "b": torch.ones(3), "sub": [torch.ones(2)]}
    calls = {"tangent": lambda v: gf.tangent(c, p, v), "egrad_to_rgrad": lambda v: gf.egrad_to_rgrad(c, p, v),
             "transport": lambda v: gf.transport(c, p, p, v)}
    for name, call in calls.items():
        out = call(V)
        assert out["b"] is V["b"] and out["sub"][0] is V["sub"][0], name
        assert call({**V, "b": None})["b"] is None, name
        for bad, message in [(torch.ones(1), r"with the shape of `X` \(3,\), got shape \(1,\)"),
                             (torch.ones(4), r"with the shape of `X` \(3,\), got shape \(4,\)"),
                             ([1.0, 1.0, 1.0], r"to be a tensor, got a list of 3 entries"),
                             (np.ones(3), r"to be a tensor, got a numpy\.ndarray"),
                             (torch.ones(3, dtype=torch.int64), r"of the dtype of `X` \(torch\.float32\), got .*int64"),
                             (torch.ones(3, device="meta"), r"on the device of `X` \(cpu\)")]:
            with pytest.raises(gf.ManifoldError, match=r"parameter 'b' \(unconstrained: the identity on V\): expected "
                                                       r"`V` " + message):
                call({**V, "b": bad})
        with pytest.raises(gf.ManifoldError, match=r"parameter 'sub\.0' .*got shape \(3,\)"):
            call({**V, "sub": [torch.ones(3)]})
    low = {"w": p["w"].bfloat16(), "b": p["b"].bfloat16(), "sub": [p["sub"][0].bfloat16()]}
    assert gf.tangent(c, low, V)["b"] is V["b"]  # a float32 vector at a bf16 entry: retract takes it too
    for opt in (gf.optim.radam(c, lr=0.1), gf.optim.rsgd(c, lr=0.1)):
        for bad in (torch.ones(1), torch.ones(3, dtype=torch.int64), np.ones(3)):
            with pytest.raises(gf.ManifoldError, match=r"parameter 'b' "):
                opt.update({**V, "b": bad}, opt.init(p), p)


def test_retract_keeps_the_dtype_of_unconstrained_entries(generator):
    """On an unconstrained entry ``retract`` is ``X + V`` with the dtype rule of the constrained entries:
    ``V`` of ``X``'s dtype, or float32 for a bf16/fp16 ``X`` (computed in float32, rounded back). Torch's
    promotion silently turned a bf16 bias into a float32 one, and a float32 one into float64, while the
    constrained weight of the same call stayed bf16 or was refused: ``gf.optim.rsgd``/``radam`` steps of a
    bf16 model with float32 gradients left every unconstrained parameter in float32."""
    c = {"w": gf.Sphere()}
    for low in (torch.bfloat16, torch.float16):
        p = {"w": gf.Sphere().sample((3,), generator=generator).to(low), "b": torch.zeros(3, dtype=low)}
        V = {"w": torch.full((3,), 0.1), "b": torch.full((3,), 0.1)}
        out = gf.retract(c, p, V)
        assert out["w"].dtype == out["b"].dtype == low
        torch.testing.assert_close(out["b"], torch.full((3,), 0.1).to(low), atol=0, rtol=0)
        for opt in (gf.optim.rsgd(c, 0.1, momentum=0.9), gf.optim.radam(c, 0.1)):
            q, state = p, opt.init(p)
            for _ in range(2):
                q, state = opt.update({k: torch.randn(v.shape, generator=generator) for k, v in q.items()}, state, q)
            assert q["w"].dtype == q["b"].dtype == low, opt
    p = {"w": gf.Sphere().sample((3,), generator=generator), "b": torch.zeros(3)}
    for bad in (torch.float64, torch.int64, torch.complex64):
        with pytest.raises(gf.ManifoldError, match=r"parameter 'b' \(unconstrained: X \+ V\): expected `V` of the dtype "
                                                   r"of `X` \(torch.float32\), got .*" + str(bad).replace(".", r"\.")):
            gf.retract(c, p, {"w": torch.zeros(3), "b": torch.ones(3, dtype=bad)})
    with pytest.raises(gf.ManifoldError, match=r"parameter 'b' .*expected `V` on the device of `X` \(cpu\)"):
        gf.retract(c, p, {"w": torch.zeros(3), "b": torch.ones(3, device="meta")})


def test_bases_and_raw_may_be_any_mapping():
    """``to_manifold``/``rebase`` take ``bases`` as any mapping (they check ``isinstance(bases,
    Mapping)``), and ``gf.nn.module_state``/``load_functional`` only read ``raw`` and ``bases``. They
    were annotated ``dict[str, ...]``: ``dict`` is invariant, so mypy and pyright (geofunc ships
    py.typed) refused raw tensors kept as ``dict[str, nn.Parameter]`` for a torch.optim optimizer, and
    a ``Mapping[str, Tensor]`` argument (what mypy itself advises for read-only parameters): false
    errors. The annotations say Mapping, and a read-only mapping works."""
    import types
    import typing
    from collections.abc import Mapping

    import geofunc.nn as gnn

    for fn, names in ((gf.to_manifold, ("bases",)), (gf.rebase, ("bases",)),
                      (gnn.module_state, ("raw", "bases")), (gnn.load_functional, ("raw", "bases"))):
        hints = typing.get_type_hints(fn)
        for n in names:
            args = typing.get_args(hints[n]) if typing.get_origin(hints[n]) in (typing.Union, types.UnionType) else (hints[n],)
            assert any(typing.get_origin(a) is Mapping for a in args), f"{fn.__name__}({n}: {hints[n]})"
    model = gnn.orthogonal(torch.nn.Linear(4, 3))
    c, raw, bases = gnn.functional(model)
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in raw.items()}
    ro = types.MappingProxyType(bases)
    expected = gf.to_manifold(c, raw, bases)["weight"]
    torch.testing.assert_close(gf.to_manifold(c, params, ro)["weight"], expected, atol=0, rtol=0)
    new_raw, new_bases = gf.rebase(c, params, ro)
    gnn.load_functional(model, types.MappingProxyType(new_raw), types.MappingProxyType(new_bases))
    torch.testing.assert_close(model.weight, expected, atol=1e-6, rtol=0)
    assert set(gnn.module_state(model, types.MappingProxyType(raw), ro)) == set(dict(model.named_parameters())) | set(dict(model.named_buffers()))


def test_constraint_keys_matched_by_index_as_by_scan():
    # Note [Matching keys by index]: the lookup answers what the scan answered, first match included
    from geofunc._pytree import _Index, _match

    entries_sets = [["a", "b", "0", 0, 1, "1.5"], [0, 1, 2, True], [1.0, "1", 1], ["x.y", "x", 3], [], [(1, 2), "a"]]
    keys = ["a", "b", "0", 0, 1, "1", 1.0, True, "x", "x.y", "3", 3, "c", 2, "2", "1.5", 1.5, (1, 2), "(1, 2)"]
    for entries in entries_sets:
        index = _Index(entries)
        for key in keys:
            assert index.match(key) == _match(key, entries), (entries, key)


def test_many_constraints_plan_as_before():
    # a flat dict of many parameters, some constrained by name, some by an integer-like name of a list
    params = {f"w{i}": torch.zeros(3) for i in range(300)}
    from geofunc import _pytree

    params["layers"] = [torch.eye(2) for _ in range(3)]
    constraints = {f"w{i}": gf.Sphere() for i in range(0, 300, 2)}
    constraints["layers.1"] = gf.SO()
    plan = _pytree._plan(constraints, params, ())
    names = [e.name for e in optree.tree_leaves(plan, is_leaf=_pytree._is_plan_leaf) if isinstance(e, _pytree._Entry)]
    assert sorted(names) == sorted([f"w{i}" for i in range(0, 300, 2)] + ["layers.1"])
    with pytest.raises(gf.ManifoldError, match="constrained twice"):
        _pytree._plan({"layers.1": gf.SO(), "layers": {1: gf.SO()}}, params, ())


#: (name the eager error gives, points' unconstrained part, a (1,) vector at its (3,) bias, a right one)
_UNCONSTRAINED = {
    "entry": ("'bias'", lambda: {"bias": torch.zeros(3)}, lambda: {"bias": torch.ones(1)}, lambda: {"bias": torch.ones(3)}),
    "subtree": ("'mlp.bias'", lambda: {"mlp": {"bias": torch.zeros(3), "scales": [torch.zeros(2)]}},
                lambda: {"mlp": {"bias": torch.ones(1), "scales": [torch.ones(2)]}},
                lambda: {"mlp": {"bias": torch.ones(3), "scales": [torch.ones(2)]}}),
}


@pytest.mark.parametrize(("where", "op"), [("entry", "retract"), ("entry", "tangent"), ("entry", "radam"),
                                           ("subtree", "tangent"), ("subtree", "radam")])
def test_compiled_maps_refuse_a_wrong_shaped_vector_at_an_unconstrained_entry(where, op):
    """Under torch.compile the unconstrained entries skipped their vector check: a (1,) vector at a (3,)
    bias was broadcast silently (retract's X + V, radam's step) or returned as the bias's tangent vector,
    where the eager call raises (Note [Vectors at unconstrained entries]); inside a subtree (a module's
    unconstrained layers) too, where only retract's X + V already refused it."""
    name, free, bad, right = _UNCONSTRAINED[where]
    C = {"w": gf.Sphere()}
    P = {"w": gf.Sphere().sample((3,), generator=torch.Generator().manual_seed(0)), **free()}
    V = {"w": torch.zeros(3), **bad()}
    if op == "radam":
        opt = gf.optim.radam(C, lr=0.1)
        state = opt.init(P)
        f = lambda V, P: opt.update(V, state, P)  # noqa: E731
    else:
        f = lambda V, P: getattr(gf, op)(C, P, V)  # noqa: E731
    with pytest.raises(gf.ManifoldError, match=name):
        f(V, P)
    torch._dynamo.reset()
    # Without fullgraph Dynamo lets the ManifoldError through (naming the entry within its subtree: the
    # parameter's prefix is eager mode's, _named); on that path it warns that it cannot trace optree's C
    # functions (an error under this suite's filterwarnings), as a user sees it: ignored here.
    with warnings.catch_warnings(), pytest.raises(gf.ManifoldError, match="'(mlp.)?bias'.*got shape \\(1,\\)"):
        warnings.simplefilter("ignore", UserWarning)
        torch.compile(f, backend="eager")(V, P)
    torch._dynamo.reset()
    good = {"w": torch.zeros(3), **right()}
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(good, P), f(good, P))
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [
    lambda: (gf.Stiefel(), (5, 3)), lambda: (gf.Sphere(), (4,)), lambda: (gf.PSD(), (3, 3)),
    lambda: (gf.PoincareBall(), (3,)), lambda: (gf.Product(gf.SO(), gf.Sphere()), ((3, 3), (4,))),
], ids=["Stiefel", "Sphere", "PSD", "PoincareBall", "Product"])
def test_a_vector_of_another_shape_at_a_constrained_entry_is_refused(make):
    """Note [Vectors of another shape at constrained entries]: the spaces broadcast leading dims, so a (2, *shape)
    gradient made a point a batch of two after one rsgd or radam step, and one (*shape) gradient stepped every
    point of a (2, *shape) batch alike, silently, where an unconstrained entry refuses a vector of another
    shape (and gf.retract's docstring promises the same for constrained ones)."""
    space, shape = make()
    c = {"w": space}

    def like(batch, f):
        if isinstance(shape[0], tuple):
            return tuple(f(batch + s) for s in shape)
        return f(batch + shape)

    for batch, other in (((), (2,)), ((2,), ()), ((2,), (1,))):
        X = space.sample(like(batch, lambda s: s), dtype=F64)
        V = like(other, lambda s: torch.randn(s, dtype=F64))
        for call in (lambda: gf.retract(c, {"w": X}, {"w": V}), lambda: gf.tangent(c, {"w": X}, {"w": V}),
                     lambda: gf.egrad_to_rgrad(c, {"w": X}, {"w": V}), lambda: gf.transport(c, {"w": X}, {"w": X}, {"w": V}),
                     lambda: gf.transport(c, {"w": X}, {"w": like(other, lambda s: torch.zeros(s, dtype=F64))}, {"w": X})):
            with pytest.raises(gf.ManifoldError, match=r"^parameter 'w': .*expected `\w+` with the shape of `params` "):
                call()
        for name, opt in (("rsgd", gf.optim.rsgd(c, 0.1, momentum=0.9)), ("radam", gf.optim.radam(c, 0.1))):
            with pytest.raises(gf.ManifoldError, match=r"^parameter 'w': .*expected `grads` with the shape of `params` "):
                opt.update({"w": V}, opt.init({"w": X}), {"w": X})
        G = like(batch, lambda s: torch.randn(s, dtype=F64))  # the point's shape: taken
        new = gf.retract(c, {"w": X}, gf.tangent(c, {"w": X}, {"w": G}))["w"]
        assert [t.shape for t in optree.tree_leaves(new)] == [t.shape for t in optree.tree_leaves(X)]


def test_a_product_vector_with_one_factor_of_another_shape_is_refused():
    """Note [Vectors of another shape at constrained entries], per factor of a Product: one factor of the right
    shape does not excuse another of the wrong one (its space would broadcast the point into a batch)."""
    c = {"w": gf.Product(gf.SO(), gf.Sphere())}
    g = torch.Generator().manual_seed(0)
    X = c["w"].sample(((3, 3), (4,)), generator=g, dtype=F64)
    for V in ((torch.randn(3, 3, dtype=F64), torch.randn(2, 4, dtype=F64)),
              (torch.randn(2, 3, 3, dtype=F64), torch.randn(4, dtype=F64))):
        for call in (lambda: gf.retract(c, {"w": X}, {"w": V}), lambda: gf.tangent(c, {"w": X}, {"w": V}),
                     lambda: gf.egrad_to_rgrad(c, {"w": X}, {"w": V}),
                     lambda: gf.transport(c, {"w": X}, {"w": X}, {"w": V})):
            with pytest.raises(gf.ManifoldError, match=r"^parameter 'w': .*expected `\w+` with the shape of `params` "):
                call()


def test_a_vector_of_another_shape_is_refused_naming_both_shapes():
    """Note [Vectors of another shape at constrained entries]: the message names the point's shape and the
    vector's (per factor for a Product)."""
    X = gf.Stiefel().sample((5, 3), dtype=F64)
    with pytest.raises(gf.ManifoldError, match=r"shape of `params` \(5, 3\), got shape \(2, 5, 3\)\.$"):
        gf.retract({"w": gf.Stiefel()}, {"w": X}, {"w": torch.zeros(2, 5, 3, dtype=F64)})
    c = {"w": gf.Product(gf.SO(), gf.Sphere())}
    P = c["w"].sample(((3, 3), (4,)), dtype=F64)
    with pytest.raises(gf.ManifoldError, match=r"shape of `params` \(\(3, 3\), \(4,\)\), got shape \(\(3, 3\), \(2, 4\)\)\.$"):
        gf.tangent(c, {"w": P}, {"w": (torch.zeros(3, 3, dtype=F64), torch.zeros(2, 4, dtype=F64))})
