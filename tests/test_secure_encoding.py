"""The encoding of the project's uploads for SecAgg+ (pure): bounds, error, settings, uploads."""

from __future__ import annotations

import numpy as np
import pytest

from feddifrc_core import projection
from feddifrc_core.aggregation import weighted_average
from feddifrc_core.models import build_model, model_state
from feddifrc_core.secure_encoding import (
    ClippingError,
    SecAggSettings,
    bounds_from_octaves,
    check_integer_exact,
    decode,
    encode,
    encode_octaves,
    octave_counts,
    sum_error_bound,
)
from feddifrc_core.secure_uploads import (
    apply_weighted_update,
    pca_from_sums,
    pca_upload,
    weighted_update,
)


def test_encode_scales_into_the_clipping_range_and_decode_inverts_a_sum():
    rng = np.random.default_rng(0)
    clients = [{"x": rng.normal(size=(4, 5)) * 3, "n": np.array([7 + k])} for k in range(3)]
    bounds = {"x": 12.0, "n": 64.0}
    encoded = [encode(c, bounds, 8.0) for c in clients]
    assert all(np.abs(e["x"]).max() <= 8.0 for e in encoded)
    total = {k: sum(e[k] for e in encoded) for k in ("x", "n")}
    decoded = decode(total, bounds, 8.0, {"n": "int64"})
    np.testing.assert_allclose(decoded["x"], sum(c["x"] for c in clients), rtol=1e-12)
    assert decoded["n"].dtype == np.int64 and decoded["n"][0] == 7 + 8 + 9


def test_a_value_beyond_its_bound_is_an_error_that_does_not_reveal_the_value():
    with pytest.raises(ClippingError, match="'outer' exceeds its public bound 4") as err:
        encode({"outer": np.array([1.0, -4.123456])}, {"outer": 4.0}, 8.0)
    assert "4.123" not in str(err.value)
    with pytest.raises(ValueError, match="no public bound for array 'sum'"):
        encode({"sum": np.zeros(2)}, {}, 8.0)
    with pytest.raises(ValueError, match="non-finite"):
        encode({"sum": np.array([np.nan])}, {"sum": 1.0}, 8.0)


def test_octave_bounds_cover_every_client_and_are_at_most_twice_the_largest_value():
    peaks = [0.3, 5.0, 4.1, 0.0]
    clients = [{"a": np.array([p, -p / 2]), "z": np.zeros(3)} for p in peaks]
    summed = {k: sum(encode_octaves(c, 8.0)[k] for c in clients) for k in ("a", "z")}
    bounds = bounds_from_octaves(summed, 8.0)
    assert 5.0 <= bounds["a"] < 10.0 and bounds["a"] == 8.0
    assert bounds["z"] == 2.0**-60  # no client had a non-zero value
    # What the server learns: how many clients per power-of-two band, nothing per client.
    assert octave_counts(summed, 8.0)["a"] == {-1: 1, 3: 2}
    exact = {0.5, 1.0, 2.0**10}  # a power of two lies in its own band (bound = the value x 2)
    for value in exact:
        (hist,) = encode_octaves({"v": np.array([value])}, 1.0).values()
        assert bounds_from_octaves({"v": hist}, 1.0)["v"] == 2 * value


def test_settings_follow_flowers_rules_and_refuse_what_cannot_work():
    default = SecAggSettings()
    assert default.resolve(5) == (5, 3, 5)  # every client a neighbour, 3 of 5 to reconstruct
    assert default.resolve(10) == (10, 7, 10)
    assert SecAggSettings(num_shares=3, reconstruction_threshold=2).resolve(10) == (3, 2, 3)
    assert default.quantization_for(10) == 2**28 and default.quantization_for(5) == 2**29
    assert SecAggSettings(quantization_range=2**22).quantization_for(10) == 2**22
    for n in range(2, 40):  # the defaults work for any federation size, more than half to unmask
        default.check(n)
    cases = {
        (SecAggSettings(), 1): "at least 2 clients",
        (SecAggSettings(num_shares=5, reconstruction_threshold=6), 5):
            "reconstruction-threshold 6 must be below secagg-num-shares 5",
        (SecAggSettings(num_shares=7, reconstruction_threshold=6), 5):
            "threshold 6 is larger than the 5 clients",
        (SecAggSettings(num_shares=4, reconstruction_threshold=3), 6): "must be odd",
        (SecAggSettings(num_shares=2), 6): "int must be >= 3",
        (SecAggSettings(reconstruction_threshold=0.5), 10): "more than half",
        (SecAggSettings(quantization_range=2**30), 10): "wrap around 2\\*\\*32",
        (SecAggSettings(clipping_range=-1.0), 3): "clipping-range must be a positive",
    }
    for (settings, n), message in cases.items():
        with pytest.raises(ValueError, match=message):
            settings.check(n)


def test_counts_must_come_back_exactly():
    check_integer_exact({"n": 2.0**20}, {"n": "int64"}, 10, 2**28)
    with pytest.raises(ValueError, match="integer array 'n' .* not be summed exactly"):
        check_integer_exact({"n": 2.0**20}, {"n": "int64"}, 10, 2**22)
    assert sum_error_bound(8.0, 10, 2**22) == pytest.approx(2 * 10 * 8 / 2**22)


def test_the_weighted_update_gives_fedavgs_weighted_mean():
    global_state = model_state(build_model("small-cnn", 1, 10, 8, align_head="none"))
    rng = np.random.default_rng(1)
    sizes = [40, 7, 113]
    locals_ = [{k: (v + rng.normal(0, 0.05, v.shape).astype(v.dtype)) if v.dtype.kind == "f"
                else v + 3 * (i + 1) for k, v in global_state.items()} for i in range(3)]
    uploads = [weighted_update(w, global_state, n) for w, n in zip(locals_, sizes, strict=True)]
    summed = {k: sum(u[k] for u in uploads) for k in uploads[0]}
    merged = apply_weighted_update(global_state, summed)
    expected = weighted_average(locals_, sizes)
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype
        np.testing.assert_allclose(merged[key], value, atol=1e-6)
    with pytest.raises(ValueError, match="same architecture"):
        weighted_update({"x": np.zeros(1)}, global_state, 3)


def test_pca_upload_sends_half_the_outer_products_and_merges_exactly():
    rng = np.random.default_rng(2)
    clients = [[projection.pca_stats(rng.normal(size=(20 + k, 6)) + k),
                projection.pca_stats(rng.normal(size=(20 + k, 3)))] for k in range(3)]
    uploads = [pca_upload(c) for c in clients]
    assert uploads[0]["stats.0.outer-triu"].shape == (21,)  # 6 * 7 / 2 of 36
    summed = {k: sum(u[k] for u in uploads) for k in uploads[0]}
    for got, want in zip(pca_from_sums(summed), projection.merge_all(clients), strict=True):
        assert got.count == want.count
        np.testing.assert_allclose(got.sum, want.sum)
        np.testing.assert_allclose(got.outer, want.outer)
