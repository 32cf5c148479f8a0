"""Every ``>>>`` example in geofunc's docstrings runs as written and prints what it shows.

Each module's examples run in that module's namespace (so a class's own name is defined there, as
the rendered page shows it) with the prelude every page assumes: ``import torch`` and ``import
geofunc as gf``. Anything else an example uses it imports or builds itself. Regression: ``Product``'s
example called ``SO()``/``Sphere()`` (names its module does not have), ``TorchOptimizer``'s used an
undefined ``nn``, ``rsgd``'s, ``masked``'s, ``apply_if_finite``'s and ``contrib.geoopt``'s used
``params``/``grads``/``c``/``constraints``/``model`` defined nowhere, and ``sln``'s warned
(``float`` of a tensor that requires grad). A few seconds in all.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import geofunc as gf

MODULES = ["geofunc"] + sorted(m.name for m in pkgutil.walk_packages(gf.__path__, "geofunc."))
# examples that need an optional dependency (the module itself does not import it)
NEEDS = {"geofunc.contrib.geoopt": "geoopt", "geofunc.contrib.zuko": "zuko"}


def test_every_module_is_listed() -> None:
    assert {"geofunc.spaces._product", "geofunc.optim._module", "geofunc.nn._constraints"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name: str) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name, extraglobs={"torch": torch, "gf": gf})
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failures = []
    for test in tests:
        if not test.examples:
            continue
        torch.manual_seed(0)
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=flags)
        runner.run(test, out=report.append)
        if runner.failures:
            failures.append("".join(report))
    assert not failures, "\n".join(failures)
