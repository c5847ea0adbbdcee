"""The benchmark harnesses: run plans, resumable results, reports, round cost on a micro budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import (
    accuracy,
    accuracy_launch,
    accuracy_plan,
    accuracy_report,
    accuracy_store,
    round_cost,
)

ROOT = Path(__file__).resolve().parents[1]


def _fake_run_folder(folder: Path, accs: list[float], knn: list[float] | None = None,
                     val: list[float] | None = None) -> None:
    """What the ServerApp leaves behind (metrics.jsonl + summary.json), for a finished run;
    `knn`: a self-supervised run's kNN accuracy at rounds 0..n beside the probe's; `val`: the
    validation accuracy at rounds 1..n (None: a run without a validation set)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"round": 0, "test-accuracy": 0.1}]
    rows += [{"round": i + 1, "test-accuracy": a, "train-seconds": 1.0, "round-seconds": 2.0}
             for i, a in enumerate(accs)]
    if knn is not None:
        for row, value in zip(rows, knn, strict=True):
            row["test-knn-accuracy"] = value
    if val is not None:
        for row, value in zip(rows[1:], val, strict=True):
            row["val-accuracy"] = value
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"wall-seconds": 3.0}))


def test_plan_shares_budget_and_keeps_diffusion_keys_out_of_baselines():
    specs = accuracy_plan.plan_runs(["fedavg", "feddifrc", "feddifrc-ndcr"], [0.1, 0.5], [7],
                               accuracy_plan.CPU_BUDGET, {"tau": 0.1, "diffusion-model": "tiny-sd"})
    assert [s.key for s in specs][:3] == ["fedavg/alpha=0.1/seed=7", "feddifrc/alpha=0.1/seed=7",
                                          "feddifrc-ndcr/alpha=0.1/seed=7"]
    avg, dif, ndcr = specs[:3]
    # the same federation, data and optimiser for every method
    shared = set(accuracy_plan.CPU_BUDGET) | {"seed", "dirichlet-alpha"}
    assert all(avg.overrides[k] == dif.overrides[k] == ndcr.overrides[k] for k in shared)
    # diffusion knobs only where they are read: a new teacher setting never reruns a baseline
    assert "tau" not in avg.overrides and "diffusion-model" not in avg.overrides
    assert dif.overrides["tau"] == 0.1 and dif.overrides["diffusion-model"] == "tiny-sd"
    # a method's own settings are pinned in its record; an ablation's value wins
    assert ndcr.overrides["lambda-tdcl"] == 0.0 and dif.overrides["lambda-tdcl"] == 1.0
    assert "lambda-tdcl" not in avg.overrides
    # the hash ignores where files go and sees everything that can change a number: on a CPU
    # the thread count changes the order of float sums, so it is part of the hash
    moved = accuracy_plan.RunSpec(avg.method, avg.alpha, avg.seed, {**avg.overrides, "output-dir": "x"})
    threads = accuracy_plan.RunSpec(avg.method, avg.alpha, avg.seed, {**avg.overrides, "torch-threads": 1})
    changed = accuracy_plan.RunSpec(avg.method, avg.alpha, avg.seed, {**avg.overrides, "lr": 0.02})
    assert moved.config_hash == avg.config_hash
    assert len({avg.config_hash, threads.config_hash, changed.config_hash}) == 3
    with pytest.raises(ValueError, match="unknown"):
        accuracy_plan.plan_runs(["fedsomething"], [0.1], [7], accuracy_plan.CPU_BUDGET, {})


def test_set_overrides_are_typed_and_checked():
    assert accuracy.parse_set(["tau=0.1", "align-head=linear", "augment=false", "neg-num=5"]) == {
        "tau": 0.1, "align-head": "linear", "augment": False, "neg-num": 5}
    with pytest.raises(ValueError, match="unknown key 'not-a-key'"):
        accuracy.parse_set(["not-a-key=1"])
    with pytest.raises(ValueError, match="expects int"):
        accuracy.parse_set(["neg-num=many"])


