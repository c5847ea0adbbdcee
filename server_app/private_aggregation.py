"""Differential privacy of the model updates with Flower's own DP strategy wrappers (flwr 1.39,
`flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`).

`with_privacy(aggregator, cfg)` is the one place the run's `differential-privacy` setting is read
on the server: it returns the aggregation component unchanged, or a `PrivateAggregator` around
it. The Flower wrapper wraps the component's round mean, not the algorithm's strategy:

    AlgorithmStrategy.configure_train -> PrivateAggregator.train_config -> wrapper.configure_train
        (server side: keeps the global model to clip against; client side: the clipping norm
        goes into the train config, where Flower's client mod reads it)
    AlgorithmStrategy.aggregate_train -> PrivateAggregator.combine_models -> wrapper.aggregate_train
        (clips each update (server side), counts the clipped ones (adaptive), takes the mean
        (`_Mean`: the inner component's, each client weighted 1), adds Gaussian noise)
        -> the algorithm's server step

So the noise is on the clients' mean before the algorithm's server step: FedAvgM's momentum, for
one, only ever sees noised means (post-processing), and checkpoints hold nothing un-noised.
Flower's arithmetic sees the model's floating arrays (`differential_privacy.split_private`), as
one ArrayRecord per client; the integer buffers stay the server's.

Differences from using the wrappers around a plain FedAvg, each for a reason:
- the mean is unweighted: the noise std z * C / m is calibrated to a client moving the mean of
  m updates by at most C / m, which example weights would break (Flower's accounted mode also
  requires equal weights);
- the noise is drawn from numpy's global RNG (Flower's `add_gaussian_noise_inplace`, the adaptive
  count's `np.random.normal`): it is seeded per (run seed, round) and restored around each mean,
  so a resumed run draws the same noise; the adaptive clipping norm is checkpointed;
- (epsilon, delta) is accounted per client from what the wrapper did in each round
  (`privacy_accounting.ReleaseLedger`, RDP with Google's dp-accounting) instead of with the
  wrapper's optional accountant, which the adaptive wrappers lack, which counts every round for
  every client and needs an inner `FedAvg.aggregate_train`;
- the set-up stages' statistics and the metrics are not covered (docs/privacy.md): a set-up sum
  is logged as such, and an algorithm's extra uploads beside the model are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from feddifrc_core import differential_privacy as dp
from feddifrc_core.aggregation import Rule, Upload
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.models import clamp_running_variances
from feddifrc_core.privacy_accounting import ReleaseLedger, release_multipliers
from feddifrc_core.seeding import hashed_seed, numpy_global_seed
from server_app.aggregator import Aggregator
from server_app.progress_wait import Wait
from wire import protocol

Wrapper = (DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping
           | DifferentialPrivacyServerSideAdaptiveClipping
           | DifferentialPrivacyClientSideAdaptiveClipping)


def with_privacy(aggregator: Aggregator, cfg: RunConfig) -> Aggregator:
    """`aggregator` with the run's differential privacy (unchanged when it is "none")."""
    return aggregator if cfg.differential_privacy == dp.NONE else PrivateAggregator(aggregator, cfg)


