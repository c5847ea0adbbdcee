"""Cache and checkpoint safety with real processes: SIGKILL mid-write, concurrent writers sharing
one cache folder, a full disk (RLIMIT_FSIZE), read-only / not-a-folder paths; and the run-level
reliability items of issue 25 (sections 6-13): diverged training, identical model files, a
read-only run folder, the run script's early refusal, one-line failures, set-up waits, Ray on
loopback, reaped ClientApps.

Child processes import this module (tests/ on sys.path) so that parent and children build the
same caches and the same expected data.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from feddifrc_core import checkpoint as ckpt
from feddifrc_core.feature_cache import FeatureCache, FeatureCacheError
from tests.micro_config import micro_run_config
from tests.sockets import is_loopback

ROOT = Path(__file__).resolve().parents[1]
# 32 rows x 64 x 128 fp16 = 512 KiB per chunk: a write takes long enough to be hit by a kill.
SPEC = {"block1": ((64, 128), "float16"), "prompt_ids": ((3,), "int64")}
ROWS, CHUNK = 320, 32


def make_cache(root: str | Path, client: int) -> FeatureCache:
    """Client `client`'s cache; equal `client` = equal fingerprint = the same folder."""
    fingerprint = {"model": "tiny", "timestep": 300, "client": client}
    return FeatureCache(root, f"client-{client}", fingerprint, ROWS, CHUNK, SPEC)


