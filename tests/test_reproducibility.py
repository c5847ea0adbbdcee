"""The same run config gives bit-identical curves and final model on the same machine: a short
run through the real ServerApp and ClientApp is made twice and compared, with the caches the
second run reuses (warm start, teacher logits) and without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.loopback_grid import run_loopback
from tests.micro_config import micro_run_config


def _curves(run_dir: Path) -> list[dict]:
    """Every per-round metric except the wall-clock timings."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("-seconds")} for r in rows]


def _assert_same_run(first: Path, second: Path) -> None:
    assert _curves(first) == _curves(second)  # exact: floats compared bit for bit
    a = load_file(str(first / "final_model.safetensors"))
    b = load_file(str(second / "final_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the arrays, not the file bytes (its metadata holds the wall time)
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    # FedAvg from the warm start, with the validation split: the second run reads the cached
    # warm start that the first one trained
    {"algorithm": "fedavg", "init_model": "public-supervised", "init_epochs": 1},
    # the distillation control: the second run reads the teacher logits the first one computed
    {"algorithm": "fedavg-kd", "diffusion_model": "tiny-sd", "diffusion_image_size": 0,
     "zero_shot_timesteps": "300,700"},
], ids=["fedavg-warm", "fedavg-kd"])
def test_the_same_config_twice_gives_the_same_curves_and_model(tmp_path, changes):
    cfg = micro_run_config(tmp_path, num_rounds=3, data_subset="private", validation_samples=40,
                           **changes)
    run_loopback(cfg.replace(run_name="first"), 2)
    run_loopback(cfg.replace(run_name="second"), 2)
    runs = tmp_path / "runs"
    _assert_same_run(runs / "first", runs / "second")
    rows = _curves(runs / "first")
    assert all("val-accuracy" in r and "test-accuracy" in r for r in rows)  # both curves
    summary = json.loads((runs / "first" / "summary.json").read_text())
    assert summary["validation-round"] in (1, 2, 3)

    # a fresh cache (nothing to reuse) gives the same bits as the cached results
    run_loopback(cfg.replace(run_name="fresh", cache_dir=str(tmp_path / "fresh-cache")), 2)
    _assert_same_run(runs / "first", runs / "fresh")
