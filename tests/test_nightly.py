"""`ecgtok nightly`: incremental nights, accounting, idempotent reruns, lock, report, schedules.

The slow tests run the real command (cli -> Beam FnApiRunner -> Parquet) on a synthetic
WFDB archive; the fast ones check the pieces and the deploy files offline.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from gcs_emulator import gcs  # noqa: F401  (pytest fixture)

from ecgtok.models.model import load_model
from ecgtok.pipeline import nightly
from ecgtok.pipeline.cli import main as cli
from ecgtok.pipeline.flags import default_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
SCORE_COLS = ["p_af_max", "p_af_mean", "af_burden", "p_noisy_max", "n_segments", "n_beats"]


# ---- helpers ------------------------------------------------------------------------------
def write_cohort(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "patient_id", "rhythm"])
        w.writeheader()
        w.writerows(rows)
    return path


def manifest_rows(archive: str) -> list[dict]:
    with open(os.path.join(archive, "manifest.csv")) as f:
        return list(csv.DictReader(f))


def night(capsys, cohort: str, store: str, date: str, *more: str) -> dict:
    t0 = time.perf_counter()
    code = cli(["nightly", "--cohort", cohort, "--store", store, "--date", date, *more])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cohort records" in out
    with open(os.path.join(store, "reports", f"date={date}", "summary.json")) as f:
        summary = json.load(f)
    summary["_seconds"] = time.perf_counter() - t0
    return summary


def scores_of(store: str, date: str) -> list[dict]:
    folder = os.path.join(store, "scores", f"date={date}")
    files = sorted(os.listdir(folder))
    assert files == ["scores.parquet"], files  # one file: a rerun replaces, never adds
    return pq.read_table(os.path.join(folder, files[0])).to_pylist()


def check_accounting(s: dict, cohort: int) -> None:
    for key in ("cohort_records", "tokenized", "reused", "scored", "failed"):
        assert isinstance(s[key], int), key
    assert s["cohort_records"] == cohort
    assert s["cohort_records"] == s["tokenized"] + s["reused"] + s["failed"]
    assert s["model_id"] and s["tokenizer_id"]


def modify_signal(hea: str) -> None:
    """Change some samples of a record's (format 16) signal file, keeping it valid."""
    dat = hea[: -len(".hea")] + ".dat"
    data = np.fromfile(dat, dtype="<i2")
    mid = len(data) // 2
    data[mid : mid + 600] = -data[mid : mid + 600] + 7
    data.tofile(dat)


def token_folders(store: str) -> list[str]:
    return sorted(os.listdir(os.path.join(store, "tokens")))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    from ecgtok.transforms.synth import write_demo_archive

    root = str(tmp_path_factory.mktemp("nightly") / "archive")
    write_demo_archive(root, n_records=25, seed=3)
    return root


