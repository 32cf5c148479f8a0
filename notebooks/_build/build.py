"""Build the tutorial notebooks from the percent-format scripts beside this file, executed.

Each ``notebooks/_build/<name>.py`` becomes ``notebooks/<name>.ipynb`` **with its outputs**:
the script is split into cells, executed top to bottom in a fresh kernel, and written with
the printed text and the figures, which is what the documentation site shows. A script is
also runnable on its own (``python notebooks/_build/quickstart.py``), which is the quick way
to try a change. Cell syntax, as in jupytext's percent format::

    # %% [markdown]
    # # A title
    # Some *markdown* text.

    # %%
    print("a code cell")

Run: python notebooks/_build/build.py [name ...]      (no name: every script)
     python notebooks/_build/build.py --no-execute NAME   (sources only, no outputs)

Why outputs are committed (rather than executed by the docs build): the test suite already
executes every notebook once (``tests/test_notebooks.py``), and ``mkdocs build`` then only
renders, in seconds. The outputs are reproducible: the kernel runs with one thread, the
notebooks seed every generator, the figures are PNGs of the inline backend (no timestamps)
and no per-run metadata (timings, kernel version) is kept, so a rebuild changes a notebook
only where its code or geofunc's results changed (and in the wall-clock timings that two
notebooks print on purpose). ``tests/test_notebooks.py`` checks that each committed
notebook's cells are its script's and that every cell that prints or plots has its output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent
ROOT = OUT.parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
CELL_TIMEOUT_S = 300


def cells_of(source: str) -> list:
    """The notebook cells of a percent-format script (markdown lines lose their ``# ``)."""
    cells: list = []
    kind, lines = None, []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if kind is None or not text:
            return
        if kind == "markdown":
            md = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(md))
        else:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def notebook_of(script: pathlib.Path):
    """The unexecuted notebook of a script, with stable cell ids and fixed metadata."""
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_of(script.read_text())
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild only changes the cells that changed
        cell.id = hashlib.sha1(f"{script.stem}:{i}".encode()).hexdigest()[:8]
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def kernel_env() -> dict[str, str]:
    """The environment the kernel runs in: the repository importable, one thread, the inline
    backend (an inherited ``MPLBACKEND=Agg`` would swallow every figure)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    return env


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive outputs of one stream (how a cell's prints are split into messages
    depends on timing; merged, the notebook is the same on every run)."""
    merged: list = []
    for out in outputs:
        if merged and out.output_type == "stream" and merged[-1].output_type == "stream" and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    return merged


def execute(nb, name: str) -> None:
    """Run ``nb`` in a fresh kernel (in ``notebooks/``) and keep only reproducible outputs."""
    import nbclient

    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(OUT)}},
    )
    client.execute(env=kernel_env())  # passed on to the kernel manager's start_kernel
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = coalesce_streams(cell.outputs)
        for out in cell.outputs:
            out.pop("transient", None)
            if out.output_type == "stream" and out.name == "stderr":
                raise SystemExit(f"{name}: a cell wrote to stderr (a warning?); fix it before committing:\n{out.text}")
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}


def build(script: pathlib.Path, run: bool = True) -> pathlib.Path:
    nb = notebook_of(script)
    if run:
        execute(nb, script.stem)
    target = OUT / (script.stem + ".ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, target)
    return target


def scripts(names: list[str]) -> list[pathlib.Path]:
    if names:
        return [HERE / f"{n.removesuffix('.py').removesuffix('.ipynb')}.py" for n in names]
    return sorted(p for p in HERE.glob("*.py") if p.name != "build.py")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="notebook names (default: every script in notebooks/_build/)")
    p.add_argument("--no-execute", action="store_true", help="write the cells without running them (no outputs)")
    args = p.parse_args(argv)
    for s in scripts(args.names):
        print("wrote", build(s, run=not args.no_execute).relative_to(ROOT), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
