"""Secure sums over a Flower Grid with Flower's own SecAgg+ (flwr 1.39 `SecAggPlusWorkflow`).

Contract (the client half is client_app/secure_upload.py; the shared records are in
wire/protocol.py):
- `secure_sum(grid, nodes, content, settings, seed=, stage=, bounds=)` sums named float arrays
  from `nodes` (node id -> partition id) and returns only the sum (`SecureSum.arrays`), with the
  node ids whose arrays are in it (`contributors`) and what happened to the others (`dropped`).
  Every node receives `content` (e.g. the global model) in the masked-vector stage, plus the
  request record; its train handler answers with `secure_sum_reply`. No cryptography here: the
  adapter calls the workflow's four stage methods in turn (set-up, key sharing, masked vectors,
  unmasking) with the minimal legacy objects they need (a LegacyContext and a Strategy that
  hands out the nodes and receives the unmasked sum), and reads the workflow state between them.
- With `bounds` (public, per array name) clients scale into the clipping range and the sum comes
  back decoded (secure_encoding.decode; integer arrays exact); `secure_bounds` gets such bounds
  from a first, small secure sum of magnitude octaves. Without bounds the clients' arrays must be
  within +-clipping-range already and the sum is returned as it is.
- Flower's stochastic rounding is seeded per (seed, stage, partition) on each client, and the
  workflow's neighbour shuffle (Python's `random`) per (seed, stage, attempt), with both global
  RNGs restored afterwards: the same inputs give a bit-identical sum, also after a resume.
- Failures: a node lost during set-up or key sharing (nothing has been uploaded yet) restarts
  the sum without it, as long as `min_nodes` remain; one lost later is tolerated while each of
  its neighbourhoods keeps `reconstruction-threshold` members (Flower unmasks without it, or
  recovers its mask when it disappears after uploading). Fewer, settings that cannot work, and a
  client whose values exceed their bound raise `SecureAggregationError` with the nodes and reasons.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, log, parameters_to_ndarrays
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from feddifrc_core.secure_encoding import (
    SecAggSettings,
    bounds_from_octaves,
    check_integer_exact,
    decode,
)
from feddifrc_core.seeding import hashed_seed
from server_app.progress_wait import send_and_receive_with_progress
from wire.protocol import LAYOUT, MODE_BOUNDED, MODE_ENCODED, MODE_OCTAVES, REQUEST, request_record

STAGES = ("set-up", "key sharing", "masked vectors", "unmasking")


class SecureAggregationError(RuntimeError):
    """A secure sum could not be completed (too few nodes, settings, a client's bound)."""


@dataclass(frozen=True)
class SecureSum:
    arrays: dict[str, np.ndarray]  # the sum over `contributors` (decoded when bounds were given)
    contributors: list[int]  # node ids, sorted by partition
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    restarts: int = 0  # times the protocol restarted without nodes lost before any upload
    dtypes: dict[str, str] = field(default_factory=dict)  # each array's dtype on the clients


def secure_sum(grid: Grid, nodes: Mapping[int, int], content: RecordDict,
               settings: SecAggSettings, *, seed: int, stage: str,
               bounds: Mapping[str, float] | None = None, min_nodes: int = 2,
               timeout: float | None = None, progress: bool = False) -> SecureSum:
    """Securely sum the arrays that `nodes` (node id -> partition id) compute from `content`.

    `seed` and `stage` (unique per sum in a run, e.g. "round-3.model-update") fix the rounding;
    `timeout` is each stage's wait for replies (None waits for every node: pass the round
    timeout), counted from the stage's latest reply with `progress` (set-up stages: clients
    queued behind others keep it alive, server_app/progress_wait.py); fewer than `min_nodes`
    contributors, or a failed protocol, raise `SecureAggregationError`; settings that cannot
    work raise ValueError before any message.
    """
    mode = MODE_BOUNDED if bounds is not None else MODE_ENCODED
    return _run(grid, nodes, content, settings, seed, stage, mode, bounds, min_nodes,
                _Waiting(timeout, progress))


def secure_bounds(grid: Grid, nodes: Mapping[int, int], content: RecordDict,
                  settings: SecAggSettings, *, seed: int, stage: str, min_nodes: int = 2,
                  timeout: float | None = None,
                  progress: bool = False) -> tuple[dict[str, float], SecureSum]:
    """Public bounds for a following `secure_sum` of the same arrays: a secure sum of the
    clients' magnitude octaves (reveals how many clients have their largest value in each
    power-of-two band, per array). Valid for the contributors of this round and any subset."""
    result = _run(grid, nodes, content, settings, seed, stage, MODE_OCTAVES, None, min_nodes,
                  _Waiting(timeout, progress))
    return bounds_from_octaves(result.arrays, settings.clipping_range), result


def _run(grid: Grid, nodes: Mapping[int, int], content: RecordDict, settings: SecAggSettings,
         seed: int, stage: str, mode: str, bounds: Mapping[str, float] | None, min_nodes: int,
         waiting: _Waiting) -> SecureSum:
    # 1. settings against the sampled nodes; Q is fixed by the first attempt's node count
    if min_nodes < 2:
        raise ValueError(f"a secure sum needs min_nodes >= 2 (the sum of one client is its "
                         f"value), got {min_nodes}")
    settings.check(len(nodes))
    quantization = settings.quantization_for(len(nodes))
    remaining = dict(nodes)
    dropped: dict[int, str] = {}
    saved_random = random.getstate()
    try:
        for attempt in range(len(nodes)):
            # 2. one run of the protocol; the neighbour shuffle seeded per attempt
            random.seed(hashed_seed(seed, "secagg-neighbours", stage, attempt))
            recorder = _RecordingGrid(grid, waiting)
            strategy = _SumStrategy(sorted(remaining, key=remaining.__getitem__), grid)
            state, lost_at = _drive(recorder, strategy, remaining, content, settings,
                                    quantization, seed, stage, mode, bounds, waiting.timeout)
            lost = {n: f"{STAGES[i]}: {recorder.reason(n)}" for n, i in lost_at.items()}
            dropped.update(lost)
            _raise_on_bound_errors(recorder, remaining)
            early = {n for n, i in lost_at.items() if i <= 1}
            if early and len(remaining) - len(early) >= min_nodes:
                # 3. flwr 1.39 cannot finish a sum that lost a node before the masked vectors
                # (nobody holds its key shares): `_drive` stopped before anyone uploaded, so a
                # new attempt without it reveals nothing more than a sum over the rest.
                log(WARNING, "secure sum %s: restarting without nodes %s (lost before any "
                    "upload)", stage, sorted(early))
                remaining = {n: p for n, p in remaining.items() if n not in early}
                _check_restart(settings, remaining, min_nodes, stage, dropped)
                continue
            if strategy.results is None:
                raise SecureAggregationError(_failure(stage, nodes, remaining, state, dropped,
                                                      settings, min_nodes))
            return _result(strategy.results, remaining, settings, quantization, mode, bounds,
                           min_nodes, stage, dropped, attempt)
        raise SecureAggregationError(f"secure sum {stage}: no attempt completed")
    finally:
        random.setstate(saved_random)


def _drive(grid: _RecordingGrid, strategy: _SumStrategy, nodes: Mapping[int, int],
           content: RecordDict, settings: SecAggSettings, quantization: int, seed: int,
           stage: str, mode: str, bounds: Mapping[str, float] | None,
           timeout: float | None) -> tuple[WorkflowState, dict[int, int]]:
    """Flower's four stages in turn; (the workflow state, node -> index of the stage it was lost in)."""
    workflow = SecAggPlusWorkflow(
        settings.num_shares, settings.reconstruction_threshold,
        max_weight=1.0,  # clients report num_examples 1: the weights are inside the arrays
        clipping_range=settings.clipping_range, quantization_range=quantization,
        timeout=timeout)
    context = _legacy_context(stage, strategy)
    state = WorkflowState()
    active = set(nodes)
    lost_at: dict[int, int] = {}
    for index, step in enumerate((workflow.setup_stage, workflow.share_keys_stage,
                                  workflow.collect_masked_vectors_stage, workflow.unmask_stage)):
        if index == 2:  # the masked-vector stage carries the caller's content + our request
            state.nid_to_fitins = {n: _node_content(content, request_record(
                stage, mode, settings.clipping_range, _rounding_seed(seed, stage, p), bounds))
                for n, p in nodes.items() if n in state.nid_to_fitins}
        ok = step(cast(Grid, grid), context, state)
        lost_at.update({n: index for n in active - state.active_node_ids})
        active = set(state.active_node_ids)
        if not ok or (index <= 1 and lost_at):
            break  # a node lost before the masked vectors dooms this attempt: stop before uploads
    return state, lost_at


def _result(results: list[tuple[ClientProxy, FitRes]], nodes: Mapping[int, int],
            settings: SecAggSettings, quantization: int, mode: str,
            bounds: Mapping[str, float] | None, min_nodes: int, stage: str,
            dropped: dict[int, str], attempt: int) -> SecureSum:
    contributors = sorted((p.node_id for p, _ in results), key=lambda n: nodes[n])
    if len(contributors) < min_nodes:
        raise SecureAggregationError(
            f"secure sum {stage}: only {len(contributors)} clients contributed, fewer than "
            f"{min_nodes} (min nodes); lost: {_describe(dropped, nodes)}")
    layouts = {str(res.metrics.get(LAYOUT, "")) for _, res in results}
    if len(layouts) != 1:
        raise SecureAggregationError(f"secure sum {stage}: the clients sent different arrays "
                                     f"(layouts {sorted(layouts)[:2]})")
    layout = json.loads(layouts.pop())
    # Flower returns the mean over the contributors; the sum is what every caller needs.
    mean = parameters_to_ndarrays(results[0][1].parameters)
    sums = {name: np.asarray(m, dtype=np.float64).reshape(shape) * len(contributors)
            for (name, shape, _), m in zip(layout, mean, strict=True)}
    dtypes = {name: dtype for name, _, dtype in layout}
    if mode == MODE_BOUNDED:
        assert bounds is not None
        check_integer_exact(bounds, dtypes, len(nodes), quantization)
        sums = decode(sums, bounds, settings.clipping_range, dtypes)
    log(INFO, "secure sum %s: %d contributors, %d dropped, %d restarts", stage,
        len(contributors), len(dropped), attempt)
    return SecureSum(arrays=sums, contributors=contributors, dropped=dropped, restarts=attempt,
                     dtypes=dtypes)


def _rounding_seed(seed: int, stage: str, partition: int) -> int:
    return hashed_seed(seed, "secagg-rounding", stage, partition) % 2**32


def _node_content(content: RecordDict, request: ConfigRecord) -> RecordDict:
    # One RecordDict per node (the workflow adds each node's key shares to it); records shared.
    out = RecordDict(dict(content.items()))
    out[REQUEST] = request
    return out


def _legacy_context(stage: str, strategy: _SumStrategy) -> LegacyContext:
    """What the legacy workflow reads: a round id (our stage: it names the messages' group),
    empty parameters and the strategy that hands out the nodes."""
    manager = SimpleClientManager()
    for proxy in strategy.proxies:
        manager.register(proxy)
    state = RecordDict({"config": ConfigRecord({"current_round": stage}),
                        "parameters": ArrayRecord()})
    base = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    return LegacyContext(base, strategy=strategy, client_manager=manager)


class _SumStrategy(Strategy):
    """The two calls the workflow makes: which nodes (configure_fit), and the unmasked result."""

    def __init__(self, node_ids: list[int], grid: Grid) -> None:
        self.proxies = [GridClientProxy(n, grid, run_id=0) for n in node_ids]
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: Any) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = results  # each FitRes carries the unmasked aggregate
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any,
                           failures: Any) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass(frozen=True)
