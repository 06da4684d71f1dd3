"""The synthetic ECG and the demo archive: determinism, lead physics, true beats, readability."""

from __future__ import annotations

import csv
import os
import time

import numpy as np
import pytest

from ecgtok.transforms.synth import STANDARD_LEADS, synthesize_ecg, write_demo_archive

II = STANDARD_LEADS.index("II")


def _lead(name: str) -> int:
    return STANDARD_LEADS.index(name)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_archive")
    start = time.perf_counter()
    paths = write_demo_archive(str(out))
    elapsed = time.perf_counter() - start
    return str(out), paths, elapsed


def _truth(out: str) -> dict[str, tuple[str, np.ndarray]]:
    with open(os.path.join(out, "truth.csv"), newline="") as fh:
        return {
            row["record_id"]: (row["rhythm"], np.array(row["r_peaks"].split(), dtype=np.int64))
            for row in csv.DictReader(fh)
        }


@pytest.mark.parametrize("rhythm", ["sinus", "af", "pvc", "flat"])
def test_deterministic_for_a_seed(rhythm):
    a_sig, a_pk = synthesize_ecg(10, 500, rhythm=rhythm, seed=7)
    b_sig, b_pk = synthesize_ecg(10, 500, rhythm=rhythm, seed=7)
    np.testing.assert_array_equal(a_sig, b_sig)
    np.testing.assert_array_equal(a_pk, b_pk)
    assert a_sig.dtype == np.float32 and a_sig.shape == (5000, 12)
    assert a_pk.dtype == np.int64
    if rhythm != "flat":
        c_sig, _ = synthesize_ecg(10, 500, rhythm=rhythm, seed=8)
        assert not np.array_equal(a_sig, c_sig)


@pytest.mark.parametrize("rhythm", ["sinus", "af", "pvc"])
def test_limb_leads_are_consistent(rhythm):
    sig, _ = synthesize_ecg(10, 500, rhythm=rhythm, seed=3)
    i, ii, iii = sig[:, _lead("I")], sig[:, II], sig[:, _lead("III")]
    avr, avl, avf = sig[:, _lead("aVR")], sig[:, _lead("aVL")], sig[:, _lead("aVF")]
    tol = 0.0021  # rounding each lead to 1 uV
    assert np.abs(iii - (ii - i)).max() <= tol
    assert np.abs(avr + (i + ii) / 2).max() <= tol
    assert np.abs(avl - (i - ii / 2)).max() <= tol
    assert np.abs(avf - (ii - i / 2)).max() <= tol
    # Samples are whole microvolts.
    uv = sig.astype(np.float64) * 1000
    assert np.abs(uv - np.round(uv)).max() < 1e-3


def test_precordial_progression_looks_normal():
    """A normal beat: rS in V1 (mostly negative QRS), tall R in V5, upright R in II."""
    sig, pk = synthesize_ecg(10, 500, rhythm="sinus", noise_mv=0.0, seed=1)
    w = np.concatenate([np.arange(p - 30, p + 30) for p in pk[1:-1]])
    qrs = sig[w]
    assert qrs[:, II].max() > 0.6
    assert (
        qrs[:, _lead("V1")].min() < -0.3 and -qrs[:, _lead("V1")].min() > qrs[:, _lead("V1")].max()
    )
    assert qrs[:, _lead("V5")].max() > 0.6
    assert qrs[:, _lead("aVR")].min() < -0.4


@pytest.mark.parametrize(
    "rhythm,fs,leads",
    [
        ("sinus", 500, None),
        ("af", 500, None),
        ("pvc", 500, None),
        ("sinus", 360, ["MLII", "V5"]),
        ("af", 300, ["I"]),
        ("sinus", 250, ["V1"]),
    ],
)
def test_r_peaks_are_local_maxima_of_the_reference_lead(rhythm, fs, leads):
    sig, pk = synthesize_ecg(20, fs, lead_names=leads, rhythm=rhythm, seed=11)
    names = leads or STANDARD_LEADS
    assert len(pk) >= 15
    assert np.all(np.diff(pk) > 0.25 * fs)
    assert pk[0] >= 0.05 * fs and pk[-1] < sig.shape[0] - 0.05 * fs
    if "II" in names or "MLII" in names:
        ref = names.index("II") if "II" in names else names.index("MLII")
        x = sig[:, ref]
    else:  # the reference lead is the one where the QRS is largest; use its sign
        ref = int(np.argmax(np.abs(sig).max(axis=0)))
        x = sig[:, ref] * np.sign(sig[pk[0], ref])
    half = int(0.02 * fs)
    for p in pk:
        if rhythm == "pvc" and x[p] > 1.3:  # PVC: wide, but still the top of its QRS
            continue
        seg = x[p - half : p + half + 1]
        assert x[p] == seg.max(), f"peak {p} is not the maximum of its neighbourhood"


def test_af_rr_is_much_more_irregular_than_sinus():
    def cv(rhythm: str, seed: int) -> float:
        _, pk = synthesize_ecg(60, 250, lead_names=["II"], rhythm=rhythm, heart_rate=80, seed=seed)
        rr = np.diff(pk)
        return float(rr.std() / rr.mean())

    sinus = [cv("sinus", s) for s in range(3)]
    af = [cv("af", s) for s in range(3)]
    assert max(sinus) < 0.08
    assert min(af) > 0.15
    assert min(af) > 3 * max(sinus)


