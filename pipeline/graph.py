"""Building the job graph, apart from running it.

`build_tokenize` and `build_score` add the two halves of the job to a pipeline;
`build_pipeline` joins them for `ecgtok run`. They only add transforms: choosing the
runner, checking paths and summarising happen in `pipeline/run.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import apache_beam as beam

from ecgtok.pipeline import __version__
from ecgtok.pipeline.discovery import DeidSettings
from ecgtok.pipeline.outputs import join
from ecgtok.transforms import schemas
from ecgtok.transforms.stages import (
    BATCH_RECORDS,
    DiscoverRecords,
    RecordLimits,
    ScoreRecords,
    TokenizeRecords,
    TokenRows,
    WriteParquetFolder,
    WriteTableFolder,
)


@dataclass
class JobConfig:
    """Everything the graph needs, resolved from the options before it is built."""

    input: str
    output: str
    tokenizer_dir: str
    model_dir: str
    tokenizer_id: str
    model_id: str = ""
    extra_columns: list[str] = field(default_factory=list)
    segment_s: float = 300.0
    device: str = "auto"
    batch_size: int = 64
    limits: RecordLimits = field(default_factory=RecordLimits)
    # A file of records listed by the launcher (a chunk of a local run, see
    # discovery.write_listing); None: discover in the job.
    listing: str | None = None
    deid: DeidSettings = field(default_factory=DeidSettings)


def build_tokenize(p: beam.Pipeline, cfg: JobConfig):
    """discover -> read -> find beats -> tokenize -> tokens/ and errors/. Returns the
    tables of token rows."""
    meta = {"ecgtok_tokenizer_id": cfg.tokenizer_id, "ecgtok_version": __version__}
    batches = p | "DiscoverRecords" >> DiscoverRecords(
        cfg.input, cfg.listing, cfg.deid, batch_size=BATCH_RECORDS
    )
    result = batches | "TokenizeRecords" >> TokenizeRecords(
        cfg.tokenizer_dir, cfg.segment_s, cfg.extra_columns, cfg.limits, cfg.deid, batched=True
    )
    _ = result.tables | "WriteTokenShards" >> WriteTableFolder(
        join(cfg.output, "tokens"), schemas.token_schema(cfg.extra_columns, meta)
    )
    _ = result.errors | "WriteErrors" >> WriteParquetFolder(
        join(cfg.output, "errors"), schemas.error_schema(meta)
    )
    return result.tables


def build_score(rows, cfg: JobConfig) -> None:
    """token rows -> RunInference -> scores/."""
    meta = {
        "ecgtok_model_id": cfg.model_id,
        "ecgtok_tokenizer_id": cfg.tokenizer_id,
        "ecgtok_version": __version__,
    }
    scores = rows | "ScoreRecords" >> ScoreRecords(
        cfg.model_dir, cfg.extra_columns, cfg.device, cfg.batch_size
    )
    _ = scores | "WriteScores" >> WriteParquetFolder(
        join(cfg.output, "scores"), schemas.score_schema(cfg.extra_columns, meta)
    )


def build_pipeline(p: beam.Pipeline, cfg: JobConfig) -> None:
    """The whole job: archive -> token shards -> scores."""
    build_score(build_tokenize(p, cfg) | "TokenRows" >> TokenRows(), cfg)


def build_score_only(p: beam.Pipeline, cfg: JobConfig) -> None:
    """Existing token shards (cfg.input) -> scores/."""
    rows = p | "ReadTokenShards" >> beam.io.ReadFromParquet(cfg.input)
    build_score(rows, cfg)
