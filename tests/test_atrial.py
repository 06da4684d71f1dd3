"""Atrial words: the atrial window, its codebook in the tokenizer artifact, and token rows."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from conftest import data_path

from ecgtok.models import tokenizer as T
from ecgtok.models.tokenizer import ArtifactError, Tokenizer, build_sentence, tokenizer_meta
from ecgtok.transforms import atrial as A
from ecgtok.transforms.record_tokens import find_beats, read_any


def _tokenizer_with_atrial(k: int = 8, a: int = 6, seed: int = 0) -> Tokenizer:
    rng = np.random.default_rng(seed)
    codebook = rng.normal(size=(k, 96)).astype(np.float32)
    atrial = (0.1 * rng.normal(size=(a, A.ATRIAL_LEN))).astype(np.float32)
    return Tokenizer(codebook, tokenizer_meta(k, seed, 100, "t"), atrial_codebook=atrial)


def _beats(fs: float, rr_s: float, seconds: float, p_amp: float) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic lead: R spikes every rr_s, each with a P wave p_amp high 0.16 s before."""
    t = np.arange(int(seconds * fs)) / fs
    r = np.arange(int(fs), t.size - int(fs), int(rr_s * fs))
    sig = np.zeros_like(t)
    for k in r:
        sig += np.exp(-(((t - k / fs) / 0.01) ** 2))
        sig += p_amp * np.exp(-(((t - k / fs + 0.16) / 0.025) ** 2))
    return sig[:, None], r


def test_atrial_window_holds_the_p_wave_relative_to_the_qrs():
    fs = 500.0
    for gain in (1.0, 3.0):
        sig, r = _beats(fs, 0.8, 12.0, 0.15)
        clean = T.view_signal(gain * sig, fs, T.DEFAULT_VIEW)
        w = A.atrial_windows(clean, np.rint(r * 100.0 / fs).astype(int))
        assert w.shape == (r.size, 1, A.ATRIAL_LEN)
        template = np.median(w[1:, 0], axis=0)
        peak = int(np.argmax(template))
        # the P wave sits 0.16 s before R: sample 40 - 16 = 24 of the window
        assert abs(peak - (-16 - A.ATRIAL_START)) <= 1
        if gain == 1.0:
            unit = template
        else:  # relative to the QRS: the gain of the recording does not matter
            np.testing.assert_allclose(template, unit, atol=1e-4)
    flat, r = _beats(fs, 0.8, 12.0, 0.0)
    w0 = A.atrial_windows(T.view_signal(flat, fs, T.DEFAULT_VIEW), np.rint(r / 5).astype(int))
    assert np.abs(np.median(w0[1:, 0], axis=0)).max() < 0.2 * unit.max()


def test_atrial_window_masks_the_previous_beats_t_wave_at_fast_rates():
    clean = np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32)
    r = np.array([100, 150, 200, 400])  # RR 0.5 s, 0.5 s, then 2 s
    w = A.atrial_windows(clean, r)
    idx = r[:, None] + np.arange(A.ATRIAL_START, A.ATRIAL_END)[None, :]
    # beat 1: samples before 100 + 0.6 * 50 = 130 belong to beat 0's ST-T
    assert not w[1, :, idx[1] < 130].any() and w[1, :, idx[1] >= 130].any()
    # beat 3 follows a 2 s pause: its whole window is after 200 + 40 = 240
    assert np.count_nonzero(w[3, 0]) == A.ATRIAL_LEN
    assert np.abs(w).max() <= 1.0


