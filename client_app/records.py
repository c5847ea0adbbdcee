"""Flower records <-> numpy: the wire format both apps speak (the core never imports flwr)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def from_flower_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord -> numpy arrays by name."""
    return {k: v.numpy() for k, v in record.items()}


def to_flower_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """numpy arrays -> Flower `Array`s for an ArrayRecord."""
    return {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