class PrivateAggregator(Aggregator):
    """An aggregation component whose round mean goes through Flower's DP wrapper."""

    def __init__(self, inner: Aggregator, cfg: RunConfig) -> None:
        self.inner, self.cfg = inner, cfg
        self.ledger = ReleaseLedger()
        self.clients_per_round = 0
        self._wrapper: Wrapper | None = None
        self._restored_norm: float | None = None  # an adaptive clipping norm from a checkpoint
        self._private_keys: list[str] = []  # the floating arrays of the global model, sorted
        self._model_keys: list[str] = []  # all its arrays, in its order
        self._public: dict[str, np.ndarray] = {}  # its integer buffers: kept, never from clients
        self._warned_setup = False

    # --- the contract ----------------------------------------------------------------------------
    def prepare(self, clients_per_round: int) -> None:
        """Build Flower's wrapper for `clients_per_round` clients per round; its own checks
        (e.g. the adaptive count's noise against z) fail here, before any set-up work."""
        self.inner.prepare(clients_per_round)
        self.clients_per_round = clients_per_round
        self._wrapper = _flower_wrapper(self.cfg, _Mean(self.inner), clients_per_round)
        if self._restored_norm is not None:
            self._wrapper.clipping_norm = self._restored_norm
        if self.cfg.dp_noise_multiplier == 0:
            log(WARNING, "differential-privacy %r with dp-noise-multiplier = 0: updates are "
                "clipped but not noised, there is no (epsilon, delta) guarantee",
                self.cfg.differential_privacy)

    def train_config(self, server_round: int, model: ArrayRecord, grid: Grid) -> dict[str, Any]:
        current = protocol.from_record(model)
        private, self._public = dp.split_private(current)
        self._private_keys, self._model_keys = list(private), list(current)
        config = ConfigRecord(self.inner.train_config(server_round, model, grid))
        # The wrapper keeps the model to clip against, or writes the clipping norm into `config`;
        # the messages are the strategy's own, so its inner strategy makes none.
        list(self.wrapper.configure_train(server_round, protocol.to_record(private), config, grid))
        return dict(config)

    def exchange(self, grid: Grid, messages: Iterable[Message], wait: Wait) -> list[Message]:
        return self.inner.exchange(grid, messages, wait)

    def contributors(self, uploads: Sequence[Upload]) -> list[int]:
        return self.inner.contributors(uploads)

    def combine(self, uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
        if rule == "mean":  # only an algorithm's extra uploads beside the model come here
            raise ValueError(
                f"the algorithm uploads arrays beside the model ({sorted(uploads[0].arrays)}), "
                "which differential privacy does not cover: run it with "
                "differential-privacy = \"none\"")
        if not self._warned_setup:
            self._warned_setup = True
            log(WARNING, "differential privacy covers the model updates only: the set-up "
                "stages' sums (here %s) reach the server without clipping or noise",
                sorted(uploads[0].arrays)[:4])
        return self.inner.combine(uploads, rule)

    def combine_models(self, server_round: int, uploads: Sequence[Upload]
                       ) -> dict[str, np.ndarray]:
        """The noised, unweighted mean of the clipped updates (Flower's wrapper), its BatchNorm
        variances kept >= 0, then the global model's integer buffers."""
        replies = [_reply_view(u, self._private_keys) for u in uploads]
        # (with secure aggregation, one upload stands for the sum's contributors)
        partitions = self.inner.contributors(uploads)
        if len(replies) == 1 and len(partitions) > 1:
            # Flower's wrapper expects one reply per client (else it warns of a DP risk): the one
            # view, once per contributor; `_Mean` takes it as it is.
            replies = replies * len(partitions)
        wrapper, clipped_to = self.wrapper, self.wrapper.clipping_norm
        # Flower draws the noise from numpy's global RNG: the same per (seed, round) on resume.
        with numpy_global_seed(hashed_seed(self.cfg.seed, "dp-noise", server_round)):
            arrays, _ = wrapper.aggregate_train(server_round, replies)
        if arrays is None:
            raise RuntimeError(f"round {server_round}: Flower's DP wrapper returned no aggregate")
        # What this mean is worth, from what the wrapper did (its adaptive norm has moved on).
        count_stddev = getattr(wrapper, "clipped_count_stddev", None)
        self.ledger.record(partitions, release_multipliers(
            wrapper.noise_multiplier, clipped_to, wrapper.clipping_norm, self.clients_per_round,
            len(partitions), count_stddev))
        # A variance is never negative, but the noise pushes small ones below 0, and one negative
        # variance makes every output NaN; clamping is post-processing: DP is kept.
        mean = {**clamp_running_variances(protocol.from_record(arrays)), **self._public}
        return {k: mean[k] for k in self._model_keys}

    def metrics(self) -> dict[str, Any]:
        """(epsilon, delta) so far (epsilon left out without noise: it is infinite), the busiest
        client's number of noised means, and the clipping norm the next round uses."""
        out: dict[str, Any] = {dp.DELTA: self.cfg.dp_delta, dp.RELEASES: self.ledger.busiest(),
                               dp.CLIPPING_NORM: float(self.wrapper.clipping_norm)}
        epsilon = self.ledger.epsilon(self.cfg.dp_delta)
        if math.isfinite(epsilon):
            out[dp.EPSILON] = epsilon
        return {**self.inner.metrics(), **out}

    def state(self) -> dict[str, np.ndarray]:
        own = {"dp.clipping-norm": np.asarray([self.wrapper.clipping_norm], dtype=np.float64),
               **{f"dp.{k}": v for k, v in self.ledger.to_arrays().items()}}
        return {**self.inner.state(), **own}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state({k: v for k, v in arrays.items() if not k.startswith("dp.")})
        mine = {k[3:]: v for k, v in arrays.items() if k.startswith("dp.")}
        self.ledger = ReleaseLedger.from_arrays(mine)
        if "clipping-norm" in mine:
            self._restored_norm = float(np.asarray(mine["clipping-norm"]).reshape(-1)[0])

    # --- helpers ---------------------------------------------------------------------------------
    @property
    def wrapper(self) -> Wrapper:
        if self._wrapper is None:
            raise RuntimeError("PrivateAggregator.prepare must run before the first round")
        return self._wrapper


class _Mean(Strategy):
    """What Flower's wrapper wraps: the inner component's mean of the clients' models, each
    weighted 1. The round's messages are AlgorithmStrategy's; Flower's configure step only adds
    its config."""

    def __init__(self, inner: Aggregator) -> None:
        super().__init__()
        self.inner = inner

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if len({id(m) for m in replies}) == 1:  # a secure sum's mean, once per contributor
            replies = replies[:1]
        uploads = [Upload(i, protocol.from_record(m.content.array_records[protocol.ARRAYS]), 1.0)
                   for i, m in enumerate(replies)]
        return protocol.to_record(self.inner.combine(uploads, "mean")), None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # central evaluation only (fraction-evaluate 0)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        """Nothing to add to the wrapper's summary."""


def _flower_wrapper(cfg: RunConfig, mean: _Mean, clients_per_round: int) -> Wrapper:
    """The run's wrapper around `mean`; Flower's refusals become ConfigErrors naming the keys."""
    z, c, mode = cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.differential_privacy
    try:
        if mode in dp.ADAPTIVE:
            cls = (DifferentialPrivacyClientSideAdaptiveClipping if mode in dp.CLIENT_SIDE
                   else DifferentialPrivacyServerSideAdaptiveClipping)
            return cls(mean, z, clients_per_round, initial_clipping_norm=c,
                       target_clipped_quantile=cfg.dp_target_clipped_quantile,
                       clip_norm_lr=cfg.dp_clip_norm_lr,
                       clipped_count_stddev=cfg.dp_clipped_count_stddev or None)
        fixed = (DifferentialPrivacyClientSideFixedClipping if mode in dp.CLIENT_SIDE
                 else DifferentialPrivacyServerSideFixedClipping)
        return fixed(mean, z, c, clients_per_round)
    except ValueError as err:
        default = (f" (0: Flower's default, clients per round / 20 = {clients_per_round / 20:g})"
                   if cfg.dp_clipped_count_stddev == 0 else "")
        raise ConfigError(
            f"differential-privacy {mode!r} with {clients_per_round} clients per round refuses "
            f"dp-noise-multiplier={z!r}, dp-clipping-norm={c!r}, "
            f"dp-clipped-count-stddev={cfg.dp_clipped_count_stddev!r}{default}: {err}") from None


def _reply_view(upload: Upload, private_keys: list[str]) -> Message:
    """A client's reply as Flower's wrapper reads it: one ArrayRecord (the model's floating
    arrays, sorted as the global model's) and one MetricRecord (the adaptive mods' norm bit)."""
    missing = [k for k in private_keys if k not in upload.arrays]
    if missing:
        raise ValueError(f"partition {upload.partition} sent a model without {missing[:3]}")
    arrays = {k: np.asarray(upload.arrays[k]) for k in private_keys}
    metrics = {k: v for k, v in upload.metrics.items() if isinstance(v, (int, float))}
    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays),
                          protocol.METRICS: MetricRecord(cast(dict[str, Any], metrics))})
    return Message(content, dst_node_id=upload.partition, message_type=protocol.TRAIN)