def rows(client: int, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Deterministic content of rows [start, stop) of `client` (already fp16-exact)."""
    gen = torch.Generator().manual_seed(1000 * client + start)
    return {
        "block1": torch.randn(stop - start, 64, 128, generator=gen).half(),
        "prompt_ids": torch.arange(start, stop)[:, None].repeat(1, 3) + client,
    }


def expected(client: int) -> dict[str, torch.Tensor]:
    parts = [rows(client, s, min(s + CHUNK, ROWS)) for s in range(0, ROWS, CHUNK)]
    return {name: torch.cat([p[name] for p in parts]) for name in SPEC}


def fill(cache: FeatureCache, client: int, order: list[int] | None = None) -> None:
    """Open (resume) and write every missing chunk, in `order` if given."""
    missing = cache.open()
    for index in order if order is not None else missing:
        if index in cache.missing_chunks():
            cache.write_chunk(index, rows(client, *cache.chunk_range(index)))


def assert_cache_matches(root: Path, client: int) -> None:
    cache = make_cache(root, client)
    assert cache.open() == []
    data = cache.load()
    for name, value in expected(client).items():
        assert torch.equal(data[name], value), name


def child(code: str) -> subprocess.Popen:
    """A Python child that runs `code` with this module importable."""
    prelude = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import torch; torch.set_num_threads(1)\n"
        "from test_reliability import *\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child never printed {prefix!r}: {proc.communicate()[1][-2000:]}")


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# --- 1. a kill at any point leaves a usable state -------------------------------------------------
@pytest.mark.parametrize("target", ["chunk-00002.safetensors", "manifest.json"])
def test_feature_cache_sigkill_inside_a_write_resumes_cleanly(tmp_path, target):
    """The child is frozen right before the rename of a fully written temp file (chunk data or
    the manifest recording chunk 2) and SIGKILLed there: chunks 0-1 stay, 2 is redone."""
    proc = child(f"""
        import os, time
        real_replace = os.replace
        def frozen_replace(src, dst):
            target = {target!r}
            if str(dst).endswith(target) and (target != "manifest.json"
                                              or '"2": {{' in open(src).read()):
                print("FROZEN", src, flush=True)
                time.sleep(600)
            real_replace(src, dst)
        os.replace = frozen_replace
        cache = make_cache({str(tmp_path)!r}, 0)
        fill(cache, 0)
    """)
    wait_for_line(proc, "FROZEN")
    sigkill(proc)
    cache = make_cache(tmp_path, 0)
    assert list(cache.dir.glob(".*.tmp")), "the killed writer's temp file should be there"
    assert cache.open() == list(range(2, ROWS // CHUNK))  # 0 and 1 verified, 2 not recorded
    fill(cache, 0)
    assert_cache_matches(tmp_path, 0)


def test_feature_cache_survives_sigkill_at_random_moments(tmp_path):
    """Kill a writer at random moments, resume each time; the end result is exact."""
    rng = random.Random(0)
    for _ in range(2):
        proc = child(f"""
            cache = make_cache({str(tmp_path)!r}, 1)
            print("START", cache.open(), flush=True)
            fill(cache, 1)
        """)
        wait_for_line(proc, "START")
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # a fast child may finish before the random moment comes: killed or done, both are fine
        assert proc.returncode in (0, -signal.SIGKILL), proc.communicate()[1][-2000:]
    cache = make_cache(tmp_path, 1)
    fill(cache, 1)  # resumes at whatever is missing; corrupt pieces would be logged and redone
    assert_cache_matches(tmp_path, 1)


def test_checkpoint_survives_sigkill_while_saving(tmp_path):
    """A child saves 4 MiB checkpoints round after round; killed inside an fsync (frozen) and then
    at a random moment, the newest checkpoint that verifies is complete and exact."""
    code = f"""
        import os, time
        import numpy as np
        from feddifrc_core import checkpoint as ckpt
        real_fsync = os.fsync
        r = 0
        def frozen_fsync(fd):
            if r == FREEZE:
                print("FROZEN", r, flush=True)
                time.sleep(600)
            real_fsync(fd)
        os.fsync = frozen_fsync
        start = len(ckpt.list_checkpoints({str(tmp_path)!r}))
        for r in range(start + 1, 10_000):
            arrays = {{"model.w": np.full((1024, 1024), r, dtype=np.float32)}}
            ckpt.save_checkpoint(ckpt.checkpoint_path({str(tmp_path)!r}, r), arrays, {{"round": r}})
            ckpt.prune_checkpoints({str(tmp_path)!r}, keep=2)
            print("SAVED", r, flush=True)
    """
    proc = child(code.replace("FREEZE", "3"))
    wait_for_line(proc, "FROZEN")
    sigkill(proc)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.round == 2
    (leftover,) = tmp_path.glob(".round-0003.*.tmp")  # the unfinished write, never renamed

    proc = child(code.replace("FREEZE", "-1"))
    wait_for_line(proc, "SAVED")
    time.sleep(random.Random(1).uniform(0.0, 0.5))
    sigkill(proc)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.round >= 3
    assert np.all(latest.arrays["model.w"] == latest.round)
    for path in ckpt.list_checkpoints(tmp_path):  # every file under its final name verifies
        ckpt.load_checkpoint(path)
    assert not leftover.exists()  # removed by the next writer's pruning


# --- 2. concurrent writers sharing one cache folder -----------------------------------------------
@pytest.mark.slow
def test_concurrent_processes_share_a_cache_folder_without_corruption(tmp_path):
    """Two processes fill the SAME cache (same fingerprint) in opposite orders while a third
    fills another client's cache in the same root; all start together."""
    go = tmp_path / "go"
    plan = [(0, "up"), (0, "down"), (1, "up")]
    procs = [
        child(f"""
            import time
            from pathlib import Path
            cache = make_cache({str(tmp_path / "root")!r}, {client})
            cache.open()
            order = list(range(cache.num_chunks))
            if {direction!r} == "down":
                order.reverse()
            print("READY", flush=True)
            while not Path({str(go)!r}).exists():
                time.sleep(0.01)
            fill(cache, {client}, order)
            print("DONE", cache.missing_chunks(), flush=True)
        """)
        for client, direction in plan
    ]
    for proc in procs:
        wait_for_line(proc, "READY")
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "DONE []" in out, err[-2000:]
        assert "WARNING" not in err, err[-2000:]  # no corruption was detected and repaired
    for client in (0, 1):
        assert_cache_matches(tmp_path / "root", client)
        manifest = json.loads(
            (make_cache(tmp_path / "root", client).dir / "manifest.json").read_text()
        )
        assert manifest["complete"] and len(manifest["chunks"]) == ROWS // CHUNK
    assert not list((tmp_path / "root").glob("*/.*.tmp"))


# --- 3. disk full and permission errors -----------------------------------------------------------
def test_disk_full_in_a_real_process_is_reported_and_leaves_no_debris(tmp_path):
    """RLIMIT_FSIZE makes writes past 256 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    proc = child(f"""
        import errno, resource, signal
        import numpy as np
        from feddifrc_core import checkpoint as ckpt
        cache = make_cache({str(tmp_path / "cache")!r}, 0)
        cache.open()
        ckpt.save_checkpoint(ckpt.checkpoint_path({str(tmp_path / "ckpt")!r}, 1),
                             {{"w": np.zeros(10)}}, {{"round": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        for what, write in (
            ("CACHE", lambda: cache.write_chunk(0, rows(0, 0, 32))),
            ("CKPT", lambda: ckpt.save_checkpoint(
                ckpt.checkpoint_path({str(tmp_path / "ckpt")!r}, 2),
                {{"w": np.zeros(10**6)}}, {{"round": 2}})),
        ):
            try:
                write()
                print(what, "no error", flush=True)
            except OSError as err:
                print(what, err.errno, str(err).replace(chr(10), " "), flush=True)
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    cache_line = next(line for line in out.splitlines() if line.startswith("CACHE"))
    ckpt_line = next(line for line in out.splitlines() if line.startswith("CKPT"))
    cache = make_cache(tmp_path / "cache", 0)
    assert (
        f" {errno.EFBIG} " in cache_line
        and str(cache.dir / "chunk-00000.safetensors") in cache_line
    )
    assert "free disk space" in cache_line and "cache-dir" in cache_line
    assert f"{tmp_path / 'ckpt'}" in ckpt_line and "free disk space" in ckpt_line
    # nothing half-written is left or recorded; the previous checkpoint is intact
    assert not list(cache.dir.glob(".*.tmp")) and not list((tmp_path / "ckpt").glob(".*.tmp"))
    assert cache.open() == list(range(ROWS // CHUNK))
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").round == 1


def test_no_space_left_names_the_path_and_the_fix(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, 0)
    cache.open()
    cache.write_chunk(0, rows(0, 0, CHUNK))

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(FeatureCacheError, match="No space left on device") as info:
        cache.write_chunk(1, rows(0, CHUNK, 2 * CHUNK))
    assert info.value.errno == errno.ENOSPC and str(cache.dir / "chunk-00001") in str(info.value)
    assert "free disk space, or point cache-dir" in str(info.value)
    with pytest.raises(
        OSError, match=r"could not write .*round-0001.*No space left.*free disk space"
    ):
        ckpt.save_checkpoint(
            ckpt.checkpoint_path(tmp_path / "ckpt", 1), {"w": np.zeros(3)}, {"round": 1}
        )
    monkeypatch.undo()
    assert not list(tmp_path.rglob(".*.tmp"))
    assert make_cache(tmp_path, 0).open() == list(range(1, ROWS // CHUNK))  # chunk 0 kept


def test_cache_dir_under_a_file_is_a_clear_error(tmp_path):
    # Tests run as root, where chmod does not stop writes: a file in place of a folder does.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(FeatureCacheError, match="is a file, not a folder: point cache-dir") as info:
        make_cache(blocker / "cache", 0).open()
    assert str(blocker / "cache") in str(info.value)


def test_read_only_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    cache = make_cache(tmp_path, 0)
    cache.open()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # what a read-only folder does to a user
    with pytest.raises(FeatureCacheError, match="Permission denied") as info:
        cache.write_chunk(0, rows(0, 0, CHUNK))
    assert f"make {cache.dir} writable" in str(info.value) and "FEDDIFRC_CACHE_DIR" in str(
        info.value
    )


# --- 4. scale smoke: many clients in one process keep bounded state -------------------------------
@pytest.mark.slow
def test_twenty_clients_one_round_keep_per_process_state_bounded(tmp_path):
    """20 clients through the real ServerApp/ClientApp in one process (the in-process grid;
    FedDifRC with 10-100 clients on Ray is benchmarks/scale.py): client sessions are memoised
    with a bound, so a process's memory does not grow with the number of clients it serves."""
    from feddifrc_core.client_session import ClientSession
    from tests.loopback_grid import run_loopback

    cfg = micro_run_config(tmp_path, fraction_train=0.5, min_train_nodes=10,
                           min_available_nodes=20, train_samples=240, test_samples=50)
    ClientSession._sessions.clear()
    summary = run_loopback(cfg, 20)
    assert summary["rounds"] == 1
    rows = [json.loads(x) for x in (tmp_path / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert len(rows[-1]["clients"].split()) == 10 and rows[-1]["failures"] == 0
    sessions = ClientSession._sessions
    assert len(sessions._items) <= sessions.max_items < 20


def test_scale_benchmark_reads_the_process_tree():
    from benchmarks.scale import process_tree, rss_pss

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(30)"],
                               stdout=subprocess.PIPE)
    try:
        assert sleeper.stdout is not None
        sleeper.stdout.readline()  # the interpreter is up: its memory is what it will be
        tree = process_tree(os.getpid())
        assert os.getpid() in tree and sleeper.pid in tree
        rss, pss = rss_pss(sleeper.pid)
        assert rss > 1 << 20 and 0 < pss <= rss
    finally:
        sleeper.kill()
        sleeper.wait()
    assert rss_pss(sleeper.pid) == (0, 0)


# --- 5. a real ServerApp process killed mid-run resumes exactly -----------------------------------
def resume_config(tmp_path: Path, run_name: str, resume: bool = False):
    return micro_run_config(tmp_path, seed=5, num_rounds=4, fraction_train=0.67,
                            min_available_nodes=3, run_name=run_name, resume=resume,
                            train_samples=120, test_samples=60, algorithm="fedprox")


@pytest.mark.slow
def test_server_process_sigkilled_mid_run_resumes_to_the_same_model(tmp_path):
    """tests/test_simulation.py kills the server with an exception; here a real process running
    the ServerApp is SIGKILLed right after a checkpoint (metrics lines, checkpoint pruning, temp
    files may be cut anywhere) and the resumed run still ends bit-identical to a straight run."""
    from safetensors.numpy import load_file

    from tests.loopback_grid import run_loopback

    proc = child(f"""
        from pathlib import Path
        from tests.loopback_grid import LoopbackGrid, run_loopback
        from client_app.app import app as client_app
        from server_app.app import run_server
        run_loopback(resume_config(Path({str(tmp_path)!r}), "killed"), 3)
    """)
    first = tmp_path / "runs/killed/checkpoints/round-0001.safetensors"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(2).uniform(0.0, 0.3))
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    sigkill(proc)
    done = ckpt.latest_checkpoint(tmp_path / "runs/killed/checkpoints")
    assert done is not None and 1 <= done.round < 4

    run_loopback(resume_config(tmp_path, "killed", resume=True), 3, node_id_base=5000)
    run_loopback(resume_config(tmp_path, "straight"), 3)
    straight = load_file(str(tmp_path / "runs/straight/final_model.safetensors"))
    resumed = load_file(str(tmp_path / "runs/killed/final_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    rows = (tmp_path / "runs/killed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2, 3, 4]


# --- 6. a diverged model never reaches the run folder (issue 25, item 1) --------------------------
def _strict_json_rows(path: Path) -> list[dict]:
    """metrics.jsonl as strict JSON: a bare NaN/Infinity token is an error."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_client_whose_weights_diverge_under_a_finite_loss_reports_it(tmp_path):
    """At lr=1e3 this small CNN's mean loss stays finite (4.8e20) while 2 of its tensors are
    already inf/NaN: the client's check looks at the weights, not only at the loss."""
    from feddifrc_core.divergence import DivergedError
    from feddifrc_core.run_setup import build_global_model, load_train_set
    from feddifrc_core.training import train_local

    cfg = micro_run_config(tmp_path, model_width=4, lr=1e3, batch_size=32,
                           train_samples=200, seed=11)
    data = load_train_set(cfg)
    model = build_global_model(cfg, data.channels, data.num_classes, data.image_size)
    with pytest.raises(DivergedError, match=r"fedavg: training diverged in epoch 1 \(NaN or inf "
                                            r"in 2 of \d+ tensors .*lower `lr` \(now 1000.0\)"):
        train_local(model, data.images, data.labels, cfg.new_algorithm(), "cpu")


def test_a_nonfinite_test_loss_fails_the_run_before_anything_of_the_round_is_saved(tmp_path):
    """lr=1e6 on the micro budget: the clients' weights stay finite, the test loss is NaN."""
    from feddifrc_core.divergence import DivergedError
    from tests.loopback_grid import run_loopback

    with pytest.raises(DivergedError, match=r"round 1: test-loss=nan is not finite: training "
                                            r"diverged. Nothing of round 1 was saved"):
        run_loopback(micro_run_config(tmp_path, lr=1e6), 2)
    assert not (tmp_path / "runs" / "run").exists()  # failed before its first round: removed


def test_a_diverged_aggregate_is_never_checkpointed_and_resume_starts_from_the_last_finite_round(
        tmp_path, caplog):
    """A client that sends NaN weights (one without the client-side check) in round 2: the run
    fails naming the aggregate, keeps rounds 0-1 as valid JSON and finite checkpoints, and a
    resume continues after round 1, also past a NaN checkpoint an older server had written."""
    from client_app.app import app as client_app
    from feddifrc_core.divergence import DivergedError, nonfinite_arrays
    from server_app.app import run_server
    from tests.loopback_grid import LoopbackGrid
    from wire import protocol

    class NaNInRound2(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if self.train_rounds == 2:
                arrays = protocol.from_record(replies[0].content.array_records[protocol.ARRAYS])
                poisoned = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                            for k, v in arrays.items()}
                replies[0].content.array_records[protocol.ARRAYS] = protocol.to_record(poisoned)
            return replies

    cfg = micro_run_config(tmp_path, num_rounds=3)
    with pytest.raises(DivergedError, match=r"round 2: the aggregated model holds NaN or inf in "
                                            r"\d+ of \d+ arrays .*Nothing of round 2 was saved"):
        run_server(NaNInRound2(client_app, 2, cfg.to_flower()), cfg)
    folder = tmp_path / "runs" / "run"
    assert [r["round"] for r in _strict_json_rows(folder / "metrics.jsonl")] == [0, 1]
    saved = ckpt.list_checkpoints(folder / "checkpoints")
    assert [p.name for p in saved] == ["round-0000.safetensors", "round-0001.safetensors"]
    assert not any(nonfinite_arrays(ckpt.load_checkpoint(p).arrays) for p in saved)

    # what an older server left: round 2's non-finite aggregate, checkpointed
    last = ckpt.load_checkpoint(saved[-1])
    nan_model = {k: np.full_like(v, np.nan) if k.startswith("model.") and v.dtype.kind == "f"
                 else v for k, v in last.arrays.items()}
    ckpt.save_checkpoint(ckpt.checkpoint_path(folder / "checkpoints", 2), nan_model,
                         {**last.meta, "round": 2})
    with caplog.at_level("WARNING"):
        resumed = cfg.replace(resume=True)
        summary = run_server(LoopbackGrid(client_app, 2, resumed.to_flower(), node_id_base=5000),
                             resumed)
    assert "round-0002.safetensors: its model holds NaN or inf" in caplog.text
    assert summary["rounds"] == 3
    assert [r["round"] for r in _strict_json_rows(folder / "metrics.jsonl")] == [0, 1, 2, 3]


def test_metrics_jsonl_refuses_a_nonfinite_value(tmp_path):
    from feddifrc_core.divergence import DivergedError
    from feddifrc_core.reporting import RunFolder

    folder = RunFolder.open(micro_run_config(tmp_path), "run")
    folder.log_round({"round": 0, "test-loss": 2.3})
    with pytest.raises(DivergedError, match=r"round 1: test-loss=inf is not finite"):
        folder.log_round({"round": 1, "test-loss": float("inf")})
    assert [r["round"] for r in _strict_json_rows(folder.metrics_jsonl)] == [0]
    folder.close()


# --- 7. identical runs give identical model files (issue 25, item 8) ------------------------------
def test_identical_runs_give_byte_identical_final_model_files(tmp_path):
    from tests.loopback_grid import run_loopback

    for name in ("first", "second"):  # another name and another wall time, the same run
        run_loopback(micro_run_config(tmp_path, run_name=name), 2)
    first, second = (tmp_path / "runs" / name for name in ("first", "second"))
    assert (first / "final_model.safetensors").read_bytes() == \
        (second / "final_model.safetensors").read_bytes()
    # what varies stays in summary.json
    assert json.loads((first / "summary.json").read_text())["run-name"] == "first"
    assert "wall-seconds" in json.loads((second / "summary.json").read_text())


# --- 8. a read-only run folder: one clear error, and the lock still goes (issue 25, item 5) -------
def _immutable(paths: list[Path], on: bool) -> bool:
    """`chattr +i/-i`: root cannot write an immutable file either (chmod does not stop root)."""
    done = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)],
                          capture_output=True)
    return done.returncode == 0


def test_a_run_folder_that_turns_read_only_mid_run_is_one_clear_error(tmp_path, caplog):
    from client_app.app import app as client_app
    from feddifrc_core.checkpoint import WriteError
    from server_app.app import run_server
    from server_app.run_lock import RunFolderLock
    from tests.loopback_grid import LoopbackGrid

    folder = tmp_path / "runs" / "run"
    frozen = [folder / "metrics.jsonl", folder / ".lock"]

    class FreezeAfterRound1(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            if self.train_rounds == 1 and not _immutable(frozen, on=True):
                pytest.skip("chattr +i is not available on this file system")
            return super().send_and_receive(messages, timeout=timeout)

    try:
        with pytest.raises(WriteError) as info, caplog.at_level("WARNING"):
            cfg = micro_run_config(tmp_path, num_rounds=2)
            run_server(FreezeAfterRound1(client_app, 2, cfg.to_flower()), cfg)
        # one message naming the file and the fix, not a PermissionError chain
        assert str(info.value) == (f"could not write {folder / 'metrics.jsonl'}: Operation not "
                                   f"permitted. Check free disk space and that the folder "
                                   f"{folder} is writable.")
        assert info.value.__cause__ is None and info.value.__suppress_context__
        # releasing the lock could not clear the immutable lock file: said, not raised
        assert f"could not clear the lock file {folder / '.lock'}" in caplog.text
        RunFolderLock.check_free(folder)  # and the lock itself is gone
    finally:
        _immutable(frozen, on=False)


def test_releasing_the_lock_never_fails_a_second_time(tmp_path, monkeypatch, caplog):
    from server_app.run_lock import RunFolderLock

    lock = RunFolderLock(tmp_path / "run").acquire()

    def denied(fd: int, length: int) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "ftruncate", denied)
    with caplog.at_level("WARNING"):
        lock.release()  # no exception
    assert f"could not clear the lock file {tmp_path / 'run' / '.lock'}" in caplog.text
    RunFolderLock.check_free(tmp_path / "run")  # released all the same


# --- 9. a second writer is refused before Flower starts (issue 25, item 4) ------------------------
def _run_script(tmp_path: Path, run_config: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "flwr-home"
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_simulation.py"), "--supernodes", "2",
         "-c", run_config], capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLWR_HOME": str(home), "FEDDIFRC_RUNS_DIR": str(tmp_path / "runs")})


def test_the_run_script_refuses_a_busy_or_mismatched_run_folder_before_starting(tmp_path):
    """Before, the second writer was refused only when its ServerApp took the lock (64 s in)."""
    holder = child(f"""
        from pathlib import Path
        from server_app.run_lock import RunFolderLock
        RunFolderLock(Path({str(tmp_path / "runs" / "dup")!r})).acquire()
        print("LOCKED", flush=True)
        import time; time.sleep(600)
    """)
    try:
        wait_for_line(holder, "LOCKED")
        busy = _run_script(tmp_path, "run-name='dup' dataset='digits'")
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 1 and busy.stderr.count("ERROR") == 1, busy.stderr
    assert f"run folder {tmp_path / 'runs' / 'dup'} is in use by another run (PID {holder.pid}" \
        in busy.stderr
    assert not (tmp_path / "flwr-home").exists()  # no SuperLink was started

    (tmp_path / "runs" / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "checkpoints" / "round-0000.safetensors").write_bytes(b"x")
    reused = _run_script(tmp_path, "run-name='old'")
    assert reused.returncode == 1 and "already holds checkpoints; set resume=true" in reused.stderr
    assert not (tmp_path / "flwr-home").exists()


# --- 10. an expected failure ends the run with one log line (issue 25, item 6) --------------------
def test_a_bad_setting_ends_the_server_app_with_one_log_line():
    """Flower logs a ServerApp's exception with its traceback; for the project's own expected
    failures (bad settings, too few clients, a busy run folder, divergence, a failed write) the
    message is the whole story. `flwr run` with a bad value: tests/test_flower_native.py."""
    import io
    import logging

    from flwr.app import Context, RecordDict
    from flwr.common.logger import LOGGER_NAME, log

    from client_app.app import app as client_app
    from feddifrc_core.config import ConfigError
    from server_app.app import make_server_app
    from tests.loopback_grid import LoopbackGrid

    server_app = make_server_app({"num-rounds": "abc"})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError) as info:
        server_app(grid=LoopbackGrid(client_app, 2), context=context)
    try:
        {}["surprise"]
    except KeyError as err:
        surprise = err
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:  # what Flower's simulation and ServerApp processes do with an exception
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=info.value)
        one_line = text.getvalue()
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=surprise)
    finally:
        logger.removeHandler(handler)
    assert one_line == ("ERROR ServerApp raised an exception: ConfigError: run config: "
                        "'num-rounds' expects an integer, got 'abc' (str)\n")
    assert "Traceback" in text.getvalue()[len(one_line):]  # anything else keeps its traceback


# --- 11. the one-time extraction waits for queued clients (issue 25, item 9) ----------------------
def _queued_run(tmp_path: Path, monkeypatch, nodes: int, **grid_kw):
    """FedDifRC with the tiny extractor through a grid whose clients share few parallel slots,
    on a simulated clock (the server's set-up wait reads it too); returns (grid, config)."""
    from client_app.app import app as client_app
    from server_app import progress_wait
    from tests.loopback_grid import FakeClock, QueuedGrid

    clock = FakeClock()
    monkeypatch.setattr(progress_wait, "monotonic", clock)
    monkeypatch.setattr(progress_wait, "sleep", clock.sleep)
    # round-timeout 300 s: the deadline the whole stage had before setup-timeout existed
    cfg = micro_run_config(tmp_path, algorithm="feddifrc", diffusion_model="tiny-sd",
                           diffusion_image_size=0, extraction_batch_size=64, neg_num=3,
                           min_train_nodes=nodes, min_available_nodes=nodes, round_timeout=300.0,
                           setup_timeout=300.0)
    return QueuedGrid(client_app, nodes, cfg.to_flower(), clock=clock, **grid_kw), cfg


def test_clients_queued_behind_others_keep_the_set_up_alive(tmp_path, monkeypatch):
    """6 clients, one at a time, 100 s of extraction each and one deliberately slowed to 250 s:
    the stage takes 750 s against a setup-timeout of 300 s and still succeeds. With one deadline
    for the whole stage (Flower's `send_and_receive`, as before) the same run fails."""
    from server_app import aggregator as aggregator_module
    from server_app.app import run_server
    from server_app.strategy import RoundFailedError

    grid, cfg = _queued_run(tmp_path, monkeypatch, 6, slots=1, extract_seconds=100.0,
                            seconds={5: 250.0})
    summary = run_server(grid, cfg)
    assert summary["rounds"] == 1 and summary["client-failures"] == 0
    assert grid.clock.now >= 750.0 > cfg.setup_timeout

    def one_deadline(grid, messages, timeout):  # the stage before this change
        return list(grid.send_and_receive(messages, timeout=timeout))

    monkeypatch.setattr(aggregator_module, "send_and_receive_with_progress", one_deadline)
    grid, cfg = _queued_run(tmp_path / "before", monkeypatch, 6, slots=1, extract_seconds=100.0,
                            seconds={5: 250.0})
    with pytest.raises(RoundFailedError, match=r"set-up stage 'projection-stats': only 2 of 6"):
        run_server(grid, cfg)


def test_a_client_that_hangs_in_set_up_is_given_up_after_the_last_progress(tmp_path, monkeypatch):
    from server_app.app import run_server
    from server_app.strategy import RoundFailedError

    grid, cfg = _queued_run(tmp_path, monkeypatch, 4, slots=2, extract_seconds=100.0,
                            seconds={3: math.inf})
    with pytest.raises(RoundFailedError, match=r"set-up stage 'projection-stats': only 3 of 4 "
                                               r".*partition 3 "
                                               r"\(node \d+\): no reply within setup-timeout "
                                               r"\(300 s\) after the stage's last reply"):
        run_server(grid, cfg)
    # the last reply came at 200 s (partition 2, second in its slot): given up 300 s later
    assert 500.0 <= grid.clock.now <= 502.0


# --- 12. Ray on loopback only (issue 25, item 3) ---------------------------------------------------
def _loopback_env() -> dict[str, str]:
    from scripts.ray_loopback import build, loopback_env

    library = build()
    if library is None:
        pytest.skip("no C compiler to build scripts/ray_loopback.c")
    return loopback_env(os.environ, library)


def test_the_bind_shim_turns_only_wildcard_addresses_into_loopback():
    code = textwrap.dedent("""
        import socket
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"),
                             (socket.AF_INET, "127.0.0.2")):
            with socket.socket(family) as sock:
                sock.bind((host, 0))
                print(sock.getsockname()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_loopback_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == ["127.0.0.1", "::ffff:127.0.0.1", "127.0.0.2"]  # a chosen address stays


def test_a_local_ray_listens_on_loopback_only(tmp_path):
    """What a simulation starts (GCS, raylet, workers, the driver) lists only loopback sockets.
    Ray 2.55.1 alone listens on every interface even with `_node_ip_address="127.0.0.1"`."""
    ray_tmp = os.environ["RAY_TMPDIR"]  # this test's own (conftest); short: Ray's sockets in it
    code = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import ray
        from tests.sockets import listening_sockets, process_tree
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir={ray_tmp!r})

        @ray.remote
        class Worker:
            def pid(self):
                return os.getpid()

        ray.get(Worker.remote().pid.remote())
        print(json.dumps(listening_sockets(process_tree(os.getpid()))), flush=True)
        ray.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_loopback_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for _, name, _ in found}
    assert {"gcs_server", "raylet"} <= names, found  # the test saw Ray's servers
    assert [s for s in found if not is_loopback(s[2])] == []


# --- 13. deployment: finished ClientApps are reaped (issue 25, item 7) -----------------------------
def test_the_superexec_reaper_waits_for_finished_client_apps_only(tmp_path):
    """flwr 1.39's SuperExec drops the Popen of every ClientApp it starts: a finished one stays a
    zombie until the next launch. The reaper (scripts/deploy/bin/flower-superexec runs it) waits
    for exited `flwr-*` children, and never for a child someone else still waits for."""
    from scripts.deploy.reaper import exited_task_children, reap_exited_tasks

    app = tmp_path / "flwr-clientapp"  # the process name Flower's task processes have
    go = tmp_path / "go"  # they end together, after the last launch (which reaps earlier ones)
    app.write_text(f"#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 0.05; done\n")
    app.chmod(0o755)
    other = subprocess.Popen(["sh", "-c", "exit 3"])
    for _ in range(3):
        subprocess.Popen([str(app)])  # dropped, as Flower's SubprocessExecutor does
    go.touch()
    deadline = time.monotonic() + 30
    while len(exited_task_children(os.getpid())) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    zombies = exited_task_children(os.getpid())
    assert len(zombies) == 3  # what the nodes kept until teardown
    assert sorted(reap_exited_tasks()) == sorted(zombies)
    assert exited_task_children(os.getpid()) == []
    assert other.wait(timeout=30) == 3  # its exit status was left to its owner
