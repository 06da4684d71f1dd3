"""Scaling curves of `ecgtok tokenize`: by number of records, and by record length.

    .venv/bin/python benchmarks/bench_scaling.py count  [--sizes 110,1100,11000] [--copy]
                                                        [--baseline] [--extra ARGS]
    .venv/bin/python benchmarks/bench_scaling.py length [--lengths 10s,1min,10min,1h,6h,24h]
                                                        [--fmt 212|16] [--no-pipeline]

count: archives of 110, 1,100 and 11,000 records are made under /tmp/ecgtok_bench/scale/
from the 110 shared cinc2021 records, one distinct folder (`copy000/`, `copy001/`, ...) per
copy of the whole tree, so every record has its own path and record_id. The files are
HARD LINKS to the shared files by default (same inode: no disk space, and the page cache
holds them once, which is also what a freshly written copy gives); `--copy` copies the
bytes instead. For each size, `ecgtok tokenize` runs as a subprocess on the project's
default local runner (start-up included, guards on), and the table gives wall time,
records/s, peak RSS of the process tree and the marginal cost per record between
consecutive sizes: (T(n2) - T(n1)) / (n2 - n1), which must stay flat. `--baseline` also
times the baseline loop on the 110 records in the same run, for the ratio.

length: synthetic 2-lead (MLII, V1) 360 Hz records of each length are written under
/tmp/ecgtok_bench/length/ with `ecgtok.transforms.synth.synthesize_ecg` and `wfdb.wrsamp`
(format 212 by default; records longer than an hour are synthesized an hour at a time,
each hour with its own seed, and concatenated). For each length:
  * in-process: a fresh Python process imports ecgtok, then calls `tokenize_record` once;
    it reports its time and its peak RSS (ru_maxrss) and the RSS after imports, so the
    record's own memory is the difference;
  * pipeline: `ecgtok tokenize` on a folder holding only that record (start-up
    included, guards on), with the peak RSS of the whole process tree.
Time must grow linearly with length and peak memory stay flat; the 24 h Holter must stay
under 1 GB (issue 9).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import (  # noqa: E402
    DEFAULT_DIR,
    PY,
    count_samples,
    load_line,
    machine,
    run_baseline,
    run_ecgtok,
)

BENCH_ROOT = "/tmp/ecgtok_bench"
LENGTHS = {"10s": 10, "1min": 60, "10min": 600, "1h": 3600, "6h": 6 * 3600, "24h": 86400}
FS = 360
LEADS = ["MLII", "V1"]


# ------------------------------------------------------------------------ count
def make_archive(n_records: int, src: str, copy: bool) -> str:
    """An archive of n_records under BENCH_ROOT/scale/, copies of src in distinct folders."""
    files = [
        f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True) if os.path.isfile(f)
    ]
    n_src = sum(1 for f in files if f.endswith(".hea"))
    copies = -(-n_records // n_src)
    if copies * n_src != n_records:
        raise SystemExit(f"{n_records} is not a multiple of the {n_src} source records")
    kind = "copy" if copy else "link"
    root = os.path.join(BENCH_ROOT, "scale", f"{n_records}_{kind}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i in range(copies):
        for f in files:
            rel = os.path.relpath(f, src)
            if rel.endswith((".md", ".csv")) and os.path.dirname(rel) == "":
                continue  # the tree's SOURCE.md / labels.csv: not records
            dst = os.path.join(root, f"copy{i:03d}", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if copy:
                shutil.copyfile(f, dst)
            else:
                os.link(f, dst)
    open(done, "w").close()
    return root


def time_baseline(src: str, when: str) -> float:
    """Run the baseline loop once on `src`, print its figures, return its records/s."""
    out = os.path.join(BENCH_ROOT, "out", "naive")
    os.makedirs(out, exist_ok=True)
    b = run_baseline(src, out)
    print(
        f"baseline naive_loop ({when}) on {b['records']} records: {b['rate']:.1f} records/s "
        f"(loop only; {b['wall_rate']:.1f} with start-up), peak {b['peak_rss'] / 2**20:.0f} MB"
    )
    sys.stdout.flush()
    return b["rate"]


def bench_count(a) -> None:
    sizes = [int(s) for s in a.sizes.split(",")]
    extra = a.extra.split() if a.extra else []
    print(f"machine: {machine()}")
    print(f"start:   {load_line()}")
    print(
        f"archives: {'byte copies' if a.copy else 'hard links'} of {a.src} in distinct "
        f"folders under {BENCH_ROOT}/scale/; ecgtok tokenize {' '.join(extra)}"
    )
    base_rate = None
    if a.baseline:
        base_rate = time_baseline(a.src, "before")
    print(
        f"{'records':>8}{'wall s':>9}{'job s':>8}{'rec/s':>8}{'peak MB':>9}{'cpu s':>8}"
        f"{'marginal ms/rec':>17}{'vs base':>9}"
    )
    prev = None
    rows = []
    for n in sizes:
        src = make_archive(n, a.src, a.copy)
        dst = os.path.join(BENCH_ROOT, "out", f"scale_{n}")
        r = run_ecgtok("tokenize", src, dst, extra, n, 0)
        s = r["summary"]
        if s.get("discovered") != n or s.get("tokenized", 0) + s.get("failed", 0) != n:
            print(
                f"  !! summary: discovered {s.get('discovered')} tokenized "
                f"{s.get('tokenized')} failed {s.get('failed')}"
            )
        marginal = ""
        if prev:
            marginal = f"{1e3 * (r['wall'] - prev[1]) / (n - prev[0]):.2f}"
        ratio = f"{n / r['wall'] / base_rate:.2f}x" if base_rate else "-"
        print(
            f"{n:>8}{r['wall']:>9.2f}{s.get('wall_seconds', 0):>8.1f}{n / r['wall']:>8.1f}"
            f"{r['peak_rss'] / 2**20:>9.0f}{r['cpu']:>8.1f}{marginal:>17}{ratio:>9}"
        )
        sys.stdout.flush()
        rows.append((n, r["wall"]))
        prev = (n, r["wall"])
        shutil.rmtree(dst, ignore_errors=True)
    if a.baseline:
        # The loop is memory-bound (big broadcast temporaries) and swings with the host's
        # load more than ecgtok does, so it is timed again after the ecgtok runs; the
        # ratio uses the faster of the two baseline runs, the conservative choice.
        after = time_baseline(a.src, "after")
        fast, slow = max(base_rate, after), min(base_rate, after)
        n, t = rows[-1]
        print(
            f"ratio at {n} records against the faster baseline run: {n / t / fast:.2f}x "
            f"(against the slower: {n / t / slow:.2f}x)"
        )
    if len(rows) >= 2:
        (n0, t0), (n1, t1) = rows[0], rows[-1]
        slope = (t1 - t0) / (n1 - n0)
        print(
            f"fixed cost (intercept of the {n0}->{n1} line): {t0 - slope * n0:.2f} s; "
            f"steady rate 1/slope: {1 / slope:.1f} records/s"
        )
    print(f"end:     {load_line()}")


# ----------------------------------------------------------------------- length
def make_length_record(label: str, seconds: int, fmt: str) -> str:
    """BENCH_ROOT/length/<label>_<fmt>/holter.hea, written once and reused."""
    import numpy as np
    import wfdb

    from ecgtok.transforms.synth import synthesize_ecg

    folder = os.path.join(BENCH_ROOT, "length", f"{label}_{fmt}")
    hea = os.path.join(folder, "holter.hea")
    if os.path.exists(os.path.join(folder, ".complete")):
        return hea
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    hour = 3600
    if seconds <= hour:
        sig, _ = synthesize_ecg(seconds, FS, LEADS, seed=7)
    else:
        parts = []
        for i in range(-(-seconds // hour)):
            piece, _ = synthesize_ecg(min(hour, seconds - i * hour), FS, LEADS, seed=7 + i)
            parts.append(piece)
        sig = np.concatenate(parts)
        del parts
    wfdb.wrsamp(
        "holter",
        fs=FS,
        units=["mV", "mV"],
        sig_name=LEADS,
        p_signal=sig.astype(np.float64),
        fmt=[fmt, fmt],
        adc_gain=[200.0, 200.0],
        baseline=[0, 0],
        write_dir=folder,
    )
    open(os.path.join(folder, ".complete"), "w").close()
    return hea


IN_PROCESS = r"""
import os, sys, time, json
from ecgtok.models.tokenizer import Tokenizer
from ecgtok.pipeline.flags import default_tokenizer_dir
from ecgtok.transforms.record_tokens import tokenize_record
import ecgtok.transforms.qrs, ecgtok.transforms.beats, ecgtok.transforms.wfdb_reader
tok = Tokenizer.load(default_tokenizer_dir())
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t = time.perf_counter(); c = time.process_time()
rows = tokenize_record(sys.argv[1], "holter", tok, 300.0, {})
wall = time.perf_counter() - t; cpu = time.process_time() - c
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent, so a
# benchmark process that has just synthesised a 24 h record would be charged for it.
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"wall": wall, "cpu": cpu, "rss_after_imports": before, "peak": peak,
                  "rows": len(rows), "beats": sum(len(r["r_peaks"]) for r in rows)}))
