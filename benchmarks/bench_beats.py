"""Beat detection on MIT-BIH: ecgtok against NeuroKit2 and wfdb's XQRS, side by side.

    .venv/bin/python benchmarks/bench_beats.py --data ../shared/data/mitdb [--records 100,105]
        [--skip-xqrs] [--repeat 3] [--long]

Accuracy follows the rule of `ecgtok eval-beats` (whole records; beat symbols; one-to-one
matching within +-150 ms; flutter/fibrillation episodes ignored), pooled over the
records, with and without the paced records 102, 104, 107 and 217. ecgtok reads every
lead; NeuroKit2 (`ecg_peaks`, default method) and XQRS read channel 0, as in the issue.

Speed is lead-samples per second on one core: the process is pinned to one CPU, BLAS
and OpenMP pools are held to one thread, records are decoded before timing, each
detector runs once untimed (imports, filter design), and each record's time is the
best of `--repeat` runs (XQRS: one run; it takes minutes). A detector that reads two
leads is credited with twice the lead-samples.

`--long` also runs ecgtok on a 24 h, 200 Hz, 2-lead recording (MIT-BIH record 100
resampled and repeated) and reports its time and peak Python-side memory.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

PACED = ("102", "104", "107", "217")


def _ecgtok(sig, fs):
    from ecgtok.transforms.qrs import detect_r_peaks

    return detect_r_peaks(sig, fs)


def _neurokit2(sig, fs):
    import neurokit2 as nk

    _, info = nk.ecg_peaks(sig[:, 0], sampling_rate=fs)
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


def _xqrs(sig, fs):
    from wfdb import processing

    return processing.xqrs_detect(sig=sig[:, 0], fs=fs, verbose=False)


DETECTORS = {"ecgtok": (_ecgtok, None), "neurokit2": (_neurokit2, 1), "xqrs": (_xqrs, 1)}


def _pin_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"


def _load(folder: str, names: list[str]):
    import wfdb

    from ecgtok.transforms.wfdb_reader import read_record

    out = []
    for name in names:
        rec = read_record(os.path.join(folder, name + ".hea"))
        ann = wfdb.rdann(os.path.join(folder, name), "atr")
        out.append((name, rec.signal, rec.fs, ann))
    return out


def run(records, detectors: list[str], repeat: int) -> dict:
    from ecgtok.transforms.beat_eval import Score, score_record

    results = {}
    for det in detectors:
        fn, leads = DETECTORS[det]
        name0, sig0, fs0, _ = records[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(sig0[: int(10 * fs0)].astype(np.float64 if leads else np.float32), fs0)
        pooled, no_paced = Score(), Score()
        seconds, lead_samples = 0.0, 0
        per_record = {}
        for name, sig, fs, ann in records:
            x = sig.astype(np.float64) if leads else sig  # comparisons get float64 channel 0
            best = float("inf")
            for _ in range(1 if det == "xqrs" else repeat):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    peaks = fn(x, fs)
                    best = min(best, time.perf_counter() - t0)
            s = score_record(ann.sample, ann.symbol, peaks, fs, 0.15, len(sig))
            per_record[name] = s
            pooled = pooled + s
            if name not in PACED:
                no_paced = no_paced + s
            seconds += best
            lead_samples += sig.shape[0] * (leads or sig.shape[1])
        results[det] = {
            "all": pooled,
            "no_paced": no_paced,
            "seconds": seconds,
            "lead_samples": lead_samples,
            "per_record": per_record,
        }
        print(
            f"  {det}: Se {100 * pooled.se:.2f}% +P {100 * pooled.ppv:.2f}% in {seconds:.2f} s",
            file=sys.stderr,
        )
    return results


def print_table(results: dict, n_records: int, n_beats: int, out=sys.stdout) -> None:
    base = results.get("neurokit2")
    base_rate = base["lead_samples"] / base["seconds"] if base else None
    print(f"\n{n_records} records, {n_beats} reference beats (outside VF episodes)\n", file=out)
    print(
        "| detector | leads | Se | +P | Se (no paced) | +P (no paced) | time, one core "
        "| M lead-samples/s | vs NeuroKit2 |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for det, r in results.items():
        rate = r["lead_samples"] / r["seconds"]
        ratio = f"{rate / base_rate:.1f}x" if base_rate else "-"
        leads = "all" if DETECTORS[det][1] is None else "channel 0"
        print(
            f"| {det} | {leads} | {100 * r['all'].se:.2f}% | {100 * r['all'].ppv:.2f}% "
            f"| {100 * r['no_paced'].se:.2f}% | {100 * r['no_paced'].ppv:.2f}% "
            f"| {r['seconds']:.2f} s | {rate / 1e6:.1f} | {ratio} |",
            file=out,
        )


def long_record(folder: str, out=sys.stdout) -> None:
    """24 h at 200 Hz, 2 leads: time and peak Python-side memory of detect_r_peaks."""
    from ecgtok.transforms.preprocess import resample
    from ecgtok.transforms.qrs import detect_r_peaks
    from ecgtok.transforms.wfdb_reader import read_record

    rec = read_record(os.path.join(folder, "100.hea"))
    y, fs = resample(rec.signal, rec.fs, 200.0)
    n = int(24 * 3600 * fs)
    x = np.resize(y.astype(np.float32), (n, y.shape[1]))
    tracemalloc.start()
    t0 = time.perf_counter()
    peaks = detect_r_peaks(x, fs)
    dt = time.perf_counter() - t0
    _, peak_mem = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"\n24 h at {fs:g} Hz, {x.shape[1]} leads ({x.nbytes / 2**20:.0f} MiB as float32): "
        f"{peaks.size} beats in {dt:.1f} s, "
        f"peak memory while detecting {peak_mem / 2**20:.0f} MiB",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/mitdb", help="MIT-BIH folder")
    p.add_argument("--records", default="", help="comma-separated records (all)")
    p.add_argument("--skip-xqrs", action="store_true", help="leave out XQRS (~3 min)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per record (best)")
    p.add_argument("--long", action="store_true", help="also run a 24 h, 200 Hz record")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"bench_beats: data folder {args.data!r} not found", file=sys.stderr)
        return 2
    names = [r.strip() for r in args.records.split(",") if r.strip()] or sorted(
        f[:-4]
        for f in os.listdir(args.data)
        if f.endswith(".hea") and os.path.exists(os.path.join(args.data, f[:-4] + ".atr"))
    )
    print(f"bench_beats: {_pin_one_core()}; loading {len(names)} records", file=sys.stderr)
    records = _load(args.data, names)
    detectors = ["ecgtok", "neurokit2"] + ([] if args.skip_xqrs else ["xqrs"])
    results = run(records, detectors, max(1, args.repeat))
    first = results["ecgtok"]
    n_beats = first["all"].tp + first["all"].fn
    print_table(results, len(records), n_beats)
    if args.long:
        long_record(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
