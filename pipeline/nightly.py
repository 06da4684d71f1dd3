"""`ecgtok nightly`: score a cohort every night, paying only for what changed.

    ecgtok nightly --cohort COHORT.csv --store DIR|gs://... [--date YYYY-MM-DD]
                   [--alert-threshold X] [--break-lock] [--tokenizer DIR] [--model DIR]
                   [any Beam pipeline option]

COHORT.csv has `patient_id` and `path` columns (a record's `.hea`, relative to the CSV's
folder or absolute or gs://) and may have others; they are carried into the scores.

The store (local folder or gs:// prefix):

    state/records.json            per record: content fingerprint, tokenizer_id, segment
                                  length and where its tokens live (tokens/run=<id>)
    tokens/run=<id>/*.parquet     token rows, one folder per night that tokenized something
    scores/date=D/scores.parquet  one row per cohort record (segment scores aggregated)
    segments/date=D/segments.parquet   the night's segment-level scores (with embeddings)
    errors/date=D/errors.parquet  one row per record that failed that night
    reports/date=D/index.html     the morning report;  reports/date=D/summary.json
    _lock.json                    held while a night runs
    _staging/<run id>/            a night's scratch space (plan, staged outputs)

Exit codes: 0 done; 1 the job failed; 2 a bad option or value; 3 an unusable cohort;
4 an unusable store; 5 an empty cohort; 6 a bad artifact; 75 another night holds the
store's lock (try again later).

A night: take the lock; fingerprint every cohort record (size plus SHA-256 of its header
and signal bytes, read through Beam's FileSystems); tokenize the records that are new,
changed, failed before, or all of them when the tokenizer (or segment length) changed;
score the whole cohort, reused tokens and new ones alike, with the current model; then a
final step *inside the pipeline* (so it also runs where the launcher does not wait, as
in a Flex Template) aggregates the scores, commits the new state, writes the date's
outputs, deletes token folders nothing refers to any more, and releases the lock.

Why it is safe to kill and rerun: new tokens go to a fresh `tokens/run=<id>/` folder that
nothing refers to until `state/records.json` is replaced (one atomic write) after the
pipeline succeeded; old token folders are deleted only after that. A killed night leaves
the previous state whole; its orphans are removed by the next night. Each date output is
one file written atomically (temporary file + rename locally; a single object write on
GCS) with a deterministic name, `summary.json` last, so rerunning a date replaces its
outputs and never adds to them. Records are scored one per inference call (unless
--score_batch_size is given), so their scores do not depend on which other records
share a padded batch, and a rerun gives the same scores bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from ecgtok.pipeline import outputs
from ecgtok.pipeline.discovery import RecordRef, SourceError, is_remote

_LOG = logging.getLogger(__name__)

STATE_FILE = "state/records.json"
LOCK_FILE = "_lock.json"
STAGING = "_staging"
DEFAULT_THRESHOLD = 0.5
STATE_VERSION = 1
ROUND = 6
PROG = "ecgtok nightly"

AGG_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("status", pa.string()),  # scored | failed
    pa.field("tokens", pa.string()),  # tokenized | reused | failed
    pa.field("change", pa.string()),  # new | modified | retokenized | retried | unchanged
    pa.field("model_id", pa.string()),
    pa.field("tokenizer_id", pa.string()),
    pa.field("p_af_max", pa.float64()),
    pa.field("p_af_mean", pa.float64()),
    pa.field("af_burden", pa.float64()),
    pa.field(
        "af_episodes",
        pa.list_(
            pa.struct([pa.field("start_sample", pa.int64()), pa.field("end_sample", pa.int64())])
        ),
    ),
    pa.field("p_noisy_max", pa.float64()),
    pa.field("p_other_rhythm_max", pa.float64()),
    pa.field("alert", pa.bool_()),
    pa.field("n_segments", pa.int64()),
    pa.field("n_segments_af", pa.int64()),
    pa.field("n_beats", pa.int64()),
    pa.field("duration_s", pa.float64()),
    pa.field("fingerprint", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]
SEGMENT_INFO = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("start_sample", pa.int64()),
        pa.field("n_samples", pa.int64()),
        pa.field("fs", pa.float64()),
    ]
)


class NightlyError(ValueError):
    """A mistake in how the night was asked for, or a held lock: one line, exit code 2."""


class CohortError(NightlyError):
    """The cohort CSV cannot be used (exit code 3, like an unreadable --input)."""


class StoreError(NightlyError):
    """The store cannot be used (exit code 4, like an unusable --output)."""


class EmptyCohort(NightlyError):
    """The cohort lists no records (exit code 5, like an empty archive)."""


class LockHeld(NightlyError):
    """Another night holds the store's lock (exit code 75, EX_TEMPFAIL: try again later)."""


EXIT_LOCKED = 75


# ---- small file helpers (local paths and gs:// alike) -----------------------------------
def _read_bytes(path: str) -> bytes:
    with FileSystems.open(
        path, mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED
    ) as f:
        return f.read()


def _exists(path: str) -> bool:
    return FileSystems.exists(path)


def atomic_write(path: str, data: bytes, mime: str = "application/octet-stream") -> None:
    """Replace `path` with `data` so a reader sees the old or the new file, never a part."""
    if is_remote(path):  # a GCS object becomes visible only when its upload completes
        with FileSystems.create(
            path, mime_type=mime, compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            f.write(data)
        return
    local = path[len("file://") :] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, local)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _files_under(folder: str) -> list[str]:
    """Every file below `folder` (recursively), local or remote; [] when there is none."""
    if is_remote(folder):
        pattern = folder.rstrip("/") + "/**"
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    out = []
    for root, _dirs, files in os.walk(folder):
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def _delete_quietly(paths: list[str]) -> None:
    if not paths:
        return
    try:
        existing = [p for p in paths if FileSystems.exists(p)]
        if existing:
            FileSystems.delete(existing)
    except Exception as exc:  # cleaning up must never fail a night
        _LOG.warning("could not delete %d files: %s", len(paths), exc)


