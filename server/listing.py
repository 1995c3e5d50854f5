"""List paging: opaque page tokens and the size bounds of a page.

A page token is base64 of "v1:<id>", the id of the last experiment of the page (List
is newest first, so the next page starts below it). Pages are bounded twice: by
`limit` rows and by PAGE_BYTES, so a listing never exceeds what gRPC sends (two 40 MB
specs once made every List fail), and one experiment's message is bounded by ROW_BYTES:
a spec stored before specs were capped at Submit is left out of listings rather than
breaking them.
"""
from __future__ import annotations

import base64
import binascii

from trainctl.v1 import trainctl_pb2 as pb

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
CHUNK = 200                 # experiments read from the store at a time
PAGE_BYTES = 16 << 20       # a page's budget (the server sends at most 64 MiB)
ROW_BYTES = 8 << 20         # one experiment (a 1 MiB spec is ~2.5 MiB with spec_json)
_PREFIX = "v1:"


def encode_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{last_id}".encode()).decode().rstrip("=")


def decode_token(token: str) -> int | None:
    """The id the page starts below, None for the first page; ValueError naming the field."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith(_PREFIX):
            raise ValueError(text)
        last = int(text[len(_PREFIX):])
        if last < 1:
            raise ValueError(text)
        return last
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"page_token: {token[:40]!r} is not a token from ListResponse.next_page_token") from None


def bounded(msg: pb.Experiment) -> pb.Experiment:
    """`msg`, without its spec when that alone would make it over ROW_BYTES."""
    if msg.ByteSize() > ROW_BYTES:
        msg.ClearField("spec")
        msg.spec_json = ""
    return msg
