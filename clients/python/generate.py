"""Generates the protobuf and gRPC stubs of ``eventbus.v1`` into ``eventbus_client/_proto``.

The stubs are not committed: protobuf 7's generator marks its output "NO CHECKED-IN PROTOBUF
GENCODE", and generating them from ``../../proto`` every time means they can never drift from the
contract. Building the package runs it (``setup.py``: into the wheel, from the proto the sdist
carries); ``scripts/test-python.sh`` runs it into the source tree before the tests; run it yourself
for an editable install after cloning or after the proto changes::

    python clients/python/generate.py

Needs ``grpcio-tools`` (a dev dependency, pinned in ``requirements-dev.txt``). The output is
plain generator output except for one import line in the gRPC module: grpcio-tools writes an
absolute ``from eventbus.v1 import eventbus_pb2``, which would need a top-level ``eventbus``
package; it is rewritten to a relative import so the stubs live inside this package.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROTO_ROOT = HERE.parent.parent / "proto"
DEFAULT_OUT = HERE / "eventbus_client" / "_proto"
PROTO_FILE = "eventbus/v1/eventbus.proto"
ABSOLUTE_IMPORT = "from eventbus.v1 import eventbus_pb2 as"
RELATIVE_IMPORT = "from . import eventbus_pb2 as"


def generate(proto_root: Path = DEFAULT_PROTO_ROOT, out: Path = DEFAULT_OUT) -> list[Path]:
    """Writes the stubs into ``out`` (replacing what is there) and returns the files written."""
    from grpc_tools import protoc  # imported late: only this script needs grpcio-tools

    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(proto_root / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto_root / PROTO_FILE}")
        generated = Path(scratch) / "eventbus" / "v1"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        written = []
        for source in sorted(generated.iterdir()):
            text = source.read_text()
            if source.name == "eventbus_pb2_grpc.py":
                if ABSOLUTE_IMPORT not in text:
                    raise SystemExit(f"{source.name}: expected import line not found; "
                                     "has grpcio-tools changed its output?")
                text = text.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT)
            target = out / source.name
            target.write_text(text)
            written.append(target)
        (out / "__init__.py").write_text('"""Generated from proto/eventbus/v1/eventbus.proto by '
                                         'clients/python/generate.py. Do not edit."""\n')
        written.append(out / "__init__.py")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    options = parser.parse_args()
    for path in generate(options.proto_root, options.out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
