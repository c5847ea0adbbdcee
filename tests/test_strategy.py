"""The strategy over real Flower Messages (in-process grid): aggregation, sampling, failures, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from loopback_grid import LoopbackGrid

from client_app.records import to_flower_arrays
from feddifrc_core import projection
from feddifrc_core.aggregation import sample_partitions, weighted_average
from feddifrc_core.config import RunConfig
from feddifrc_core.run_setup import build_global_model, load_state, model_state
from server_app.strategy import FedDifRCStrategy, RoundFailedError

NUM_NODES = 4
SIZES = {0: 10, 1: 30, 2: 5, 3: 55}  # num-examples per partition


def _client_arrays(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {"w": rng.standard_normal((3, 2)).astype(np.float32),
            "bn.num_batches_tracked": np.array(10 * (partition + 1), dtype=np.int64)}


def _block_features(partition: int) -> list[np.ndarray]:
    """Two 'blocks' of pooled features with different statistics per client."""
    rng = np.random.default_rng(100 + partition)
    n = SIZES[partition]
    return [rng.standard_normal((n, 6)) * (1 + partition) + partition,
            rng.standard_normal((n, 4)) @ rng.standard_normal((4, 4)) - partition]


def _fake_client() -> ClientApp:
    app = ClientApp()

    def pid(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query("node_info")
    def node_info(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid(context)})}), reply_to=msg)

    @app.query("projection_stats")
    def stats(msg: Message, context: Context) -> Message:
        arrays = projection.stats_to_arrays([projection.pca_stats(f) for f in _block_features(pid(context))])
        return Message(RecordDict({"arrays": ArrayRecord(to_flower_arrays(arrays)),
                                   "metrics": MetricRecord({"num-examples": SIZES[pid(context)]})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        assert msg.content["config"]["server-round"] >= 1
        assert RunConfig.from_flower(dict(msg.content["run-config"])).seed == 3
        metrics = MetricRecord({"num-examples": SIZES[pid(context)], "train-loss": float(pid(context)),
                                "train-seconds": 1.0 + pid(context)})
        return Message(RecordDict({"arrays": ArrayRecord(to_flower_arrays(_client_arrays(pid(context)))),
                                   "metrics": metrics}), reply_to=msg)

    return app


def _round(strategy: FedDifRCStrategy, grid: LoopbackGrid, server_round: int):
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    return strategy.aggregate_train(server_round, grid.send_and_receive(messages))


def test_weighted_average_is_the_weighted_mean():
    arrays = [_client_arrays(p) for p in range(3)]
    weights = [SIZES[p] for p in range(3)]
    out = weighted_average(arrays, weights)
    expected = sum(w * a["w"].astype(np.float64) for a, w in zip(arrays, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert out["w"].dtype == np.float32
    assert out["bn.num_batches_tracked"].dtype == np.int64
    with pytest.raises(ValueError, match="same model architecture"):
        weighted_average([arrays[0], {"other": arrays[1]["w"]}], [1, 1])


def test_sampling_is_seeded_per_round_and_respects_the_minimum():
    pool = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    first = sample_partitions(pool, 0.5, 2, seed=7, server_round=1)
    assert len(first) == 5 and first == sorted(set(first))
    assert first == sample_partitions(pool[::-1], 0.5, 2, seed=7, server_round=1)  # order-free
    assert {tuple(sample_partitions(pool, 0.5, 2, 7, r)) for r in range(1, 6)} != {tuple(first)}
    assert len(sample_partitions(pool, 0.05, 3, seed=7, server_round=1)) == 3
    with pytest.raises(ValueError, match="min-train-nodes"):
        sample_partitions([0, 1], 0.5, 3, seed=7, server_round=1)


def test_aggregation_over_messages_tolerates_failures_above_the_minimum():
    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    grid = LoopbackGrid(_fake_client(), NUM_NODES, fail={2: {1}}, silent={3: {0, 2}})
    strategy = FedDifRCStrategy(cfg, "t")
    assert sorted(strategy.discover_nodes(grid).values()) == [0, 1, 2, 3]

    arrays, metrics = _round(strategy, grid, 1)
    expected = weighted_average([_client_arrays(p) for p in range(4)], [SIZES[p] for p in range(4)])
    np.testing.assert_array_equal(arrays["w"].numpy(), expected["w"])
    assert metrics["num-examples"] == sum(SIZES.values())
    assert metrics["train-seconds"] == 4.0  # the slowest client bounds the round
    assert metrics["train-loss"] == pytest.approx(sum(p * n for p, n in SIZES.items()) / sum(SIZES.values()))

    arrays, metrics = _round(strategy, grid, 2)  # partition 1 raises in round 2
    report = strategy.last_report
    assert report.succeeded == [0, 2, 3] and len(report.failures) == 1
    assert "partition 1" in report.failures[0] and "injected failure" in report.failures[0]
    expected = weighted_average([_client_arrays(p) for p in (0, 2, 3)], [SIZES[p] for p in (0, 2, 3)])
    np.testing.assert_array_equal(arrays["w"].numpy(), expected["w"])

    arrays, metrics = _round(strategy, grid, 3)  # partitions 0 and 2 time out in round 3
    assert strategy.last_report.succeeded == [1, 3]
    assert [f.split(" (node")[0] for f in strategy.last_report.failures] == ["partition 0", "partition 2"]
    assert all("no reply within round-timeout (3600 s)" in f for f in strategy.last_report.failures)
    assert metrics["num-clients"] == 2


def test_too_few_replies_fail_the_round_loudly():
    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=3, min_available_nodes=3)
    grid = LoopbackGrid(_fake_client(), NUM_NODES, fail={1: {0, 3}})
    strategy = FedDifRCStrategy(cfg, "t")
    strategy.discover_nodes(grid)
    with pytest.raises(RoundFailedError, match=r"only 2 of 4 clients.*min-train-nodes is 3.*partition 0"):
        _round(strategy, grid, 1)


def test_federated_projection_equals_centralized_pca_of_the_union():
    cfg = RunConfig(seed=3, min_train_nodes=2, min_available_nodes=2)
    grid = LoopbackGrid(_fake_client(), NUM_NODES)
    strategy = FedDifRCStrategy(cfg, "t")
    strategy.discover_nodes(grid)
    federated = projection.arrays_to_bases(strategy.setup_projection(grid, feature_dim=8))

    union = [np.concatenate([_block_features(p)[b] for p in range(NUM_NODES)]) for b in range(2)]
    dims = projection.split_feature_dim(8, 2)
    central = projection.pca_bases([projection.pca_stats(torch.from_numpy(u)) for u in union], dims)
    for fed, cen, u in zip(federated, central, union, strict=True):
        np.testing.assert_allclose(fed.mean, u.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(fed.mean, cen.mean, atol=1e-5)
        # Same subspace and signs (the bases fix the sign of each component).
        np.testing.assert_allclose(fed.components, cen.components, atol=1e-4)


def test_a_model_mismatch_between_server_and_client_is_named():
    cfg = RunConfig(model="small-cnn", model_width=8)
    server = build_global_model(cfg, channels=1, num_classes=10, image_size=16)
    client = build_global_model(cfg.replace(model_width=4), channels=1, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match="same model, model-width and data set"):
        load_state(client, model_state(server))
    load_state(server, model_state(build_global_model(cfg, 1, 10, 16)))  # same architecture: fine

