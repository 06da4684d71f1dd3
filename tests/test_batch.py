"""Records tokenized in batches give the same rows as one record at a time.

The guarded child tokenizes a batch of records at once: short records of one shape go
through every stage together (`record_tokens.tokenize_batch`), and the rows come back as
one Arrow table (`token_table.segments_table`). None of that may change a token.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pytest
from conftest import data_path

from ecgtok.models.tokenizer import Tokenizer
from ecgtok.pipeline.flags import default_tokenizer_dir
from ecgtok.transforms import record_tokens
from ecgtok.transforms.beats import FLAG_FLAT, FLAG_SATURATED, beat_quality, beat_quality_many
from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.qrs import detect_r_peaks, detect_r_peaks_many, lead_major_stack
from ecgtok.transforms.record_tokens import FAILED, ROWS, START, record_segments, tokenize_batch
from ecgtok.transforms.schemas import token_schema
from ecgtok.transforms.token_table import segment_row
from ecgtok.transforms.wfdb_reader import read_record

KEY = [("record_id", "ascending"), ("start_sample", "ascending")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(default_tokenizer_dir())


def _heas(folder: str, n: int) -> list[str]:
    return sorted(glob.glob(os.path.join(data_path(folder), "**", "*.hea"), recursive=True))[:n]


def _requests(heas: list[str]) -> list[tuple]:
    return [(h, os.path.basename(h)[:-4], 300.0, {}) for h in heas]


def _one_at_a_time(requests: list[tuple], tok: Tokenizer) -> pa.Table:
    rows = [
        segment_row(s)
        for path, rid, seg, extra in requests
        for s in record_segments(path, rid, tok, seg, extra)
    ]
    return pa.Table.from_pylist(rows, token_schema()).sort_by(KEY)


def _batched(requests: list[tuple], tok: Tokenizer, tables: list | None = None):
    tables, failed, starts = [] if tables is None else tables, {}, []
    for kind, indices, payload in tokenize_batch(requests, tok):
        if kind == START:
            starts.append(indices)
        elif kind == FAILED:
            failed[indices[0]] = payload
        elif kind == ROWS:
            tables.append(payload)
    table = pa.concat_tables(tables).sort_by(KEY) if tables else None
    return table, failed, starts


def test_detection_of_records_together_equals_one_at_a_time():
    for folder, n in (("cinc2021_12lead", 40), ("cinc2017_af", 120)):
        records = [read_record(h) for h in _heas(folder, n)]
        groups: dict = {}
        for rec in records:
            groups.setdefault((rec.fs, rec.signal.shape), []).append(rec)
        many = [g for g in groups.values() if len(g) > 1]
        assert many, f"no two {folder} records of one shape"
        for group in many:
            signals = [r.signal for r in group]
            fs = group[0].fs
            got = detect_r_peaks_many(signals, fs)
            for sig, peaks in zip(signals, got, strict=True):
                np.testing.assert_array_equal(peaks, detect_r_peaks(sig, fs))


def test_detection_together_keeps_each_records_own_bad_samples():
    """A lead off (NaN), flat or clipped in one record must not change another's beats
    or flags."""
    records = [read_record(h) for h in _heas("cinc2021_12lead", 30)]
    same = [r.signal for r in records if r.signal.shape == (5000, 12)][:4]
    assert len(same) == 4
    same[1] = same[1].copy()
    same[1][1000:3000, 2] = np.nan
    same[2] = same[2].copy()
    same[2][:, 5] = 0.0
    same[3] = same[3].copy()
    same[3][:, 1] = np.minimum(same[3][:, 1], 0.2)  # clipped at a rail
    got = detect_r_peaks_many(same, 500.0)
    for sig, peaks in zip(same, got, strict=True):
        np.testing.assert_array_equal(peaks, detect_r_peaks(sig, 500.0))
    # beat quality too: each record's flags as alone, and the flags do see the faults
    flags = beat_quality_many(lead_major_stack(same), 500.0, got)
    for sig, peaks, f in zip(same, got, flags, strict=True):
        np.testing.assert_array_equal(f, beat_quality(sig, 500.0, peaks))
    assert (flags[1] & FLAG_FLAT).any() and (flags[3] & FLAG_SATURATED).any()
    assert not (flags[0] & (FLAG_FLAT | FLAG_SATURATED)).any()
    with pytest.raises(ValueError, match="one"):
        detect_r_peaks_many([same[0], same[0][:100]], 500.0)


def test_a_mixed_batch_gives_the_rows_of_one_record_at_a_time(tok, tmp_path):
    """12-lead records of several shapes, single-lead ones, a long record (tokenized on
    its own) and a broken one: the same rows, and the broken one alone fails."""
    heas = _heas("cinc2021_12lead", 20) + _heas("cinc2017_af", 12) + [data_path("mitdb", "100.hea")]
    broken = tmp_path / "broken.hea"
    broken.write_text("broken 1 250 1000\nbroken.dat 16 200 16 0 0 0 0 II\n")  # no .dat
    requests = _requests(heas)
    requests.insert(7, (str(broken), "broken", 300.0, {}))
    tables: list = []
    got, failed, starts = _batched(requests, tok, tables)
    assert list(failed) == [7] and isinstance(failed[7], RecordError)
    # the long record's rows came at once, in a table of their own (memory stays bounded
    # in a batch of long records)
    assert any(set(t.column("record_id").to_pylist()) == {"100"} for t in tables)
    assert failed[7].stage == "read"
    del requests[7]
    want = _one_at_a_time(requests, tok)
    assert got.equals(want)
    # short records of one shape were worked on together (a START naming several)
    assert any(len(s) > 1 for s in starts)
    assert got.column("record_id").to_pylist().count("100") == len(
        want.filter(pa.compute.equal(want.column("record_id"), "100"))
    )


def test_when_a_group_fails_each_record_is_tried_alone(tok, monkeypatch):
    heas = _heas("cinc2021_12lead", 10)
    requests = _requests(heas)
    want = _one_at_a_time(requests, tok)

    def broken_group(*_args):
        raise RuntimeError("a bug in the batched stages")

    monkeypatch.setattr(record_tokens, "_same_shape_segments", broken_group)
    got, failed, starts = _batched(requests, tok)
    assert not failed and got.equals(want)
    groups = [k for k, s in enumerate(starts) if len(s) > 1]
    assert groups, "no group was tried"
    alone = [s[0] for s in starts[groups[0] + 1 :] if len(s) == 1]
    assert set(starts[groups[0]]) <= set(alone), "each record of the group again, alone"


def test_the_nearest_word_is_the_nearest_in_exact_arithmetic(tok):
    """The codebook search (one float32 product with |c|^2 / 2 folded in) finds the word
    nearest in float64, wherever the best two words are not tied to float32 rounding."""
    records = [read_record(h) for h in _heas("cinc2021_12lead", 12)]
    wins = np.concatenate(
        [tok.beat_windows(r.signal, r.fs, detect_r_peaks(r.signal, r.fs)) for r in records]
    ).reshape(-1, 96)
    got = tok.assign(wins)
    x = wins.astype(np.float64)
    c = tok.codebook.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    best = d.argmin(axis=1)
    top2 = np.sort(d, axis=1)[:, :2]
    differs = got != best
    assert wins.shape[0] > 1500
    assert not differs[(top2[:, 1] - top2[:, 0]) > 1e-4].any()
    assert differs.mean() < 0.001


def hang_in_a_group(requests):
    """A guard's batch work: all records at once, and the group hangs if it holds
    'hang'; alone, only 'hang' hangs."""
    import time

    ids = [r[1] for r in requests]
    everyone = list(range(len(requests)))
    yield START, everyone, None
    if "hang" in ids:
        time.sleep(3600)
    yield ROWS, everyone, [{"record_id": i} for i in ids]


def test_a_hang_in_a_group_lands_on_its_record_alone():
    from ecgtok.transforms.isolation import GuardedTokenizer

    ids = ["a", "hang", "b", "c"]
    guard = GuardedTokenizer(default_tokenizer_dir(), 2, 0, batch_work=hang_in_a_group)
    try:
        out = list(guard.tokenize_many([("p", rid, 300.0, {}) for rid in ids]))
    finally:
        guard.close()
    answered = sorted(i for indices, _ in out for i in indices)
    assert answered == [0, 1, 2, 3], "every record answered once"
    for indices, outcome in out:
        if indices == [1]:
            assert isinstance(outcome, RecordError) and outcome.error_type == "timeout"
        else:
            assert outcome == [{"record_id": ids[i]} for i in indices]


def which_child(requests):
    """A guard's batch work: answers after a while with the process that did it."""
    import time

    everyone = list(range(len(requests)))
    yield START, everyone, None
    time.sleep(0.3)
    yield ROWS, everyone, os.getpid()


