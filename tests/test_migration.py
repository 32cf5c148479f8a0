"""The GeoTorch migration page (docs/guide/migration.md) and the nn guide's signature table.

Every ``python`` block of the migration page runs: the blocks that ``import geotorch`` against
GeoTorch 0.4.0 itself (the ``bench`` extra), the others against geofunc. The tables name only
things that exist: GeoTorch's column in GeoTorch 0.4.0, geofunc's columns in geofunc, and
between them they cover GeoTorch's whole ``__all__``.

Nothing here skips: every name of DESIGN.md §6.1–6.2 the page shows (``geofunc.nn``'s GeoTorch
classes, ``sln``, ``alpha_stable``, ``torus_init_``, ``parametrize.cached``, the exception classes,
the spaces ``SL``/``Hurwitz``) must exist, and every block must run.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import pytest
import torch

import geofunc as gf
import geofunc.nn

from site_tools import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "guide" / "migration.md").read_text()
NN_GUIDE = (ROOT / "docs" / "guide" / "nn.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, re.S)

#: DESIGN.md §6.2's geofunc.nn names and §6.1's spaces: all must exist.
CONTRACT_NN = (
    "SO", "Stiefel", "Grassmannian", "Sphere", "SphereEmbedded", "Rn", "Skew", "Symmetric", "AlmostOrthogonal",
    "LowRank", "FixedRank", "GLp", "SL", "PSD", "PSSD", "PSSDLowRank", "PSSDFixedRank", "Hurwitz", "ProductManifold",
    "sln", "alpha_stable", "torus_init_", "parametrize", "VectorError", "NonSquareError", "RankError",
    "InManifoldError", "InverseError",
)
CONTRACT_SPACES = ("SL", "Hurwitz")
PENDING_NN = [n for n in CONTRACT_NN if not hasattr(geofunc.nn, n)]
PENDING_SPACES = [n for n in CONTRACT_SPACES if not hasattr(gf, n)]


def _uses_geotorch(block: str) -> bool:
    return re.search(r"^import geotorch\b", block, re.M) is not None


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_migration_block_runs(index: int) -> None:
    block = BLOCKS[index]
    if _uses_geotorch(block):
        try:
            import geotorch  # noqa: F401
        except ImportError:
            require(False, "GeoTorch 0.4.0 is not installed (pip install -e .[bench])")
    namespace = {"__name__": f"migration_block{index}"}
    exec(compile(block, f"docs/guide/migration.md block {index}", "exec"), namespace)


def test_blocks_come_in_before_after_pairs() -> None:
    """Each GeoTorch block is followed by its geofunc version, identical but for the import."""
    pairs = 0
    for before, after in zip(BLOCKS, BLOCKS[1:]):
        if _uses_geotorch(before) and not _uses_geotorch(after):
            assert after == before.replace("import geotorch\n", "import geofunc.nn as geotorch\n"), (
                "the geofunc version of a GeoTorch block differs in more than its import:\n" + after[:200]
            )
            pairs += 1
    assert pairs >= 2, "the page shows GeoTorch's README program and one of its examples, before and after"


def _names(pattern: str) -> set[str]:
    return set(re.findall(pattern, PAGE))


def test_geotorch_column_exists_in_geotorch() -> None:
    try:
        import geotorch
        import geotorch.exceptions
        import geotorch.so
    except ImportError:
        require(False, "GeoTorch 0.4.0 is not installed (pip install -e .[bench])")
    missing = []
    for dotted in _names(r"`geotorch\.([\w.]+)"):
        obj = geotorch
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if obj is None and dotted != "parametrize.cached":  # GeoTorch before 0.3, named as such on the page
            missing.append(dotted)
    assert not missing, f"named on the page but not in GeoTorch 0.4.0: {missing}"
    spans = re.findall(r"`[^`]+`", re.sub(r"```.*?```", "", PAGE, flags=re.S))
    unmapped = [n for n in geotorch.__all__ if not any(re.search(rf"\b{n}\b", s) for s in spans)]
    assert not unmapped, f"GeoTorch 0.4.0 names the page does not map: {unmapped}"


def test_geofunc_columns_exist() -> None:
    missing = []
    for name in _names(r"geofunc\.nn\.([A-Za-z_]\w*)"):
        if not hasattr(geofunc.nn, name):
            missing.append(f"geofunc.nn.{name}")
    for name in _names(r"`gf\.([A-Z]\w*)"):
        if not hasattr(gf, name):
            missing.append(f"gf.{name}")
    assert not missing, f"named on the page but not in geofunc: {sorted(missing)}"
    assert not PENDING_NN and not PENDING_SPACES, f"DESIGN.md §6.1/§6.2 names missing: {PENDING_NN + PENDING_SPACES}"
    for name in ("VectorError", "NonSquareError", "RankError", "InManifoldError", "InverseError"):
        assert issubclass(getattr(geofunc.nn, name), gf.ManifoldError) and issubclass(gf.ManifoldError, ValueError)


# --------------------------------------------------------------------------- the nn guide
def _signature_rows() -> dict[str, list[tuple[str, object]]]:
    """``{name: [(parameter, default), ...]}`` of the nn guide table's first column."""
    rows = {}
    for line in NN_GUIDE.splitlines():
        m = re.match(r"\| `(\w+)\((.*?)\)` \|", line)
        if m:
            call = ast.parse(f"def {m.group(1)}({m.group(2)}): pass").body[0].args
            names = [a.arg for a in call.args]
            defaults = [ast.literal_eval(d) for d in call.defaults]
            empty = [inspect.Parameter.empty] * (len(names) - len(defaults))
            rows[m.group(1)] = list(zip(names, empty + defaults))
    return rows