# ---- fingerprints -----------------------------------------------------------------------
def _sibling(header: str, name: str) -> str:
    folder = posixpath.dirname(header) if is_remote(header) else os.path.dirname(header)
    return outputs.join(folder, name)


def record_files(header_path: str, header: bytes) -> list[str]:
    """The files whose bytes make a record: the header, its signal files and, for a
    multi-segment record, the segment headers and their signal files."""
    if not header_path.lower().endswith(".hea"):
        return [header_path]  # EDF and the like: one file
    lines = [
        ln.strip()
        for ln in header.decode("latin-1").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if not lines:
        return [header_path]
    first = lines[0].split()
    files = [header_path]
    if "/" in first[0]:  # multi-segment: segment headers follow
        try:
            n_seg = int(first[0].split("/")[1])
        except ValueError:
            return files
        for ln in lines[1 : 1 + n_seg]:
            seg = ln.split()[0]
            if seg != "~":
                files.append(_sibling(header_path, seg + ".hea"))
        return files
    try:
        n_sig = int(first[1]) if len(first) > 1 else 0
    except ValueError:
        n_sig = 0
    for ln in lines[1 : 1 + n_sig]:
        name = ln.split()[0]
        path = _sibling(header_path, name)
        if path not in files:
            files.append(path)
    return files


def fingerprint(source_path: str) -> str:
    """`size-<sha256>` over a record's header and signal bytes; `unreadable:...` if any
    file cannot be read (such a record is always retried, and fails visibly)."""
    h = hashlib.sha256()
    size = 0
    try:
        header = _read_bytes(source_path)
        paths = record_files(source_path, header)
        todo = [(source_path, header)] + [(p, None) for p in paths[1:]]
        extra_headers = []
        for path, data in todo:
            data = data if data is not None else _read_bytes(path)
            if path.lower().endswith(".hea") and path != source_path:
                extra_headers.append((path, data))
            name = posixpath.basename(path.replace("\\", "/")).encode()
            h.update(len(name).to_bytes(4, "big") + name)
            h.update(len(data).to_bytes(8, "big") + hashlib.sha256(data).digest())
            size += len(data)
        for seg_path, seg_header in extra_headers:  # a segment's own signal files
            for sig in record_files(seg_path, seg_header)[1:]:
                data = _read_bytes(sig)
                h.update(hashlib.sha256(data).digest())
                size += len(data)
    except Exception as exc:
        return f"unreadable:{type(exc).__name__}"
    return f"{size}-{h.hexdigest()[:32]}"


def fingerprints(refs: list[RecordRef], workers: int = 16) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda r: fingerprint(r.source_path), refs))
    return {r.record_id: fp for r, fp in zip(refs, found)}


