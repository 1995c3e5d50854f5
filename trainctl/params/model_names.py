"""timm model names, checked without timm: the server validates `model.name` at Submit
and has no torch, so the names come from the list generated from the pinned timm."""
from __future__ import annotations

import difflib
import functools
import importlib.resources
from typing import List


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset:
    """timm's model names, read from the list generated from the pinned timm
    (`python -m trainctl.codegen`; a test fails when it is stale), so the server checks
    names without importing timm and torch."""
    text = importlib.resources.files("trainctl").joinpath("timm_models.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def known_model(name: str) -> bool:
    """True when `name` (optionally with a `.pretrained_tag`) is in timm's registry.

    Hub ids and paths (`hf-hub:...`, `org/model`) are never known: building them would
    download."""
    if any(c in name for c in ":/\\"):
        return False
    return name.split(".", 1)[0] in _timm_names()


def suggest_models(name: str, n: int = 5) -> List[str]:
    """Registry names closest to `name` (difflib), for "did you mean" messages."""
    arch = name.split(".", 1)[0].lower()
    names = sorted(_timm_names())

    def score(m: str) -> float:
        return difflib.SequenceMatcher(None, arch, m).ratio()

    # Prefix hits first ("vit_tiny" -> vit_tiny_patch16_224), which difflib ranks below
    # short unrelated names; then difflib's near-misses for typos ("resnt18").
    prefix = sorted((m for m in names if m.startswith(arch)), key=score, reverse=True)
    close = difflib.get_close_matches(arch, names, n=n, cutoff=0.6)
    return list(dict.fromkeys(prefix[:n] + close))[:n]
