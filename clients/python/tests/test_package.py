"""The package as a user gets it: built into an sdist and a wheel (``python -m build``, which
builds the wheel from the sdist, so the sdist must carry what generating the stubs needs),
installed into a fresh virtualenv with nothing but the wheel and its pinned dependencies
(``--no-index``), then imported and used against a real bus from a directory outside the
checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from eventbus_client.testing import BusProcess

HERE = Path(__file__).resolve().parents[1]
#: Wheels of the runtime dependencies at their pinned versions, put there by
#: scripts/test-python.sh so the install below needs no network.
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"

USE = """
import sys
from eventbus_client import Bus
with Bus(sys.argv[1], source="installed") as bus:
    bus.wait_ready(10)
    with bus.subscribe("pkg.>", start="earliest") as subscription:
        sequence = bus.publish("pkg.hello", {"from": "wheel"})
        event = subscription.next_event(timeout=10)
        assert event is not None and event.json() == {"from": "wheel"}, event
        assert event.sequence == sequence
import eventbus_client
print(eventbus_client.__file__)
"""


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_built_wheel_installs_and_talks_to_a_bus(bus_process: BusProcess) -> None:
    assert WHEELHOUSE.is_dir(), f"{WHEELHOUSE} missing: run scripts/test-python.sh"
    with tempfile.TemporaryDirectory(prefix="eventbus-pkg-") as scratch:
        dist = Path(scratch) / "dist"
        # --no-isolation: the build requirements (setuptools, grpcio-tools) are the pinned ones
        # of this virtualenv, so the test needs no network.
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, HERE)
        [sdist] = dist.glob("*.tar.gz")
        [wheel] = dist.glob("*.whl")
        with tarfile.open(sdist) as archive:
            names = {Path(n).relative_to(Path(n).parts[0]).as_posix()
                     for n in archive.getnames() if len(Path(n).parts) > 1}
        assert {"proto/eventbus/v1/eventbus.proto", "generate.py", "setup.py"} <= names
        with zipfile.ZipFile(wheel) as archive:
            files = set(archive.namelist())
        assert {"eventbus_client/py.typed", "eventbus_client/_proto/eventbus_pb2.py",
                "eventbus_client/_proto/eventbus_pb2.pyi",
                "eventbus_client/_proto/eventbus_pb2_grpc.py"} <= files

        venv = Path(scratch) / "venv"
        try:
            run(sys.executable, "-m", "venv", venv)
        except AssertionError:
            # As scripts/test-python.sh: some distributions ship python3 without venv.
            run("python3", "-m", "virtualenv", "--quiet", venv)
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", dist,
            "--find-links", WHEELHOUSE, wheel)
        where = run(python, "-c", USE, bus_process.address, cwd=Path(scratch)).strip()
        assert where.startswith(str(venv)), where
