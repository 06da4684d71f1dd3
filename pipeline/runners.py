"""Runner choice and the checks that keep a job from hanging on a download.

* The local default is Beam's in-process FnApiRunner (see `options.local_runner`).
* Flink and Spark need Beam's job-server jar, and Prism its binary; Beam downloads them
  when a job starts. On a machine that cannot reach Maven or GitHub that download
  retries and fails with a wall of tracebacks, so we check first and say what to stage.
* `--dry_run` (with or without a value) builds a Dataflow job offline.
"""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    StandardOptions,
    TestOptions,
)

_TRUE = {"true", "1", "yes", "on"}


def normalise_argv(argv: list[str]) -> list[str]:
    """Accept `--dry_run` alone (Beam wants a value) and `--dry_run=False`."""
    out = []
    for arg in argv:
        if arg == "--dry_run":
            out.append("--dry_run=True")
        elif arg.startswith("--dry_run=") and arg.split("=", 1)[1].lower() not in _TRUE:
            continue
        else:
            out.append(arg)
    return out


def is_dry_run(options: PipelineOptions) -> bool:
    return str(options.view_as(TestOptions).dry_run).lower() in _TRUE


def template_location(options: PipelineOptions) -> str | None:
    """Where a classic Dataflow template is staged instead of running the job."""
    return options.get_all_options().get("template_location")


def builds_only(options: PipelineOptions) -> bool:
    """The job is built (and staged) but not run: a dry run or a template."""
    return is_dry_run(options) or bool(template_location(options))


def _runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner or ""
    return runner if isinstance(runner, str) else type(runner).__name__


def _cached_jar(url: str) -> str | None:
    from apache_beam.utils.subprocess_server import JavaJarServer

    if os.path.exists(url):
        return url
    cached = os.path.join(JavaJarServer.JAR_CACHE, os.path.basename(url))
    return cached if os.path.exists(cached) else None


def _check_jar(options: PipelineOptions, flag: str, server_cls, what: str) -> str | None:
    jar = options.get_all_options().get(flag)
    if jar:
        if "://" not in jar and not os.path.exists(jar):
            return f"--{flag} {jar} does not exist"
        return None
    url = server_cls(options).path_to_jar()
    if _cached_jar(url):
        return None
    return (
        f"{what} needs Beam's job-server jar, which is downloaded at run time and cannot be "
        f"here: fetch {url} where there is internet, then pass --{flag} PATH "
        f"(or put it in {os.path.dirname(_cache_hint(url))}/), or start a job server and "
        "pass --job_endpoint HOST:PORT"
    )


def _cache_hint(url: str) -> str:
    from apache_beam.utils.subprocess_server import JavaJarServer

    return os.path.join(JavaJarServer.JAR_CACHE, os.path.basename(url))


def _check_prism(options: PipelineOptions) -> str | None:
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    location = options.get_all_options().get("prism_location")
    if location:
        if "://" not in location and not os.path.exists(location):
            return f"--prism_location {location} does not exist"
        return None
    cache = PrismJobServer.BIN_CACHE
    if os.path.isdir(cache) and any(os.scandir(cache)):
        return None
    return (
        "PrismRunner needs the Prism binary, which Beam downloads from GitHub at run time "
        f"and cannot here: fetch it where there is internet and pass --prism_location PATH "
        f"(or unpack it in {cache}/)"
    )


def runner_problem(options: PipelineOptions) -> str | None:
    """A one-line reason this runner cannot start here, or None."""
    name = _runner_name(options)
    if options.view_as(PortableOptions).job_endpoint:
        return None  # the user runs the job server; nothing to download
    if name in ("FlinkRunner", "flink"):
        from apache_beam.runners.portability.flink_runner import FlinkJarJobServer

        return _check_jar(options, "flink_job_server_jar", FlinkJarJobServer, "FlinkRunner")
    if name in ("SparkRunner", "spark"):
        from apache_beam.runners.portability.spark_runner import SparkJarJobServer

        return _check_jar(options, "spark_job_server_jar", SparkJarJobServer, "SparkRunner")
    if name in ("PrismRunner", "prism"):
        return _check_prism(options)
    return None
