"""The generated protobuf modules are exactly what protoc makes of proto/*.proto today."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt.images import pb

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto").glob("*.proto"))


def test_every_schema_has_a_generated_module() -> None:
    generated = Path(pb.__file__).parent
    assert PROTOS, "no schemas found"
    for proto in PROTOS:
        assert (generated / f"{proto.stem}_pb2.py").is_file(), proto.name


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_generated_code_matches_schema(proto: Path, tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            str(proto)]
    assert protoc.main(args) == 0
    generated = Path(pb.__file__).parent
    for suffix in ("_pb2.py", "_pb2.pyi"):
        fresh = (tmp_path / f"{proto.stem}{suffix}").read_text()
        installed = (generated / f"{proto.stem}{suffix}").read_text()
        assert fresh == installed, f"{proto.stem}{suffix} is stale: reinstall ckpt"