class _Waiting:
    timeout: float | None  # seconds per stage; None: until every node replied
    progress: bool = False  # counted from the stage's latest reply instead of its start


class _RecordingGrid:
    """The caller's grid, remembering why a node did not answer (its error, or no reply), and
    waiting as the caller asked (Flower's workflow passes its own timeout: ours, or None)."""

    def __init__(self, grid: Grid, waiting: _Waiting) -> None:
        self.grid = grid
        self.waiting = waiting
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.waiting.progress:
            limit = self.waiting.timeout if self.waiting.timeout is not None else float("inf")
            replies = send_and_receive_with_progress(self.grid, messages, limit)
        else:
            replies = list(self.grid.send_and_receive(messages, timeout=self.waiting.timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                lines = (reply.error.reason or "").strip().splitlines()
                self.errors[node] = lines[-1] if lines else f"error code {reply.error.code}"
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.errors[m.metadata.dst_node_id] = "no reply (timeout or node gone)"
        return replies

    def reason(self, node: int) -> str:
        return self.errors.get(node, "unknown")


def _raise_on_bound_errors(grid: _RecordingGrid, nodes: Mapping[int, int]) -> None:
    """A client whose values exceed their public bound is never silently left out of a sum."""
    bad = {n: r for n, r in grid.errors.items() if "ClippingError" in r}
    if bad:
        raise SecureAggregationError(
            "secure sum: values beyond their public bound (SecAgg+ would clip them silently): "
            + "; ".join(f"partition {nodes.get(n, '?')} (node {n}): {r}" for n, r in bad.items()))


def _check_restart(settings: SecAggSettings, remaining: Mapping[int, int], min_nodes: int,
                   stage: str, dropped: dict[int, str]) -> None:
    problems = settings.problems(len(remaining))
    if problems:
        raise SecureAggregationError(
            f"secure sum {stage}: after losing {_describe(dropped, remaining)}, "
            f"{len(remaining)} nodes remain and the settings no longer work: {'; '.join(problems)}")


def _failure(stage: str, nodes: Mapping[int, int], remaining: Mapping[int, int],
             state: WorkflowState, dropped: dict[int, str], settings: SecAggSettings,
             min_nodes: int) -> str:
    k, threshold, neighbourhood = settings.resolve(len(remaining))
    return (f"secure sum {stage} failed: {len(state.active_node_ids)} of {len(remaining)} "
            f"sampled clients still answering, a neighbourhood of {neighbourhood} needs "
            f"{threshold} (secagg-reconstruction-threshold) and at least {min_nodes} must remain; "
            f"lost: {_describe(dropped, nodes)}. The round cannot be completed; resume the run "
            "once the nodes are back, or lower secagg-reconstruction-threshold / min-train-nodes.")


def _describe(dropped: Mapping[int, str], nodes: Mapping[int, int]) -> str:
    return "; ".join(f"partition {nodes.get(n, '?')} (node {n}) in {r}"
                     for n, r in sorted(dropped.items())) or "none"
