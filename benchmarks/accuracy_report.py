"""Tables and plots of the accuracy benchmark, written from its recorded runs (results.json).

Per (method, alpha), mean ± sd over seeds of:
- last 5: the mean test accuracy of the last 5 rounds, THE PRIMARY METRIC (fixed before the
  ten-seed runs, docs/results.md "Primary metric"): no round is chosen, by any set;
- at val. round: the test accuracy at the round with the best validation accuracy (ties: the
  earliest), the model selection a reviewer accepts; "n/a" for records without a validation set;
- mean over rounds, and best: the maximum over rounds of the test accuracy, i.e. chosen on the
  test set (optimistic; the paper's metric, kept for comparison and for the head rule);
and the paired difference to a baseline method (same seed) with its 95 % t-interval. `publish`
copies a generated table into a marked block of a document (docs/results.md), so no number is
typed by hand.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.stats import fmt_interval, fmt_mean_sd, mean_sd, paired_differences, t_interval
from feddifrc_core.checkpoint import atomic_write_bytes, atomic_write_text
from feddifrc_core.reporting import LAST_ROUNDS, validation_choice

LAST = LAST_ROUNDS  # rounds averaged by the "last 5" column
PRIMARY = "last"  # the primary metric's key: the mean of the last 5 rounds
METRICS = {"last": f"last {LAST}", "at-val": "at val. round", "mean": "mean",
           "best": "best (on test)", "final": "final"}
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


def at_validation_round(record: Record) -> float | None:
    """Test accuracy at the round validation chose; None for records without validation."""
    val = record.get("val-accuracy")
    if not val:
        return None
    choice = validation_choice(record["rounds"], val, record["accuracy"])
    return None if choice is None else choice[2]


def metric(record: Record, key: str) -> float | None:
    """One run's value of a table metric (fraction), None where the record cannot give it."""
    if key == "last":
        return last_mean(record)
    if key == "at-val":
        return at_validation_round(record)
    value = record.get(key)
    return None if value is None else float(value)


def _percent(runs: Mapping[int, Record], key: str) -> dict[int, float]:
    values = {s: metric(r, key) for s, r in runs.items()}
    return {s: 100 * v for s, v in values.items() if v is not None}


def versus(runs: Mapping[int, Record], base: Mapping[int, Record], key: str) -> dict[str, Any]:
    """Paired difference (percentage points) of `key` between two methods' runs by seed."""
    diffs = paired_differences(_percent(runs, key), _percent(base, key))
    values = list(diffs.values())
    return {"seeds": sorted(diffs), "per-seed": values,
            "mean-sd": mean_sd(values) if values else None,
            "ci95": t_interval(values) if len(values) > 1 else None}


def metric_view(record: Record, key: str) -> Record | None:
    """`record` with its accuracy curve replaced by another per-round metric recorded beside it
    (`key`, `val-<key>` and `initial-<key>`, e.g. the self-supervised runs' kNN accuracy), so that
    the same tables read that metric; None where the record has no such curve."""
    values = record.get(key)
    if not values:
        return None
    return {**record, "accuracy": values, "best": max(values), "mean": sum(values) / len(values),
            "final": values[-1], "initial-accuracy": record.get(f"initial-{key}"),
            "val-accuracy": record.get(f"val-{key}"),
            "initial-val-accuracy": record.get(f"initial-val-{key}")}


def initial_runs(records: Sequence[Record], method: str, label: str) -> list[Record]:
    """Round 0 of `method`'s runs (the seeded initial encoder, the same for every method of a
    seed) as runs of their own named `label`, so that tables can pair a method with its start."""
    return [{**r, "method": label, "tag": "", "rounds": [0], "accuracy": [r["initial-accuracy"]],
             "val-accuracy": ([r["initial-val-accuracy"]]
                              if r.get("initial-val-accuracy") is not None else None),
             "best": r["initial-accuracy"], "mean": r["initial-accuracy"],
             "final": r["initial-accuracy"]}
            for r in records
            if r["method"] == method and not r.get("tag") and r.get("initial-accuracy") is not None]


