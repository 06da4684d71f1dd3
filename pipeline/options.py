"""ecgtok's own pipeline options, and the choice of a local runner that downloads nothing."""

from __future__ import annotations

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


def local_runner(options: PipelineOptions):
    """The runner for a local job: Beam's FnApiRunner, on all cores, downloading nothing.

    Beam 2.77's DirectRunner first tries to download and start Prism; this skips that
    and goes straight to the in-process portable path the DirectRunner falls back to.
    """
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory" and not _given(options, "direct_running_mode"):
        direct.direct_running_mode = "multi_threading"
    if not _given(options, "direct_num_workers"):
        direct.direct_num_workers = os.cpu_count() or 1
    return FnApiRunner()


def _given(options: PipelineOptions, name: str) -> bool:
    return name in options.get_all_options(drop_default=True)
