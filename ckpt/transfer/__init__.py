"""Live migration, first slice: send checkpoint passes to a remote page server.

wire.py is the protocol (framing, authentication, TLS helpers), server.py stores received
passes in an images directory, client.py sends one local pass.
"""

from ckpt.transfer.client import PassSent, check_server, send_pass
from ckpt.transfer.server import serve
from ckpt.transfer.wire import (
    PROTOCOL_VERSION,
    TransferError,
    client_tls_context,
    load_token,
    pass_name,
    server_tls_context,
)

__all__ = [
    "PROTOCOL_VERSION",
    "PassSent",
    "TransferError",
    "check_server",
    "client_tls_context",
    "load_token",
    "pass_name",
    "send_pass",
    "serve",
    "server_tls_context",
]