# ---- the three nights of the issue, plus a crash, a rerun and the report -----------------
@pytest.mark.slow
def test_three_nights_incremental_idempotent(archive, tmp_path, capsys):
    rows = manifest_rows(archive)
    assert len(rows) == 25
    cohort20 = write_cohort(os.path.join(archive, "cohort20.csv"), rows[:20])
    cohort25 = write_cohort(os.path.join(archive, "cohort25.csv"), rows)
    store = str(tmp_path / "store")

    # Night 1: everything is new.
    s1 = night(capsys, cohort20, store, "2026-03-01")
    check_accounting(s1, 20)
    assert (s1["tokenized"], s1["reused"], s1["failed"], s1["scored"]) == (20, 0, 0, 20)
    # The shipped model states its operating point; the report uses it.
    _, model_cfg = load_model(default_model_dir())
    assert s1["alert_threshold"] == model_cfg["p_af_threshold"]
    assert "model operating point" in s1["alert_threshold_source"]
    n1 = scores_of(store, "2026-03-01")
    assert sorted(r["record_id"] for r in n1) == sorted(r["path"][:-4] for r in rows[:20])
    by_id = {r["record_id"]: r for r in n1}
    for r in rows[:20]:  # the cohort's own columns are carried through
        rec = by_id[r["path"][:-4]]
        assert (rec["patient_id"], rec["rhythm"]) == (r["patient_id"], r["rhythm"])
        assert rec["status"] == "scored" and rec["change"] == "new"
        assert 0.0 <= rec["af_burden"] <= 1.0
        if rec["p_af_max"] is None:  # the flat record: no beats, so no rhythm score
            assert rec["n_beats"] == 0 and not rec["alert"]
        else:
            assert rec["p_af_mean"] <= rec["p_af_max"]
    holter = by_id["patient02/holter_0003"]  # 6 minutes: two 5-minute segments aggregated
    assert holter["n_segments"] == 2 and holter["duration_s"] == pytest.approx(360.0)
    assert len(token_folders(store)) == 1

    # What a night killed halfway leaves: a lock of a dead process, scratch space, an
    # orphan token folder. The next night must take over and clean up.
    with open(os.path.join(store, nightly.LOCK_FILE), "w") as f:
        json.dump({"run_id": "killed", "host": socket.gethostname(), "pid": dead_pid(),
                   "started_epoch": time.time()}, f)  # fmt: skip
    os.makedirs(os.path.join(store, "tokens", "run=killed"))
    shutil.copy(
        glob.glob(os.path.join(store, "tokens", "run=2*", "*.parquet"))[0],
        os.path.join(store, "tokens", "run=killed", "part-00000-of-00001.parquet"),
    )
    os.makedirs(os.path.join(store, "_staging", "killed"))

    # Night 2: nothing changed.
    s2 = night(capsys, cohort20, store, "2026-03-02")
    check_accounting(s2, 20)
    assert (s2["tokenized"], s2["reused"], s2["scored"]) == (0, 20, 20)
    n2 = scores_of(store, "2026-03-02")
    assert [[r[c] for c in SCORE_COLS] for r in n2] == [[r[c] for c in SCORE_COLS] for r in n1]
    assert all(r["change"] == "unchanged" and r["tokens"] == "reused" for r in n2)
    assert token_folders(store) == token_folders(store)[:1] and "run=killed" not in token_folders(
        store
    )
    assert not os.path.exists(os.path.join(store, nightly.LOCK_FILE))
    assert not os.path.exists(os.path.join(store, "_staging"))

    # Night 3: 5 records added, 1 modified; an alert threshold inside the score range.
    changed = rows[3]["path"]
    modify_signal(os.path.join(archive, changed))
    thr = float(np.median([r["p_af_max"] for r in n2 if r["p_af_max"] is not None]))
    s3 = night(capsys, cohort25, store, "2026-03-03", "--alert-threshold", str(thr))
    check_accounting(s3, 25)
    assert (s3["tokenized"], s3["reused"], s3["scored"], s3["failed"]) == (6, 19, 25, 0)
    ch = s3["changes"]
    assert ch["previous_date"] == "2026-03-02"
    assert ch["added"] == sorted(r["path"][:-4] for r in rows[20:])
    assert ch["modified"] == [changed[:-4]]
    n3 = scores_of(store, "2026-03-03")
    assert {r["record_id"]: r["change"] for r in n3 if r["change"] != "unchanged"} == {
        **{r["path"][:-4]: "new" for r in rows[20:]},
        changed[:-4]: "modified",
    }

    # The report names the patients above the threshold (and only them, in that section).
    with open(os.path.join(store, "reports", "date=2026-03-03", "index.html")) as f:
        page = f.read()
    assert "<svg" in page and "ecgtok nightly" in page
    section = page.split("Patients above the alert threshold")[1].split("<h2>")[0]
    above = {r["patient_id"] for r in n3 if r["alert"]}
    below = {r["patient_id"] for r in n3} - above
    assert above and below
    for pid in above:
        assert re.search(rf"<td>{re.escape(pid)}</td>", section), pid
    for pid in below:
        assert not re.search(rf"<td>{re.escape(pid)}</td>", section), pid
    assert s3["alerted_patients"] == len(above)

    # Rerunning the same date replaces its outputs, with the same scores.
    s3b = night(capsys, cohort25, store, "2026-03-03", "--alert-threshold", str(thr))
    check_accounting(s3b, 25)
    assert s3b["tokenized"] == 0 and s3b["reused"] == 25
    n3b = scores_of(store, "2026-03-03")
    assert len(n3b) == 25 and len({r["record_id"] for r in n3b}) == 25
    key = ["record_id", "alert", "patient_id", *SCORE_COLS]
    assert [[r[c] for c in key] for r in n3b] == [[r[c] for c in key] for r in n3]
    for sub in ("reports", "scores", "errors", "segments"):
        folder = os.path.join(store, sub, "date=2026-03-03")
        assert len(os.listdir(folder)) == (2 if sub == "reports" else 1), os.listdir(folder)
    print(
        f"\nnight 1 (20 tokenized): {s1['_seconds']:.1f} s (pipeline {s1['wall_seconds']:.1f} s); "
        f"night 2 (0 tokenized): {s2['_seconds']:.1f} s (pipeline {s2['wall_seconds']:.1f} s); "
        f"night 3 (6 tokenized): {s3['_seconds']:.1f} s"
    )


