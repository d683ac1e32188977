"""Every ```python block of README.md runs as written, each in its own interpreter, against a
real bus named by ``EVENTBUS_SERVER``, and finishes within a bound: the README cannot promise
code that does not run, or that never ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus_client.testing import BusProcess

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPETS = BLOCK.findall(README.read_text())


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int, bus_process: BusProcess, tmp_path: Path) -> None:
    script = tmp_path / f"snippet_{index}.py"
    script.write_text(SNIPPETS[index])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "EVENTBUS_SERVER": bus_process.address})
    assert done.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{done.stderr}"
    assert done.stdout.strip(), "a snippet prints what it shows"