def test_af_has_fibrillatory_waves_between_beats():
    """Between T and next QRS, AF carries 4-9 Hz f-waves; sinus is nearly flat there."""
    from scipy.signal import detrend

    fs = 500

    def tq_segments(rhythm):
        sig, pk = synthesize_ecg(
            60, fs, lead_names=["V1"], rhythm=rhythm, heart_rate=55, noise_mv=0.0, seed=2
        )
        segs = []
        for a, b in zip(pk[:-1], pk[1:], strict=True):
            lo, hi = a + int(0.5 * fs), b - int(0.25 * fs)
            if hi - lo >= int(0.3 * fs):
                segs.append(detrend(sig[lo:hi, 0].astype(np.float64)))
        assert len(segs) >= 5
        return segs

    af, sinus = tq_segments("af"), tq_segments("sinus")
    assert np.median([s.std() for s in af]) > 3 * np.median([s.std() for s in sinus])
    peaks = []
    for s in af:
        spec = np.abs(np.fft.rfft(s * np.hanning(s.size), n=4 * fs))
        freqs = np.fft.rfftfreq(4 * fs, 1 / fs)
        peaks.append(freqs[np.argmax(spec * (freqs > 2))])
    assert 4.0 <= np.median(peaks) <= 9.0


def test_pvc_rhythm_has_premature_beats():
    _, pk = synthesize_ecg(60, 500, rhythm="pvc", heart_rate=70, seed=5)
    rr = np.diff(pk) / 500
    assert (rr < 0.75 * np.median(rr)).sum() >= 1


def test_flat_has_no_beats():
    sig, pk = synthesize_ecg(10, 500, rhythm="flat")
    assert pk.size == 0 and sig.shape == (5000, 12) and not sig.any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        synthesize_ecg(10, 500, rhythm="vt")
    with pytest.raises(ValueError):
        synthesize_ecg(10, 500, lead_names=["not a lead"])


def test_neurokit_finds_the_true_r_peaks():
    """An independent detector (NeuroKit2) agrees with the truth within 50 ms."""
    nk = pytest.importorskip("neurokit2")
    fs = 500
    for seed in range(3):
        sig, pk = synthesize_ecg(10, fs, rhythm="sinus", seed=seed)
        clean = nk.ecg_clean(sig[:, II], sampling_rate=fs)
        _, info = nk.ecg_peaks(clean, sampling_rate=fs)
        found = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
        assert len(found) == len(pk)
        assert np.abs(found - pk).max() <= 0.05 * fs


def test_archive_layout_and_speed(archive):
    out, paths, elapsed = archive
    assert elapsed < 5.0
    assert len(paths) == 12 and all(p.endswith(".hea") and os.path.isfile(p) for p in paths)
    assert all(os.path.dirname(os.path.dirname(p)) == out for p in paths)  # nested one level
    truth = _truth(out)
    assert set(truth) == {os.path.relpath(p, out)[: -len(".hea")] for p in paths}
    assert {r for r, _ in truth.values()} >= {"sinus", "af", "flat"}
    with open(os.path.join(out, "manifest.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "patient_id", "rhythm"]
    assert all(os.path.isfile(os.path.join(out, r["path"])) for r in rows)
    assert {r["path"] for r in rows} == {os.path.relpath(p, out) for p in paths}


def test_archive_reads_back_with_wfdb(archive):
    import wfdb

    out, paths, _ = archive
    truth = _truth(out)
    shapes = set()
    for p in paths:
        rec = wfdb.rdrecord(p[: -len(".hea")])
        shapes.add((rec.fs, rec.p_signal.shape[1], rec.p_signal.shape[0] / rec.fs))
        rid = os.path.relpath(p, out)[: -len(".hea")]
        rhythm, pk = truth[rid]
        assert (pk < rec.sig_len).all()
        assert any(c.startswith("Dx:") for c in rec.comments)
        if rhythm in ("sinus", "af", "pvc"):
            code = "164889003" if rhythm == "af" else "426783006"
            assert code in next(c for c in rec.comments if c.startswith("Dx:"))
    assert (500, 12, 10.0) in shapes
    assert (360, 2, 360.0) in shapes  # longer than a 5-minute segment
    assert (300, 1, 30.0) in shapes


def test_archive_reads_back_with_the_project_reader_exactly(archive):
    from ecgtok.transforms.wfdb_reader import read_record

    out, paths, _ = archive
    truth = _truth(out)
    for i, p in enumerate(paths):
        rec = read_record(p)
        rid = os.path.relpath(p, out)[: -len(".hea")]
        rhythm, pk = truth[rid]
        # The reader normalises sex to M/F.
        assert rec.meta["age"] is not None and rec.meta["sex"] in ("M", "F")
        if rhythm == "af":
            assert rec.meta["dx"] == ["164889003"]
        elif rhythm == "sinus":
            assert rec.meta["dx"] == ["426783006"]
        if i in (0, 1, 3):  # exact to 1 uV: the written samples equal the synthesizer's
            from ecgtok.transforms.synth import _demo_spec

            _, _, rh, fs, secs, leads, hr, _, _ = _demo_spec(i)
            sig, peaks = synthesize_ecg(secs, fs, list(leads), rhythm=rh, heart_rate=hr, seed=i)
            assert rec.fs == fs and rec.signal.shape == sig.shape
            # Same 1 uV steps; float32 division may differ in the last bit.
            np.testing.assert_allclose(rec.signal, sig, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(peaks, pk)
        if rhythm == "flat":
            assert pk.size == 0 and not rec.signal.any()
