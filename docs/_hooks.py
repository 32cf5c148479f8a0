"""MkDocs hooks of the geofunc site: maths served by the site itself, notebook pages cleaned.

* **MathJax from PyPI, vendored at build time.** The ``docs`` extra installs MathJax 3's
  distribution from PyPI (the ``django-static-mathjax`` wheel: the files of the ``mathjax``
  npm package, no Django needed). ``on_files`` adds the files the pages load to the site
  under ``assets/mathjax/`` (``mkdocs serve`` serves them too), so a built site typesets its
  formulas with no network access. ``docs/javascripts/mathjax.js`` configures it for every
  delimiter the pages use: ``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``.
* **Notebook pages** (mkdocs-jupyter) carry nbconvert's own maths set-up (a MathJax 2 loader
  pointing at a CDN, here an empty ``<script src="">``) and a mermaid loader that imports from a
  CDN: ``on_post_page`` removes both, so one MathJax typesets every page alike.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from typing import Any

from mkdocs.structure.files import File, Files

ASSET_DIR = "assets/mathjax"
#: What the pages load from MathJax's ``es5/`` directory: the combined TeX-to-HTML component
#: (every TeX extension built in, so nothing is fetched on demand), its fonts, and the
#: components its context menu can load (accessibility explorer, speech rules).
MATHJAX_ENTRY = "tex-chtml-full.js"
MATHJAX_DIRS = ("output/chtml/fonts/woff-v2", "a11y", "ui", "sre", "input/tex/extensions", "adaptors")

_NB_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
_NB_MERMAID = re.compile(r'<script type="module">\s*document\.addEventListener\("DOMContentLoaded", async \(\) => \{\s*'
                         r'const diagrams = document\.querySelectorAll\("\.jp-Mermaid.*?</script>', re.S)


def mathjax_root() -> pathlib.Path:
    """The ``es5`` directory of the installed MathJax 3 distribution."""
    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        es5 = pathlib.Path(root) / "static" / "mathjax" / "es5"
        if (es5 / MATHJAX_ENTRY).is_file():
            return es5
    raise RuntimeError(
        "MathJax 3 is not installed: the docs vendor it from PyPI (`python -m pip install -e \".[docs]\"`, "
        "package django-static-mathjax)"
    )


def on_files(files: Files, config: Any) -> Files:
    es5 = mathjax_root()
    paths = [es5 / MATHJAX_ENTRY, es5.parent / "LICENSE"]
    for d in MATHJAX_DIRS:
        paths += sorted(p for p in (es5 / d).rglob("*") if p.is_file())
    for p in paths:
        rel = p.relative_to(es5) if p.is_relative_to(es5) else pathlib.Path(p.name)
        files.append(File.generated(config, f"{ASSET_DIR}/{rel.as_posix()}", abs_src_path=str(p)))
    return files


def on_post_page(output: str, page: Any, config: Any) -> str:
    if page.file.src_uri.endswith(".ipynb"):
        output = _NB_MATHJAX.sub("", output)
        output = _NB_MERMAID.sub("", output)
    return output
