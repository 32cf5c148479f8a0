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
def built_site(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """The documentation site, built once per session with ``mkdocs build --strict``
    (``tests/site_tools.py``). Returns ``(site_dir, completed_process)``; a failed build is
    reported by ``tests/test_docs.py::test_mkdocs_build_strict``.

    Under pytest-xdist (the README's ``-n 2``) the workers share one build: the first to ask
    builds it under a file lock in the run's common temporary directory, the others wait and read
    it (each worker building its own cost CI one more ``mkdocs build`` of the whole site)."""
    import json
    import subprocess

    from filelock import FileLock  # torch's own dependency
    from site_tools import build_site, missing_doc_plugins, require

    missing = missing_doc_plugins()
    require(not missing, f"the docs tool chain is not installed (pip install -e .[docs]): missing {missing}")
    if not hasattr(request.config, "workerinput"):  # one process: its own temporary directory
        work = tmp_path_factory.mktemp("docs-build")
        return work / "site", build_site(work / "site", work)
    work = tmp_path_factory.getbasetemp().parent / "docs-build"  # this run's, shared by its workers
    record = work / "build.json"
    with FileLock(str(work) + ".lock"):
        if not record.exists():
            work.mkdir(exist_ok=True)
            proc = build_site(work / "site", work)
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                          "stdout": proc.stdout, "stderr": proc.stderr}))
    done = json.loads(record.read_text())
    return work / "site", subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])
