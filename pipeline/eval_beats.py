"""`ecgtok eval-beats`: score beat detectors against a database's reference annotations.

    ecgtok eval-beats --input DB [--annotator atr] [--window 0.15] [--records 100,101]
                      [--compare xqrs,neurokit2|none] [--jobs N]

For every record of DB (a folder of WFDB records with annotation files) it runs ecgtok's
detector on all leads, and each comparison detector on channel 0 (wfdb's XQRS,
NeuroKit2's default `ecg_peaks`), scores them by the rule in
`ecgtok.transforms.beat_eval`, and prints per-record and pooled Se and +P, pooled also
without the MIT-BIH paced records, and each detector's throughput in lead-samples per
second of one core (time spent inside the detector, summed over records; `--jobs`
runs records in parallel processes but does not change that figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np

PACED = ("102", "104", "107", "217")  # MIT-BIH records with paced rhythm
DETECTORS = ("ecgtok", "xqrs", "neurokit2")


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ecgtok eval-beats", description=__doc__.split("\n\n")[2])
    p.add_argument("--input", required=True, help="folder of WFDB records with annotations")
    p.add_argument("--annotator", default="atr", help="annotation file extension (atr)")
    p.add_argument("--window", type=float, default=0.15, help="match tolerance, s (0.15)")
    p.add_argument("--records", default="", help="comma-separated record names (all)")
    p.add_argument(
        "--compare",
        default="xqrs,neurokit2",
        help="comparison detectors on channel 0: xqrs, neurokit2, or none",
    )
    p.add_argument("--jobs", type=int, default=1, help="records scored in parallel (1)")
    return p


def _ecgtok(signal: np.ndarray, fs: float) -> np.ndarray:
    from ecgtok.transforms.qrs import detect_r_peaks

    return detect_r_peaks(signal, fs)


def _xqrs(signal: np.ndarray, fs: float) -> np.ndarray:
    from wfdb import processing

    return processing.xqrs_detect(sig=signal[:, 0].astype(np.float64), fs=fs, verbose=False)


def _neurokit2(signal: np.ndarray, fs: float) -> np.ndarray:
    import neurokit2 as nk

    _, info = nk.ecg_peaks(signal[:, 0].astype(np.float64), sampling_rate=fs)
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


RUNNERS = {"ecgtok": _ecgtok, "xqrs": _xqrs, "neurokit2": _neurokit2}
LEADS_USED = {"ecgtok": None, "xqrs": 1, "neurokit2": 1}  # None: all leads
_WARM: set[str] = set()  # detectors already run once in this process


def score_one(task: tuple) -> dict:
    """Read one record and its annotations, run the detectors, score each.

    Returns {"record", "n_ref", "fs", detector: (tp, fn, fp, seconds, lead_samples)}.
    """
    import wfdb

    from ecgtok.transforms.beat_eval import Score, score_record
    from ecgtok.transforms.wfdb_reader import read_record

    hea, annotator, window, detectors = task
    rec = read_record(hea)
    ann = wfdb.rdann(hea[: -len(".hea")], annotator)
    n, n_leads = rec.signal.shape
    out: dict = {"record": rec.record_id, "fs": rec.fs}
    ref = Score()
    for name in detectors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name not in _WARM:  # imports and first-call set-up are not detection time
                RUNNERS[name](rec.signal[: int(10 * rec.fs)], rec.fs)
                _WARM.add(name)
            t0 = time.process_time()
            det = np.asarray(RUNNERS[name](rec.signal, rec.fs), dtype=np.int64)
            dt = time.process_time() - t0
        s = score_record(ann.sample, ann.symbol, det, rec.fs, window, n)
        ref = s
        leads = LEADS_USED[name] or n_leads
        out[name] = (s.tp, s.fn, s.fp, dt, n * leads)
    out["n_ref"] = ref.tp + ref.fn
    return out


def _records(folder: str, annotator: str, names: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UsageError(f"input folder {folder!r} does not exist")
    available = {
        f[: -len(".hea")]
        for f in os.listdir(folder)
        if f.endswith(".hea") and os.path.isfile(os.path.join(folder, f[:-4] + "." + annotator))
    }
    if names:
        wanted = [r.strip() for r in names.split(",") if r.strip()]
        missing = [r for r in wanted if r not in available]
        if missing:
            raise UsageError(
                f"record(s) {', '.join(missing)} not found in {folder} with .{annotator} annotations"
            )
        return wanted
    if not available:
        raise UsageError(f"no WFDB record with .{annotator} annotations in {folder}")
    return sorted(available)


def _pct(x: float) -> str:
    return f"{100 * x:7.2f}"


def report(results: list[dict], detectors: tuple[str, ...], out=None) -> dict:
    """Print the tables; return the pooled figures {detector: {...}}."""
    from ecgtok.transforms.beat_eval import Score

    out = out or sys.stdout
    head = f"{'record':<10}{'beats':>7}" + "".join(
        f"  {d + ' Se':>14}{'+P':>8}{'FN':>6}{'FP':>6}" for d in detectors
    )
    print(head, file=out)
    pooled = {d: Score() for d in detectors}
    pooled_np = {d: Score() for d in detectors}
    secs = dict.fromkeys(detectors, 0.0)
    samples = dict.fromkeys(detectors, 0)
    has_paced = False
    for r in results:
        line = f"{r['record']:<10}{r['n_ref']:>7}"
        for d in detectors:
            tp, fn, fp, dt, ls = r[d]
            s = Score(tp, fn, fp)
            pooled[d] = pooled[d] + s
            if r["record"] in PACED:
                has_paced = True
            else:
                pooled_np[d] = pooled_np[d] + s
            secs[d] += dt
            samples[d] += ls
            line += f"  {_pct(s.se):>14}{_pct(s.ppv):>8}{fn:>6}{fp:>6}"
        print(line, file=out)
    print("", file=out)
    summary = {}
    rows = [("all records", pooled)]
    if has_paced:
        rows.append((f"without paced {','.join(PACED)}", pooled_np))
    for label, table in rows:
        print(f"pooled, {label}:", file=out)
        for d in detectors:
            s = table[d]
            print(
                f"  {d:<10} Se {_pct(s.se)}%  +P {_pct(s.ppv)}%  (TP {s.tp}, FN {s.fn}, FP {s.fp})",
                file=out,
            )
    print("throughput (one core, time inside the detector):", file=out)
    base = None
    if "neurokit2" in detectors and secs["neurokit2"] > 0:
        base = samples["neurokit2"] / secs["neurokit2"]
    for d in detectors:
        rate = samples[d] / secs[d] if secs[d] > 0 else float("inf")
        ratio = f"  {rate / base:5.1f}x NeuroKit2" if base else ""
        print(
            f"  {d:<10} {secs[d]:8.2f} s  {samples[d] / 1e6:8.1f} M lead-samples  "
            f"{rate / 1e6:7.2f} M lead-samples/s{ratio}",
            file=out,
        )
        summary[d] = {
            "se": pooled[d].se,
            "ppv": pooled[d].ppv,
            "se_no_paced": pooled_np[d].se,
            "ppv_no_paced": pooled_np[d].ppv,
            "seconds": secs[d],
            "lead_samples": samples[d],
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.window <= 0:
            raise UsageError("--window must be positive")
        if args.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        compare = [c.strip() for c in args.compare.split(",") if c.strip()]
        if compare == ["none"]:
            compare = []
        unknown = [c for c in compare if c not in ("xqrs", "neurokit2")]
        if unknown:
            raise UsageError(f"unknown --compare detector(s): {', '.join(unknown)}")
        names = _records(args.input, args.annotator, args.records)
    except UsageError as exc:
        print(f"ecgtok eval-beats: error: {exc}", file=sys.stderr)
        return 2
    detectors = ("ecgtok", *[d for d in DETECTORS[1:] if d in compare])
    tasks = [
        (os.path.join(args.input, r + ".hea"), args.annotator, args.window, detectors)
        for r in names
    ]
    try:
        if args.jobs == 1:
            results = [score_one(t) for t in tasks]
        else:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                results = list(pool.map(score_one, tasks))
    except Exception as exc:  # unreadable record or annotation: one line, not a traceback
        print(f"ecgtok eval-beats: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report(results, detectors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
