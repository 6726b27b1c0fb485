"""Build step of the handid Python client: generates the handid.v1 stubs.

The stubs come from the repository's API contract,
``../../proto/handid/v1/handid.proto`` relative to this folder, compiled with
grpcio-tools (a build requirement) into ``handid/v1/`` of the build: the
generated ``from handid.v1 import handid_pb2`` then resolves inside this
package. They are never committed (see .gitignore).

The generated code refuses to import under a grpcio or protobuf older than
the grpcio-tools that generated it, so the runtime requirements are read
from the generated files themselves.
"""

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "handid/v1/handid.proto"


def generate(out: Path) -> None:
    """Compiles the proto into ``out/handid/v1/``."""
    from grpc_tools import protoc  # a build requirement: only here

    proto = PROTO_ROOT / PROTO
    if not proto.is_file():
        raise SystemExit(
            f"handid client build: the API contract {proto} is not there. Build "
            "the client from a checkout of the handid repository, where it lies "
            "at proto/handid/v1/handid.proto two folders above clients/python "
            "(pip install clients/python)."
        )
    includes = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{includes}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto),
        ]
    )
    if code != 0:
        raise SystemExit(f"handid client build: protoc failed on {proto} (exit {code})")


def runtime_requirements() -> list:
    """grpcio and protobuf at least as new as the stubs generate() writes.

    Generates into a scratch folder and reads the versions the stubs check
    (``GRPC_GENERATED_VERSION``, ``ValidateProtobufRuntimeVersion``).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        stubs = Path(scratch) / "handid" / "v1"
        grpc_code = (stubs / "handid_pb2_grpc.py").read_text(encoding="utf-8")
        pb_code = (stubs / "handid_pb2.py").read_text(encoding="utf-8")
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_code)
    pb_version = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb_code
    )
    grpcio = grpc_version.group(1) if grpc_version else "1.62"
    protobuf = ".".join(pb_version.groups()) if pb_version else "4.25"
    return [
        f"grpcio>={grpcio}",
        f"protobuf>={protobuf}",
        "grpcio-health-checking>=1.62",
    ]


class BuildWithStubs(build_py):
    """build_py that first writes the stubs into the build (or, for an
    editable install, into the source folder)."""

    def run(self) -> None:
        out = HERE if self.editable_mode else Path(self.build_lib)
        generate(out)
        super().run()


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildWithStubs},
)
