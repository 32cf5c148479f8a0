"""Test configuration shared by every test file.

One intra-op thread: the tensors here are tiny (thread start-up costs more than it saves),
CI and the dev machine have two cores, each running one pytest-xdist worker (``-n 2``, the
README's command), and single-threaded reductions make float results reproducible run to run.
"""

from __future__ import annotations

import warnings

import pytest
import torch

torch.set_num_threads(1)

# torch.func.jvp loads its forward-AD decompositions lazily through torch.jit.script, which
# warns DeprecationWarning (torch 2.13; FutureWarning from 2.14); with filterwarnings = error that
# would fail the first test that calls jvp. Load them once here, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    torch.autograd.forward_ad._maybe_load_decompositions()

SEED = 20240607


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with a fixed seed (fresh for every test)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory):
    """The documentation site, built once per session with ``mkdocs build --strict``
    (``tests/site_tools.py``). Returns ``(site_dir, completed_process)``; a failed build is
    reported by ``tests/test_docs.py::test_mkdocs_build_strict``."""
    from site_tools import build_site, missing_doc_plugins, require

    missing = missing_doc_plugins()
    require(not missing, f"the docs tool chain is not installed (pip install -e .[docs]): missing {missing}")
    work = tmp_path_factory.mktemp("docs-build")
    proc = build_site(work / "site", work)
    return work / "site", proc
