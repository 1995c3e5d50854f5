"""Rules for tags and notes (one place: the store, the RPC and the console use them).

A tag is a short label a person types (`trainctl tag 3 +baseline -old`), so it is
kept to letters, digits and a few separators: it must survive a shell, a URL query
and a CSV column unquoted. The limits keep one experiment's row small.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,63}$")
MAX_TAGS = 32          # per experiment
MAX_NOTE_CHARS = 10_000


def check_tags(field: str, tags: Iterable[str]) -> list[str]:
    """The tags, de-duplicated in order; ValueError naming `field` and the bad value."""
    out: list[str] = []
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            shown = repr(tag)[:80]
            raise ValueError(f"{field}[{i}]: a tag is 1-64 letters, digits or _.:/=- starting with a letter "
                             f"or digit, got {shown}")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ValueError(f"{field}: at most {MAX_TAGS} tags, got {len(out)}")
    return out


def check_note(note: str) -> str:
    if len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"note: at most {MAX_NOTE_CHARS} characters, got {len(note)}")
    if "\x00" in note:
        raise ValueError("note: must not contain NUL characters")
    return note
