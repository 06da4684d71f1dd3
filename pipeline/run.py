"""Running a job: options in, PipelineResult out, and the summary of what was written.

`run(argv)` is what the CLI calls and what tests call; it returns the PipelineResult.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from ecgtok.pipeline import chunks, graph, outputs, runners
from ecgtok.pipeline.discovery import DeidSettings, check_source, manifest_columns
from ecgtok.pipeline.flags import default_model_dir, default_tokenizer_dir
from ecgtok.pipeline.options import (
    EcgtokOptions,
    is_local_default,
    local_children,
    local_runner,
)
from ecgtok.transforms.stages import RecordLimits

_LOG = logging.getLogger(__name__)
TOKENIZE, SCORE, RUN = "tokenize", "score", "run"


class UsageError(ValueError):
    """A mistake in how the job was asked for: reported in one line, exit code 2."""


@dataclass
class JobOutcome:
    result: object
    summary: dict


def _require(value, flag: str):
    if not value:
        raise UsageError(f"{flag} is required")
    return value


def _resolve(opts: EcgtokOptions, mode: str, check_paths: bool = True) -> graph.JobConfig:
    from ecgtok.models.tokenizer import Tokenizer

    src = _require(opts.input, "--input")
    dst = _require(opts.output, "--output")
    tok_dir = opts.tokenizer or default_tokenizer_dir()
    model_dir = opts.model or default_model_dir()
    cfg = graph.JobConfig(
        input=src,
        output=dst,
        tokenizer_dir=tok_dir,
        model_dir=model_dir,
        tokenizer_id="",
        segment_s=opts.segment_seconds,
        device=opts.device,
        batch_size=opts.score_batch_size,
        deid=DeidSettings(opts.pseudonym_key_file, bool(opts.carry_identifiers)),
        limits=RecordLimits(
            isolate=opts.isolation == "process",
            timeout_s=opts.record_timeout,
            memory_mb=opts.record_memory_mb,
        ),
    )
    if opts.segment_seconds <= 0:
        raise UsageError("--segment_seconds must be positive")
    if opts.record_timeout <= 0 or opts.record_memory_mb < 0 or opts.score_batch_size < 1:
        raise UsageError(
            "--record_timeout, --record_memory_mb and --score_batch_size must be positive"
        )
    if mode in (TOKENIZE, RUN):
        if check_paths:
            check_source(src)
        cfg.extra_columns = manifest_columns(src)
        cfg.tokenizer_id = Tokenizer.load(tok_dir).tokenizer_id
    if mode in (SCORE, RUN):
        # Imported here: torch costs ~2 s, and `tokenize` never scores.
        from ecgtok.models.model import check_model_tokenizer, load_model

        _, mcfg = load_model(model_dir, "cpu")
        cfg.model_id = mcfg["model_id"]
    if mode == SCORE and check_paths:
        cfg.input = _token_glob(src)
        cfg.extra_columns = _extra_columns_of_shards(cfg.input)
        cfg.tokenizer_id = _tokenizer_id_of_shards(cfg.input)
    if mode in (SCORE, RUN):
        # Refuse at once, in one line, a model that does not read these tokens.
        check_model_tokenizer(mcfg, cfg.tokenizer_id)
    return cfg


def _token_glob(src: str) -> str:
    """`ecgtok score` takes a run's output folder, its tokens/ folder, or a glob."""
    if src.endswith(".parquet") or "*" in src:
        return src
    tokens = outputs.join(src, "tokens")
    folder = tokens if outputs.parquet_files(tokens) else src
    if not outputs.parquet_files(folder):
        raise UsageError(f"--input {src} holds no token shards (*.parquet)")
    return outputs.join(folder, "*.parquet")


def _extra_columns_of_shards(pattern: str) -> list[str]:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from ecgtok.transforms.schemas import TOKEN_FIELDS

    first = FileSystems.match([pattern])[0].metadata_list[0].path
    with FileSystems.open(first) as f:
        names = pq.read_schema(f).names
    fixed = {f.name for f in TOKEN_FIELDS}
    return [n for n in names if n not in fixed]


def _tokenizer_id_of_shards(pattern: str) -> str:
    """The tokenizer that wrote the shards, from the first shard's first row."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    for meta in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(meta.path) as f:
            column = pq.read_table(f, columns=["tokenizer_id"]).column("tokenizer_id")
        if len(column):
            return str(column[0])
    return ""


def _metrics(result, namespace: str) -> dict[str, list]:
    """The runner's metrics of one namespace ({"counters": [...], "distributions": [...],
    ...}); empty lists where the runner reports none."""
    try:
        return result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception:  # some runners report no metrics
        return {"counters": [], "distributions": []}


def _committed(metric):
    """A metric's committed value, else its attempted one (runners fill one or both)."""
    return metric.committed if metric.committed is not None else metric.attempted


