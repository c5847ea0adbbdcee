"""End to end: the real ServerApp and ClientApp, 3 clients, 2 rounds, tiny data and extractor.

Most runs use an in-process grid (real Messages, no Ray: seconds each); one test goes through
Flower's Ray simulation engine and one through `flwr run` (scripts/run_simulation.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client_app.app import app as client_app
from client_app.app import make_client_app
from feddifrc_core.algorithms import algorithm_names, get_algorithm
from feddifrc_core.config import RunConfig
from feddifrc_core.robust_aggregation import ROBUST
from server_app.aggregator import RobustAggregator
from server_app.app import make_server_app, run_server
from server_app.replies import RoundFailedError
from tests.loopback_grid import LoopbackGrid, run_loopback, straight_and_resumed

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.csv", "metrics.png", "tensorboard",
             "checkpoints", "final_model.safetensors", "summary.json"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One feature cache for the module: the tiny extractor runs once per client."""
    return tmp_path_factory.mktemp("feddifrc-cache")


def tiny(tmp_path: Path, cache_dir: Path, **changes) -> RunConfig:
    base = dict(
        seed=3, num_rounds=2, fraction_train=0.67, min_train_nodes=2, min_available_nodes=2,
        output_dir=str(tmp_path / "runs"), run_name="run", torch_threads=1, device="cpu",
        dataset="digits", train_samples=150, test_samples=100, partition="iid",
        model="small-cnn", model_width=8, local_epochs=1, batch_size=16, eval_batch_size=256,
        diffusion_model="tiny-sd", diffusion_image_size=0, extraction_batch_size=64,
        cache_dir=str(cache_dir), probe_train_samples=100, neg_num=3,
    )
    return RunConfig().replace(**{**base, **changes})


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", algorithm_names())
def test_every_algorithm_runs_end_to_end(tmp_path, cache_dir, algorithm):
    cfg = tiny(tmp_path, cache_dir, algorithm=algorithm)
    summary = run_loopback(cfg, 3)
    assert summary["rounds"] == 2 and 0.0 <= summary["best-accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["train-loss"]) and r["failures"] == 0 for r in rows[1:])
    assert all(r["train-examples"] > 0 and r["train-seconds"] > 0 for r in rows[1:])
    label_free = get_algorithm(algorithm).label_free  # judged by a linear probe and kNN
    assert all(("test-knn-accuracy" in r) == label_free for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", algorithm_names())
def test_every_algorithm_runs_with_a_robust_aggregator(tmp_path, cache_dir, algorithm,
                                                     monkeypatch):
    """The client objective does not care how the server combines: each algorithm with one of
    Flower's robust rules (in turn), one round of all 3 clients; the rule combines the model,
    FedDifRC's set-up statistics stay exact sums."""
    rule = ROBUST[algorithm_names().index(algorithm) % len(ROBUST)]
    rules_seen: list[str] = []
    robust_combine = RobustAggregator.combine

    def spy(self, uploads, how):
        rules_seen.append(how)
        return robust_combine(self, uploads, how)

    monkeypatch.setattr(RobustAggregator, "combine", spy)
    cfg = tiny(tmp_path, cache_dir, algorithm=algorithm, aggregator=rule, num_rounds=1,
               fraction_train=1.0, min_train_nodes=3, min_available_nodes=3)
    summary = run_loopback(cfg, 3)
    assert summary["rounds"] == 1
    rows = [json.loads(line) for line in (tmp_path / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients"] == "0 1 2" and rows[1]["failures"] == 0
    assert rules_seen.count("mean") == 1  # the model, once per round
    assert ("sum" in rules_seen) == get_algorithm(algorithm).uses_diffusion  # set-up statistics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reduction", "projection", "head"),
    [("spatial-norm", "federated-pca", "none"), ("spatial-norm-centred", "random", "mlp"),
     ("mean-pool", "random", "linear")],
)
def test_target_settings_run_end_to_end(tmp_path, cache_dir, reduction, projection, head):
    """Every reduction with both projections through the real apps: the set-up stages (position
    statistics, bases, the mean target) over Messages, then training with the head."""
    cfg = tiny(tmp_path, cache_dir, reduction=reduction, projection=projection, align_head=head)
    summary = run_loopback(cfg, 3)
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in (tmp_path / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train-tdcl"]) and np.isfinite(r["train-ndcr"]) for r in rows[1:])
    final = load_file(str(tmp_path / "runs/run/final_model.safetensors"))
    assert any(k.startswith("align_head") for k in final) == (head != "none")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "feddifrc-ssl"])
def test_eval_every_is_honoured_and_label_free_runs_log_probe_and_knn(tmp_path, cache_dir,
                                                                      algorithm):
    cfg = tiny(tmp_path, cache_dir, algorithm=algorithm, num_rounds=3, eval_every=2)
    summary = run_loopback(cfg, 3)
    run_dir = tmp_path / "runs/run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The initial model, every eval-every-th round and always the last one.
    assert [r["round"] for r in rows if "test-accuracy" in r] == [0, 2, 3]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    if algorithm == "fedavg":
        assert "test-knn-accuracy" not in header and "accuracy-metric" not in summary
        return
    evaluated = [r for r in rows if "test-accuracy" in r]
    assert all(0.0 <= r["test-knn-accuracy"] <= 1.0 and r["test-accuracy"] == r["test-probe-accuracy"]
               and r["probe-train-examples"] == cfg.probe_train_samples for r in evaluated)
    assert {"test-probe-accuracy", "test-knn-accuracy"} <= set(header)
    assert not any("train-accuracy" in r or "train-ce" in r for r in rows)  # no labels, no CE
    assert summary["accuracy-metric"] == "linear-probe" and "best-knn-accuracy" in summary
    assert json.loads((run_dir / "summary.json").read_text())["final-knn-accuracy"] == \
        rows[-1]["test-knn-accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "changes"), [
    ("moon", {}), ("feddifrc", {}), ("fedavgm", {}),
    # Flower's Krum under FedAvgM's momentum: the robust rule keeps no state of its own
    ("fedavgm", {"aggregator": "krum", "fraction_train": 1.0, "min_train_nodes": 3,
                 "min_available_nodes": 3})])
def test_resume_after_a_kill_gives_the_same_final_model(tmp_path, cache_dir, algorithm, changes):
    """Killed after the clients of round 2 replied, resumed from round 1's checkpoint: the final
    model is bit-identical (CPU, one thread): sampling and client seeds are functions of (seed,
    round, partition), aggregation runs in partition order (a robust rule too), MOON's previous
    models are tagged by round, the algorithm's server state (FedDifRC's bases, FedAvgM's
    momentum) comes from the checkpoint."""
    cfg = tiny(tmp_path, cache_dir, algorithm=algorithm, num_rounds=3, **changes)
    straight_dir, resumed_dir = straight_and_resumed(cfg, 3)

    straight = load_file(str(straight_dir / "final_model.safetensors"))
    resumed = load_file(str(resumed_dir / "final_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    # the files too, byte for byte: run name and wall time stay out of the model file
    assert (straight_dir / "final_model.safetensors").read_bytes() == \
        (resumed_dir / "final_model.safetensors").read_bytes()
    rows = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # Resuming with other training settings would not be the same run: refused, naming the key.
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.5"):
        run_loopback(cfg.replace(run_name="killed", resume=True, lr=0.5), 3)


@pytest.mark.slow
def test_a_new_run_reusing_a_run_name_never_touches_the_old_runs_moon_models(tmp_path, cache_dir):
    """MOON keeps each client's previous local model on disk; a second run under the same
    run-name (in another output-dir, resume=false) gets its own store, the first run's files stay
    byte-identical and the second run's round 1 has no previous model to read."""
    own_cache = tmp_path / "cache"  # not the module's cache: other MOON tests write stores there
    first = tiny(tmp_path, own_cache, algorithm="moon", fraction_train=1.0, num_rounds=2)
    run_loopback(first, 3)
    stores = own_cache / "local-models"
    old = {p: p.read_bytes() for p in stores.glob("run-*/*.safetensors")}
    assert old and len({p.parent for p in old}) == 1
    second = first.replace(output_dir=str(tmp_path / "other-runs"), num_rounds=1)
    run_loopback(second, 3)
    assert {p: p.read_bytes() for p in old} == old  # neither read-modified nor pruned
    new = [p for p in stores.glob("run-*/*.safetensors") if p not in old]
    assert len({p.parent for p in new}) == 1 and len(new) == 3  # one model per client, round 1


def test_a_failing_client_app_fails_the_run_visibly(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, algorithm="fedavg", fraction_train=1.0, min_train_nodes=3,
               min_available_nodes=3)
    grid = LoopbackGrid(client_app, 3, cfg.to_flower(), fail={1: {1}})
    with pytest.raises(RoundFailedError, match=r"round 1: only 2 of 3 .*partition 1 .*injected failure"):
        run_server(grid, cfg)


@pytest.mark.slow
def test_ray_simulation_writes_a_complete_run_folder(tmp_path, cache_dir):
    from flwr.simulation import run_simulation

    cfg = tiny(tmp_path, cache_dir, algorithm="fedavg")
    run_simulation(server_app=make_server_app(cfg.to_flower()),
                   client_app=make_client_app(cfg.to_flower()),
                   num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1}})
    run_dir = tmp_path / "runs" / "run"
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and "best-accuracy" in summary and "mean-accuracy" in summary
    assert json.loads((run_dir / "config.json").read_text())["git-revision"]
    assert len(list((run_dir / "checkpoints").glob("round-*.safetensors"))) == 3  # rounds 0, 1, 2


@pytest.mark.slow
def test_run_script_exits_nonzero_when_the_flower_run_fails(tmp_path):
    """`flwr run` exits 0 for a failed run; the demo script must not."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FEDDIFRC_RUNS_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/run_simulation.py"), "--supernodes", "2",
         "-c", f"dataset='image-folder' data-path='{tmp_path / 'missing'}' num-rounds=1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "finished:failed" in proc.stderr


def test_run_script_stacks_settings_files_and_overrides():
    from scripts.run_config import merge_run_config

    merged = merge_run_config([str(ROOT / "conf/paper-cifar10.toml"),
                               str(ROOT / "conf/paper-cifar10-moon.toml"),
                               "num-rounds=3 output-dir='/tmp/a b' resume=true"])
    assert merged["algorithm"] == "moon" and merged["num-rounds"] == 3 and merged["resume"] is True
    assert merged["output-dir"] == "/tmp/a b" and merged["dataset"] == "cifar10"
    for path in sorted((ROOT / "conf").glob("*.toml")):  # every settings file is valid
        RunConfig.from_flower(merge_run_config([str(path)]))



def test_the_flower_app_bundle_carries_the_ssl_vocabulary(tmp_path):
    """`flwr run` ships a FAB built from the staged app: the bundled vocabulary must be in it."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from scripts.run_simulation import _stage_app

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(_stage_app(tmp_path)))) as fab:
        names = set(fab.namelist())
    assert "feddifrc_core/data/tiny_imagenet_classes.json" in names
    assert "feddifrc_core/prompts.py" in names
