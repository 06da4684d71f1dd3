"""End to end, side by side: the plain-Python baseline loop against `ecgtok tokenize`.

    .venv/bin/python benchmarks/bench_e2e.py [--records DIR] [--baseline-records DIR]
        [--configs default,mp2] [--info-no-guard] [--no-score] [--keep DIR]

Runs, in one invocation and on the same records:

* the baseline, `../shared/baselines/naive_loop.py DIR OUT.parquet` (its own records/s,
  timed by the program around its loop, and its wall time with Python start-up);
* `ecgtok tokenize --input DIR --output ...` as a subprocess, start-up included, on the
  project's default local runner (FnApiRunner multi_threading on all cores, guards on)
  and on `--direct_running_mode=multi_processing --direct_num_workers=2` (guards on);
* `ecgtok score` alone on the token shards the default run wrote;
* with `--info-no-guard`, the same tokenize runs with `--isolation none`, for
  information only (the guards are on by default, so they count in the figures).

For each it prints wall seconds, records/s, samples/s (all leads) and the peak RSS of the
whole process tree (the CLI, Beam's worker processes and the guarded children, summed,
polled every 50 ms from /proc), and the ratio of ecgtok's records/s to the baseline's.
`--baseline-records` lets the baseline run on a smaller folder of the same records (the
loop's cost per record does not depend on how many there are; 11,000 records would take
the loop 17 minutes): the ratio is then between rates, as the issue defines it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
DEFAULT_DIR = os.path.join(SHARED, "data", "cinc2021_12lead")
BASELINE = os.path.join(SHARED, "baselines", "naive_loop.py")
PY = os.path.join(ROOT, ".venv", "bin", "python")
ECGTOK = os.path.join(ROOT, ".venv", "bin", "ecgtok")
TARGET_RATIO = 20.0

CONFIGS = {
    "default": [],
    "mp2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


# ------------------------------------------------------------------ measurement
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pid: int) -> int:
    """Summed RSS of pid and all its descendants (shared pages counted once per process)."""
    kids = _children_map()
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _rss_bytes(p)
        stack.extend(kids.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.05) -> dict:
    """Run cmd; wall seconds, peak tree RSS (bytes), CPU seconds of the tree, output."""
    r0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    return {"wall": wall, "peak_rss": peak[0], "cpu": cpu, "out": out}


# ------------------------------------------------------------------------ inputs
def header_paths(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.hea"), recursive=True))


def count_samples(folder: str) -> tuple[int, int]:
    """(records, samples over all leads) from the headers' record lines."""
    n = total = 0
    for h in header_paths(folder):
        with open(h, encoding="latin-1") as f:
            first = ""
            for line in f:
                if line.strip() and not line.startswith("#"):
                    first = line
                    break
        parts = first.split()
        n += 1
        if len(parts) >= 4:
            total += int(parts[1]) * int(parts[3])
    return n, total


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB"


def load_line() -> str:
    with open("/proc/loadavg") as f:
        la = f.read().split()[:3]
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load average {' '.join(la)}"


# ------------------------------------------------------------------------ runs
def run_baseline(folder: str, out_dir: str) -> dict:
    n, samples = count_samples(folder)
    res = run_measured([PY, BASELINE, folder, os.path.join(out_dir, "naive.parquet")])
    m = re.search(r"= ([0-9.]+) records/s", res["out"])
    loop_rate = float(m.group(1)) if m else n / res["wall"]
    m = re.search(r"in ([0-9.]+)s", res["out"])
    loop_s = float(m.group(1)) if m else res["wall"]
    return {
        **res,
        "records": n,
        "samples": samples,
        "rate": loop_rate,
        "loop_s": loop_s,
        "wall_rate": n / res["wall"],
    }


def run_ecgtok(mode: str, src: str, dst: str, extra: list[str], n: int, samples: int) -> dict:
    res = run_measured([ECGTOK, mode, "--input", src, "--output", dst, "--overwrite", *extra])
    with open(os.path.join(dst, "summary.json")) as f:
        summary = json.load(f)
    done = summary.get("tokenized", summary.get("scored", 0))
    if mode == "tokenize" and summary.get("discovered") != n:
        raise RuntimeError(f"ecgtok discovered {summary.get('discovered')} of {n} records")
    return {
        **res,
        "records": n,
        "samples": samples,
        "summary": summary,
        "done": done,
        "rate": n / res["wall"],
        "job_s": summary.get("wall_seconds"),
    }


