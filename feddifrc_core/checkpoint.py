"""Self-describing, atomically written, checksummed checkpoints (one safetensors file each).

A checkpoint holds named arrays (the global model under `model.`, strategy state such as the
projection bases under other prefixes, the torch RNG state) and a JSON `meta` dict (round, config,
RNG states, metrics history). The file is written to a temporary name, fsynced and renamed, so a
kill at any moment leaves either the old or the new file; a SHA-256 over the meta and every array is
stored inside and verified on read, so a damaged file is detected and the previous one used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_FORMAT = "feddifrc-checkpoint-v1"
_NAME = re.compile(r"^round-(\d{4,})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or fails its checksum."""


class WriteError(OSError):
    """Writing a file failed; the message names the file, the reason and the fix."""


@dataclass(frozen=True)
class ArrayFile:
    """A verified file of named arrays and its JSON meta (caches, stored models, checkpoints)."""

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays whose names start with `prefix.`, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.arrays.items() if k.startswith(prefix + ".")}


@dataclass(frozen=True)
class Checkpoint(ArrayFile):
    """A verified checkpoint of a run: its meta always has `round`."""

    @property
    def round(self) -> int:
        return int(self.meta["round"])


# --- atomic file writes ----------------------------------------------------------------------------
def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder + fsync + os.replace, so a
    reader sees the old or the new file. An OSError comes out as raised (errno intact), with the
    temporary file removed: callers word the error for their users."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`write_atomically`, creating the folder; an OSError names the file and the likely fix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, data)
    except OSError as err:
        raise write_error(path, err) from err


def write_error(path: str | Path, err: OSError) -> WriteError:
    """The error to raise when writing `path` failed: names the file, the reason and the fix
    (a full disk, a read-only or immutable folder)."""
    path = Path(path)
    return WriteError(f"could not write {path}: {err.strerror or err}. Check free disk space and "
                   f"that the folder {path.parent} is writable.")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# --- checkpoints -----------------------------------------------------------------------------------
def checkpoint_path(folder: str | Path, server_round: int) -> Path:
    return Path(folder) / f"round-{server_round:04d}.safetensors"


def save_checkpoint(
    path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Write one round's checkpoint atomically. `meta` must contain `round`."""
    if "round" not in meta:
        raise ValueError(f"checkpoint meta must contain 'round', got keys {sorted(meta)}")
    return save_arrays(path, arrays, meta)


def save_arrays(
    path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Write named arrays + a JSON-serialisable `meta` atomically, with the checksum that
    `load_arrays` verifies (caches and the teacher's training state, which have no round)."""
    from safetensors.numpy import save

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta_json = json.dumps(dict(meta), sort_keys=True)
    header = {"format": _FORMAT, "meta": meta_json, "sha256": _digest(contiguous, meta_json)}
    return atomic_write_bytes(path, save(contiguous, metadata=header))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint of a run; any damage raises CheckpointError naming it."""
    found = load_arrays(path)
    if "round" not in found.meta:
        raise CheckpointError(f"checkpoint {path} has no round in its meta: not a run's checkpoint")
    return Checkpoint(found.path, found.arrays, found.meta)


def load_arrays(path: str | Path) -> ArrayFile:
    """Read and verify a file `save_arrays` wrote; any damage raises CheckpointError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
            arrays = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several types for truncated files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated?): {err}") from err
    if header.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {header.get('format')!r}, expected {_FORMAT!r}")
    meta_json = header.get("meta", "")
    if header.get("sha256") != _digest(arrays, meta_json):
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check (damaged file)")
    return ArrayFile(path=path, arrays=arrays, meta=json.loads(meta_json))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest round first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path,
                      skip: Callable[[Checkpoint], str | None] | None = None) -> Checkpoint | None:
    """The newest checkpoint in `folder` that verifies; damaged ones are logged and skipped, and
    so are those for which `skip` returns a reason (e.g. a model that holds NaN)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            found = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            continue
        reason = skip(found) if skip is not None else None
        if reason is None:
            return found
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keeps disk use bounded on long runs)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)
    # Temp files of a writer killed mid-save (a run folder has one writer, the ServerApp, whose
    # own save has completed when it prunes): a checkpoint's size each, never read.
    for tmp in Path(folder).glob(".round-*.safetensors.*.tmp"):
        tmp.unlink(missing_ok=True)


def _digest(arrays: Mapping[str, np.ndarray], meta_json: str) -> str:
    sha = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


# --- RNG state -------------------------------------------------------------------------------------
def capture_rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Python, NumPy and torch global RNG states as (JSON meta, arrays)."""
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    arrays = {
        "numpy-keys": np.asarray(np_keys, dtype=np.uint32),
        "torch": torch.get_rng_state().numpy().copy(),
    }
    return meta, arrays


def restore_rng_state(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Inverse of `capture_rng_state`."""
    import torch

    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, np.asarray(arrays["numpy-keys"]), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.from_numpy(np.asarray(arrays["torch"], dtype=np.uint8).copy()))
