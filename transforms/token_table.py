"""Token rows as NumPy segments, and many of them as one Arrow table.

A `Segment` is one token row while it is still NumPy arrays: the beats, flags and words
of one [start, end) stretch of a record. `segment_row` turns it into the row dict of
the token schema (Python lists: what training code, tests and `tokenize_record` use);
`segments_table` turns many into one `pyarrow.Table` with the same schema, column by
column from the arrays, without a Python list per value.

Why the table: the job's guarded children return their records' rows to the Beam
worker, which writes Parquet. As row dicts, every value was turned into a Python int
(`tolist`), pickled, unpickled, and appended by Beam's `WriteToParquet` to per-column
lists that `pa.array` converted back: ~0.5 ms of the worker's one Python thread per
10 s 12-lead record. A table crosses the pipe as a few buffers and goes to
`WriteToParquetBatched` as it is (`benchmarks/profile_record.py`, "rows" and "arrow").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ecgtok.models.tokenizer import build_sentence

if TYPE_CHECKING:  # pyarrow is imported where a table is built: see `_arrow`
    import pyarrow as pa


@dataclass
class Segment:
    """One token row as arrays. `words`/`atrial` are (leads, beats); `atrial` is None
    for a tokenizer without atrial words (its column is then empty)."""

    record_id: str
    start_sample: int
    n_samples: int
    fs: float
    lead_names: list[str]
    original_lead_names: list[str]
    r_peaks: np.ndarray
    beat_flags: np.ndarray
    words: np.ndarray
    rhythm: np.ndarray
    atrial: np.ndarray | None
    tokenizer_id: str
    source_path: str
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def sentence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sentence, lead of each token, beat of each token): `build_sentence`."""
        return build_sentence(self.words, self.rhythm, self.atrial)


def _meta_columns(meta: dict) -> dict:
    meta = meta or {}
    return {
        "age": meta.get("age"),
        "sex": meta.get("sex"),
        "dx": [str(c) for c in meta.get("dx", [])],
        "patient_key": meta.get("patient_key"),
    }


def segment_row(seg: Segment) -> dict:
    """The token-schema row dict of one segment (Python lists)."""
    sentence, s_lead, s_beat = seg.sentence()
    return {
        "record_id": seg.record_id,
        "start_sample": int(seg.start_sample),
        "n_samples": int(seg.n_samples),
        "fs": float(seg.fs),
        "lead_names": list(seg.lead_names),
        "original_lead_names": list(seg.original_lead_names),
        "r_peaks": seg.r_peaks.astype(np.int64).tolist(),
        "beat_flags": seg.beat_flags.astype(np.int32).tolist(),
        "tokens": seg.words.astype(np.int32).tolist(),
        # Empty for a tokenizer without atrial words.
        "atrial_tokens": [] if seg.atrial is None else seg.atrial.astype(np.int32).tolist(),
        "rhythm": seg.rhythm.astype(np.int32).tolist(),
        "sentence": sentence.tolist(),
        "sentence_lead": s_lead.astype(np.int32).tolist(),
        "sentence_beat": s_beat.tolist(),
        "tokenizer_id": seg.tokenizer_id,
        "source_path": seg.source_path,
        **_meta_columns(seg.meta),
        **(seg.extra or {}),
    }


def _arrow():
    """pyarrow, imported on first use. A guarded child must limit OpenBLAS's threads
    before pyarrow (and its allocator) take address space: under a tight
    --record_memory_mb, OpenBLAS could no longer start them, and hangs."""
    import pyarrow

    return pyarrow


def _offsets(lengths) -> np.ndarray:
    """Arrow list offsets (int32) of consecutive lists of these lengths."""
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _flat_list(parts: list[np.ndarray], dtype, value_type: pa.DataType) -> pa.Array:
    """list<value_type> column: one list per part (1-D arrays)."""
    pa = _arrow()
    values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(
        pa.array(_offsets([p.size for p in parts])), pa.array(values, type=value_type)
    )


def _nested_list(parts: list[np.ndarray | None]) -> pa.Array:
    """list<list<int32>> column: per row, one list per lead (row = a (leads, beats)
    array; None = an empty outer list)."""
    pa = _arrow()
    outer = [0 if p is None else p.shape[0] for p in parts]
    inner = [p.shape[1] for p in parts if p is not None for _ in range(p.shape[0])]
    present = [p.astype(np.int32, copy=False).ravel() for p in parts if p is not None]
    values = np.concatenate(present) if present else np.zeros(0, np.int32)
    leads = pa.ListArray.from_arrays(pa.array(_offsets(inner)), pa.array(values, type=pa.int32()))
    return pa.ListArray.from_arrays(pa.array(_offsets(outer)), leads)


def segments_table(segments: list[Segment], schema: pa.Schema | None = None) -> pa.Table:
    """One Arrow table of the segments' rows, in the token schema (`schema`, or the plain
    one with the segments' extra columns as strings). Equal to
    `pa.Table.from_pylist([segment_row(s) for s in segments], schema)`."""
    pa = _arrow()
    if schema is None:
        schema = _schema_with(list(segments[0].extra) if segments else [])
    sentences = [s.sentence() for s in segments]
    metas = [_meta_columns(s.meta) for s in segments]
    columns = {
        "record_id": pa.array([s.record_id for s in segments], pa.string()),
        "start_sample": pa.array([int(s.start_sample) for s in segments], pa.int64()),
        "n_samples": pa.array([int(s.n_samples) for s in segments], pa.int64()),
        "fs": pa.array([float(s.fs) for s in segments], pa.float64()),
        "lead_names": pa.array([list(s.lead_names) for s in segments], pa.list_(pa.string())),
        "original_lead_names": pa.array(
            [list(s.original_lead_names) for s in segments], pa.list_(pa.string())
        ),
        "r_peaks": _flat_list([s.r_peaks for s in segments], np.int64, pa.int64()),
        "beat_flags": _flat_list([s.beat_flags for s in segments], np.int32, pa.int32()),
        "tokens": _nested_list([s.words for s in segments]),
        "atrial_tokens": _nested_list([s.atrial for s in segments]),
        "rhythm": _flat_list([s.rhythm for s in segments], np.int32, pa.int32()),
        "sentence": _flat_list([t[0] for t in sentences], np.int32, pa.int32()),
        "sentence_lead": _flat_list([t[1] for t in sentences], np.int32, pa.int32()),
        "sentence_beat": _flat_list([t[2] for t in sentences], np.int32, pa.int32()),
        "tokenizer_id": pa.array([s.tokenizer_id for s in segments], pa.string()),
        "source_path": pa.array([s.source_path for s in segments], pa.string()),
        "age": pa.array([m["age"] for m in metas], pa.float64()),
        "sex": pa.array([m["sex"] for m in metas], pa.string()),
        "dx": pa.array([m["dx"] for m in metas], pa.list_(pa.string())),
        "patient_key": pa.array([m["patient_key"] for m in metas], pa.string()),
    }
    for name in schema.names:
        if name not in columns:  # manifest columns, strings
            columns[name] = pa.array([s.extra.get(name) for s in segments], pa.string())
    return pa.Table.from_arrays([columns[n] for n in schema.names], schema=schema)


def _schema_with(extra_names: list[str]) -> pa.Schema:
    """The token schema with these (already output-named) manifest columns."""
    from ecgtok.transforms.schemas import token_schema

    pa = _arrow()
    base = token_schema([])
    return pa.schema(list(base) + [pa.field(n, pa.string()) for n in extra_names])