# ---- the lock ---------------------------------------------------------------------------
def _lock_path(store: str) -> str:
    return outputs.join(store, LOCK_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(info: dict, ttl_hours: float) -> str | None:
    """Why a lock can be taken over (its process is gone, or it is too old), or None."""
    same_host = info.get("host") == socket.gethostname() and info.get("pid")
    if same_host and not _pid_alive(int(info["pid"])):
        return f"its process {info['pid']} on this host is gone"
    age_h = (time.time() - float(info.get("started_epoch", 0))) / 3600.0
    if age_h > ttl_hours:
        return f"it is {age_h:.1f} h old (more than --lock_ttl_hours {ttl_hours:g})"
    return None


def _gcs_blob(path: str):
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    bucket, name = parse_gcs_path(path)
    return GcsIO().client.bucket(bucket).blob(name)


def acquire_lock(store: str, run_id: str, date: str, break_lock: bool, ttl_hours: float) -> dict:
    """Create the store's lock exclusively, taking over a stale one; else raise LockHeld."""
    info = {
        "run_id": run_id,
        "date": date,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "started_epoch": time.time(),
    }
    data = json.dumps(info, indent=2).encode()
    path = _lock_path(store)
    for _attempt in range(2):
        held = _try_create(path, data)
        if held is None:
            return info
        current, token = held
        why = "--break-lock was given" if break_lock else _stale(current, ttl_hours)
        if why is None:
            raise LockHeld(
                f"store {store} is locked by another nightly run (run {current.get('run_id')}, "
                f"date {current.get('date')}, host {current.get('host')}, pid "
                f"{current.get('pid')}, since {current.get('started')}); refusing to run "
                f"at the same time. If that run is dead, rerun with --break-lock."
            )
        _LOG.warning("taking over the lock of run %s: %s", current.get("run_id"), why)
        _remove_lock(path, token)
    raise LockHeld(f"store {store}: another run took the lock while this one was starting")


def _try_create(path: str, data: bytes):
    """None when created; else (the current lock's content, a token to remove it by)."""
    if is_remote(path):
        if not path.startswith("gs://"):
            raise NightlyError(f"locking is supported on local and gs:// stores, not {path}")
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = _gcs_blob(path)
        try:
            blob.upload_from_string(data, if_generation_match=0)
            return None
        except PreconditionFailed:
            try:
                blob.reload()
                return json.loads(blob.download_as_bytes() or b"{}"), blob.generation
            except NotFound:
                return {}, None
    local = path[len("file://") :] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            with open(local, "rb") as f:
                return json.loads(f.read() or b"{}"), None
        except (FileNotFoundError, json.JSONDecodeError):
            return {}, None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return None


def _remove_lock(path: str, token) -> None:
    """Remove a lock; with a token (GCS generation) only that very lock."""
    if is_remote(path):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with contextlib.suppress(NotFound, PreconditionFailed):
            _gcs_blob(path).delete(if_generation_match=token)
        return
    local = path[len("file://") :] if path.startswith("file://") else path
    aside = f"{local}.stale-{uuid.uuid4().hex[:8]}"
    try:  # rename is atomic: of two runs taking over, one wins and the other retries
        os.rename(local, aside)
        os.remove(aside)
    except FileNotFoundError:
        pass


def release_lock(store: str, run_id: str) -> bool:
    """Remove the lock if this run holds it. True when it was removed."""
    path = _lock_path(store)
    try:
        info = json.loads(_read_bytes(path) or b"{}")
    except Exception:
        return False
    if info.get("run_id") != run_id:
        return False
    _remove_lock(path, None)
    return True


# ---- the plan ---------------------------------------------------------------------------
def read_cohort(cohort: str) -> tuple[list[RecordRef], list[str], int]:
    """(records, cohort columns other than path, duplicate rows dropped)."""
    from ecgtok.pipeline.discovery import discover, manifest_columns

    if not cohort.lower().endswith(".csv"):
        raise CohortError(f"--cohort {cohort} is not a .csv file")
    if not _exists(cohort):
        raise CohortError(f"--cohort {cohort} does not exist")
    columns = manifest_columns(cohort)
    if "patient_id" not in columns:
        raise CohortError(f"--cohort {cohort} has no 'patient_id' column")
    from ecgtok.transforms.schemas import SCORE_FIELDS

    taken = {f.name for f in AGG_FIELDS} | {f.name for f in SCORE_FIELDS}
    clash = [c for c in columns if c in taken]
    if clash:
        raise CohortError(f"--cohort {cohort}: column {clash[0]!r} clashes with an output column")
    try:
        refs = list(discover(cohort))
    except SourceError as exc:
        raise CohortError(str(exc)) from exc
    if not refs:
        raise EmptyCohort(f"--cohort {cohort} lists no records")
    seen, out = set(), []
    for r in refs:
        if r.record_id in seen:
            continue
        seen.add(r.record_id)
        out.append(r)
    if len(refs) != len(out):
        _LOG.warning(
            "cohort lists %d records more than once; kept the first rows", len(refs) - len(out)
        )
    return out, columns, len(refs) - len(out)


def load_state(store: str) -> dict:
    path = outputs.join(store, STATE_FILE)
    if not _exists(path):
        return {"version": STATE_VERSION, "records": {}}
    state = json.loads(_read_bytes(path))
    if state.get("version") != STATE_VERSION:
        raise NightlyError(f"{path} has state version {state.get('version')!r}; expected 1")
    return state


def plan_night(
    refs: list[RecordRef], fps: dict[str, str], state: dict, tokenizer_id: str, segment_s: float
) -> dict[str, str]:
    """record_id -> why it is tokenized tonight, or 'unchanged' when its tokens are reused."""
    known = state.get("records", {})
    reasons = {}
    for r in refs:
        entry = known.get(r.record_id)
        fp = fps[r.record_id]
        if entry is None:
            reasons[r.record_id] = "new"
        elif entry.get("fingerprint") != fp or fp.startswith("unreadable"):
            reasons[r.record_id] = "modified"
        elif entry.get("status") == "failed":
            reasons[r.record_id] = "retried"
        elif entry.get("tokenizer_id") != tokenizer_id or float(
            entry.get("segment_seconds", -1)
        ) != float(segment_s):
            reasons[r.record_id] = "retokenized"
        else:
            reasons[r.record_id] = "unchanged"
    return reasons


def operating_point(model_config: dict) -> tuple[float, str]:
    """The model card's operating point for p_af when config.json states one, else 0.5."""
    op = model_config.get("p_af_threshold", model_config.get("operating_point"))
    if isinstance(op, dict):
        op = op.get("p_af", op.get("threshold"))
    if isinstance(op, (int, float)) and 0.0 <= float(op) <= 1.0:
        return float(op), "model operating point (config.json)"
    return DEFAULT_THRESHOLD, "default 0.5: the model states no operating point"


# ---- the pipeline -----------------------------------------------------------------------
def _load_plan(path: str) -> dict:
    return json.loads(_read_bytes(path))


class _RefsToTokenize(beam.DoFn):
    """The plan file -> a RecordRef for every record tokenized tonight."""

    def process(self, plan_path: str):
        plan = _load_plan(plan_path)
        for rid in plan["to_tokenize"]:
            rec = plan["cohort"][rid]
            yield RecordRef(rid, rec["source_path"], dict(rec["extra"]))


class _KeepReused(beam.DoFn):
    """(token file, row) -> the row, if its record reuses this folder's tokens tonight."""

    def __init__(self, plan_path: str, store: str) -> None:
        self._plan_path = plan_path
        self._store = store

    def setup(self) -> None:
        plan = _load_plan(self._plan_path)
        self._where = {
            rid: outputs.join(self._store, folder) for rid, folder in plan["reused"].items()
        }

    def process(self, element):
        filename, row = element
        rid = row["record_id"]
        folder = self._where.get(rid)
        if folder is None or _parent(filename) != _parent(outputs.join(folder, "x")):
            return
        yield row


def _parent(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def _segment_info(row: dict) -> dict:
    return {
        "record_id": row["record_id"],
        "start_sample": int(row["start_sample"]),
        "n_samples": int(row.get("n_samples") or 0),
        "fs": float(row.get("fs") or 0.0),
    }


class _Finalize(beam.DoFn):
    """Runs once, after every write: aggregate, commit state, write the date, clean up."""

    def __init__(self, plan_path: str) -> None:
        self._plan_path = plan_path

    def process(self, _unused, *written):
        yield finalize(_load_plan(self._plan_path))


def _limits(plan: dict):
    """The per-record bounds of the tokenize stage, from the same options as `ecgtok run`."""
    from ecgtok.transforms.stages import RecordLimits

    given = {k: v for k, v in plan.get("limits", {}).items() if v is not None}
    return RecordLimits(**given)


def build_nightly(p: beam.Pipeline, plan: dict, plan_path: str) -> None:
    from ecgtok.pipeline.graph import JobConfig
    from ecgtok.transforms import schemas
    from ecgtok.transforms.stages import (
        ScoreRecords,
        TokenizeRecords,
        TokenRows,
        WriteParquetFolder,
        WriteTableFolder,
    )

    store, staged, cols = plan["store"], plan["staging"], plan["columns"]
    cfg = JobConfig(
        input=plan_path,
        output=staged,
        tokenizer_dir=plan["tokenizer_dir"],
        model_dir=plan["model_dir"],
        tokenizer_id=plan["tokenizer_id"],
        model_id=plan["model_id"],
        extra_columns=cols,
        segment_s=plan["segment_seconds"],
        device=plan["device"],
        batch_size=plan["batch_size"],
    )
    meta = {"ecgtok_tokenizer_id": cfg.tokenizer_id}
    parts = []
    writes = []
    if plan["to_tokenize"]:
        refs = (
            p
            | "Plan" >> beam.Create([plan_path])
            | "RecordsToTokenize" >> beam.ParDo(_RefsToTokenize())
            | "Spread" >> beam.Reshuffle()
        )
        # Token rows carry no cohort columns: they are reused across nights while the
        # cohort's columns may change, and a cohort column may share a token field's name
        # (the demo manifest's `rhythm`). Finalize joins the cohort's columns instead.
        result = refs | "TokenizeRecords" >> TokenizeRecords(
            cfg.tokenizer_dir, cfg.segment_s, [], _limits(plan)
        )
        writes.append(
            result.tables
            | "WriteTokenShards"
            >> WriteTableFolder(
                outputs.join(store, plan["tokens_folder"]), schemas.token_schema([], meta)
            )
        )
        writes.append(
            result.errors
            | "WriteErrors"
            >> WriteParquetFolder(outputs.join(staged, "errors"), schemas.error_schema(meta))
        )
        parts.append(result.tables | "TokenRows" >> TokenRows())
    if plan["reused"]:
        folders = sorted(set(plan["reused"].values()))
        parts.append(
            p
            | "ReusedTokenFolders"
            >> beam.Create([outputs.join(store, f, "*.parquet") for f in folders])
            | "ReadReusedTokens" >> beam.io.ReadAllFromParquet(with_filename=True)
            | "KeepCohortRows" >> beam.ParDo(_KeepReused(plan_path, store))
        )
    if parts:
        rows = parts | "AllTokenRows" >> beam.Flatten()
        score_meta = {"ecgtok_model_id": cfg.model_id, "ecgtok_tokenizer_id": cfg.tokenizer_id}
        scores = rows | "ScoreRecords" >> ScoreRecords(
            cfg.model_dir, [], cfg.device, cfg.batch_size
        )
        writes.append(
            scores
            | "WriteSegmentScores"
            >> WriteParquetFolder(
                outputs.join(staged, "segments"), schemas.score_schema([], score_meta)
            )
        )
        writes.append(
            rows
            | "SegmentInfo" >> beam.Map(_segment_info)
            | "WriteSegmentInfo"
            >> WriteParquetFolder(outputs.join(staged, "segment_info"), SEGMENT_INFO)
        )
    sides = [beam.pvalue.AsList(w) for w in writes]
    _ = (
        p
        | "FinalizeTrigger" >> beam.Create([None])
        | "Finalize" >> beam.ParDo(_Finalize(plan_path), *sides)
    )


# ---- finalize: aggregation, state, date outputs -----------------------------------------
def _table_rows(folder: str, columns: list[str] | None = None) -> list[dict]:
    tables = []
    for path in outputs.parquet_files(folder):
        with FileSystems.open(path, mime_type="application/octet-stream") as f:
            t = pq.read_table(f, columns=columns)
        if t.num_rows:
            tables.append(t)
    if not tables:
        return []
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def _r(x):
    return None if x is None else round(float(x), ROUND)


def aggregate(segments: list[dict], info: list[dict], threshold: float) -> dict[str, dict]:
    """Segment scores -> per record: max/mean p_af, AF burden, AF episodes, the other
    heads' maxima, counts.

    AF burden is time-weighted over the record's segments: a long segment contributes the
    burden its 48-beat windows found (`af_burden` of its score row), a short one all its
    time when its p_af is at or above the threshold. Episodes are the segments' episodes,
    joined across segment edges when less than 10 s apart."""
    dur = {(i["record_id"], i["start_sample"]): (i["n_samples"] / i["fs"] if i["fs"] else 0.0)
           for i in info}  # fmt: skip
    rate = {i["record_id"]: i["fs"] for i in info if i.get("fs")}
    by_rec: dict[str, list[dict]] = {}
    for s in segments:
        by_rec.setdefault(s["record_id"], []).append(s)
    out = {}
    for rid, segs in by_rec.items():
        segs.sort(key=lambda s: s["start_sample"])
        p = [_r(s["p_af"]) for s in segs]
        d = [dur.get((rid, s["start_sample"]), 0.0) for s in segs]
        total = sum(d)
        above = [pi is not None and pi >= threshold for pi in p]
        in_af = [
            float(s["af_burden"]) if s.get("af_burden") is not None else float(a)
            for s, a in zip(segs, above)
        ]
        burden = sum(x * di for x, di in zip(in_af, d)) / total if total > 0 else None
        if burden is None:
            burden = sum(in_af) / len(segs)
        # Segments without beats have no p_af (null): they count as time, not as scores.
        scored = [(pi, di) for pi, di in zip(p, d) if pi is not None]
        scored_time = sum(di for _, di in scored)
        if not scored:
            mean = None
        elif scored_time > 0:
            mean = sum(pi * di for pi, di in scored) / scored_time
        else:
            mean = sum(pi for pi, _ in scored) / len(scored)
        out[rid] = {
            "model_id": segs[0]["model_id"],
            "p_af_max": max((pi for pi, _ in scored), default=None),
            "p_af_mean": _r(mean),
            "af_burden": _r(burden),
            "af_episodes": _join_episodes(segs, rate.get(rid)),
            "p_noisy_max": _r(max(s.get("p_noisy") or 0.0 for s in segs)),
            "p_other_rhythm_max": _r(max(s.get("p_other_rhythm") or 0.0 for s in segs)),
            "n_segments": len(segs),
            "n_segments_af": int(sum(above)),
            "n_beats": int(sum(int(s.get("n_beats") or 0) for s in segs)),
            "duration_s": _r(total),
        }
    return out


def _join_episodes(segs: list[dict], fs: float | None, gap_s: float = 10.0) -> list[dict]:
    """All AF episodes of a record's segments, in order, those closer than gap_s joined."""
    eps = sorted(
        (int(e["start_sample"]), int(e["end_sample"]))
        for s in segs
        for e in (s.get("af_episodes") or [])
    )
    out: list[list[int]] = []
    for a, b in eps:
        if out and fs and (a - out[-1][1]) / fs < gap_s:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [{"start_sample": a, "end_sample": b} for a, b in out]


def _previous_night(store: str, date: str) -> tuple[str | None, list[dict]]:
    """The latest earlier date with scores in the store, and its score rows."""
    pattern = outputs.join(store, "scores", "date=*", "scores.parquet")
    try:
        found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:
        found = []
    dates = sorted(
        (posixpath.basename(posixpath.dirname(f.replace("\\", "/")))[len("date=") :], f)
        for f in found
    )
    earlier = [(d, f) for d, f in dates if d < date]
    if not earlier:
        return None, []
    d, f = earlier[-1]
    with FileSystems.open(f, mime_type="application/octet-stream") as fh:
        rows = pq.read_table(
            fh, columns=["record_id", "status", "alert", "fingerprint"]
        ).to_pylist()
    return d, rows


def _changes(prev_date, prev_rows, rows: list[dict]) -> dict:
    before = {r["record_id"]: r for r in prev_rows}
    now = {r["record_id"]: r for r in rows}
    if prev_date is None:
        return {"previous_date": None, "added": sorted(now), "removed": [], "modified": [],
                "newly_alerted": sorted(r for r, x in now.items() if x["alert"]),
                "no_longer_alerted": [], "newly_failed": sorted(
                    r for r, x in now.items() if x["status"] == "failed"), "recovered": []}  # fmt: skip
    both = sorted(set(now) & set(before))
    return {
        "previous_date": prev_date,
        "added": sorted(set(now) - set(before)),
        "removed": sorted(set(before) - set(now)),
        "modified": [r for r in both if now[r]["fingerprint"] != before[r]["fingerprint"]],
        "newly_alerted": sorted(
            r for r in now if now[r]["alert"] and not (before.get(r) or {}).get("alert")
        ),
        "no_longer_alerted": [r for r in both if before[r]["alert"] and not now[r]["alert"]],
        "newly_failed": sorted(
            r
            for r in now
            if now[r]["status"] == "failed" and (before.get(r) or {}).get("status") != "failed"
        ),
        "recovered": [
            r for r in both if before[r]["status"] == "failed" and now[r]["status"] != "failed"
        ],
    }


def _alerts(rows: list[dict]) -> list[dict]:
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        if r["alert"]:
            by_patient.setdefault(r.get("patient_id") or "", []).append(r)
    out = []
    for pid, recs in by_patient.items():
        out.append(
            {
                "patient_id": pid,
                "records_above": len(recs),
                "p_af_max": max(r["p_af_max"] for r in recs),
                "af_burden_max": max(r["af_burden"] or 0.0 for r in recs),
                "record_ids": sorted(r["record_id"] for r in recs),
            }
        )
    return sorted(out, key=lambda a: (-a["p_af_max"], a["patient_id"]))


def _replace_date_folder(folder: str, name: str, data: bytes, mime: str) -> None:
    """Write folder/name atomically, then remove any other file the folder holds."""
    target = outputs.join(folder, name)
    atomic_write(target, data, mime)
    stray = [f for f in _files_under(folder) if posixpath.basename(f.replace("\\", "/")) != name]
    _delete_quietly(stray)


def finalize(plan: dict) -> dict:
    """After the pipeline's writes: the night's accounting, state, outputs and clean-up."""
    from ecgtok.pipeline import nightly_report

    store, staged, date = plan["store"], plan["staging"], plan["date"]
    summary_path = outputs.join(store, "reports", f"date={date}", "summary.json")
    if _exists(summary_path):  # a retried final step: the night is already written
        done = json.loads(_read_bytes(summary_path))
        if done.get("run_id") == plan["run_id"]:
            _clean_up(plan, {e["tokens"] for e in load_state(store)["records"].values()
                             if e.get("tokens")})  # fmt: skip
            return done
    thr, cols = plan["alert_threshold"], plan["columns"]
    tokens_folder = outputs.join(store, plan["tokens_folder"])
    new_ids = {r["record_id"] for r in _table_rows(tokens_folder, ["record_id"])}
    errors = _table_rows(outputs.join(staged, "errors"))
    err_by_id = {}
    for e in errors:
        err_by_id.setdefault(e["record_id"], e)
    segments = _table_rows(outputs.join(staged, "segments"))
    info = _table_rows(outputs.join(staged, "segment_info"))
    agg = aggregate(segments, info, thr)

    cohort = plan["cohort"]
    prev_records = plan["previous_state"].get("records", {})
    state_records, rows, failed_rows = {}, [], []
    tokenized = reused = failed = 0
    for rid in plan["order"]:
        rec = cohort[rid]
        reason = plan["reasons"][rid]
        if rid in plan["reused"] and rid not in agg:  # its token files are gone from the store
            err_by_id[rid] = {
                "stage": "nightly",
                "error_type": "TokensMissing",
                "message": f"no token rows in {plan['reused'][rid]}; re-tokenized next night",
            }
        if rid in plan["reused"] and rid in agg:
            how = "reused"
            state_records[rid] = dict(prev_records[rid], source_path=rec["source_path"])
            reused += 1
        elif rid in new_ids:
            how = "tokenized"
            state_records[rid] = {
                "status": "ok",
                "fingerprint": rec["fingerprint"],
                "tokenizer_id": plan["tokenizer_id"],
                "segment_seconds": plan["segment_seconds"],
                "tokens": plan["tokens_folder"],
                "source_path": rec["source_path"],
                "tokenized_on": date,
            }
            tokenized += 1
        else:
            how = "failed"
            state_records[rid] = {
                "status": "failed",
                "fingerprint": rec["fingerprint"],
                "source_path": rec["source_path"],
                "failed_on": date,
            }
            failed += 1
        scores = agg.get(rid) if how != "failed" else None
        err = err_by_id.get(rid)
        if how == "failed" and err is None:
            err = {"stage": "nightly", "error_type": "NoTokens", "message": "no token rows"}
        row = {
            "record_id": rid,
            "status": "scored" if scores else "failed",
            "tokens": how,
            "change": reason,
            "model_id": plan["model_id"],
            "tokenizer_id": plan["tokenizer_id"] if how != "failed" else None,
            "fingerprint": rec["fingerprint"],
            "error_type": err["error_type"] if err else None,
            "error_message": err["message"] if err else None,
        }
        for f in AGG_FIELDS:
            if f.name not in row:
                row[f.name] = (scores or {}).get(f.name)
        row["model_id"] = plan["model_id"]
        row["alert"] = bool(scores and (scores["p_af_max"] or 0.0) >= thr)
        row.update({c: rec["extra"].get(c, "") for c in cols})
        rows.append(row)
        if how == "failed":
            failed_rows.append(
                {
                    "record_id": rid,
                    "source_path": rec["source_path"],
                    "patient_id": rec["extra"].get("patient_id", ""),
                    "stage": err["stage"],
                    "error_type": err["error_type"],
                    "message": err["message"],
                }
            )
    scored = sum(1 for r in rows if r["status"] == "scored")

    # 1. the new state: one atomic write; from here on the night's tokens are the truth
    state = {
        "version": STATE_VERSION,
        "tokenizer_id": plan["tokenizer_id"],
        "segment_seconds": plan["segment_seconds"],
        "date": date,
        "run_id": plan["run_id"],
        "records": state_records,
    }
    atomic_write(
        outputs.join(store, STATE_FILE),
        json.dumps(state, indent=1, sort_keys=True).encode(),
        "application/json",
    )

    # 2. the date's outputs, each one file replaced atomically; summary.json last
    prev_date, prev_rows = _previous_night(store, date)
    changes = _changes(prev_date, prev_rows, rows)
    alerts = _alerts(rows)
    agg_schema = pa.schema(
        AGG_FIELDS + [pa.field(c, pa.string()) for c in cols],
        metadata={"ecgtok_model_id": plan["model_id"], "ecgtok_tokenizer_id": plan["tokenizer_id"],
                  "ecgtok_date": date, "ecgtok_alert_threshold": str(thr)},
    )  # fmt: skip
    _replace_date_folder(
        outputs.join(store, "scores", f"date={date}"),
        "scores.parquet",
        _parquet_bytes(pa.Table.from_pylist(rows, schema=agg_schema)),
        "application/octet-stream",
    )
    seg_table = _segment_table(segments, cols, cohort)
    if seg_table is not None:
        _replace_date_folder(
            outputs.join(store, "segments", f"date={date}"),
            "segments.parquet",
            _parquet_bytes(seg_table),
            "application/octet-stream",
        )
    from ecgtok.transforms import schemas

    err_schema = schemas.error_schema({"ecgtok_date": date})
    err_table = pa.Table.from_pylist(
        [{k: e[k] for k in err_schema.names} for e in failed_rows], schema=err_schema
    )
    _replace_date_folder(
        outputs.join(store, "errors", f"date={date}"),
        "errors.parquet",
        _parquet_bytes(err_table),
        "application/octet-stream",
    )
    breakdown: dict[str, dict[str, int]] = {}
    for e in failed_rows:
        by_stage = breakdown.setdefault(e["stage"], {})
        by_stage[e["error_type"]] = by_stage.get(e["error_type"], 0) + 1
    summary = {
        "date": date,
        "cohort_records": len(plan["order"]),
        "tokenized": tokenized,
        "reused": reused,
        "scored": scored,
        "failed": failed,
        "alerted_records": sum(1 for r in rows if r["alert"]),
        "alerted_patients": len(alerts),
        "alert_threshold": thr,
        "alert_threshold_source": plan["alert_threshold_source"],
        "model_id": plan["model_id"],
        "tokenizer_id": plan["tokenizer_id"],
        "tokenizer_changed": plan["tokenizer_changed"],
        "segment_seconds": plan["segment_seconds"],
        "duplicate_cohort_rows": plan["duplicates"],
        "failures": breakdown,
        "changes": changes,
        "cohort": plan["cohort_path"],
        "store": store,
        "run_id": plan["run_id"],
        "runner": plan["runner"],
        "fingerprint_seconds": plan["fingerprint_seconds"],
        "wall_seconds": round(time.time() - plan["started_epoch"], 3),
    }
    reports = outputs.join(store, "reports", f"date={date}")
    page = nightly_report.render(summary, rows, alerts, failed_rows)
    atomic_write(outputs.join(reports, "index.html"), page.encode(), "text/html")
    atomic_write(
        summary_path, json.dumps(summary, indent=2, sort_keys=True).encode(), "application/json"
    )
    _clean_up(plan, {e["tokens"] for e in state_records.values() if e.get("tokens")})
    return summary


def _clean_up(plan: dict, referenced: set[str]) -> None:
    """Delete token folders nothing refers to, the scratch space; release the lock."""
    store = plan["store"]

    orphans = [
        f
        for f in _files_under(outputs.join(store, "tokens"))
        if _token_folder(f, store) not in referenced
    ]
    _delete_quietly(orphans)
    _delete_quietly(_files_under(outputs.join(store, STAGING)))
    if not is_remote(store):
        import shutil

        for folder in ("tokens", STAGING):
            _remove_empty_dirs(outputs.join(store, folder))
        shutil.rmtree(outputs.join(store, STAGING), ignore_errors=True)
    release_lock(store, plan["run_id"])


def _token_folder(path: str, store: str) -> str:
    """`tokens/run=<id>` for a file under STORE/tokens/run=<id>/."""
    rel = path[len(store) :].replace("\\", "/").lstrip("/")
    parts = rel.split("/")
    return "/".join(parts[:2])


def _remove_empty_dirs(root: str) -> None:
    for folder, _dirs, _files in sorted(os.walk(root), key=lambda x: -len(x[0])):
        if folder != root and not os.listdir(folder):
            os.rmdir(folder)


def _segment_table(segments: list[dict], cols: list[str], cohort: dict):
    """The night's segment scores, with the cohort's columns joined on."""
    if not segments:
        return None
    from ecgtok.transforms import schemas

    schema = schemas.score_schema(cols)
    out = []
    for s in sorted(segments, key=lambda s: (s["record_id"], s["start_sample"])):
        row = {k: s.get(k) for k in schema.names}
        row.update({c: cohort[s["record_id"]]["extra"].get(c, "") for c in cols})
        out.append(row)
    return pa.Table.from_pylist(out, schema=schema)


# ---- the command ------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Score a cohort every night, tokenizing only what changed.",
        epilog="Also: --tokenizer DIR, --model DIR, --segment_seconds S, --score_batch_size N "
        "(default 1 here: scores reproducible bit for bit), --device, --isolation, "
        "--record_timeout, --record_memory_mb, and any Beam option (--runner, --project, ...). "
        "Exit codes: 2 usage, 3 cohort, 4 store, 5 empty cohort, 6 artifact, "
        "75 the store is locked by another run.",
    )
    ap.add_argument("--cohort", required=True, help="cohort CSV (patient_id, path, ...)")
    ap.add_argument("--store", required=True, help="state and outputs folder (local or gs://)")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    ap.add_argument(
        "--alert-threshold",
        "--alert_threshold",
        dest="alert_threshold",
        type=float,
        default=None,
        help="p_af at or above which a patient is listed (default: the model's operating point)",
    )
    ap.add_argument(
        "--break-lock",
        "--break_lock",
        dest="break_lock",
        action="store_true",
        help="take over the store's lock (only when the run holding it is dead)",
    )
    ap.add_argument(
        "--lock_ttl_hours",
        "--lock-ttl-hours",
        dest="lock_ttl_hours",
        type=float,
        default=12.0,
        help="a lock older than this is taken over",
    )
    return ap


NIGHTLY_OPTIONS = ("cohort", "store", "date", "alert_threshold", "break_lock", "lock_ttl_hours")


def _parse_date(text: str | None) -> str:
    if text in (None, "", "today"):
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise NightlyError(f"--date {text!r} is not a date written YYYY-MM-DD") from None
    if day.isoformat() != text:
        raise NightlyError(f"--date {text!r} is not a date written YYYY-MM-DD")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like the other commands
        raise NightlyError(message)


def parse_args(argv: list[str]):
    """(nightly args, date, PipelineOptions, EcgtokOptions); raises NightlyError/UsageError."""
    from ecgtok.pipeline.run import _pipeline_options

    ap = _parser()
    ap.__class__ = _Parser
    args, beam_argv = ap.parse_known_args(argv)
    date = _parse_date(args.date)
    options, opts = _pipeline_options(beam_argv)
    if opts.input or opts.output:
        raise NightlyError("nightly takes --cohort and --store, not --input/--output")
    if opts.segment_seconds <= 0:
        raise NightlyError("--segment_seconds must be positive")
    if args.alert_threshold is not None and not 0.0 <= args.alert_threshold <= 1.0:
        raise NightlyError("--alert-threshold must be between 0 and 1")
    return args, date, options, opts


def _batch_size(options, opts) -> int:
    """Records per inference batch: 1 unless --score_batch_size is given.

    Scored alone, a record's scores depend on nothing but its tokens and the model, so
    a rerun (or a night that reuses last night's tokens) reproduces them bit for bit.
    In a padded batch they move in the 7th digit with the batch's other records, which
    rounding to 6 decimals does not always hide.
    """
    given = options.get_all_options(drop_default=True)
    return opts.score_batch_size if "score_batch_size" in given else 1


def prepare(argv: list[str]):
    """Parse, check and plan a night (takes the lock). Returns (plan, options)."""
    from ecgtok.models.model import load_model
    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.pipeline.flags import default_model_dir, default_tokenizer_dir

    started = time.time()
    args, date, options, opts = parse_args(argv)
    store = args.store.rstrip("/") if is_remote(args.store) else os.path.abspath(args.store)
    tok_dir = opts.tokenizer or default_tokenizer_dir()
    model_dir = opts.model or default_model_dir()
    tokenizer_id = Tokenizer.load(tok_dir).tokenizer_id
    _, model_config = load_model(model_dir, "cpu")
    wanted = model_config.get("tokenizer_id")
    if wanted and wanted != tokenizer_id:
        raise NightlyError(
            f"model {model_config['model_id']} reads tokens of tokenizer {wanted}, but the "
            f"tokenizer given is {tokenizer_id}: pass the model trained on that tokenizer "
            "(--model) with it"
        )
    if args.alert_threshold is not None:
        thr, thr_source = float(args.alert_threshold), "--alert-threshold"
    else:
        thr, thr_source = operating_point(model_config)
    refs, columns, dups = read_cohort(args.cohort)
    if not is_remote(store):
        try:
            os.makedirs(store, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--store {store} cannot be used: {exc}") from exc

    run_id = f"{date.replace('-', '')}-{uuid.uuid4().hex[:8]}"
    acquire_lock(store, run_id, date, args.break_lock, args.lock_ttl_hours)
    try:
        state = load_state(store)
        t0 = time.perf_counter()
        fps = fingerprints(refs)
        fp_seconds = round(time.perf_counter() - t0, 3)
        reasons = plan_night(refs, fps, state, tokenizer_id, opts.segment_seconds)
        known = state.get("records", {})
        tokens_folder = f"tokens/run={run_id}"
        plan = {
            "run_id": run_id,
            "date": date,
            "store": store,
            "staging": outputs.join(store, STAGING, run_id),
            "cohort_path": args.cohort,
            "columns": columns,
            "order": [r.record_id for r in refs],
            "cohort": {
                r.record_id: {
                    "source_path": r.source_path,
                    "extra": {c: str(r.extra.get(c, "")) for c in columns},
                    "fingerprint": fps[r.record_id],
                }
                for r in refs
            },
            "reasons": reasons,
            "to_tokenize": [r.record_id for r in refs if reasons[r.record_id] != "unchanged"],
            "reused": {
                r.record_id: known[r.record_id]["tokens"]
                for r in refs
                if reasons[r.record_id] == "unchanged"
            },
            "previous_state": state,
            "tokens_folder": tokens_folder,
            "tokenizer_dir": tok_dir,
            "model_dir": model_dir,
            "tokenizer_id": tokenizer_id,
            "tokenizer_changed": bool(state.get("tokenizer_id"))
            and state.get("tokenizer_id") != tokenizer_id,
            "model_id": model_config["model_id"],
            "segment_seconds": float(opts.segment_seconds),
            "device": opts.device,
            "batch_size": _batch_size(options, opts),
            "limits": {
                "isolate": getattr(opts, "isolation", "process") == "process",
                "timeout_s": getattr(opts, "record_timeout", None),
                "memory_mb": getattr(opts, "record_memory_mb", None),
            },
            "alert_threshold": thr,
            "alert_threshold_source": thr_source,
            "duplicates": dups,
            "runner": "",
            "fingerprint_seconds": fp_seconds,
            "started_epoch": started,
        }
    except BaseException:
        release_lock(store, run_id)
        raise
    return plan, options


def run_nightly(argv: list[str], test_pipeline=None) -> dict:
    """One night, start to end. Returns the summary (read back from the store)."""
    from apache_beam.runners.runner import PipelineState

    from ecgtok.pipeline.run import _make_pipeline

    plan, options = prepare(argv)
    store, run_id = plan["store"], plan["run_id"]
    try:
        p, runner_name = _make_pipeline(options, test_pipeline)
        plan["runner"] = runner_name
        plan_path = outputs.join(plan["staging"], "plan.json")
        atomic_write(plan_path, json.dumps(plan).encode(), "application/json")
        build_nightly(p, plan, plan_path)
        result = p.run()
        state = result.wait_until_finish()
    except BaseException:
        _abandon(plan)
        raise
    if state is not None and not PipelineState.is_terminal(state):
        # The runner returned while the job runs on (a Flex Template launcher, say): the
        # job's last step writes the night's outputs and releases the lock.
        return {"date": plan["date"], "store": store, "run_id": run_id, "submitted": str(state)}
    if state not in (None, PipelineState.DONE):
        _abandon(plan)
        raise RuntimeError(f"the nightly pipeline ended in state {state}")
    release_lock(store, run_id)  # normally released by the job's last step already
    summary_path = outputs.join(store, "reports", f"date={plan['date']}", "summary.json")
    return json.loads(_read_bytes(summary_path))


def _abandon(plan: dict) -> None:
    """After a failed night: remove its scratch space and, unless the state already
    refers to them, its new tokens; release the lock. The previous state stays whole."""
    store, run_id = plan["store"], plan["run_id"]
    try:
        committed = load_state(store).get("run_id") == run_id
        doomed = _files_under(plan["staging"])
        if not committed:
            doomed += _files_under(outputs.join(store, plan["tokens_folder"]))
        _delete_quietly(doomed)
        if not is_remote(store):
            import shutil

            shutil.rmtree(plan["staging"], ignore_errors=True)
            if not committed:
                shutil.rmtree(outputs.join(store, plan["tokens_folder"]), ignore_errors=True)
    except Exception as exc:  # the next night removes what is left
        _LOG.warning("could not clean up after the failed run %s: %s", run_id, exc)
    finally:
        release_lock(store, run_id)


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    print("", file=out)
    print(f"ecgtok nightly {summary['date']}", file=out)
    for key in ("cohort_records", "tokenized", "reused", "failed", "scored", "alerted_patients"):
        print(f"  {key.replace('_', ' '):<26}{summary[key]:>12}", file=out)
    print(f"  {'alert threshold':<26}{summary['alert_threshold']:>12g}", file=out)
    print(f"  {'wall time (s)':<26}{summary['wall_seconds']:>12}", file=out)
    for key in ("tokenizer_id", "model_id", "runner"):
        print(f"  {key:<26}{summary[key]:>12}", file=out)
    print("", file=out)


def main(argv: list[str] | None = None) -> int:
    from ecgtok.models.tokenizer import ArtifactError
    from ecgtok.pipeline.outputs import OutputError
    from ecgtok.pipeline.run import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_GCE_CHECK", "true")
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    from ecgtok.pipeline import cli

    codes = [
        (LockHeld, EXIT_LOCKED),
        (EmptyCohort, cli.EXIT_EMPTY),
        ((CohortError, SourceError), cli.EXIT_INPUT),
        ((StoreError, OutputError), cli.EXIT_OUTPUT),
        (ArtifactError, cli.EXIT_ARTIFACT),
        ((NightlyError, UsageError), cli.EXIT_USAGE),
    ]
    try:
        summary = run_nightly(argv)
    except (NightlyError, UsageError, SourceError, OutputError, ArtifactError) as exc:
        print(f"ecgtok: error: {exc}", file=sys.stderr)
        return next(code for kind, code in codes if isinstance(exc, kind))
    if summary.get("submitted"):
        print(
            f"nightly {summary['date']}: job submitted ({summary['submitted']}); its last step "
            f"writes {summary['store']}/reports/date={summary['date']}/",
            file=sys.stderr,
        )
        return 0
    print_summary(summary)
    report = outputs.join(summary["store"], "reports", f"date={summary['date']}", "index.html")
    print(f"report: {report}", file=sys.stderr)
    return 0


if (
    __name__ == "__main__"
):  # `python -m ecgtok.pipeline.nightly ...`, as Airflow's Beam operator runs it
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
