"""Build the tutorial notebooks from the percent-format scripts beside this file.

Each ``notebooks/_build/<name>.py`` becomes ``notebooks/<name>.ipynb`` (no outputs; the
tests execute them and the docs render them without executing). A script is also
runnable on its own (``python notebooks/_build/quickstart.py``), which is the quick way
to try a change. Cell syntax, as in jupytext's percent format::

    # %% [markdown]
    # # A title
    # Some *markdown* text.

    # %%
    print("a code cell")

Run: python notebooks/_build/build.py [name ...]
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent


def cells_of(source: str) -> list:
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


def build(script: pathlib.Path) -> pathlib.Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_of(script.read_text())
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild only changes the cells that changed
        cell.id = hashlib.sha1(f"{script.stem}:{i}".encode()).hexdigest()[:8]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    target = OUT / (script.stem + ".ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, target)
    return target


def main(names: list[str]) -> None:
    scripts = [HERE / f"{n}.py" for n in names] if names else sorted(
        p for p in HERE.glob("*.py") if p.name != "build.py"
    )
    for s in scripts:
        print("wrote", build(s).relative_to(OUT.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
