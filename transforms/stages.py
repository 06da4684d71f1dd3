"""The Beam stages of ecgtok, as labelled composites whose names read like the pipeline.

    DiscoverRecords -> TokenizeRecords -> WriteTokenShards
                                      \\-> ScoreRecords -> WriteScores
                       (errors)       -> WriteErrors

They are thin: the work is in plain functions (`record_tokens`, `models.*`). Artifacts
are loaded in `DoFn.setup()` from a path, never captured in closures, so every DoFn
pickles and runs on any runner.
"""

from __future__ import annotations

import itertools
import logging
import queue
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from ecgtok.pipeline.discovery import DeidSettings, RecordRef, discover, read_listing
from ecgtok.transforms.errors import TRANSIENT_ERRORS, RecordError
from ecgtok.transforms.schemas import extra_field_names

NAMESPACE = "ecgtok"
# Records per batch handed to one tokenizing DoFn call: one message to a guarded child
# and one table back. Interleaved 11,000-record runs: 16 -> 32 saved ~0.8 s of ~28 s of
# per-batch cost in the launcher; 64 was within the host's noise of 32.
BATCH_RECORDS = 32
ERRORS = "errors"
_LOG = logging.getLogger(__name__)


def _in_global_window(value):
    """An output of `finish_bundle`, which must carry its window: this batch job's
    elements all live in the global window."""
    return beam.transforms.window.GlobalWindows.windowed_value_at_end_of_window(value)


def error_row(ref: RecordRef, stage: str, error_type: str, message: str) -> dict:
    return {
        "record_id": ref.record_id,
        "source_path": ref.public_path,
        "stage": stage,
        "error_type": error_type,
        "message": message[:2000],
    }


# Refs sorted by header shape at a time (see `_shape_batches`): bounded memory however
# long the listing.
SHAPE_WINDOW = 4096


def _shape_batches(refs, size: int):
    """Lists of at most `size` refs, each of one header shape where the listing read the
    headers (`RecordRef.shape`): sorted by shape within windows of SHAPE_WINDOW refs.

    Short records of one shape go through the guarded child's stages together
    (`record_tokens.tokenize_batch`); in a mixed archive (CinC 2021: 12% of its records
    in seven other shapes than 10 s at 500 Hz) a batch in listing order leaves most of
    those alone.
    """
    for window in _in_batches(refs, SHAPE_WINDOW):
        window.sort(key=lambda ref: ref.shape)
        for _, same in itertools.groupby(window, key=lambda ref: ref.shape):
            yield from _in_batches(same, size)


