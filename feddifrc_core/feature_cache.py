"""Per-client on-disk cache of pooled diffusion features: safetensors chunks + a JSON manifest.

Layout: `<root>/<prefix>-<fingerprint hash>/manifest.json` and `chunk-00000.safetensors`, ...
- The folder name carries the hash of the full fingerprint (model identity, extraction settings,
  prompts, data set, sample ids, image bytes), so different clients and different settings
  sharing one cache folder never touch each other's files.
- Each chunk (a fixed range of rows) is written to a temp file and renamed (atomic); only then is
  it recorded, with its sha256, in the manifest (also replaced atomically, under a file lock).
  A killed extraction therefore resumes at the first chunk that is missing.
- On open every recorded chunk is verified (fingerprint, sha256, tensor names/shapes/dtypes); a
  mismatch or corruption is logged with its reason and the affected part is rebuilt, never used.
- A write that fails (disk full, read-only folder, a file where a folder should be) raises
  `FeatureCacheError` (an OSError with the errno) naming the path and the fix; nothing partial
  is left behind or recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from feddifrc_core.checkpoint import write_atomically

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


class FeatureCacheError(OSError):
    """The cache folder cannot be created or written; the message names the path and the fix."""


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}


def cache_io_error(action: str, path: Path, err: OSError) -> FeatureCacheError:
    """An OSError re-raised with what was done, where, and what the user can do about it."""
    where = "cache-dir (run config), the node's cache-dir or $FEDDIFRC_CACHE_DIR"
    if err.errno in _FULL:
        fix = f"free disk space, or point {where} to a disk with room"
    elif err.errno in _DENIED:
        fix = f"make {path.parent} writable for this user, or point {where} to a writable folder"
    elif err.errno in _NOT_A_FOLDER:
        fix = f"a part of {path} is a file, not a folder: point {where} to a folder"
    else:
        fix = f"check the disk, or point {where} to another folder"
    reason = err.strerror or str(err)
    return FeatureCacheError(err.errno, f"feature cache: cannot {action} {path}: {reason}; {fix}")


def safe_folder_name(text: str, default: str) -> str:
    """`text` with every character but letters, digits, '-', '_' and '.' replaced by '-'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text) or default


