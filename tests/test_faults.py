"""Faults: records that hang or need too much memory, and transient errors Beam retries."""

from __future__ import annotations

import os

import pytest
from conftest import copy_record, data_path
from test_pipeline import read_folder, summary_of

from ecgtok.pipeline.cli import main as cli

GOOD = ["G12EC/E00001", "G12EC/E00002"]


@pytest.fixture()
def archive(tmp_path):
    root = data_path("cinc2021_12lead")
    arch = tmp_path / "archive"
    for rid in GOOD:
        folder, name = os.path.split(rid)
        copy_record(os.path.join(root, rid + ".hea"), str(arch / folder), name)
    return arch


def _header(path, name: str, fmt: str, n_samples: int | None, dat: str) -> None:
    length = f" {n_samples}" if n_samples is not None else ""
    with open(path / f"{name}.hea", "w") as f:
        f.write(f"{name} 1 250{length}\n{dat} {fmt} 200 16 0 0 0 0 II\n")


def hang_forever(*_args):
    import time

    while True:
        time.sleep(1)


def crash_hard(*_args):
    import ctypes

    ctypes.string_at(0)  # a segfault, as a broken C decoder would give


def test_guard_turns_a_hang_and_a_crash_into_error_rows_and_recovers(tmp_path):
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.isolation import GuardedTokenizer

    rec = data_path("cinc2021_12lead", "G12EC", "E00001.hea")
    for work, kind in ((hang_forever, "timeout"), (crash_hard, "worker_crashed")):
        guard = GuardedTokenizer(default_tokenizer_dir(), timeout_s=5, memory_mb=0, work=work)
        with pytest.raises(RecordError) as info:
            guard.tokenize(rec, "x", 300.0, {})
        assert (info.value.stage, info.value.error_type) == ("limits", kind)
        # The next record gets a fresh child and is processed normally.
        guard._work = GuardedTokenizer(default_tokenizer_dir(), 5, 0)._work
        rows = guard.tokenize(rec, "G12EC/E00001", 300.0, {}).to_pylist()
        assert rows and rows[0]["record_id"] == "G12EC/E00001" and len(rows[0]["r_peaks"]) > 5
        guard.close()


def hang_or_crash_on_some(source_path, record_id, *_args):
    """Answers most records; hangs on 'hang', crashes on 'crash', fails on 'bad'."""
    import ctypes
    import time

    if record_id == "hang":
        time.sleep(3600)
    if record_id == "crash":
        ctypes.string_at(0)
    if record_id == "bad":
        return "error", ("read", "not_a_header", "bad record")
    return "ok", [{"record_id": record_id}]


def test_a_batch_keeps_going_past_a_hang_and_a_crash_in_its_middle():
    """Records are pipelined to the child in batches; one that hangs or kills the child
    costs its own error row, and every other record of the batch is still answered."""
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.isolation import GuardedTokenizer

    ids = ["a", "hang", "b", "bad", "crash", "c", "d"]
    guard = GuardedTokenizer(default_tokenizer_dir(), 3, 0, work=hang_or_crash_on_some)
    try:
        out = list(guard.tokenize_many([("p", rid, 300.0, {}) for rid in ids]))
    finally:
        guard.close()
    assert [i for (i,), _ in out] == list(range(len(ids)))
    got = dict(zip(ids, (o for _, o in out), strict=True))
    for rid in ("a", "b", "c", "d"):
        assert got[rid] == [{"record_id": rid}]
    assert isinstance(got["hang"], RecordError) and got["hang"].error_type == "timeout"
    assert isinstance(got["crash"], RecordError) and got["crash"].error_type == "worker_crashed"
    assert isinstance(got["bad"], RecordError) and got["bad"].error_type == "not_a_header"


def test_an_abandoned_batch_does_not_leak_answers_into_the_next():
    """The caller stops reading a batch half-way (a transient error it re-raises, say):
    the next batch must get its own answers, not the rest of the old batch's."""
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.isolation import GuardedTokenizer

    guard = GuardedTokenizer(default_tokenizer_dir(), 30, 0, work=hang_or_crash_on_some)
    try:
        first = guard.tokenize_many([("p", rid, 300.0, {}) for rid in ("a", "b", "c")])
        assert next(first) == ([0], [{"record_id": "a"}])
        # `first` is left suspended with answers for b and c in flight
        again = list(guard.tokenize_many([("p", rid, 300.0, {}) for rid in ("x", "y")]))
        assert again == [([0], [{"record_id": "x"}]), ([1], [{"record_id": "y"}])]
    finally:
        guard.close()


def storage_hiccup(*_args):
    raise ConnectionError("injected transient fault")