def test_harness_records_runs_skips_them_on_rerun_and_writes_reports(tmp_path, monkeypatch):
    launched: list[str] = []
    curves = {"fedavg": [0.3, 0.5, 0.4], "feddifrc": [0.4, 0.6, 0.7]}

    def fake_launch(spec, out, args):
        launched.append(spec.key)
        folder = out / "runs" / spec.run_name
        _fake_run_folder(folder, curves[spec.method])
        if spec.method == "fedavg":  # what launch's LoadSampler leaves
            (folder / accuracy_store.LOAD_FILE).write_text(json.dumps({"cpus": 2, "load1-mean": 1.5}))
        return folder

    monkeypatch.setattr(accuracy, "launch", fake_launch)
    argv = ["--out", str(tmp_path), "--methods", "fedavg,feddifrc", "--alphas", "0.1",
            "--set", "diffusion-model=tiny-sd"]
    assert accuracy.main(argv) == 0
    assert launched == ["fedavg/alpha=0.1/seed=7", "feddifrc/alpha=0.1/seed=7"]
    assert accuracy.main(argv) == 0  # resumed: everything is recorded, nothing runs again
    assert len(launched) == 2
    (tmp_path / "results.json").unlink()  # finished run folders are read back, not rerun
    assert accuracy.main(argv) == 0
    assert len(launched) == 2

    table = (tmp_path / "table.md").read_text()
    # last 5 = all 3 rounds, no validation set (n/a), mean of (0.3, 0.5, 0.4), best 0.5 on test;
    # one seed: no interval
    assert ("| fedavg | 0.1 | 40.00 ± 0.00 | n/a | 40.00 ± 0.00 | 50.00 ± 0.00 | - | - | - | - "
            "| 7 |") in table
    assert ("| feddifrc | 0.1 | 56.67 ± 0.00 | n/a | 56.67 ± 0.00 | 70.00 ± 0.00 | +16.67 ± 0.00 "
            "| - | n/a | n/a | 7 |") in table
    assert "| 0.1 | fedavg | +16.67 ± 0.00 | - | n/a | n/a | +16.67 ± 0.00 | - | 7 |" in table
    assert "1.50 to 1.50 over 1 runs on 2 cores" in table  # feddifrc's run has no load sample
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    record = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert record["accuracy"] == [0.3, 0.5, 0.4] and record["initial-accuracy"] == 0.1

    # the same key with another configuration is refused, not silently mixed into the table
    with pytest.raises(ValueError, match="another configuration"):
        accuracy.main([*argv, "--rounds", "3"])


def test_ssl_table_has_the_random_init_row(tmp_path):
    store = accuracy_store.ResultsStore(tmp_path / "results.json")
    runs = (("feddifrc-ssl", [0.6, 0.7], [0.3, 0.5, 0.4]), ("simclr", [0.5, 0.55], [0.3, 0.2, 0.1]))
    for method, accs, knn in runs:
        spec = accuracy_plan.plan_runs([method], [0.1], [7], accuracy_plan.CPU_BUDGET, {})[0]
        _fake_run_folder(tmp_path / spec.run_name, accs, knn)
        store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    accuracy.write_reports(store, tmp_path, "cmd")
    table = (tmp_path / "ssl_table.md").read_text()
    lines = table.splitlines()
    assert "linear-probe accuracy" in lines[0] and "paired difference to simclr" in lines[0]
    assert lines[4].startswith("| random-init (round 0) | 0.1 | 10.00 ± 0.00 |")
    assert ("| feddifrc-ssl | 0.1 | 65.00 ± 0.00 | n/a | 65.00 ± 0.00 | 70.00 ± 0.00 "
            "| +12.50 ± 0.00 |") in table
    assert "| simclr | 0.1 | 52.50 ± 0.00 | n/a | 52.50 ± 0.00 | 55.00 ± 0.00 |" in table
    # the same encoders by kNN: round 0 is the random init's row, rounds 1.. the curve
    knn_table = table[table.index("Global-model kNN accuracy"):]
    assert "| random-init (round 0) | 0.1 | 30.00 ± 0.00 |" in knn_table
    assert ("| feddifrc-ssl | 0.1 | 45.00 ± 0.00 | n/a | 45.00 ± 0.00 | 50.00 ± 0.00 "
            "| +30.00 ± 0.00 |") in knn_table
    # paired with the common start (round 0) as well as with SimCLR, by either metric
    assert "| 0.1 | random-init | +55.00 ± 0.00 | - |" in table  # probe: last 5 65 - 10
    assert "| 0.1 | random-init | +15.00 ± 0.00 | - |" in table  # kNN: 45 - 30
    assert "feddifrc-ssl minus each baseline, kNN accuracy" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["label"]: r["best"][0] for r in summary["ssl_table_knn"]} == {"feddifrc-ssl": 50.0,
                                                                           "simclr": 20.0}
    assert (tmp_path / "ssl_accuracy.png").is_file() and not (tmp_path / "table.md").exists()
    assert (tmp_path / "ssl_knn_accuracy.png").is_file()


