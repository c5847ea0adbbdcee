"""Runs of several methods on one partition, seed and budget, side by side: a table, one plot and
the multi-seed result that a single seed must be read against (the demo, `scripts/demo.py`)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feddifrc_core.checkpoint import atomic_write_bytes
from feddifrc_core.reporting import ACCURACY_KEY, LAST_ROUNDS


@dataclass(frozen=True)
class MethodRun:
    """One finished run: its label, run folder, summary.json and per-round metrics rows."""

    label: str
    folder: Path
    summary: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]

    @classmethod
    def read(cls, label: str, folder: Path) -> MethodRun:
        summary = json.loads((folder / "summary.json").read_text())
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        return cls(label, folder, summary, rows)

    def numbers(self) -> dict[str, float | int | None]:
        """The table's numbers (accuracies in %): at the round validation chose, the last-5
        mean, the final round."""
        s = self.summary

        def pct(key: str) -> float | None:
            value = s.get(key)
            return None if value is None else 100.0 * float(value)

        return {"at-validation": pct("accuracy-at-validation-round"),
                "validation-round": s.get("validation-round"),
                "last-5": pct(f"last-{LAST_ROUNDS}-mean-accuracy"),
                "final": pct("final-accuracy")}


def comparison_table(runs: Sequence[MethodRun], baseline: str) -> str:
    """Markdown: one row per method, then each method minus the baseline on the same seed."""
    numbers = {r.label: r.numbers() for r in runs}
    lines = ["| method | test acc. at the round validation chose | mean of the last "
             f"{LAST_ROUNDS} rounds | final round |", "|---|---|---|---|"]
    for label, n in numbers.items():
        chosen = "n/a" if n["at-validation"] is None else \
            f"{n['at-validation']:.2f} % (round {n['validation-round']})"
        lines.append(f"| {label} | {chosen} | {_pct(n['last-5'])} | {_pct(n['final'])} |")
    base = numbers[baseline]
    for label, n in numbers.items():
        if label == baseline:
            continue
        lines.append(f"| {label} - {baseline} | {_diff(n['at-validation'], base['at-validation'])} "
                     f"| {_diff(n['last-5'], base['last-5'])} | {_diff(n['final'], base['final'])} |")
    return "\n".join(lines)


def multi_seed_result(summary_paths: Sequence[Path], method: str, baseline: str, alpha: float
                      ) -> str | None:
    """One line on a benchmark's paired difference of the primary metric (last-5 mean) over
    seeds, read from the generated summary.json files given (newest suite first): the pair with
    the most seeds, the earlier file on a tie, so that a suite still in progress does not replace a
    complete one. None where no summary has such a pair yet."""
    pairs = [pair for path in summary_paths if (pair := _last5_pair(path, method, baseline, alpha))]
    if not pairs:
        return None
    pair = max(pairs, key=lambda p: len(p["seeds"]))  # max keeps the first of equals
    mean = pair["mean-sd"][0]
    low, high = pair["ci95"]
    return (f"{method} - {baseline} over {len(pair['seeds'])} seeds ({_seeds(pair['seeds'])}), "
            f"alpha {alpha:g}, mean of the last {LAST_ROUNDS} rounds: {mean:+.2f} points, "
            f"95 % interval [{low:+.2f}, {high:+.2f}]")


def _last5_pair(summary_path: Path, method: str, baseline: str, alpha: float
                ) -> Mapping[str, Any] | None:
    if not summary_path.is_file():
        return None
    for row in json.loads(summary_path.read_text()).get("table", []):
        pair = row.get(f"last-vs-{baseline}") or {}
        if row.get("label") == method and row.get("alpha") == alpha and pair.get("ci95"):
            return pair
    return None


def plot_comparison(runs: Sequence[MethodRun], path: Path, title: str = "") -> None:
    """Test accuracy per round of every method in one plot (validation dashed, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        test = _points(run.rows, ACCURACY_KEY)
        line = ax.plot(*test, marker="o", markersize=3, label=f"{run.label} (test)")[0] \
            if test[0] else None
        val = _points(run.rows, "val-accuracy")
        if val[0]:
            ax.plot(*val, linestyle="--", color=None if line is None else line.get_color(),
                    alpha=0.7, label=f"{run.label} (validation)")
        chosen = run.summary.get("validation-round")
        if chosen is not None and run.summary.get("accuracy-at-validation-round") is not None:
            ax.scatter([chosen], [100.0 * float(run.summary["accuracy-at-validation-round"])],
                       s=80, facecolors="none", edgecolors="black", zorder=3)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "global model accuracy (circle: the round validation chose)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _points(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["round"]), 100.0 * float(r[key])) for r in rows
             if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _pct(value: float | int | None) -> str:
    return "n/a" if value is None else f"{float(value):.2f} %"


def _diff(a: float | int | None, b: float | int | None) -> str:
    return "n/a" if a is None or b is None else f"{float(a) - float(b):+.2f} points"


def _seeds(seeds: Sequence[int]) -> str:
    ordered = sorted(seeds)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"seeds {ordered[0]}-{ordered[-1]}"
    return "seeds " + ", ".join(map(str, ordered))
