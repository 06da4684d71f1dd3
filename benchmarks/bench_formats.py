"""Records/s per hospital export format: decode every fixture of a format, repeatedly.

    .venv/bin/python benchmarks/bench_formats.py --data ../shared/data/formats [--seconds 2]

Files are read into memory once; the timed loop is `read_export_bytes` alone (XML
stream-parsing, base64/XLI/Huffman decoding, de-identification), one process, one core.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

from ecgtok.transforms.formats import read_export_bytes, sniff_format


def load_fixtures(root: str) -> dict[str, list[tuple[str, bytes]]]:
    by_format: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*"))):
        if path.endswith((".md", ".ann")):
            continue
        with open(path, "rb") as f:
            data = f.read()
        fmt = sniff_format(data[:4096], path)
        if fmt:
            by_format.setdefault(fmt, []).append((path, data))
    return by_format


def rate(items: list[tuple[str, bytes]], seconds: float) -> tuple[float, float]:
    for path, data in items:
        read_export_bytes(data, path, "warm")  # imports and caches outside the timing
    n, nbytes, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for path, data in items:
            read_export_bytes(data, path, "bench")
            n += 1
            nbytes += len(data)
    dt = time.perf_counter() - t0
    return n / dt, nbytes / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/formats")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(f"{'format':<14}{'files':>6}{'records/s':>12}{'MB/s':>8}")
    for fmt, items in sorted(load_fixtures(args.data).items()):
        per_s, mb_s = rate(items, args.seconds)
        print(f"{fmt:<14}{len(items):>6}{per_s:>12.1f}{mb_s:>8.1f}")


if __name__ == "__main__":
    main()
