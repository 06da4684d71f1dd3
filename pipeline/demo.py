"""`ecgtok demo`: the main job on an embedded default, on a fresh machine with no data.

It writes a small synthetic WFDB archive (sinus, AF, PVC, a 6-minute two-lead Holter
and a flat line; see `transforms/synth.py`), runs `ecgtok run` on it with the shipped
tokenizer and model on the local runner, and prints the summary table.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ecgtok demo")
    ap.add_argument("--output", default="demo_out", help="output folder of the demo job")
    ap.add_argument("--archive", default="demo_archive", help="where the demo archive is written")
    ap.add_argument("--records", type=int, default=12)
    ap.add_argument("--overwrite", action="store_true")
    args, beam_args = ap.parse_known_args(argv)

    from ecgtok.pipeline.cli import main as cli_main
    from ecgtok.transforms.synth import write_demo_archive

    paths = write_demo_archive(args.archive, n_records=args.records, seed=0)
    print(f"demo archive: {len(paths)} synthetic records in {args.archive}/", file=sys.stderr)
    job = ["run", "--input", args.archive, "--output", args.output, *beam_args]
    if args.overwrite:
        job.append("--overwrite")
    code = cli_main(job)
    if code == 0:
        print(f"token shards: {os.path.join(args.output, 'tokens')}/*.parquet", file=sys.stderr)
        print(f"scores:       {os.path.join(args.output, 'scores')}/*.parquet", file=sys.stderr)
    return code
