"""Where one record's time goes, stage by stage, on real records.

    .venv/bin/python benchmarks/profile_record.py [RECORDS_DIR] [--repeats N] [--cprofile]
                                                  [--beam] [--top 25]

Times every stage of `tokenize_record` on each record (all records, `--repeats` passes,
the first pass discarded as warm-up when there are several) and prints a table of
milliseconds per record and the share of the total:

    read               wfdb_reader.read_record (header parse + decode)
    detect             qrs.detect_r_peaks
    quality            beats.beat_quality
    clean+resample     windows.resample_then_filter (resample to 100 Hz, then 0.5-40 Hz
                       band-pass and the view's low-pass in one pass); for tokenizers
                       fitted before that view: windows.clean_for_windows (band-pass,
                       resample)
    lowpass            those older tokenizers' separate 25 Hz low-pass at 100 Hz
    windows            windows.beat_windows (cut, RR mask, median baseline)
    align+norm         tokenizer.shape_windows (re-centre + l2 normalisation)
    assign             codebook assignment (nearest of K words, vectorised)
    atrial             atrial windows and their nearest atrial words (tokenizers with them)
    rows               rhythm words, sentence, Python lists of the row (token_rows less encode)
    arrow              rows -> pyarrow.Table with the token schema (what WriteToParquet does)
    guard IPC          the extra cost of the guarded child process per record
                       (GuardedTokenizer round trips of job batches minus the same
                       batches in-process)

It also prints `tokenize_batch`: the CPU per record of the batched path a guarded child
runs (short records of one shape through each stage together), beside the per-record
`tokenize_record` the stages above add up to.

`--beam` adds the per-record cost of Beam itself: an `ecgtok tokenize` run with
`--isolation none` over the same records, minus its start-up, minus the in-process sum.
`--cprofile` prints the top functions by cumulative and by own time over one pass.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import os
import pickle
import pstats
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "cinc2021_12lead"))


def records(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.hea"), recursive=True))


def stage_times(paths: list[str], tok, schema) -> dict[str, list[float]]:
    """Seconds per stage per record, calling the same functions tokenize_record calls."""
    import pyarrow as pa

    from ecgtok.models.tokenizer import shape_windows
    from ecgtok.transforms import windows as W
    from ecgtok.transforms.atrial import atrial_windows
    from ecgtok.transforms.beats import FLAG_NOISE_MASK, beat_quality
    from ecgtok.transforms.qrs import detect_r_peaks
    from ecgtok.transforms.record_tokens import _segment, tokenize_record
    from ecgtok.transforms.token_table import segment_row
    from ecgtok.transforms.wfdb_reader import open_record

    view = tok.view
    out: dict[str, list[float]] = {}

    def add(name: str, dt) -> None:
        out.setdefault(name, []).append(dt)

    def clock() -> np.ndarray:
        """(wall, CPU) seconds: CPU time is what a loaded machine distorts least."""
        return np.array([time.perf_counter(), time.thread_time()])

    for p in paths:
        t = clock()
        with open_record(p, os.path.basename(p)[:-4]) as reader:
            rec = reader.record()
        add("read", clock() - t)

        t = clock()
        r = np.asarray(detect_r_peaks(rec.signal, rec.fs), dtype=np.int64)
        add("detect", clock() - t)

        t = clock()
        flags = np.asarray(beat_quality(rec.signal, rec.fs, r), dtype=np.uint8)
        add("quality", clock() - t)

        # The tokenizer's view, stage by stage (models.tokenizer.beat_view).
        lp = view.get("lowpass_hz")
        if view.get("resample_first"):  # one pass: resample, then band- and low-pass
            t = clock()
            clean = W.resample_then_filter(rec.signal, rec.fs, lp)
            add("clean+resample", clock() - t)
            add("lowpass", np.zeros(2))  # done in the same pass
        else:
            t = clock()
            clean = W.clean_for_windows(rec.signal, rec.fs)
            add("clean+resample", clock() - t)

            t = clock()
            if lp and clean.shape[0] > 30:
                clean = W.lowpass(clean, float(lp))
            add("lowpass", clock() - t)

        t = clock()
        wins = W.beat_windows(clean, W.to_window_rate(r, rec.fs))
        add("windows", clock() - t)

        t = clock()
        wins = shape_windows(wins, view)
        add("align+norm", clock() - t)

        t = clock()
        noisy = (flags & FLAG_NOISE_MASK) != 0
        words = tok.encode_windows(wins, noisy)
        rhythm = tok.rhythm_words(r, rec.fs)
        add("assign", clock() - t)

        # Atrial words (tokenizers that have them): cut, normalise, nearest word.
        t = clock()
        atrial = None
        if tok.atrial_codebook is not None:
            atrial = tok.encode_atrial(atrial_windows(clean, W.to_window_rate(r, rec.fs)), noisy)
        add("atrial", clock() - t)

        # The row: sentence and Python lists (token_table.segment_row).
        t = clock()
        seg = _segment(reader, 0, rec.signal.shape[0], r, flags, words, rhythm, atrial, tok, {})
        rows = [segment_row(seg)]
        add("rows", clock() - t)

        # All of tokenize_record, as the pipeline calls it: the stages above plus
        # whatever they leave out (opening, segment context, glue).
        t = clock()
        tokenize_record(p, os.path.basename(p)[:-4], tok, 300.0, {})
        out.setdefault("_whole", []).append(clock() - t)

        t = clock()
        pa.Table.from_pylist(rows, schema=schema)
        add("arrow", clock() - t)
        out.setdefault("_rows", []).extend(rows)

        t = clock()
        pickle.loads(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
        add("pickle rows", clock() - t)
        out.setdefault("_samples", []).append(rec.signal.shape[0] * rec.signal.shape[1])
    return out


def batched_arrow_seconds(rows: list[dict], schema, batch: int = 1000) -> float:
    """CPU seconds per row to convert rows to Arrow the way Beam's WriteToParquet does:
    each row's values appended to per-column lists, then one pa.array per column and a
    RecordBatch per `batch` rows (its _RowDictionariesToArrowTable). The "arrow" stage
    converts one row at a time, so it mostly measures per-call overhead."""
    import pyarrow as pa

    t = time.thread_time()
    for a in range(0, len(rows), batch):
        columns: list[list] = [[] for _ in schema.names]
        for row in rows[a : a + batch]:
            for i, name in enumerate(schema.names):
                columns[i].append(row.get(name))
        arrays = [pa.array(c, type=t_) for c, t_ in zip(columns, schema.types, strict=True)]
        pa.RecordBatch.from_arrays(arrays, schema=schema)
    return (time.thread_time() - t) / max(1, len(rows))


def job_batches(paths: list[str], size: int = 32) -> list[list[tuple]]:
    """The records in batches as a job makes them (one header shape per batch)."""
    from ecgtok.pipeline.discovery import RecordRef
    from ecgtok.transforms.stages import _shape_batches
    from ecgtok.transforms.wfdb_formats import parse_header

    refs = []
    for p in paths:
        with open(p, "rb") as f:
            h = parse_header(f.read())
        shape = f"{h.n_sig} {h.fs:g} {h.sig_len}"
        refs.append(RecordRef(os.path.basename(p)[:-4], p, shape=shape))
    return [
        [(r.source_path, r.record_id, 300.0, {}) for r in b] for b in _shape_batches(refs, size)
    ]


def batched_cost(paths: list[str], tok) -> float:
    """CPU seconds per record of `tokenize_batch` (what a guarded child runs), over the
    records in job batches: short records of one shape go through the stages together."""
    from ecgtok.transforms.record_tokens import tokenize_batch

    batches = job_batches(paths)
    for b in batches[:2]:  # warm
        list(tokenize_batch(b, tok))
    t = time.thread_time()
    for b in batches:
        list(tokenize_batch(b, tok))
    return (time.thread_time() - t) / len(paths)


def guard_cost(paths: list[str], tok_dir: str, tok) -> tuple[float, float]:
    """(seconds per record through GuardedTokenizer, seconds per record in process), both
    over the same job batches."""
    from ecgtok.transforms.isolation import GuardedTokenizer
    from ecgtok.transforms.record_tokens import tokenize_batch

    batches = job_batches(paths)
    g = GuardedTokenizer(tok_dir, 300.0, 6144)
    try:
        list(g.tokenize_many(batches[0]))  # start the child
        t = time.perf_counter()
        for b in batches:
            list(g.tokenize_many(b))
        guarded = (time.perf_counter() - t) / len(paths)
    finally:
        g.close()
    t = time.perf_counter()
    for b in batches:
        list(tokenize_batch(b, tok))
    direct = (time.perf_counter() - t) / len(paths)
    return guarded, direct


def beam_cost(folder: str, n: int) -> dict:
    """Wall of `ecgtok tokenize --isolation none` and of a 1-record run (start-up)."""
    exe = os.path.join(ROOT, ".venv", "bin", "ecgtok")
    res = {}
    with tempfile.TemporaryDirectory(prefix="ecgtok_prof_") as tmp:
        one = os.path.join(tmp, "one")
        os.makedirs(one)
        first = records(folder)[0]
        for f in glob.glob(first[:-4] + ".*"):
            os.symlink(os.path.abspath(f), os.path.join(one, os.path.basename(f)))
        for name, src in (("startup", one), ("all", folder)):
            t = time.perf_counter()
            subprocess.run(
                [
                    exe,
                    "tokenize",
                    "--input",
                    src,
                    "--output",
                    os.path.join(tmp, name),
                    "--isolation",
                    "none",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            res[name] = time.perf_counter() - t
    res["per_record"] = (res["all"] - res["startup"]) / max(1, n - 1)
    return res


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ",".join(str(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records_dir", nargs="?", default=DEFAULT_DIR)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--beam", action="store_true")
    ap.add_argument("--no-guard", action="store_true")
    ap.add_argument(
        "--blas-default",
        action="store_true",
        help="leave OpenBLAS at its default threads in this process (tokenize_record limits "
        "it to 1; the guarded child still does)",
    )
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--limit", type=int, default=0, help="only the first N records")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: shipped)")
    a = ap.parse_args()

    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.schemas import token_schema

    paths = records(a.records_dir)
    if a.limit:
        paths = paths[: a.limit]
    tok_dir = a.tokenizer or default_tokenizer_dir()
    tok = Tokenizer.load(tok_dir)
    from ecgtok.transforms import record_tokens

    if a.blas_default:
        record_tokens._BLAS_LIMIT = False  # tokenize_record then leaves OpenBLAS alone
    else:
        record_tokens.one_blas_thread()  # as tokenize_record does in every worker
    schema = token_schema()

    runs = [stage_times(paths, tok, schema) for _ in range(max(1, a.repeats))]
    if len(runs) > 1:
        runs = runs[1:]  # first pass: warm-up (imports, filter designs, page cache)
    stages = [k for k in runs[0] if not k.startswith("_")]
    # per stage: (wall, cpu) seconds per record, median over passes
    per = {k: np.median([np.mean(r[k], axis=0) for r in runs], axis=0) for k in stages}
    samples = float(np.mean(runs[0]["_samples"]))
    total = sum(v for k, v in per.items() if k != "pickle rows")

    print(
        f"records: {len(paths)} from {a.records_dir}  ({samples:.0f} samples/record, "
        f"all leads); median of {len(runs)} pass(es); BLAS threads: {blas_threads()}"
    )
    print(f"{'stage':<16}{'wall ms':>9}{'cpu ms':>9}{'cpu share':>10}")
    for k in stages:
        share = "" if k == "pickle rows" else f"{100 * per[k][1] / total[1]:9.1f}%"
        print(f"{k:<16}{1e3 * per[k][0]:>9.2f}{1e3 * per[k][1]:>9.2f}{share:>10}")
    print(
        f"{'sum of stages':<16}{1e3 * total[0]:>9.2f}{1e3 * total[1]:>9.2f}   "
        f"-> {1 / total[1]:.0f} records/s per core of CPU"
    )
    whole = np.median([np.mean(r["_whole"], axis=0) for r in runs], axis=0)
    print(
        f"{'tokenize_record':<16}{1e3 * whole[0]:>9.2f}{1e3 * whole[1]:>9.2f}   "
        f"(the whole call as the pipeline makes it, without arrow/pickle)"
    )
    print(
        f"{'arrow, batched':<25}{1e3 * batched_arrow_seconds(runs[-1]['_rows'], schema):>9.2f}"
        "   (CPU per row as WriteToParquet converts them, 1,000 rows at a time)"
    )
    print(
        f"{'tokenize_batch':<25}{1e3 * batched_cost(paths, tok):>9.2f}"
        "   (CPU per record as a guarded child works: job batches of 32, one header shape"
        " each, short records through the stages together, rows as one Arrow table)"
    )

    if not a.no_guard:
        guarded, direct = guard_cost(paths, tok_dir, tok)
        print(
            f"{'guard IPC':<16}{1e3 * (guarded - direct):>10.2f}   "
            f"(guarded {1e3 * guarded:.2f} ms vs in-process {1e3 * direct:.2f} ms per record, "
            "wall, job batches)"
        )
    if a.beam:
        b = beam_cost(a.records_dir, len(paths))
        print(
            f"beam: start-up (1-record run) {b['startup']:.2f} s, {len(paths)} records "
            f"{b['all']:.2f} s -> {1e3 * b['per_record']:.2f} ms/record in the job with "
            f"--isolation none (2 cores), vs {1e3 * total[1]:.2f} ms CPU in-process on 1 core"
        )

    if a.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        stage_times(paths, tok, schema)
        prof.disable()
        st = pstats.Stats(prof, stream=sys.stdout)
        st.sort_stats("cumulative").print_stats(a.top)
        st.sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