def fmt_row(name: str, r: dict, base_rate: float | None) -> str:
    rate = r["records"] / r["wall"]
    ratio = f"{rate / base_rate:6.2f}x" if base_rate else "      -"
    return (
        f"{name:<40}{r['records']:>7}{r['wall']:>9.2f}{rate:>10.1f}"
        f"{r['samples'] / r['wall'] / 1e6:>9.2f}{r['peak_rss'] / 2**20:>9.0f}"
        f"{r['cpu']:>8.1f}  {ratio}"
    )


HEAD = (
    f"{'run':<40}{'records':>7}{'wall s':>9}{'rec/s':>10}{'Msmp/s':>9}{'peak MB':>9}"
    f"{'cpu s':>8}  vs base"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=DEFAULT_DIR, help="records for ecgtok")
    ap.add_argument(
        "--baseline-records",
        default=None,
        help="records for the baseline loop (default: the same as --records)",
    )
    ap.add_argument("--configs", default="default,mp2")
    ap.add_argument(
        "--info-no-guard",
        action="store_true",
        help="also run each config with --isolation none (information only)",
    )
    ap.add_argument("--no-score", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", default=None, help="keep the outputs in this folder")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    a = ap.parse_args()

    work = a.keep or tempfile.mkdtemp(prefix="ecgtok_bench_e2e_")
    os.makedirs(work, exist_ok=True)
    n, samples = count_samples(a.records)
    print(f"machine: {machine()}")
    print(f"start:   {load_line()}")
    print(f"records: {n} under {a.records} ({samples / max(n, 1):.0f} samples/record, all leads)")
    print(HEAD)
    results: dict = {}
    base_rate = None
    if not a.no_baseline:
        b = run_baseline(a.baseline_records or a.records, work)
        base_rate = b["rate"]
        results["baseline"] = b
        # The loop's own rate (imports excluded): what the issue quotes; and with start-up.
        print(fmt_row("baseline naive_loop (loop only)", {**b, "wall": b["loop_s"]}, base_rate))
        print(fmt_row("baseline naive_loop (with start-up)", b, base_rate))
        sys.stdout.flush()

    runs = []
    for c in a.configs.split(","):
        runs.append((f"ecgtok tokenize {c}", c, []))
        if a.info_no_guard:
            runs.append((f"ecgtok tokenize {c} --isolation none*", c, ["--isolation", "none"]))
    first_out = None
    for name, c, more in runs:
        dst = os.path.join(work, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
        r = run_ecgtok("tokenize", a.records, dst, CONFIGS[c] + more, n, samples)
        results[name] = r
        first_out = first_out or dst
        print(fmt_row(name, r, base_rate), f"(job {r['job_s']:.1f} s)")
        sys.stdout.flush()

    if not a.no_score and first_out:
        dst = os.path.join(work, "score")
        r = run_ecgtok("score", first_out, dst, ["--device", "cpu"], n, samples)
        results["ecgtok score (existing shards)"] = r
        print(fmt_row("ecgtok score (existing shards)", r, None), f"(job {r['job_s']:.1f} s)")
    print(f"end:     {load_line()}")
    if base_rate:
        best = max(
            (v for k, v in results.items() if k.startswith("ecgtok tokenize") and "none" not in k),
            key=lambda v: v["rate"],
            default=None,
        )
        if best:
            print(
                f"best guarded tokenize: {best['rate']:.1f} records/s = "
                f"{best['rate'] / base_rate:.2f}x the baseline loop "
                f"(target {TARGET_RATIO:.0f}x = {TARGET_RATIO * base_rate:.0f} records/s)"
            )
    print("* information only: guards are on by default and count in the figures")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    k: {kk: vv for kk, vv in v.items() if kk not in ("out",)}
                    for k, v in results.items()
                },
                f,
                indent=2,
                default=str,
            )
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
