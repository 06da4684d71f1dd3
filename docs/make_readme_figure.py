"""Make docs/record_tokens.png: a real record, its detected beats and token ids.

    .venv/bin/python docs/make_readme_figure.py [--record ../shared/data/mitdb/208.hea]

It runs the project's own `ecgtok tokenize` on one record (default tokenizer) and draws
the first seconds of two leads from the token shard it wrote.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile

import pyarrow.parquet as pq

from ecgtok.pipeline.cli import main as cli
from ecgtok.transforms.figure import plot_record_with_tokens
from ecgtok.transforms.wfdb_reader import read_record

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--record", default=os.path.join(HERE, "..", "..", "shared", "data", "mitdb", "208.hea")
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=os.path.join(HERE, "record_tokens.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        assert cli(["tokenize", "--input", args.record, "--output", tmp]) == 0
        rows = []
        for f in glob.glob(os.path.join(tmp, "tokens", "*.parquet")):
            rows.extend(pq.read_table(f).to_pylist())
    row = min(rows, key=lambda r: r["start_sample"])
    rec = read_record(args.record, row["record_id"])
    plot_record_with_tokens(
        rec.signal,
        rec.fs,
        row["r_peaks"],
        row["tokens"],
        rec.lead_names,
        args.out,
        leads=tuple(rec.lead_names[:2]),
        seconds=args.seconds,
    )
    print(args.out)


if __name__ == "__main__":
    main()
