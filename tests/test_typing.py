"""What geofunc's ``py.typed`` tells a type checker, checked through the annotations at runtime.

mypy and pyright are not dependencies of the suite, so these tests read the annotations with
``typing.get_type_hints``: a public name's annotation is the contract a typed user program is
checked against (``mypy --strict``, ``pyright``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import typing

import geofunc

ROOT = pathlib.Path(geofunc.__file__).parent

# Decorators that type checkers understand themselves.
_KNOWN = {"staticmethod", "classmethod", "property", "final", "cached_attribute"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _decorated_public_defs() -> list[tuple[str, str, typing.Any]]:
    """``(where, decorator name, decorator)`` for every decorator of geofunc's own applied to a public
    function, or to a public method of a class that is not an autograd Function (those are torch's)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        defs = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and _public(node.name):
                defs.append((node.name, node))
            elif isinstance(node, ast.ClassDef) and not any("Function" in ast.unparse(b) for b in node.bases):
                defs += [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef) and _public(f.name)]
        candidates = [(q, d.id) for q, f in defs for d in f.decorator_list if isinstance(d, ast.Name) and d.id not in _KNOWN]
        if not candidates:
            continue
        module = importlib.import_module(_module_name(path))
        for qual, name in candidates:
            deco = getattr(module, name)
            if inspect.isfunction(deco) and deco.__module__.startswith("geofunc"):
                found.append((f"{module.__name__}.{qual}", name, deco))
    return found


def test_decorators_of_public_functions_keep_their_signatures() -> None:
    """A decorator typed ``Callable[..., Any] -> Callable[..., Any]`` makes every function it wraps
    ``def (*Any, **Any) -> Any`` to mypy and pyright: every public function of ``geofunc.hyperbolic``,
    the ``forward``/``right_inverse``/``rebase`` of ``geofunc.nn``'s parametrizations and the
    ``check_*`` properties of ``geofunc.testing`` took any arguments and returned ``Any``, so a call
    with ``c`` by position (a TypeError: it is keyword-only), a misspelled keyword or a missing
    argument passed the checkers. Each such decorator is typed as the identity on its argument's
    type (a TypeVar in, the same TypeVar out)."""
    found = _decorated_public_defs()
    names = {name for _, name, _ in found}
    assert {"_in_float32", "gathered", "_property"} <= names, f"the scan found only {sorted(names)}"
    bad = []
    for name in sorted(names):
        deco = next(d for _, n, d in found if n == name)
        hints = typing.get_type_hints(deco)
        first = next(iter(inspect.signature(deco).parameters))
        if not (isinstance(hints.get(first), typing.TypeVar) and hints.get("return") is hints[first]):
            users = [w for w, n, _ in found if n == name]
            bad.append(f"{deco.__module__}.{name} ({first}: {hints.get(first)}) -> {hints.get('return')}, "
                       f"on {len(users)} public names, e.g. {users[0]}")
    assert not bad, "decorators that erase the signatures of public names:\n  " + "\n  ".join(bad)
