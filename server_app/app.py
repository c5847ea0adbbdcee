"""ServerApp: rounds of FedDifRC (or a baseline), central evaluation, run folder, exact resume."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from logging import INFO
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from feddifrc_core import checkpoint as ckpt
from feddifrc_core import divergence
from feddifrc_core.algorithms import Algorithm
from feddifrc_core.config import RESUMABLE_KEYS, RunConfig
from feddifrc_core.evaluation import CentralEvaluator
from feddifrc_core.models import model_state
from feddifrc_core.progress import format_seconds, route_core_logs
from feddifrc_core.reporting import RunFolder, default_run_name, format_summary, summarize
from feddifrc_core.run_setup import set_torch_threads
from feddifrc_core.warm_start import initial_state
from server_app.aggregator import Aggregator, make_aggregator
from server_app.failures import report_expected_failures_in_one_line
from server_app.private_aggregation import with_privacy
from server_app.ray_workers import exit_with_parent, replace_dead_ray_workers
from server_app.run_lock import RunFolderLock
from server_app.secure_aggregator import SecureAggregator
from server_app.strategy import AlgorithmStrategy
from wire import protocol

# Old checkpoints are pruned to bound disk use (ResNet-10: ~20 MB each); resume needs only the last.
KEEP_CHECKPOINTS = 3


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is `context.run_config` updated with `overrides`.

    `flwr run` fills run_config from pyproject + `--run-config`; `flwr.simulation.run_simulation`
    leaves it empty, so tests pass their settings as `overrides`.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # a bad setting, a busy run folder or a diverged round ends the run with one log line
        report_expected_failures_in_one_line()
        route_core_logs(FLOWER_LOGGER.handlers)  # the algorithms' set-up lines, in the run's log
        cfg = RunConfig.from_flower({**context.run_config, **(overrides or {})})
        replace_dead_ray_workers()  # simulation: a killed ClientApp worker costs one round only
        exit_with_parent()  # simulation: no orphaned run when the launching processes die
        run_server(grid, cfg)

    return app


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """The whole run on the server side; returns the summary. Raises when a round fails.

    The run folder is locked for the whole run (a second writer is refused at once); a run that
    fails before its first round completes removes the folder it created (no empty folders remain).
    """
    started = time.time()
    set_torch_threads(cfg.torch_threads)
    if cfg.resume and not cfg.run_name:
        raise ValueError("resume=true needs the run-name of the run to continue (run-name=\"...\")")
    run_name = cfg.run_name or default_run_name(cfg)
    lock = RunFolderLock(cfg.resolved_output_dir() / run_name).acquire()
    try:
        summary = _run(grid, cfg, run_name, started)
    except BaseException:
        # Nothing worth keeping before round 1: the round-0 checkpoint is the seeded initial model.
        initial = ckpt.checkpoint_path(lock.folder / "checkpoints", 0)
        set_up_failed = lock.created and all(
            p == initial for p in lock.folder.glob("checkpoints/round-*.safetensors"))
        if set_up_failed:
            log(INFO, "removing the run folder %s: the run failed during set-up", lock.folder)
        lock.release(remove_folder=set_up_failed)
        raise
    lock.release()
    return summary


def _run(grid: Grid, cfg: RunConfig, run_name: str, started: float) -> dict[str, Any]:
    # 1. run folder, and the last complete checkpoint when resuming
    folder = RunFolder.open(cfg, run_name)
    # the newest checkpoint that verifies and whose model is finite (older versions of this
    # server could checkpoint a diverged aggregate)
    resumed = ckpt.latest_checkpoint(folder.checkpoints, skip=_diverged) if cfg.resume else None
    if cfg.resume and resumed is None:
        raise RuntimeError(f"resume=true but no checkpoint in {folder.checkpoints} verifies; "
                           "start a new run (resume=false, another run-name)")
    folder.write_config(cfg, run_name, {"resumed-from-round": resumed.round if resumed else None})
    log(INFO, "run folder %s (continue it after a crash with -c \"run-name='%s' resume=true\")",
        folder.path, run_name)

    # 2. test data, the global model (seeded initialisation) and the algorithm's server half;
    # both restored when resuming
    evaluator = CentralEvaluator(cfg)
    # seeded initialisation, or init-model's warm start (trained once, then read from the
    # cache): the same for every algorithm
    state, how = ((model_state(evaluator.model), "from the checkpoint") if resumed
                  else initial_state(cfg, evaluator.model, device=evaluator.device))
    log(INFO, "initial model: %s", how)
    algorithm = cfg.new_algorithm()
    # Every upload of every stage is combined by this one component: plain or robust
    # (`aggregator`), or Flower's SecAgg+ (`secure-aggregation`; the config refuses a robust rule
    # with it), with differential privacy's wrapper around it (`differential-privacy`).
    aggregator = with_privacy(SecureAggregator(cfg) if cfg.secure_aggregation == "secaggplus"
                              else make_aggregator(cfg), cfg)
    # Names the clients' per-run files (MOON's previous models): a new run that reuses a run-name
    # gets a fresh key, a resumed run keeps its own ("" = checkpoints from before the key existed).
    run_key = str(resumed.meta.get("run-key", "")) if resumed else secrets.token_hex(6)
    if resumed is not None:
        _check_same_run(cfg, resumed.meta["run-config"])
        state = resumed.group("model")
        algorithm.load_server_state(resumed.group("strategy"))
        aggregator.load_state(resumed.group("aggregator"))
        ckpt.restore_rng_state(resumed.meta["rng"], resumed.group("rng"))
        folder.restore(resumed.meta["history"])
        log(INFO, "resuming %s after round %d", run_name, resumed.round)
    first_round = resumed.round + 1 if resumed else 1
    header = protocol.Header(cfg.digest(), run_name, run_key, tuple(evaluator.test.class_names))
    strategy = AlgorithmStrategy(cfg, algorithm, header, aggregator)

    # 3. set-up over Flower messages: which node holds which partition; the algorithm's stages
    strategy.discover_nodes(grid)
    strategy.setup(grid, cast(int, evaluator.model.feature_dim))  # every project model has one
    if resumed is None:
        row0 = {"round": 0, **evaluator(state)}
        divergence.check_metrics(row0, "round 0 (the initial model)",
                                 divergence.advice(0, cfg.lr))
        folder.log_round(row0)
        _save(folder, cfg, run_name, run_key, 0, state, algorithm, aggregator)

    # 4. rounds: train on the sampled clients, aggregate, evaluate centrally, checkpoint
    rounds_started = time.time()
    for server_round in range(first_round, cfg.num_rounds + 1):
        t0 = time.time()
        messages = strategy.configure_train(
            server_round, protocol.to_record(state), ConfigRecord(), grid)
        replies = aggregator.exchange(grid, messages, strategy.round_wait)
        arrays, client_metrics = strategy.aggregate_train(server_round, replies)
        if arrays is None or client_metrics is None:  # aggregate_train raises before this
            raise RuntimeError(f"round {server_round}: no aggregate")
        # the strategy checked the aggregate for NaN/inf (DivergedError); its metrics below
        state = protocol.from_record(arrays)
        row: dict[str, Any] = {"round": server_round, **_prefixed(dict(client_metrics)),
                               **aggregator.metrics()}  # with DP: (epsilon, delta) so far
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds:
            row.update(evaluator(state))
        divergence.check_metrics(row, f"round {server_round}",
                                 divergence.advice(server_round, cfg.lr))
        report = strategy.last_report
        row.update({"clients": " ".join(map(str, report.succeeded)),
                    "failures": len(report.failures), "round-seconds": time.time() - t0})
        folder.log_round(row)
        _save(folder, cfg, run_name, run_key, server_round, state, algorithm, aggregator)
        # ETA from this process's rounds so far (a resumed run does not count the earlier ones)
        per_round = (time.time() - rounds_started) / (server_round - first_round + 1)
        log(INFO, "round %d/%d: %s; ETA %s", server_round, cfg.num_rounds, _short(row),
            format_seconds(per_round * (cfg.num_rounds - server_round)))

    # 5. final model and summary
    summary = summarize(folder.rows, time.time() - started)
    summary["run-name"] = run_name
    folder.write_final(state, summary)
    print(format_summary(summary, folder.path), flush=True)
    return summary


def _save(folder: RunFolder, cfg: RunConfig, run_name: str, run_key: str, server_round: int,
          state: Mapping[str, np.ndarray], algorithm: Algorithm, aggregator: Aggregator) -> None:
    rng_meta, rng_arrays = ckpt.capture_rng_state()
    # "strategy.": the algorithm's server state (FedDifRC's bases; the name of earlier checkpoints)
    arrays = {**{f"model.{k}": v for k, v in state.items()},
              **{f"strategy.{k}": v for k, v in algorithm.server_state().items()},
              **{f"aggregator.{k}": v for k, v in aggregator.state().items()},
              **{f"rng.{k}": v for k, v in rng_arrays.items()}}
    meta = {"round": server_round, "run-name": run_name, "run-key": run_key,
            "run-config": cfg.to_flower(),
            "rng": rng_meta, "history": folder.rows}
    ckpt.save_checkpoint(ckpt.checkpoint_path(folder.checkpoints, server_round), arrays, meta)
    ckpt.prune_checkpoints(folder.checkpoints, KEEP_CHECKPOINTS)


def _diverged(checkpoint: ckpt.Checkpoint) -> str | None:
    bad = divergence.nonfinite_arrays(checkpoint.group("model"))
    return f"its model holds NaN or inf in {len(bad)} arrays" if bad else None


def _check_same_run(cfg: RunConfig, saved: Mapping[str, Any]) -> None:
    """A resumed run may change only bookkeeping keys; anything else would not be the same run.
    A key that a checkpoint lacks was added later: the run had its default then."""
    now, defaults = cfg.to_flower(), RunConfig().to_flower()
    changed = sorted(k for k in now if k not in RESUMABLE_KEYS
                     and saved.get(k, defaults[k]) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"resume: the run config differs from the checkpoint's ({detail}); "
                         "resume with the same settings or start a new run-name")


def _prefixed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Client metrics as reported (train-loss, train-accuracy, ...), counts renamed for clarity."""
    return {("train-examples" if k == "num-examples" else k): v for k, v in metrics.items()}


def _short(row: Mapping[str, Any]) -> str:
    keys = ("test-accuracy", "val-accuracy", "test-knn-accuracy", "test-loss", "train-loss",
            "dp-epsilon", "failures", "round-seconds")
    return ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                     for k in keys if k in row)


app = make_server_app()
