"""The heartbeat tokenizer: artifact integrity, decoding, fitting determinism, real records."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import copy_record, data_path

from ecgtok.models import tokenizer as T
from ecgtok.models.tokenizer import ArtifactError, Tokenizer, build_sentence, tokenizer_meta
from ecgtok.pipeline.flags import default_tokenizer_dir


def _small_tokenizer(k: int = 8, seed: int = 0) -> Tokenizer:
    rng = np.random.default_rng(seed)
    return Tokenizer(rng.normal(size=(k, 96)).astype(np.float32), tokenizer_meta(k, seed, 100, "t"))


def test_save_load_round_trip(tmp_path):
    tok = _small_tokenizer()
    tid = tok.save(str(tmp_path))
    back = Tokenizer.load(str(tmp_path))
    assert back.tokenizer_id == tid
    np.testing.assert_array_equal(back.codebook, tok.codebook)
    assert back.vocab_size == T.N_SPECIAL + T.N_RHYTHM + 8
    assert back.view == T.DEFAULT_VIEW


def _flip_last_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_codebook_refused(tmp_path):
    _small_tokenizer().save(str(tmp_path))
    _flip_last_bit(tmp_path / T.CODEBOOK_FILE)
    with pytest.raises(ArtifactError, match="content check"):
        Tokenizer.load(str(tmp_path))


def test_tampered_meta_refused(tmp_path):
    _small_tokenizer().save(str(tmp_path))
    path = tmp_path / T.META_FILE
    meta = json.loads(path.read_text())
    meta["lowpass_hz"] = 40.0
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        Tokenizer.load(str(tmp_path))


def _subspace_tokenizer(
    k: int = 300, dims: int = 12, seed: int = 0
) -> tuple[Tokenizer, np.ndarray]:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.normal(size=(4000, 96)), axis=1).astype(np.float32)  # low-pass-ish
    codebook, basis = T.fit_codebook_in_subspace(smooth, k, dims, seed)
    return Tokenizer(codebook, tokenizer_meta(k, seed, len(smooth), "t"), basis), smooth


def test_subspace_search_finds_the_exact_nearest_word():
    tok, smooth = _subspace_tokenizer()
    assert tok.basis.shape == (12, 96)
    np.testing.assert_allclose(tok.basis @ tok.basis.T, np.eye(12), atol=1e-5)
    # the words lie in the basis' span, so searching there is exact
    np.testing.assert_allclose(tok.codebook @ tok.basis.T @ tok.basis, tok.codebook, atol=1e-3)
    x = np.vstack([smooth[:500], np.random.default_rng(1).normal(size=(500, 96))]).astype(
        np.float32
    )
    full = ((x[:, None, :] - tok.codebook[None]) ** 2).sum(-1)
    got = tok.assign(x)
    best = full.min(axis=1)
    # the same word, or (float rounding) one at the same distance
    np.testing.assert_allclose(full[np.arange(len(x)), got], best, rtol=1e-4, atol=1e-3)
    assert (got == full.argmin(axis=1)).mean() > 0.99


def test_subspace_tokenizer_round_trip_and_tampered_basis_refused(tmp_path):
    tok, smooth = _subspace_tokenizer(k=40, dims=8)
    tid = tok.save(str(tmp_path))
    back = Tokenizer.load(str(tmp_path))
    assert back.tokenizer_id == tid and back.meta["search_dims"] == 8
    np.testing.assert_array_equal(back.basis, tok.basis)
    np.testing.assert_array_equal(back.assign(smooth[:200]), tok.assign(smooth[:200]))
    _flip_last_bit(tmp_path / T.BASIS_FILE)
    with pytest.raises(ArtifactError, match="content check"):
        Tokenizer.load(str(tmp_path))


def test_missing_artifact_refused(tmp_path):
    with pytest.raises(ArtifactError):
        Tokenizer.load(str(tmp_path / "nowhere"))


def test_decode_returns_centroids_and_zeros_for_specials():
    tok = _small_tokenizer()
    ids = np.array([[tok.morph_offset + 3, T.UNK, tok.morph_offset + 7, T.PAD]])
    dec = tok.decode(ids)
    assert dec.shape == (1, 4, 96)
    np.testing.assert_array_equal(dec[0, 0], tok.codebook[3])
    np.testing.assert_array_equal(dec[0, 2], tok.codebook[7])
    assert not dec[0, 1].any() and not dec[0, 3].any()


def test_assign_is_nearest_centroid_and_encode_marks_noisy_beats_unknown():
    tok = _small_tokenizer()
    beats = tok.codebook[[5, 2, 2]] + 0.01
    np.testing.assert_array_equal(tok.assign(beats), [5, 2, 2])
    words = tok.encode_windows(beats[:, None, :], noisy=np.array([False, True, False]))
    assert words.tolist() == [[tok.morph_offset + 5, T.UNK, tok.morph_offset + 2]]


def test_sentence_layout_is_lead_major():
    words = np.array([[30, 31, 32], [40, 41, 42]])
    rhythm = np.array([5, 9, 9])
    sent, lead, beat = build_sentence(words, rhythm)
    assert sent.tolist() == [T.CLS, 5, 9, 9, T.SEP, 30, 31, 32, T.SEP, 40, 41, 42, T.SEP]
    assert lead.tolist()[5:8] == [0, 0, 0] and lead.tolist()[9:12] == [1, 1, 1]
    assert beat.tolist()[9:12] == [0, 1, 2]


def test_rhythm_words_follow_rr_bins():
    fs = 250.0
    r = np.array([0, 250, 375, 875])  # RR 1.0 s, 0.5 s, 2.0 s
    words = Tokenizer.rhythm_words(r, fs)
    assert words[0] == T.N_SPECIAL
    assert words[3] > words[1] > words[2]


def test_beat_view_windows_have_unit_energy_and_r_near_centre():
    fs = 360.0
    t = np.arange(int(20 * fs)) / fs
    sig = np.zeros_like(t)
    r = (np.arange(1, 19) * fs).astype(int)
    for k in r:
        sig += 1.5 * np.exp(-(((t - k / fs) / 0.012) ** 2))
    wins = T.beat_view(sig[:, None], fs, r, T.DEFAULT_VIEW)
    assert wins.shape == (len(r), 1, 96)
    np.testing.assert_allclose(np.linalg.norm(wins, axis=2), 1.0, rtol=1e-4)
    assert np.abs(np.argmax(np.abs(wins[:, 0]), axis=1) - T.W.R_INDEX).max() <= 1


def test_zl2_view_makes_the_nearest_word_the_highest_pearson_r():
    rng = np.random.default_rng(3)
    wins = T.shape_windows(
        rng.standard_normal((200, 1, 96)).astype(np.float32), {"beat_norm": "zl2"}
    )
    flat = wins[:, 0]
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, rtol=1e-5)
    tok = Tokenizer(codebook=flat[:50].copy(), meta={"tokenizer_id": "t", "beat_norm": "zl2"})
    r = np.stack([T.pearson_r(flat, np.repeat(c[None], len(flat), 0)) for c in tok.codebook], 1)
    np.testing.assert_array_equal(tok.assign(flat), r.argmax(axis=1))


def test_resample_first_view_matches_the_filter_first_view_on_real_records():
    """The cheap order (resample, then one filter at 100 Hz) sees the same beats."""
    from ecgtok.transforms.wfdb_reader import read_record

    for sub, rid in (("cinc2021_12lead", "G12EC/E00001"), ("mitdb", "203")):
        rec = read_record(data_path(sub, rid + ".hea"), rid)
        x = rec.signal[: int(60 * rec.fs)]
        old = T.W.lowpass(T.W.clean_for_windows(x, rec.fs), 25.0)
        new = T.W.resample_then_filter(x, rec.fs, 25.0)
        assert new.shape == old.shape and new.dtype == np.float32
        r = T.pearson_r(old[100:-100].T, new[100:-100].T)
        assert np.nanmin(r) > 0.98, (rid, r)


def test_resample_first_view_reads_missing_samples_as_baseline():
    fs = 360.0
    x = np.sin(2 * np.pi * 1.2 * np.arange(int(10 * fs)) / fs)[:, None].repeat(2, axis=1)
    x[500:520, 0] = np.nan
    x[:, 1] = np.nan  # a lead with nothing at all
    y = T.W.resample_then_filter(x, fs, 25.0)
    assert np.isfinite(y).all()
    assert np.abs(y[:, 1]).max() == 0.0 and np.abs(y[:, 0]).max() > 0.5


# ---- the shipped tokenizer on real records ------------------------------------------------
def test_shipped_tokenizer_loads_with_its_settings():
    tok = Tokenizer.load(default_tokenizer_dir())
    assert tok.codebook.shape[1] == 96
    assert tok.codebook.shape[0] >= 256
    assert tok.view["beat_norm"] == "zl2" and tok.view["resample_first"]
    assert tok.meta["holdout_fraction"] > 0
    # the words lie in the basis' span, which the exact subspace search relies on
    assert tok.basis is not None and tok.basis.shape == (tok.meta["search_dims"], 96)
    c = tok.codebook
    np.testing.assert_allclose(c @ tok.basis.T @ tok.basis, c, atol=1e-4)


@pytest.mark.parametrize(
    "sub,record",
    [("cinc2021_12lead", "G12EC/E00001"), ("cinc2017_af", "A00004"), ("mitdb", "201")],
)
def test_tokens_aligned_with_r_peaks_on_real_records(sub, record):
    from ecgtok.transforms.record_tokens import tokenize_record

    hea = data_path(sub, record + ".hea")
    tok = Tokenizer.load(default_tokenizer_dir())
    rows = tokenize_record(hea, record, tok)
    assert rows
    for row in rows:
        n = len(row["r_peaks"])
        assert n > 5 or row["n_samples"] < 10 * row["fs"]
        assert len(row["tokens"]) == len(row["lead_names"])
        for lead_words in row["tokens"]:
            assert len(lead_words) == n
            w = np.asarray(lead_words)
            assert np.all((w == T.UNK) | ((w >= tok.morph_offset) & (w < tok.vocab_size)))
        assert len(row["rhythm"]) == n
        assert row["tokenizer_id"] == tok.tokenizer_id


def test_decoded_words_resemble_real_beats():
    """The words of a clean 12-lead record reconstruct its beats (Pearson r)."""
    from ecgtok.transforms.record_tokens import find_beats
    from ecgtok.transforms.wfdb_reader import read_record

    hea = data_path("cinc2021_12lead", "G12EC", "E00002.hea")
    tok = Tokenizer.load(default_tokenizer_dir())
    rec = read_record(hea, "E00002")
    r_peaks, _ = find_beats(rec)
    wins = tok.beat_windows(rec.signal, rec.fs, r_peaks)
    x = wins.reshape(-1, 96)
    dec = tok.decode(tok.assign(x) + tok.morph_offset)
    r = T.pearson_r(x, dec)
    assert np.nanmedian(r) > 0.9
    # A random word is a much worse reconstruction than the assigned one.
    rng = np.random.default_rng(0)
    rand = tok.codebook[rng.integers(0, tok.codebook.shape[0], size=len(x))]
    assert np.nanmedian(T.pearson_r(x, rand)) < np.nanmedian(r) - 0.2


@pytest.mark.slow
def test_fit_is_deterministic_on_real_records(tmp_path):
    from ecgtok.models.train import main

    src = tmp_path / "src"
    for name in ("A00001", "A00004", "A00005"):
        copy_record(data_path("cinc2017_af", name + ".hea"), str(src))
    ids = []
    for i in range(2):
        out = tmp_path / f"tok{i}"
        assert (
            main("fit-tokenizer", ["--input", str(src), "--output", str(out), "--vocab-size", "16"])
            == 0
        )
        ids.append(Tokenizer.load(str(out)).tokenizer_id)
        assert not os.path.exists(out / "_beat_sample.npy")
    assert ids[0] == ids[1]
    out = tmp_path / "tok_seed1"
    main(
        "fit-tokenizer",
        ["--input", str(src), "--output", str(out), "--vocab-size", "16", "--seed", "1"],
    )
    assert Tokenizer.load(str(out)).tokenizer_id != ids[0]


@pytest.mark.slow
def test_fidelity_prints_one_json_object(tmp_path, capsys):
    from ecgtok.models.train import main

    src = tmp_path / "src"
    for name in ("E00001", "E00002"):
        copy_record(data_path("cinc2021_12lead", "G12EC", name + ".hea"), str(src))
    assert main("fidelity", ["--input", str(src), "--workers", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    for key in ("median_r", "p10_r", "prd_median", "codes_used_fraction", "perplexity", "n_beats"):
        assert key in res
    assert res["n_beats"] > 100
    assert 0.85 < res["median_r"] <= 1.0
    assert res["p10_r"] <= res["median_r"]
    assert 0 < res["codes_used_fraction"] <= 1
    assert res["rhythm_rr_rel_error_median"] < 0.1
    # the shipped tokenizer's atrial words, scored on the same beats
    assert res["atrial_codebook_size"] == Tokenizer.load(default_tokenizer_dir()).atrial_size > 0
    assert res["atrial_windows"] > 100
    assert 0.6 < res["atrial_median_r"] <= 1.0 and res["atrial_p10_r"] <= res["atrial_median_r"]


def test_window_median_is_np_median_bit_for_bit():
    from ecgtok.transforms.windows import _window_median

    rng = np.random.default_rng(0)
    for trial in range(300):
        shape = (int(rng.integers(1, 20)), int(rng.integers(1, 13)), int(rng.integers(1, 100)))
        w = rng.standard_normal(shape).astype(np.float32 if trial % 2 else np.float64)
        if trial % 5 == 0:
            w = np.round(w, 1)  # ties
        if trial % 7 == 0:
            w[0, 0, 0] = np.nan
        if trial % 11 == 0:
            w = -np.zeros_like(w)  # -0.0: np.median gives +0.0
        want = np.median(w, axis=2, keepdims=True)
        got = _window_median(w)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_inversion_map_gives_the_words_of_a_lead_recorded_upside_down():
    """A real AliveCor lead and the same lead negated (the device held the other way):
    each word mapped by `inversion_map` has about the waveform of the word the negated
    lead actually gets, for morphology and atrial words alike."""
    import wfdb

    from ecgtok.transforms.qrs import detect_r_peaks

    tok = Tokenizer.load(default_tokenizer_dir())
    inv = tok.inversion_map()
    assert inv.shape == (tok.vocab_size,)
    assert np.array_equal(inv[: tok.morph_offset], np.arange(tok.morph_offset))  # specials
    rec = wfdb.rdrecord(data_path("cinc2017_af", "A00005.hea")[: -len(".hea")])
    x = rec.p_signal.astype(np.float32)
    r = detect_r_peaks(x, rec.fs)
    assert np.array_equal(r, detect_r_peaks(-x, rec.fs))
    words, _, atrial = tok.encode_beats(x, rec.fs, r)
    words_neg, _, atrial_neg = tok.encode_beats(-x, rec.fs, r)
    ok = (words >= tok.morph_offset) & (words_neg >= tok.morph_offset)
    assert ok.sum() > 50
    mapped, actual = tok.decode(inv[words[ok]]), tok.decode(words_neg[ok])
    assert np.median(T.pearson_r(mapped, actual)) > 0.9
    assert np.median(T.pearson_r(tok.decode(words[ok]), actual)) < -0.9  # the words change
    ok = (atrial >= tok.atrial_offset) & (atrial_neg >= tok.atrial_offset)
    mapped, actual = tok.decode_atrial(inv[atrial[ok]]), tok.decode_atrial(atrial_neg[ok])
    assert np.median(T.pearson_r(mapped, actual)) > 0.85


def test_window_shaping_equals_its_plain_formula():
    """`shape_windows` (alignment by a sliding view, energy and division through one
    float64 buffer) gives the numbers of the plain formula, bit for bit, on real beats
    and on zero, NaN and huge windows."""
    from ecgtok.models.tokenizer import DEFAULT_VIEW, shape_windows, view_signal
    from ecgtok.transforms import windows as W
    from ecgtok.transforms.qrs import detect_r_peaks
    from ecgtok.transforms.wfdb_reader import read_record

    rec = read_record(data_path("cinc2021_12lead", "G12EC", "E00001.hea"))
    peaks = W.to_window_rate(detect_r_peaks(rec.signal, rec.fs), rec.fs)
    wins = W.beat_windows(view_signal(rec.signal, rec.fs, DEFAULT_VIEW), peaks)
    wins = np.concatenate([wins, wins[:3]])
    wins[-3] = 0.0
    wins[-2, 4, 20] = np.nan
    wins[-1] *= 1e6

    def plain(w, m, norm):
        n = w.shape[2]
        shift = np.abs(w[:, :, W.R_INDEX - m : W.R_INDEX + m + 1]).argmax(axis=2) - m
        idx = np.arange(n)[None, None, :] + shift[:, :, None]
        out = np.take_along_axis(w, np.clip(idx, 0, n - 1), axis=2)
        w = np.where((idx >= 0) & (idx < n), out, 0.0).astype(np.float32)
        if norm == "zl2":
            w = w - w.mean(axis=2, keepdims=True, dtype=np.float64).astype(np.float32)
        energy = np.sqrt((w.astype(np.float64) ** 2).sum(axis=2, keepdims=True))
        return np.where(energy > 1e-6, w / np.maximum(energy, 1e-6), 0.0).astype(np.float32)

    for norm in ("zl2", "l2"):
        view = {**DEFAULT_VIEW, "align_samples": 4, "beat_norm": norm}
        got = shape_windows(wins, view)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, plain(wins, 4, norm))
