"""Reading speed and memory: wfdb.rdrecord against ecgtok's read_record, in one run.

    .venv/bin/python benchmarks/bench_read.py --data ../shared/data/cinc2021_12lead

Both read every record of the archive, one process, one core, files warm in the page
cache (one untimed pass first). Rates are the best of `--repeat` passes. Memory is
measured per record with tracemalloc (NumPy reports its buffers to it): the peak of
Python-side allocations while reading that record, compared with the size of the
record's samples as float32. `--long` also reads one long record whole and in chunks to
show that chunked reading keeps the peak flat.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import tracemalloc
import warnings

import numpy as np

os.environ.setdefault("NO_GCE_CHECK", "true")


def _wfdb_read(hea: str):
    import wfdb

    return wfdb.rdrecord(hea[: -len(".hea")], physical=True).p_signal


def _ecgtok_read(hea: str):
    from ecgtok.transforms.wfdb_reader import read_record

    return read_record(hea).signal


def _rate(fn, headers, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for h in headers:
            fn(h)
        best = min(best, time.perf_counter() - t0)
    return len(headers) / best


def _peaks(fn, headers) -> tuple[float, float, float]:
    """(median peak MB, max peak MB, median peak / float32 sample bytes)."""
    peaks, ratios = [], []
    for h in headers:
        tracemalloc.start()
        sig = fn(h)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        samples = sig.shape[0] * sig.shape[1] * 4
        peaks.append(peak / 1e6)
        ratios.append(peak / samples)
        del sig
    return float(np.median(peaks)), float(np.max(peaks)), float(np.median(ratios))


def _long(path: str, chunk_s: float) -> None:
    from ecgtok.transforms.wfdb_reader import open_record

    with open_record(path) as reader:
        size = reader.n_samples * reader.n_leads * 4 / 1e6
        tracemalloc.start()
        reader.read()
        whole = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        tracemalloc.start()
        n = 0
        for _, part in reader.chunks(int(chunk_s * reader.fs)):
            n += part.shape[0]
        chunked = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    print(
        f"\nlong record {os.path.basename(path)}: {reader.n_samples} samples x "
        f"{reader.n_leads} leads ({size:.1f} MB as float32)\n"
        f"  whole read peak   {whole:8.1f} MB\n"
        f"  {chunk_s:g} s chunks peak {chunked:8.1f} MB  ({n} samples read)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cinc2021_12lead")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--long",
        default="../shared/data/mitdb/100.hea",
        help="a long record to read whole and in chunks ('' to skip)",
    )
    parser.add_argument("--chunk-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    headers = sorted(glob.glob(os.path.join(args.data, "**", "*.hea"), recursive=True))
    if not headers:
        print(f"no headers under {args.data}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    # Same samples from both readers (after NaN -> 0), checked on the way.
    for h in headers:
        a = np.nan_to_num(_wfdb_read(h), nan=0.0)
        b = _ecgtok_read(h)
        if not np.allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(a).max()))):
            print(f"samples differ on {h}", file=sys.stderr)
            return 1
    print(f"{len(headers)} records from {args.data}; best of {args.repeat} passes, one core\n")
    print(
        f"{'reader':<22}{'records/s':>10}{'median peak MB':>16}{'max peak MB':>13}{'peak/samples':>14}"
    )
    rates = {}
    for name, fn in [("wfdb.rdrecord", _wfdb_read), ("ecgtok read_record", _ecgtok_read)]:
        rates[name] = _rate(fn, headers, args.repeat)
        med, mx, ratio = _peaks(fn, headers)
        print(f"{name:<22}{rates[name]:>10.0f}{med:>16.2f}{mx:>13.2f}{ratio:>14.2f}")
    print(f"\nspeed-up: {rates['ecgtok read_record'] / rates['wfdb.rdrecord']:.1f}x")
    if args.long and os.path.exists(args.long):
        _long(args.long, args.chunk_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
