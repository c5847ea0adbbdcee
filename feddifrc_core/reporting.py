"""The run folder: everything a run leaves behind, written so that it describes itself.

    <output-dir>/<run-name>/
      config.json            resolved run config + run name, git revision, versions, start time
      metrics.jsonl          one JSON object per round (central test metrics, client aggregates,
                             failures, timings); metrics.csv is the same table
      metrics.png            accuracy / loss over rounds
      tensorboard/           TensorBoard events of the same scalars
      checkpoints/           round-NNNN.safetensors (model, strategy state, RNG, config, history)
      final_model.safetensors
      summary.json           best and mean test accuracy over rounds (the paper reports both), wall time
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feddifrc_core import differential_privacy as dp
from feddifrc_core.checkpoint import atomic_write_bytes, atomic_write_text
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.provenance import git_revision

ACCURACY_KEY = "test-accuracy"
# Label-free algorithms: test-accuracy is the linear probe's; the kNN accuracy is reported beside it.
KNN_KEY = "test-knn-accuracy"


def default_run_name(cfg: RunConfig, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{cfg.algorithm}-{cfg.dataset}-{stamp}"


def summarize(rows: Sequence[Mapping[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Best and mean central test accuracy over the evaluated rounds (the paper reports both)."""
    evaluated = [(int(r["round"]), float(r[ACCURACY_KEY])) for r in rows
                 if r.get(ACCURACY_KEY) is not None and int(r["round"]) > 0]
    summary: dict[str, Any] = {"rounds": max((int(r["round"]) for r in rows), default=0),
                               "wall-seconds": round(float(wall_seconds), 2)}
    if evaluated:
        best_round, best = max(evaluated, key=lambda item: (item[1], -item[0]))
        summary.update({
            "best-accuracy": best,
            "best-round": best_round,
            "mean-accuracy": float(np.mean([acc for _, acc in evaluated])),
            "final-accuracy": evaluated[-1][1],
        })
    knn = [float(r[KNN_KEY]) for r in rows
           if isinstance(r.get(KNN_KEY), (int, float)) and int(r["round"]) > 0]
    if knn:  # a label-free run: say which accuracy the summary holds
        summary.update({"accuracy-metric": "linear-probe", "best-knn-accuracy": max(knn),
                        "mean-knn-accuracy": float(np.mean(knn)), "final-knn-accuracy": knn[-1]})
    summary["client-failures"] = int(sum(int(r.get("failures", 0)) for r in rows))
    last = rows[-1] if rows else {}
    # Differential privacy: the whole run's (epsilon, delta), as the last round reported it.
    summary.update({k: last[k] for k in dp.REPORT_KEYS if k in last})
    return summary


def format_summary(summary: Mapping[str, Any], run_dir: Path) -> str:
    lines = [f"Run folder: {run_dir}"]
    if "best-accuracy" in summary:
        what = "Linear-probe test accuracy" if "best-knn-accuracy" in summary else "Test accuracy"
        lines.append(
            f"{what}: best {100 * summary['best-accuracy']:.2f}% (round {summary['best-round']}), "
            f"mean {100 * summary['mean-accuracy']:.2f}%, final {100 * summary['final-accuracy']:.2f}% "
            f"over {summary['rounds']} rounds"
        )
    if "best-knn-accuracy" in summary:
        lines.append(
            f"kNN test accuracy: best {100 * summary['best-knn-accuracy']:.2f}%, "
            f"mean {100 * summary['mean-knn-accuracy']:.2f}%, "
            f"final {100 * summary['final-knn-accuracy']:.2f}%"
        )
    if dp.DELTA in summary:
        lines.append(
            f"Differential privacy: epsilon {summary[dp.EPSILON]:.4g} at delta {summary[dp.DELTA]:g}"
            f" ({summary[dp.RELEASES]} noised rounds for the busiest client)"
            if dp.EPSILON in summary else "Differential privacy: no noise, no (epsilon, delta)")
    lines.append(f"Wall time: {summary['wall-seconds']:.1f} s; client failures: {summary['client-failures']}")
    lines.append(f"Plot: {run_dir / 'metrics.png'}")
    return "\n".join(lines)