def test_guard_hands_a_transient_error_back_so_beam_can_retry():
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.isolation import GuardedTokenizer

    guard = GuardedTokenizer(default_tokenizer_dir(), 30, 0, work=storage_hiccup)
    try:
        with pytest.raises(ConnectionError, match="injected transient fault"):
            guard.tokenize("any.hea", "x", 300.0, {})
        # the child survives a raised error: no new process for the next record
        child = guard._child
        with pytest.raises(ConnectionError):
            guard.tokenize("any.hea", "y", 300.0, {})
        assert guard._child is child and child.is_alive()
    finally:
        guard.close()
    assert guard._child is None


def test_a_record_too_big_for_its_memory_bound_becomes_an_error_row(archive, tmp_path, capsys):
    bad = archive / "bad"
    bad.mkdir()
    n = 400_000_000  # 800 MB of int16 on disk (sparse), gigabytes once decoded to float
    with open(bad / "huge.dat", "wb") as f:
        f.truncate(2 * n)
    _header(bad, "huge", "16", n, "huge.dat")
    dst = str(tmp_path / "out")
    # Records stream in segments, so only a segment this long needs the memory at once.
    args = ["tokenize", "--input", str(archive), "--output", dst, "--record_memory_mb=1500"]
    code = cli([*args, "--segment_seconds=2000000"])
    capsys.readouterr()
    assert code == 0
    (err,) = read_folder(os.path.join(dst, "errors"))
    assert err["record_id"] == "bad/huge"
    assert err["error_type"] in ("out_of_memory", "worker_crashed", "MemoryError")
    assert sorted(r["record_id"] for r in read_folder(os.path.join(dst, "tokens"))) == GOOD


def test_transient_failures_are_retried_without_duplicates_or_losses(
    archive, tmp_path, monkeypatch, capsys
):
    """A storage hiccup on the first attempt of each record: Beam retries the bundle."""
    from ecgtok.transforms import record_tokens

    real = record_tokens.open_record
    attempts: dict[str, int] = {}

    def flaky_open(path, record_id=None):
        attempts[record_id] = attempts.get(record_id, 0) + 1
        if attempts[record_id] == 1:
            raise ConnectionError(f"injected transient fault reading {record_id}")
        return real(path, record_id)

    monkeypatch.setattr(record_tokens, "open_record", flaky_open)
    dst = str(tmp_path / "out")
    args = ["run", "--input", str(archive), "--output", dst]
    # The bundle-based DirectRunner retries failed bundles; in-process so the patch applies.
    args += ["--runner=BundleBasedDirectRunner", "--isolation=none"]
    assert cli(args) == 0
    capsys.readouterr()
    assert all(n >= 2 for n in attempts.values()) and len(attempts) == len(GOOD)
    tokens = read_folder(os.path.join(dst, "tokens"))
    scores = read_folder(os.path.join(dst, "scores"))
    assert sorted(r["record_id"] for r in tokens) == GOOD
    assert sorted(r["record_id"] for r in scores) == GOOD
    s = summary_of(dst)
    assert s["tokenized"] == 2 and s["failed"] == 0 and s["scored"] == 2


def _wait_for(path_glob: str, timeout_s: float) -> bool:
    import glob
    import time

    end = time.time() + timeout_s
    while time.time() < end:
        if glob.glob(path_glob):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_a_killed_run_is_resumed_or_rerun_into_exactly_one_complete_set(tmp_path, how, capsys):
    import signal
    import subprocess
    import sys

    root = data_path("cinc2021_12lead")
    arch = tmp_path / "archive"
    ids = ["G12EC/E00001", "G12EC/E00002", "G12EC/E00003", "G12EC/E00004", "G12EC/E00005"]
    for rid in ids:
        folder, name = os.path.split(rid)
        copy_record(os.path.join(root, rid + ".hea"), str(arch / folder), name)
    dst = tmp_path / "out"
    job = ["tokenize", "--input", str(arch), "--output", str(dst), "--chunk_records=2"]
    job += ["--isolation=none"]  # resuming does not depend on it; keeps the test quick
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecgtok.pipeline.cli", *job],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert _wait_for(str(dst / "_staging" / "*" / "chunks" / "00000" / "_DONE"), 120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (dst / "tokens").exists(), "nothing is promoted before the run completes"
    if how == "resume":
        assert cli([*job, "--resume"]) == 0
    else:
        assert cli([*job, "--overwrite"]) == 0
    capsys.readouterr()
    rows = read_folder(str(dst / "tokens"))
    assert sorted(r["record_id"] for r in rows) == ids  # each exactly once
    s = summary_of(str(dst))
    assert s["discovered"] == s["tokenized"] == 5
    if how == "resume":
        assert s["chunks_resumed"] >= 1
    assert sorted(os.listdir(dst)) == ["errors", "summary.json", "tokens"]
