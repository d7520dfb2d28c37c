"""Histogram calibration methods: percentile, mse, entropy (and the shared streaming histogram)."""
from __future__ import annotations

import json
import math
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfp8.calibrators.base import CALIBRATORS, make_calibrator
from onnxfp8.calibrators.entropy import EntropyCalibrator, kl_divergences
from onnxfp8.calibrators.histogram import CalibrationOptionError, Histogram, HistogramCalibrator
from onnxfp8.calibrators.mse import MSECalibrator
from onnxfp8.calibrators.percentile import PercentileCalibrator
from onnxfp8.errors import ConfigError
from onnxfp8.formats import get_format


def _gauss(n=1_000_000, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _with_outliers(magnitude, count, seed=1, n=1_000_000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    idx = rng.choice(n, count, replace=False)
    x[idx] = magnitude * rng.choice([-1.0, 1.0], count) * rng.uniform(0.5, 1.0, count)
    return x


def _feed(cal, name, x, batches=1, ranges=True):
    if ranges:
        cal.set_ranges({name: float(np.abs(x).max())})
    for b in np.array_split(x, batches):
        cal.observe(name, b)
    return cal


def _real_mse(x, fmt, amax):
    f = get_format(fmt)
    return float(np.mean((x - f.fake_quant(x, f.scale_for(amax))).astype(np.float64) ** 2))


# ------------------------------------------------------------------------------------ registry/options


def test_registered_and_need_ranges():
    for method, cls in [("percentile", PercentileCalibrator), ("mse", MSECalibrator),
                        ("entropy", EntropyCalibrator)]:
        assert CALIBRATORS[method] is cls
        cal = make_calibrator(method)
        assert isinstance(cal, cls) and isinstance(cal, HistogramCalibrator)
        assert cal.method == method and cal.needs_range and not cal.accepts_reduced
        assert cal.num_bins == 2048


@pytest.mark.parametrize("method, options", [
    ("percentile", {"percentile": 0}),
    ("percentile", {"percentile": 100.5}),
    ("percentile", {"percentile": -3}),
    ("percentile", {"percentile": float("nan")}),
    ("percentile", {"percentile": "99"}),
    ("percentile", {"percentil": 99.9}),  # typo: unknown option
    ("mse", {"format": "e9m9"}),
    ("mse", {"num_bins": 2047}),
    ("mse", {"num_bins": 4}),
    ("mse", {"min_fraction": 0}),
    ("mse", {"num_candidates": 1}),
    ("mse", {"tensor_formats": {"a": "int4"}}),
    ("entropy", {"num_quantized_bins": 4096}),
    ("entropy", {"num_quantized_bins": 1}),
    ("entropy", {"start_bin": 64}),
    ("entropy", {"stride": 0}),
])
def test_bad_options_raise_value_error(method, options):
    with pytest.raises(ValueError) as info:
        make_calibrator(method, **options)
    assert isinstance(info.value, ConfigError)  # one-line error for the CLI too
    assert isinstance(info.value, CalibrationOptionError)


def test_percentile_100_is_the_max():
    x = _gauss(10_000)
    cal = _feed(make_calibrator("percentile", percentile=100), "t", x)
    assert cal.result()["t"] == pytest.approx(float(np.abs(x).max()), rel=1e-7)


# ------------------------------------------------------------------------------------------ percentile


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_percentile_matches_numpy_within_a_bin(p, dist):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1_000_000) if dist == "gauss" else rng.laplace(size=1_000_000)).astype(np.float32)
    cal = _feed(make_calibrator("percentile", percentile=p), "t", x, batches=7)
    h = cal.histograms()["t"]
    assert h.range == pytest.approx(float(np.abs(x).max()))
    ref = float(np.percentile(np.abs(x), p))
    assert abs(cal.result()["t"] - ref) <= h.width * 1.0001


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=300),
       st.floats(0.01, 100.0), st.integers(1, 5), st.booleans())
def test_percentile_within_a_bin_of_the_order_statistic(values, p, batches, ranges):
    """Whatever the data, batching and range policy: within one bin of the ceil(p% * N)-th smallest |x|."""
    x = np.asarray(values, dtype=np.float32)
    cal = _feed(PercentileCalibrator(percentile=p, num_bins=64), "t", x, batches=batches, ranges=ranges)
    a = np.sort(np.abs(x))
    got = cal.result()["t"]
    if a[-1] == 0:
        assert got == 0.0
        return
    h = cal.histograms()["t"]
    assert h.total == x.size
    k = max(math.ceil(p / 100.0 * x.size - 1e-9), 1) - 1
    assert abs(got - float(a[k])) <= h.width * (1 + 1e-5) + 1e-6 * a[-1]
    assert got <= a[-1]


# ------------------------------------------------------------------------------------------- streaming


