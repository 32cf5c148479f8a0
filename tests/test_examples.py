"""Smoke tests of the example scripts: each runs end to end with tiny flags (a few seconds), and
what it prints holds what its docstring and the README claim (on the space, below the baseline).

Each script is loaded as a module and its ``main(argv)`` called in this process (no second
torch import), so the pytest ``filterwarnings = error`` setting also checks that the
examples run without warnings. ``--threads`` is never passed here: it would change the
thread count of the whole test process.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


F32 = 1e-5  # float32 orthonormality / unit norm of a trained weight (as tests/test_geotorch_examples.py)
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.py"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(capsys: pytest.CaptureFixture[str], name: str, *flags: str) -> str:
    load_example(name).main(list(flags))
    out = capsys.readouterr().out
    assert f"== {name} report ==" in out, out
    return out


def number_after(out: str, label: str) -> float:
    """The number printed right after ``label`` (the first time it appears)."""
    m = re.search(re.escape(label) + r"\s*([-+]?[\d.]+(?:e[-+]?\d+)?)", out)
    assert m is not None, f"{label!r} not in:\n{out}"
    return float(m.group(1))


def test_eigenvalue(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    out = run_example(capsys, "eigenvalue.py", "--n", "120", "--max-iters", "200")
    assert "converged" in out and "NOT converged" not in out, out
    assert number_after(out, "absolute error") <= 1e-3, out  # the default --tol
    assert number_after(out, "|‖x‖ − 1| =") <= 1e-12, out  # float64: "the iterate stays on the sphere"


def test_copying_problem_beats_the_memoryless_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    """What the README and the docstring say the example shows, on a short sequence (L = 5, about
    2 s): the held-out loss below the baseline 10·ln 8 / (L + 20) (0.66 against 0.83 with seeds 0,
    1 and 2), the kernel orthogonal to float32 rounding."""
    pytest.importorskip("tqdm")
    out = run_example(capsys, "copying_problem.py", "--L", "5", "--hidden", "32", "--iters", "150", "--batch", "32")
    baseline = number_after(out, "memoryless baseline loss")
    assert baseline == pytest.approx(10 * math.log(8) / 25, abs=1e-4), out
    assert number_after(out, "held-out loss") < 0.9 * baseline, out
    assert "beats the memoryless baseline: yes" in out, out
    assert number_after(out, "max|WᵀW − I| =") < F32, out


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
    # The docstring's constraint: singular values 1 (SO), or in [1 − lam, 1 + lam] (lam = 0.2 by default).
    lo, hi = (float(v) for v in re.search(r"recurrent kernel in \[([\d.]+), ([\d.]+)\]", out).groups())
    width = F32 if constraint == "orthogonal" else 0.2
    assert 1 - width <= lo <= hi <= 1 + width, out


@pytest.mark.parametrize("constraint", ["orthogonal", "almost-orthogonal"])
def test_sequential_digits_model_saves_its_base(constraint: str) -> None:
    """The raw ``Z`` is read in the chart at ``base``: a state_dict without the base (it was a plain
    attribute) reloaded another kernel into a fresh model, silently. After a rebase too."""
    pytest.importorskip("tqdm")
    import geofunc as gf

    module = load_example("sequential_digits.py")
    space = gf.SO() if constraint == "orthogonal" else gf.AlmostOrthogonal(lam=0.2)
    torch.manual_seed(0)
    trained = module.ConstrainedRNN(space, 6)
    with torch.no_grad():
        trained.Z.add_(0.1 * torch.randn(trained.Z.shape))
    trained.rebase()
    torch.manual_seed(1)
    fresh = module.ConstrainedRNN(space, 6)
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.kernel(), trained.kernel())


def test_demo_runs_and_its_claims_hold(capsys: pytest.CaptureFixture[str]) -> None:
    """The one-minute tour (about 3 s): each of its four steps prints what it claims."""
    load_example("demo.py").main([])
    out = capsys.readouterr().out
    assert number_after(out, "sample on Stiefel(64, 16): max|XᵀX − I| =") < F32, out
    procrustes = out[out.index("Procrustes by Adam") :]
    # Adam on raw Z reaches it (from ~5.6 away): 2.5e-06 with seed 0, but Adam's constant-lr steps
    # near the optimum leave 1e-6 to 4e-3 at step 300 depending on the seed (and on rounding).
    assert number_after(procrustes, "distance to the SVD optimum =") < 1e-2, out
    assert number_after(procrustes, "max|XᵀX − I| =") < F32, out
    assert "all on the manifold = True" in out, out
    assert number_after(out, "SO(8).logabsdet =") == 0.0, out


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_example_has_help(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """README: "Each has `--help`"; it prints the usage and exits before running anything."""
    if name != "demo.py" and name != "fsdp_train.py":  # those two import torch after parsing
        pytest.importorskip("tqdm")
    with pytest.raises(SystemExit) as exit_:
        load_example(name).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and ("--seed" in out or "--steps" in out), out
    assert "report ==" not in out, out


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
