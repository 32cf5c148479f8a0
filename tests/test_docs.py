"""The documentation site builds with no warning, and every public name has a docstring."""

from __future__ import annotations

import inspect
import re
import pathlib


import geofunc as gf
import geofunc.nn
import geofunc.optim
import geofunc.testing

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(built_site) -> None:
    """``mkdocs build --strict``: a broken link, reference or docstring is an error.
    (The site is built once per session by the ``built_site`` fixture; tests/test_site.py
    checks what it contains and how a browser renders it.)"""
    site, proc = built_site
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert (site / "index.html").exists()
    for page in ("spaces/orthogonal", "api/optim", "notebooks/quickstart"):
        assert (site / page / "index.html").exists(), page


def _own_doc(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    if doc and inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return None  # the signature dataclasses write when a class has no docstring
    return doc


def _public_names() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for mod in (gf, gf.optim, gf.nn, gf.testing, gf.hyperbolic):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (callable(obj) or inspect.ismodule(obj)):
                continue  # data constants (e.g. DEFAULT_TOL) cannot carry a docstring: the module's documents them
            out.append((f"{mod.__name__}.{name}", obj))
            if inspect.isclass(obj) and issubclass(obj, gf.AbstractSpace):
                for meth, fn in inspect.getmembers(obj, callable):
                    if not meth.startswith("_"):
                        out.append((f"{mod.__name__}.{name}.{meth}", fn))
    return out


def test_every_public_name_has_a_docstring() -> None:
    missing = sorted({qual for qual, obj in _public_names() if not (_own_doc(obj) or "").strip()})
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


_MATH_OR_CODE = re.compile(r"`[^`]*`|\$[^$]*\$")


def _doc_pages() -> list[pathlib.Path]:
    return sorted(p for p in (ROOT / "docs").rglob("*.md") if "notebooks" not in p.parts)


def test_no_pipe_inside_math_or_code_in_a_table_row() -> None:
    """A ``|`` inside ``$...$`` or a code span of a table row splits the cell (``$|x|$`` renders as ``$``)."""
    bad = []
    for page in _doc_pages():
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("|") and any("|" in m.group() for m in _MATH_OR_CODE.finditer(line)):
                bad.append(f"{page.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "raw pipes in table cells (write \\lvert x \\rvert):\n  " + "\n  ".join(bad)


def test_no_latex_inside_code_spans() -> None:
    """LaTeX in a code span is shown verbatim (`` `X\\,\\phi(X^\\top V)` ``): maths goes in ``$...$``."""
    bad = []
    for page in _doc_pages():
        for i, line in enumerate(page.read_text().splitlines(), 1):
            for span in re.findall(r"`[^`]+`", line):
                if re.search(r"\\[a-zA-Z]+|\^\\|_\{", span):
                    bad.append(f"{page.relative_to(ROOT)}:{i}: {span}")
    assert not bad, "LaTeX inside code spans:\n  " + "\n  ".join(bad)


def test_tuple_returns_are_documented_one_item_per_element() -> None:
    """griffe reads each line of a Google ``Returns:`` section as one element of a returned tuple,
    so a wrapped paragraph there renders as a table of fragments: name the elements instead."""
    import importlib.util
    import typing

    from site_tools import require

    # griffe is part of the docs tool chain (mkdocstrings-python), installed with .[docs]: skipped
    # without it like the site's tests (a failure in CI, where .ci/run installs it).
    require(importlib.util.find_spec("griffe") is not None, "the docs tool chain is not installed (pip install -e .[docs]): missing ['griffe']")
    import griffe

    pkg = griffe.load("geofunc", search_paths=[str(ROOT)])
    bad = []
    for qual, obj in _public_names():
        if not inspect.isfunction(obj):
            continue
        ret = typing.get_type_hints(obj).get("return")  # an unresolvable annotation is a failure too
        if typing.get_origin(ret) is not tuple or Ellipsis in typing.get_args(ret):
            continue
        try:
            doc = pkg[qual.removeprefix("geofunc.")].docstring
        except KeyError:
            bad.append(f"{qual}: griffe (the docs build) does not find it")
            continue
        for section in doc.parse("google") if doc else []:
            if section.kind.value == "returns" and len(section.value) != len(typing.get_args(ret)):
                bad.append(f"{qual}: {len(section.value)} items for a {len(typing.get_args(ret))}-tuple")
    assert not bad, "\n  ".join(["Returns sections that do not match the returned tuple:", *bad])


def test_no_prose_in_the_type_column_of_a_docstring_item() -> None:
    """griffe reads ``name (text): description`` in a Google ``Returns:``/``Args:`` section as a
    name and a *type*: prose in the parentheses (``buffers (only with ``buffers=True``): ...``
    in ``gf.nn.stack``) was printed in the reference's type column with its reST backquotes."""
    import importlib.util

    from site_tools import require

    require(importlib.util.find_spec("griffe") is not None, "the docs tool chain is not installed (pip install -e .[docs]): missing ['griffe']")
    import griffe

    pkg = griffe.load("geofunc", search_paths=[str(ROOT)])
    kinds = {"returns", "yields", "parameters", "other parameters", "raises", "attributes"}
    bad, seen, todo = [], set(), [pkg]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        todo.extend(m for m in obj.members.values() if not m.is_alias)
        for section in obj.docstring.parse("google") if obj.docstring else []:
            if section.kind.value not in kinds:
                continue
            for item in section.value:
                annotation = str(getattr(item, "annotation", None) or "")
                if "``" in annotation or re.search(r"[A-Za-z]\s+[A-Za-z]", annotation):
                    bad.append(f"{obj.path} {section.kind.value} {getattr(item, 'name', '')!r}: {annotation!r}")
    assert not bad, "\n  ".join(["docstring items whose type is prose:", *bad])
