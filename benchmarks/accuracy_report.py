"""Tables and plots of the accuracy benchmark, written from its recorded runs (results.json).

Per (method, alpha): best and mean accuracy over rounds (mean ± sd over seeds), the mean of the
last 5 rounds (the budget check: a flattened curve has it within 2 points of the best), and the
paired difference to a baseline method (same seed) with its 95 % t-interval. `publish` copies a
generated table into a marked block of a document (docs/results.md), so no number is typed by hand.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.stats import fmt_interval, fmt_mean_sd, mean_sd, paired_differences, t_interval
from feddifrc_core.checkpoint import atomic_write_bytes, atomic_write_text

LAST = 5  # rounds averaged by the "last 5" column
Record = Mapping[str, Any]


def label_of(record: Record) -> str:
    return f"{record['method']}+{record['tag']}" if record.get("tag") else str(record["method"])


def group(records: Sequence[Record]) -> dict[tuple[str, float], dict[int, Record]]:
    """(label, alpha) -> seed -> record."""
    groups: dict[tuple[str, float], dict[int, Record]] = {}
    for r in records:
        groups.setdefault((label_of(r), float(r["alpha"])), {})[int(r["seed"])] = r
    return groups


def last_mean(record: Record, n: int = LAST) -> float:
    accs = record["accuracy"][-n:]
    return float(sum(accs) / len(accs))


def _percent(runs: Mapping[int, Record], key: str) -> dict[int, float]:
    if key == "last":
        return {s: 100 * last_mean(r) for s, r in runs.items()}
    return {s: 100 * float(r[key]) for s, r in runs.items()}


def versus(runs: Mapping[int, Record], base: Mapping[int, Record], key: str) -> dict[str, Any]:
    """Paired difference (percentage points) of `key` between two methods' runs by seed."""
    diffs = paired_differences(_percent(runs, key), _percent(base, key))
    values = list(diffs.values())
    return {"seeds": sorted(diffs), "per-seed": values,
            "mean-sd": mean_sd(values) if values else None,
            "ci95": t_interval(values) if len(values) > 1 else None}


def metric_view(record: Record, key: str) -> Record | None:
    """`record` with its accuracy curve replaced by another per-round metric recorded beside it
    (`key` and `initial-<key>`, e.g. the self-supervised runs' kNN accuracy), so that the same
    tables read that metric; None where the record has no such curve."""
    values = record.get(key)
    if not values:
        return None
    return {**record, "accuracy": values, "best": max(values), "mean": sum(values) / len(values),
            "final": values[-1], "initial-accuracy": record.get(f"initial-{key}")}


def initial_runs(records: Sequence[Record], method: str, label: str) -> list[Record]:
    """Round 0 of `method`'s runs (the seeded initial encoder, the same for every method of a
    seed) as runs of their own named `label`, so that tables can pair a method with its start."""
    return [{**r, "method": label, "tag": "", "accuracy": [r["initial-accuracy"]],
             "best": r["initial-accuracy"], "mean": r["initial-accuracy"],
             "final": r["initial-accuracy"]}
            for r in records
            if r["method"] == method and not r.get("tag") and r.get("initial-accuracy") is not None]


def summarize(records: Sequence[Record], baseline: str) -> list[dict[str, Any]]:
    """One row per (label, alpha), with paired differences to `baseline` at the same alpha."""
    groups = group(records)
    rows = []
    for (label, alpha), runs in groups.items():
        base = groups.get((baseline, alpha), {})
        row: dict[str, Any] = {"label": label, "alpha": alpha, "seeds": sorted(runs)}
        for key in ("best", "mean", "last"):
            row[key] = mean_sd(list(_percent(runs, key).values()))
            if label != baseline and base:
                row[f"{key}-vs-{baseline}"] = versus(runs, base, key)
        rows.append(row)
    return rows