"""


def bench_length(a) -> None:
    labels = a.lengths.split(",")
    print(f"machine: {machine()}")
    print(f"start:   {load_line()}")
    print(
        f"records: synthetic {len(LEADS)}-lead {FS} Hz, format {a.fmt}, under {BENCH_ROOT}/length/"
    )
    print(
        f"{'length':>7}{'samples':>12}{'MB on disk':>11} | {'in-proc s':>9}{'cpu s':>7}"
        f"{'us/s rec':>9}{'beats':>8}{'peak MB':>8}{'+record MB':>11} | "
        f"{'ecgtok wall s':>13}{'tree peak MB':>13}"
    )
    for label in labels:
        secs = LENGTHS[label]
        t = time.perf_counter()
        hea = make_length_record(label, secs, a.fmt)
        made = time.perf_counter() - t
        disk = sum(os.path.getsize(f) for f in glob.glob(hea[:-4] + ".*")) / 2**20
        _, samples = count_samples(os.path.dirname(hea))
        p = subprocess.run(
            [PY, "-c", IN_PROCESS, hea], capture_output=True, text=True, timeout=a.timeout
        )
        if p.returncode != 0:
            print(f"{label:>7}  in-process run failed: {p.stderr[-800:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        line = (
            f"{label:>7}{samples:>12}{disk:>11.1f} | {r['wall']:>9.2f}{r['cpu']:>7.2f}"
            f"{1e6 * r['wall'] / secs:>9.0f}{r['beats']:>8}{r['peak'] / 2**20:>8.0f}"
            f"{(r['peak'] - r['rss_after_imports']) / 2**20:>11.0f} | "
        )
        if not a.no_pipeline:
            dst = os.path.join(BENCH_ROOT, "out", f"length_{label}")
            e = run_ecgtok("tokenize", os.path.dirname(hea), dst, [], 1, 0)
            line += f"{e['wall']:>13.2f}{e['peak_rss'] / 2**20:>13.0f}"
            shutil.rmtree(dst, ignore_errors=True)
        print(line + (f"   (made in {made:.0f} s)" if made > 1 else ""))
        sys.stdout.flush()
    print(f"end:     {load_line()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("count")
    c.add_argument("--sizes", default="110,1100,11000")
    c.add_argument("--src", default=DEFAULT_DIR)
    c.add_argument("--copy", action="store_true", help="copy bytes instead of hard links")
    c.add_argument("--baseline", action="store_true")
    c.add_argument("--extra", default="", help="more ecgtok options, e.g. '--isolation none'")
    ln = sub.add_parser("length")
    ln.add_argument("--lengths", default=",".join(LENGTHS))
    ln.add_argument("--fmt", default="212", choices=("212", "16"))
    ln.add_argument("--no-pipeline", action="store_true")
    ln.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    bench_count(a) if a.what == "count" else bench_length(a)


if __name__ == "__main__":
    main()