def test_each_table_names_the_suite_that_makes_its_runs(tmp_path):
    store = accuracy_store.ResultsStore(tmp_path / "results.json")
    for method in ("fedavg", "feddifrc-ssl"):
        spec = accuracy_plan.plan_runs([method], [0.1], [7], accuracy_plan.CPU_BUDGET, {})[0]
        _fake_run_folder(tmp_path / spec.run_name, [0.5])
        store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    run = "nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ssl-three-seed --publish d.md"
    accuracy.write_reports(store, tmp_path, run)
    assert f"Command: `{run}`" in (tmp_path / "ssl_table.md").read_text()
    # fedavg seed 7 is made by the main suite (ten-seed), which comes first among those that plan it
    assert ("Command: `nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ten-seed "
            "--publish d.md`") in (tmp_path / "table.md").read_text()
    plain = "nice -n 5 .venv/bin/python benchmarks/accuracy.py --seeds 7"  # no suite: kept as is
    assert accuracy_plan.command_for({"fedavg/alpha=0.1/seed=7"}, plain) == plain


def test_report_pairs_seeds_gives_t_intervals_and_publishes_into_a_document(tmp_path):

    store = accuracy_store.ResultsStore(tmp_path / "results.json")
    curves = {("fedavg", 7): [0.3, 0.5], ("fedavg", 8): [0.4, 0.6], ("fedavg", 9): [0.45, 0.55],
              ("feddifrc", 7): [0.4, 0.6], ("feddifrc", 8): [0.5, 0.7],  # seed 9 not run yet
              ("moon", 7): [0.2, 0.3]}
    for (method, seed), accs in curves.items():
        spec = accuracy_plan.plan_runs([method], [0.1], [seed], accuracy_plan.CPU_BUDGET, {})[0]
        _fake_run_folder(tmp_path / spec.run_name, accs)
        store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    rows = {r["label"]: r for r in accuracy_report.summarize(list(store.records.values()), "fedavg")}
    vs = rows["feddifrc"]["best-vs-fedavg"]
    assert vs["seeds"] == [7, 8] and vs["per-seed"] == pytest.approx([10.0, 10.0])
    assert vs["ci95"] == pytest.approx((10.0, 10.0))  # identical differences: zero width
    assert rows["fedavg"]["best"] == pytest.approx((55.0, 5.0))  # 50, 60, 55
    assert "best-vs-fedavg" not in rows["fedavg"]
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- BEGIN accuracy:x -->\nold\n<!-- END accuracy:x -->\nafter\n")
    accuracy_report.publish(doc, "accuracy:x", "| new table |\n")
    assert doc.read_text() == ("intro\n<!-- BEGIN accuracy:x -->\n| new table |\n"
                               "<!-- END accuracy:x -->\nafter\n")
    with pytest.raises(ValueError, match="BEGIN accuracy:y"):
        accuracy_report.publish(doc, "accuracy:y", "text")
    text = accuracy_report.versus_markdown(list(store.records.values()), "feddifrc",
                                           ["fedavg", "fedprox", "moon"])
    assert "| 0.1 | fedavg | +10.00 ± 0.00 | [+10.00, +10.00] |" in text
    assert "| 0.1 | moon | +25.00 ± 0.00 | - |" in text and "fedprox" not in text  # last 5
    assert accuracy_report.losses_markdown(list(store.records.values())) == ""  # no losses
    losses = accuracy_report.losses_markdown([{**r, "last-round": {"train-accuracy": 0.9,
                                                                   "train-tdcl": 1.5}}
                                              for r in store.records.values()])
    assert "| feddifrc | 0.1 | 90.00 | 1.50 | 65.00 |" in losses  # final: 0.6 and 0.7
    accuracy_report.plot_accuracy(list(store.records.values()), tmp_path / "a.png",
                                  accuracy_plan.SUPERVISED)
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_round_cost_on_a_micro_budget(fmnist_root, tmp_path):
    result = round_cost.measure("tiny-sd", repeats=1, partition=0, alpha=0.5, seed=7,
                                extra={"train-samples": 200, "local-epochs": 1})
    assert result["client"]["num-examples"] == 20  # 200 private images over 10 clients
    assert result["client"]["prompts-per-image"] == 11  # 10 classes + null ("all" layout)
    row = result["repeats"][0]
    assert row["fedavg-train"] > 0 and row["feddifrc-train"] > 0
    assert row["ratio-train"] == pytest.approx(row["feddifrc-train"] / row["fedavg-train"])
    assert result["extraction-seconds-cold"] > result["extraction-seconds-warm"]
    text = round_cost.markdown(result, "cmd")
    assert "median ratio" in text and "cold" in text


