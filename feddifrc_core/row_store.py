"""Extracted feature rows kept per image, so that clients of other partitions reuse them.

A client's cache (`feature_cache.py`) is keyed by its whole sample set: a new partition of the
same images (another Dirichlet alpha, another number of clients) would extract everything again.
The features of one image depend only on the image, its global sample id (the noise seed) and the
extraction settings, so every extracted chunk is also written here as an immutable part file,
named by its content, under a folder keyed by the settings alone:

    <cache_dir>/rows-<dataset>-<settings hash>/part-<hash>.safetensors

A part holds the rows' sample ids, each image's sha256, the prompt ids and the pooled blocks
(fp16, as the client cache stores them). Parts are written atomically and verified on read
(`checkpoint.save_arrays` / `load_arrays`); a row is reused only when its image bytes and its
prompt ids match the request. A damaged part is reported, removed and its rows extracted again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_arrays
from feddifrc_core.feature_cache import cache_io_error, fingerprint_sha256, safe_folder_name

logger = logging.getLogger(__name__)

# Fingerprint entries that describe a client's sample set, not how its rows were computed.
SAMPLE_SET_KEYS = frozenset(
    {"num_samples", "sample_ids_sha256", "labels_sha256", "prompt_ids_sha256", "images_sha256"}
)


def image_digests(images: torch.Tensor) -> np.ndarray:
    """sha256 of every image's bytes (with its shape), uint8 [N, 32]."""
    arr = images.contiguous().cpu().numpy()
    out = np.empty((arr.shape[0], 32), dtype=np.uint8)
    shape = f"{tuple(arr.shape[1:])}:{arr.dtype}:".encode()
    for i, image in enumerate(arr):
        out[i] = np.frombuffer(hashlib.sha256(shape + image.tobytes()).digest(), dtype=np.uint8)
    return out


class RowStore:
    """The shared per-image rows of one extraction setting (one folder of part files)."""

    def __init__(self, root: str | Path, fingerprint: Mapping[str, Any], blocks: Sequence[str]):
        settings = {k: v for k, v in fingerprint.items() if k not in SAMPLE_SET_KEYS}
        self.key = fingerprint_sha256(settings)
        dataset = safe_folder_name(str(fingerprint.get("dataset") or ""), "data")
        self.dir = Path(root).expanduser() / f"rows-{dataset}-{self.key[:16]}"
        self.blocks = tuple(blocks)
        self._where: dict[int, Path] | None = None  # sample id -> part file holding it

    def _index(self) -> dict[int, Path]:
        """Which part holds each stored sample id (read once per store object, ids only)."""
        if self._where is None:
            from safetensors import safe_open

            self._where = {}
            for path in sorted(self.dir.glob("part-*.safetensors")):
                try:
                    with safe_open(str(path), framework="numpy") as handle:
                        ids = handle.get_tensor("sample_ids")
                except Exception as err:  # parts appear by rename, complete: this one is damaged
                    logger.warning(
                        "row store: removing unreadable part (its rows are extracted again): "
                        "%s: %s", path, err
                    )
                    path.unlink(missing_ok=True)
                    continue
                for sid in ids.tolist():
                    self._where.setdefault(int(sid), path)
        return self._where

    def lookup(
        self, sample_ids: torch.Tensor, digests: np.ndarray, prompt_ids: torch.Tensor
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Stored rows for the request: {position in the request: {block name: [P, d] fp16}}.

        Only rows whose image digest and prompt ids equal the request's are returned.
        """
        index = self._index()
        wanted: dict[Path, list[int]] = {}
        for pos, sid in enumerate(sample_ids.tolist()):
            if int(sid) in index:
                wanted.setdefault(index[int(sid)], []).append(pos)
        found: dict[int, dict[str, torch.Tensor]] = {}
        for path, positions in wanted.items():
            part = self._read(path)
            if part is None:
                continue
            row_of = {int(s): r for r, s in enumerate(part["sample_ids"].tolist())}
            for pos in positions:
                r = row_of[int(sample_ids[pos])]
                if not np.array_equal(part["image_sha256"][r], digests[pos]):
                    continue  # same id, other image bytes (another data version): not reused
                if not np.array_equal(part["prompt_ids"][r], prompt_ids[pos].numpy()):
                    continue
                found[pos] = {b: torch.from_numpy(part[b][r].copy()) for b in self.blocks}
        return found

    def _read(self, path: Path) -> dict[str, np.ndarray] | None:
        try:
            ckpt = load_arrays(path)
        except CheckpointError as err:
            logger.warning("row store: removing damaged part (its rows are extracted again): %s", err)
            path.unlink(missing_ok=True)
            self._where = None
            return None
        if ckpt.meta.get("settings_sha256") != self.key:
            logger.warning("row store: ignoring %s: written for other settings", path)
            return None
        return dict(ckpt.arrays)

    def add_missing(
        self,
        sample_ids: torch.Tensor,
        digests: np.ndarray,
        prompt_ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
    ) -> int:
        """Store the rows whose sample ids this store lacks (a client cache written before rows
        were shared, read from its cache); returns how many were added."""
        index = self._index()
        todo = [i for i, sid in enumerate(sample_ids.tolist()) if int(sid) not in index]
        if todo:
            take = torch.tensor(todo)
            self.add(
                sample_ids[take], digests[todo], prompt_ids[take],
                {b: features[b][take] for b in self.blocks},
            )
        return len(todo)

    def add(
        self,
        sample_ids: torch.Tensor,
        digests: np.ndarray,
        prompt_ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
    ) -> None:
        """Store freshly extracted rows as one new part (atomic; named by its content)."""
        if len(sample_ids) == 0:
            return
        arrays = {
            "sample_ids": sample_ids.to(torch.int64).cpu().numpy(),
            "image_sha256": digests,
            "prompt_ids": prompt_ids.to(torch.int64).cpu().numpy(),
            **{b: features[b].detach().to("cpu", torch.float16).numpy() for b in self.blocks},
        }
        name = hashlib.sha256(
            self.key.encode() + arrays["sample_ids"].tobytes() + digests.tobytes()
        ).hexdigest()[:16]
        path = self.dir / f"part-{name}.safetensors"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_arrays(path, arrays, {"settings_sha256": self.key})
        except OSError as err:
            raise cache_io_error("write the shared rows", path, err) from err
        if self._where is not None:
            for sid in arrays["sample_ids"].tolist():
                self._where.setdefault(int(sid), path)
