"""End to end through the real entry point (`ecgtok ...` -> Beam -> Parquet), on real records."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import copy_record, data_path

from ecgtok.pipeline.cli import main as cli

GOOD = ["G12EC/E00001", "G12EC/E00002", "PTB_PTBXL/HR00001"]


def read_folder(path: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    assert files, f"no parquet files in {path}"
    assert all(f.endswith(".parquet") for f in os.listdir(path))
    schemas = {str(pq.read_schema(f)) for f in files}
    assert len(schemas) == 1, "one schema per output folder"
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def summary_of(dst: str) -> dict:
    with open(os.path.join(dst, "summary.json")) as f:
        return json.load(f)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def good_archive(tmp_path):
    root = data_path("cinc2021_12lead")
    arch = tmp_path / "archive"
    for rid in GOOD:
        folder, name = os.path.split(rid)
        copy_record(os.path.join(root, rid + ".hea"), str(arch / folder), name)
    return str(arch)


def check_token_rows(rows: list[dict]) -> None:
    for row in rows:
        r = np.asarray(row["r_peaks"])
        assert np.all(np.diff(r) > 0), "r_peaks strictly increasing"
        assert len(row["tokens"]) == len(row["lead_names"])
        for lead_words in row["tokens"]:
            assert len(lead_words) == len(r)
        assert len(row["rhythm"]) == len(r)
        # atrial words: none (a tokenizer without them), or one per beat of every lead
        atrial = row["atrial_tokens"]
        assert atrial == [] or [len(a) for a in atrial] == [len(r)] * len(row["lead_names"])
        assert row["tokenizer_id"]
        if len(r):
            assert row["start_sample"] <= r[0] and r[-1] < row["start_sample"] + row["n_samples"]


@pytest.mark.slow
def test_run_writes_tokens_and_scores_for_all_cinc2021_records(tmp_path, capsys):
    src = data_path("cinc2021_12lead")
    dst = str(tmp_path / "out")
    code, out, _ = run_cli(["run", "--input", src, "--output", dst], capsys)
    assert code == 0
    assert "records tokenized" in out
    expected = sorted(
        os.path.relpath(h, src)[: -len(".hea")]
        for h in glob.glob(os.path.join(src, "**", "*.hea"), recursive=True)
    )
    assert len(expected) == 110
    tokens = read_folder(os.path.join(dst, "tokens"))
    scores = read_folder(os.path.join(dst, "scores"))
    assert sorted(r["record_id"] for r in tokens) == expected
    assert sorted(r["record_id"] for r in scores) == expected
    check_token_rows(tokens)
    assert all(len(r["lead_names"]) == 12 for r in tokens)
    assert all(r["fs"] == 500.0 for r in tokens)
    # Ten seconds of a human heart: a plausible number of beats on every record.
    beats = np.array([len(r["r_peaks"]) for r in tokens])
    assert np.median(beats) >= 8 and beats.max() < 200
    for s in scores:
        assert 0.0 <= s["p_af"] <= 1.0 and len(s["embedding"]) > 0 and s["model_id"]
    summary = summary_of(dst)
    assert summary["discovered"] == summary["tokenized"] == summary["scored"] == 110
    assert summary["failed"] == 0
    assert summary["runner"].startswith("FnApiRunner")
    # RunInference's own metrics: every row went through the model, in batches
    inference = summary["inference_metrics"]
    assert inference["num_inferences"] == 110
    assert inference["inference_batch_latency_micro_secs"]["count"] >= 2
    assert 1 <= inference["inference_request_batch_size"]["max"] <= 64
    # Metadata from the Challenge header comments lands in columns.
    e1 = next(r for r in tokens if r["record_id"] == "G12EC/E00001")
    assert e1["sex"] in ("F", "Female") and e1["dx"] == ["426783006"]


def _write_garbage(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_mixed_archive_good_and_corrupt_records(good_archive, tmp_path, capsys):
    root = data_path("cinc2021_12lead")
    bad = os.path.join(good_archive, "bad")
    # A truncated signal file: the header declares more samples than the file holds.
    trunc = copy_record(os.path.join(root, "G12EC/E00003.hea"), bad, "truncated")
    mat = trunc[: -len(".hea")] + ".mat"
    with open(mat, "rb") as f:
        data = f.read()
    with open(mat, "wb") as f:
        f.write(data[: len(data) // 2])
    _write_garbage(os.path.join(bad, "garbage.hea"), "this is not a header\x00\xff at all\n")
    # A header whose signal file does not exist.
    nofile = copy_record(os.path.join(root, "G12EC/E00004.hea"), bad, "nofile")
    os.remove(nofile[: -len(".hea")] + ".mat")

    dst = str(tmp_path / "out")
    code, _, _ = run_cli(["run", "--input", good_archive, "--output", dst], capsys)
    assert code == 0
    tokens = read_folder(os.path.join(dst, "tokens"))
    scores = read_folder(os.path.join(dst, "scores"))
    errors = read_folder(os.path.join(dst, "errors"))
    assert sorted({r["record_id"] for r in tokens}) == sorted(GOOD)
    assert sorted({r["record_id"] for r in scores}) == sorted(GOOD)
    by_id = {e["record_id"]: e for e in errors}
    assert sorted(by_id) == ["bad/garbage", "bad/nofile", "bad/truncated"]
    assert by_id["bad/truncated"]["error_type"] == "truncated_signal_file"
    assert by_id["bad/nofile"]["error_type"] == "missing_signal_file"
    for e in errors:
        assert e["stage"] == "read" and e["message"] and e["source_path"].endswith(".hea")
    assert not {r["record_id"] for r in tokens} & set(by_id), "a record is never in both"
    s = summary_of(dst)
    assert s["discovered"] == 6 and s["tokenized"] == 3 and s["failed"] == 3 and s["scored"] == 3
    assert s["discovered"] == s["tokenized"] + s["failed"]
    assert sum(s["failures"]["read"].values()) == 3


def test_manifest_columns_are_carried_into_tokens_and_scores(good_archive, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        # `rhythm` clashes with a token column: it is carried as `manifest_rhythm`.
        w.writerow(["patient_id", "path", "site", "rhythm"])
        for i, rid in enumerate(GOOD):
            rel = os.path.relpath(os.path.join(good_archive, rid + ".hea"), tmp_path)
            w.writerow([f"P{i:03d}", rel, "north", "sinus"])
    dst = str(tmp_path / "out")
    code, _, _ = run_cli(["run", "--input", str(manifest), "--output", dst], capsys)
    assert code == 0
    tokens = read_folder(os.path.join(dst, "tokens"))
    scores = read_folder(os.path.join(dst, "scores"))
    ids = {r["record_id"]: r["patient_id"] for r in tokens}
    assert ids == {f"archive/{rid}": f"P{i:03d}" for i, rid in enumerate(GOOD)}
    assert {r["record_id"]: r["patient_id"] for r in scores} == ids
    assert {r["site"] for r in tokens} == {"north"}
    assert {r["manifest_rhythm"] for r in tokens} == {"sinus"}
    assert {r["manifest_rhythm"] for r in scores} == {"sinus"}
    assert all(isinstance(r["rhythm"], list) for r in tokens)


def test_existing_output_is_refused_then_replaced_with_overwrite(good_archive, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert run_cli(["tokenize", "--input", good_archive, "--output", dst], capsys)[0] == 0
    code, out, err = run_cli(["tokenize", "--input", good_archive, "--output", dst], capsys)
    assert code == 4 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # Rerun on a smaller archive: nothing of the first run may survive beside the second.
    shutil.rmtree(os.path.join(good_archive, "PTB_PTBXL"))
    args = ["tokenize", "--input", good_archive, "--output", dst, "--overwrite"]
    assert run_cli(args, capsys)[0] == 0
    tokens = read_folder(os.path.join(dst, "tokens"))
    assert sorted(r["record_id"] for r in tokens) == ["G12EC/E00001", "G12EC/E00002"]
    assert summary_of(dst)["discovered"] == 2
    assert sorted(os.listdir(dst)) == ["errors", "summary.json", "tokens"]


def test_output_that_would_overwrite_the_input_is_refused(good_archive, capsys):
    # An archive that happens to live where an output folder would be replaced.
    inner = os.path.join(good_archive, "tokens")
    copy_record(os.path.join(good_archive, GOOD[0] + ".hea"), inner, "rec")
    before = sorted(os.listdir(good_archive)) + sorted(os.listdir(inner))
    for src in (good_archive, inner):
        args = ["run", "--input", src, "--output", good_archive, "--overwrite"]
        code, _, err = run_cli(args, capsys)
        assert code == 4 and "would overwrite the --input" in err
    assert sorted(os.listdir(good_archive)) + sorted(os.listdir(inner)) == before


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["run", "--output", "/tmp/ecgtok-never"], 2, "--input is required"),
        (["run", "--input", ".", "--output", "/tmp/x", "--no_such_option=1"], 2, "unknown option"),
        (["run", "--input", ".", "--output", "/tmp/x", "--segment_seconds=abc"], 2, "invalid"),
        (["frobnicate"], 2, "unknown command"),
        (["run", "--input", "/nonexistent/archive", "--output", "/tmp/x"], 3, "does not exist"),
        (["run", "--input", "EMPTY", "--output", "/etc/hostname/out"], 4, "cannot be created"),
        (["run", "--input", "EMPTY", "--output", "OUT"], 5, "no records found"),
        (["run", "--input", "EMPTY", "--output", "OUT", "--tokenizer", "EMPTY"], 6, "cannot read"),
    ],
)
def test_cli_mistakes_give_one_line_and_a_distinct_exit_code(args, code, needle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [
        {"EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out")}.get(a, a) for a in args
    ]
    got, _, err = run_cli(args, capsys)
    assert got == code
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_long_record_is_cut_into_disjoint_segments_covering_it(tmp_path, capsys):
    src = data_path("mitdb", "100.hea")
    dst = str(tmp_path / "out")
    assert run_cli(["tokenize", "--input", src, "--output", dst], capsys)[0] == 0
    rows = sorted(read_folder(os.path.join(dst, "tokens")), key=lambda r: r["start_sample"])
    # 650,000 samples at 360 Hz: six full 5-minute segments and a 5.6 s tail.
    assert [r["record_id"] for r in rows] == ["100"] * 7
    starts = [r["start_sample"] for r in rows]
    assert starts == list(range(0, 650000, 300 * 360))
    assert sum(r["n_samples"] for r in rows) == 650000
    check_token_rows(rows)
    all_peaks = np.concatenate([r["r_peaks"] for r in rows])
    assert np.all(np.diff(all_peaks) > 0)
    assert 2200 <= len(all_peaks) <= 2350  # the reference holds 2273 beats


@pytest.mark.slow
def test_long_af_record_scores_carry_af_burden_and_episodes(tmp_path, capsys):
    """MIT-BIH 210 is in AF throughout; 117 is sinus rhythm. Score rows of their 5-minute
    segments carry the segment's AF burden and its episodes, in the record's samples."""
    dst = str(tmp_path / "out")
    args = ["run", "--input", data_path("mitdb", "210.hea"), "--output", dst]
    assert run_cli(args, capsys)[0] == 0
    args = ["run", "--input", data_path("mitdb", "117.hea"), "--output", dst + "_sinus"]
    assert run_cli(args, capsys)[0] == 0
    scores = read_folder(os.path.join(dst, "scores")) + read_folder(dst + "_sinus/scores")
    af = [r for r in scores if r["record_id"] == "210" and r["n_beats"] > 150]
    sinus = [r for r in scores if r["record_id"] == "117" and r["n_beats"] > 150]
    assert len(af) >= 5 and len(sinus) >= 5
    assert np.median([r["af_burden"] for r in af]) > 0.7
    assert max(r["af_burden"] for r in sinus) < 0.1
    for r in af:
        seg_end = r["start_sample"] + 300 * 360
        for ep in r["af_episodes"]:
            assert r["start_sample"] <= ep["start_sample"] < ep["end_sample"] < seg_end
    # a short tail segment gets no burden
    tails = [r for r in scores if r["n_beats"] <= 96]
    assert all(r["af_burden"] is None and r["af_episodes"] == [] for r in tails)


def test_flat_record_gets_a_token_row_without_beats_and_a_score(tmp_path, capsys):
    import wfdb

    folder = tmp_path / "flat"
    folder.mkdir()
    wfdb.wrsamp(
        "flat",
        fs=250,
        units=["mV", "mV"],
        sig_name=["I", "II"],
        p_signal=np.zeros((2500, 2)),
        fmt=["16", "16"],
        adc_gain=[1000, 1000],
        baseline=[0, 0],
        write_dir=str(folder),
    )
    dst = str(tmp_path / "out")
    assert run_cli(["run", "--input", str(folder), "--output", dst], capsys)[0] == 0
    (row,) = read_folder(os.path.join(dst, "tokens"))
    assert row["record_id"] == "flat" and row["r_peaks"] == [] and row["tokens"] == [[], []]
    (score,) = read_folder(os.path.join(dst, "scores"))
    assert score["record_id"] == "flat" and score["n_beats"] == 0
    # no beats, no rhythm: null, not the ~0.5 a model gives for padding
    assert score["p_af"] is None and score["p_other_rhythm"] is None
    assert score["p_noisy"] is not None
    assert summary_of(dst)["failed"] == 0


def test_glob_ids_are_relative_to_the_fixed_leading_folder(good_archive, tmp_path, capsys):
    dst = str(tmp_path / "out")
    pattern = os.path.join(good_archive, "G12EC", "*.hea")
    assert run_cli(["tokenize", "--input", pattern, "--output", dst], capsys)[0] == 0
    rows = read_folder(os.path.join(dst, "tokens"))
    assert sorted(r["record_id"] for r in rows) == ["E00001", "E00002"]


def test_tokenize_then_score_gives_the_same_scores_as_run(good_archive, tmp_path, capsys):
    both, tok, sc = (str(tmp_path / n) for n in ("both", "tok", "sc"))
    assert run_cli(["run", "--input", good_archive, "--output", both], capsys)[0] == 0
    assert run_cli(["tokenize", "--input", good_archive, "--output", tok], capsys)[0] == 0
    assert run_cli(["score", "--input", tok, "--output", sc], capsys)[0] == 0
    a = {r["record_id"]: r for r in read_folder(os.path.join(both, "scores"))}
    b = {r["record_id"]: r for r in read_folder(os.path.join(sc, "scores"))}
    assert sorted(a) == sorted(b) == sorted(GOOD)
    for rid in a:
        assert a[rid]["p_af"] == pytest.approx(b[rid]["p_af"], abs=1e-5)
        assert a[rid]["model_id"] == b[rid]["model_id"]
    assert summary_of(sc)["scored"] == 3


def test_demo_builds_its_archive_and_runs(tmp_path, capsys):
    out, arch = str(tmp_path / "demo_out"), str(tmp_path / "demo_archive")
    code, stdout, _ = run_cli(["demo", "--output", out, "--archive", arch], capsys)
    assert code == 0 and "records discovered" in stdout
    s = summary_of(out)
    assert s["discovered"] == s["tokenized"] == 12 and s["failed"] == 0
    # The 6-minute Holter record is longer than a segment: 13 rows for 12 records.
    assert s["token_rows"] == s["scored"] == 13
    truth = {}
    with open(os.path.join(arch, "truth.csv")) as f:
        for row in csv.DictReader(f):
            truth[row["record_id"]] = np.array(row["r_peaks"].split(), dtype=np.int64)
    rows = read_folder(os.path.join(out, "tokens"))
    found = {}
    for r in rows:
        found.setdefault(r["record_id"], []).extend(r["r_peaks"])
    for rid, true_peaks in truth.items():
        det = np.array(found[rid])
        assert len(det) == len(true_peaks), rid
        if len(det):
            assert np.max(np.abs(det - true_peaks)) <= 0.05 * 500, rid


def test_symlink_loops_in_an_archive_terminate(good_archive, tmp_path, capsys):
    os.symlink(good_archive, os.path.join(good_archive, "G12EC", "loop"))
    dst = str(tmp_path / "out")
    assert run_cli(["tokenize", "--input", good_archive, "--output", dst], capsys)[0] == 0
    rows = read_folder(os.path.join(dst, "tokens"))
    assert sorted(r["record_id"] for r in rows) == sorted(GOOD)


def test_a_model_for_another_tokenizer_is_refused_in_one_line(good_archive, tmp_path, capsys):
    from ecgtok.models.model import load_model, save_model
    from ecgtok.pipeline.flags import default_model_dir

    model, config = load_model(default_model_dir())
    other = str(tmp_path / "other_model")
    save_model(model, {**config, "tokenizer_id": "0123456789abcdef"}, other)
    tok = str(tmp_path / "tok")
    assert run_cli(["tokenize", "--input", good_archive, "--output", tok], capsys)[0] == 0
    for args in (
        ["score", "--input", tok, "--output", str(tmp_path / "s"), "--model", other],
        ["run", "--input", good_archive, "--output", str(tmp_path / "r"), "--model", other],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 6 and "0123456789abcdef" in err and len(err.strip().splitlines()) == 1


def test_shards_read_with_pyarrow_dataset_and_duckdb(good_archive, tmp_path, capsys):
    import pyarrow.dataset as ds

    duckdb = pytest.importorskip("duckdb")
    dst = str(tmp_path / "out")
    assert run_cli(["run", "--input", good_archive, "--output", dst], capsys)[0] == 0
    tokens = ds.dataset(os.path.join(dst, "tokens"), format="parquet")
    table = tokens.to_table(columns=["record_id", "r_peaks", "tokens"])
    assert sorted(table.column("record_id").to_pylist()) == sorted(GOOD)
    meta = tokens.schema.metadata
    assert meta[b"ecgtok_tokenizer_id"] and meta[b"ecgtok_version"]
    assert all(
        pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"
        for f in glob.glob(os.path.join(dst, "tokens", "*.parquet"))
    )
    con = duckdb.connect()
    beats, records = con.execute(
        f"SELECT sum(len(r_peaks)), count(DISTINCT record_id) "
        f"FROM read_parquet('{dst}/tokens/*.parquet')"
    ).fetchone()
    assert records == 3 and beats == sum(len(r) for r in table.column("r_peaks").to_pylist())
    (n_scores,) = con.execute(
        f"SELECT count(*) FROM read_parquet('{dst}/scores/*.parquet') s "
        f"JOIN read_parquet('{dst}/tokens/*.parquet') t USING (record_id, start_sample)"
    ).fetchone()
    assert n_scores == 3


def test_plot_draws_a_record_with_words(tmp_path, capsys):
    out = tmp_path / "p.png"
    rec = data_path("cinc2021_12lead", "G12EC", "E00001.hea")
    assert (
        run_cli(["plot", "--input", rec, "--output", str(out), "--leads", "II,V1"], capsys)[0] == 0
    )
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
