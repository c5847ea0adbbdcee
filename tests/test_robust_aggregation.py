"""Robust aggregation: the settings and their checks, Flower's rules behind the aggregation
component on hand-made updates, and one attacking client against FedAvg and the robust rules in
a real (in-process) federation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from client_app.app import make_client_app
from feddifrc_core.aggregation import Upload, combine
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.divergence import DivergedError
from feddifrc_core.robust_aggregation import AGGREGATORS, aggregator_problem, replies_needed
from server_app.aggregator import Aggregator, RobustAggregator, make_aggregator
from server_app.app import run_server
from tests.attacks import sign_flip_attack
from tests.loopback_grid import LoopbackGrid
from tests.micro_config import micro_run_config

FLOWER_RULES = {"fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
                "bulyan": Bulyan}


# --- settings ------------------------------------------------------------------------------------
def test_default_is_fedavg_and_every_rule_runs_with_enough_clients():
    assert RunConfig().aggregator == "fedavg"
    for name in AGGREGATORS:
        f = 0 if name == "fedavg" else 1
        cfg = RunConfig().replace(aggregator=name, num_malicious_nodes=f, min_train_nodes=7,
                                  min_available_nodes=7)
        assert (cfg.aggregator, cfg.num_malicious_nodes) == (name, f)


@pytest.mark.parametrize(("changes", "message"), [
    ({"aggregator": "median"},
     r"'aggregator' must be one of \['fedavg', 'fedmedian', 'fedtrimmedavg', 'krum', 'bulyan'\], "
     r"got 'median'"),
    ({"trimmed_avg_beta": 0.5}, r"'trimmed-avg-beta' must be < 0.5, got 0.5"),
    ({"num_malicious_nodes": -1}, r"'num-malicious-nodes' must be >= 0, got -1"),
    ({"aggregator": "krum", "num_malicious_nodes": 1},
     r"'min-train-nodes' must be >= 5 for aggregator='krum' .*num-malicious-nodes=1.*got 2"),
    ({"aggregator": "bulyan", "num_malicious_nodes": 1, "min_train_nodes": 6,
      "min_available_nodes": 6},
     r"'min-train-nodes' must be >= 7 for aggregator='bulyan'.*got 6"),
    ({"aggregator": "bulyan"}, r"'min-train-nodes' must be >= 3 for aggregator='bulyan'.*got 2"),
    ({"aggregator": "fedmedian", "num_malicious_nodes": 1},
     r"'min-train-nodes' must be >= 3 for aggregator='fedmedian'.*got 2"),
    ({"aggregator": "fedtrimmedavg", "num_malicious_nodes": 1, "min_train_nodes": 4,
      "min_available_nodes": 4},
     r"'min-train-nodes' must be >= 5 for aggregator='fedtrimmedavg'.*got 4"),
    ({"aggregator": "fedtrimmedavg", "num_malicious_nodes": 1, "trimmed_avg_beta": 0.0},
     r"'num-malicious-nodes' must be 0 for aggregator='fedtrimmedavg' with trimmed-avg-beta=0.0"),
    ({"num_malicious_nodes": 1},
     r"'num-malicious-nodes' must be 0 for aggregator='fedavg', which tolerates no attacker, "
     r"got 1"),
])
def test_settings_that_cannot_defend_are_refused_before_the_run(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().replace(**changes)


def test_a_robust_rule_with_secure_aggregation_is_a_configuration_error():
    """Secure aggregation shows the server only the sum; a robust rule needs each update. (The
    run config passes its `secure-aggregation` value here once that key exists.)"""
    problem = aggregator_problem("fedmedian", 0, 0.2, 5, secure_aggregation="secaggplus")
    assert problem is not None
    assert "'aggregator' must be 'fedavg' with secure-aggregation='secaggplus'" in problem
    assert "got 'fedmedian'" in problem
    assert aggregator_problem("fedavg", 0, 0.2, 5, secure_aggregation="secaggplus") is None
    assert aggregator_problem("krum", 1, 0.2, 5, secure_aggregation="none") is None


@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3, 0.45])
def test_replies_needed_is_where_flowers_trimmed_mean_starts_to_hold(beta, f):
    """With `replies_needed` replies, f huge values leave Flower's trimmed mean among the honest
    values; with one reply fewer they do not."""
    n = replies_needed("fedtrimmedavg", f, beta)
    assert n is not None

    def trimmed(total: int) -> float:
        honest = np.arange(total - f, dtype=np.float64)
        return float(trim_mean(np.concatenate([honest, np.full(f, 1e9)])[:, None], beta)[0])

    assert trimmed(n) <= n - f - 1
    assert trimmed(n - 1) > 1e6


@pytest.mark.parametrize("f", [1, 2, 3])
def test_replies_needed_is_where_the_median_starts_to_hold(f):
    n = replies_needed("fedmedian", f, 0.0)
    assert n == 2 * f + 1

    def median(total: int) -> float:
        honest = np.arange(total - f, dtype=np.float64)
        return float(np.median(np.concatenate([honest, np.full(f, 1e9)])))

    assert median(n) <= n - f - 1 and median(n - 1) > 1e6


# --- the component, on hand-made updates --------------------------------------------------------
def _uploads(honest: list[int], weights: list[float]) -> list[Upload]:
    """One upload per value v: w = (v, 10 v) float32 and a 0-d counter v + 5 (int64, like
    BatchNorm's); then the attacker: w = (100, -1000), counter 1000, claiming 5000 examples."""
    out = [Upload(p, {"w": np.array([v, 10 * v], np.float32), "n": np.array(v + 5, np.int64)}, wt)
           for p, (v, wt) in enumerate(zip(honest, weights, strict=True))]
    attacker = {"w": np.array([100, -1000], np.float32), "n": np.array(1000, np.int64)}
    return [*out, Upload(len(out), attacker, 5000.0)]


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[int]:
    """Count the calls of Flower's own `cls.aggregate_train` (and let it work)."""
    calls: list[int] = []
    original: Callable[..., Any] = cls.aggregate_train

    def spy(self: Any, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        calls.append(len(replies))
        return original(self, server_round, replies)

    monkeypatch.setattr(cls, "aggregate_train", spy)
    return calls


@pytest.mark.parametrize(("name", "f", "honest", "w", "n"), [
    # per coordinate, the median of [1, 2, 3, 5, 100] and [10, 20, 30, 50, -1000]
    ("fedmedian", 1, [1, 2, 3, 5], [3, 20], 8),
    # beta 0.2 of 5 cuts one per tail: mean(2, 3, 5), mean(10, 20, 30), mean(7, 8, 10) -> 8
    ("fedtrimmedavg", 1, [1, 2, 3, 5], [10 / 3, 20], 8),
    # score = sum of the n - f - 2 = 2 smallest squared distances (x 102): 5, 2, 5, 13 and the
    # attacker's; the lowest is the client at 2, taken whole
    ("krum", 1, [1, 2, 3, 5], [2, 20], 7),
    # n = 7, f = 1: Multi-Krum keeps the 5 lowest scores (2: 30, 5: 35, 1: 43, 6: 46, 0: 66;
    # 8: 98, the attacker: huge); their median is 2; the mean of the 3 values closest to it
    # (2, 1, 0) is 1; the counter: mean(7, 6, 5) = 6. Neither the median (5) nor a mean.
    ("bulyan", 1, [0, 1, 2, 5, 6, 8], [1, 10], 6),
])
def test_each_rule_is_flowers_and_ignores_the_attacker(monkeypatch, name, f, honest, w, n):
    calls = _spy(monkeypatch, FLOWER_RULES[name])
    cfg = RunConfig().replace(aggregator=name, num_malicious_nodes=f, min_train_nodes=len(honest) + 1,
                              min_available_nodes=len(honest) + 1)
    aggregator = make_aggregator(cfg)
    uploads = _uploads(honest, [10.0 * (k + 1) for k in range(len(honest))])

    out = aggregator.combine(uploads, "mean")

    assert calls == [len(uploads)]  # Flower's strategy did the work, on every upload
    assert list(out) == ["w", "n"]
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and out["n"].shape == ()
    np.testing.assert_allclose(out["w"], np.array(w, np.float32), rtol=1e-6)
    assert int(out["n"]) == n
    # The plain weighted mean follows the attacker (and its claimed 5000 examples) instead.
    assert combine(uploads, "mean")["w"][0] > 90


def test_rules_equal_flowers_legacy_functions_bit_for_bit():
    """The Message-API strategies behind the component against Flower's other implementation of
    the same rules (flwr.server.strategy.aggregate), on random float32 updates."""
    rng = np.random.default_rng(5)
    uploads = [Upload(p, {"a": rng.normal(size=(4, 3)).astype(np.float32),
                          "b": rng.normal(size=7).astype(np.float32)}, float(rng.integers(1, 50)))
               for p in range(7)]
    legacy_input = [([u.arrays["a"], u.arrays["b"]], int(u.weight)) for u in uploads]
    expected = {
        "fedmedian": aggregate_median(legacy_input),
        "fedtrimmedavg": aggregate_trimmed_avg(legacy_input, 0.2),
        "krum": aggregate_krum(legacy_input, num_malicious=2, to_keep=0),
    }
    for name, want in expected.items():
        cfg = RunConfig().replace(aggregator=name, num_malicious_nodes=1, min_train_nodes=7,
                                  min_available_nodes=7)
        cfg = cfg.replace(num_malicious_nodes=2) if name == "krum" else cfg
        got = make_aggregator(cfg).combine(uploads, "mean")
        for key, value in zip(("a", "b"), want, strict=True):
            np.testing.assert_array_equal(got[key], value.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "bulyan"])
def test_sums_stay_exact_sums_under_a_robust_rule(name):
    """Set-up statistics (rule "sum") are sufficient statistics: bit-identical to the plain sum."""
    rng = np.random.default_rng(1)
    uploads = [Upload(p, {"count": np.array([rng.integers(1, 9)], np.int64),
                          "sum": rng.normal(size=5), "outer": rng.normal(size=(5, 5))}, 1.0)
               for p in range(3)]
    cfg = RunConfig().replace(aggregator=name, min_train_nodes=3, min_available_nodes=3)
    got = make_aggregator(cfg).combine(uploads, "sum")
    want = Aggregator().combine(uploads, "sum")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key])


