"""The beat-matching rule of `ecgtok eval-beats` on hand-made cases, and the command."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_path

from ecgtok.pipeline.eval_beats import main
from ecgtok.transforms.beat_eval import (
    BEAT_SYMBOLS,
    Score,
    match_beats,
    reference_beats,
    score_record,
    vf_episodes,
)


def test_exact_and_within_tolerance():
    assert match_beats([100, 200, 300], [100, 205, 295], 10) == (3, 0, 0)


def test_tolerance_is_inclusive():
    assert match_beats([100], [110], 10) == (1, 0, 0)
    assert match_beats([100], [111], 10) == (0, 1, 1)
    assert match_beats([100], [89], 10) == (0, 1, 1)


def test_one_to_one_two_detections_one_beat():
    # both detections are within the window, only one can match
    assert match_beats([100], [95, 104], 10) == (1, 0, 1)


def test_one_to_one_one_detection_two_beats():
    assert match_beats([100, 108], [104], 10) == (1, 1, 0)


def test_matching_is_maximal():
    # nearest-first matching would give beat 10 the detection at 15 and leave beat 20
    # without one; the rule finds both pairs
    assert match_beats([10, 20], [14, 15], 5) == (2, 0, 0)
    assert match_beats([0, 10], [5, 14], 5) == (2, 0, 0)


def test_unsorted_and_empty_inputs():
    assert match_beats([300, 100, 200], [201, 99, 302], 5) == (3, 0, 0)
    assert match_beats([], [1, 2], 5) == (0, 0, 2)
    assert match_beats([1, 2], [], 5) == (0, 2, 0)
    assert match_beats([], [], 5) == (0, 0, 0)


def test_negative_tolerance_is_refused():
    with pytest.raises(ValueError):
        match_beats([1], [1], -1)


def test_beat_symbols_are_the_issue_list():
    assert (
        set(
            [
                "N",
                "L",
                "R",
                "B",
                "A",
                "a",
                "J",
                "S",
                "V",
                "r",
                "F",
                "e",
                "j",
                "n",
                "E",
                "/",
                "f",
                "Q",
                "?",
            ]
        )
        == BEAT_SYMBOLS
    )
    for not_beat in ("+", "~", "|", "[", "]", "!", "x", '"', "T", "p", "t"):
        assert not_beat not in BEAT_SYMBOLS
    samples = [10, 20, 30, 40, 50]
    symbols = ["N", "+", "V", "~", "/"]
    assert reference_beats(samples, symbols).tolist() == [10, 30, 50]


def test_vf_episodes_and_an_unclosed_one():
    assert vf_episodes([5, 10, 20, 30, 40], ["N", "[", "!", "]", "["], n_samples=100) == [
        (10, 30),
        (40, 99),
    ]


def test_score_ignores_beats_and_detections_inside_vf():
    fs = 100.0
    samples = [100, 200, 300, 400, 500, 600, 700]
    symbols = ["N", "[", "!", "!", "]", "N", "N"]
    # the detector fires inside the episode (ignored) and misses beat 700
    det = [101, 250, 310, 420, 598]
    s = score_record(samples, symbols, det, fs, window=0.15)
    assert (s.tp, s.fn, s.fp) == (2, 1, 0)


def test_window_is_in_seconds():
    fs = 360.0
    ref, det = [1000], [1000 + int(0.14 * fs)]
    assert score_record(ref, ["N"], det, fs, 0.15).tp == 1
    assert score_record(ref, ["N"], det, fs, 0.10).tp == 0


def test_score_rates():
    s = Score(98, 2, 1) + Score(0, 0, 1)
    assert s.se == pytest.approx(0.98)
    assert s.ppv == pytest.approx(98 / 100)
    assert Score().se == 1.0 and Score().ppv == 1.0


def test_eval_beats_missing_folder(capsys, tmp_path):
    assert main(["--input", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_eval_beats_bad_arguments(capsys, tmp_path):
    assert main(["--input", str(tmp_path), "--compare", "pan-tompkins"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["--input", str(tmp_path), "--window", "0"]) == 2
    assert main([]) == 2  # --input is required
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("Traceback" not in e for e in err)


def test_eval_beats_empty_folder(capsys, tmp_path):
    assert main(["--input", str(tmp_path)]) == 2
    assert "no WFDB record" in capsys.readouterr().err


def test_eval_beats_unknown_record(capsys):
    folder = data_path("mitdb")
    assert main(["--input", folder, "--records", "100,999"]) == 2
    assert "999" in capsys.readouterr().err


def test_eval_beats_on_one_record(capsys):
    folder = data_path("mitdb")
    assert main(["--input", folder, "--records", "100", "--compare", "none"]) == 0
    out = capsys.readouterr().out
    assert "pooled, all records" in out and "M lead-samples/s" in out
    line = next(row for row in out.splitlines() if row.startswith("100 "))
    se, ppv = (float(v) for v in line.split()[2:4])
    assert se >= 99.9 and ppv >= 99.9


def test_match_beats_agrees_with_brute_force():
    # small random cases: compare with an exhaustive maximum matching
    from itertools import permutations

    rng = np.random.default_rng(0)
    for _ in range(200):
        ref = sorted(rng.integers(0, 60, rng.integers(0, 5)).tolist())
        det = sorted(rng.integers(0, 60, rng.integers(0, 5)).tolist())
        tol = int(rng.integers(0, 8))
        best = 0
        for perm in permutations(range(len(det))):
            k = sum(1 for i, j in zip(range(len(ref)), perm) if abs(ref[i] - det[j]) <= tol)
            best = max(best, k)
        if len(det) < len(ref):  # permutations of det cover every pairing only if det >= ref
            for perm in permutations(range(len(ref))):
                k = sum(1 for j, i in zip(range(len(det)), perm) if abs(ref[i] - det[j]) <= tol)
                best = max(best, k)
        assert match_beats(ref, det, tol)[0] == best, (ref, det, tol)
