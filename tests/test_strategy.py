"""The strategy over real Flower Messages (in-process grid): aggregation, sampling, failures, the
algorithms' server halves and the one aggregation component every upload passes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from feddifrc_core import projection
from feddifrc_core.aggregation import Rule, Upload, sample_partitions, sum_arrays, weighted_average
from feddifrc_core.algorithms.feddifrc import PROJECTION_STATS
from feddifrc_core.config import RunConfig
from feddifrc_core.models import load_state, model_state
from feddifrc_core.run_setup import build_global_model
from server_app.aggregator import Aggregator
from server_app.replies import RoundFailedError
from server_app.strategy import AlgorithmStrategy
from tests.loopback_grid import LoopbackGrid
from wire import protocol

NUM_NODES = 4
SIZES = {0: 10, 1: 30, 2: 5, 3: 55}  # num-examples per partition


def _client_arrays(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {"w": rng.standard_normal((3, 2)).astype(np.float32),
            "bn.running_var": rng.uniform(0.1, 1.0, 3).astype(np.float32),
            "bn.num_batches_tracked": np.array(10 * (partition + 1), dtype=np.int64)}


def _block_features(partition: int) -> list[np.ndarray]:
    """Two 'blocks' of pooled features with different statistics per client."""
    rng = np.random.default_rng(100 + partition)
    n = SIZES[partition]
    return [rng.standard_normal((n, 6)) * (1 + partition) + partition,
            rng.standard_normal((n, 4)) @ rng.standard_normal((4, 4)) - partition]


def _fake_client(cfg: RunConfig) -> ClientApp:
    """A ClientApp that speaks the wire protocol with made-up numbers (no data, no training)."""
    app = ClientApp()

    def pid(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query("node_info")
    def node_info(msg: Message, context: Context) -> Message:
        return protocol.node_info_reply(msg, pid(context), NUM_NODES)

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        request = protocol.read_request(msg)
        assert request.stage == PROJECTION_STATS and request.header.config_digest == cfg.digest()
        stats = [projection.pca_stats(f) for f in _block_features(pid(context))]
        return protocol.reply(msg, projection.stats_to_arrays(stats),
                              {protocol.NUM_EXAMPLES: SIZES[pid(context)]})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        request = protocol.read_request(msg)
        assert request.server_round >= 1 and request.header.run_name == "t"
        metrics = {protocol.NUM_EXAMPLES: SIZES[pid(context)], "train-loss": float(pid(context)),
                   "train-seconds": 1.0 + pid(context)}
        return protocol.reply(msg, _client_arrays(pid(context)), metrics)

    return app


def _strategy(cfg: RunConfig, aggregator: Aggregator | None = None) -> AlgorithmStrategy:
    return AlgorithmStrategy(cfg, cfg.new_algorithm(), protocol.Header(cfg.digest(), "t"),
                             aggregator)


def _grid(cfg: RunConfig, **options: object) -> LoopbackGrid:
    return LoopbackGrid(_fake_client(cfg), NUM_NODES, cfg.to_flower(), **options)


def _round(strategy: AlgorithmStrategy, grid: LoopbackGrid, server_round: int):
    model = protocol.to_record(_client_arrays(0))
    messages = strategy.configure_train(server_round, model, ConfigRecord(), grid)
    return strategy.aggregate_train(server_round, grid.send_and_receive(messages))


def test_weighted_average_is_the_weighted_mean_and_sums_are_exact():
    arrays = [_client_arrays(p) for p in range(3)]
    weights = [SIZES[p] for p in range(3)]
    out = weighted_average(arrays, weights)
    expected = sum(w * a["w"].astype(np.float64) for a, w in zip(arrays, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert out["w"].dtype == np.float32
    assert out["bn.num_batches_tracked"].dtype == np.int64
    with pytest.raises(ValueError, match="same model architecture"):
        weighted_average([arrays[0], {"other": arrays[1]["w"]}], [1, 1])
    # the sum rule: the merge of sufficient statistics, bit for bit the pairwise merge
    stats = [[projection.pca_stats(f) for f in _block_features(p)] for p in range(NUM_NODES)]
    summed = projection.arrays_to_stats(sum_arrays([projection.stats_to_arrays(s) for s in stats]))
    for got, want in zip(summed, projection.merge_all(stats), strict=True):
        assert got.count == want.count
        np.testing.assert_array_equal(got.sum, want.sum)
        np.testing.assert_array_equal(got.outer, want.outer)


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
    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                    algorithm="fedavg")
    grid = _grid(cfg, fail={2: {1}}, silent={3: {0, 2}})
    strategy = _strategy(cfg)
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
    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=3, min_available_nodes=3,
                    algorithm="fedavg")
    grid = _grid(cfg, fail={1: {0, 3}})
    strategy = _strategy(cfg)
    strategy.discover_nodes(grid)
    with pytest.raises(RoundFailedError, match=r"only 2 of 4 clients.*min-train-nodes is 3.*partition 0"):
        _round(strategy, grid, 1)


class RecordingAggregator(Aggregator):
    """The plain aggregator, recording which rule combined how many uploads."""

    def __init__(self) -> None:
        self.calls: list[tuple[Rule, int]] = []

    def combine(self, uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
        self.calls.append((rule, len(uploads)))
        return super().combine(uploads, rule)


def test_federated_projection_equals_centralized_pca_of_the_union():
    """FedDifRC's server half: the clients' statistics, summed by the aggregation component, give
    the PCA bases of the union of their features."""
    cfg = RunConfig(seed=3, min_train_nodes=2, min_available_nodes=2, fraction_train=1.0)
    grid = _grid(cfg)
    aggregator = RecordingAggregator()
    strategy = _strategy(cfg, aggregator)
    strategy.discover_nodes(grid)
    strategy.setup(grid, feature_dim=8)
    federated = projection.arrays_to_bases(strategy.algorithm.train_payload())

    union = [np.concatenate([_block_features(p)[b] for p in range(NUM_NODES)]) for b in range(2)]
    dims = projection.split_feature_dim(8, 2)
    central = projection.pca_bases([projection.pca_stats(torch.from_numpy(u)) for u in union], dims)
    for fed, cen, u in zip(federated, central, union, strict=True):
        np.testing.assert_allclose(fed.mean, u.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(fed.mean, cen.mean, atol=1e-5)
        # Same subspace and signs (the bases fix the sign of each component).
        np.testing.assert_allclose(fed.components, cen.components, atol=1e-4)
    # the bases travel with every train message; the model update is combined by the same component
    messages = strategy.configure_train(1, protocol.to_record(_client_arrays(0)), ConfigRecord(), grid)
    assert all(protocol.PAYLOAD in m.content.array_records for m in messages)
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert aggregator.calls == [("sum", NUM_NODES), ("mean", NUM_NODES)]


def test_fedavgm_steps_with_server_momentum():
    """A server-side method in one file (algorithms/fedavgm.py): Flower's FedAvgM update on the
    clients' mean, with its momentum buffer kept as server state (and checkpointed); BatchNorm's
    statistics are the clients' mean (stepped, this running variance would turn negative)."""
    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                    algorithm="fedavgm").replace(server_learning_rate=0.5, server_momentum=0.9)
    grid = _grid(cfg)
    strategy = _strategy(cfg)
    strategy.discover_nodes(grid)
    mean = weighted_average([_client_arrays(p) for p in range(4)], [SIZES[p] for p in range(4)])
    start = _client_arrays(0)
    arrays, _ = _round(strategy, grid, 1)
    d1 = start["w"] - mean["w"]
    np.testing.assert_allclose(arrays["w"].numpy(), start["w"] - 0.5 * d1, rtol=1e-6)
    assert arrays["bn.num_batches_tracked"].numpy() == mean["bn.num_batches_tracked"]
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), mean["bn.running_var"], rtol=1e-6)
    arrays, _ = _round(strategy, grid, 2)  # the round starts from the same model again
    np.testing.assert_allclose(arrays["w"].numpy(), start["w"] - 0.5 * (0.9 * d1 + d1), rtol=1e-6)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), mean["bn.running_var"], rtol=1e-6)
    assert set(strategy.algorithm.server_state()) == {"momentum.w"}


def test_a_client_with_another_run_config_refuses_to_work():
    """Each ClientApp reads its own run config; a request from a server with another one fails."""
    from client_app.app import app as client_app

    cfg = RunConfig(seed=3, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                    algorithm="fedavg", dataset="digits", train_samples=60, model="small-cnn")
    grid = LoopbackGrid(client_app, 2, cfg.replace(lr=0.5).to_flower())
    strategy = _strategy(cfg)
    strategy.discover_nodes(grid)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    with pytest.raises(RoundFailedError, match="run config .* differs from the server's"):
        strategy.aggregate_train(1, grid.send_and_receive(messages))


def test_a_model_mismatch_between_server_and_client_is_named():
    cfg = RunConfig(model="small-cnn", model_width=8)
    server = build_global_model(cfg, channels=1, num_classes=10, image_size=16)
    client = build_global_model(cfg.replace(model_width=4), channels=1, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match="same model, model-width and data set"):
        load_state(client, model_state(server))
    load_state(server, model_state(build_global_model(cfg, 1, 10, 16)))  # same architecture: fine
