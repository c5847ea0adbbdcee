"""Differential privacy of the model updates: Flower's wrappers and mods on the project's rounds.

Unit tests check that the aggregation component and the client mod clip and noise as Flower's
arithmetic says (hand computations), seeded per round; the accountant against Flower's own;
the settings. End to end: every mode through the real apps, a resumed run, a Ray simulation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from client_app.dp_clipping import CLIPPING_MODS, clip_reply
from feddifrc_core import differential_privacy as dp
from feddifrc_core.aggregation import Upload
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.privacy_accounting import (
    ReleaseLedger,
    composed_epsilon,
    release_multipliers,
)
from server_app.aggregator import Aggregator
from server_app.private_aggregation import PrivateAggregator, with_privacy
from tests.loopback_grid import run_loopback, straight_and_resumed
from tests.micro_config import micro_run_config
from wire import protocol

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32),
          "bn.num_batches_tracked": np.array(7, np.int64)}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as in a ServerApp


def config(mode: str, **changes) -> RunConfig:
    return RunConfig().replace(differential_privacy=mode, **changes)


def local_model(update: float, steps: int) -> dict[str, np.ndarray]:
    """The global model moved by `update` in every float entry; `steps` local batches."""
    return {"w": np.full((4, 3), update, np.float32), "b": np.full(3, update, np.float32),
            "bn.num_batches_tracked": np.array(7 + steps, np.int64)}


def component(mode: str, clients: int, **changes) -> PrivateAggregator:
    agg = with_privacy(Aggregator(), config(mode, **changes))
    assert isinstance(agg, PrivateAggregator)
    agg.prepare(clients)
    return agg


def one_round(agg: Aggregator, uploads: list[Upload], server_round: int = 1
              ) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    entries = agg.train_config(server_round, protocol.to_record(GLOBAL), grid=None)  # type: ignore[arg-type]
    return entries, agg.combine_models(server_round, uploads)


# --- the server's component: Flower's wrappers ----------------------------------------------------
def test_server_side_clipping_without_noise_is_the_unweighted_mean_of_clipped_updates():
    # Update norms: sqrt(15) * u; clipped to C = 1 by Flower's flat clip, u * min(1, C / norm).
    agg = component(dp.SERVER_FIXED, 3, dp_noise_multiplier=0.0, dp_clipping_norm=1.0)
    updates, weights = [0.1, 1.0, -2.0], [10.0, 500.0, 3.0]
    uploads = [Upload(p, local_model(u, steps=50), w) for p, (u, w) in
               enumerate(zip(updates, weights, strict=True))]
    entries, mean = one_round(agg, uploads)
    assert entries == {}  # server-side: nothing travels to the clients
    clipped = [u * min(1.0, 1.0 / (math.sqrt(15) * abs(u))) for u in updates]
    expected = np.mean(clipped)  # unweighted: example counts would break the noise calibration
    np.testing.assert_allclose(mean["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(mean["b"], expected, rtol=1e-6)
    # The step counters are no client's: the global model keeps its own, and they do not enter
    # the norm (flwr would count 50 steps into it and scale the weights by 1/50).
    assert mean["bn.num_batches_tracked"] == 7 and list(mean) == list(GLOBAL)
    assert agg.metrics()[dp.RELEASES] == 1 and dp.EPSILON not in agg.metrics()  # z = 0: no epsilon


def test_the_noise_has_flowers_std_and_is_seeded_per_round():
    z, c, m = 2.0, 0.5, 4
    big = {"w": np.zeros(200_000, np.float32)}
    uploads = [Upload(p, big, 1.0) for p in range(m)]

    def noised(server_round: int, rng_seed: int) -> np.ndarray:
        agg = component(dp.CLIENT_FIXED, m, dp_noise_multiplier=z, dp_clipping_norm=c)
        agg.train_config(server_round, protocol.to_record(big), grid=None)  # type: ignore[arg-type]
        np.random.seed(rng_seed)  # whatever else used numpy's global RNG before
        before = np.random.get_state()[1].copy()
        out = agg.combine_models(server_round, uploads)["w"]
        assert np.array_equal(np.random.get_state()[1], before)  # the global RNG is given back
        return out

    first = noised(1, rng_seed=0)
    assert float(first.std()) == pytest.approx(z * c / m, rel=0.01)  # compute_stdv: z C / m
    assert abs(float(first.mean())) < 0.01
    np.testing.assert_array_equal(first, noised(1, rng_seed=123))  # per (seed, round) only
    assert not np.array_equal(first, noised(2, rng_seed=0))


def test_a_negative_batchnorm_variance_from_the_noise_is_clamped():
    """At z = 1 the noise (std 0.1 here) pushed the benchmark's small running variances below 0,
    and every test output became NaN; the noised mean's variances are clamped at 0
    (post-processing: DP is kept), and nothing else moves."""
    state = {"bn.running_var": np.full(1000, 0.01, np.float32), "w": np.zeros(1000, np.float32)}

    def noised(clamp: bool) -> dict[str, np.ndarray]:
        agg = component(dp.CLIENT_FIXED, 10, dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
        agg.train_config(1, protocol.to_record(state), grid=None)  # type: ignore[arg-type]
        if not clamp:  # the same noise without the clamp
            with patch("server_app.private_aggregation.clamp_running_variances", dict):
                return agg.combine_models(1, [Upload(p, state, 1.0) for p in range(10)])
        return agg.combine_models(1, [Upload(p, state, 1.0) for p in range(10)])

    raw, clamped = noised(clamp=False), noised(clamp=True)
    assert float(raw["bn.running_var"].min()) < 0 and float(clamped["bn.running_var"].min()) == 0
    np.testing.assert_array_equal(clamped["w"], raw["w"])
    positive = raw["bn.running_var"] > 0
    np.testing.assert_array_equal(clamped["bn.running_var"][positive],
                                  raw["bn.running_var"][positive])


def test_client_side_modes_send_the_clipping_norm_and_only_add_noise():
    agg = component(dp.CLIENT_FIXED, 2, dp_noise_multiplier=0.0, dp_clipping_norm=0.7)
    uploads = [Upload(0, local_model(5.0, 1), 1.0), Upload(1, local_model(-1.0, 1), 9.0)]
    entries, mean = one_round(agg, uploads)
    assert entries == {"clipping_norm": 0.7}  # Flower's KEY_CLIPPING_NORM, read by its client mod
    np.testing.assert_allclose(mean["w"], 2.0)  # the clients clip: the server only averages


def test_adaptive_clipping_follows_flowers_geometric_update_and_is_checkpointed():
    # All updates above C, no noise: the clipped fraction is 1 and C *= exp(-lr (1 - q)).
    agg = component(dp.SERVER_ADAPTIVE, 2, dp_noise_multiplier=0.0, dp_clipping_norm=0.2,
                    dp_clip_norm_lr=0.2, dp_target_clipped_quantile=0.5)
    uploads = [Upload(p, local_model(1.0, 1), 1.0) for p in range(2)]
    one_round(agg, uploads)
    expected = 0.2 * math.exp(-0.2 * (1.0 - 0.5))
    assert agg.metrics()[dp.CLIPPING_NORM] == pytest.approx(expected, rel=1e-12)

    # Accounted as Flower ran it: no update noise, a count without noise: no guarantee.
    assert agg.ledger.releases[0] == [(0.0, 0.0)] and dp.EPSILON not in agg.metrics()

    resumed = with_privacy(Aggregator(), agg.cfg)
    resumed.load_state(agg.state())
    resumed.prepare(2)
    assert resumed.metrics() == agg.metrics()


def test_adaptive_clipping_is_accounted_as_flower_runs_it():
    """z = 1 split by Flower into the update's z_u = (1 - (2 sigma_b)^-2)^-1/2 and the count's
    sigma_b = 1, as if the count had sensitivity 1/2. The 0/1 bits have sensitivity 1, and the
    noise follows the norm after its update: the round is worth less than z = 1."""
    agg = component(dp.SERVER_ADAPTIVE, 2, dp_noise_multiplier=1.0, dp_clipping_norm=0.2,
                    dp_clipped_count_stddev=1.0)
    z_u = (1.0 - 0.25) ** -0.5
    assert agg.wrapper.noise_multiplier == pytest.approx(z_u)  # Flower's split
    one_round(agg, [Upload(p, local_model(1.0, 1), 1.0) for p in range(2)])
    next_norm = agg.metrics()[dp.CLIPPING_NORM]
    assert agg.ledger.releases[0] == [(pytest.approx(z_u * next_norm / 0.2), 1.0)]
    assert agg.metrics()[dp.EPSILON] == pytest.approx(
        composed_epsilon([z_u * next_norm / 0.2, 1.0], 1e-5))
    assert agg.metrics()[dp.EPSILON] > composed_epsilon([1.0], 1e-5)  # what z = 1 would claim


def test_client_adaptive_clipping_reads_the_norm_bits_of_the_replies():
    agg = component(dp.CLIENT_ADAPTIVE, 2, dp_noise_multiplier=0.0, dp_clipping_norm=0.2)
    uploads = [Upload(p, local_model(0.01, 1), 1.0, {"num-examples": 1, "norm_bit": 0})
               for p in range(2)]
    entries, _ = one_round(agg, uploads)
    assert entries == {"clipping_norm": 0.2}
    assert agg.metrics()[dp.CLIPPING_NORM] == pytest.approx(0.2 * math.exp(0.2 * 0.5))
    with pytest.raises(AggregationError, match="norm_bit"):  # a client without Flower's mod
        one_round(agg, [Upload(p, local_model(0.01, 1), 1.0) for p in range(2)], 2)


def test_extra_uploads_are_refused_and_set_up_sums_pass_unchanged():
    agg = component(dp.SERVER_FIXED, 2)
    with pytest.raises(ValueError, match="does not cover"):
        agg.combine([Upload(0, {"control": np.ones(2)}, 1.0)], "mean")
    sums = agg.combine([Upload(p, {"count": np.array([3])}, 1.0) for p in range(2)], "sum")
    assert sums["count"][0] == 6


# --- the client mod: Flower's fixedclipping_mod / adaptiveclipping_mod ------------------------------
def train_message(config_entries: dict) -> Message:
    content = protocol.train_content(protocol.Header("digest"), 1, protocol.to_record(GLOBAL),
                                     {"bases": np.ones((2, 2))}, config_entries)
    return protocol.addressed(content, [5], protocol.TRAIN)[0]


def handler(update: float, steps: int):
    def train(msg: Message, context: Context) -> Message:
        assert protocol.PAYLOAD in msg.content.array_records  # the handler sees everything
        return protocol.reply(msg, local_model(update, steps), {"num-examples": 30})
    return train


@pytest.mark.parametrize("mode", sorted(CLIPPING_MODS))
def test_the_client_mod_clips_the_model_and_keeps_the_rest(mode):
    msg = train_message({"clipping_norm": 1.0})
    reply = clip_reply(CLIPPING_MODS[mode], msg, Context(1, 5, {}, RecordDict(), {}),
                       handler(2.0, steps=40))
    arrays = protocol.from_record(reply.content.array_records[protocol.ARRAYS])
    assert list(arrays) == list(GLOBAL)
    norm = math.sqrt(sum(float(np.sum(arrays[k].astype(np.float64) ** 2)) for k in ("w", "b")))
    assert norm == pytest.approx(1.0, rel=1e-6)  # 2 * sqrt(15) clipped to 1
    np.testing.assert_allclose(arrays["w"], 1 / math.sqrt(15), rtol=1e-6)
    assert arrays["bn.num_batches_tracked"] == 7  # the global model's counter, not the local 47
    metrics = protocol.read_metrics(reply)
    assert metrics["num-examples"] == 30
    assert ("norm_bit" in metrics) == (mode == dp.CLIENT_ADAPTIVE)


def test_the_client_mod_refuses_a_train_message_without_a_clipping_norm():
    msg = train_message({})
    reply = clip_reply(CLIPPING_MODS[dp.CLIENT_FIXED], msg, Context(1, 5, {}, RecordDict(), {}),
                       handler(2.0, steps=1))
    assert reply.has_error() and "clipping_norm" in reply.error.reason
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


# --- accounting ------------------------------------------------------------------------------------
def test_the_ledger_reports_the_busiest_client_as_flowers_accountant_would():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    ledger = ReleaseLedger()
    ledger.record([0, 1], (1.0,))
    ledger.record([1, 2], (1.0,))
    ledger.record([1, 2], release_multipliers(1.0, 0.5, 0.5, sampled=4, replied=2))  # z m'/m
    assert ledger.releases[2] == [(1.0,), (0.5,)] and ledger.busiest() == 3
    flower = RdpAccountant(PrivacyConfig(
        target_delta=1e-5, population_size=3,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for z in (1.0, 1.0, 0.5):  # client 1's releases
        flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=2, population_size=3))
    assert ledger.epsilon(1e-5) == pytest.approx(flower.get_epsilon(1e-5), rel=1e-12)
    assert ReleaseLedger.from_arrays(ledger.to_arrays()) == ledger
    assert composed_epsilon([1.0, 0.0], 1e-5) == math.inf


# --- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,match",
    [
        ({"differential-privacy": "local"}, "'differential-privacy' must be one of \\['none'"),
        ({"dp-noise-multiplier": -0.1}, "'dp-noise-multiplier' must be >= 0.0, got -0.1"),
        ({"dp-noise-multiplier": "1"}, "'dp-noise-multiplier' expects a number, got '1'"),
        ({"dp-clipping-norm": 0.0}, "'dp-clipping-norm' must be > 0.0, got 0.0"),
        ({"dp-target-clipped-quantile": 1.5}, "'dp-target-clipped-quantile' must be <= 1.0"),
        ({"differential-privacy": "client-fixed-clipping", "dp-delta": 1.0},
         "'dp-delta' must be < 1, got 1.0"),
        ({"differential-privacy": "server-adaptive-clipping", "dp-noise-multiplier": 1.0,
          "dp-clipped-count-stddev": 0.5},
         "'dp-noise-multiplier' must be < 2 \\* 'dp-clipped-count-stddev' \\(1\\) .* got 1.0"),
        ({"differential-privacy": "server-fixed-clipping", "aggregator": "fedmedian"},
         "noises the clients' mean and cannot be combined with aggregator='fedmedian'"),
        ({"differential-privacy": "server-fixed-clipping", "secure-aggregation": "secaggplus"},
         "server-side clipping needs each client's update\\): use differential-privacy="
         "'client-fixed-clipping'"),
        ({"differential-privacy": "client-adaptive-clipping", "secure-aggregation": "secaggplus"},
         "adaptive clipping reads each client's clipped bit in clear"),
    ],
)
def test_bad_settings_name_key_expected_and_received(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower(changes)


def test_a_setting_flower_refuses_for_this_federation_fails_before_the_set_up(tmp_path):
    """Adaptive clipping at z = 1 with Flower's default count noise (5 clients / 20 = 0.25):
    Flower refuses; the run stops after node discovery, before any set-up or training."""
    cfg = micro_run_config(tmp_path, differential_privacy=dp.CLIENT_ADAPTIVE,
                           dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match=r"dp-clipped-count-stddev=0.0 \(0: Flower's default, "
                                          r"clients per round / 20 = 0.25\)"):
        run_loopback(cfg, 5)
    assert not (tmp_path / "runs/run").exists()


# --- end to end ------------------------------------------------------------------------------------
def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", dp.MODES[1:])
def test_every_mode_runs_through_the_real_apps_and_reports_epsilon(tmp_path, mode):
    cfg = micro_run_config(tmp_path, num_rounds=2, fraction_train=0.67, algorithm="fedavgm",
                           differential_privacy=mode, dp_noise_multiplier=0.8,
                           dp_clipping_norm=0.5, dp_clipped_count_stddev=1.0)
    summary = run_loopback(cfg, 3)
    history = rows(tmp_path / "runs/run")
    assert [r["round"] for r in history] == [0, 1, 2] and summary["client-failures"] == 0
    # Every round's (epsilon, delta) so far; the busiest of 3 clients (2 per round) is in both.
    assert history[2][dp.RELEASES] == 2 and history[2][dp.EPSILON] > history[1][dp.EPSILON]
    nominal = composed_epsilon([0.8, 0.8], 1e-5)  # two Gaussians of z = 0.8
    if mode in dp.ADAPTIVE:  # the clipped count costs more than Flower's split assumes
        assert history[2][dp.EPSILON] > nominal
    else:
        assert history[2][dp.EPSILON] == pytest.approx(nominal)
    assert summary[dp.EPSILON] == history[2][dp.EPSILON] and summary[dp.DELTA] == 1e-5
    assert ("norm_bit" in history[1]) == (mode == dp.CLIENT_ADAPTIVE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [dp.SERVER_ADAPTIVE, dp.CLIENT_FIXED])
def test_a_resumed_dp_run_ends_bit_identical(tmp_path, mode):
    """Killed after the clients of round 2 replied, resumed from round 1: the noise (seeded per
    round), the adaptive clipping norm and the ledger (checkpointed) give the same final model
    and the same (epsilon, delta) as a straight run. FedAvgM: its momentum sees noised means."""
    cfg = micro_run_config(tmp_path, num_rounds=3, fraction_train=0.67, algorithm="fedavgm",
                           differential_privacy=mode, dp_noise_multiplier=0.8,
                           dp_clipping_norm=0.5, dp_clipped_count_stddev=1.0)
    straight_dir, resumed_dir = straight_and_resumed(cfg, 3)

    straight = load_file(str(straight_dir / "final_model.safetensors"))
    resumed = load_file(str(resumed_dir / "final_model.safetensors"))
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    keys = (dp.EPSILON, dp.RELEASES, dp.CLIPPING_NORM, "test-accuracy")
    assert ([{k: r.get(k) for k in keys} for r in rows(straight_dir)]
            == [{k: r.get(k) for k in keys} for r in rows(resumed_dir)])


@pytest.mark.slow
def test_client_side_clipping_in_flowers_ray_simulation(tmp_path):
    """Flower's own engine: the mod runs in Ray's ClientApp workers, on train messages that
    carry the algorithm's payload record beside the model."""
    from flwr.simulation import run_simulation

    from client_app.app import make_client_app
    from server_app.app import make_server_app

    cfg = micro_run_config(tmp_path, num_rounds=2, algorithm="fedavg",
                           differential_privacy=dp.CLIENT_ADAPTIVE, dp_noise_multiplier=0.5,
                           dp_clipping_norm=0.5, dp_clipped_count_stddev=1.0)
    run_simulation(server_app=make_server_app(cfg.to_flower()),
                   client_app=make_client_app(cfg.to_flower()), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1}})
    summary = json.loads((tmp_path / "runs/run/summary.json").read_text())
    assert summary["rounds"] == 2 and summary["client-failures"] == 0
    assert summary[dp.RELEASES] == 2 and summary[dp.EPSILON] > 0
    assert summary[dp.CLIPPING_NORM] != 0.5  # Flower's adaptive update moved it
    assert "norm_bit" in rows(tmp_path / "runs/run")[1]
