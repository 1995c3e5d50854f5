"""One line of a run's log as the wire carries it (LogLine.text): at most MAX_TEXT_BYTES
of UTF-8. The worker cuts what it ships and the server cuts what it stores (it cannot
trust a worker to have), with the same rule and marker."""
from __future__ import annotations

MAX_TEXT_BYTES = 16 * 1024
CUT_MARK = " [... line cut: {n} bytes in all]"


def cut_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`text` within `limit` UTF-8 bytes, a cut one ending with CUT_MARK (whole characters only)."""
    if len(text) * 4 <= limit:  # cheap: no encoding needed for short lines
        return text
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    mark = CUT_MARK.format(n=len(raw))
    return raw[:limit - len(mark.encode())].decode("utf-8", "ignore") + mark
