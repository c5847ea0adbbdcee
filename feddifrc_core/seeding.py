"""Seeds derived from names: a leaf module every layer may import.

`hashed_seed` (SHA-256 of the parts) seeds per-sample noise, negative draws and random bases; its
values are part of feature-cache fingerprints, so it must never change.
`seedsequence_seed` (numpy's SeedSequence of the integer keys) seeds each local update per
(run seed, round, partition); resumed runs rely on it being the same, so it must never change either.
`numpy_global_seed` seeds numpy's global RNG for a block, for library code that draws from it
(Flower's DP noise), and gives the previous state back afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def hashed_seed(*parts: int | str) -> int:
    """A 63-bit seed from (base seed, sample id, stream, ...), identical on every machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seedsequence_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for one (round, client, ...) from the run seed: numpy's SeedSequence of the
    keys (each taken mod 2**32), independent streams per key tuple."""
    words = [int(k) % 2**32 for k in (seed, *keys)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded with `seed` (taken mod 2**32) inside the block; the previous
    state is restored afterwards, so other users of the global RNG see no change."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)