def _in_batches(refs, size: int):
    """Consecutive lists of at most `size` refs."""
    batch = []
    for ref in refs:
        batch.append(ref)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class DiscoverRecords(beam.PTransform):
    """SRC -> RecordRef for every record, spread over workers. With `listing`, the
    records are those that file lists (`discovery.write_listing`), SRC is not listed again.

    With `batch_size`, the output is lists of up to that many RecordRefs instead (of one
    header shape each, see `_shape_batches`), for `TokenizeRecords(batched=True)`: Beam
    then counts, shuffles and hands over one element per batch, not per record. Its
    per-element work runs in the launcher, which shares the cores with the records' work
    (launcher CPU on 11,000 records: 4.96 -> 3.72 s).
    """

    def __init__(
        self,
        src: str,
        listing: str | None = None,
        deid: DeidSettings | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self._src = src
        self._listing = listing
        self._deid = deid
        self._batch_size = batch_size

    def expand(self, pbegin):
        counter = Metrics.counter(NAMESPACE, "records_discovered")
        size = self._batch_size

        def listed(source: str):
            refs = (
                read_listing(source) if self._listing is not None else discover(source, self._deid)
            )
            return refs if size is None else _in_batches(refs, size)

        def count(item):
            counter.inc(1 if size is None else len(item))
            return item

        source = self._listing if self._listing is not None else self._src
        # listed by the launcher (a chunk of a long run), or by the job
        name = "ReadListing" if self._listing is not None else "ListRecords"
        return (
            pbegin
            | ("Listing" if self._listing is not None else "Source") >> beam.Create([source])
            | name >> beam.FlatMap(listed)
            | "Count" >> beam.Map(count)
            | "Spread" >> beam.Reshuffle()
        )


class _TokenizeRecordFn(beam.DoFn):
    """Batches of RecordRefs -> tables of token rows, and one error row per failed
    record on the `errors` output.

    Guarded (the default), batches go to the process's pool of guarded children
    (`isolation.ChildPool`) and their outcomes are emitted as they come back, a few
    batches behind, the rest at the end of the bundle.
    """

    def __init__(
        self, tokenizer_dir: str, segment_s: float, extra_columns: list[str], limits, deid=None
    ) -> None:
        self._deid = deid
        self._tokenizer_dir = tokenizer_dir
        self._segment_s = segment_s
        self._extra_columns = list(extra_columns)
        self._limits = limits

    def setup(self) -> None:
        from ecgtok.models.tokenizer import Tokenizer
        from ecgtok.transforms.isolation import ChildPool

        self._tokenizer = Tokenizer.load(self._tokenizer_dir)
        self._policy = self._deid.policy() if self._deid is not None else None
        self._pool = None
        if self._limits.isolate:
            self._pool = ChildPool.acquire(
                self._tokenizer_dir,
                self._limits.timeout_s,
                self._limits.memory_mb,
                self._deid,
                children=self._limits.children,
            )
        self._tokenized = Metrics.counter(NAMESPACE, "records_tokenized")
        self._failed = Metrics.counter(NAMESPACE, "records_failed")
        self._beats = Metrics.counter(NAMESPACE, "beats")
        self._tokens = Metrics.counter(NAMESPACE, "tokens")
        self._segments = Metrics.counter(NAMESPACE, "segments")

    def start_bundle(self) -> None:
        # A new queue per bundle: answers of a failed bundle's batches still in the pool
        # go to the old one and are never read as this bundle's.
        self._replies: queue.Queue = queue.Queue()
        self._in_flight: dict[int, list[RecordRef]] = {}
        self._next_tag = 0

    def process(self, refs: list[RecordRef]):
        requests = self._requests(refs)
        if self._pool is None:
            from ecgtok.transforms.record_tokens import START, tokenize_batch

            events = tokenize_batch(requests, self._tokenizer, self._policy)
            outcomes = [(indices, payload) for kind, indices, payload in events if kind != START]
            yield from self._outputs(refs, outcomes)
            return
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        self._in_flight[tag] = refs
        self._pool.submit(requests, self._replies, tag)
        # Keep every child of the pool fed (a batch queued behind each one), then emit
        # whatever has come back.
        while len(self._in_flight) > 2 * self._pool.children:
            yield from self._answered(block=True)
        while not self._replies.empty():
            yield from self._answered(block=False)

    def finish_bundle(self):
        while self._in_flight:
            for out in self._answered(block=True):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, _in_global_window(out.value))
                else:
                    yield _in_global_window(out)

    def _answered(self, block: bool):
        """The outputs of one batch back from the pool."""
        tag, outcomes = self._replies.get(block=block)
        refs = self._in_flight.pop(tag)
        if isinstance(outcomes, BaseException):
            raise outcomes
        yield from self._outputs(refs, outcomes)

    def _requests(self, refs: list[RecordRef]) -> list[tuple]:
        names = extra_field_names(self._extra_columns)
        return [
            (
                ref.source_path,
                ref.record_id,
                self._segment_s,
                {out: str(ref.extra.get(c, "")) for c, out in zip(self._extra_columns, names)},
            )
            for ref in refs
        ]

    def _outputs(self, refs: list[RecordRef], outcomes):
        """A table per group of records that succeeded, an error row per one that failed."""
        for indices, outcome in outcomes:
            if isinstance(outcome, pa.Table):
                yield from self._emit(outcome, len(indices))
                continue
            ref = refs[indices[0]]
            if isinstance(outcome, RecordError):
                yield from self._fail(ref, outcome.stage, outcome.error_type, outcome.message)
            elif isinstance(outcome, TRANSIENT_ERRORS):
                # Transient I/O (a storage hiccup): let the runner retry the bundle.
                raise outcome
            else:  # a bug must not sink the job
                _LOG.error("unexpected failure on %s: %r", ref.record_id, outcome)
                yield from self._fail(ref, "tokenize", type(outcome).__name__, str(outcome))

    def _emit(self, table: pa.Table, n_records: int):
        self._tokenized.inc(n_records)
        self._segments.inc(table.num_rows)
        self._beats.inc(len(pc.list_flatten(table.column("r_peaks"))))
        self._tokens.inc(len(pc.list_flatten(pc.list_flatten(table.column("tokens")))))
        yield table

    def teardown(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.release(self._limits.children)
            self._pool = None

    def _fail(self, ref: RecordRef, stage: str, error_type: str, message: str):
        self._failed.inc()
        Metrics.counter(NAMESPACE, f"failed_{stage}_{error_type}").inc()
        yield beam.pvalue.TaggedOutput(ERRORS, error_row(ref, stage, error_type, message))


@dataclass(frozen=True)
class RecordLimits:
    """Per-record bounds. `isolate` runs each record in a guarded child process;
    `children`: how many each tokenizing DoFn adds to its process's pool."""

    isolate: bool = True
    timeout_s: float = 300.0
    memory_mb: int = 6144
    children: int = 1


class TokenizeRecords(beam.PTransform):
    """RecordRef -> tables of token rows (main output, `.tables`; one per batch of
    records, in the token schema) and error rows (`.errors`). With `batched`, the input
    is lists of RecordRefs already (`DiscoverRecords(batch_size=...)`)."""

    def __init__(
        self,
        tokenizer_dir: str,
        segment_s: float,
        extra_columns: list[str],
        limits: RecordLimits | None = None,
        deid: DeidSettings | None = None,
        batched: bool = False,
    ) -> None:
        super().__init__()
        self._fn = _TokenizeRecordFn(
            tokenizer_dir, segment_s, extra_columns, limits or RecordLimits(), deid
        )
        self._batched = batched

    def expand(self, refs):
        # Records travel in batches: one message to the guarded child and one table
        # back per batch (transforms/isolation.py), not a message and a row dict each.
        # A fixed size: given a range, BatchElements fits a line to its batch timings
        # (numpy.polyfit) after every batch, for a size that ends at the maximum anyway.
        if not self._batched:
            batch = beam.BatchElements(min_batch_size=BATCH_RECORDS, max_batch_size=BATCH_RECORDS)
            refs = refs | "Batch" >> batch
        return refs | "ReadFindBeatsTokenize" >> beam.ParDo(self._fn).with_outputs(
            ERRORS, main="tables"
        )


def _score_key(row: dict, extra_columns: list[str]) -> tuple:
    return (
        row["record_id"],
        int(row["start_sample"]),
        tuple(row.get(c, "") for c in extra_columns),
    )


def _to_score_row(keyed, extra_columns: list[str]) -> dict:
    from ecgtok.models.model import HEADS, MIN_BEATS_FOR_RHYTHM, RHYTHM_HEADS

    (record_id, start, extra), result = keyed
    inf = result.inference
    row = {
        "record_id": record_id,
        "start_sample": start,
        "model_id": result.model_id,
        "n_beats": int(result.example["rhythm"].shape[0]),
        "embedding": [float(x) for x in inf["embedding"]],
        # long rows only (models.burden): fraction of the row's time in AF, and when
        "af_burden": inf.get("af_burden"),
        "af_episodes": [
            {"start_sample": int(a), "end_sample": int(b)} for a, b in inf.get("af_episodes", [])
        ],
    }
    for head in HEADS:
        row[head] = float(inf[head]) if head in inf else None
    if row["n_beats"] < MIN_BEATS_FOR_RHYTHM:  # a flat or unreadable record
        for head in RHYTHM_HEADS:
            row[head] = None
    row.update(dict(zip(extra_columns, extra, strict=True)))
    return row


class ScoreRecords(beam.PTransform):
    """Token rows -> score rows, through Beam's RunInference, keyed by record and segment."""

    def __init__(
        self, model_dir: str, extra_columns: list[str], device: str = "auto", batch: int = 64
    ) -> None:
        super().__init__()
        self._model_dir = model_dir
        self._extra = extra_field_names(list(extra_columns))
        self._device = device
        self._batch = batch

    def expand(self, rows):
        # Imported here: torch and RunInference are only needed by jobs that score.
        from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

        from ecgtok.models.burden import mark_for_burden
        from ecgtok.models.handler import EcgModelHandler
        from ecgtok.models.model import row_to_example

        extra = self._extra
        handler = KeyedModelHandler(EcgModelHandler(self._model_dir, self._device, self._batch))
        return (
            rows
            | "ToExamples"
            >> beam.Map(
                lambda r: (_score_key(r, extra), mark_for_burden(row_to_example(r, rr=False), r))
            )
            | "RunInference" >> RunInference(handler)
            | "ToScoreRows" >> beam.Map(_to_score_row, extra)
        )


class WriteParquetFolder(beam.PTransform):
    """Rows -> `folder/part-SSSSS-of-NNNNN.parquet`, all with one schema."""

    def __init__(self, folder: str, schema: pa.Schema) -> None:
        super().__init__()
        self._folder = folder
        self._schema = schema

    def expand(self, rows):
        return rows | "WriteToParquet" >> beam.io.WriteToParquet(
            file_path_prefix=self._folder.rstrip("/") + "/part",
            schema=self._schema,
            file_name_suffix=".parquet",
            codec="zstd",
        )


def table_rows(table: pa.Table):
    """A table's rows as dicts (what `ReadFromParquet` gives for the same rows)."""
    yield from table.to_pylist()


class TokenRows(beam.PTransform):
    """Tables of token rows -> token row dicts (for the stages that read rows)."""

    def expand(self, tables):
        return tables | "TableRows" >> beam.FlatMap(table_rows)


# Rows per Parquet row group, and the most bytes a table may buffer, as Beam's own
# WriteToParquet groups rows (its record_batch_size and row_group_buffer_size).
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 64 * 1024 * 1024


class _CombineTables(beam.DoFn):
    """Small tables -> tables of about ROW_GROUP_ROWS rows, per bundle (one Parquet
    row group each, not one per batch of 16 records)."""

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema

    def start_bundle(self) -> None:
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0

    def process(self, table: pa.Table):
        self._tables.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        if self._rows >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            yield self._combined()

    def finish_bundle(self):
        if self._tables:
            yield _in_global_window(self._combined())

    def _combined(self) -> pa.Table:
        # The writer's schema carries the job's metadata; the tables' columns are the same.
        tables = [t.replace_schema_metadata(self._schema.metadata) for t in self._tables]
        self._tables, self._rows, self._bytes = [], 0, 0
        return pa.concat_tables(tables).combine_chunks()


class WriteTableFolder(beam.PTransform):
    """Tables -> `folder/part-SSSSS-of-NNNNN.parquet`, all with one schema (Beam's
    WriteToParquetBatched, after small tables are combined into row groups)."""

    def __init__(self, folder: str, schema: pa.Schema) -> None:
        super().__init__()
        self._folder = folder
        self._schema = schema

    def expand(self, tables):
        return (
            tables
            | "CombineTables" >> beam.ParDo(_CombineTables(self._schema))
            | "WriteToParquet"
            >> beam.io.WriteToParquetBatched(
                file_path_prefix=self._folder.rstrip("/") + "/part",
                schema=self._schema,
                file_name_suffix=".parquet",
                codec="zstd",
            )
        )