def test_streaming_with_ranges_equals_one_batch_exactly():
    x = _gauss(600_000, seed=5)
    for method in ("percentile", "mse", "entropy"):
        one = _feed(make_calibrator(method), "t", x, batches=1)
        many = _feed(make_calibrator(method), "t", x, batches=37)
        np.testing.assert_array_equal(one.histograms()["t"].counts, many.histograms()["t"].counts)
        assert one.result() == many.result()


def test_growing_histogram_equals_fixed_range_histogram():
    """Without set_ranges the range starts at the first batch's max and doubles (merging bin pairs): the
    result is the histogram over the final range, up to values within float rounding of a bin edge."""
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal(50_000).astype(np.float32) * s for s in (0.1, 0.3, 1.0, 0.5, 3.0, 1.0)]
    grown = PercentileCalibrator(percentile=99.9)
    for b in batches:
        grown.observe("t", b)
    h = grown.histograms()["t"]
    allx = np.concatenate(batches)
    assert h.max == pytest.approx(float(np.abs(allx).max()))
    assert h.max <= h.range < 2 * h.max
    assert h.range == pytest.approx(float(np.abs(batches[0]).max()) * 2 ** round(math.log2(h.range / np.abs(batches[0]).max())))
    ref, _ = np.histogram(np.abs(allx), bins=h.num_bins, range=(0, h.range))
    assert h.total == allx.size
    assert np.abs(h.counts - ref).sum() <= 10  # a few values on bin edges may land in the neighbour
    fixed = _feed(PercentileCalibrator(percentile=99.9), "t", allx)
    assert abs(grown.result()["t"] - fixed.result()["t"]) <= h.width
    assert abs(grown.result()["t"] - np.percentile(np.abs(allx), 99.9)) <= h.width