@pytest.mark.slow
def test_broken_record_failure_and_tokenizer_change(tmp_path, capsys, monkeypatch):
    from ecgtok.models.model import load_model, save_model
    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.pipeline.flags import default_model_dir, default_tokenizer_dir
    from ecgtok.transforms.synth import write_demo_archive

    arch = str(tmp_path / "archive")
    write_demo_archive(arch, n_records=5, seed=4)
    rows = manifest_rows(arch)
    broken = rows[4]["path"]
    dat = os.path.join(arch, broken[: -len(".hea")] + ".dat")
    with open(dat, "r+b") as f:  # a truncated signal file
        f.truncate(os.path.getsize(dat) // 3)
    cohort = write_cohort(os.path.join(arch, "cohort.csv"), rows)
    store = str(tmp_path / "store")

    s1 = night(capsys, cohort, store, "2026-04-01")
    check_accounting(s1, 5)
    assert (s1["tokenized"], s1["failed"], s1["scored"]) == (4, 1, 4)
    assert sum(sum(v.values()) for v in s1["failures"].values()) == 1
    n1 = {r["record_id"]: r for r in scores_of(store, "2026-04-01")}
    assert len(n1) == 5  # one row per cohort record, the failed one included
    bad = n1[broken[:-4]]
    assert bad["status"] == "failed" and bad["p_af_max"] is None and bad["error_type"]
    errors = pq.read_table(
        os.path.join(store, "errors", "date=2026-04-01", "errors.parquet")
    ).to_pylist()
    assert [e["record_id"] for e in errors] == [broken[:-4]]
    with open(os.path.join(store, "reports", "date=2026-04-01", "index.html")) as f:
        assert broken[:-4] in f.read()
    old_folders = token_folders(store)
    with open(os.path.join(store, nightly.STATE_FILE)) as f:
        state1 = f.read()

    # A night that fails in its last step leaves the previous state whole and no debris.
    def boom(*_args, **_kw):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(nightly, "aggregate", boom)
    assert cli(["nightly", "--cohort", cohort, "--store", store, "--date", "2026-04-02"]) == 1
    assert "simulated failure" in capsys.readouterr().err
    monkeypatch.undo()
    with open(os.path.join(store, nightly.STATE_FILE)) as f:
        assert f.read() == state1
    assert token_folders(store) == old_folders
    assert not os.path.exists(os.path.join(store, nightly.LOCK_FILE))
    assert not os.path.exists(os.path.join(store, "_staging", "x")) and not glob.glob(
        os.path.join(store, "_staging", "*")
    )
    assert not os.path.exists(os.path.join(store, "reports", "date=2026-04-02"))

    # A changed tokenizer re-tokenizes everything; the broken record is retried and fails.
    tok = Tokenizer.load(default_tokenizer_dir())
    rng = np.random.default_rng(0)
    codebook = tok.codebook + rng.normal(0, 0.05, tok.codebook.shape).astype(np.float32)
    new_dir = str(tmp_path / "tokenizer2")
    new_id = Tokenizer(codebook, dict(tok.meta)).save(new_dir)
    assert new_id != tok.tokenizer_id
    # The model reads one tokenizer's words: a tokenizer change comes with its model.
    code = cli(["nightly", "--cohort", cohort, "--store", store, "--tokenizer", new_dir])
    assert code == 2 and "pass the model trained on that tokenizer" in capsys.readouterr().err
    model, config = load_model(default_model_dir())
    model_dir = str(tmp_path / "model2")
    save_model(model, dict(config, tokenizer_id=new_id), model_dir)
    s2 = night(capsys, cohort, store, "2026-04-02", "--tokenizer", new_dir, "--model", model_dir)
    check_accounting(s2, 5)
    assert (s2["tokenized"], s2["reused"], s2["failed"], s2["scored"]) == (4, 0, 1, 4)
    assert s2["tokenizer_changed"] is True and s2["tokenizer_id"] == new_id
    n2 = {r["record_id"]: r for r in scores_of(store, "2026-04-02")}
    assert n2[broken[:-4]]["change"] == "retried"
    assert {r["change"] for k, r in n2.items() if k != broken[:-4]} == {"retokenized"}
    assert not set(old_folders) & set(token_folders(store))  # superseded tokens deleted
    with open(os.path.join(store, nightly.STATE_FILE)) as f:
        state = json.load(f)
    ok = [e for e in state["records"].values() if e["status"] == "ok"]
    assert len(ok) == 4 and {e["tokenizer_id"] for e in ok} == {new_id}

    # Token files lost from the store: those records fail tonight (the accounting holds)
    # and are marked for re-tokenizing, instead of pointing at nothing for ever.
    shutil.rmtree(os.path.join(store, "tokens"))
    s3 = night(capsys, cohort, store, "2026-04-03", "--tokenizer", new_dir, "--model", model_dir)
    check_accounting(s3, 5)
    assert (s3["tokenized"], s3["reused"], s3["failed"], s3["scored"]) == (0, 0, 5, 0)
    assert s3["failures"]["nightly"]["TokensMissing"] == 4
    with open(os.path.join(store, nightly.STATE_FILE)) as f:
        assert {e["status"] for e in json.load(f)["records"].values()} == {"failed"}


# ---- pieces, offline ---------------------------------------------------------------------
def _tiny_record(folder: str, name: str = "rec") -> str:
    os.makedirs(folder, exist_ok=True)
    hea = os.path.join(folder, name + ".hea")
    with open(hea, "w") as f:
        f.write(f"{name} 1 100 10\n{name}.dat 16 200 16 0 0 0 0 I\n")
    with open(os.path.join(folder, name + ".dat"), "wb") as f:
        f.write(bytes(range(20)))
    return hea


def test_fingerprint_follows_header_and_signal_bytes(tmp_path):
    hea = _tiny_record(str(tmp_path))
    fp = nightly.fingerprint(hea)
    size = os.path.getsize(hea) + 20  # header and signal bytes
    assert fp.startswith(f"{size}-") and fp == nightly.fingerprint(hea)
    with open(tmp_path / "other.txt", "w") as f:
        f.write("unrelated")
    assert nightly.fingerprint(hea) == fp
    with open(tmp_path / "rec.dat", "r+b") as f:
        f.seek(5)
        f.write(b"\xff")
    fp2 = nightly.fingerprint(hea)
    assert fp2 != fp and fp2.split("-")[0] == fp.split("-")[0]  # same size, other bytes
    with open(hea, "a") as f:
        f.write("# Age: 50\n")
    assert nightly.fingerprint(hea) != fp2
    os.remove(tmp_path / "rec.dat")
    assert nightly.fingerprint(hea).startswith("unreadable")


def test_plan_reasons():
    from ecgtok.pipeline.discovery import RecordRef

    refs = [RecordRef(r, f"/x/{r}.hea") for r in ("a", "b", "c", "d", "e")]
    fps = {"a": "1-x", "b": "1-y", "c": "1-z", "d": "1-w", "e": "1-v"}
    entry = {"status": "ok", "tokenizer_id": "T", "segment_seconds": 300.0}
    state = {
        "records": {
            "a": dict(entry, fingerprint="1-x"),
            "b": dict(entry, fingerprint="1-OLD"),
            "c": dict(entry, fingerprint="1-z", tokenizer_id="OLD"),
            "d": {"status": "failed", "fingerprint": "1-w"},
        }
    }
    reasons = nightly.plan_night(refs, fps, state, "T", 300.0)
    assert reasons == {
        "a": "unchanged",
        "b": "modified",
        "c": "retokenized",
        "d": "retried",
        "e": "new",
    }
    assert nightly.plan_night(refs[:1], fps, state, "T", 60.0) == {"a": "retokenized"}


def test_aggregate_max_and_burden():
    segs = [
        {"record_id": "r", "start_sample": 0, "p_af": 0.9, "p_noisy": 0.1,
         "p_other_rhythm": 0.2, "n_beats": 300, "model_id": "m"},
        {"record_id": "r", "start_sample": 30000, "p_af": 0.2, "p_noisy": 0.3,
         "p_other_rhythm": 0.1, "n_beats": 100, "model_id": "m"},
    ]  # fmt: skip
    info = [
        {"record_id": "r", "start_sample": 0, "n_samples": 30000, "fs": 100.0},
        {"record_id": "r", "start_sample": 30000, "n_samples": 10000, "fs": 100.0},
    ]
    agg = nightly.aggregate(segs, info, 0.5)["r"]
    assert agg["p_af_max"] == 0.9 and agg["af_burden"] == 0.75
    assert agg["p_af_mean"] == pytest.approx(0.725) and agg["n_beats"] == 400
    assert agg["n_segments"] == 2 and agg["n_segments_af"] == 1 and agg["duration_s"] == 400.0


def test_aggregate_uses_window_burden_and_joins_episodes_across_segments():
    ep = lambda a, b: {"start_sample": a, "end_sample": b}  # noqa: E731
    segs = [
        {"record_id": "h", "start_sample": 0, "p_af": 0.9, "n_beats": 400, "model_id": "m",
         "af_burden": 0.5, "af_episodes": [ep(15000, 30000)]},
        {"record_id": "h", "start_sample": 30000, "p_af": 0.8, "n_beats": 400, "model_id": "m",
         "af_burden": 0.25, "af_episodes": [ep(30500, 38000)]},
        {"record_id": "h", "start_sample": 60000, "p_af": 0.9, "n_beats": 10, "model_id": "m",
         "af_burden": None, "af_episodes": []},
    ]  # fmt: skip
    info = [
        {"record_id": "h", "start_sample": 0, "n_samples": 30000, "fs": 100.0},
        {"record_id": "h", "start_sample": 30000, "n_samples": 30000, "fs": 100.0},
        {"record_id": "h", "start_sample": 60000, "n_samples": 1000, "fs": 100.0},
    ]
    agg = nightly.aggregate(segs, info, 0.5)["h"]
    # (0.5 * 300 s + 0.25 * 300 s + 1.0 * 10 s) / 610 s: the short tail counts by its p_af
    assert agg["af_burden"] == pytest.approx((150 + 75 + 10) / 610, abs=1e-4)
    # 30000 -> 30500 is 5 s: one episode across the segment edge
    assert agg["af_episodes"] == [ep(15000, 38000)]


def test_aggregate_a_record_without_beats_has_no_p_af_and_no_alert_value():
    segs = [{"record_id": "f", "start_sample": 0, "p_af": None, "p_noisy": 0.5,
             "p_other_rhythm": None, "n_beats": 0, "model_id": "m"}]  # fmt: skip
    info = [{"record_id": "f", "start_sample": 0, "n_samples": 2500, "fs": 250.0}]
    agg = nightly.aggregate(segs, info, 0.15)["f"]
    assert agg["p_af_max"] is None and agg["p_af_mean"] is None and agg["af_burden"] == 0.0
    # a flat tail segment does not dilute the scored segment's mean
    segs.append({"record_id": "f", "start_sample": 2500, "p_af": 0.8, "n_beats": 12,
                 "model_id": "m"})  # fmt: skip
    info.append({"record_id": "f", "start_sample": 2500, "n_samples": 2500, "fs": 250.0})
    agg = nightly.aggregate(segs, info, 0.15)["f"]
    assert agg["p_af_max"] == 0.8 and agg["p_af_mean"] == 0.8 and agg["af_burden"] == 0.5


def test_operating_point_from_model_config():
    assert nightly.operating_point({"operating_point": 0.3})[0] == 0.3
    assert nightly.operating_point({"p_af_threshold": 0.0834})[0] == 0.0834  # as shipped
    assert nightly.operating_point({"operating_point": {"p_af": 0.7}})[0] == 0.7
    thr, why = nightly.operating_point({})
    assert thr == 0.5 and "default" in why


def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    store = str(tmp_path)
    nightly.acquire_lock(store, "one", "2026-01-01", False, 12.0)
    with pytest.raises(nightly.LockHeld, match="locked by another nightly run"):
        nightly.acquire_lock(store, "two", "2026-01-01", False, 12.0)
    assert not nightly.release_lock(store, "two")  # only the holder releases
    assert nightly.release_lock(store, "one")
    with open(os.path.join(store, nightly.LOCK_FILE), "w") as f:
        json.dump({"run_id": "dead", "host": socket.gethostname(), "pid": dead_pid(),
                   "started_epoch": time.time()}, f)  # fmt: skip
    nightly.acquire_lock(store, "three", "2026-01-01", False, 12.0)
    with open(os.path.join(store, nightly.LOCK_FILE)) as f:
        assert json.load(f)["run_id"] == "three"
    nightly.acquire_lock(store, "four", "2026-01-01", True, 12.0)  # --break-lock


def test_cli_refuses_a_second_concurrent_run(archive, tmp_path, capsys):
    store = str(tmp_path / "store")
    os.makedirs(store)
    with open(os.path.join(store, nightly.LOCK_FILE), "w") as f:
        json.dump({"run_id": "other", "host": socket.gethostname(), "pid": os.getpid(),
                   "started_epoch": time.time(), "date": "2026-01-01"}, f)  # fmt: skip
    cohort = os.path.join(archive, "manifest.csv")
    code = cli(["nightly", "--cohort", cohort, "--store", store, "--date", "2026-01-01"])
    _, err = capsys.readouterr()
    assert (
        code == nightly.EXIT_LOCKED
        and "locked by another nightly run" in err
        and "--break-lock" in err
    )
    assert not os.path.exists(os.path.join(store, "state"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--date", "2026-13-01"], "YYYY-MM-DD"),
        (["--date", "26-1-1"], "YYYY-MM-DD"),
        (["--alert-threshold", "2"], "between 0 and 1"),
        (["--bogus", "1"], "unknown option --bogus"),
        (["--input", "x"], "not --input"),
    ],
)
def test_cli_usage_errors(archive, tmp_path, capsys, args, message):
    cohort = os.path.join(archive, "manifest.csv")
    code = cli(["nightly", "--cohort", cohort, "--store", str(tmp_path / "s"), *args])
    _, err = capsys.readouterr()
    assert code == 2 and message in err


def test_cohort_needs_patient_id(tmp_path, capsys):
    cohort = tmp_path / "c.csv"
    cohort.write_text("path,site\na.hea,x\n")
    code = cli(["nightly", "--cohort", str(cohort), "--store", str(tmp_path / "s")])
    _, err = capsys.readouterr()
    assert code == 3 and "patient_id" in err


def test_empty_and_missing_cohort(tmp_path, capsys):
    cohort = tmp_path / "c.csv"
    cohort.write_text("path,patient_id\n")
    assert cli(["nightly", "--cohort", str(cohort), "--store", str(tmp_path / "s")]) == 5
    (tmp_path / "file").write_text("x")
    good = tmp_path / "g.csv"
    good.write_text("path,patient_id\na.hea,p\n")
    assert cli(["nightly", "--cohort", str(good), "--store", str(tmp_path / "file")]) == 4
    missing = str(tmp_path / "nope.csv")
    assert cli(["nightly", "--cohort", missing, "--store", str(tmp_path / "s")]) == 3
    capsys.readouterr()


def test_report_escapes_and_draws():
    from ecgtok.pipeline.nightly_report import histogram_svg, render

    svg = histogram_svg([0.1, 0.2, 0.95], 0.5)
    assert svg.startswith("<svg") and svg.count("<rect") == 4  # background + 3 bars
    summary = {"date": "2026-01-01", "cohort_records": 1, "tokenized": 1, "reused": 0,
               "failed": 0, "scored": 1, "alerted_patients": 1, "alert_threshold": 0.5,
               "alert_threshold_source": "x", "model_id": "m", "tokenizer_id": "t",
               "run_id": "r", "changes": {}}  # fmt: skip
    alerts = [{"patient_id": "<b>p</b>", "records_above": 1, "p_af_max": 0.9,
               "af_burden_max": 1.0, "record_ids": ["r1"]}]  # fmt: skip
    page = render(summary, [{"p_af_max": 0.9}], alerts, [])
    assert "&lt;b&gt;p&lt;/b&gt;" in page and "<b>p</b>" not in page


# ---- schedules ---------------------------------------------------------------------------
def test_airflow_dag_parses_and_uses_the_beam_operator():
    path = os.path.join(DEPLOY, "airflow_dag.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and hasattr(n.func, "id")}
    assert "BeamRunPythonPipelineOperator" in calls
    try:
        import airflow  # noqa: F401
    except ImportError:
        return  # Airflow is not a dependency of ecgtok; parsing is what can be checked here
    import importlib.util

    spec = importlib.util.spec_from_file_location("ecgtok_airflow_dag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.dag.get_task("score_cohort")
    assert task.py_file == "ecgtok.pipeline.nightly"
    assert set(task.pipeline_options) >= {"cohort", "store", "date"}


def _metadata() -> dict:
    with open(os.path.join(DEPLOY, "flex_template", "metadata.json")) as f:
        return json.load(f)


EXAMPLES = {
    "cohort": "gs://b/cohort.csv",
    "store": "gs://b/store",
    "date": "2026-01-31",
    "alert_threshold": "0.7",
    "tokenizer": "gs://b/tok",
    "model": "gs://b/model",
    "segment_seconds": "120",
    "device": "cpu",
    "score_batch_size": "16",
    "lock_ttl_hours": "3",
}


def test_flex_template_metadata_matches_the_cli():
    params = {p["name"]: p for p in _metadata()["parameters"]}
    assert set(params) == set(EXAMPLES)
    # every option of the command is a parameter (but the --break-lock switch, for people)
    assert set(nightly.NIGHTLY_OPTIONS) - {"break_lock"} <= set(params)
    assert not params["cohort"]["isOptional"] and not params["store"]["isOptional"]
    assert all(params[n]["isOptional"] for n in params if n not in ("cohort", "store"))
    for name, p in params.items():
        for rx in p.get("regexes", []):
            assert re.fullmatch(rx, EXAMPLES[name]), (name, rx)
    # the launcher passes --name=value: the command must understand each one as meant
    argv = [f"--{n}={v}" for n, v in EXAMPLES.items()]
    args, date, _options, opts = nightly.parse_args(argv)
    assert (args.cohort, args.store, date) == ("gs://b/cohort.csv", "gs://b/store", "2026-01-31")
    assert args.alert_threshold == 0.7 and args.lock_ttl_hours == 3.0
    assert (opts.tokenizer, opts.model, opts.device) == ("gs://b/tok", "gs://b/model", "cpu")
    assert opts.segment_seconds == 120.0 and opts.score_batch_size == 16


def test_flex_template_image_and_cron_and_systemd():
    with open(os.path.join(DEPLOY, "flex_template", "Dockerfile")) as f:
        docker = f.read()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE" in docker
    assert os.path.exists(os.path.join(DEPLOY, "flex_template", "main.py"))
    with open(os.path.join(DEPLOY, "flex_template", "build_and_schedule.sh")) as f:
        script = f.read()
    assert "flexTemplates:launch" in script and "gcloud scheduler jobs create http" in script
    with open(os.path.join(DEPLOY, "nightly.cron")) as f:
        lines = [ln for ln in f if ln.strip() and not ln.startswith("#") and "=" not in ln[:20]]
    assert len(lines) == 1 and len(lines[0].split()) > 5 and "ecgtok nightly" in lines[0]
    assert "%" not in lines[0].replace("\\%", "")  # cron would cut the line at a bare %
    with open(os.path.join(DEPLOY, "systemd", "ecgtok-nightly.timer")) as f:
        assert "OnCalendar=" in f.read()
    with open(os.path.join(DEPLOY, "systemd", "ecgtok-nightly.service")) as f:
        assert re.search(r"^ExecStart=.*ecgtok nightly --cohort", f.read(), re.M)


# ---- gs:// (a local Cloud Storage emulator) ----------------------------------------------
@pytest.mark.slow
def test_nightly_on_gcs(tmp_path, capsys, gcs):  # noqa: F811
    from apache_beam.io.filesystems import FileSystems

    from ecgtok.transforms.synth import write_demo_archive

    arch = str(tmp_path / "archive")
    write_demo_archive(arch, n_records=3, seed=6)
    write_cohort(os.path.join(arch, "cohort.csv"), manifest_rows(arch))
    url = gcs.upload_tree(arch, "nightly/arch")
    cohort, store = f"{url}/cohort.csv", gcs.url("nightly/store")

    def gs_night(date: str) -> dict:
        code = cli(["nightly", "--cohort", cohort, "--store", store, "--date", date])
        _, err = capsys.readouterr()
        assert code == 0, err
        with FileSystems.open(f"{store}/reports/date={date}/summary.json") as f:
            return json.load(f)

    s1 = gs_night("2026-05-01")
    assert (s1["cohort_records"], s1["tokenized"], s1["scored"]) == (3, 3, 3)
    s2 = gs_night("2026-05-02")
    assert (s2["tokenized"], s2["reused"], s2["scored"]) == (0, 3, 3)
    listed = [m.path for m in FileSystems.match([f"{store}/scores/date=*/*"])[0].metadata_list]
    assert sorted(p.rsplit("/", 2)[1] for p in listed) == ["date=2026-05-01", "date=2026-05-02"]
    assert not FileSystems.exists(f"{store}/{nightly.LOCK_FILE}")


class _FakeBlob:
    """One GCS object with generation preconditions, as Cloud Storage enforces them (the
    emulator ignores them)."""

    store: dict = {}

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def generation(self):
        return self.store.get(self.path, (None, None))[1]

    def upload_from_string(self, data, if_generation_match=None):
        from google.api_core.exceptions import PreconditionFailed

        if if_generation_match == 0 and self.path in self.store:
            raise PreconditionFailed("exists")
        self.store[self.path] = (data, (self.generation or 0) + 1)

    def reload(self):
        from google.api_core.exceptions import NotFound

        if self.path not in self.store:
            raise NotFound("gone")

    def download_as_bytes(self):
        return self.store[self.path][0]

    def delete(self, if_generation_match=None):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if self.path not in self.store:
            raise NotFound("gone")
        if if_generation_match is not None and if_generation_match != self.generation:
            raise PreconditionFailed("changed")
        del self.store[self.path]


def test_gcs_lock_is_an_exclusive_object(monkeypatch):
    monkeypatch.setattr(nightly, "_gcs_blob", _FakeBlob)
    monkeypatch.setattr(nightly, "_read_bytes", lambda p: _FakeBlob.store[p][0])
    store = "gs://bucket/store"
    nightly.acquire_lock(store, "a", "2026-05-03", False, 12.0)
    with pytest.raises(nightly.LockHeld, match="run a"):
        nightly.acquire_lock(store, "b", "2026-05-03", False, 12.0)
    nightly.acquire_lock(store, "c", "2026-05-03", False, -1.0)  # older than the TTL
    assert json.loads(_FakeBlob.store[f"{store}/_lock.json"][0])["run_id"] == "c"
    assert not nightly.release_lock(store, "a")
    assert nightly.release_lock(store, "c")
    assert f"{store}/_lock.json" not in _FakeBlob.store
