"""The README's code blocks and the demo script run (so the documentation cannot rot)."""

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})


def test_demo_runs(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["examples/demo.py"])  # the demo parses its command line
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "all on the manifold = True" in out


def test_readme_has_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in text, "the README's test command must be the one .ci/run runs"
    assert "python examples/demo.py" in text