@pytest.mark.slow
def test_accuracy_harness_runs_the_real_flower_app(fmnist_root, tmp_path):
    """One round of FedAvg through the real ServerApp/ClientApp (in-process simulation)."""
    argv = ["--out", str(tmp_path), "--methods", "fedavg", "--alphas", "0.5", "--rounds", "1",
            "--clients", "3", "--set", "min-available-nodes=3", "--set", "min-train-nodes=2",
            "--set", "train-samples=150", "--set", "test-samples=200", "--set", "local-epochs=1"]
    assert accuracy.main(argv) == 0
    record = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert record["rounds"] == [1] and 0.0 <= record["best"] <= 1.0
    assert (Path(record["run-folder"]) / "final_model.safetensors").is_file()


def test_stores_sharing_one_file_keep_each_others_records(tmp_path):
    """Two harness processes on one results folder: neither write drops the other's run."""
    first = accuracy_store.ResultsStore(tmp_path / "results.json")
    second = accuracy_store.ResultsStore(tmp_path / "results.json")  # opened before any record exists
    for store, method in ((first, "fedavg"), (second, "moon")):
        spec = accuracy_plan.plan_runs([method], [0.1], [7], accuracy_plan.CPU_BUDGET, {})[0]
        _fake_run_folder(tmp_path / spec.run_name, [0.5])
        store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    keys = sorted(accuracy_store.ResultsStore(tmp_path / "results.json").records)
    assert keys == ["fedavg/alpha=0.1/seed=7", "moon/alpha=0.1/seed=7"]


def test_target_choice_plans_every_variant_on_one_budget_and_pairs_by_seed():
    from benchmarks import target_choice

    specs = target_choice.plan([7, 8], ["fedavg", "A-linear", "Bc-mlp"])
    assert [s.key for s in specs] == [
        "fedavg/alpha=0.1/seed=7", "feddifrc+A-linear/alpha=0.1/seed=7",
        "feddifrc+Bc-mlp/alpha=0.1/seed=7", "fedavg/alpha=0.1/seed=8",
        "feddifrc+A-linear/alpha=0.1/seed=8", "feddifrc+Bc-mlp/alpha=0.1/seed=8"]
    budget = set(target_choice.BUDGET) - set(accuracy_plan.FREE_KEYS)
    assert all(s.overrides[k] == specs[0].overrides[k] for s in specs for k in budget)
    bc = specs[2].overrides
    assert bc["reduction"] == "spatial-norm-centred" and bc["align-head"] == "mlp"
    # a plain FedDifRC run records the run config's target defaults (part of its hash)
    plain = accuracy_plan.plan_runs(["feddifrc"], [0.1], [7], accuracy_plan.CPU_BUDGET,
                                    {})[0].overrides
    assert {k: plain[k] for k in accuracy_plan.TARGET_KEYS} == accuracy_plan.target_defaults()
    assert "reduction" not in specs[0].overrides  # FedAvg reads no diffusion key

    def record(tag, seed, best, mean, tdcl=None):
        return {"tag": "" if tag == "fedavg" else tag, "seed": seed, "best": best, "mean": mean,
                "last-round": {} if tdcl is None else {"train-tdcl": tdcl, "train-ndcr": 1.0}}

    records = [record("fedavg", 7, 0.50, 0.40), record("fedavg", 8, 0.60, 0.45),
               record("A-linear", 7, 0.55, 0.42, 2.0), record("A-linear", 8, 0.59, 0.50, 1.0)]
    summary = target_choice.summarize(records, ["fedavg", "A-linear", "Bc-mlp"])
    assert list(summary) == ["fedavg", "A-linear"]  # variants without runs are left out
    row = summary["A-linear"]
    assert row["best-vs-fedavg"] == pytest.approx((2.0, 4.2426406871), abs=1e-6)  # +5, -1
    assert row["mean-vs-fedavg"][0] == pytest.approx(3.5) and row["train-tdcl"] == 1.5
    assert summary["fedavg"]["best-vs-fedavg"] is None
    text = target_choice.markdown(summary)
    # 95 % t-interval with 1 dof: 2 +/- 12.706 * 4.243 / sqrt(2)
    assert row["best-vs-fedavg-ci95"] == pytest.approx((2 - 38.1186, 2 + 38.1186), abs=1e-3)
    assert "| A-linear | 57.00 ± 2.83 | 46.00 ± 5.66 | +2.00 ± 4.24 | [-36.12, +40.12] |" in text