def summarize(records: Sequence[Record], baseline: str) -> list[dict[str, Any]]:
    """One row per (label, alpha), with paired differences to `baseline` at the same alpha;
    a metric no run of the row can give (at-val without validation) is None."""
    groups = group(records)
    rows = []
    for (label, alpha), runs in groups.items():
        base = groups.get((baseline, alpha), {})
        row: dict[str, Any] = {"label": label, "alpha": alpha, "seeds": sorted(runs)}
        for key in METRICS:
            values = list(_percent(runs, key).values())
            row[key] = mean_sd(values) if values else None
            if label != baseline and base:
                row[f"{key}-vs-{baseline}"] = versus(runs, base, key)
        rows.append(row)
    return rows


def _cell(pair: tuple[float, float] | None, signed: bool = False) -> str:
    return "n/a" if pair is None else fmt_mean_sd(pair, signed)


def _delta(vs: Mapping[str, Any] | None) -> tuple[str, str]:
    """(Δ mean ± sd, 95 % CI) cells: '-' for the baseline itself, n/a where nothing pairs."""
    if vs is None:
        return "-", "-"
    if vs["mean-sd"] is None:
        return "n/a", "n/a"
    return fmt_mean_sd(vs["mean-sd"], signed=True), fmt_interval(vs["ci95"])