def test_the_pool_spreads_one_callers_batches_over_every_child():
    """Beam gives each worker thread an equal share of the records; with the pool, the
    batches of a thread still working go to whichever child is idle."""
    import queue

    from ecgtok.transforms.isolation import ChildPool

    # two users (two DoFns), so two children
    pools = [
        ChildPool.acquire(default_tokenizer_dir(), 30, 0, batch_work=which_child) for _ in "ab"
    ]
    assert pools[0] is pools[1] and pools[0].children == 2
    replies: queue.Queue = queue.Queue()
    try:
        for tag in range(4):  # all from one caller
            pools[0].submit([("p", f"r{tag}", 300.0, {})], replies, tag)
        answers = [replies.get(timeout=60) for _ in range(4)]
    finally:
        for pool in pools:
            pool.release()
    assert sorted(tag for tag, _ in answers) == [0, 1, 2, 3]
    pids = {outcomes[0][1] for _, outcomes in answers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert pools[0].children == 0


def test_windows_of_recordings_together_equal_each_alone(tok):
    """Beat and atrial windows cut for several recordings at once (one with no beat, one
    with a single beat, beats at both edges) equal those cut one recording at a time."""
    from ecgtok.models.tokenizer import view_signals
    from ecgtok.transforms import windows as W
    from ecgtok.transforms.atrial import atrial_windows, atrial_windows_many

    records = [read_record(h) for h in _heas("cinc2021_12lead", 30)]
    signals = [r.signal for r in records if r.signal.shape == (5000, 12)][:5]
    clean = view_signals(signals, 500.0, tok.view)
    n = clean.shape[0]
    peaks = [
        W.to_window_rate(detect_r_peaks(signals[0], 500.0), 500.0),
        np.zeros(0, dtype=np.int64),
        np.array([n // 2]),
        np.array([0, 3, 40, n - 30, n - 1]),
        W.to_window_rate(detect_r_peaks(signals[4], 500.0), 500.0),
    ]
    alone_beats = [W.beat_windows(clean[:, i], p) for i, p in enumerate(peaks)]
    alone_atrial = [atrial_windows(clean[:, i], p) for i, p in enumerate(peaks)]
    np.testing.assert_array_equal(W.beat_windows_many(clean, peaks), np.concatenate(alone_beats))
    np.testing.assert_array_equal(atrial_windows_many(clean, peaks), np.concatenate(alone_atrial))


def fail_one_then_crash(requests):
    """A guard's batch work: announces every record, fails 'bad' at once, then crashes
    if the batch holds 'crash' (as a group's stage would); alone, each does its own."""
    import ctypes

    from ecgtok.transforms.errors import RecordError

    ids = [r[1] for r in requests]
    yield START, list(range(len(ids))), None
    for i, rid in enumerate(ids):
        if rid == "bad":
            yield FAILED, [i], RecordError("read", "bad_header", "bad record")
    if "crash" in ids:
        ctypes.string_at(0)
    good = [i for i, rid in enumerate(ids) if rid != "bad"]
    if good:
        yield ROWS, good, [{"record_id": ids[i]} for i in good]


def test_a_record_answered_before_a_crash_is_not_answered_again():
    """The child failed one record, then died while it was on all of them: the others are
    run again alone and the crash lands on its record; the failed one keeps its one
    error row."""
    from ecgtok.transforms.isolation import GuardedTokenizer

    ids = ["a", "bad", "crash", "b"]
    guard = GuardedTokenizer(default_tokenizer_dir(), 30, 0, batch_work=fail_one_then_crash)
    try:
        out = list(guard.tokenize_many([("p", rid, 300.0, {}) for rid in ids]))
    finally:
        guard.close()
    answered = sorted(i for indices, _ in out for i in indices)
    assert answered == [0, 1, 2, 3], out
    by_id = {ids[i]: o for indices, o in out for i in indices}
    assert isinstance(by_id["bad"], RecordError) and by_id["bad"].error_type == "bad_header"
    assert isinstance(by_id["crash"], RecordError) and by_id["crash"].error_type == "worker_crashed"
    assert by_id["a"] == [{"record_id": "a"}] and by_id["b"] == [{"record_id": "b"}]
