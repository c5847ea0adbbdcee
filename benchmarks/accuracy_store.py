"""The accuracy benchmark's records: one per finished run, read from its run folder, kept in
<out>/results.json (atomic, merged under a lock: several harness processes may share a folder).
A record names its configuration hash: a run planned today with other settings is not mistaken
for a recorded one.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy_plan import RunSpec
from feddifrc_core.checkpoint import atomic_write_text

RESULTS_FORMAT = 1
LOAD_FILE = "machine-load.json"  # beside a run's summary: the machine's load during the run


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_run(spec: RunSpec, folder: Path) -> dict[str, Any]:
    """The record of one finished run: per-round test (and validation) accuracy, best/mean,
    timings, config. Records of runs without a validation set have `val-accuracy` None."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evaluated = [r for r in rows if isinstance(r.get("test-accuracy"), (int, float))]
    trained = [r for r in evaluated if int(r["round"]) > 0]
    accs = [float(r["test-accuracy"]) for r in trained]
    extra_metrics = sorted({k for r in rows for k in r if "knn" in k or "probe" in k})
    start: dict[str, Any] = next((r for r in evaluated if int(r["round"]) == 0), {})  # the initial model

    def curve(key: str) -> list[float] | None:  # a per-round metric beside the test accuracy
        values = [r.get(key) for r in trained]
        return ([float(v) for v in values]
                if values and all(isinstance(v, (int, float)) for v in values) else None)

    def initial(key: str) -> float | None:
        return float(start[key]) if isinstance(start.get(key), (int, float)) else None

    return {
        "key": spec.key,
        "method": spec.method,
        "tag": spec.tag,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "config-hash": spec.config_hash,
        "teacher-weights-sha256": spec.teacher_weights or None,
        "run-config": spec.overrides,
        "resolved-run-config": _resolved_config(folder),
        "run-folder": str(folder),
        "rounds": [int(r["round"]) for r in trained],
        "accuracy": accs,
        "val-accuracy": curve("val-accuracy"),
        "initial-accuracy": initial("test-accuracy"),
        "initial-val-accuracy": initial("val-accuracy"),
        "best": max(accs) if accs else None,
        "mean": sum(accs) / len(accs) if accs else None,
        "final": accs[-1] if accs else None,
        "extra": {k: [r.get(k) for r in rows] for k in extra_metrics},
        # self-supervised runs: the kNN accuracy beside the probe's, on test and validation
        "knn-accuracy": curve("test-knn-accuracy"),
        "val-knn-accuracy": curve("val-knn-accuracy"),
        "initial-knn-accuracy": initial("test-knn-accuracy"),
        "initial-val-knn-accuracy": initial("val-knn-accuracy"),
        # the last round's client losses (train-tdcl, train-ndcr, ...): how close alignment got
        "last-round": {k: v for k, v in (trained[-1] if trained else {}).items()
                       if k.startswith("train-") and isinstance(v, (int, float))},
        "train-seconds-per-round": _mean([r.get("train-seconds") for r in trained]),
        "extract-seconds-first-round": trained[0].get("extract-seconds") if trained else None,
        "round-seconds": _mean([r.get("round-seconds") for r in trained]),
        "wall-seconds": json.loads((folder / "summary.json").read_text()).get("wall-seconds"),
        "machine-load": (json.loads((folder / LOAD_FILE).read_text())
                         if (folder / LOAD_FILE).is_file() else None),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class ResultsStore:
    """<out>/results.json: one record per finished run, rewritten atomically after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the file: several harness processes may share one results folder."""
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("format") != RESULTS_FORMAT:
                raise ValueError(f"{self.path} has format {data.get('format')!r}, expected "
                                 f"{RESULTS_FORMAT}; use another --out")
            self.records = {r["key"]: r for r in data["runs"]}

    def done(self, spec: RunSpec) -> bool:
        self.reload()
        record = self.records.get(spec.key)
        if record is None:
            return False
        if record["config-hash"] != spec.config_hash:
            raise ValueError(
                f"{spec.key} is recorded in {self.path} with another configuration (hash "
                f"{record['config-hash']}, now {spec.config_hash}); give the variant a --tag, "
                "use another --out, or delete that record to rerun it")
        return True

    def add(self, record: dict[str, Any]) -> None:
        """Merge one record into the file under a lock (read, merge, atomic replace)."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.reload()
            self.records[record["key"]] = record
            write_json(self.path, {"format": RESULTS_FORMAT, "runs": sorted(
                self.records.values(), key=lambda r: r["key"])})


def _resolved_config(folder: Path) -> dict[str, Any] | None:
    """The complete run config the ServerApp used (pyproject defaults + overrides), if written."""
    path = folder / "config.json"
    return json.loads(path.read_text()).get("run-config") if path.is_file() else None


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(nums) / len(nums) if nums else None