def table_markdown(records: Sequence[Record], baseline: str, order: Sequence[str],
                   metric: str = "test accuracy", initial_row_of: str | None = None) -> str:
    """The benchmark's table. `initial_row_of`: add round 0 of that method's runs as a row
    (the self-supervised table's randomly initialised encoder)."""
    rows = sorted(summarize(records, baseline), key=lambda r: (r["alpha"], _rank(r["label"], order)))
    lines = [
        f"Global-model {metric} (%): best and mean over rounds and mean of the last {LAST} rounds, "
        f"mean ± sd over seeds; Δ = paired difference to {baseline} (same seed, percentage points), "
        "mean ± sd and 95 % t-interval.",
        "",
        f"| method | α | best | mean | last {LAST} | Δ best | Δ best 95 % CI | Δ mean | "
        "Δ mean 95 % CI | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    alphas = sorted({r["alpha"] for r in rows})
    for alpha in alphas:
        if initial_row_of is not None:
            init = [100 * float(r["best"]) for r in initial_runs(records, initial_row_of, "")
                    if float(r["alpha"]) == alpha]
            if init:
                cell = fmt_mean_sd(mean_sd(init))
                lines.append(f"| random-init (round 0) | {alpha:g} | {cell} | {cell} | {cell} "
                             "| - | - | - | - | same |")
        for r in (r for r in rows if r["alpha"] == alpha):
            vs_best, vs_mean = r.get(f"best-vs-{baseline}"), r.get(f"mean-vs-{baseline}")
            cells = [fmt_mean_sd(r["best"]), fmt_mean_sd(r["mean"]), fmt_mean_sd(r["last"]),
                     fmt_mean_sd(vs_best["mean-sd"], signed=True) if vs_best else "-",
                     fmt_interval(vs_best["ci95"]) if vs_best else "-",
                     fmt_mean_sd(vs_mean["mean-sd"], signed=True) if vs_mean else "-",
                     fmt_interval(vs_mean["ci95"]) if vs_mean else "-",
                     ",".join(map(str, r["seeds"]))]
            lines.append(f"| {r['label']} | {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versus_markdown(records: Sequence[Record], method: str, baselines: Sequence[str],
                    metric: str = "") -> str:
    """`method` against each baseline (paired by seed), per alpha: the target's comparison."""
    groups = group(records)
    what = f", {metric}" if metric else ""
    lines = [f"{method} minus each baseline{what} (same seed; percentage points, mean ± sd and "
             "95 % t-interval).", "",
             "| α | baseline | Δ best | Δ best 95 % CI | Δ mean | Δ mean 95 % CI | seeds |",
             "|---|---|---|---|---|---|---|"]
    for alpha in sorted({a for _, a in groups}):
        runs = groups.get((method, alpha))
        for baseline in baselines:
            base = groups.get((baseline, alpha))
            if not runs or not base:
                continue
            best, mean = versus(runs, base, "best"), versus(runs, base, "mean")
            if not best["seeds"]:
                continue
            lines.append(f"| {alpha:g} | {baseline} | {fmt_mean_sd(best['mean-sd'], True)} | "
                         f"{fmt_interval(best['ci95'])} | {fmt_mean_sd(mean['mean-sd'], True)} | "
                         f"{fmt_interval(mean['ci95'])} | {','.join(map(str, best['seeds']))} |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""  # no pair recorded yet: no table


LOSS_COLUMNS = (("train-accuracy", "local train accuracy (%)"), ("train-ce", "CE"),
                ("train-tdcl", "TDCL"), ("train-ndcr", "NDCR"), ("train-prox", "prox"),
                ("train-moon", "MOON"))


def losses_markdown(records: Sequence[Record]) -> str:
    """The last round's client-side numbers per method (mean over seeds): how close alignment got
    (TDCL chance = ln(1 + negatives), NDCR "l2" = 2 - 2 cos) and, against the global model's final
    test accuracy, how far the local models drift from it (local train accuracy)."""
    groups = group(records)
    present = [(k, name) for k, name in LOSS_COLUMNS
               if any(k in r.get("last-round", {}) for r in records)]
    if not present:
        return ""
    lines = ["Last round, client side (mean over seeds): " + ", ".join(n for _, n in present)
             + "; and the global model's final test accuracy (%).", "",
             "| method | α | " + " | ".join(n for _, n in present) + " | final test accuracy |",
             "|---|---" + "|---" * len(present) + "|---|"]
    for (label, alpha), runs in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        cells = []
        for key, _ in present:
            values = [float(r["last-round"][key]) for r in runs.values()
                      if isinstance(r.get("last-round", {}).get(key), (int, float))]
            scale = 100 if key == "train-accuracy" else 1
            cells.append(f"{scale * sum(values) / len(values):.2f}" if values else "-")
        final = [100 * float(r["final"]) for r in runs.values() if r.get("final") is not None]
        cells.append(f"{sum(final) / len(final):.2f}" if final else "-")
        lines.append(f"| {label} | {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(records: Sequence[Record], path: Path, order: Sequence[str],
                  ylabel: str = "global test accuracy (%)") -> None:
    """Accuracy per round, one panel per alpha: mean over seeds, band = ± 1 sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group(records)
    alphas = sorted({a for _, a in groups})
    fig, axes = plt.subplots(1, max(1, len(alphas)), figsize=(6.5 * max(1, len(alphas)), 4.4),
                             squeeze=False)
    palette = plt.get_cmap("tab10").colors
    labels = sorted({label for label, _ in groups}, key=lambda lab: _rank(lab, order))
    colour = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    for ax, alpha in zip(axes[0], alphas, strict=False):
        for label in labels:
            runs = list(groups.get((label, alpha), {}).values())
            if not runs:
                continue
            length = min(len(r["accuracy"]) for r in runs)
            acc = 100 * np.array([r["accuracy"][:length] for r in runs])  # [seeds, rounds]
            x, mean = runs[0]["rounds"][:length], acc.mean(axis=0)
            ax.plot(x, mean, color=colour[label], linestyle="--" if "+" in label else "-",
                    label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                sd = acc.std(axis=0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=colour[label], alpha=0.15, lw=0)
        ax.set_title(f"Fashion-MNIST private, Dirichlet α={alpha:g} (band: ± 1 sd over seeds)")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def publish(document: Path, name: str, text: str) -> None:
    """Replace the block between `<!-- BEGIN name -->` and `<!-- END name -->` in `document`."""
    content = document.read_text()
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)",
                         re.DOTALL)
    if not pattern.search(content):
        raise ValueError(f"{document} has no block '<!-- BEGIN {name} -->' ... "
                         f"'<!-- END {name} -->'; add the two marker lines where the table goes")
    updated = pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content)
    atomic_write_text(document, updated)


def _rank(label: str, order: Sequence[str]) -> tuple[int, str]:
    base = label.split("+")[0]
    return (order.index(base) if base in order else len(order), label)
