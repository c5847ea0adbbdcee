"""The run config of tests that run the real apps on a micro budget (seconds, no diffusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feddifrc_core.config import RunConfig


def micro_run_config(tmp_path: Path, **changes: Any) -> RunConfig:
    """Digits, a width-4 small CNN, one local epoch of batch 16, IID, FedAvg; `changes` win."""
    base: dict[str, Any] = dict(
        seed=3, num_rounds=1, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
        output_dir=str(tmp_path / "runs"), run_name="run", torch_threads=1, device="cpu",
        dataset="digits", train_samples=60, test_samples=40, partition="iid", model="small-cnn",
        model_width=4, local_epochs=1, batch_size=16, algorithm="fedavg",
        cache_dir=str(tmp_path / "cache"))
    return RunConfig().replace(**{**base, **changes})