def _counters(result, namespace: str = "ecgtok") -> dict[str, int]:
    out: dict[str, int] = {}
    for c in _metrics(result, namespace)["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(_committed(c) or 0)
    return out


def summarise(dst: str, mode: str, cfg: graph.JobConfig, counters: dict, extra: dict) -> dict:
    """Count what the outputs hold (not what the runner says) and describe the run."""
    summary: dict = {"mode": mode, "tokenizer_id": cfg.tokenizer_id, "model_id": cfg.model_id}
    tokenized_ids: set[str] = set()
    if mode in (TOKENIZE, RUN):
        tok = outputs.read_column_table(outputs.join(dst, "tokens"), ["record_id", "r_peaks"])
        err = outputs.read_column_table(
            outputs.join(dst, "errors"), ["record_id", "stage", "error_type"]
        )
        tokenized_ids = set(tok.column("record_id").to_pylist()) if tok is not None else set()
        failed_rows = err.to_pylist() if err is not None else []
        breakdown: dict[str, dict[str, int]] = {}
        for e in failed_rows:
            by_stage = breakdown.setdefault(e["stage"], {})
            by_stage[e["error_type"]] = by_stage.get(e["error_type"], 0) + 1
        summary.update(
            discovered=int(
                counters.get("records_discovered", len(tokenized_ids) + len(failed_rows))
            ),
            tokenized=len(tokenized_ids),
            failed=len({e["record_id"] for e in failed_rows}),
            token_rows=tok.num_rows if tok is not None else 0,
            beats=int(sum(len(r) for r in tok.column("r_peaks").to_pylist())) if tok else 0,
            failures=breakdown,
        )
    if mode in (SCORE, RUN):
        sc = outputs.read_column_table(outputs.join(dst, "scores"), ["record_id", "p_af"])
        summary["scored"] = sc.num_rows if sc is not None else 0
        summary["scored_records"] = len(set(sc.column("record_id").to_pylist())) if sc else 0
    summary["metrics"] = counters
    summary.update(extra)
    return summary


def _pipeline_options(argv: list[str]) -> tuple[PipelineOptions, EcgtokOptions]:
    from ecgtok.pipeline.argv import check_beam_args

    argv = runners.normalise_argv(argv)
    check_beam_args(argv)
    options = PipelineOptions(argv)
    problem = runners.runner_problem(options)
    if problem:
        raise UsageError(problem)
    return options, options.view_as(EcgtokOptions)


def _make_pipeline(
    options: PipelineOptions, test_pipeline, pooled: bool = False
) -> tuple[beam.Pipeline, str]:
    if test_pipeline is not None:
        return test_pipeline, type(test_pipeline.runner).__name__
    if is_local_default(options):
        p = beam.Pipeline(runner=local_runner(options, pooled), options=options)
        return p, f"FnApiRunner({options.get_all_options()['direct_running_mode']})"
    try:
        p = beam.Pipeline(options=options)
    except ValueError as exc:  # Beam's option validation, e.g. a malformed project id
        raise UsageError(" ".join(str(exc).split())) from exc
    return p, str(options.view_as(StandardOptions).runner)


_BUILDERS = {
    TOKENIZE: graph.build_tokenize,
    SCORE: graph.build_score_only,
    RUN: graph.build_pipeline,
}
_FOLDERS = {TOKENIZE: ("tokens", "errors"), SCORE: ("scores",), RUN: outputs.OUTPUT_FOLDERS}


def _dry_run(options: PipelineOptions, cfg: graph.JobConfig, mode: str) -> JobOutcome:
    """Build (and let a runner such as Dataflow translate or stage) the job; run nothing."""
    p, runner_name = _make_pipeline(options, None)
    _BUILDERS[mode](p, cfg)
    result = p.run()
    summary = {"mode": mode, "dry_run": True, "runner": runner_name}
    if runners.template_location(options):
        summary["template_location"] = runners.template_location(options)
    return JobOutcome(result, summary)


def run(argv: list[str], mode: str = RUN, test_pipeline=None) -> beam.runners.runner.PipelineResult:
    """Run one ecgtok job (`run`, `tokenize` or `score`) and write its summary."""
    return run_job(argv, mode, test_pipeline).result


def _sum_counters(results, namespace: str = "ecgtok") -> dict[str, int]:
    total: dict[str, int] = {}
    for r in results:
        for k, v in _counters(r, namespace).items():
            total[k] = total.get(k, 0) + v
    return total


# RunInference's own metrics (EcgModelHandler.get_metrics_namespace): inference counts,
# batch sizes and latencies, model load time. Dataflow and Flink show them in their UI;
# local runs get them in summary.json.
INFERENCE_NAMESPACE = "ecgtok_score"


def _inference_metrics(results) -> dict:
    """{name: count} for RunInference's counters and {name: {count, mean, min, max}} for
    its distributions, over all chunks' results."""
    dists: dict[str, list] = {}
    for r in results:
        for d in _metrics(r, INFERENCE_NAMESPACE)["distributions"]:
            v = _committed(d)
            if v is None or not v.count:
                continue
            acc = dists.setdefault(d.key.metric.name, [0, 0, v.min, v.max])
            acc[0] += v.count
            acc[1] += v.sum
            acc[2], acc[3] = min(acc[2], v.min), max(acc[3], v.max)
    out: dict = dict(sorted(_sum_counters(results, INFERENCE_NAMESPACE).items()))
    for name, (count, total, lo, hi) in sorted(dists.items()):
        out[name] = {"count": count, "mean": round(total / count, 3), "min": lo, "max": hi}
    return out


def _chunk_size(options: PipelineOptions, opts: EcgtokOptions, mode: str, test_pipeline) -> int:
    """Records per resumable chunk; 0 runs one job (distributed runners, scoring)."""
    if test_pipeline is not None or mode == SCORE or not is_local_default(options):
        if opts.resume:
            raise UsageError("--resume works for local tokenize/run jobs")
        return 0
    size = chunks.DEFAULT_CHUNK_RECORDS if opts.chunk_records is None else opts.chunk_records
    if size < 0 or (opts.resume and size == 0):
        raise UsageError("--chunk_records must be positive to resume")
    return size


def run_job(argv: list[str], mode: str = RUN, test_pipeline=None) -> JobOutcome:
    options, opts = _pipeline_options(argv)
    dry = runners.builds_only(options)
    cfg = _resolve(opts, mode, check_paths=not dry)
    if dry:
        return _dry_run(options, cfg, mode)
    final_dst = cfg.output
    outputs.check_not_input(final_dst, opts.input)
    chunk_records = _chunk_size(options, opts, mode, test_pipeline)
    staged = chunks.find_resumable(final_dst) if opts.resume else None
    outputs.check_output(final_dst, opts.overwrite or opts.resume)
    staged = staged or outputs.staging_dir(final_dst, uuid.uuid4().hex[:12])
    run_id = os.path.basename(staged.rstrip("/"))
    runner_name = ""
    extra_counts: dict = {}

    pooled = mode in (TOKENIZE, RUN) and cfg.limits.isolate

    def run_one(listing: str | None, out_dir: str):
        nonlocal runner_name
        p, runner_name = _make_pipeline(options, test_pipeline, pooled)
        limits = cfg.limits
        if test_pipeline is None and is_local_default(options):
            limits = dataclasses.replace(limits, children=local_children(options))
        job = dataclasses.replace(cfg, output=out_dir, listing=listing, limits=limits)
        _BUILDERS[mode](p, job)
        result = p.run()
        result.wait_until_finish()
        return result

    t0 = time.perf_counter()
    if chunk_records:
        try:
            results, discovered, skipped = chunks.run_chunks(
                cfg.input, staged, mode, chunk_records, opts.resume, run_one, cfg.deid
            )
        except chunks.ResumeError as exc:
            raise UsageError(str(exc)) from exc
        chunks.gather(staged, _FOLDERS[mode])
        counters = _sum_counters(results)
        counters["records_discovered"] = discovered
        extra_counts = {"chunks_resumed": skipped} if opts.resume else {}
    else:
        results = [run_one(None, staged)]
        counters = _sum_counters(results)
    wall = time.perf_counter() - t0
    outputs.promote(staged, final_dst, _FOLDERS[mode])
    summary = summarise(
        final_dst,
        mode,
        cfg,
        counters,
        {
            "input": cfg.input,
            "output": final_dst,
            "runner": runner_name,
            "wall_seconds": round(wall, 3),
            "run_id": run_id,
            "cpu_count": os.cpu_count(),
            **extra_counts,
        },
    )
    if mode in (SCORE, RUN):
        summary["inference_metrics"] = _inference_metrics(results)
    outputs.write_json(outputs.join(final_dst, outputs.SUMMARY), summary)
    return JobOutcome(results[-1] if results else None, summary)
