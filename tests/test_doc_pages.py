"""The code blocks of the documentation pages run and do what their comments say.

README.md (tests/test_readme.py), docs/guide/migration.md (tests/test_migration.py) and
docs/guide/migration-geoopt.md (tests/test_geoopt_parity.py) have their own tests; this runs the
``python`` blocks of every other page under docs/. A page's blocks run in order in one namespace,
as a reader types them. Some pages show fragments of a program (an optimizer built from
``constraints``, a Jacobian of ``M`` at ``Z``): ``PRELUDES`` gives them the objects their prose
assumes, nothing else. Claims checked:

* a line that is an expression with a Python literal as its comment (``bool(M.contains(X))  # True``)
  must evaluate to that literal;
* every functional optimizer a block builds (``opt`` with ``init``/``update``) takes steps from the
  prelude's points and keeps the constrained entries on their spaces, and a ``TorchOptimizer``
  does the same on the prelude's module;
* the blocks' other claims, by ``CHECKERS`` (found by a line of the block).

Regression: docs/guide/optim.md's ``apply_if_finite`` block passed ``...`` (an Ellipsis) as its
labels' transforms, so the program failed at ``opt.init`` with an AttributeError; no test ran
the page's blocks.
"""

from __future__ import annotations

import ast
import pathlib
import re
from typing import Any, Callable

import pytest
import torch
from reference import member

import geofunc as gf

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTED_ELSEWHERE = {"guide/migration.md", "guide/migration-geoopt.md"}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages() -> dict[str, list[str]]:
    out = {}
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        if "notebooks" in page.parts or rel in TESTED_ELSEWHERE:
            continue
        blocks = _BLOCK.findall(page.read_text())
        if blocks:
            out[rel] = blocks
    return out


PAGES = _pages()

# What a page's fragments assume (its prose names these objects without building them).
PRELUDES: dict[str, str] = {
    "guide/optim.md": """
import torch, geofunc as gf
constraints = {"encoder": gf.Stiefel()}
params = {"encoder": gf.Stiefel().sample((6, 3), dtype=torch.float64),
          "head": {"weight": torch.randn(2, 6, dtype=torch.float64), "bias": torch.randn(2, dtype=torch.float64)}}
grads = {"encoder": torch.randn(6, 3, dtype=torch.float64),
         "head": {"weight": torch.randn(2, 6, dtype=torch.float64), "bias": torch.randn(2, dtype=torch.float64)}}
""",
    "spaces/complex.md": """
import torch, geofunc as gf
M = gf.Unitary()
Z = torch.randn(3, 3, dtype=torch.complex128)
""",
}

# TorchOptimizer blocks: the module and the constraints of the groups they are given.
_MODULE_PRELUDE = """
model = torch.nn.Linear(6, 3).double()
with torch.no_grad():
    model.weight.copy_(gf.Stiefel().sample((3, 6), dtype=torch.float64))
constraints = {"weight": gf.Stiefel()}
groups = [{"params": [("weight", model.weight)], "lr": 1e-2}, {"params": [("bias", model.bias)]}]
"""


def _literal_claims(block: str) -> list[tuple[int, str, Any]]:
    """``(line, expression, value)`` of the lines ``expr  # literal``."""
    tree = ast.parse(block)
    lines = block.splitlines()
    out = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and node.lineno == node.end_lineno:
            line = lines[node.lineno - 1]
            if "#" in line[node.end_col_offset:]:
                comment = line[node.end_col_offset:].split("#", 1)[1].strip()
                try:
                    value = ast.literal_eval(comment)
                except (ValueError, SyntaxError):
                    continue
                out.append((node.lineno, ast.get_source_segment(block, node), value))
    return out


