"""The warm start (init-model = "public-supervised"): trained by the server on the public half
only, deterministic, cached by fingerprint (atomic, verified) and shared by every algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from feddifrc_core.config import ConfigError
from feddifrc_core.datasets import load_dataset, select_subset
from feddifrc_core.run_setup import build_global_model, load_train_pool
from feddifrc_core.warm_start import initial_state, public_training_set
from tests.micro_config import micro_run_config


def _warm_cfg(tmp_path, **changes):
    return micro_run_config(tmp_path, data_subset="private", init_model="public-supervised",
                            init_epochs=1, **changes)


def _model(cfg):
    return build_global_model(cfg, 1, 10, 32)  # digits: 1 x 32 x 32, 10 classes


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_warm_start_needs_the_public_half_to_be_no_clients_data(tmp_path):
    with pytest.raises(ConfigError, match="data-subset='private'"):
        micro_run_config(tmp_path, init_model="public-supervised")  # data-subset 'all'
    cfg = _warm_cfg(tmp_path)
    public_rows = select_subset(load_dataset("digits", "train"), "public")[1]
    private_rows = load_train_pool(cfg)[1]  # every row a client can hold
    assert not set(public_rows) & set(private_rows)
    assert len(public_training_set(cfg)) == len(public_rows)


def test_warm_start_is_trained_once_deterministically_and_verified_on_read(tmp_path):
    cfg = _warm_cfg(tmp_path)
    random_state, note = initial_state(cfg.replace(init_model="random"), _model(cfg))
    assert note == "seeded initialisation (seed 3)"
    warm, note = initial_state(cfg, _model(cfg))
    assert "trained on" in note and not _equal(warm, random_state)
    [cached] = (tmp_path / "cache" / "warm-start").glob("small-cnn-*.safetensors")
    stamp = cached.stat().st_mtime_ns

    again, note = initial_state(cfg, _model(cfg))  # the second run reads it back
    assert "verified" in note and _equal(again, warm) and cached.stat().st_mtime_ns == stamp
    fresh, _ = initial_state(cfg.replace(cache_dir=str(tmp_path / "other")), _model(cfg))
    assert _equal(fresh, warm)  # a fresh cache gives the same bits: nothing depends on history

    data = bytearray(cached.read_bytes())
    data[-5] ^= 0xFF  # a damaged file is detected and trained again, never used
    cached.write_bytes(bytes(data))
    repaired, note = initial_state(cfg, _model(cfg))
    assert "trained on" in note and _equal(repaired, warm)
    # another setting is another file: the earlier one is not reused for it
    initial_state(cfg.replace(init_epochs=2), _model(cfg))
    assert len(list((tmp_path / "cache" / "warm-start").glob("*.safetensors"))) == 2


def test_every_algorithm_starts_from_the_same_warm_encoder(tmp_path):
    """FedDifRC's alignment head is not pretrained: it keeps its seeded initialisation; every
    other weight equals FedAvg's warm start."""
    fedavg = _warm_cfg(tmp_path)
    feddifrc = fedavg.replace(algorithm="feddifrc", align_head="linear")
    warm_avg, _ = initial_state(fedavg, _model(fedavg))
    head_model = _model(feddifrc)
    seeded = {k: v.detach().numpy().copy() for k, v in head_model.state_dict().items()}
    warm_dif, note = initial_state(feddifrc, head_model)
    head = sorted(set(warm_dif) - set(warm_avg))
    assert head and all(k.startswith("align_head") for k in head) and "kept for" in note
    assert all(np.array_equal(warm_dif[k], warm_avg[k]) for k in warm_avg)
    assert all(np.array_equal(warm_dif[k], seeded[k]) for k in head)
