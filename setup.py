"""Build hook: generate ckpt/images/pb/*_pb2.py from proto/*.proto with grpcio-tools' protoc.

Generated files are never edited or committed; they are produced at build and install time
(also for editable installs), and tests/test_proto_codegen.py checks they match the schemas.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_protobuf(out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system.requires)

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    if protoc.main([*args, *(str(ROOT / p) for p in protos)]) != 0:
        raise RuntimeError("protoc failed on proto/*.proto")


class BuildWithProtobuf(build_py):
    def run(self) -> None:
        generate_protobuf(ROOT / "ckpt" / "images" / "pb")
        super().run()


setup(cmdclass={"build_py": BuildWithProtobuf})
