"""Seeds derived from names: a leaf module every layer may import.

`hashed_seed` (SHA-256 of the parts) seeds per-sample noise, negative draws and random bases; its
values are part of feature-cache fingerprints, so it must never change.
"""

from __future__ import annotations

import hashlib


def hashed_seed(*parts: int | str) -> int:
    """A 63-bit seed from (base seed, sample id, stream, ...), identical on every machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
