"""Small explicit stores: per-process memos of expensive objects, and per-client state on disk."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TypeVar, cast

import numpy as np

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_checkpoint

T = TypeVar("T")


class ProcessCache:
    """A small keyed memo for expensive per-process objects (data set, diffusion backbone).

    Simulation runs many ClientApp calls in one worker process: loading the backbone or the data
    set once per process keeps memory flat in the number of clients. `max_items` bounds it so a
    process that serves several configurations does not keep them all.
    """

    def __init__(self, max_items: int = 2) -> None:
        self.max_items = max_items
        self._items: dict[Hashable, object] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, factory: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                hit = self._items.pop(key)
                self._items[key] = hit  # most recently used last
                return cast(T, hit)  # stored by a factory of this key
        value = factory()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_items:
                self._items.pop(next(iter(self._items)))
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# --- per-client state that must survive rounds (the previous local model of MOON-like algorithms) -
class LocalModelStore:
    """Each client's last local model, on disk, tagged with the round that produced it.

    MOON contrasts against the client's previous local model. Keeping it on disk (not in memory)
    keeps simulation memory flat and survives a restart; tagging files with the round lets a
    resumed run pick exactly the model an uninterrupted run would have used.
    """

    def __init__(self, folder: str | Path, partition_id: int) -> None:
        self.folder = Path(folder)
        self.partition_id = partition_id

    def _path(self, server_round: int) -> Path:
        return self.folder / f"client-{self.partition_id:05d}-round-{server_round:04d}.safetensors"

    def load_before(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The newest stored model from a round < `server_round`, or None (first participation)."""
        prefix = f"client-{self.partition_id:05d}-round-"
        rounds = sorted(
            (int(p.name[len(prefix):len(prefix) + 4]), p)
            for p in self.folder.glob(prefix + "*.safetensors")
        )
        for r, path in reversed(rounds):
            if r >= server_round:
                continue
            try:
                return load_arrays(path).arrays
            except CheckpointError:
                continue  # damaged by a kill: fall back to an older one
        return None

    def save(self, server_round: int, state: Mapping[str, np.ndarray], keep: int = 3) -> None:
        """Store this round's local model; keep the newest `keep` files (resume needs the one before)."""
        save_checkpoint(self._path(server_round), state, {"round": server_round})
        prefix = f"client-{self.partition_id:05d}-round-"
        stored = sorted(self.folder.glob(prefix + "*.safetensors"))
        for old in stored[:-keep]:
            old.unlink(missing_ok=True)
