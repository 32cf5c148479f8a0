"""The benchmark runner cannot rot: a --quick smoke run (small sizes, < 60 s on 2 cores).

No timing is asserted (benchmarks/RESULTS.md holds the numbers); this checks that every
case runs, that the table and the plot are written, and that the GeoTorch columns are
skipped with a note when GeoTorch is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
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
    assert {"SO", "Unitary", "Stiefel", "LowRank", "PSD", "GLp", "ensemble", "train", "Sphere"} <= names
    for r in rows:
        assert r.mm > 0 and all(t > 0 for t in r.times.values())
        assert runner.GF in r.times, r.times  # every row times geofunc itself
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


def test_keep_going_reports_a_failed_section_and_keeps_the_others(runner, tmp_path, monkeypatch):
    """``--keep-going`` (the GPU run, whose lease may end): a section that raises is named under the
    table and the run goes on; without it the error propagates. The table is on disk after the first
    section, before the failing one runs."""
    import torch

    out = tmp_path / "R.md"
    seen = []

    def planted(*args, **kwargs):
        seen.append(out.read_text())  # the table as the failing section starts
        raise RuntimeError("planted failure")

    monkeypatch.setattr(runner, "zuko_cases", planted)
    threads = torch.get_num_threads()
    try:
        rows = runner.main(["--quick", "--keep-going", "--out", str(out), "--only", "sphere,zuko"])
        with pytest.raises(RuntimeError, match="planted failure"):
            runner.main(["--quick", "--out", str(tmp_path / "S.md"), "--only", "sphere,zuko"])
    finally:
        torch.set_num_threads(threads)
    assert [r.case.split("(")[0] for r in rows] == ["Sphere"]
    assert "| Sphere(" in seen[0]
    text = out.read_text()
    assert "Sections that raised" in text and "* zuko: RuntimeError: planted failure" in text


def test_module_entry_point_writes_its_table(tmp_path):
    """``python -m benchmarks --quick`` on one tiny case, in a fresh process: the table it writes has
    the header and a row for the case with positive times and mm-eq."""
    out = tmp_path / "R.md"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "sphere", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    lines = out.read_text().splitlines()
    header = [ln for ln in lines if ln.startswith("| case |")]
    assert len(header) == 1
    cols = [c.strip() for c in header[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| Sphere(64) |")]
    assert len(rows) == 1 and len(rows[0]) == len(cols), rows
    row = dict(zip(cols, rows[0]))
    assert row["size"] == "64"
    t, unit = row["geofunc"].split()
    assert unit in ("µs", "ms", "s") and float(t) > 0
    assert float(row["geofunc mm-eq"]) > 0
