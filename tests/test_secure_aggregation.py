"""Secure sums with Flower's SecAgg+ over real Messages: real ClientApps with Flower's mod, every
message serialized both ways (tests/secure_grid.py), and once on Flower's Ray simulation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto

from client_app.secure_upload import secure_sum_reply, secure_upload_mod
from feddifrc_core import projection
from feddifrc_core.aggregation import weighted_average
from feddifrc_core.models import build_model, model_state
from feddifrc_core.secure_encoding import SecAggSettings, encode, sum_error_bound
from feddifrc_core.secure_uploads import (
    apply_weighted_update,
    pca_from_sums,
    pca_upload,
    weighted_update,
)
from server_app.secure_aggregation import SecureAggregationError, secure_bounds, secure_sum
from tests.secure_grid import SecureLoopbackGrid
from wire.protocol import request_record, secure_sum_request

SETTINGS = SecAggSettings()  # the proposed defaults: all neighbours, 2/3 threshold, auto Q
GLOBAL = model_state(build_model("small-cnn", 1, 10, 16, align_head="none"))
SIZES = {0: 120, 1: 35, 2: 310, 3: 64, 4: 9}  # num-examples per partition


def client_arrays(partition: int) -> dict[str, np.ndarray]:
    """A client's private arrays: floats of very different scales and an integer count."""
    rng = np.random.default_rng(100 + partition)
    return {"vector": rng.normal(0.0, 2.0, 4000),
            "matrix": rng.normal(size=(30, 20)) * (1 + partition) + 50.0,
            "count": np.array([SIZES[partition]], dtype=np.int64)}


def local_model(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(200 + partition)
    return {k: v + rng.normal(0, 0.02, v.shape).astype(v.dtype) if v.dtype.kind == "f"
            else v + 5 * (partition + 1) for k, v in GLOBAL.items()}


def pooled_features(partition: int) -> np.ndarray:
    """Mean-dominated features like the offline teacher's last block (mean 0.5, std 0.07)."""
    rng = np.random.default_rng(300 + partition)
    mix = rng.normal(size=(16, 16)) * np.linspace(0.12, 0.002, 16)  # decaying spectrum
    return 0.5 + rng.normal(size=(SIZES[partition] * 11, 16)) @ mix + 0.01 * partition


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_upload_mod])
    def train(msg: Message, context: Context) -> Message:
        request = secure_sum_request(msg)
        if request is None:  # a plain train message: the mod must leave it alone
            return Message(RecordDict({"config": ConfigRecord({"plain": True})}), reply_to=msg)
        partition = int(context.node_config["partition-id"])
        purpose = str(msg.content.config_records["config"]["purpose"])
        arrays = {"arrays": lambda: client_arrays(partition),
                  "model": lambda: weighted_update(local_model(partition), GLOBAL, SIZES[partition]),
                  "pca": lambda: pca_upload([projection.pca_stats(pooled_features(partition))]),
                  }[purpose]()
        return secure_sum_reply(msg, arrays)

    return app


def content(purpose: str) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"purpose": purpose})})


def node_partitions(grid: SecureLoopbackGrid) -> dict[int, int]:
    return {n: grid.partition(n) for n in grid.contexts}


def bounded_sum(grid: SecureLoopbackGrid, purpose: str = "arrays", seed: int = 7, **kwargs):
    nodes = node_partitions(grid)
    bounds, _ = secure_bounds(grid, nodes, content(purpose), SETTINGS, seed=seed, stage="bounds")
    return bounds, secure_sum(grid, nodes, content(purpose), SETTINGS, seed=seed, stage="sum",
                              bounds=bounds, **kwargs)


def assert_sum_within_bound(result, bounds, partitions, num_sampled=5):
    q = SETTINGS.quantization_for(num_sampled)
    for name in ("vector", "matrix"):
        exact = sum(client_arrays(p)[name] for p in partitions)
        err = np.abs(result.arrays[name] - exact).max()
        assert 0 < err <= sum_error_bound(bounds[name], len(partitions), q), name
    assert result.arrays["count"].tolist() == [sum(SIZES[p] for p in partitions)]


def test_secure_sum_equals_the_plaintext_sum_within_the_stated_bound():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    bounds, result = bounded_sum(grid)
    assert result.contributors == sorted(grid.contexts) and not result.dropped
    peaks = {k: max(np.abs(client_arrays(p)[k]).max() for p in range(5)) for k in bounds}
    assert all(peaks[k] <= bounds[k] < 2 * peaks[k] for k in bounds)  # tight public bounds
    assert_sum_within_bound(result, bounds, range(5))