def _steps_stay_on_spaces(ns: dict[str, Any], where: str) -> None:
    opt = ns.get("opt")
    if opt is None:
        return
    if isinstance(opt, torch.optim.Optimizer):
        model = ns["model"]
        for _ in range(3):
            model(torch.randn(4, 6, dtype=torch.float64)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        assert member(gf.Stiefel(), model.weight.detach().T), f"{where}: the TorchOptimizer left the weight off Stiefel"
        return
    params, grads = ns["params"], ns["grads"]
    state = opt.init(params)
    new = params
    for _ in range(3):
        new, state = opt.update(grads, state, new)
    assert member(gf.Stiefel(), new["encoder"]), f"{where}: the optimizer left the point off Stiefel"
    assert not torch.equal(new["encoder"], params["encoder"]), f"{where}: the optimizer did not move the point"


# ------------------------------------------------------------------ the blocks' own claims
def _orthogonal_layer(ns: dict[str, Any]) -> None:
    """'layer.weight is now orthogonal (Stiefel: all of O(64))'; Adam 'trains the raw parameter'."""
    layer, opt = ns["layer"], ns["opt"]
    assert member(gf.Stiefel(), layer.weight.detach())
    layer(torch.randn(2, 64)).sum().backward()
    opt.step()
    assert member(gf.Stiefel(), layer.weight.detach(), 1e-5)


def _complex_jacobian(ns: dict[str, Any]) -> None:
    """'shape (*X.shape, 2, *Z.shape, 2)', and it is the real Jacobian of the map."""
    J, Z = ns["J"], ns["Z"]
    assert J.shape == (*Z.shape, 2, *Z.shape, 2)
    V = torch.randn(*Z.shape, 2, dtype=torch.float64)
    h = 1e-6
    f = ns["real_map"]
    Zr = torch.view_as_real(Z)
    fd = (f(Zr + h * V) - f(Zr - h * V)) / (2 * h)
    torch.testing.assert_close(torch.einsum("...ij,ij->...", J.reshape(*J.shape[:3], -1, 2), V.reshape(-1, 2)), fd,
                               atol=1e-7, rtol=0)


def _one_skip_for_every_label(ns: dict[str, Any]) -> None:
    """'a NaN in one label's gradient skips every label's step'."""
    opt, params, grads = ns["opt"], ns["params"], ns["grads"]
    bad = {**grads, "head": {**grads["head"], "bias": torch.full_like(grads["head"]["bias"], float("nan"))}}
    new, _ = opt.update(bad, opt.init(params), params)
    assert torch.equal(new["encoder"], params["encoder"]), "a NaN in the 'free' label moved the 'frame' entry"


CHECKERS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ('gf.nn.orthogonal(layer, "weight")', _orthogonal_layer),
    ("J = torch.func.jacrev(real_map)", _complex_jacobian),
    ("gf.optim.clip_by_global_norm(constraints, 1.0),          # one norm over every entry", _one_skip_for_every_label),
]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_blocks_run_and_do_what_they_say(page: str) -> None:
    ns: dict[str, Any] = {"__name__": f"docs_{page}"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if page in PRELUDES:
            exec(PRELUDES[page], ns)
        for i, block in enumerate(PAGES[page]):
            where = f"docs/{page} block {i}"
            if "TorchOptimizer(" in block:
                exec(_MODULE_PRELUDE, ns)
            ns.pop("opt", None)
            exec(compile(block, where, "exec"), ns)
            for line, expr, value in _literal_claims(block):
                got = eval(compile(expr, f"{where} line {line}", "eval"), ns)
                assert got == value, f"{where} line {line}: `{expr}` is {got!r}, the page says {value!r}"
            if page in PRELUDES or "TorchOptimizer(" in block:
                _steps_stay_on_spaces(ns, where)
            for line, fn in CHECKERS:
                if line in block:
                    fn(ns)


def test_every_checker_finds_its_block() -> None:
    text = "\n".join(b for blocks in PAGES.values() for b in blocks)
    missing = [line for line, _ in CHECKERS if line not in text]
    assert not missing, f"the pages' blocks changed; update tests/test_doc_pages.py's CHECKERS for: {missing}"
