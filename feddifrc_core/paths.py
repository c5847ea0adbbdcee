"""Where the project keeps its files: a leaf module (no project imports) every layer may use.

One rule per folder, so the config, the data sources and the diffusion loaders always agree:
  cache    <configured> or $FEDDIFRC_CACHE_DIR or ~/.cache/feddifrc
  data     $FEDDIFRC_DATA_DIR or <cache>/data (the environment's cache rule, not a run's cache-dir)
  runs     <configured> or $FEDDIFRC_RUNS_DIR or ./runs
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(configured: str | Path = "") -> Path:
    """The cache folder: feature caches, tiny checkpoints, tokenizer files, local models."""
    return Path(configured or os.environ.get("FEDDIFRC_CACHE_DIR") or "~/.cache/feddifrc").expanduser()


def data_dir() -> Path:
    """Where data sets are looked for and downloaded when no data path is given."""
    if os.environ.get("FEDDIFRC_DATA_DIR"):
        return Path(os.environ["FEDDIFRC_DATA_DIR"]).expanduser()
    return cache_dir() / "data"


def runs_dir(configured: str = "") -> Path:
    """The folder that holds the run folders."""
    return Path(configured or os.environ.get("FEDDIFRC_RUNS_DIR") or "runs").expanduser()
