"""The demo: two methods on one partition, seed and budget, compared in a table and one plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from feddifrc_core.comparison import MethodRun, comparison_table, multi_seed_result, plot_comparison

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, label: str, test: list[float], val: list[float]) -> MethodRun:
    rows = [{"round": r, "test-accuracy": t, "val-accuracy": v}
            for r, (t, v) in enumerate(zip(test, val, strict=True))]
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from feddifrc_core.reporting import summarize

    (folder / "summary.json").write_text(json.dumps(summarize(rows, 1.0)))
    return MethodRun.read(label, folder)


def test_table_plot_and_the_multi_seed_line(tmp_path: Path) -> None:
    base = _fake_run(tmp_path / "a", "fedavg", [0.1, 0.5, 0.6, 0.55], [0.1, 0.52, 0.58, 0.6])
    ours = _fake_run(tmp_path / "b", "feddifrc", [0.1, 0.6, 0.7, 0.65], [0.1, 0.65, 0.6, 0.62])
    table = comparison_table([base, ours], baseline="fedavg")
    # validation chose round 3 for fedavg (55 % on test), round 1 for feddifrc (60 %)
    assert "| fedavg | 55.00 % (round 3) | 55.00 % | 55.00 % |" in table
    assert "| feddifrc | 60.00 % (round 1) | 65.00 % | 65.00 % |" in table
    assert "| feddifrc - fedavg | +5.00 points | +10.00 points | +10.00 points |" in table
    plot_comparison([base, ours], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    def summary(name: str, seeds: list[int], mean: float) -> Path:
        path = tmp_path / name / "summary.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"table": [
            {"label": "feddifrc", "alpha": 0.1, "last-vs-fedavg": {
                "seeds": seeds, "mean-sd": [mean, 1.0], "ci95": [mean - 2.4, mean + 2.4]}}]}))
        return path

    complete = summary("complete", [7, 8, 9], 2.5)
    line = multi_seed_result([complete], "feddifrc", "fedavg", 0.1)
    assert line == ("feddifrc - fedavg over 3 seeds (seeds 7-9), alpha 0.1, mean of the last 5 "
                    "rounds: +2.50 points, 95 % interval [+0.10, +4.90]")
    assert multi_seed_result([complete], "feddifrc", "fedavg", 0.5) is None
    assert multi_seed_result([tmp_path / "missing.json"], "feddifrc", "fedavg", 0.1) is None
    # a newer suite in progress (fewer seeds) does not replace the complete one; once it holds
    # at least as many seeds, it does
    partial = summary("partial", [7, 8], -1.0)
    assert multi_seed_result([partial, complete], "feddifrc", "fedavg", 0.1) == line
    grown = summary("grown", [7, 8, 10], -1.0)
    assert "over 3 seeds (seeds 7, 8, 10)" in multi_seed_result([grown, complete], "feddifrc",
                                                              "fedavg", 0.1)


def test_the_demo_refuses_settings_it_owns() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "-c", "algorithm='moon'"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "choose the methods with --methods" in done.stderr


@pytest.mark.slow
def test_demo_runs_both_methods_and_writes_the_comparison(tmp_path: Path) -> None:
    env = {**os.environ, "FEDDIFRC_RUNS_DIR": str(tmp_path / "runs"),
           "FEDDIFRC_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py"), "--supernodes", "2", "-c",
         "dataset='digits' model='small-cnn' model-width=8 diffusion-model='tiny-sd' num-rounds=2 "
         "train-samples=120 test-samples=60 validation-samples=60 data-subset='all' "
         "partition='iid' neg-num=3"],
        capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = next((tmp_path / "runs").glob("demo-*[0-9]"))  # the comparison folder
    assert {p.name for p in out.iterdir()} == {"comparison.png", "comparison.md", "comparison.json"}
    record = json.loads((out / "comparison.json").read_text())
    assert record["methods"] == ["fedavg", "feddifrc"]
    for method in ("fedavg", "feddifrc"):  # every run keeps its own folder, metrics and plot
        folder = Path(record["runs"][method])
        assert (folder / "metrics.png").is_file() and (folder / "summary.json").is_file()
    assert "| feddifrc - fedavg |" in done.stdout and "One seed is not proof" in done.stdout
