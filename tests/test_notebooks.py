"""The tutorial notebooks: executed from their scripts, and committed as the builder wrote them.

Each ``notebooks/<name>.ipynb`` is built, with its outputs, from ``notebooks/_build/<name>.py``
by ``python notebooks/_build/build.py <name>`` (the site shows those outputs; it does not
execute anything). Here every script is executed once, in a fresh kernel set up exactly as the
builder sets it up (the kernel is a subprocess: the pytest ``filterwarnings = error`` setting
does not reach it, so a warning printed to stderr fails the test instead), and compared with
the committed notebook: same cells, and the same kinds of output in every cell (text where
the script prints, a PNG where it plots), and the same printed checks (each ``True`` a claim
that still holds). Numbers are not compared (they may move in the last
digit when geofunc changes; the builder rewrites them). Each notebook is kept well under two
minutes on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = NOTEBOOKS / "_build"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
SCRIPTS = sorted(p for p in BUILD.glob("*.py") if p.name != "build.py")
CELL_TIMEOUT_S = 180

_PRINTS = re.compile(r"^\s*print\(|^\s*display\(", re.M)
_PLOTS = re.compile(r"\bplt\.show\(\)")


def _builder():
    pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install -e .[test])")
    spec = importlib.util.spec_from_file_location("notebook_builder", BUILD / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BOOLS = re.compile(r"\b(?:True|False)\b")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def _kinds(cell) -> list[str]:
    """The kinds of a code cell's outputs: ``stream:stdout``, ``display_data:image/png``, ...
    (consecutive pieces of one stream count once: how prints are split depends on timing)."""
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            if not out or out[-1] != f"stream:{o['name']}":
                out.append(f"stream:{o['name']}")
        elif o["output_type"] in ("display_data", "execute_result"):
            out.append(f"{o['output_type']}:{'+'.join(sorted(o['data']))}")
        else:
            out.append(o["output_type"])
    return out


def test_every_notebook_has_its_script() -> None:
    """``notebooks/_build/<name>.py`` is the source of ``notebooks/<name>.ipynb``, one for one."""
    assert {p.stem for p in PATHS} == {p.stem for p in SCRIPTS}, (
        f"notebooks without a script: {sorted({p.stem for p in PATHS} - {p.stem for p in SCRIPTS})}; "
        f"scripts without a notebook: {sorted({p.stem for p in SCRIPTS} - {p.stem for p in PATHS})}"
    )


# A draw from torch's global generator: a layer's initialization, a torch random function or a
# ``.sample(...)`` called without ``generator=`` (on one line, as the scripts write them).
_GLOBAL_DRAW = re.compile(
    r"\bnn\.(?:Linear|Conv[123]d|Embedding|LSTM|GRU|RNN)\("
    r"|\btorch\.(?:randn|rand|randint|randperm|normal|bernoulli|multinomial)\((?![^\n]*generator=)"
    r"|\.sample\((?![^\n]*generator=)"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_seeds_the_global_generator_before_drawing_from_it(script: pathlib.Path) -> None:
    """The builder's outputs are reproducible only if every generator is seeded: a script that
    draws from torch's global generator (``nn.Linear`` initializing its biases, which
    ``gf.sample`` passes through) calls ``torch.manual_seed`` first. functional_layer did not,
    and its losses moved in the third digit from one build to the next (0.0108 to 0.0113)."""
    code = "\n".join(line.split("#", 1)[0] for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    draw = _GLOBAL_DRAW.search(code)
    if draw is None:
        return
    seed = code.find("torch.manual_seed(")
    line = code[: draw.start()].count("\n") + 1
    assert 0 <= seed < draw.start(), (
        f"{script.name}: `{draw.group(0)}` (code line {line}) draws from torch's global generator, "
        "which the script does not seed before it: add torch.manual_seed(0) at the top"
    )


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_committed_notebook_is_built_from_its_script(path: pathlib.Path) -> None:
    """Same cells as the script (an edit of one without a rebuild fails here), and outputs where
    the docs need them: text where a cell prints, a figure where it plots, no error or warning."""
    build = _builder()
    import nbformat

    nb = nbformat.read(path, as_version=4)
    fresh = build.notebook_of(BUILD / f"{path.stem}.py")
    assert [(c.cell_type, c.id, c.source) for c in nb.cells] == [(c.cell_type, c.id, c.source) for c in fresh.cells], (
        f"{path.name} differs from notebooks/_build/{path.stem}.py: run `python notebooks/_build/build.py {path.stem}`"
    )
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kinds = _kinds(cell)
        where = f"{path.name}, cell `{cell.source.strip().splitlines()[0][:70]}`"
        assert cell.execution_count is not None, f"{where}: not executed (run the builder)"
        if _PRINTS.search(cell.source):
            assert "stream:stdout" in kinds, f"{where}: prints, but has no output"
        if _PLOTS.search(cell.source):
            assert kinds.count("display_data:image/png+text/plain") >= len(_PLOTS.findall(cell.source)), f"{where}: plots, but has no figure"
        assert "error" not in kinds and "stream:stderr" not in kinds, f"{where}: an error or a warning was committed"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path: pathlib.Path) -> None:
    """Execute the script's cells in a fresh kernel (the builder's environment: inline figures,
    one thread) and compare the kinds of output with the committed notebook."""
    build = _builder()
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install -e .[test])")
    pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install -e .[test])")
    pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib (pip install -e .[test])")

    nb = build.notebook_of(BUILD / f"{path.stem}.py")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute(env=build.kernel_env())
    except nbclient.exceptions.CellExecutionError as exc:  # show the failing cell, not the client internals
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    committed = nbformat.read(path, as_version=4)
    for ran, kept in zip(nb.cells, committed.cells):
        if ran.cell_type == "code":
            where = f"{path.name}, cell `{ran.source.strip().splitlines()[0][:70]}`"
            assert "stream:stderr" not in _kinds(ran), f"{where} wrote to stderr:\n" + "".join(
                o.get("text", "") for o in ran.outputs if o.get("name") == "stderr"
            )
            assert _kinds(ran) == _kinds(kept), (
                f"{where}: outputs {_kinds(ran)} now, {_kinds(kept)} committed: rebuild with "
                f"`python notebooks/_build/build.py {path.stem}`"
            )
            # The printed checks (`contains: True`, `on the manifold: True`, `... == ...: True`)
            # are the notebooks' claims: they must still come out as committed (numbers may move).
            checks = [_BOOLS.findall(_text(c)) for c in (ran, kept)]
            assert checks[0] == checks[1], f"{where}: printed checks {checks[0]} now, {checks[1]} committed:\n{_text(ran)}"
