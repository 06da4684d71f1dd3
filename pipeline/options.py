"""ecgtok's own pipeline options, and the choice of a local runner that downloads nothing."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)


def default_tokenizer_dir() -> str:
    from ecgtok.models import artifacts_dir

    return os.path.join(artifacts_dir(), "tokenizer")


def default_model_dir() -> str:
    from ecgtok.models import artifacts_dir

    return os.path.join(artifacts_dir(), "model")


class EcgtokOptions(PipelineOptions):
    """Options of every ecgtok job; any standard Beam option may be given beside them."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
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


# Runners that ecgtok maps onto the in-process FnApiRunner (Prism is opt-in by name).
_LOCAL_RUNNER_NAMES = {None, "", "DirectRunner", "direct", "FnApiRunner"}


def is_local_default(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in _LOCAL_RUNNER_NAMES


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