def test_the_server_never_holds_a_clients_vector():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    bounds, result = bounded_sum(grid)
    plain = {grid.partition(n): client_arrays(grid.partition(n)) for n in grid.contexts}
    wire = b"".join(message_to_proto(m).SerializeToString() for _, m in grid.replies)
    masked = []
    for stage, reply in grid.replies:
        assert not reply.has_error()
        # (a) no plaintext array, metric or config travels: the arrays are dropped, the only
        # metric is Flower's constant weight, the only config the public layout and the protocol.
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        assert {k: dict(v) for k, v in reply.content.metric_records.items()} in (
            {}, {"fitres.num_examples": {"num_examples": 1}})
        assert set(reply.content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.metrics",
                                                     "fitres.status"}
        if stage == "collect_masked_vectors":
            parts = [bytes_to_ndarray(b) for b in
                     reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            masked.append(np.concatenate([p.ravel() for p in parts[1:]]).astype(np.float64))
    assert len(masked) == 10  # 5 clients, the bounds round and the sum
    for arrays in plain.values():
        for value in arrays.values():  # no plaintext bytes anywhere in what reached the server
            assert np.ascontiguousarray(value).ravel()[:4].tobytes() not in wire
        encoded = encode(arrays, bounds, SETTINGS.clipping_range)
        vector = np.concatenate([encoded[k].ravel() for k in ("vector", "matrix", "count")])
        same_size = [seen for seen in masked if seen.shape == vector.shape]
        assert len(same_size) == 5
        for seen in same_size:  # no masked vector equals or correlates with any client's values
            assert not np.array_equal(seen, vector)
            assert abs(np.corrcoef(seen, vector)[0, 1]) < 0.1
    # (b) while the sum is the plaintext sum within the stated bound.
    assert_sum_within_bound(result, bounds, range(5))


def test_a_client_killed_after_key_sharing_leaves_the_round_to_the_rest():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    nodes = node_partitions(grid)
    bounds, _ = secure_bounds(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="bounds")
    grid.kill = {2: "collect_masked_vectors"}
    result = secure_sum(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="sum",
                        bounds=bounds)
    assert [nodes[n] for n in result.contributors] == [0, 1, 3, 4]
    assert list(result.dropped.values()) == ["masked vectors: no reply (timeout or node gone)"]
    assert_sum_within_bound(result, bounds, [0, 1, 3, 4])


def test_a_client_killed_after_uploading_stays_in_the_sum():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    nodes = node_partitions(grid)
    bounds, _ = secure_bounds(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="bounds")
    grid.kill = {1: "unmask"}  # its masked vector is in; Flower recovers its mask from shares
    result = secure_sum(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="sum",
                        bounds=bounds)
    assert len(result.contributors) == 5 and list(result.dropped.values()) == [
        "unmasking: no reply (timeout or node gone)"]
    assert_sum_within_bound(result, bounds, range(5))


def test_a_node_lost_before_any_upload_restarts_the_sum_without_it():
    for stage in ("setup", "share_keys"):
        grid = SecureLoopbackGrid(make_client_app(), 5, kill={4: stage})
        bounds, result = bounded_sum(grid)
        assert result.restarts == 1 and [grid.partition(n) for n in result.contributors] == [0, 1, 2, 3]
        assert_sum_within_bound(result, bounds, [0, 1, 2, 3])


def test_fewer_clients_than_the_threshold_fail_clearly():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    nodes = node_partitions(grid)
    bounds, _ = secure_bounds(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="bounds")
    grid.kill = {1: "collect_masked_vectors", 2: "collect_masked_vectors", 3: "unmask"}
    with pytest.raises(SecureAggregationError,
                       match=r"(?s)a neighbourhood of 5 needs 3 \(secagg-reconstruction-threshold\)"
                             r".*partition 1 .* in masked vectors.*partition 2 .*resume the run"):
        secure_sum(grid, nodes, content("arrays"), SETTINGS, seed=7, stage="sum", bounds=bounds)


def test_values_beyond_their_public_bound_fail_the_sum_instead_of_being_clipped():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    small = {"vector": 100.0, "matrix": 60.0, "count": 1024.0}  # partition 4's matrix reaches 63
    with pytest.raises(SecureAggregationError,
                       match=r"partition 4 \(node \d+\): ClippingError: array 'matrix' exceeds"):
        secure_sum(grid, node_partitions(grid), content("arrays"), SETTINGS, seed=7, stage="sum",
                   bounds=small)


def test_settings_that_cannot_work_are_refused_before_any_message():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    with pytest.raises(ValueError, match="threshold 6 is larger than the 5 clients"):
        secure_sum(grid, node_partitions(grid), content("arrays"),
                   SecAggSettings(num_shares=7, reconstruction_threshold=6), seed=7, stage="sum")
    assert grid.replies == []


def test_same_seed_gives_a_bit_identical_sum_also_with_new_node_ids():
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    first = bounded_sum(SecureLoopbackGrid(make_client_app(), 5))[1].arrays
    # A resumed run: other node ids (Flower draws them per run), the same partitions and seed.
    again = bounded_sum(SecureLoopbackGrid(make_client_app(), 5, node_id_base=5000))[1].arrays
    other = bounded_sum(SecureLoopbackGrid(make_client_app(), 5), seed=8)[1].arrays
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["vector"], other["vector"])  # the seed is what decides
    # Neither the clients' numpy RNG nor the server's `random` is disturbed.
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state