def test_nn_guide_lists_every_constraint_function_with_its_signature() -> None:
    """Every GeoTorch constraint function has a row with its full signature (the ``grassmannian``
    row once had none), and that signature is geofunc.nn's, parameter by parameter."""
    rows = _signature_rows()
    functions = ["skew", "symmetric", "sphere", "orthogonal", "grassmannian", "low_rank", "fixed_rank",
                 "almost_orthogonal", "invertible", "sln", "positive_definite", "positive_semidefinite",
                 "positive_semidefinite_low_rank", "positive_semidefinite_fixed_rank", "alpha_stable"]
    assert set(functions) <= set(rows), f"rows without a signature: {sorted(set(functions) - set(rows))}"
    for name, params in rows.items():
        fn = getattr(geofunc.nn, name, None)
        assert fn is not None, f"the nn guide lists {name}, which geofunc.nn lacks"
        actual = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert actual == params, f"{name}: the guide says {params}, geofunc.nn has {actual}"
    try:
        import geotorch
    except ImportError:
        return
    for name, params in rows.items():  # and they are GeoTorch's
        actual = [(p.name, p.default) for p in inspect.signature(getattr(geotorch, name)).parameters.values()]
        assert actual == params, f"{name}: the guide says {params}, GeoTorch 0.4.0 has {actual}"


# ------------------------------------------------------------- the tables' "pure space" column
def _table_rows(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after the paragraph that starts with ``heading``."""
    text = PAGE[PAGE.index(heading):]
    rows = []
    for line in text.splitlines()[1:]:
        if line.startswith("| ---"):
            continue
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[1:]  # without the header


def _pure_names(cell: str, nn_names: list[str]) -> set[str]:
    if cell.startswith("the same names"):
        return set(nn_names)
    return set(re.findall(r"`gf\.([A-Z]\w*)", cell))


#: a small instance of each geofunc.nn class the "Classes" table names
_CLASS_ARGS = {
    "SO": ((3, 3),), "Stiefel": ((4, 2),), "Grassmannian": ((4, 2),), "Sphere": ((3,),), "SphereEmbedded": ((3,),),
    "Rn": ((3,),), "Skew": ((3, 3),), "Symmetric": (), "AlmostOrthogonal": ((3, 3), 0.5), "LowRank": ((4, 3), 2),
    "FixedRank": ((4, 3), 2), "GLp": ((3, 3),), "SL": ((3, 3),), "PSD": ((3, 3),), "PSSD": ((3, 3),),
    "PSSDLowRank": ((3, 3), 2), "PSSDFixedRank": ((3, 3), 2), "Hurwitz": ((3, 3),),
}


def test_classes_table_names_each_class_pure_space() -> None:
    """The "Classes" table's third column names the pure space each ``geofunc.nn`` class of the
    row adapts (``M.space``). Regression: the Sphere row gave ``gf.Sphere`` for
    ``geofunc.nn.SphereEmbedded``, whose space is ``gf.SphereEmbedded``."""
    bad, seen = [], set()
    for cells in _table_rows("**Classes.**"):
        nn_names = re.findall(r"`geofunc\.nn\.(\w+)`", cells[1])
        if cells[1] == "the same names in `geofunc.nn`":
            nn_names = re.findall(r"`(\w+)`", cells[0])
        pure = _pure_names(cells[2], nn_names)
        for name in nn_names:
            cls = getattr(geofunc.nn, name)
            if name == "ProductManifold":
                obj = cls([geofunc.nn.SO((3, 3)), geofunc.nn.Sphere((3,))])
            else:
                obj = cls(*_CLASS_ARGS[name])
            seen.add(name)
            space = type(obj.space).__name__
            if space not in pure:
                bad.append(f"geofunc.nn.{name} adapts gf.{space}; the table says {sorted(pure)}")
    assert not bad, "\n  ".join(["the Classes table's pure spaces:", *bad])
    assert set(_CLASS_ARGS) | {"ProductManifold"} <= seen, sorted(set(_CLASS_ARGS) - seen)


#: keyword variants of the constraint functions whose space depends on an argument
_VARIANTS = {"sphere": [{}, {"embedded": True}]}
_LAYERS = {"grassmannian": (6, 3), "low_rank": (5, 4), "fixed_rank": (5, 4)}


def test_constraint_functions_table_names_each_pure_space() -> None:
    """Each constraint function registers (``layer.parametrizations.weight[0].space``) a space that
    the third column of its row names, for each of its documented variants (``embedded=True``)."""
    bad = []
    for cells in _table_rows("**Constraint functions.**"):
        name = re.match(r"`geotorch\.(\w+)", cells[0]).group(1)
        pure = _pure_names(cells[2], [])
        for kwargs in _VARIANTS.get(name, [{}]):
            layer = torch.nn.Linear(*_LAYERS.get(name, (4, 4)))
            args = (2,) if "rank" in name else ()
            getattr(geofunc.nn, name)(layer, "weight", *args, **kwargs)
            space = type(layer.parametrizations.weight[0].space).__name__
            if space not in pure:
                bad.append(f"geofunc.nn.{name}(**{kwargs}) registers gf.{space}; the table says {sorted(pure)}")
    assert not bad, "\n  ".join(["the constraint functions table's pure spaces:", *bad])
