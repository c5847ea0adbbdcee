"""Secure aggregation through the real apps (`secure-aggregation = "secaggplus"`): the real
ServerApp and ClientApp over an in-process grid that carries every message as Flower's protobuf
bytes and records everything that reaches the server (tests/secure_grid.py). FedDifRC with both
set-up stages (projection statistics and target sums) and the training rounds.

The secure-sum machinery itself (bounds, dropouts at each stage, settings) is tested in
tests/test_secure_aggregation.py; here: what the ServerApp receives, that a secure run gives the
plaintext run's aggregates within the stated bound, dropouts in a real round, and exact resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto
from safetensors.numpy import load_file

from client_app import secure_upload
from client_app.app import make_client_app
from feddifrc_core import checkpoint as ckpt
from feddifrc_core.aggregation import Rule, Upload
from feddifrc_core.algorithms import algorithm_names, get_algorithm
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.secure_encoding import SecAggSettings
from feddifrc_core.secure_uploads import from_secure_sums, secure_vector
from server_app import app as server_app
from server_app.aggregator import Aggregator
from server_app.app import run_server
from server_app.replies import RoundFailedError
from server_app.secure_aggregator import SecureAggregator
from tests.secure_grid import SecureLoopbackGrid
from wire import protocol
from wire.protocol import LAYOUT

ROOT = Path(__file__).resolve().parents[1]
NODES = 5
Q = SecAggSettings().quantization_for(NODES)  # auto: 2**29 for 5 clients


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secure-cache")  # the tiny extractor runs once per client


def tiny(tmp_path: Path, cache_dir: Path, **changes) -> RunConfig:
    """FedDifRC on digits with the tiny SD-shaped extractor; both set-up stages (position
    statistics for the PCA basis, then the target sums); every client trains every round."""
    base = dict(
        seed=3, num_rounds=2, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
        output_dir=str(tmp_path / "runs"), run_name="run", torch_threads=1, device="cpu",
        dataset="digits", train_samples=150, test_samples=60, partition="iid",
        model="small-cnn", model_width=8, local_epochs=1, batch_size=16, eval_batch_size=256,
        diffusion_model="tiny-sd", diffusion_image_size=0, extraction_batch_size=64,
        reduction="spatial-norm-centred", cache_dir=str(cache_dir), neg_num=3,
        secure_aggregation="secaggplus")
    return RunConfig().replace(**{**base, **changes})


class Recorded:
    """Every `combine` of a run: (uploads, rule, result), in order (set-up stages, rounds)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Upload], Rule, dict[str, np.ndarray]]] = []

    def wrap(self, cls: type[Aggregator]) -> type[Aggregator]:
        calls = self.calls

        class Recording(cls):  # type: ignore[misc, valid-type]
            def combine(self, uploads, rule):
                result = super().combine(uploads, rule)
                calls.append((list(uploads), rule, result))
                return result

        return Recording


def run(cfg: RunConfig, monkeypatch, **grid_options) -> tuple[SecureLoopbackGrid, Recorded]:
    recorded = Recorded()
    monkeypatch.setattr(server_app, "make_aggregator", lambda cfg: recorded.wrap(Aggregator)())
    monkeypatch.setattr(server_app, "SecureAggregator", recorded.wrap(SecureAggregator))
    grid = SecureLoopbackGrid(make_client_app(), NODES, cfg.to_flower(), **grid_options)
    run_server(grid, cfg)
    return grid, recorded