@dataclass
class RunFolder:
    """Writer for one run folder. `open()` creates it, or reopens it for `resume`."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    _writer: Any = None

    # --- layout ------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def plot(self) -> Path:
        return self.path / "metrics.png"

    @property
    def final_model(self) -> Path:
        return self.path / "final_model.safetensors"

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"

    @classmethod
    def open(cls, cfg: RunConfig, run_name: str) -> RunFolder:
        """Create `<output-dir>/<run_name>`; with `cfg.resume` it must already hold checkpoints."""
        path = cfg.resolved_output_dir() / run_name
        has_checkpoints = (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())
        if cfg.resume and not has_checkpoints:
            raise ConfigError(
                f"resume=true but {path} holds no checkpoint; check run-name ({run_name!r}) and "
                "output-dir, or start a new run with resume=false"
            )
        if not cfg.resume and has_checkpoints:
            raise ConfigError(
                f"run folder {path} already holds checkpoints; set resume=true to continue it or "
                "choose another run-name"
            )
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the run folder {path}: {err.strerror}; set output-dir to a "
                          "writable folder") from err
        return cls(path=path)

    # --- writing -----------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig, run_name: str, extra: Mapping[str, Any]) -> None:
        import torch

        payload = {
            "run-name": run_name,
            "git-revision": git_revision(),
            "flwr-version": _installed_version("flwr"),  # the core never imports flwr
            "torch-version": torch.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
            "run-config": cfg.to_flower(),
        }
        name = "config.json" if not cfg.resume else f"config-resume-{int(time.time())}.json"
        atomic_write_text(self.path / name, json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """On resume: the metrics tables become exactly the checkpoint's history."""
        self.rows = [dict(r) for r in rows]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        atomic_write_text(self.metrics_jsonl, text)
        self._write_tables()
        last = max((int(r["round"]) for r in self.rows), default=0)
        self._tensorboard(purge_step=last + 1)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics to JSONL, CSV, TensorBoard and the plot."""
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.metrics_jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_tables()
        writer = self._tensorboard()
        if writer is not None:
            for key, value in row.items():
                if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, global_step=int(row["round"]))
            writer.flush()

    def write_final(self, model: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> None:
        from safetensors.numpy import save

        arrays = {k: np.ascontiguousarray(v) for k, v in model.items()}
        atomic_write_bytes(self.final_model, save(arrays, metadata={"summary": json.dumps(dict(summary))}))
        atomic_write_text(self.summary_json, json.dumps(dict(summary), indent=2) + "\n")
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- internals ---------------------------------------------------------------------------------
    def _write_tables(self) -> None:
        # A fixed order (round, then by name): a resumed run, whose rows come back from the
        # checkpoint with their keys in another order, keeps the same header.
        columns = ["round", *sorted({k for row in self.rows for k in row} - {"round"})]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.metrics_csv, buffer.getvalue())
        plot_metrics(self.rows, self.plot)

    def _tensorboard(self, purge_step: int | None = None) -> Any:
        if self._writer is None or purge_step is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            # purge_step drops events of rounds a resumed run is about to redo.
            self._writer = SummaryWriter(log_dir=str(self.path / "tensorboard"), purge_step=purge_step)
        return self._writer


def plot_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Per panel, the metric keys to draw and their legend labels.

    Label-free runs (rows carry a kNN accuracy) draw the linear-probe and kNN test accuracy; their
    `test-accuracy` is the probe's, so it is not drawn twice.
    """
    if any(KNN_KEY in r for r in rows):
        accuracy = {"test-probe-accuracy": "linear probe (test)", KNN_KEY: "kNN (test)"}
    else:
        accuracy = {"test-accuracy": "test-accuracy", "train-accuracy": "train-accuracy"}
    return {"accuracy": accuracy, "loss": {"test-loss": "test-loss", "train-loss": "train-loss"}}


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Accuracy (test/train, or linear probe/kNN) and train/test loss over rounds, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, series) in zip(axes, plot_series(rows).items(), strict=True):
        for key, label in series.items():
            points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