def test_make_aggregator_builds_flowers_strategy_with_the_run_configs_parameters():
    assert type(make_aggregator(RunConfig())) is Aggregator
    base = RunConfig().replace(min_train_nodes=11, min_available_nodes=11)
    trimmed = make_aggregator(base.replace(aggregator="fedtrimmedavg", trimmed_avg_beta=0.3))
    assert isinstance(trimmed, RobustAggregator) and isinstance(trimmed.strategy, FedTrimmedAvg)
    assert trimmed.strategy.beta == 0.3
    for name in ("krum", "bulyan"):
        made = make_aggregator(base.replace(aggregator=name, num_malicious_nodes=2))
        assert isinstance(made, RobustAggregator)
        assert type(made.strategy) is FLOWER_RULES[name]
        assert made.strategy.num_malicious_nodes == 2  # type: ignore[attr-defined]


# --- one attacking client in a real federation ------------------------------------------------------
def _attacked_run(tmp_path: Path, aggregator: str) -> tuple[list[float], bool]:
    """5 clients of digits, all in every round; partition 0 uploads 10x its update, sign-flipped.
    Returns the test accuracy after each round (round 0 = the initial model) and whether the
    model turned NaN (the ServerApp then stops the run: `DivergedError`)."""
    f = 0 if aggregator == "fedavg" else 1
    cfg = micro_run_config(
        tmp_path / aggregator, aggregator=aggregator, num_malicious_nodes=f, num_rounds=4,
        min_train_nodes=5, min_available_nodes=5, train_samples=0, test_samples=0,
        model_width=8, local_epochs=3, lr=0.02)
    app = make_client_app(mods=[sign_flip_attack(partition=0, scale=10.0)])
    try:
        run_server(LoopbackGrid(app, 5, cfg.to_flower()), cfg)
        diverged = False
    except DivergedError:
        diverged = True
    lines = (tmp_path / aggregator / "runs/run/metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(r["failures"] == 0 for r in rows[1:])  # the attacker is a working client
    return [r["test-accuracy"] for r in rows], diverged


@pytest.mark.slow
def test_one_attacker_collapses_fedavg_while_median_and_trimmed_mean_hold(tmp_path):
    fedavg, fedavg_diverged = _attacked_run(tmp_path, "fedavg")
    # Ten classes: chance is 0.1. FedAvg is driven uphill until its model turns NaN, never
    # leaving chance before (clean FedAvg reaches about 0.7 on this budget).
    assert fedavg_diverged and max(fedavg[1:]) < 0.15, fedavg
    for rule in ("fedmedian", "fedtrimmedavg"):
        curve, diverged = _attacked_run(tmp_path, rule)
        assert not diverged and len(curve) == 5, (rule, curve)  # rounds 0-4
        assert curve[-1] > 0.35, (rule, curve)
