"""Per-client feature cache: round trip, resume, corruption and fingerprint mismatch."""

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from feddifrc_core.feature_cache import FeatureCache

SPEC = {"block1": ((3, 8), "float16"), "prompt_ids": ((3,), "int64")}
FP = {"model": "tiny", "timestep": 300, "sample_ids_sha256": "abc"}


def _rows(start: int, stop: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(start)
    return {
        "block1": torch.randn(stop - start, 3, 8, generator=gen),
        "prompt_ids": torch.arange(start, stop)[:, None].repeat(1, 3),
    }


def _fill(cache: FeatureCache, chunks: list[int]) -> None:
    for i in chunks:
        cache.write_chunk(i, _rows(*cache.chunk_range(i)))


def test_round_trip_and_fp16_storage(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "fmnist-n10", FP, num_rows=10, chunk_rows=4, spec=SPEC)
    assert cache.open() == [0, 1, 2]
    _fill(cache, [0, 1, 2])
    again = FeatureCache(tmp_path, "fmnist-n10", FP, num_rows=10, chunk_rows=4, spec=SPEC)
    assert again.open() == [] and again.dir == cache.dir
    data = again.load()
    expected = torch.cat([_rows(0, 4)["block1"], _rows(4, 8)["block1"], _rows(8, 10)["block1"]])
    assert data["block1"].dtype == torch.float16 and data["block1"].shape == (10, 3, 8)
    torch.testing.assert_close(data["block1"].float(), expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(data["prompt_ids"][:, 0], torch.arange(10))
    manifest = json.loads((cache.dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"] == FP and len(manifest["chunks"]) == 3


def test_resume_keeps_written_chunks(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "c", FP, num_rows=10, chunk_rows=4, spec=SPEC)
    cache.open()
    _fill(cache, [0])  # then the process "dies"; a stray temp file is left behind
    stale = cache.dir / ".chunk-00001.safetensors.123.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # left by a writer killed 2 h ago
    fresh = cache.dir / ".chunk-00002.safetensors.456.tmp"
    fresh.write_bytes(b"in progress")  # may belong to a live concurrent writer: kept
    resumed = FeatureCache(tmp_path, "c", FP, num_rows=10, chunk_rows=4, spec=SPEC)
    assert resumed.open() == [1, 2]
    assert not stale.exists() and fresh.exists()
    with pytest.raises(RuntimeError, match="incomplete"):
        resumed.load()
    _fill(resumed, [1, 2])
    assert resumed.load()["block1"].shape == (10, 3, 8)


def test_corrupted_chunk_is_detected_and_recomputed(tmp_path: Path, caplog) -> None:
    cache = FeatureCache(tmp_path, "c", FP, num_rows=8, chunk_rows=4, spec=SPEC)
    cache.open()
    _fill(cache, [0, 1])
    path = cache.dir / "chunk-00001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        assert FeatureCache(tmp_path, "c", FP, num_rows=8, chunk_rows=4, spec=SPEC).open() == [1]
    assert "sha256" in caplog.text and "recomputed" in caplog.text
    assert not path.exists()


def test_fingerprint_mismatch_and_broken_manifest_rebuild(tmp_path: Path, caplog) -> None:
    cache = FeatureCache(tmp_path, "c", FP, num_rows=8, chunk_rows=4, spec=SPEC)
    cache.open()
    _fill(cache, [0, 1])
    manifest_path = cache.dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["timestep"] = 200  # e.g. a hand-copied cache from another setting
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert FeatureCache(tmp_path, "c", FP, num_rows=8, chunk_rows=4, spec=SPEC).open() == [0, 1]
    assert "fingerprint mismatch" in caplog.text and "timestep" in caplog.text
    assert not list(cache.dir.glob("chunk-*"))
    manifest_path.write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert FeatureCache(tmp_path, "c", FP, num_rows=8, chunk_rows=4, spec=SPEC).open() == [0, 1]
    assert "unreadable manifest" in caplog.text


def test_settings_get_separate_folders_and_shapes_are_checked(tmp_path: Path) -> None:
    a = FeatureCache(tmp_path, "c", FP, num_rows=4, chunk_rows=4, spec=SPEC)
    b = FeatureCache(
        tmp_path, "c", {**FP, "sample_ids_sha256": "other"}, num_rows=4, chunk_rows=4, spec=SPEC
    )
    assert a.dir != b.dir
    a.open()
    with pytest.raises(ValueError, match="block1"):
        a.write_chunk(
            0, {"block1": torch.zeros(4, 3, 7), "prompt_ids": torch.zeros(4, 3, dtype=torch.long)}
        )
