"""The benchmark runner cannot rot: a --quick smoke run (small sizes, < 60 s on 2 cores).

No timing is asserted (benchmarks/RESULTS.md holds the numbers); this checks that every
case runs, that the table and the plot are written, and that the GeoTorch columns are
skipped with a note when GeoTorch is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import run

    return run


def test_quick_run_writes_table_and_plot(runner, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        out = tmp_path / "RESULTS.md"
        rows = runner.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "| case |" in text and "torch.set_num_threads(" in text and "device:" in text
    names = {r.case.split(" ")[0].split("(")[0] for r in rows}
    assert {"SO", "Stiefel", "LowRank", "PSD", "GLp", "ensemble", "train", "Sphere"} <= names
    for r in rows:
        assert r.mm > 0 and all(t > 0 for t in r.times.values())
        assert "geofunc" in r.times or "geofunc" in str(r.times)
    if runner.geotorch is None:
        assert "GeoTorch is not installed" in text
    else:
        assert any("geotorch" in r.times for r in rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "RESULTS_cost_vs_n.png").exists() or any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_runner_without_geotorch(runner, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(runner, "geotorch", None)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "R.md"
        rows = runner.main(["--quick", "--out", str(out), "--only", "SO,sphere"])
    finally:
        torch.set_num_threads(threads)
    assert rows and all("geotorch" not in r.times for r in rows)
    assert "GeoTorch is not installed" in out.read_text()


def test_script_entry_point_exists():
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "run.py"))
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "__main__.py"))
    assert sys.executable