def test_growth_beyond_a_fixed_range_and_tolerance():
    cal = PercentileCalibrator()
    cal.set_ranges({"t": 1.0})
    cal.observe("t", np.array([0.5, 1.0, 1.0 + 1e-7], np.float32))  # a hair above: last bin, no growth
    h = cal.histograms()["t"]
    assert h.range == 1.0 and h.counts[-1] == 2 and h.max == pytest.approx(1.0 + 1e-7)
    cal.observe("t", np.array([3.5], np.float32))  # data changed: 1 -> 2 -> 4
    h = cal.histograms()["t"]
    assert h.range == 4.0 and h.total == 4 and h.max == 3.5
    assert h.counts[h.num_bins // 4 - 1] == 2 and h.counts[h.num_bins // 8] == 1


def test_memory_does_not_grow_with_batches():
    cal = make_calibrator("entropy")
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(200):
        cal.observe("t", rng.standard_normal(1000).astype(np.float32) * (1 + i % 7))
        sizes.append(len(json.dumps(cal.state())))
    assert cal.histograms()["t"].counts.size == 2048
    assert max(sizes) < 1.3 * sizes[10]


def test_nan_inf_ignored_zero_tensor_and_late_nonzero():
    x = _gauss(10_000)
    dirty = x.copy()
    dirty[::97] = np.nan
    dirty[1::89] = np.inf
    dirty[2::83] = -np.inf
    clean = dirty[np.isfinite(dirty)]
    for method in ("percentile", "mse", "entropy"):
        a = make_calibrator(method)
        a.observe("t", dirty)
        b = make_calibrator(method)
        b.observe("t", clean)
        np.testing.assert_array_equal(a.histograms()["t"].counts, b.histograms()["t"].counts)
        assert a.result() == b.result()
        z = make_calibrator(method)
        z.set_ranges({"z": 0.0})
        z.observe("z", np.zeros((4, 8), np.float32))
        z.observe("n", np.full(5, np.nan, np.float32))  # nothing finite: not a result
        assert z.result() == {"z": 0.0}
        z.observe("late", np.zeros(100, np.float32))  # range 0 ...
        z.observe("late", x)  # ... then real data: the zeros stay in bin 0
        assert z.histograms()["late"].total == 100 + x.size
        assert 0 < z.result()["late"] <= np.abs(x).max()


# ----------------------------------------------------------------------------------------- state, merge


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_state_round_trip_through_json(method):
    cal = make_calibrator(method)
    _feed(cal, "a", _gauss(50_000, 1), batches=3)
    cal.observe("b", _gauss(20_000, 2) * 7)  # growing path
    state = json.loads(json.dumps(cal.state()))
    again = make_calibrator(method)
    again.load_state(state)
    assert again.result() == cal.result()
    for k in ("a", "b"):
        np.testing.assert_array_equal(again.histograms()[k].counts, cal.histograms()[k].counts)
        assert again.histograms()[k].range == cal.histograms()[k].range
    # the histogram is the same for every method: one cached state serves all of them
    other = make_calibrator("mse" if method != "mse" else "percentile")
    other.load_state(state)
    assert set(other.result()) == {"a", "b"}
    with pytest.raises(ValueError):
        again.load_state({"method": "max", "min": {}, "max": {}})


def test_merge_same_range_equals_one_pass():
    x = _gauss(200_000, 4)
    amax = float(np.abs(x).max())
    for method in ("percentile", "mse", "entropy"):
        full = make_calibrator(method)
        full.set_ranges({"t": amax})
        full.observe("t", x)
        a, b = make_calibrator(method), make_calibrator(method)
        a.set_ranges({"t": amax})
        b.set_ranges({"t": amax})
        a.observe("t", x[:70_000])
        b.observe("t", x[70_000:])
        b.observe("only_b", x[:10])
        a.merge(b)
        np.testing.assert_array_equal(a.histograms()["t"].counts, full.histograms()["t"].counts)
        assert a.result()["t"] == full.result()["t"]
        assert "only_b" in a.result()
        # loading a state twice merges too
        c = make_calibrator(method)
        c.load_state(full.state())
        c.load_state(full.state())
        np.testing.assert_array_equal(c.histograms()["t"].counts, 2 * full.histograms()["t"].counts)


def test_merge_different_ranges():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal(100_000).astype(np.float32), 3 * rng.standard_normal(100_000).astype(np.float32)
    both = np.concatenate([x, y])
    a, b = PercentileCalibrator(percentile=99.0), PercentileCalibrator(percentile=99.0)
    a.observe("t", x)
    b.observe("t", y)
    a.merge(b)  # ranges not a power of two apart: re-binned, counts kept
    h = a.histograms()["t"]
    assert h.total == both.size and h.max == pytest.approx(float(np.abs(both).max()))
    assert abs(a.result()["t"] - np.percentile(np.abs(both), 99.0)) <= 2 * h.width
    # power-of-two apart (a growing histogram vs its start): exact
    c, d = PercentileCalibrator(), PercentileCalibrator()
    c.set_ranges({"t": 1.0})
    d.set_ranges({"t": 4.0})
    c.observe("t", np.array([0.1, 0.9], np.float32))
    d.observe("t", np.array([3.9], np.float32))
    c.merge(d)
    h = c.histograms()["t"]
    assert h.range == 4.0 and h.total == 3
    assert h.counts[int(0.1 / 4 * 2048)] == 1 and h.counts[int(0.9 / 4 * 2048)] == 1


def test_histogram_from_dict_validates():
    with pytest.raises(ValueError):
        Histogram.from_dict({"range": 1.0, "max": 1.0, "counts": [1, -1]})
    with pytest.raises(ValueError):
        Histogram.from_dict({"range": float("nan"), "max": 1.0, "counts": [1, 1]})


# ------------------------------------------------------------------------------------------------- mse


@pytest.fixture(scope="module")
def gauss_1m():
    return _gauss(1_000_000, seed=0)


def test_mse_gaussian_fp8_near_max_int8_clips(gauss_1m):
    x = gauss_1m
    amax = float(np.abs(x).max())
    e4m3 = _feed(make_calibrator("mse", format="e4m3"), "t", x, batches=4).result()["t"]
    int8 = _feed(make_calibrator("mse", format="int8"), "t", x, batches=4).result()["t"]
    assert 0.95 * amax <= e4m3 <= amax
    assert 3.0 <= int8 <= 6.0 and int8 < 0.9 * amax
    assert _real_mse(x, "int8", int8) < 0.8 * _real_mse(x, "int8", amax)
    assert _real_mse(x, "e4m3", e4m3) <= _real_mse(x, "e4m3", amax)


def test_mse_estimate_tracks_the_real_error(gauss_1m):
    """The histogram estimate of the MSE is close to the MSE measured on the data itself."""
    x = _with_outliers(200.0, 5)
    for fmt in ("e4m3", "e5m2", "e3m4", "int8"):
        cal = _feed(make_calibrator("mse", format=fmt), "t", x)
        cands, est = cal.mse_curve("t")
        for i in np.linspace(0, cands.size - 1, 7).astype(int):
            assert est[i] == pytest.approx(_real_mse(x, fmt, cands[i]), rel=0.02)


@pytest.mark.parametrize("magnitude, count", [(1000.0, 1), (200.0, 5), (100.0, 20)])
def test_mse_with_outliers_beats_max(magnitude, count):
    x = _with_outliers(magnitude, count)
    amax = float(np.abs(x).max())
    int8 = _feed(make_calibrator("mse", format="int8"), "t", x, batches=3).result()["t"]
    e4m3 = _feed(make_calibrator("mse", format="e4m3"), "t", x, batches=3).result()["t"]
    assert int8 < 0.7 * amax
    assert _real_mse(x, "int8", int8) < 0.85 * _real_mse(x, "int8", amax)
    assert e4m3 > 0.9 * amax and e4m3 > 1.4 * int8  # FP8 clips much less
    assert _real_mse(x, "e4m3", e4m3) <= _real_mse(x, "e4m3", amax) * 1.001


def test_mse_tensor_formats_and_amax_for(gauss_1m):
    x = gauss_1m[:200_000]
    cal = make_calibrator("mse", format="e4m3", tensor_formats={"q": "int8"})
    _feed(cal, "p", x)
    _feed(cal, "q", x)
    r = cal.result()
    assert r["q"] < 0.9 * r["p"]
    assert r["q"] == cal.amax_for("p", "int8")
    assert r["p"] == cal.amax_for("q", "e4m3")


def test_mse_relu_like_and_saturated():
    rng = np.random.default_rng(2)
    relu = np.maximum(rng.standard_normal(300_000), 0).astype(np.float32)
    relu6 = np.minimum(relu * 4, 6.0).astype(np.float32)  # many values exactly at the max
    for fmt in ("e4m3", "int8"):
        for x in (relu, relu6):
            r = _feed(make_calibrator("mse", format=fmt), "t", x).result()["t"]
            assert 0 < r <= np.abs(x).max()
            assert _real_mse(x, fmt, r) <= _real_mse(x, fmt, float(np.abs(x).max())) * 1.001
        assert _feed(make_calibrator("mse", format=fmt), "t", relu6).result()["t"] == pytest.approx(6.0, rel=0.01)


# --------------------------------------------------------------------------------------------- entropy


def _entropy_reference(hist, nq, start, stride=1):
    """TensorRT / pytorch-quantization's _compute_amax_entropy loops, written out plainly."""

    def entropy(pk, qk):  # scipy.stats.entropy(pk, qk): KL divergence of the normalised distributions
        pk, qk = pk / pk.sum(), qk / qk.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(pk > 0, np.where(qk > 0, pk * np.log(pk / qk), np.inf), 0.0)
        return float(terms.sum())

    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1, stride):
        density_counts = np.zeros(nq)
        space = np.linspace(0, i, num=nq + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        for idx, d in enumerate(digitized):
            if d != -1:
                density_counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                density_counts[key] /= val
        new_density = np.array([density_counts[d] if d != -1 else 0.0 for d in digitized])
        if new_density.sum():
            new_density /= new_density.sum()
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        divergences.append(entropy(reference / reference.sum(), new_density))
        arguments.append(i)
    return np.array(arguments), np.array(divergences)


@pytest.mark.parametrize("case", ["gauss", "relu", "holes"])
def test_entropy_vectorised_equals_reference_loops(case):
    rng = np.random.default_rng(11)
    x = np.abs(rng.standard_normal(50_000))
    if case == "relu":
        x[::3] = 0
    hist, _ = np.histogram(x, bins=384, range=(0, x.max()))
    if case == "holes":
        hist[200:230] = 0
        hist[-2] = 0
    cand, kl = kl_divergences(hist, 32, 32)
    ref_cand, ref_kl = _entropy_reference(hist, 32, 32)
    np.testing.assert_array_equal(cand, ref_cand)
    assert (np.isinf(kl) == np.isinf(ref_kl)).all()
    fin = np.isfinite(ref_kl)
    np.testing.assert_allclose(kl[fin], ref_kl[fin], rtol=1e-9, atol=1e-12)
    assert cand.size - 1 - np.argmin(kl[::-1]) == ref_cand.size - 1 - np.argmin(ref_kl[::-1])


def test_entropy_gaussian_sensible_and_close_to_onnxruntime(gauss_1m, capsys):
    x = gauss_1m
    ours = _feed(make_calibrator("entropy"), "t", x, batches=5).result()["t"]
    assert 2.5 <= ours <= 6.0
    assert ours < float(np.abs(x).max())
    calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")
    col = calibrate.HistogramCollector(method="entropy", symmetric=True, num_bins=2048, num_quantized_bins=128,
                                       percentile=99.999, scenario="same")
    col.collect({"t": x})
    ort = float(col.compute_collection_result()["t"][1])
    # onnxruntime: signed histogram, 128 levels over both signs; ours: |x|, 128 levels (TensorRT). Same idea,
    # a shallow optimum: within a few percent on Gaussian data.
    assert ours == pytest.approx(ort, rel=0.1)


def test_entropy_few_bins_falls_back_to_max():
    cal = make_calibrator("entropy", num_bins=64, num_quantized_bins=128 // 4)
    x = _gauss(10_000)
    cal.observe("t", x * 0.01)
    cal.observe("t", x)  # the range grew by doublings ...
    cal.set_ranges({"t": 1000 * float(np.abs(x).max())})  # ... and once more: max sits in a low bin
    assert cal.result()["t"] == pytest.approx(float(np.abs(x).max()))
