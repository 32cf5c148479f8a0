"""The README's code blocks run and do what they say (so the documentation cannot rot).

Each ```python block of README.md is executed, its stdout captured, and its claims checked:

* a line ``print(expr)  # expected`` must print ``expected`` (``...`` in it matches anything);
* the claims made in a block's comments are checked by the block's checker below (found by a
  line of the block), with the independent predicates of ``tests/reference.py``.

A block with no claim that can be checked fails: add a ``# expected`` comment to a print, or a
checker here.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import runpy
from typing import Any, Callable

import pytest
import reference as ref
import torch

import geofunc as gf

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
_PRINT = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<expected>.+?)\s*$")


def _printed_claims(block: str) -> list[str]:
    return [m.group("expected") for line in block.splitlines() if (m := _PRINT.match(line))]


def _matches(expected: str, got: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got) is not None


# ------------------------------------------------------------------ the blocks' own claims
def _twenty_lines(ns: dict[str, Any]) -> None:
    """'points on the spaces', 'dynamic trivialization (same point, re-centred charts)', and the
    printed membership of the trained point (checked independently of gf.contains)."""
    constraints, raw, bases = ns["constraints"], ns["raw"], ns["bases"]
    assert set(constraints) == {"0.weight", "2.weight"}
    assert all(ref.on_spaces(constraints, ns["params"]).values()), "gf.sample gave points off the spaces"
    trained = gf.to_manifold(constraints, raw, bases)
    assert all(ref.on_spaces(constraints, trained).values()), "the trained point is off the spaces"
    assert not torch.equal(trained["0.weight"], ns["params"]["0.weight"]), "100 Adam steps did not move the point"
    # re-centred: the Stiefel raw tensor is zero, LowRank keeps only its singular values (the diagonal)
    assert bool((raw["0.weight"] == 0).all()), "rebase left a non-zero raw Stiefel tensor"
    low = raw["2.weight"]
    off_diagonal = ~torch.eye(*low.shape, dtype=torch.bool)
    assert bool((low[off_diagonal] == 0).all()), "rebase left LowRank frame coordinates in the raw tensor"


def _geotorch_program(ns: dict[str, Any]) -> None:
    """'orthonormal columns', 'every 3x3 kernel has rank <= 1', 're-initialize to exactly this point',
    'any optimizer; constraints hold after every step'."""
    model, optim = ns["model"], ns["optim"]
    W = model.linear.weight
    assert torch.equal(W, torch.eye(128, 64)), "the assigned point was not kept exactly"
    for _ in range(3):
        optim.zero_grad()
        loss = model(torch.randn(5, 64), torch.randn(2, 16, 8, 8))
        loss.backward()
        optim.step()
        W, K = model.linear.weight.detach(), model.cnn.weight.detach()
        assert ref.member(gf.Stiefel(), W), "the linear weight lost its orthonormal columns"
        assert bool(ref.low_rank(1)(K, 1e-5).all()), "a 3x3 kernel has rank > 1"
    assert not torch.equal(model.linear.weight, torch.eye(128, 64)), "the optimizer did not move the weight"


# (a line of the block, its checker)
CHECKERS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ('constraints = {"0.weight": gf.Stiefel(), "2.weight": gf.LowRank(rank=4)}', _twenty_lines),
    ("import geofunc.nn as geotorch", _geotorch_program),
]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_does_what_it_says(index):
    block = BLOCKS[index]
    ns: dict[str, Any] = {"__name__": "readme"}
    out = io.StringIO()
    # blocks that build torch.nn layers draw their initial weights from the global RNG: seed it
    # for reproducibility and give it back as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md block {index}", "exec"), ns)
        printed = out.getvalue().splitlines()
        claims = _printed_claims(block)
        checkers = [fn for line, fn in CHECKERS if line in block]
        assert claims or checkers, f"README block {index} makes no claim this test checks (see the module docstring)"
        assert len(printed) >= len(claims), f"block {index} printed {printed}, expected {claims}"
        for expected, got in zip(claims, printed):
            assert _matches(expected, got), f"block {index} printed {got!r}, the README says {expected!r}"
        for fn in checkers:
            fn(ns)


def test_every_checker_finds_its_block():
    text = "\n".join(BLOCKS)
    missing = [line for line, _ in CHECKERS if line not in text]
    assert not missing, f"README blocks changed; update tests/test_readme.py checkers for: {missing}"


def test_demo_runs(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["examples/demo.py"])  # the demo parses its command line
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "all on the manifold = True" in out


def test_readme_has_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in text, "the README's test command must be the one .ci/run runs"
    assert "python examples/demo.py" in text