def rows(cfg: RunConfig) -> list[dict]:
    path = Path(cfg.output_dir) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_server_holds_only_sums_and_they_are_the_plaintext_aggregates(
        tmp_path, cache_dir, monkeypatch):
    plain_cfg = tiny(tmp_path, cache_dir, num_rounds=1, run_name="plain",
                     secure_aggregation="none")
    _, plain = run(plain_cfg, monkeypatch)
    # What each client of the secure run puts into its stage's sum (its plaintext), in order.
    sent: list[tuple[dict[str, np.ndarray], dict[str, str]]] = []

    def recording(*args, **kwargs):
        sent.append(secure_vector(*args, **kwargs))
        return sent[-1]

    monkeypatch.setattr(secure_upload, "secure_vector", recording)
    secure_cfg = tiny(tmp_path, cache_dir, num_rounds=1, run_name="secure")
    grid, secure = run(secure_cfg, monkeypatch)
    # Stages in order: projection statistics (sum), target sums (sum), round 1's model (mean);
    # each client computed its answer once per stage (kept for the stage's second sum).
    assert [(len(u), r) for u, r, _ in plain.calls] == [(5, "sum"), (5, "sum"), (5, "mean")]
    assert [(len(u), r) for u, r, _ in secure.calls] == [(1, "sum"), (1, "sum"), (1, "mean")]
    assert len(sent) == 3 * NODES
    stages = [[v for v, _ in sent[i:i + NODES]] for i in range(0, 3 * NODES, NODES)]
    # The first stage's inputs are the same in both runs (the later ones use the bases).
    for upload in plain.calls[0][0]:
        assert any(all(np.array_equal(vector[f"arrays.{k}"], v) for k, v in upload.arrays.items())
                   for vector in stages[0])

    # (a) What reached the ServerApp: node discovery's partition ids, Flower's protocol records
    # and masked vectors; no array, no metric but Flower's constant weight, no plaintext bytes.
    wire = b"".join(message_to_proto(m).SerializeToString() for _, m in grid.replies)
    masked: dict[str, list[tuple[list, list[np.ndarray]]]] = {}
    for stage, reply in grid.replies:
        assert not reply.has_error(), reply.error
        if reply.metadata.message_type == protocol.NODE_INFO:
            assert set(reply.content.config_records) == {protocol.CONFIG}
            continue
        assert stage, "every upload travels inside SecAgg+"
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        assert {k: dict(v) for k, v in reply.content.metric_records.items()} in (
            {}, {"fitres.num_examples": {"num_examples": 1}})
        assert set(reply.content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.metrics",
                                                     "fitres.status"}
        if stage == "collect_masked_vectors":
            layout = json.loads(str(reply.content.config_records["fitres.metrics"][LAYOUT]))
            parts = [bytes_to_ndarray(b) for b in
                     reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            masked.setdefault(reply.metadata.group_id, []).append((layout, parts[1:]))
    groups = ["setup-projection-stats.sum", "setup-target-sums.sum", "round-1.sum"]
    assert all(len(masked[group]) == NODES for group in groups)
    for group, vectors in zip(groups, stages, strict=True):
        for vector in vectors:  # every client's plaintext of that stage ...
            for value in vector.values():
                head = np.ascontiguousarray(value).ravel()[:4]
                if head.size == 4 and np.ptp(head) > 0:
                    assert head.tobytes() not in wire
            for layout, parts in masked[group]:  # ... against every masked vector of it
                floats = [i for i, (name, _, dtype) in enumerate(layout)
                          if name.startswith("arrays.") and dtype.startswith("float")]
                seen = np.concatenate([parts[i].ravel().astype(np.float64) for i in floats])
                values = np.concatenate([vector[layout[i][0]].ravel() for i in floats])
                assert seen.size == values.size >= 128
                # uniform masks: |r| of a few 1/sqrt(n) at most (5 sigma: never by chance)
                limit = max(0.1, 5 / np.sqrt(seen.size))
                assert abs(np.corrcoef(seen, values)[0, 1]) < limit, group

    # (b) Each stage's result is what the plain rule gives over the same clients' plaintext,
    # within the stated bound: per value at most 2 K b / Q off the sum (b: the public bound, at
    # most twice the largest client value), over the summed weights for a mean; integers
    # (counts) exact; float32 rounding on top. The first stage also against the plain run.
    g = ckpt.load_checkpoint(Path(secure_cfg.output_dir) / "secure/checkpoints/round-0000"
                             ".safetensors").group("model")
    for i, (vectors, (_, rule, got)) in enumerate(zip(stages, secure.calls, strict=True)):
        exact = {k: sum(np.asarray(v[k], np.float64) for v in vectors) for k in vectors[0]}
        want, _, _ = from_secure_sums(exact, sent[NODES * i][1], rule, NODES,
                                      g if rule == "mean" else None)
        total = float(exact["num-examples"][0]) if rule == "mean" else 1.0
        for name in want:
            bound = 2 * max(float(np.abs(v[f"arrays.{name}"]).max()) for v in vectors)
            for reference in [want] + ([plain.calls[0][2]] if i == 0 else []):
                ref = reference[name]
                assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
                err = np.abs(got[name].astype(np.float64) - ref.astype(np.float64))
                if np.issubdtype(ref.dtype, np.integer):
                    assert err.max() == 0, name
                    continue
                rounding = np.finfo(ref.dtype).eps * np.abs(ref.astype(np.float64)) * 2
                assert np.all(err <= 2 * NODES * bound / Q / total + rounding), name
    # The run's numbers: the same rounds, clients, counts and (weighted) metrics.
    p_rows, s_rows = rows(plain_cfg), rows(secure_cfg)
    assert [r["clients"] for r in s_rows[1:]] == ["0 1 2 3 4"]
    assert s_rows[1]["train-examples"] == p_rows[1]["train-examples"] == 150
    assert s_rows[1]["train-loss"] == pytest.approx(p_rows[1]["train-loss"], rel=1e-4)


@pytest.mark.slow
def test_a_client_killed_after_key_sharing_leaves_the_round_to_the_rest(tmp_path, cache_dir,
                                                                        monkeypatch):
    cfg = tiny(tmp_path, cache_dir)
    # Partition 3 answers round 1's key sharing, then its process is gone for good.
    run(cfg, monkeypatch, kill={3: "round-1.sum/collect_masked_vectors"})
    r1, r2 = rows(cfg)[1:]
    assert r1["clients"] == "0 1 2 4" and r1["failures"] == 1 and r1["num-clients"] == 4
    # Round 2 loses it in SecAgg+'s set-up, before anyone uploaded: the sum restarts without it.
    assert r2["clients"] == "0 1 2 4" and r2["failures"] == 1
    assert r1["train-examples"] == r2["train-examples"] == 120  # 4 of 5 IID partitions of 150


@pytest.mark.slow
def test_fewer_clients_than_the_threshold_fail_clearly_and_the_run_resumes_exactly(
        tmp_path, cache_dir, monkeypatch):
    cfg = tiny(tmp_path, cache_dir)
    run(cfg.replace(run_name="straight"), monkeypatch)
    broken = cfg.replace(run_name="broken")
    # Three of five lost after key sharing: a neighbourhood of 5 needs 3 to unmask.
    lost = {p: "round-2.sum/collect_masked_vectors" for p in (1, 2, 3)}
    with pytest.raises(RoundFailedError,
                       match=r"(?s)round 2: secure sum round-2.sum failed: .*a neighbourhood of 5 "
                             r"needs 3 \(secagg-reconstruction-threshold\).*partition 1 .*"
                             r"resume the run"):
        run(broken, monkeypatch, kill=lost)
    assert [r["round"] for r in rows(broken)] == [0, 1]  # round 1 is checkpointed
    # The nodes are back (a new Flower run: new node ids, fresh node state): resume round 2.
    run(broken.replace(resume=True), monkeypatch, node_id_base=5000)
    straight = load_file(str(tmp_path / "runs/straight/final_model.safetensors"))
    resumed = load_file(str(tmp_path / "runs/broken/final_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:  # SecAgg+'s rounding is seeded per (seed, sum, partition)
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


@pytest.mark.slow
def test_client_side_clipping_pairs_with_secure_aggregation(tmp_path, cache_dir):
    """Flower's pairing: each client clips its update with Flower's mod before the update enters
    the secure sum (weight 1: DP's mean is unweighted), and the server noises the sum's mean.
    On the same seed the noise is the same draw, so the secure run's model is the plaintext DP
    run's within the quantization bound, at the same (epsilon, delta)."""
    # FedAvg: no set-up stage, so both runs train from the same model (FedDifRC's secure
    # projection statistics would give a basis that differs within its own bound)
    dp = dict(algorithm="fedavg", num_rounds=1, differential_privacy="client-fixed-clipping",
              dp_noise_multiplier=0.1, dp_clipping_norm=0.5)
    plain_cfg = tiny(tmp_path, cache_dir, run_name="plain", secure_aggregation="none", **dp)
    secure_cfg = tiny(tmp_path, cache_dir, run_name="secure", **dp)
    for cfg in (plain_cfg, secure_cfg):
        run_server(SecureLoopbackGrid(make_client_app(), NODES, cfg.to_flower()), cfg)
    (p_row,), (s_row,) = rows(plain_cfg)[1:], rows(secure_cfg)[1:]
    assert s_row["clients"] == p_row["clients"] == "0 1 2 3 4"
    assert s_row["dp-releases"] == p_row["dp-releases"] == 1
    assert s_row["dp-epsilon"] == pytest.approx(p_row["dp-epsilon"], rel=1e-12)

    def final(cfg: RunConfig) -> dict[str, np.ndarray]:
        path = Path(cfg.output_dir) / cfg.run_name / "checkpoints/round-0001.safetensors"
        return ckpt.load_checkpoint(path).group("model")

    plain, secure = final(plain_cfg), final(secure_cfg)
    g = ckpt.load_checkpoint(Path(secure_cfg.output_dir) / "secure/checkpoints/round-0000"
                             ".safetensors").group("model")
    moved = 0.0
    for name, want in plain.items():
        got = secure[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            assert np.array_equal(got, want), name  # the global model's buffers, kept
            continue
        # a clipped update's values are within +-C, their public bound within 2C: 2 K (2C) / Q
        # over the K clients' weights, plus float32 rounding of the models
        atol = 2 * NODES * (2 * 0.5) / Q / NODES
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float32).eps, atol=atol,
                                   err_msg=name)
        moved = max(moved, float(np.abs(want.astype(np.float64) - g[name]).max()))
    assert moved > 1e-3  # the round changed the model: the comparison is not of two copies of g


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", algorithm_names())
def test_every_algorithm_runs_with_secure_aggregation(tmp_path, cache_dir, algorithm):
    """The component sits below the algorithms: each one's set-up stages, uploads and metrics
    go through the secure sums unchanged (3 clients, one round)."""
    cfg = tiny(tmp_path, cache_dir, algorithm=algorithm, num_rounds=1, reduction="mean-pool",
               probe_train_samples=100)
    grid = SecureLoopbackGrid(make_client_app(), 3, cfg.to_flower())
    run_server(grid, cfg)
    (r1,) = rows(cfg)[1:]
    assert r1["clients"] == "0 1 2" and r1["failures"] == 0 and r1["num-clients"] == 3
    assert r1["train-examples"] == 150 and np.isfinite(r1["train-loss"])
    assert ("train-accuracy" in r1) != get_algorithm(algorithm).label_free


def test_settings_that_cannot_work_stop_the_run_before_any_secure_message(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, secagg_reconstruction_threshold=6)
    grid = SecureLoopbackGrid(make_client_app(), NODES, cfg.to_flower())
    with pytest.raises(ConfigError, match=r"set-up stages \(all 5 nodes\): "
                                          r"secagg-reconstruction-threshold 6 is larger than"):
        run_server(grid, cfg)
    assert {m.metadata.message_type for _, m in grid.replies} == {protocol.NODE_INFO}
    assert not (tmp_path / "runs/run").exists()  # nothing ran: no run folder left


@pytest.mark.parametrize(("changes", "message"), [
    ({"secagg_num_shares": 2.5}, "'secagg-num-shares' must be a fraction in (0, 1] or a whole"),
    ({"secagg_reconstruction_threshold": 0.0}, "'secagg-reconstruction-threshold' must be > 0"),
    ({"secagg_num_shares": 2}, "secagg-num-shares as an int must be >= 3 (or 1 = all), got 2"),
    ({"secagg_clipping_range": -1.0}, "'secagg-clipping-range' must be > 0"),
    ({"secagg_quantization_range": 2**31}, "'secagg-quantization-range' must be <= 2147483647"),
    ({"min_train_nodes": 1, "min_available_nodes": 1}, "needs 'min-train-nodes' >= 2"),
    ({"secure_aggregation": "secagg"}, "'secure-aggregation' must be one of ['none', 'secaggplus']"),
])
def test_secure_aggregation_settings_are_checked_when_the_config_is_parsed(tmp_path, cache_dir,
                                                                           changes, message):
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, cache_dir, **changes)
    assert message in str(err.value)


def test_the_federation_check_names_the_stage_the_key_and_the_values():
    """A count threshold must suit both sums: the set-up stages' (every node) and a round's
    (the sampled clients); a fraction (the default) scales with each."""
    cfg = RunConfig().replace(secure_aggregation="secaggplus", secagg_reconstruction_threshold=4,
                              fraction_train=1.0)
    cfg.check_secure_aggregation(6)
    with pytest.raises(ConfigError, match=r"set-up stages \(all 9 nodes\): .*threshold 4 must "
                                          r"be more than half of the 9 clients"):
        cfg.check_secure_aggregation(9)
    with pytest.raises(ConfigError, match=r"a training round \(3 of 7 nodes.*threshold 4 is "
                                          r"larger than the 3 clients"):
        cfg.replace(fraction_train=0.5).check_secure_aggregation(7)
    RunConfig().replace(secure_aggregation="secaggplus").check_secure_aggregation(100)
    RunConfig().replace(secagg_reconstruction_threshold=4).check_secure_aggregation(3)  # "none"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_simulation_completes_with_secure_aggregation(tmp_path):
    """`scripts/run_simulation.py --supernodes 5 -c "... secure-aggregation='secaggplus'"` on
    Flower's Ray simulation: every set-up stage and round is a SecAgg+ sum over the five."""
    settings = {"num-rounds": 2, "dataset": "digits", "model": "small-cnn", "model-width": 8,
                "diffusion-model": "tiny-sd", "train-samples": 150, "test-samples": 60,
                "validation-samples": 60, "local-epochs": 1, "fraction-train": 1.0,
                "partition": "iid", "data-subset": "all", "eval-batch-size": 256,
                "extraction-batch-size": 8, "secure-aggregation": "secaggplus"}
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                         for k, v in settings.items())
    env = {**os.environ, "FEDDIFRC_RUNS_DIR": str(tmp_path / "runs"),
           "FEDDIFRC_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/run_simulation.py"),
                           "--supernodes", "5", "-c", overrides],
                          env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("setup-projection-stats", "round-1", "round-2"):
        for part in ("magnitudes", "sum"):
            assert f"secure sum {stage}.{part}: 5 contributors, 0 dropped" in proc.stdout
    (folder,) = (tmp_path / "runs").iterdir()
    trained = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][1:]
    assert [(r["round"], r["clients"], r["num-clients"]) for r in trained] == [
        (1, "0 1 2 3 4", 5), (2, "0 1 2 3 4", 5)]
