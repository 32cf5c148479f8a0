"""A griffe extension for the API reference: the reST bits of geofunc's docstrings as Markdown.

geofunc's docstrings are written for ``help()`` and Sphinx-style readers (``:math:`...```,
``:class:`...```, ``.. math::`` blocks, ``Example::``). mkdocstrings renders docstrings as
Markdown, so before rendering we rewrite those constructs: inline maths to ``$...$``, display
maths to ``$$...$$`` (both typeset by MathJax through pymdownx.arithmatex), cross-reference
roles to code spans, and ``Example::`` literal blocks to fenced code blocks. The docstrings themselves stay as
they are.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|obj|exc):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _display_math(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = len(line) - len(line.lstrip())
            i += 1
            body: list[str] = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            out.append(" " * indent + "$$")
            out.extend(" " * indent + l for l in textwrap.dedent("\n".join(body)).strip("\n").splitlines())
            out.append(" " * indent + "$$")
            out.append("")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """``Title::`` + an indented block -> ``**Title**`` + a fenced Python block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(.*\S)::\s*$", line)
        if m and not line.strip().startswith(".."):
            indent = len(m.group(1))
            j = i + 1
            body: list[str] = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                body.append(lines[j])
                j += 1
            code = textwrap.dedent("\n".join(body)).strip("\n")
            if code:
                pad = " " * indent
                out.append(f"{pad}**{m.group(2)}**")
                out.append("")
                out.append(pad + "```python")
                out.extend(pad + l for l in code.splitlines())
                out.append(pad + "```")
                out.append("")
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _display_math(text)
    text = _literal_blocks(text)
    text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return text


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
