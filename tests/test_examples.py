"""Smoke tests of the example scripts: each runs end to end with tiny flags (a few seconds).

Each script is loaded as a module and its ``main(argv)`` called in this process (no second
torch import), so the pytest ``filterwarnings = error`` setting also checks that the
examples run without warnings. ``--threads`` is never passed here: it would change the
thread count of the whole test process.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

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


def test_demo_help_prints_help_and_runs_nothing() -> None:
    """``--help`` answers at once (the demo used to ignore it and run in full)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: examples/demo.py") and "--seed" in proc.stdout, proc.stdout
    assert "Stiefel" not in proc.stdout and "logabsdet" not in proc.stdout  # no step of the demo ran


def test_eigenvalue_progress_bar_ends_full_when_converged(capsys: pytest.CaptureFixture[str]) -> None:
    """An early convergence ends the bar at n/n with "converged", not at 7/500 (an abort, to the eye)."""
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("example_eigenvalue_bar", EXAMPLES / "eigenvalue.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--n", "120", "--max-iters", "200"])
    out, err = capsys.readouterr()  # tqdm draws its bar on stderr
    iters = int(re.search(r"\((\d+) iterations", out).group(1))
    assert iters < 200, out  # it did stop early
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "converged" in last and f"{iters}/{iters}" in last and "100%" in last, last


def test_copying_problem_run_time_is_stated_once() -> None:
    """The run time of the default flags is stated in one place, the script's docstring (it was
    "about a minute" there and "~2 minutes" in the README); the README points to it."""
    doc = (EXAMPLES / "copying_problem.py").read_text().split('"""')[1]
    stated = re.findall(r"about [\d.]+ minutes? on one CPU core", doc)
    assert len(stated) == 1, doc
    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("`copying_problem.py` (") :].split("`sequential_digits.py`", 1)[0]
    assert not re.search(r"\d\s*(?:s|min|minutes?|seconds?)\b", sentence), sentence
    assert "docstring" in sentence, sentence
