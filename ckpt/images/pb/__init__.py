"""Protobuf classes generated from proto/*.proto at build/install time (never edited)."""

try:
    from ckpt.images.pb import core_pb2, image_pb2, wire_pb2
except ImportError as exc:  # pragma: no cover - only in an uninstalled checkout
    raise ImportError(
        "ckpt's protobuf modules are generated at install time: run `pip install -e .`"
    ) from exc

__all__ = ["core_pb2", "image_pb2", "wire_pb2"]