def test_plain_train_messages_pass_the_mod_untouched():
    grid = SecureLoopbackGrid(make_client_app(), 2)
    msg = Message(content("none"), dst_node_id=next(iter(grid.contexts)), message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.content.config_records["config"]["plain"] is True


def test_a_request_outside_secaggs_masked_stage_is_refused_not_answered_in_plaintext():
    app = ClientApp()

    @app.train()  # no secure_upload_mod
    def train(msg: Message, context: Context) -> Message:
        return secure_sum_reply(msg, client_arrays(int(context.node_config["partition-id"])))

    for client in (app, make_client_app()):  # without the mod / a request without SecAgg+ configs
        grid = SecureLoopbackGrid(client, 2)
        request = content("arrays")
        request["secure-sum"] = request_record("x", "encoded", 8.0, 1)
        msg = Message(request, dst_node_id=next(iter(grid.contexts)), message_type="train")
        (reply,) = grid.send_and_receive([msg])
        assert reply.has_error() and "would leave unmasked" in reply.error.reason


def test_the_weighted_model_update_is_fedavg_within_the_bound():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    bounds, result = bounded_sum(grid, "model")
    merged = apply_weighted_update(GLOBAL, result.arrays)
    expected = weighted_average([local_model(p) for p in range(5)], [SIZES[p] for p in range(5)])
    q, total = SETTINGS.quantization_for(5), sum(SIZES.values())
    for key, value in expected.items():
        tolerance = sum_error_bound(bounds["update." + key], 5, q) / total + 1e-6  # + float32
        assert merged[key].dtype == value.dtype
        assert np.abs(merged[key].astype(np.float64) - value).max() <= tolerance, key


def test_secure_pca_statistics_give_the_plaintext_basis():
    grid = SecureLoopbackGrid(make_client_app(), 5)
    _, result = bounded_sum(grid, "pca")
    secure = pca_from_sums(result.arrays)
    plain = projection.merge_all([[projection.pca_stats(pooled_features(p))] for p in range(5)])
    assert secure[0].count == plain[0].count
    (b_secure,), (b_plain,) = projection.pca_bases(secure, [8]), projection.pca_bases(plain, [8])
    x = pooled_features(0)
    y_secure, y_plain = (x - b_secure.mean) @ b_secure.components, (x - b_plain.mean) @ b_plain.components
    assert np.abs(y_secure - y_plain).max() < 1e-4 * np.abs(y_plain).max()


@pytest.mark.slow
def test_secure_sum_on_flowers_ray_simulation():
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    got: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < 3:
            node_ids = sorted(grid.get_node_ids())
        replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n,
                                                 message_type="query.partition") for n in node_ids])
        nodes = {m.metadata.src_node_id: int(m.content.config_records["p"]["id"]) for m in replies}
        bounds, _ = secure_bounds(grid, nodes, content("arrays"), SETTINGS, seed=3, stage="b")
        got["bounds"] = bounds
        got["result"] = secure_sum(grid, nodes, content("arrays"), SETTINGS, seed=3, stage="s",
                                   bounds=bounds, timeout=60.0)

    client = make_client_app()

    @client.query("partition")
    def partition(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"p": ConfigRecord({"id": pid})}), reply_to=msg)

    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1}})
    q = SETTINGS.quantization_for(3)
    result, bounds = got["result"], got["bounds"]
    assert len(result.contributors) == 3
    for name in ("vector", "matrix"):
        exact = sum(client_arrays(p)[name] for p in range(3))
        assert np.abs(result.arrays[name] - exact).max() <= sum_error_bound(bounds[name], 3, q)
