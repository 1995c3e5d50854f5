"""Client-side channels, shared by the SDK and the worker agent: plaintext by default,
TLS when TRAINCTL_TLS_CA is set (plus TRAINCTL_TLS_CERT/KEY for mutual TLS)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import grpc

MAX_MESSAGE = 64 * 1024 * 1024


def _read(path: Optional[str], what: str) -> Optional[bytes]:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {path} does not exist")
    return p.read_bytes()


def tls_credentials() -> Optional[grpc.ChannelCredentials]:
    ca = os.environ.get("TRAINCTL_TLS_CA")
    if not ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TRAINCTL_TLS_CA"),
        private_key=_read(os.environ.get("TRAINCTL_TLS_KEY"), "TRAINCTL_TLS_KEY"),
        certificate_chain=_read(os.environ.get("TRAINCTL_TLS_CERT"), "TRAINCTL_TLS_CERT"))


def open_channel(address: str, extra_options: tuple = ()) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE), *extra_options]
    creds = tls_credentials()
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    override = os.environ.get("TRAINCTL_TLS_SERVER_NAME")
    if override:
        options.append(("grpc.ssl_target_name_override", override))
    return grpc.secure_channel(address, creds, options=options)


def auth_metadata(token: Optional[str]) -> Optional[tuple]:
    return (("authorization", f"Bearer {token}"),) if token else None


def tls_hint(code: str, details: str) -> str:
    """A hint to append to an UNAVAILABLE error when the channel is plaintext: a TLS
    server closes a plaintext connection during the handshake, and gRPC says only
    "Socket closed" (or "failed to connect")."""
    if code != "UNAVAILABLE" or os.environ.get("TRAINCTL_TLS_CA"):
        return ""
    if not any(m in details.lower() for m in _CLOSED_MARKERS):
        return ""  # e.g. "connection refused": nothing listens, TLS or not
    return " (the server closed a plaintext connection: it may require TLS; set TRAINCTL_TLS_CA to its CA certificate)"


_CLOSED_MARKERS = ("socket closed", "connection reset", "handshake", "broken pipe", "end of file", "eof")
