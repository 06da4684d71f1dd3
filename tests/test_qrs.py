"""QRS detector: accuracy floor on MIT-BIH records, 12-lead and single-lead input, rates,
flat/noise/lead-off stretches, VF, long records; preprocessing and beat-quality flags."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from conftest import data_path
from scipy import signal as sps

from ecgtok.transforms import beats, preprocess, qrs
from ecgtok.transforms.beat_eval import (
    match_beats,
    outside,
    reference_beats,
    score_record,
    vf_episodes,
)
from ecgtok.transforms.qrs import detect_r_peaks


def _mitdb(name: str):
    import wfdb

    from ecgtok.transforms.wfdb_reader import read_record

    hea = data_path("mitdb", f"{name}.hea")
    return read_record(hea), wfdb.rdann(hea[: -len(".hea")], "atr")


def _score(ann, peaks, fs, n):
    return score_record(ann.sample, ann.symbol, peaks, fs, 0.15, n)


def synth_ecg(fs, bpm, dur=10.0, leads=1, amp=1.0, seed=0):
    """A clean synthetic ECG: P, Q, R, S, T Gaussians per beat, plus 10 uV noise."""
    rng = np.random.default_rng(seed)
    n = int(dur * fs)
    t = np.arange(n) / fs
    rr = 60.0 / bpm
    r_times = np.arange(0.3 * rr, dur, rr)
    x = np.zeros(n)
    t_off = 0.28 if rr > 0.5 else 0.45 * rr
    waves = ((-0.16, 0.12, 0.02), (-0.025, -0.1, 0.008), (0, 1.0, 0.01), (0.025, -0.25, 0.008))
    for r in r_times:
        lo, hi = max(0, int((r - 0.4) * fs)), min(n, int((r + 0.6) * fs) + 1)
        for off, a, w in (*waves, (t_off, 0.3, 0.04)):
            x[lo:hi] += a * np.exp(-0.5 * ((t[lo:hi] - r - off) / w) ** 2)
    x = amp * x + rng.normal(0, 0.01, n)
    return np.repeat(x[:, None], leads, axis=1).astype(np.float32), np.round(r_times * fs)


# --------------------------------------------------------------------- contract
def test_output_contract():
    x, _ = synth_ecg(360, 75)
    p = detect_r_peaks(x, 360)
    assert p.dtype == np.int64 and p.ndim == 1
    assert np.all(np.diff(p) > 0) and p.min() >= 0 and p.max() < len(x)


def test_1d_equals_single_column():
    x, _ = synth_ecg(250, 70)
    np.testing.assert_array_equal(detect_r_peaks(x[:, 0], 250), detect_r_peaks(x, 250))


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        detect_r_peaks(np.zeros((10, 2, 2)), 250)
    with pytest.raises(ValueError):
        detect_r_peaks(np.zeros(100), float("nan"))
    assert detect_r_peaks(np.zeros((0, 2)), 250).size == 0
    assert detect_r_peaks(np.zeros(3), 250).size == 0


@pytest.mark.parametrize("fs", [128, 250, 360, 500, 1000, 20000])
@pytest.mark.parametrize("bpm", [30, 60, 120, 180, 250])
def test_synthetic_rates(fs, bpm):
    x, ref = synth_ecg(fs, bpm)
    tp, fn, fp = match_beats(ref, detect_r_peaks(x, fs), 0.05 * fs)
    assert fn == 0 and fp == 0  # first and last beats included


@pytest.mark.parametrize("bpm", [40, 75, 150])
def test_lowest_rate_50hz(bpm):
    x, ref = synth_ecg(50, bpm)
    tp, fn, fp = match_beats(ref, detect_r_peaks(x, 50), 0.05 * 50)
    assert fn == 0 and fp == 0


def test_low_amplitude():
    x, ref = synth_ecg(360, 70, amp=0.08)  # an 80 uV R wave over 10 uV noise
    tp, fn, fp = match_beats(ref, detect_r_peaks(x, 360), 0.05 * 360)
    assert fn == 0 and fp == 0


def test_flat_and_nan_give_no_beats():
    assert detect_r_peaks(np.zeros((5000, 3), np.float32), 500).size == 0
    assert detect_r_peaks(np.full((5000, 2), 1.7, np.float32), 500).size == 0
    assert detect_r_peaks(np.full(5000, np.nan), 500).size == 0


def test_detection_leaves_the_callers_signal_as_it_was():
    """NaN samples are read as flat, but the caller's array keeps them (the beat quality
    flags and the tokenizer read the same array after the detector)."""
    rng = np.random.default_rng(4)
    for shape in ((5000,), (5000, 1), (5000, 3)):
        x = rng.normal(0, 0.1, shape).astype(np.float32)
        x[100:200] = np.nan
        before = x.copy()
        detect_r_peaks(x, 500)
        np.testing.assert_array_equal(x, before)  # NaN == NaN for this check


@pytest.mark.parametrize("sd", [0.01, 0.1, 1.0])
def test_noise_only_gives_almost_no_beats(sd):
    rng = np.random.default_rng(1)
    assert detect_r_peaks(rng.normal(0, sd, (30 * 250, 2)).astype(np.float32), 250).size <= 2
    assert detect_r_peaks(rng.normal(0, sd, 30 * 500).astype(np.float32), 500).size <= 2


def test_sine_flutter_gives_no_beats():
    # a 4 Hz, 1 mV near-sinusoid with no baseline between waves, like ventricular flutter
    fs = 250
    t = np.arange(20 * fs) / fs
    rng = np.random.default_rng(2)
    x = np.sin(2 * np.pi * 4.2 * t + 0.3 * np.sin(2 * np.pi * 0.3 * t)) + rng.normal(
        0, 0.02, t.size
    )
    assert detect_r_peaks(x.astype(np.float32), fs).size <= 3


# ---------------------------------------------------------------------- MIT-BIH
FLOORS = {  # (Se, +P) floors, whole records, all leads
    "100": (0.999, 0.999),
    "105": (0.985, 0.975),  # heavy noise
    "119": (0.999, 0.998),  # ventricular bigeminy
    "207": (0.995, 0.995),  # flutter episodes, bundle branch blocks
    "208": (0.995, 0.995),  # frequent multiform PVCs, fusion beats
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_mitdb_accuracy_floor(name):
    rec, ann = _mitdb(name)
    s = _score(ann, detect_r_peaks(rec.signal, rec.fs), rec.fs, len(rec.signal))
    se, ppv = FLOORS[name]
    assert s.se >= se and s.ppv >= ppv, (name, s)


def test_mitdb_peaks_sit_on_the_r_wave():
    rec, ann = _mitdb("100")
    p = detect_r_peaks(rec.signal, rec.fs)
    ref = reference_beats(ann.sample, ann.symbol)
    j = np.clip(np.searchsorted(p, ref), 1, len(p) - 1)
    err = np.minimum(np.abs(p[j] - ref), np.abs(p[j - 1] - ref))
    assert np.median(err) <= 2 and np.percentile(err, 99) <= 0.02 * rec.fs


def test_single_lead_works():
    rec, ann = _mitdb("100")
    s = _score(ann, detect_r_peaks(rec.signal[:, 0], rec.fs), rec.fs, len(rec.signal))
    assert s.se >= 0.998 and s.ppv >= 0.998


def test_a_noisy_lead_does_not_ruin_fusion():
    rec, ann = _mitdb("100")
    x = rec.signal.copy()
    rng = np.random.default_rng(3)
    x[:, 1] += rng.normal(0, 0.5, len(x)).astype(np.float32)  # lead 1 buried in noise
    s = _score(ann, detect_r_peaks(x, rec.fs), rec.fs, len(x))
    assert s.se >= 0.998 and s.ppv >= 0.998


def test_lead_off_stretch_gets_no_beats():
    rec, ann = _mitdb("100")
    fs = rec.fs
    x = rec.signal.copy()
    a, b = int(60 * fs), int(80 * fs)
    x[a:b, :] = 0.0  # both electrodes off for 20 s
    p = detect_r_peaks(x, fs)
    assert not np.any((p > a + 0.2 * fs) & (p < b - 0.2 * fs))
    # the rest of the record is untouched
    ref = reference_beats(ann.sample, ann.symbol)
    keep_ref = (ref < a - 0.5 * fs) | (ref > b + 0.5 * fs)
    keep_det = (p < a - 0.5 * fs) | (p > b + 0.5 * fs)
    tp, fn, fp = match_beats(ref[keep_ref], p[keep_det], 0.15 * fs)
    assert fn <= 2 and fp <= 2
    # and the lead-off mask flags the stretch
    off = beats.lead_off_mask(x, fs)
    assert off[a + int(0.2 * fs) : b - int(0.2 * fs)].all()
    assert off[: a - int(fs)].mean() < 0.01


def test_one_lead_off_is_rescued_by_the_other():
    rec, ann = _mitdb("100")
    x = rec.signal.copy()
    x[int(100 * rec.fs) : int(400 * rec.fs), 0] = 0.0  # lead 0 off for 5 minutes
    s = _score(ann, detect_r_peaks(x, rec.fs), rec.fs, len(x))
    assert s.se >= 0.998 and s.ppv >= 0.998


@pytest.mark.parametrize("fs_new", [128, 250, 1000])
def test_resampled_record_still_matches(fs_new):
    rec, ann = _mitdb("119")
    fs = rec.fs
    n = int(600 * fs)  # 10 minutes
    up, down = preprocess.resample_ratio(fs, fs_new)
    y = sps.resample_poly(rec.signal[:n], up, down, axis=0).astype(np.float32)
    p = detect_r_peaks(y, fs_new)
    ref = reference_beats(ann.sample, ann.symbol)
    ref = ref[ref < n] * (fs_new / fs)
    tp, fn, fp = match_beats(ref, p, 0.15 * fs_new)
    assert fn <= 2 and fp <= 2, (fs_new, tp, fn, fp)


def test_ventricular_flutter_gets_few_beats():
    rec, ann = _mitdb("207")
    p = detect_r_peaks(rec.signal, rec.fs)
    eps = vf_episodes(ann.sample, ann.symbol, len(rec.signal))
    dur = sum(b - a for a, b in eps) / rec.fs
    inside = int((~outside(p, eps)).sum())
    assert dur > 60 and inside / dur < 0.5  # flutter waves run at ~4 per second


def test_chunked_processing_matches_whole_record(monkeypatch):
    rec, _ = _mitdb("208")
    whole = detect_r_peaks(rec.signal, rec.fs)
    monkeypatch.setattr(qrs, "CHUNK_S", 300.0)
    chunked = detect_r_peaks(rec.signal, rec.fs)
    tp, fn, fp = match_beats(whole, chunked, 0.05 * rec.fs)
    assert fn + fp <= 6


@pytest.mark.slow
def test_twelve_lead_cinc_records_agree_with_neurokit2_on_lead_ii():
    import neurokit2 as nk

    from ecgtok.transforms.wfdb_reader import read_record

    files = sorted(
        glob.glob(os.path.join(data_path("cinc2021_12lead"), "**", "*.hea"), recursive=True)
    )
    assert files
    tot = np.zeros(3, int)
    for f in files[:40]:
        rec = read_record(f)
        assert rec.signal.shape[1] == 12
        p = detect_r_peaks(rec.signal, rec.fs)
        dur = len(rec.signal) / rec.fs
        assert 30 / 60 * dur - 2 <= len(p) <= 250 / 60 * dur + 1, f
        _, info = nk.ecg_peaks(rec.signal[:, 1].astype(float), sampling_rate=rec.fs)
        tot += match_beats(info["ECG_R_Peaks"], p, 0.15 * rec.fs)
    tp, fn, _ = tot
    # NeuroKit2 misses beats that the fused leads find, so only its beats are checked
    assert tp / (tp + fn) >= 0.98


def test_single_lead_af_records_give_plausible_rhythms():
    from ecgtok.transforms.wfdb_reader import read_record

    for name in ("A00001", "A00004", "A00005"):
        rec = read_record(data_path("cinc2017_af", f"{name}.hea"))
        p = detect_r_peaks(rec.signal, rec.fs)
        rr = np.diff(p) / rec.fs
        assert len(p) > 10 and np.all(rr > 0.2) and np.median(rr) < 2.0, name


# ------------------------------------------------------------------- preprocess
def test_preprocess_filters():
    fs = 500.0
    t = np.arange(int(10 * fs)) / fs
    wander = 2 * np.sin(2 * np.pi * 0.1 * t)
    mains = 0.5 * np.sin(2 * np.pi * 50 * t)
    qrs_band = np.sin(2 * np.pi * 10 * t)
    x = (wander + mains + qrs_band)[:, None]
    y = preprocess.notch(preprocess.remove_baseline(x, fs), fs)
    core = slice(int(2 * fs), int(8 * fs))
    resid = y[core, 0] - qrs_band[core]
    assert np.sqrt(np.mean(resid**2)) < 0.05
    bp = preprocess.bandpass(x, fs, 5, 20)
    assert abs(np.std(bp[core, 0]) - np.std(qrs_band)) < 0.05


def test_resample_rates():
    x = np.random.default_rng(0).normal(size=(3600, 2))
    y, fs_out = preprocess.resample(x, 360, 125)
    assert fs_out == 125 and y.shape == (1250, 2)
    y, fs_out = preprocess.resample(x, 360, 360)
    assert fs_out == 360 and y.shape == x.shape


# ----------------------------------------------------------------- beat quality
def test_beat_quality_flags():
    x, ref = synth_ecg(360, 75, dur=20, leads=2)
    r = ref.astype(np.int64)
    clean = beats.beat_quality(x, 360, r)
    assert clean.dtype == np.uint8 and clean.shape == r.shape and not clean.any()

    y = x.copy()
    y[int(5 * 360) : int(9 * 360), :] = 0.0  # lead-off
    f = beats.beat_quality(y, 360, r)
    inside = (r > 5.3 * 360) & (r < 8.6 * 360)
    assert np.all(f[inside] & beats.FLAG_FLAT) and not np.any(f[r < 4.5 * 360])

    y = x.copy()
    y[:, 0] = np.clip(y[:, 0], -1, 0.6)  # lead 0 clips every R wave
    f = beats.beat_quality(y, 360, r)
    assert np.all(f & beats.FLAG_SATURATED)

    y = x + np.random.default_rng(0).normal(0, 0.3, x.shape).astype(np.float32)
    f = beats.beat_quality(y, 360, r)
    assert np.mean((f & beats.FLAG_NOISE) > 0) > 0.8
    assert beats.FLAG_NOISE_MASK == beats.FLAG_NOISE | beats.FLAG_SATURATED | beats.FLAG_FLAT


# ------------------------------------------------ fast helpers equal what they replace
def test_running_median_equals_padded_np_median():
    rng = np.random.default_rng(0)
    for trial in range(400):
        shape = (int(rng.integers(1, 13)), int(rng.integers(1, 40)))
        v = rng.standard_normal(shape).astype(np.float32 if trial % 2 else np.float64)
        if trial % 5 == 0:
            v[rng.random(shape) < 0.1] = np.nan
        if trial % 3 == 0:
            v = np.round(v, 1)  # ties
        for span in (1, 2, 3, 5, 6, 31):
            got = qrs._running_median(v, span)
            if v.shape[-1] < 2 or span < 2:
                want = v
            else:
                h = span // 2
                p = np.pad(v, [(0, 0), (h, h)], mode="edge")
                win = np.lib.stride_tricks.sliding_window_view(p, 2 * h + 1, axis=-1)
                want = np.median(win, axis=-1)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_interp_rows_equals_np_interp_bit_for_bit():
    rng = np.random.default_rng(1)
    for trial in range(300):
        nb, sb = int(rng.integers(1, 30)), int(rng.integers(2, 200))
        ns = int(rng.integers(1, 4 * nb + 3))
        x, xp = (np.arange(ns) + 0.5) * sb, (np.arange(nb) + 0.5) * 4 * sb
        fp = rng.standard_normal((3, nb)) * 10.0 ** rng.uniform(-6, 6)
        if trial % 7 == 0:
            fp[1, rng.integers(0, nb)] = np.inf if trial % 2 else np.nan
        want = np.stack([np.interp(x, xp, row) for row in fp])
        np.testing.assert_array_equal(qrs._interp_rows(x, xp, fp), want)


def test_lead_sum_adds_leads_in_order():
    rng = np.random.default_rng(2)
    parts = (rng.standard_normal((12, 3, 500)) * 10.0 ** rng.uniform(-4, 4, (12, 3, 500))).astype(
        np.float32
    )
    parts[:, 0, :7] = -0.0
    want = np.zeros((3, 500), np.float32)
    for lead in parts:
        want += lead
    got = qrs._lead_sum(parts[None])[0]  # one record's leads
    np.testing.assert_array_equal(got, want)
    assert not np.signbit(got[0, :7]).any()  # 0 + -0.0 is +0.0, as in the loop
    # Several records: each record's leads summed on their own, in the same order.
    other = parts[::-1].copy()
    both = qrs._lead_sum(np.stack([parts, other]))
    np.testing.assert_array_equal(both[0], want)
    np.testing.assert_array_equal(both[1], qrs._lead_sum(other[None])[0])


def test_window_sums_match_direct_sums():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((3, 200)).astype(np.float32)
    bounds = np.array(
        [[0, 0, 5, 40], [10, 30, 30, 200], [150, 160, 190, 200], [199, 200, 200, 200]]
    )
    got = beats._window_sums(v, bounds, np.float64)
    assert got.shape == (4, 3, 3)
    for i, b in enumerate(bounds):
        for j in range(3):
            want = v[:, b[j] : b[j + 1]].astype(np.float64).sum(axis=1)
            np.testing.assert_allclose(got[i, :, j], want, rtol=1e-12, atol=1e-12)
    counts = beats._window_sums(v > 0, bounds, np.int64)
    for i, b in enumerate(bounds):
        for j in range(3):
            np.testing.assert_array_equal(counts[i, :, j], (v[:, b[j] : b[j + 1]] > 0).sum(axis=1))


def test_flat_blocks_equal_peak_to_peak_test():
    rng = np.random.default_rng(4)
    for trial in range(200):
        n, w = int(rng.integers(1, 400)), int(rng.integers(1, 60))
        scale = rng.choice([0.001, 0.003, 0.005, 0.02, 1.0])
        xt = (rng.standard_normal((3, n)) * scale).astype(np.float32)
        if trial % 3 == 0:
            xt = np.round(xt, 2)
        blocks = beats._blocks(xt, w)
        want = blocks.max(axis=2) - blocks.min(axis=2) < beats.FLAT_MV
        np.testing.assert_array_equal(beats._flat_blocks(xt, w, beats.FLAT_MV), want)