def test_five_seed_suite_runs_the_targets_comparison_first(tmp_path, capsys):
    assert accuracy.main(["--suite", "five-seed", "--dry-run", "--out", str(tmp_path)]) == 0
    keys = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert keys[:4] == ["fedavg/alpha=0.1/seed=7", "feddifrc/alpha=0.1/seed=7",
                        "fedavg/alpha=0.1/seed=8", "feddifrc/alpha=0.1/seed=8"]
    assert len(keys) == len(set(keys)) == 5 * (2 + 2 + 4 + 2 + 1)
    assert keys[10:12] == ["fedprox/alpha=0.1/seed=7", "moon/alpha=0.1/seed=7"]
    # then the alpha-0.1 ablations, which must reuse the first comparison's cached features
    assert keys[20:22] == ["feddifrc-tdcl/alpha=0.1/seed=7", "feddifrc-ndcr/alpha=0.1/seed=7"]
    assert keys[30] == "feddifrc+no-head/alpha=0.1/seed=7"
    assert keys[-1] == "feddifrc/alpha=0.5/seed=11"
    by_key = {spec.key: spec for spec in accuracy_plan.suite_specs(
        accuracy_plan.SUITES["five-seed"], [7], accuracy_plan.CPU_BUDGET, {})}
    no_head = by_key["feddifrc+no-head/alpha=0.1/seed=7"]
    assert no_head.overrides["align-head"] == "none" and no_head.overrides["reduction"] == "mean-pool"
    extraction = ("seed", "dirichlet-alpha", "diffusion-model", "diffusion-timestep", "up-blocks",
                  "pool-grid", "reduction", "projection", "train-samples", "diffusion-image-size")
    reference = {k: by_key["feddifrc/alpha=0.1/seed=7"].overrides[k] for k in extraction}
    for key in ("feddifrc-tdcl/alpha=0.1/seed=7", "feddifrc-ndcr/alpha=0.1/seed=7",
                "feddifrc+no-head/alpha=0.1/seed=7"):
        assert {k: by_key[key].overrides[k] for k in extraction} == reference
    with pytest.raises(SystemExit, match="drop --methods"):
        accuracy.main(["--suite", "five-seed", "--methods", "fedavg", "--out", str(tmp_path)])


def test_confirm_head_runs_are_in_the_ten_seed_suite_and_it_only_redraws(tmp_path):
    """The head confirmation (seeds 12-16) is part of ten-seed now, with the same settings; the
    old suite only redraws its records (no validation split) and never plans new runs."""
    confirm = accuracy_plan.suite_specs(accuracy_plan.SUITES["confirm-head"], None, accuracy_plan.CPU_BUDGET, {})
    ten = {s.key: s for s in accuracy_plan.suite_specs(accuracy_plan.SUITES["ten-seed"], None,
                                                   accuracy_plan.CPU_BUDGET, {})}
    assert len(confirm) == 15 and all(s.key in ten for s in confirm)
    assert all(ten[s.key].config_hash == s.config_hash for s in confirm)
    assert not set(accuracy_plan.SUITES["confirm-head"].seeds) & set(accuracy_plan.SUITES["five-seed"].seeds)
    with pytest.raises(SystemExit, match="superseded by --suite ten-seed"):
        accuracy.main(["--suite", "confirm-head", "--out", str(tmp_path)])
    assert accuracy.main(["--suite", "confirm-head", "--out", str(tmp_path), "--report-only"]) == 0


def test_reports_compare_a_tagged_variant_with_its_method(tmp_path):
    store = accuracy_store.ResultsStore(tmp_path / "results.json")
    bests = {7: (0.60, 0.64, 0.63), 8: (0.62, 0.63, 0.66), 9: (0.61, 0.65, 0.64)}
    for seed, (base, default, variant) in bests.items():
        for method, tag, best in (("fedavg", "", base), ("feddifrc", "", default),
                                  ("feddifrc", "no-head", variant)):
            overrides = {"align-head": "none"} if tag else {}
            spec = accuracy_plan.plan_runs([method], [0.1], [seed], accuracy_plan.CPU_BUDGET, overrides, tag)[0]
            _fake_run_folder(tmp_path / spec.run_name, [best - 0.1, best])
            store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    text = accuracy.write_reports(store, tmp_path, "cmd")
    assert "feddifrc+no-head minus each baseline" in text
    # variant minus the method on the same seed: -1, +3, -1
    assert "| 0.1 | feddifrc | +0.33 ± 2.31 |" in text


