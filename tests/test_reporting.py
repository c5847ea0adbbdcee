"""Run folder, checkpoints (atomic, verified, damaged ones skipped) and the run summary."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from feddifrc_core import checkpoint as ckpt
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.reporting import RunFolder, format_summary, plot_metrics, plot_series, summarize


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"model.w": rng.standard_normal((3, 4)).astype(np.float32),
            "model.steps": np.array(7, dtype=np.int64)}


def test_checkpoint_round_trip_and_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "round-0001.safetensors", _arrays(0),
                                {"round": 1, "history": [{"round": 1, "x": 0.5}]})
    loaded = ckpt.load_checkpoint(path)
    assert loaded.round == 1 and loaded.meta["history"] == [{"round": 1, "x": 0.5}]
    np.testing.assert_array_equal(loaded.group("model")["w"], _arrays(0)["model.w"])
    assert loaded.group("model")["steps"].dtype == np.int64
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away

    # One flipped byte inside the tensor data: the checksum catches it.
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(path)


def test_latest_checkpoint_skips_a_truncated_file(tmp_path):
    for r in (1, 2, 3):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, r), _arrays(r), {"round": r})
    last = ckpt.checkpoint_path(tmp_path, 3)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as if killed mid-write
    found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and found.round == 2
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["round-0003.safetensors"]
    assert ckpt.latest_checkpoint(tmp_path) is None  # only the damaged one is left


def test_rng_state_round_trip():
    meta, arrays = ckpt.capture_rng_state()
    meta = json.loads(json.dumps(meta))  # it must survive the checkpoint's JSON
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(meta, arrays)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_run_folder_contents_and_resume(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), dataset="digits", algorithm="fedavg")
    folder = RunFolder.open(cfg, "demo")
    folder.write_config(cfg, "demo", {})
    rows = [{"round": 0, "test-accuracy": 0.1, "test-loss": 2.3},
            {"round": 1, "test-accuracy": 0.5, "test-loss": 1.0, "train-loss": 1.5, "failures": 1},
            {"round": 2, "test-accuracy": 0.4, "test-loss": 1.1, "train-loss": 1.2, "failures": 0}]
    for row in rows:
        folder.log_round(row)
    summary = summarize(folder.rows, wall_seconds=3.0)
    # Round 0 is the untrained model: it does not count towards best or mean.
    assert summary["best-accuracy"] == 0.5 and summary["best-round"] == 1
    assert summary["mean-accuracy"] == pytest.approx(0.45)
    assert summary["final-accuracy"] == 0.4 and summary["client-failures"] == 1
    ckpt.save_checkpoint(ckpt.checkpoint_path(folder.checkpoints, 2), _arrays(0), {"round": 2})
    folder.write_final({"w": np.ones(2, np.float32)}, summary)

    names = {p.name for p in folder.path.iterdir()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "metrics.png", "tensorboard",
            "checkpoints", "final_model.safetensors", "summary.json"} <= names
    assert json.loads((folder.path / "config.json").read_text())["run-config"]["dataset"] == "digits"
    assert len(folder.metrics_jsonl.read_text().splitlines()) == 3
    assert folder.metrics_csv.read_text().splitlines()[0].startswith("round,")
    assert list((folder.path / "tensorboard").glob("events.out.tfevents.*"))
    assert folder.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A new run may not overwrite it; resume reopens it and rewinds the tables to a checkpoint.
    with pytest.raises(ConfigError, match="resume=true"):
        RunFolder.open(cfg, "demo")
    reopened = RunFolder.open(cfg.replace(resume=True), "demo")
    reopened.restore(rows[:2])
    assert [json.loads(line)["round"] for line in reopened.metrics_jsonl.read_text().splitlines()] == [0, 1]
    reopened.close()
    with pytest.raises(ConfigError, match="no checkpoint"):
        RunFolder.open(cfg.replace(resume=True), "other")


def test_label_free_runs_summarise_and_plot_the_probe_and_knn(tmp_path):
    rows = [{"round": 0, "test-accuracy": 0.2, "test-probe-accuracy": 0.2, "test-knn-accuracy": 0.3},
            {"round": 1, "train-loss": 2.0},  # eval-every=2: no evaluation in round 1
            {"round": 2, "test-accuracy": 0.6, "test-probe-accuracy": 0.6, "test-knn-accuracy": 0.5,
             "train-loss": 1.5}]
    summary = summarize(rows, wall_seconds=1.0)
    assert summary["accuracy-metric"] == "linear-probe" and summary["best-accuracy"] == 0.6
    assert summary["best-knn-accuracy"] == summary["final-knn-accuracy"] == 0.5
    text = format_summary(summary, tmp_path)
    assert "Linear-probe test accuracy at the round chosen on validation: n/a" in text
    assert "best on test 60.00% (round 2" in text
    assert "kNN test accuracy at the round chosen on validation: n/a" in text
    assert "best on test 50.00%" in text.split("kNN test accuracy")[1]
    series = plot_series(rows)
    assert series["accuracy"] == {"test-probe-accuracy": "linear probe (test)",
                                  "test-knn-accuracy": "kNN (test)"}
    # Supervised rows keep test/train accuracy and the plain summary.
    supervised = [{"round": 1, "test-accuracy": 0.5, "train-accuracy": 0.7}]
    assert set(plot_series(supervised)["accuracy"]) == {"test-accuracy", "train-accuracy"}
    assert "accuracy-metric" not in summarize(supervised, 1.0)
    plot_metrics(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