def test_atrial_codebook_round_trip_and_tamper_check(tmp_path):
    tok = _tokenizer_with_atrial()
    tid = tok.save(str(tmp_path))
    back = Tokenizer.load(str(tmp_path))
    assert back.tokenizer_id == tid
    np.testing.assert_array_equal(back.atrial_codebook, tok.atrial_codebook)
    assert back.atrial_offset == T.N_SPECIAL + T.N_RHYTHM + 8
    assert back.vocab_size == back.atrial_offset + 6
    ids = back.atrial_offset + np.array([0, 5])
    np.testing.assert_array_equal(back.decode_atrial(ids), tok.atrial_codebook[[0, 5]])
    assert not back.decode(ids).any()  # not morphology words
    data = bytearray((tmp_path / T.ATRIAL_FILE).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / T.ATRIAL_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content check"):
        Tokenizer.load(str(tmp_path))


def test_encode_atrial_picks_the_nearest_atrial_word_and_unk_for_noisy_beats():
    tok = _tokenizer_with_atrial()
    wins = tok.atrial_codebook[[4, 1, 1]][:, None, :] + 0.001
    words = tok.encode_atrial(wins, noisy=np.array([False, False, True]))
    assert words.tolist() == [[tok.atrial_offset + 4, tok.atrial_offset + 1, T.UNK]]


def test_sentence_reads_each_beats_atrial_word_before_its_morphology_word():
    words = np.array([[30, 31], [40, 41]])
    atrial = np.array([[60, 61], [70, 71]])
    sent, lead, beat = build_sentence(words, np.array([5, 9]), atrial)
    assert sent.tolist() == [T.CLS, 5, 9, T.SEP, 60, 30, 61, 31, T.SEP, 70, 40, 71, 41, T.SEP]
    assert lead.tolist()[9:13] == [1, 1, 1, 1]
    assert beat.tolist()[4:8] == [0, 0, 1, 1]


def _cinc2017(label: str, n: int) -> list[str]:
    folder = data_path("cinc2017_af")
    with open(os.path.join(folder, "REFERENCE.csv")) as f:
        ids = [rec for rec, lab in csv.reader(f) if lab == label]
    return [os.path.join(folder, rec + ".hea") for rec in ids[:n]]


def _template_peak(path: str) -> float:
    """Largest |value| of a record's median atrial window (relative to its QRS)."""
    rec = read_any(path, os.path.basename(path)[:-4])
    r, _ = find_beats(rec)
    clean = T.view_signal(rec.signal, rec.fs, T.DEFAULT_VIEW)
    w = A.atrial_windows(clean, np.rint(r * 100.0 / rec.fs).astype(int))
    return float(np.abs(np.median(w[1:, 0], axis=0)).max())


def test_sinus_records_show_a_p_wave_that_af_records_lack():
    """On real AliveCor records: the median atrial window of sinus rhythm holds a P wave;
    in AF (no P wave, fibrillatory waves that do not line up across beats) it is flatter."""
    normal = [_template_peak(p) for p in _cinc2017("N", 25)]
    af = [_template_peak(p) for p in _cinc2017("A", 25)]
    assert np.median(normal) > 1.5 * np.median(af)
    assert np.mean(np.array(normal)[:, None] > np.array(af)[None, :]) > 0.75


def test_shipped_tokenizer_writes_an_atrial_word_for_every_beat_of_every_lead():
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.record_tokens import tokenize_record

    tok = Tokenizer.load(default_tokenizer_dir())
    assert tok.atrial_size > 0
    path = data_path("cinc2021_12lead", "G12EC", "E00001.hea")
    (row,) = tokenize_record(path, "E00001", tok)
    atrial = np.asarray(row["atrial_tokens"])
    assert atrial.shape == np.asarray(row["tokens"]).shape == (12, len(row["r_peaks"]))
    ok = ((atrial >= tok.atrial_offset) & (atrial < tok.vocab_size)) | (atrial == T.UNK)
    assert ok.all()
    # the sentence holds each beat's atrial word right before its morphology word
    sentence = np.asarray(row["sentence"])
    n = len(row["r_peaks"])
    lead0 = sentence[n + 2 : n + 2 + 2 * n]
    assert lead0[0::2].tolist() == atrial[0].tolist()
    assert lead0[1::2].tolist() == row["tokens"][0]