def test_load_sampler_records_the_load_before_and_during_a_run():
    import time

    with accuracy_launch.LoadSampler(every_s=0.02) as sampler:
        while len(sampler.samples) < 3:  # the one before the run and two during it
            time.sleep(0.01)
    summary = sampler.summary()
    assert summary["cpus"] >= 1 and summary["samples"] >= 2
    assert 0 <= summary["load1-mean"] <= summary["load1-max"]
    assert summary["load1-before"] >= 0 and not sampler._thread.is_alive()


def test_gpu_throughput_script_sweeps_variants_on_one_build(tmp_path_factory, monkeypatch, capsys):
    """The GPU script's CPU smoke mode: one build, a line per (variant, batch), features of
    channels-last equal eager's; bad plans are refused before anything is built."""
    from benchmarks import gpu_sd21

    cache = tmp_path_factory.getbasetemp() / "feddifrc-cache"  # shared by the diffusion tests
    out = tmp_path_factory.mktemp("gpu") / "lines.jsonl"
    argv = ["gpu_sd21.py", "--tiny", "--cache-dir", str(cache), "--iters", "1",
            "--variants", "eager:2,3", "channels-last:2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    gpu_sd21.main()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["model"] == "tiny-sd" and lines[0]["gflops_per_pass"] > 0
    runs = lines[1:]
    assert [(r["variant"], r["batch_images"]) for r in runs] == [
        ("eager", 2), ("eager", 3), ("channels-last", 2)]
    assert all(r["finite"] and r["passes_per_s"] > 0 for r in runs)
    assert runs[0]["max_abs_diff_vs_first_variant"] == 0.0
    assert runs[2]["max_abs_diff_vs_first_variant"] < 1e-4
    for bad, message in ((["--variants", "fast"], "unknown variant"),
                         (["--variants", "eager:0"], "must be >= 1")):
        monkeypatch.setattr(sys, "argv", ["gpu_sd21.py", "--tiny", *bad])
        with pytest.raises(SystemExit):
            gpu_sd21.main()
        assert message in capsys.readouterr().err


def test_cpu_extraction_script_times_variants_against_today_in_one_run(
        tmp_path_factory, monkeypatch, capsys):
    """The CPU script on tiny-sd: a head line with the measured ceiling, one line per variant,
    float32 variants equal today's features, mixed bfloat16 and the per-prompt reference close."""
    from benchmarks import extraction_speed

    cache = tmp_path_factory.getbasetemp() / "feddifrc-cache"  # shared by the diffusion tests
    out = tmp_path_factory.mktemp("extraction") / "lines.jsonl"
    argv = ["extraction_speed.py", "--model", "tiny-sd", "--cache-dir", str(cache), "--images", "4",
            "--rounds", "1", "--threads", "1", "--variants", "today:4", "fp32:2,4", "no-share:4",
            "bf16-mixed:4", "reference", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    extraction_speed.main()
    head, *runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert head["model"] == "tiny-sd" and head["matmul_gflops_per_s"]["float32"] > 0
    assert [(r["variant"], r["batch_images"]) for r in runs] == [
        ("today", 4), ("fp32", 2), ("fp32", 4), ("no-share", 4), ("bf16-mixed", 4),
        ("reference", 1)]
    assert all(r["passes_per_s_best"] > 0 and r["gflops_per_pass"] > 0 for r in runs)
    assert runs[0]["speedup_vs_today"] == 1.0 and runs[0]["max_rel_err_vs_today"] == 0.0
    assert runs[0]["min_target_cosine_vs_today"] == pytest.approx(1.0, abs=1e-6)
    assert runs[4]["min_target_cosine_vs_today"] > 0.99
    assert all(r["max_rel_err_vs_today"] < 1e-5 for r in runs[1:4])
    assert runs[4]["max_rel_err_vs_today"] < 2e-2 and runs[5]["max_rel_err_vs_today"] < 1e-5
    assert "| today | 4 x 11 |" in capsys.readouterr().out
    for bad, message in ((["--variants", "fast"], "unknown variant"),
                         (["--variants", "fp32:3"], "multiple of every batch size")):
        monkeypatch.setattr(sys, "argv", ["extraction_speed.py", "--images", "4", *bad])
        with pytest.raises(SystemExit):
            extraction_speed.main()
        assert message in capsys.readouterr().err


def test_ten_seed_suite_plans_the_evidence_in_a_useful_order(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(accuracy, "DEFAULT_OUT", tmp_path)
    assert accuracy.main(["--suite", "ten-seed", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cpu-v3" / "results.json") in out  # a new folder: cpu-v2 stays as it is
    keys = [line.split()[1] for line in out.splitlines()[1:]]
    arms = ["fedavg", "feddifrc", "fedavg+warm", "fedavg-kd", "feddifrc+warm", "feddifrc+no-head"]
    # each seed runs every arm (the first comparison first) before the next seed starts
    assert keys[:6] == [f"{a}/alpha=0.1/seed=7" for a in arms]
    assert keys[6:8] == ["fedavg/alpha=0.1/seed=8", "feddifrc/alpha=0.1/seed=8"]
    specs = accuracy_plan.suite_specs(accuracy_plan.SUITES["ten-seed"], None, accuracy_plan.CPU_BUDGET, {})
    seeds: dict[tuple[str, float], list[int]] = {}
    for s in specs:
        seeds.setdefault((s.label, s.alpha), []).append(s.seed)
    for arm in arms:
        assert seeds[(arm, 0.1)] == list(range(7, 17)) and seeds[(arm, 0.5)] == list(range(7, 12))
    for baseline in ("fedprox", "moon"):
        assert seeds[(baseline, 0.1)] == seeds[(baseline, 0.5)] == list(range(7, 12))
    assert len(keys) == len(set(keys)) == 6 * 10 + 6 * 5 + 2 * 2 * 5
    assert all(s.overrides["validation-samples"] == 2000 for s in specs)

    by_key = {s.key: s.overrides for s in specs}
    dif, warm = by_key["feddifrc/alpha=0.1/seed=7"], by_key["feddifrc+warm/alpha=0.1/seed=7"]
    assert warm["init-model"] == "public-supervised" and warm["init-epochs"] >= 1
    assert "init-model" not in dif
    # the warm FedDifRC extracts exactly as the plain one (it reuses its cached rows)
    assert {k: v for k, v in warm.items() if k not in accuracy_plan.WARM_START} == dif
    kd = by_key["fedavg-kd/alpha=0.1/seed=7"]
    assert kd["diffusion-model"] == "offline-teacher" and kd["kd-temperature"] > 0
    assert not {"tau", "reduction", "align-head", "diffusion-timestep"} & set(kd)
    assert "kd-weight" not in by_key["fedavg/alpha=0.1/seed=7"]
    kd_spec = next(s for s in specs if s.key == "fedavg-kd/alpha=0.1/seed=7")
    assert kd_spec.teacher_weights  # a retrained teacher makes new KD runs


def _record_runs(tmp_path, runs):
    """runs: (label, seed, test curve, validation curve) -> a results store with their records."""
    store = accuracy_store.ResultsStore(tmp_path / "results.json")
    for label, seed, accs, val in runs:
        method, tag = accuracy_plan.split_label(label)
        spec = accuracy_plan.plan_runs([method], [0.1], [seed], accuracy_plan.CPU_BUDGET,
                                  accuracy_plan.VARIANTS.get(tag, {}), tag)[0]
        _fake_run_folder(tmp_path / spec.run_name, accs, val=val)
        store.add(accuracy_store.read_run(spec, tmp_path / spec.run_name))
    return store


def test_reports_choose_the_round_on_validation_and_answer_the_controls(tmp_path):
    """5 rounds: the last-5 mean is the whole curve; validation picks round 2 (ties: earliest),
    whose test accuracy is reported, not the best on test (round 5)."""
    val = [0.50, 0.60, 0.60, 0.55, 0.58]
    runs = []
    for seed, jitter in zip((7, 8, 9), (0.0, 0.01, -0.01), strict=True):
        for label, level in (("fedavg", 0.50), ("fedavg+warm", 0.55), ("fedavg-kd", 0.52),
                             ("feddifrc", 0.60), ("feddifrc+warm", 0.56)):
            base = level + (jitter if label.startswith("feddifrc") else 0.0)
            runs.append((label, seed, [base + d for d in (0.0, 0.02, 0.01, 0.03, 0.04)], val))
    store = _record_runs(tmp_path, runs)
    rows = {r["label"]: r for r in accuracy_report.summarize(
        list(store.records.values()), "fedavg")}
    assert rows["fedavg"]["at-val"] == pytest.approx((52.0, 0.0))  # round 2: 0.50 + 0.02
    assert rows["fedavg"]["best"] == pytest.approx((54.0, 0.0))  # round 5, chosen on test
    assert rows["feddifrc"]["at-val-vs-fedavg"]["mean-sd"] == pytest.approx((10.0, 1.0))
    text = accuracy.write_reports(store, tmp_path, "cmd")
    assert "| fedavg | 0.1 | 52.00 ± 0.00 | 52.00 ± 0.00 | 52.00 ± 0.00 | 54.00 ± 0.00 |" in text
    controls = text[text.index("FedDifRC against the controls"):]
    # feddifrc is +10 / +5 / +8 (sd 1) above the three controls: above every one of them
    warm_row, plain_row = controls.splitlines()[4:6]
    # feddifrc+warm (the pre-registered arm) is +1 (sd 1) above fedavg+warm: interval includes 0
    assert warm_row.startswith("| 0.1 | feddifrc+warm (primary) | +6.00 ± 1.00")
    assert "| not resolved (an interval includes 0) | 7,8,9 |" in warm_row
    assert plain_row.startswith("| 0.1 | feddifrc | +10.00 ± 1.00 [+7.52, +12.48] |")
    assert "| yes | 7,8,9 |" in plain_row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["primary-metric"].startswith("mean test accuracy of the last 5 rounds")


def test_the_head_rule_is_applied_as_written_to_seeds_12_to_16(tmp_path):
    def runs(no_head_gain, linear_gain, seeds=(12, 13, 14, 15, 16)):
        out = []
        for i, seed in enumerate(seeds):
            wobble = 0.01 * (i % 2)  # a small spread, so that intervals have a width
            out += [("fedavg", seed, [0.50, 0.60], None),
                    ("feddifrc", seed, [0.50, 0.60 + linear_gain + wobble], None),
                    ("feddifrc+no-head", seed, [0.50, 0.60 + no_head_gain + wobble], None)]
        return out

    records = list(_record_runs(tmp_path / "a", runs(0.04, 0.03)).records.values())
    text = accuracy_report.head_rule_markdown(records)
    assert "the rule (best accuracy): no-head − FedAvg +4.40" in text
    assert '**align-head becomes "none"**' in text.split("\n")[2]
    # a larger gain of the linear head keeps it, even with the no-head interval above 0
    records = list(_record_runs(tmp_path / "b", runs(0.04, 0.05)).records.values())
    assert "**the linear head stays**" in accuracy_report.head_rule_markdown(records).split("\n")[2]
    # not all 15 runs in: pending, the default stays
    records = list(_record_runs(tmp_path / "c", runs(0.04, 0.03, seeds=(12, 13))).records.values())
    assert "Pending: runs recorded fedavg 2/5" in accuracy_report.head_rule_markdown(records)
    # seeds outside 12-16 do not count
    assert accuracy_report.head_rule_markdown(
        list(_record_runs(tmp_path / "d", runs(0.04, 0.03, seeds=(7, 8))).records.values())) == ""


# Every suite's run names (label, alpha, seed and configuration hash, in run order) as the
# planner of main at ac3cf44 made them, the commit the ten-seed suite was started from. A record
# is reused only under its hash: a change of what a method reads (its parameters, flags, the
# target settings) must show here, not silently start new runs or mix settings in one table.
SUITE_RUN_NAMES = {"ten-seed": (110, "8f1c6b4015cf4fd5"), "five-seed": (55, "1164ba07c3a14170"),
                   "ssl-three-seed": (6, "350b1518f67f1d66"),
                   "confirm-head": (15, "5fa68c66ee50c3b2")}


@pytest.mark.parametrize("suite", sorted(SUITE_RUN_NAMES))
def test_every_suite_plans_the_run_names_its_records_were_made_under(suite):
    import hashlib

    specs = accuracy_plan.suite_specs(accuracy_plan.SUITES[suite], None,
                                      accuracy_plan.CPU_BUDGET, {})
    names = " ".join(s.run_name for s in specs)
    count, digest = SUITE_RUN_NAMES[suite]
    assert (len(specs), hashlib.sha256(names.encode()).hexdigest()[:16]) == (count, digest)
