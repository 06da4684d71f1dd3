"""ecgtok's own job flags, readable without importing Beam.

`EcgtokOptions` (pipeline/options.py) registers these on Beam's parser. The launcher also
reads a few of them before it imports Beam (about 2 s), to start the forkserver of a
local job's guarded children on the otherwise idle core meanwhile
(`transforms/isolation.py`, `prestart`).
"""

from __future__ import annotations

import argparse
import os

# Runners that ecgtok maps onto the in-process FnApiRunner (Prism is opt-in by name).
LOCAL_RUNNER_NAMES = {None, "", "DirectRunner", "direct", "FnApiRunner"}


def default_tokenizer_dir() -> str:
    from ecgtok.models import artifacts_dir

    return os.path.join(artifacts_dir(), "tokenizer")


def default_model_dir() -> str:
    from ecgtok.models import artifacts_dir

    return os.path.join(artifacts_dir(), "model")


def add_ecgtok_args(parser) -> None:
    """The flags of every ecgtok job, on an argparse parser (Beam's or a plain one)."""
    parser.add_argument("--input", help="folder, glob, gs:// prefix or manifest .csv")
    parser.add_argument("--output", help="output folder (local or gs://)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer artifact folder")
    parser.add_argument("--model", default=None, help="model artifact folder")
    parser.add_argument(
        "--overwrite",
        default=False,
        action="store_true",
        help="replace the outputs of an earlier run in --output",
    )
    parser.add_argument(
        "--segment_seconds",
        type=float,
        default=300.0,
        help="records longer than this get one token row per segment",
    )
    parser.add_argument(
        "--device", default="auto", help="scoring device: auto (GPU when present), cpu, gpu"
    )
    parser.add_argument(
        "--score_batch_size", type=int, default=64, help="records per inference batch"
    )
    parser.add_argument(
        "--pseudonym_key_file",
        default=None,
        help="hospital exports: file (local or gs://) holding the key for patient "
        "pseudonyms and hashed record ids; default $ECGTOK_PSEUDONYM_KEY",
    )
    parser.add_argument(
        "--carry_identifiers",
        default=False,
        action="store_true",
        help="hospital exports: keep names, MRNs, dates and file names (sites allowed them)",
    )
    parser.add_argument(
        "--resume",
        default=False,
        action="store_true",
        help="finish a killed local run in --output, skipping its completed chunks",
    )
    parser.add_argument(
        "--chunk_records",
        type=int,
        default=None,
        help="local runs: records per resumable chunk (default 20000; 0 = one job)",
    )
    parser.add_argument(
        "--isolation",
        choices=("process", "none"),
        default="process",
        help="process: each record in a guarded child process with the bounds below",
    )
    parser.add_argument(
        "--record_timeout", type=float, default=300.0, help="seconds allowed per record"
    )
    parser.add_argument(
        "--record_memory_mb", type=int, default=6144, help="address space allowed per record"
    )


class _Unparsable(Exception):
    pass


_BUILD_ONLY = ("--dry_run", "--template_location")


def local_guard_memory_mb(argv: list[str]) -> int | None:
    """The address-space bound (`--record_memory_mb`) of the guarded children that a job
    run with `argv` starts in this process, or None where it starts none here.

    None for another runner, for `multi_processing` (its workers are other processes),
    without `--isolation process`, for jobs that only build (`--dry_run`,
    `--template_location`) or only print help, and for argv that is missing
    `--input`/`--output`, names no local tokenizer folder, or cannot be read: the real
    parse reports those mistakes, in one line, without children to wait for.
    """
    if any(a in ("-h", "--help") or a.startswith(_BUILD_ONLY) for a in argv):
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_ecgtok_args(parser)
    parser.add_argument("--runner", default=None)
    parser.add_argument("--direct_running_mode", default=None)

    def fail(message: str):
        raise _Unparsable(message)

    parser.error = fail  # type: ignore[method-assign]
    try:
        args, _ = parser.parse_known_args(argv)
    except _Unparsable:
        return None
    if args.runner not in LOCAL_RUNNER_NAMES or args.direct_running_mode == "multi_processing":
        return None
    if args.isolation != "process" or not (args.input and args.output):
        return None
    if not os.path.isdir(args.tokenizer or default_tokenizer_dir()):
        return None
    return args.record_memory_mb