def fingerprint_sha256(fingerprint: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-able fingerprint (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def tensor_sha256(x: torch.Tensor | Any) -> str:
    """sha256 of a tensor's / array's bytes (with its shape and dtype), for fingerprints."""
    t = torch.as_tensor(x).contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}:".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """One client's cached arrays: `num_rows` rows split into chunks of `chunk_rows`.

    `spec` maps each tensor name to (per-row shape, dtype name), e.g.
    {"block1": ((11, 1280), "float16"), "prompt_ids": ((11,), "int64")}.
    """

    def __init__(
        self,
        root: str | Path,
        prefix: str,
        fingerprint: Mapping[str, Any],
        num_rows: int,
        chunk_rows: int,
        spec: Mapping[str, tuple[tuple[int, ...], str]],
    ) -> None:
        if num_rows < 0 or chunk_rows < 1:
            raise ValueError(
                f"need num_rows >= 0 and chunk_rows >= 1, got {num_rows} and {chunk_rows}"
            )
        safe_prefix = safe_folder_name(prefix, "cache")
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.key = fingerprint_sha256(self.fingerprint)
        self.dir = Path(root).expanduser() / f"{safe_prefix}-{self.key[:16]}"
        self.num_rows = int(num_rows)
        self.chunk_rows = int(chunk_rows)
        self.spec = {
            name: (tuple(int(d) for d in shape), str(dtype))
            for name, (shape, dtype) in spec.items()
        }
        self._chunks: dict[int, dict[str, Any]] = {}

    # --- layout -----------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def _header(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "fingerprint_sha256": self.key,
            "num_rows": self.num_rows,
            "chunk_rows": self.chunk_rows,
            "spec": {k: [list(s), d] for k, (s, d) in self.spec.items()},
        }

    # --- open / verify ------------------------------------------------------------------------
    def open(self) -> list[int]:
        """Verify what is on disk, drop anything wrong (logged), return the missing chunks."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.dir.is_dir():  # mkdir(exist_ok) accepts nothing else, but be explicit
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(self.dir))
        except OSError as err:
            raise cache_io_error("create the folder", self.dir, err) from err
        self._remove_stale_temp_files()
        self._chunks = {}
        manifest = self._read_manifest()
        if manifest is not None:
            problem = self._header_problem(manifest)
            if problem:
                logger.warning("feature cache %s: %s; the cache is rebuilt", self.dir, problem)
                self._wipe()
            else:
                for key, entry in manifest.get("chunks", {}).items():
                    problem = self._chunk_problem(int(key), entry)
                    if problem:
                        logger.warning(
                            "feature cache %s: chunk %s %s; it is recomputed",
                            self.dir,
                            key,
                            problem,
                        )
                        (self.dir / str(entry.get("file", ""))).unlink(missing_ok=True)
                    else:
                        self._chunks[int(key)] = entry
        return self.missing_chunks()

    def missing_chunks(self) -> list[int]:
        return [i for i in range(self.num_chunks) if i not in self._chunks]

    @property
    def complete(self) -> bool:
        return not self.missing_chunks()

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            return manifest
        except (OSError, ValueError) as err:
            logger.warning(
                "feature cache %s: unreadable manifest (%s); the cache is rebuilt", self.dir, err
            )
            self._wipe()
            return None

    def _header_problem(self, manifest: Mapping[str, Any]) -> str:
        expected = self._header()
        if manifest.get("fingerprint") != expected["fingerprint"]:
            old = manifest.get("fingerprint") or {}
            keys = sorted(
                k
                for k in set(old) | set(expected["fingerprint"])
                if old.get(k) != expected["fingerprint"].get(k)
            )
            return f"fingerprint mismatch (differs in {keys})"
        for field in ("format", "fingerprint_sha256", "num_rows", "chunk_rows", "spec"):
            if manifest.get(field) != expected[field]:
                got, want = manifest.get(field), expected[field]
                return f"manifest field {field!r} is {got!r}, expected {want!r}"
        return ""

    def _chunk_problem(self, index: int, entry: Mapping[str, Any]) -> str:
        if not 0 <= index < self.num_chunks:
            return "is out of range"
        path = self.dir / str(entry.get("file", ""))
        if not path.is_file():
            return "is missing"
        if _file_sha256(path) != entry.get("sha256"):
            return "fails its sha256 check (corrupted)"
        try:
            tensors = load_file(str(path))
        except Exception as err:  # a truncated or foreign file: any parser error means unusable
            return f"cannot be read ({err})"
        return self._shape_problem(index, tensors)

    def _shape_problem(self, index: int, tensors: Mapping[str, torch.Tensor]) -> str:
        start, stop = self.chunk_range(index)
        if set(tensors) != set(self.spec):
            return f"holds tensors {sorted(tensors)}, expected {sorted(self.spec)}"
        for name, (shape, dtype) in self.spec.items():
            t = tensors[name]
            if (
                tuple(t.shape) != (stop - start, *shape)
                or str(t.dtype).removeprefix("torch.") != dtype
            ):
                want = (stop - start, *shape)
                return f"has {name} {tuple(t.shape)} {t.dtype}, expected {want} {dtype}"
        return ""

    def _remove_stale_temp_files(self, max_age_s: float = 3600.0) -> None:
        """Temp files of killed writers; recent ones may belong to a live concurrent writer."""
        now = time.time()
        for path in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age_s:
                    path.unlink()

    def _wipe(self) -> None:
        for path in self.dir.iterdir():
            if path.is_file() and (path.suffix == ".safetensors" or path.name == MANIFEST):
                path.unlink(missing_ok=True)

    # --- write / read -----------------------------------------------------------------------
    def write_chunk(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store rows of chunk `index` (tensors are cast to the spec's dtype) and record it."""
        cast = {
            name: tensors[name].detach().to("cpu", getattr(torch, dtype)).contiguous()
            for name, (_, dtype) in self.spec.items()
            if name in tensors
        }
        problem = self._shape_problem(index, cast)
        if problem:
            raise ValueError(f"chunk {index} {problem}")
        name = f"chunk-{index:05d}.safetensors"
        # Serialised in memory, written by Python: every failure is an OSError with an errno
        # (the library's own file writer raises its own error type on a full disk).
        data = save_bytes(cast, metadata={"fingerprint_sha256": self.key, "chunk": str(index)})
        _atomic_write_bytes(self.dir / name, data, "write chunk")
        sha = hashlib.sha256(data).hexdigest()
        entry = {"file": name, "rows": list(self.chunk_range(index)), "sha256": sha}
        with self._locked():
            # merge with what a concurrent writer of the same cache may have recorded meanwhile
            on_disk = self._read_manifest_quiet()
            chunks = (
                dict(on_disk.get("chunks", {}))
                if on_disk and not self._header_problem(on_disk)
                else {}
            )
            chunks.update({str(k): v for k, v in self._chunks.items()})
            chunks[str(index)] = entry
            self._chunks = {int(k): v for k, v in chunks.items()}
            manifest = {
                **self._header(),
                "chunks": dict(sorted(chunks.items(), key=lambda kv: int(kv[0]))),
                "complete": self.complete,
            }
            _atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1))

    def load(self) -> dict[str, torch.Tensor]:
        """All rows of every tensor, verified again while reading; raises if anything is missing."""
        if not self.complete:
            raise RuntimeError(
                f"feature cache {self.dir} is incomplete: chunks {self.missing_chunks()} missing"
            )
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.spec}
        for index in range(self.num_chunks):
            path = self.dir / self._chunks[index]["file"]
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != self._chunks[index]["sha256"]:
                raise RuntimeError(f"feature cache chunk {path} changed on disk after verification")
            tensors = load_bytes(data)
            problem = self._shape_problem(index, tensors)
            if problem:
                raise RuntimeError(f"feature cache chunk {path} {problem}")
            for name in self.spec:
                parts[name].append(tensors[name])
        if self.num_chunks == 0:
            return {
                name: torch.empty((0, *shape), dtype=getattr(torch, dt))
                for name, (shape, dt) in self.spec.items()
            }
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _read_manifest_quiet(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock on the manifest (POSIX); elsewhere a no-op (writes stay atomic anyway)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        try:
            handle = open(self.dir / ".lock", "a+")  # noqa: SIM115 - closed below
        except OSError as err:
            raise cache_io_error("open the lock file", self.dir / ".lock", err) from err
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"), "write the manifest")


def _atomic_write_bytes(path: Path, data: bytes, action: str) -> None:
    try:
        write_atomically(path, data)
    except OSError as err:
        raise cache_io_error(action, path, err) from err
