"""The run folder: everything a run leaves behind, written so that it describes itself.

    <output-dir>/<run-name>/
      config.json            resolved run config + run name, git revision, versions, start time
      metrics.jsonl          one JSON object per round (central test metrics, client aggregates,
                             failures, timings); metrics.csv is the same table
      metrics.png            accuracy / loss over rounds
      tensorboard/           TensorBoard events of the same scalars
      checkpoints/           round-NNNN.safetensors (model, strategy state, RNG, config, history)
      final_model.safetensors  the last global model; identical runs give identical files
      summary.json           test accuracy at the round chosen on validation, mean of the last 5
                             evaluated rounds, best (chosen on test) and mean over rounds, wall time
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feddifrc_core import differential_privacy as dp
from feddifrc_core.checkpoint import WriteError, atomic_write_bytes, atomic_write_text, write_error
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.divergence import check_metrics
from feddifrc_core.provenance import git_revision

ACCURACY_KEY = "test-accuracy"
# Summary keys that differ between two runs of one config (how long it took, what it was called):
# they stay in summary.json and out of final_model.safetensors, so identical runs give
# byte-identical model files (hashes can be compared).
PER_RUN_KEYS = frozenset({"wall-seconds", "run-name"})
# Label-free algorithms: test-accuracy is the linear probe's; the kNN accuracy is reported beside it.
KNN_KEY = "test-knn-accuracy"
LAST_ROUNDS = 5  # the "last 5" mean: the end of training, with no round chosen at all


def default_run_name(cfg: RunConfig, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{cfg.algorithm}-{cfg.dataset}-{stamp}"


def validation_key(test_key: str) -> str:
    """The validation metric beside a test metric: test-accuracy -> val-accuracy."""
    return "val-" + test_key.removeprefix("test-")


def validation_choice(rounds: Sequence[int], validation: Sequence[float | None],
                      test: Sequence[float]) -> tuple[int, float, float] | None:
    """(round, its validation accuracy, its test accuracy) of the round with the highest
    validation accuracy, ties to the earliest; None when no round has a validation value.

    Model selection on validation, reported on test: the test set never chooses the round.
    """
    scored = [(float(v), -r, r, t) for r, v, t in zip(rounds, validation, test, strict=True)
              if v is not None]
    if not scored:
        return None
    val, _, chosen, at_test = max(scored)
    return chosen, float(val), float(at_test)


def last_mean(values: Sequence[float], n: int = LAST_ROUNDS) -> float:
    """Mean of the last `n` values (all of them when there are fewer)."""
    if not values:
        raise ValueError("last_mean of no values")
    tail = list(values)[-n:]
    return float(sum(tail) / len(tail))


def _curve_summary(rows: Sequence[Mapping[str, Any]], key: str, name: str) -> dict[str, Any]:
    """The summary entries of one per-round test metric `key` (test-accuracy or the kNN's)."""
    trained = [r for r in rows if isinstance(r.get(key), (int, float)) and int(r["round"]) > 0]
    if not trained:
        return {}
    rounds = [int(r["round"]) for r in trained]
    test = [float(r[key]) for r in trained]
    val_key = validation_key(key)
    validation = [float(r[val_key]) if isinstance(r.get(val_key), (int, float)) else None
                  for r in trained]
    best = max(range(len(test)), key=lambda i: (test[i], -rounds[i]))
    out: dict[str, Any] = {
        f"{name}-at-validation-round": None, f"{name}-validation-round": None,
        f"last-{LAST_ROUNDS}-mean-{name}": last_mean(test),
        f"best-{name}": test[best], f"best-{name}-round": rounds[best],
        f"mean-{name}": float(np.mean(test)), f"final-{name}": test[-1],
    }
    choice = validation_choice(rounds, validation, test)
    if choice is not None:
        out.update({f"{name}-validation-round": choice[0], f"validation-{name}": choice[1],
                    f"{name}-at-validation-round": choice[2]})
    return out


def summarize(rows: Sequence[Mapping[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """The central test accuracy of a run: at the round chosen on validation (None without a
    validation set), the mean of the last 5 evaluated rounds, and the best and mean over rounds
    (the paper's two numbers; the best is chosen on the test set, so it is optimistic)."""
    summary: dict[str, Any] = {"rounds": max((int(r["round"]) for r in rows), default=0),
                               "wall-seconds": round(float(wall_seconds), 2)}
    summary.update(_curve_summary(rows, ACCURACY_KEY, "accuracy"))
    if "best-accuracy" in summary:  # the round keys existing readers know
        summary["best-round"] = summary.pop("best-accuracy-round")
        summary["validation-round"] = summary.pop("accuracy-validation-round")
    knn = _curve_summary(rows, KNN_KEY, "knn-accuracy")
    if knn:  # a label-free run: say which accuracy the summary holds
        summary.update({"accuracy-metric": "linear-probe", **knn})
    summary["client-failures"] = int(sum(int(r.get("failures", 0)) for r in rows))
    last = rows[-1] if rows else {}
    # Differential privacy: the whole run's (epsilon, delta), as the last round reported it.
    summary.update({k: last[k] for k in dp.REPORT_KEYS if k in last})
    return summary


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f}%"


def format_summary(summary: Mapping[str, Any], run_dir: Path) -> str:
    """Human-readable lines; a summary without a validation set (older runs, or
    validation-samples = 0) says n/a where the validation-chosen round would be."""
    lines = [f"Run folder: {run_dir}"]
    if "best-accuracy" in summary:
        what = "Linear-probe test accuracy" if "best-knn-accuracy" in summary else "Test accuracy"
        chosen = summary.get("validation-round")
        where = (f" (round {chosen}, validation {_pct(summary.get('validation-accuracy'))})"
                 if chosen is not None else " (no validation set)")
        lines.append(
            f"{what} at the round chosen on validation: "
            f"{_pct(summary.get('accuracy-at-validation-round'))}{where}; "
            f"mean of the last {LAST_ROUNDS} rounds {_pct(summary.get(f'last-{LAST_ROUNDS}-mean-accuracy'))}"
        )
        lines.append(
            f"  best on test {_pct(summary['best-accuracy'])} (round {summary['best-round']}, "
            f"chosen on the test set), mean {_pct(summary['mean-accuracy'])}, "
            f"final {_pct(summary['final-accuracy'])} over {summary['rounds']} rounds"
        )
    if "best-knn-accuracy" in summary:
        lines.append(
            f"kNN test accuracy at the round chosen on validation: "
            f"{_pct(summary.get('knn-accuracy-at-validation-round'))}; last {LAST_ROUNDS} "
            f"{_pct(summary.get(f'last-{LAST_ROUNDS}-mean-knn-accuracy'))}; best on test "
            f"{_pct(summary['best-knn-accuracy'])}, mean {_pct(summary['mean-knn-accuracy'])}, "
            f"final {_pct(summary['final-knn-accuracy'])}"
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
        cls.check_resume(path, cfg.resume, run_name)
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"cannot create the run folder {path}: {err.strerror}; set output-dir "
                             "to a writable folder") from err
        return cls(path=path)

    @staticmethod
    def check_resume(path: Path, resume: bool, run_name: str) -> None:
        """ConfigError unless `path` holds checkpoints exactly when `resume` asks to continue it
        (reads only: launchers call it before they start anything)."""
        has_checkpoints = (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())
        if resume and not has_checkpoints:
            raise ConfigError(
                f"resume=true but {path} holds no checkpoint; check run-name ({run_name!r}) and "
                "output-dir, or start a new run with resume=false"
            )
        if not resume and has_checkpoints:
            raise ConfigError(
                f"run folder {path} already holds checkpoints; set resume=true to continue it or "
                "choose another run-name"
            )

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
        # JSON has no NaN: a non-finite value is refused, never written as a bare `NaN` token
        check_metrics(row, f"round {row.get('round')}", "metrics.jsonl was not written.")
        try:
            with open(self.metrics_jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # a full disk, a read-only or immutable run folder
            raise write_error(self.metrics_jsonl, err) from None
        self.rows.append(row)
        self._write_tables()
        try:
            writer = self._tensorboard()
            for key, value in row.items():
                if key != "round" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step=int(row["round"]))
            writer.flush()
        except OSError as err:
            raise write_error(self.path / "tensorboard", err) from None

    def write_final(self, model: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> None:
        from safetensors.numpy import save

        arrays = {k: np.ascontiguousarray(v) for k, v in model.items()}
        results = {k: v for k, v in summary.items() if k not in PER_RUN_KEYS}
        metadata = {"summary": json.dumps(results, sort_keys=True)}
        atomic_write_bytes(self.final_model, save(arrays, metadata=metadata))
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
    `test-accuracy` is the probe's, so it is not drawn twice. Validation curves are drawn beside
    the test ones where the run has a validation set.
    """
    if any(KNN_KEY in r for r in rows):
        accuracy = {"test-probe-accuracy": "linear probe (test)", KNN_KEY: "kNN (test)",
                    "val-probe-accuracy": "linear probe (validation)",
                    "val-knn-accuracy": "kNN (validation)"}
    else:
        accuracy = {"test-accuracy": "test-accuracy", "val-accuracy": "val-accuracy",
                    "train-accuracy": "train-accuracy"}
    loss = {"test-loss": "test-loss", "val-loss": "val-loss", "train-loss": "train-loss"}
    present = {k for r in rows for k in r}  # validation curves only where the run has them
    return {panel: {k: v for k, v in series.items() if not k.startswith("val-") or k in present}
            for panel, series in (("accuracy", accuracy), ("loss", loss))}


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
