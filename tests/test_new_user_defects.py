"""The defects a new user hit (issue 14): run-folder lock, early and single errors, set-up failures,
failure counting, CSV columns, TLS hint, accelerate. Real processes where the item is about one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from feddifrc_core.config import RunConfig
from server_app.run_lock import RunFolderBusyError, RunFolderLock

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_simulation.py"


# --- 2. one writer per run folder -----------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_until_the_holder_dies(tmp_path):
    folder = tmp_path / "runs" / "dup"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from server_app.run_lock import RunFolderLock; RunFolderLock(__import__('pathlib')"
         ".Path(sys.argv[2])).acquire(); print('locked', flush=True); time.sleep(600)",
         str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusyError, match=rf"in use by another run \(PID {holder.pid} "
                                                      rf"on host {os.uname().nodename}"):
            RunFolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS drops a dead holder's lock
        holder.wait()
    lock = RunFolderLock(folder).acquire()
    lock.release()


def test_run_server_takes_the_lock_before_any_work(tmp_path):
    from server_app.app import run_server

    cfg = RunConfig(output_dir=str(tmp_path), run_name="busy", dataset="digits", model="small-cnn")
    with RunFolderLock(tmp_path / "busy"):
        with pytest.raises(RunFolderBusyError, match=f"PID {os.getpid()}"):
            run_server(grid=None, cfg=cfg)  # refused before the grid is ever used
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]


# --- 5. errors that come late, repeat or never come ------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("num-rounds = 2", "without spaces around '='"),
    ("conf/fmnist-offline", "did you mean the file conf/fmnist-offline.toml"),
    ("num-rounds=2 junk", "expected key=value pairs"),
])
def test_malformed_run_config_text_is_an_error_naming_it(text, expected, monkeypatch):
    from scripts.run_config import merge_run_config

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=rf"cannot read -c '{text}'.*{expected}"):
        merge_run_config([text])


def test_a_malformed_toml_file_is_named(tmp_path):
    from scripts.run_config import merge_run_config

    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = \n")
    with pytest.raises(SystemExit, match=rf"run-config file {bad} is not valid TOML: .*line 1"):
        merge_run_config([str(bad)])


@pytest.mark.parametrize("args, expected", [
    (["-c", "num-rounds='abc'"], r"'num-rounds' expects an integer, got 'abc'"),
    (["-c", "lr=-1"], r"'lr' must be > 0.0, got -1"),
    (["-c", "fraction-train=2"], r"'fraction-train' must be <= 1.0, got 2"),
    (["--supernodes", "1"], r"--supernodes 1 is below min-available-nodes \(2\)"),
])
def test_the_run_script_refuses_bad_settings_before_starting(tmp_path, args, expected):
    home = tmp_path / "flwr-home"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "FLWR_HOME": str(home)}, timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - started < 15  # no SuperLink, no 15 s start
    assert proc.stderr.count("ERROR") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert __import__("re").search(expected, proc.stderr), proc.stderr
    assert not home.exists()  # nothing was started or written


def _reply(to: Message, node: int, error: str | None = None, *, src: int | None = None) -> Message:
    """A reply as the grid delivers it (error replies of a vanished node come from node 1)."""
    if error is not None:
        reply = Message(Error(code=0, reason=error), reply_to=to)
    else:
        reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = node if src is None else src
    return reply


def _sent(nodes: list[int]) -> list[Message]:
    from flwr.supercore.task_identity import TaskIdentity

    from wire import protocol

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as in a run
    messages = protocol.addressed(RecordDict({"c": ConfigRecord({})}), nodes, protocol.TRAIN)
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    return messages


def test_a_vanished_node_counts_once_and_errors_shared_by_clients_are_reported_once():
    from server_app.replies import RoundFailedError, describe_failures, require

    partitions = {101: 0, 102: 1, 103: 2, 104: 3}
    sent = _sent([101, 102, 103, 104])
    # Node 101 is gone: the SuperLink (node 1) answers for it. The others raise the same error.
    replies = [_reply(sent[0], 101, "Message unavailable: node is offline", src=1),
               *[_reply(m, n, "ValueError: num_clients=4 is more than the 3 samples")
                 for m, n in zip(sent[1:], [102, 103, 104], strict=True)]]
    failures = describe_failures(replies, sent, partitions, "round-timeout (3600 s)")
    assert failures == ["partition 0 (node 101): Message unavailable: node is offline",
                        *[f"partition {p} (node {n}): ValueError: num_clients=4 is more than the "
                          "3 samples" for p, n in ((1, 102), (2, 103), (3, 104))]]
    with pytest.raises(RoundFailedError) as err:
        require("projection set-up", 0, 4, 2, failures)
    text = str(err.value)
    assert text.count("num_clients=4") == 1 and "3 clients (partitions 1, 2, 3)" in text


def test_a_run_that_fails_during_set_up_leaves_no_run_folder(tmp_path):
    from server_app.replies import RoundFailedError
    from tests.loopback_grid import run_loopback

    cfg = RunConfig(seed=3, num_rounds=1, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                    output_dir=str(tmp_path / "runs"), torch_threads=1, device="cpu",
                    dataset="digits", train_samples=3, test_samples=20, partition="iid",
                    model="small-cnn", model_width=4, algorithm="fedavg",
                    cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RoundFailedError, match=r"4 clients \(partitions 0, 1, 2, 3\): .*num_clients"):
        run_loopback(cfg, 4)  # 4 clients for 3 samples
    assert list((tmp_path / "runs").iterdir()) == []


def test_the_run_script_says_when_the_log_holds_no_error():
    from scripts.run_simulation import failure_hint

    assert "in the log above" in failure_hint(["INFO: x", "ERROR: RoundFailedError: round 1"])
    assert "ended without reporting one" in failure_hint(["INFO: round 1: test-accuracy=0.1"])


def test_the_deploy_cli_says_tls_is_expected_without_a_root_certificate(tmp_path):
    from scripts.deploy.deploy import Deployment, tls_hint

    (tmp_path / "config.toml").write_text(
        '[superlink.feddifrc-deployment]\naddress = "127.0.0.1:9093"\n')
    dep = Deployment(state_dir=str(tmp_path), flwr_home=str(tmp_path), num_nodes=2, secure=True,
                     hosts="loopback", isolation="subprocess", fleet_address="127.0.0.1:9092",
                     control_address="127.0.0.1:9093", certs_dir=str(tmp_path / "certs"))
    hint = tls_hint(dep)
    assert "expects TLS" in hint and "no root-certificates" in hint and "ca.crt" in hint
    assert tls_hint(Deployment(**{**dep.__dict__, "secure": False})) == ""


# --- 6. smaller defects ---------------------------------------------------------------------------
def test_metrics_csv_columns_do_not_change_after_a_resume(tmp_path):
    from feddifrc_core.reporting import RunFolder

    cfg = RunConfig(output_dir=str(tmp_path), run_name="r")
    folder = RunFolder.open(cfg, "r")
    folder.log_round({"round": 0, "test-accuracy": 0.1, "test-loss": 2.0})
    folder.log_round({"round": 1, "train-loss": 1.0, "test-accuracy": 0.2, "failures": 0})
    header = folder.metrics_csv.read_text().splitlines()[0]
    history = json.loads(json.dumps(folder.rows, sort_keys=True))  # as a checkpoint returns it
    folder.close()
    resumed = RunFolder(path=folder.path)
    resumed.restore(history)
    assert resumed.metrics_csv.read_text().splitlines()[0] == header
    resumed.close()


def test_accelerate_is_installed_for_diffusers():
    from diffusers.utils import is_accelerate_available

    assert is_accelerate_available()
