"""`ecgtok plot`: one record drawn with its beats, token ids and decoded words.

    ecgtok plot --input RECORD.hea --output PNG [--tokenizer DIR] [--seconds 10] [--leads II,V1]

It tokenizes the record exactly as `ecgtok tokenize` does (same reader, detector and
tokenizer, first segment of a long record) and draws the leads on ECG paper: a marker on
each detected beat, dotted beat boundaries, the word id above each beat, and the word's
centroid waveform (`Tokenizer.decode`) over the beat it stands for.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ecgtok plot")
    ap.add_argument("--input", required=True, help="a record (.hea, .edf or a hospital export)")
    ap.add_argument("--output", required=True, help="PNG to write")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--leads", default=None, help="comma-separated lead names (default: two)")
    args = ap.parse_args(argv)

    from ecgtok.models.tokenizer import ArtifactError, Tokenizer
    from ecgtok.pipeline.flags import default_tokenizer_dir
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.figure import plot_record_with_tokens
    from ecgtok.transforms.record_tokens import read_any, tokenize_record

    try:
        tokenizer = Tokenizer.load(args.tokenizer or default_tokenizer_dir())
        rows = tokenize_record(args.input, "plot", tokenizer)
        record = read_any(args.input, "plot")
    except (RecordError, ArtifactError) as exc:
        print(f"ecgtok: error: {exc}", file=sys.stderr)
        return 3
    row = rows[0]
    leads = args.leads.split(",") if args.leads else record.lead_names[:2]
    decoded = [tokenizer.decode(words) for words in row["tokens"]]
    plot_record_with_tokens(
        record.signal,
        record.fs,
        row["r_peaks"],
        row["tokens"],
        record.lead_names,
        args.output,
        leads=leads,
        seconds=args.seconds,
        decoded=decoded,
        decoded_fs=float(tokenizer.meta.get("window_fs", 100.0)),
    )
    print(args.output)
    return 0
