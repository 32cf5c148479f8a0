"""Smoke tests of the example scripts: each runs end to end with tiny flags (a few seconds).

Each script is loaded as a module and its ``main(argv)`` called in this process (no second
torch import), so the pytest ``filterwarnings = error`` setting also checks that the
examples run without warnings. ``--threads`` is never passed here: it would change the
thread count of the whole test process.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(capsys: pytest.CaptureFixture[str], name: str, *flags: str) -> str:
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(flags))
    out = capsys.readouterr().out
    assert f"== {name} report ==" in out, out
    return out


def test_eigenvalue(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    out = run_example(capsys, "eigenvalue.py", "--n", "120", "--max-iters", "200")
    assert "converged" in out and "NOT converged" not in out, out


def test_copying_problem(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    out = run_example(capsys, "copying_problem.py", "--L", "10", "--hidden", "16", "--iters", "5", "--batch", "8")
    assert "memoryless baseline loss" in out


def test_copying_problem_rgd_cayley(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    flags = ["--L", "5", "--hidden", "8", "--iters", "3", "--batch", "4", "--rgd", "--triv", "cayley"]
    out = run_example(capsys, "copying_problem.py", *flags)
    # RGD keeps the kernel on SO(n) through every rebase.
    err = float(out.split("max|WᵀW − I| = ")[1].split()[0])
    assert err < 1e-4, out


@pytest.mark.parametrize("constraint", ["orthogonal", "almost-orthogonal"])
def test_sequential_digits(capsys: pytest.CaptureFixture[str], constraint: str) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn", reason="sequential_digits.py reads scikit-learn's digits (pip install -e .[test])")
    flags = ["--constraint", constraint, "--epochs", "1", "--limit", "128", "--hidden", "16", "--rebase-every", "1"]
    out = run_example(capsys, "sequential_digits.py", *flags)
    assert "test accuracy" in out
