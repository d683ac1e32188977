"""Build hook: the gRPC stubs are generated from the proto while the package is built, so every
wheel carries them and none are committed (see README.md, "How the stubs get into the package").

- ``sdist``: copies ``proto/eventbus/v1/eventbus.proto`` (from the repository root, two levels
  up) into the sdist's own ``proto/``, so the sdist builds a wheel with nothing else around it.
- ``build_py``: runs :func:`generate.generate` into the build tree's ``eventbus_client/_proto``
  from ``./proto`` (an unpacked sdist) or ``../../proto`` (the repository).

Everything else is in pyproject.toml; grpcio-tools is a pinned build requirement there.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generate import PROTO_FILE, generate  # noqa: E402


def proto_root() -> Path:
    """``./proto`` in an unpacked sdist, else the repository's ``proto/``."""
    for root in (HERE / "proto", HERE.parent.parent / "proto"):
        if (root / PROTO_FILE).is_file():
            return root
    raise SystemExit(f"{PROTO_FILE} not found in {HERE / 'proto'} or "
                     f"{HERE.parent.parent / 'proto'}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        written = generate(proto_root(), Path(self.build_lib) / "eventbus_client" / "_proto")
        print(f"generated {len(written)} stub files from {PROTO_FILE}")


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto" / PROTO_FILE
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto_root() / PROTO_FILE, target)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
