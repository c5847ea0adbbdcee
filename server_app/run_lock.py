"""One writer per run folder: an exclusive lock that the ServerApp holds for the whole run.

Two runs with the same run-name (or a `resume=true` next to a run that is still going) would
interleave metrics, mix checkpoints and overwrite each other's config. The lock is an OS file lock
(`flock`) on `<run folder>/.lock`, taken before anything is read or written there: the OS drops it
when the process ends, however it ends (SIGKILL, OOM), so a dead run never blocks its resume.
The file names the holder (PID, host, start time) so that the refusal can say who writes there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from feddifrc_core.checkpoint import WriteError

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class RunFolderBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """`with RunFolderLock(path) as lock:` the caller is the run folder's only writer."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.created = False  # this process made the folder (so it may remove a failed set-up)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> RunFolderLock:
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WriteError(f"cannot create the run folder {self.folder}: {err.strerror}; set "
                             "output-dir to a writable folder") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file (another run)
            holder = _read_holder(fd)
            os.close(fd)
            raise _busy(self.folder, holder) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def check_free(folder: Path) -> None:
        """RunFolderBusyError if another process holds `folder`'s lock; creates nothing.

        For launchers that refuse a second writer before they start anything (a run takes
        the lock itself, first thing: this check only makes the refusal come sooner)."""
        try:
            fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
        except OSError:  # no lock file (no run ever wrote there) or unreadable: the run decides
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _busy(Path(folder), _read_holder(fd)) from None
        finally:
            os.close(fd)  # also drops the lock this probe may have taken

    def release(self, remove_folder: bool = False) -> None:
        """Drop the lock; `remove_folder` deletes the folder first (a set-up that failed).

        Never raises: it runs while a run ends, often because of an error already on its way
        (a full disk, a read-only folder), which a second error here would only bury."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove_folder:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                os.ftruncate(fd, 0)  # the file stays: unlinking it would race a waiting opener
        except OSError as err:  # only the holder's note stays behind; the lock itself goes
            log.warning("could not clear the lock file %s: %s", self.path, err.strerror or err)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the OS lock

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _busy(folder: Path, holder: str) -> RunFolderBusyError:
    return RunFolderBusyError(
        f"run folder {folder} is in use by another run ({holder}); two runs must not write into "
        "one folder. Wait for that run to end or stop it (`flwr stop RUN_ID`), or choose another "
        "run-name.")


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "its PID is not recorded yet"
