"""ecgtok's own pipeline options, and the choice of a local runner that downloads nothing."""

from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from ecgtok.pipeline.flags import LOCAL_RUNNER_NAMES, add_ecgtok_args


class EcgtokOptions(PipelineOptions):
    """Options of every ecgtok job; any standard Beam option may be given beside them."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        add_ecgtok_args(parser)


def is_local_default(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNER_NAMES


def local_runner(options: PipelineOptions, pooled: bool = False):
    """The runner for a local job: Beam's FnApiRunner, on all cores, downloading nothing.

    Beam 2.77's DirectRunner first tries to download and start Prism; this skips that
    and goes straight to the in-process portable path the DirectRunner falls back to.
    `pooled`: the job tokenizes in a pool of guarded children (see `local_workers`).
    """
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    direct = options.view_as(DirectOptions)
    mode = direct.direct_running_mode if _given(options, "direct_running_mode") else None
    workers = direct.direct_num_workers if _given(options, "direct_num_workers") else None
    direct.direct_running_mode, direct.direct_num_workers = local_workers(mode, workers, pooled)
    return FnApiRunner()


def local_children(options: PipelineOptions) -> int:
    """Guarded children each tokenizing DoFn of a local job adds to its process's pool
    (`isolation.ChildPool`), once `local_runner` has set the running mode: one per core
    for `in_memory` (one DoFn feeds them all), else one per worker thread or process."""
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory":
        return max(1, (os.cpu_count() or 1) // max(1, direct.direct_num_workers or 1))
    return 1


def _given(options: PipelineOptions, name: str) -> bool:
    """Whether the user set `name`, even to Beam's default value (`--direct_num_workers=1`
    and `--direct_running_mode=in_memory` are Beam's defaults, and must be kept).
    `drop_default=True` alone drops those, so the argv Beam keeps is read too. (Options
    built in code with a default value, `PipelineOptions(direct_num_workers=1)`, still read
    as not given: Beam's views fill in every default, so they cannot be told apart.)"""
    if name in options.get_all_options(drop_default=True):
        return True
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(f"--{name}", default=None)
    known, _ = parser.parse_known_args(list(getattr(options, "_flags", None) or []))
    return getattr(known, name) is not None


def local_workers(
    running_mode: str | None, num_workers: int | None, pooled: bool = False
) -> tuple[str, int]:
    """(direct_running_mode, direct_num_workers) of a local job, from the values the user
    gave (None where not given): threads on every core by default; `in_memory`, which
    has one worker by design, gets one unless told otherwise; 0 means every core, as in
    Beam.

    A `pooled` job (tokenize or run with guarded children, the default) runs `in_memory`
    by default instead: its one worker thread hands batches to a child per core, and the
    runner talks to it by direct calls, not gRPC (interleaved 11,000-record runs:
    24.8 -> 24.4 s median of four, launcher CPU 3.8 -> 3.4 s)."""
    if pooled and running_mode is None and num_workers is None:
        return "in_memory", 1
    mode = running_mode or "multi_threading"
    if num_workers is None:
        num_workers = 1 if mode == "in_memory" else 0
    return mode, num_workers or os.cpu_count() or 1