def table_markdown(records: Sequence[Record], baseline: str, order: Sequence[str],
                   metric: str = "test accuracy", initial_row_of: str | None = None) -> str:
    """The benchmark's table. `initial_row_of`: add round 0 of that method's runs as a row
    (the self-supervised table's randomly initialised encoder)."""
    rows = sorted(summarize(records, baseline), key=lambda r: (r["alpha"], _rank(r["label"], order)))
    lines = [
        f"Global-model {metric} (%), mean ± sd over seeds: **last {LAST}** = mean of the last "
        f"{LAST} rounds (the primary metric, fixed before the ten-seed runs: docs/results.md); at "
        "val. round = at the round "
        "whose validation accuracy is highest (ties: the earliest; n/a: the runs had no "
        "validation set); mean over rounds; best (on test) = the maximum over rounds, chosen on "
        f"the test set (optimistic). Δ = paired difference to {baseline} (same seed, percentage "
        "points), mean ± sd and 95 % t-interval.",
        "",
        f"| method | α | last {LAST} | at val. round | mean | best (on test) | Δ last {LAST} | "
        f"Δ last {LAST} 95 % CI | Δ at val. round | Δ at val. 95 % CI | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    alphas = sorted({r["alpha"] for r in rows})
    for alpha in alphas:
        if initial_row_of is not None:
            init = [100 * float(r["best"]) for r in initial_runs(records, initial_row_of, "")
                    if float(r["alpha"]) == alpha]
            if init:
                cell = fmt_mean_sd(mean_sd(init))
                lines.append(f"| random-init (round 0) | {alpha:g} | {cell} | {cell} | {cell} "
                             f"| {cell} | - | - | - | - | same |")
        for r in (r for r in rows if r["alpha"] == alpha):
            cells = [_cell(r[k]) for k in ("last", "at-val", "mean", "best")]
            for key in ("last", "at-val"):
                cells += _delta(r.get(f"{key}-vs-{baseline}"))
            cells.append(",".join(map(str, r["seeds"])))
            lines.append(f"| {r['label']} | {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versus_markdown(records: Sequence[Record], method: str, baselines: Sequence[str],
                    metric: str = "") -> str:
    """`method` against each baseline (paired by seed), per alpha: the target's comparison."""
    groups = group(records)
    what = f", {metric}" if metric else ""
    lines = [f"{method} minus each baseline{what} (same seed; percentage points, mean ± sd and "
             f"95 % t-interval; last {LAST} is the primary metric).", "",
             f"| α | baseline | Δ last {LAST} | Δ last {LAST} 95 % CI | Δ at val. round | "
             "Δ at val. 95 % CI | Δ mean | Δ mean 95 % CI | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for alpha in sorted({a for _, a in groups}):
        runs = groups.get((method, alpha))
        for baseline in baselines:
            base = groups.get((baseline, alpha))
            if not runs or not base:
                continue
            primary = versus(runs, base, PRIMARY)
            if not primary["seeds"]:
                continue
            cells = [c for key in (PRIMARY, "at-val", "mean") for c in _delta(versus(runs, base, key))]
            lines.append(f"| {alpha:g} | {baseline} | " + " | ".join(cells)
                         + f" | {','.join(map(str, primary['seeds']))} |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""  # no pair recorded yet: no table


def controls_markdown(records: Sequence[Record], arms: Sequence[str],
                      controls: Sequence[str]) -> str:
    """Does a FedDifRC arm add accuracy over the controls that see the teacher's public data?

    The pre-registered reading (docs/results.md, "Controls"): an arm adds accuracy over the best
    control at an alpha when its paired primary-metric difference to EVERY control has a 95 %
    interval above 0 (then it is above the best one, whichever that is); below 0 for any
    control: it does not; otherwise not resolved. The first arm is the one the question is
    about (marked "primary"); the others are reported beside it. Needs two seeds per pair.
    """
    groups = group(records)
    lines = [f"FedDifRC against the controls that get the teacher's public data (primary metric: "
             f"last {LAST}; same seed; percentage points, mean ± sd and 95 % t-interval).", "",
             "| α | arm | " + " | ".join(f"Δ vs {c}" for c in controls)
             + " | above every control? | seeds |",
             "|---|---|" + "---|" * len(controls) + "---|---|"]
    for alpha in sorted({a for _, a in groups}):
        for arm in arms:
            runs = groups.get((arm, alpha))
            if not runs or any((c, alpha) not in groups for c in controls):
                continue
            diffs = [versus(runs, groups[(c, alpha)], PRIMARY) for c in controls]
            if any(len(d["seeds"]) < 2 for d in diffs):
                continue
            cells = [f"{fmt_mean_sd(d['mean-sd'], True)} {fmt_interval(d['ci95'])}" for d in diffs]
            verdict = ("yes" if all(d["ci95"][0] > 0 for d in diffs) else
                       "no" if any(d["ci95"][1] < 0 for d in diffs) else
                       "not resolved (an interval includes 0)")
            seeds = sorted(set.intersection(*(set(d["seeds"]) for d in diffs)))
            name = f"{arm} (primary)" if arm == arms[0] else arm
            lines.append(f"| {alpha:g} | {name} | " + " | ".join(cells)
                         + f" | {verdict} | {','.join(map(str, seeds))} |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


HEAD_RULE_SEEDS = (12, 13, 14, 15, 16)


def head_rule_markdown(records: Sequence[Record], alpha: float = 0.1) -> str:
    """The confirmation rule for the alignment head, applied EXACTLY as it was written before the
    runs (docs/results.md, "Confirmation of the alignment head"): `align-head` becomes "none" if,
    on seeds 12-16, feddifrc+no-head's paired best-accuracy gain over FedAvg has its 95 %
    interval above 0 and its mean is not below the linear head's (feddifrc's); otherwise the
    linear head stays. "Best accuracy" is the rule's own metric (the maximum over rounds of the
    test accuracy); the same test on the primary metric is printed beside it, not as the rule."""
    groups = group(records)
    arms = {label: {s: r for s, r in groups.get((label, alpha), {}).items()
                    if s in HEAD_RULE_SEEDS} for label in ("fedavg", "feddifrc", "feddifrc+no-head")}
    have = {label: len(runs) for label, runs in arms.items()}
    if not any(have.values()):
        return ""
    head = (f"Head-confirmation rule (seeds {HEAD_RULE_SEEDS[0]}-{HEAD_RULE_SEEDS[-1]}, "
            f"α {alpha:g}), applied as written before the runs.")
    if any(n < len(HEAD_RULE_SEEDS) for n in have.values()):
        counts = ", ".join(f"{label} {n}/{len(HEAD_RULE_SEEDS)}" for label, n in have.items())
        return f"{head} Pending: runs recorded {counts}; the default stays until all are in.\n"
    lines = [head, ""]
    for key, what in (("best", "the rule (best accuracy)"),
                      (PRIMARY, f"for information only, not the rule: last {LAST}")):
        none = versus(arms["feddifrc+no-head"], arms["fedavg"], key)
        linear = versus(arms["feddifrc"], arms["fedavg"], key)
        passes = none["ci95"][0] > 0 and none["mean-sd"][0] >= linear["mean-sd"][0]
        outcome = ('align-head becomes "none"' if passes else 'the linear head stays')
        lines.append(
            f"- {what}: no-head − FedAvg {fmt_mean_sd(none['mean-sd'], True)} "
            f"{fmt_interval(none['ci95'])}, linear head − FedAvg "
            f"{fmt_mean_sd(linear['mean-sd'], True)} {fmt_interval(linear['ci95'])}: "
            f"**{outcome}**.")
    return "\n".join(lines) + "\n"


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
