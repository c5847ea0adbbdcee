"""Which code produced a result: the git revision, for run folders, model cards and benchmarks.

A leaf module (standard library only) so that launch scripts can import it cheaply.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_revision(start: str | Path | None = None) -> str:
    """The git commit of the code (+ '-dirty'), or 'unknown' outside a checkout.

    `flwr run` executes an installed copy of the app that is not a git checkout, so launch scripts
    pass the revision in $FEDDIFRC_GIT_SHA.
    """
    if os.environ.get("FEDDIFRC_GIT_SHA"):
        return os.environ["FEDDIFRC_GIT_SHA"]
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
