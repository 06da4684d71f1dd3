"""The `ecgtok` command line. It only parses and dispatches; the work is elsewhere.

    ecgtok run       --input SRC --output DST [--tokenizer DIR] [--model DIR] [--overwrite] [Beam options]
    ecgtok tokenize  --input SRC --output DST [--tokenizer DIR] [--overwrite] [Beam options]
    ecgtok score     --input TOKENS --output DST [--model DIR] [--overwrite] [Beam options]
    ecgtok demo      [--output DIR] [--overwrite]
    ecgtok nightly   --cohort COHORT.csv --date YYYY-MM-DD --store DIR [Beam options]
    ecgtok eval-beats --input DB [--annotator atr] [--window 0.15]
    ecgtok fit-tokenizer --input SRC --output DIR [--vocab-size K]
    ecgtok fidelity  --input SRC [--tokenizer DIR]
    ecgtok plot      --input RECORD --output PNG [--tokenizer DIR] [--seconds 10]
    ecgtok pretrain / finetune  (see `ecgtok pretrain --help`)

User mistakes print one line on stderr and exit non-zero: 2 a bad option or value, 3 an
unreadable --input, 4 an unusable --output, 5 an archive with no records, 6 a bad or
tampered artifact. A job that fails exits 1. `--debug` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = __doc__.split("\n\n")[1]
# Distinct exit codes, so a scheduler can tell a user mistake from a failed job.
EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT, EXIT_EMPTY, EXIT_ARTIFACT = 1, 2, 3, 4, 5, 6
JOB_COMMANDS = ("run", "tokenize", "score")


def _fail(message: str, code: int = 2) -> int:
    print(f"ecgtok: error: {message}", file=sys.stderr)
    return code


def print_summary(summary: dict, out=None) -> None:
    """A short table a person can read at the end of a run."""
    out = out or sys.stdout
    keys = [
        ("discovered", "records discovered"),
        ("tokenized", "records tokenized"),
        ("failed", "records failed"),
        ("token_rows", "token rows (segments)"),
        ("beats", "beats"),
        ("scored", "score rows"),
        ("wall_seconds", "wall time (s)"),
    ]
    print("", file=out)
    print(f"{'ecgtok ' + summary.get('mode', ''):<28}{'':>12}", file=out)
    for key, label in keys:
        if key in summary:
            print(f"  {label:<26}{summary[key]:>12}", file=out)
    for stage, kinds in sorted(summary.get("failures", {}).items()):
        for kind, n in sorted(kinds.items()):
            print(f"    failed at {stage}: {kind:<14}{n:>8}", file=out)
    for key in ("tokenizer_id", "model_id", "runner"):
        if summary.get(key):
            print(f"  {key:<26}{summary[key]:>12}", file=out)
    print("", file=out)


def _prestart_children(command: str, argv: list[str]) -> None:
    """Start the forkserver of a local job's guarded children now, before Beam is imported
    (~2 s), so the children's imports run on the core the launcher leaves idle
    (transforms/isolation.py). ECGTOK_PRESTART=0 turns this off (benchmarks compare)."""
    if command == "score" or os.environ.get("ECGTOK_PRESTART") == "0":
        return
    from ecgtok.pipeline.flags import local_guard_memory_mb
    from ecgtok.transforms.isolation import prestart

    memory_mb = local_guard_memory_mb(argv)
    if memory_mb is not None:
        prestart(memory_mb)


def _run_job(command: str, argv: list[str]) -> int:
    _prestart_children(command, argv)  # first: the imports below bring in Beam
    from ecgtok.models.tokenizer import ArtifactError
    from ecgtok.pipeline.discovery import SourceError
    from ecgtok.pipeline.outputs import OutputError
    from ecgtok.pipeline.run import UsageError, run_job

    try:
        outcome = run_job(argv, command)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SourceError as exc:
        return _fail(str(exc), EXIT_INPUT)
    except OutputError as exc:
        return _fail(str(exc), EXIT_OUTPUT)
    except ArtifactError as exc:
        return _fail(str(exc), EXIT_ARTIFACT)
    summary = outcome.summary
    if summary.get("template_location"):
        print(f"template staged at {summary['template_location']}; nothing was run")
        return 0
    if summary.get("dry_run"):
        print(f"dry run: the {summary['runner']} job was built; nothing was run or written")
        return 0
    print_summary(summary)
    if command != "score" and summary.get("discovered") == 0:
        return _fail(f"no records found in --input {summary.get('input')}", EXIT_EMPTY)
    print(f"outputs in {summary.get('output', '')}".strip(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_GCE_CHECK", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n", 1)[1])
        return 0 if argv else 2
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv[0], argv[1:])
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        return _fail(f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)


def _dispatch(command: str, rest: list[str]) -> int:
    if command in JOB_COMMANDS:
        return _run_job(command, rest)
    if command == "demo":
        from ecgtok.pipeline.demo import main as demo_main

        return demo_main(rest)
    if command == "plot":
        from ecgtok.pipeline.plot import main as plot_main

        return plot_main(rest)
    if command == "nightly":
        from ecgtok.pipeline.nightly import main as nightly_main

        return nightly_main(rest)
    if command == "eval-beats":
        from ecgtok.pipeline.eval_beats import main as eval_main

        return eval_main(rest)
    if command in ("fit-tokenizer", "fidelity", "pretrain", "finetune", "evaluate"):
        from ecgtok.models import train

        return train.main(command, rest)
    return _fail(f"unknown command {command!r}; try `ecgtok --help`")


def entry() -> None:
    """The console script: run, flush, and leave without interpreter teardown.

    After a finished job, gRPC, torch and Beam's worker threads can still be shutting
    down when Python finalises, and that race occasionally aborts the process ("terminate
    called without an active exception", exit 134) after every output was written. The
    job's result is decided by then, so exit with it directly.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
