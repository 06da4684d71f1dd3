"""Records to their token rows: open, then per segment read, find beats and tokenize.

Plain Python over NumPy, no Beam. `tokenize_record` does one record; `tokenize_batch`,
what the Beam wrapper (`transforms/stages.py`) runs in a guarded child, does a batch:
short records of one shape go through every stage together (the same rows as one at a
time), and the batch's rows come back as one Arrow table. The wrapper turns a
`RecordError` into an error row.

A record is streamed segment by segment (`--segment_seconds`, 5 minutes by default), so
a 24 h Holter costs the memory of one segment, not of the day. Each segment is read with
a few seconds of its neighbours on both sides, so the detector has settled at the
segment's edges, and a beat's window and RR interval see the beats beyond the edge. Every
beat is kept by exactly one segment: the one whose [start, end) holds its R peak.

Every file of a record is checked when it is opened, before any sample is decoded, and
rows are only returned once the whole record succeeded, so a record never ends with both
token rows and an error row.
"""

from __future__ import annotations

import numpy as np

from ecgtok.models.tokenizer import Tokenizer
from ecgtok.transforms.errors import TRANSIENT_ERRORS, RecordError
from ecgtok.transforms.token_table import Segment, segment_row
from ecgtok.transforms.wfdb_reader import Record, SampleReader, open_record

DEFAULT_SEGMENT_S = 300.0
# Context read on each side of a segment (detector settling, neighbouring beats).
CONTEXT_S = 5.0
# Two detections closer than this across a segment edge are one beat.
REFRACTORY_S = 0.2


def find_beats(record: Record) -> tuple[np.ndarray, np.ndarray]:
    """R peaks (int64, at the record's rate) and per-beat quality flags (uint8)."""
    from ecgtok.transforms.beats import beat_quality
    from ecgtok.transforms.qrs import detect_r_peaks

    try:
        r_peaks = np.asarray(detect_r_peaks(record.signal, record.fs), dtype=np.int64)
        flags = np.asarray(beat_quality(record.signal, record.fs, r_peaks), dtype=np.uint8)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError("beats", type(exc).__name__, str(exc)) from exc
    return r_peaks, flags


def segment_bounds(n_samples: int, fs: float, segment_s: float) -> list[tuple[int, int]]:
    """Disjoint [start, end) segments covering the record; one for a short record."""
    seg = max(1, int(round(segment_s * fs)))
    if n_samples <= seg:
        return [(0, n_samples)]
    return [(s, min(s + seg, n_samples)) for s in range(0, n_samples, seg)]


class _InMemoryReader(SampleReader):
    """A decoded Record behind the reader interface (exports are small files)."""

    def __init__(self, record: Record) -> None:
        self._record = record
        self.record_id = record.record_id
        self.source_path = record.source_path
        self.fs = record.fs
        self.n_samples = record.signal.shape[0]
        self.lead_names = record.lead_names
        self.original_lead_names = record.original_lead_names
        self.units = list(record.units or ["mV"] * record.signal.shape[1])
        self.meta = record.meta

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._record.signal[max(0, start) : stop]


def open_any(source_path: str, record_id: str, policy=None):
    """A reader (fs, n_samples, read(start, stop), names, meta) for any supported file.

    `policy` (a `DeidPolicy`) de-identifies hospital exports; None: the environment's.
    """
    from ecgtok.transforms.formats import is_export_file, read_export
    from ecgtok.transforms.formats.deid import DeidPolicy

    try:
        if is_export_file(source_path):
            policy = policy or DeidPolicy.from_env()
            if source_path.lower().endswith(".ecg"):
                from ecgtok.transforms.formats.ishne import open_ishne

                return open_ishne(source_path, record_id, policy)
            return _InMemoryReader(read_export(source_path, record_id, policy))
        return open_record(source_path, record_id)
    except (RecordError, *TRANSIENT_ERRORS):
        raise
    except Exception as exc:
        raise RecordError("read", type(exc).__name__, str(exc)) from exc


def read_any(source_path: str, record_id: str, policy=None) -> Record:
    """The whole of a record as one `Record` (for short records and training code)."""
    with open_any(source_path, record_id, policy) as reader:
        return reader.record()


def _tokenize_window(
    chunk: Record, tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Beats, flags, words, rhythm words and atrial words (None for a tokenizer without
    atrial words) of one read window (indices local to it)."""
    from ecgtok.transforms.beats import FLAG_NOISE_MASK

    r_peaks, flags = find_beats(chunk)
    try:
        noisy = (flags & FLAG_NOISE_MASK) != 0 if flags.size else np.zeros(0, dtype=bool)
        words, rhythm, atrial = tokenizer.encode_beats(chunk.signal, chunk.fs, r_peaks, noisy)
    except Exception as exc:
        raise RecordError("tokenize", type(exc).__name__, str(exc)) from exc
    return r_peaks, flags, words, rhythm, atrial


def _segment(reader, start: int, end: int, peaks, flags, words, rhythm, atrial, tokenizer, extra):
    return Segment(
        record_id=reader.record_id,
        start_sample=int(start),
        n_samples=int(end - start),
        fs=float(reader.fs),
        lead_names=list(reader.lead_names),
        original_lead_names=list(reader.original_lead_names),
        r_peaks=peaks,
        beat_flags=flags,
        words=words,
        rhythm=rhythm,
        atrial=atrial,
        tokenizer_id=tokenizer.tokenizer_id,
        source_path=reader.source_path,
        meta=reader.meta or {},
        extra=dict(extra or {}),
    )


def reader_segments(
    reader, tokenizer: Tokenizer, segment_s: float = DEFAULT_SEGMENT_S, extra: dict | None = None
) -> list[Segment]:
    """Token rows as arrays, one per segment, streaming the record through `reader`."""
    fs, n = float(reader.fs), int(reader.n_samples)
    context = int(round(CONTEXT_S * fs))
    refractory = int(round(REFRACTORY_S * fs))
    last_kept = -(10**18)
    segments = []
    for start, end in segment_bounds(n, fs, segment_s):
        lo, hi = max(0, start - context), min(n, end + context)
        chunk = reader.record(lo, hi)
        peaks, flags, words, rhythm, atrial = _tokenize_window(chunk, tokenizer)
        peaks = peaks + lo
        keep = (peaks >= start) & (peaks < end) & (peaks > last_kept + refractory)
        if keep.any():
            last_kept = int(peaks[keep][-1])
        segments.append(
            _segment(
                reader,
                start,
                end,
                peaks[keep],
                flags[keep],
                words[:, keep],
                rhythm[keep],
                None if atrial is None else atrial[:, keep],
                tokenizer,
                extra,
            )
        )
    return segments


def tokenize_reader(
    reader, tokenizer: Tokenizer, segment_s: float = DEFAULT_SEGMENT_S, extra: dict | None = None
) -> list[dict]:
    """Token rows, one per segment, streaming the record through `reader`."""
    return [segment_row(s) for s in reader_segments(reader, tokenizer, segment_s, extra)]


_BLAS_LIMIT = None


def one_blas_thread() -> None:
    """Limit NumPy/SciPy's OpenBLAS to one thread in this process (once; idempotent).

    Records are processed in parallel by Beam's workers and their guarded children; a
    record's only BLAS call is the codebook assignment, a product of a few hundred beats
    by the codebook. With OpenBLAS's default of one thread per core, that product took
    12-24 ms on a busy 2-core machine (its threads spin against the other workers)
    instead of 0.1 ms: the largest single cost of a record. Only OpenBLAS is limited
    (torch's own thread pools are left alone); results do not change.
    """
    global _BLAS_LIMIT
    if _BLAS_LIMIT is not None:
        return
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS, so it is limited too)
        from threadpoolctl import ThreadpoolController

        _BLAS_LIMIT = ThreadpoolController().select(internal_api="openblas").limit(limits=1)
    except Exception:  # threadpoolctl missing, or a library it cannot drive: keep defaults
        _BLAS_LIMIT = False


def warm_up() -> None:
    """Do now what a process's first record would do lazily: import SciPy's signal and
    ndimage (the detector, beat quality), wfdb's header grammar (wfdb imports pandas),
    the export readers, and limit BLAS to one thread. About 1.4 s on this project's 2-core
    host; the forkserver of the guarded children (`transforms/_child_preload.py`) pays it
    once, while the launcher is still starting the job, and every child inherits it.
    """
    # BLAS first, as `tokenize_record` does: SciPy's modules start OpenBLAS's threads
    # when they load, and under a tight --record_memory_mb those threads cannot start.
    one_blas_thread()
    import wfdb.io.header  # noqa: F401

    import ecgtok.transforms.beats  # noqa: F401
    import ecgtok.transforms.formats.deid  # noqa: F401
    import ecgtok.transforms.qrs  # noqa: F401


def _on_reader(source_path: str, record_id: str, policy, work):
    """`work(reader)` on the opened record; a failure is a RecordError naming the stage
    (opening and reading: "read"; the later stages name themselves)."""
    one_blas_thread()
    with open_any(source_path, record_id, policy) as reader:
        return _named(work, reader)


def _named(work, *args):
    """work(*args), with an unexpected exception turned into a RecordError of stage
    "read" (RecordError, transient I/O errors and MemoryError pass as they are)."""
    try:
        return work(*args)
    except (RecordError, *TRANSIENT_ERRORS, MemoryError):
        raise
    except Exception as exc:
        raise RecordError("read", type(exc).__name__, str(exc)) from exc


def record_segments(
    source_path: str,
    record_id: str,
    tokenizer: Tokenizer,
    segment_s: float = DEFAULT_SEGMENT_S,
    extra: dict | None = None,
    policy=None,
) -> list[Segment]:
    """Open, read, find beats and tokenize one record: its rows as arrays. Raises
    RecordError naming the stage."""
    return _on_reader(
        source_path,
        record_id,
        policy,
        lambda reader: reader_segments(reader, tokenizer, segment_s, extra),
    )


def tokenize_record(
    source_path: str,
    record_id: str,
    tokenizer: Tokenizer,
    segment_s: float = DEFAULT_SEGMENT_S,
    extra: dict | None = None,
    policy=None,
) -> list[dict]:
    """Open, read, find beats and tokenize one record: its token rows. Raises RecordError
    naming the stage."""
    segments = record_segments(source_path, record_id, tokenizer, segment_s, extra, policy)
    return [segment_row(s) for s in segments]


# Events of `tokenize_batch`, each (kind, indices into the batch, payload).
START = "start"  # work on these records begins (payload None)
FAILED = "failed"  # this one record failed (payload: the exception)
ROWS = "rows"  # the rows of these records (payload: one pyarrow.Table)


# A record of at most this many values (samples x leads) that is one segment is read
# whole and tokenized together with the batch's other records of its shape: about 80 s
# of 12-lead ECG at 500 Hz, so a batch of them stays a few tens of MB.
BATCH_MAX_VALUES = 1_000_000
# Records of one shape tokenized together: more saves less per-call cost but spills
# the stacked signals out of the core's cache (a 10 s 12-lead record at 500 Hz: 3.9 ms a
# record alone, 3.7-3.9 ms in 6-8, 4.3 ms in 16).
GROUP_RECORDS = 8


def _split(items: list, most: int) -> list[list]:
    """`items` in consecutive runs of at most `most`, of sizes as equal as can be."""
    n_runs = -(-len(items) // most)
    size = -(-len(items) // max(n_runs, 1))
    return [items[a : a + size] for a in range(0, len(items), size)]


def _batchable(reader, segment_s: float) -> bool:
    n = int(reader.n_samples)
    one_segment = n <= max(1, int(round(segment_s * float(reader.fs))))
    return n > 0 and one_segment and n * len(reader.lead_names) <= BATCH_MAX_VALUES


def _read_short(reader, tokenizer: Tokenizer, segment_s: float, extra) -> Record | list:
    """A short record read whole (a `Record`, to tokenize with others of its shape), or,
    if it holds non-finite samples (which take other branches in the filters), its
    segments, tokenized now."""
    record = reader.record()
    if np.isfinite(record.signal).all():
        return record
    return reader_segments(_InMemoryReader(record), tokenizer, segment_s, extra)


def _same_shape_segments(
    records: list[Record], tokenizer: Tokenizer, extras: list[dict]
) -> list[Segment]:
    """The one segment of each of several whole records of one shape and rate, every
    stage run once for all of them: the same rows as one record at a time."""
    from ecgtok.transforms.beats import FLAG_NOISE_MASK, beat_quality_many
    from ecgtok.transforms.qrs import detect_r_peaks_stacked, lead_major_stack

    fs = records[0].fs
    signals = [r.signal for r in records]
    stack = lead_major_stack(signals)  # one transposed copy for detection and quality
    peaks = [np.asarray(p, dtype=np.int64) for p in detect_r_peaks_stacked(stack, fs)]
    flags = [np.asarray(f, dtype=np.uint8) for f in beat_quality_many(stack, fs, peaks)]
    noisy = [(f & FLAG_NOISE_MASK) != 0 for f in flags]
    encoded = tokenizer.encode_beats_many(signals, fs, peaks, noisy)
    return [
        _segment(_InMemoryReader(rec), 0, rec.signal.shape[0], p, f, *enc, tokenizer, extra)
        for rec, p, f, enc, extra in zip(records, peaks, flags, encoded, extras)
    ]


def tokenize_batch(requests: list[tuple], tokenizer: Tokenizer, policy=None):
    """Tokenize a batch of (source_path, record_id, segment_s, extra) requests.

    Yields events (kind, indices, payload): START before records are worked on, so a
    guard that sees the process hang or die knows which did it; FAILED with the
    exception of each record that failed (a RecordError naming the stage; MemoryError as
    a RecordError of stage "limits"; a transient I/O error as it is, for the runner to
    retry); ROWS with one table (token schema) of the rows of a long record as soon as it
    is done, and last, ROWS with one table of every other record's rows. A record's rows
    are only sent once it has succeeded, so it never has both.

    Short records (see `BATCH_MAX_VALUES`) are read first, then tokenized together with
    the batch's other records of the same shape and rate, each stage called once for
    all of them; if that fails, each is tokenized alone, so an error lands on its own
    record. Other records are tokenized one at a time, as they are read.
    """
    one_blas_thread()  # before pyarrow loads (see token_table._arrow)
    done: list[int] = []
    segments: list[Segment] = []
    # (rate, shape) -> [(index, record, segment_s, extra)] of the short records read whole
    groups: dict[tuple, list[tuple]] = {}
    # Reading short records is quick: one START covers every record not yet read, so the
    # guard hears one message for the run, not one a record (~70 us of the launcher's
    # time each). A long record tokenized as it is read gets its own START, and the
    # records after it another.
    yield START, list(range(len(requests))), None
    for index, (path, record_id, segment_s, extra) in enumerate(requests):
        reader = _outcome(open_any, path, record_id, policy)
        if isinstance(reader, Exception):
            yield FAILED, [index], reader
            continue
        long = False
        with reader:
            if _batchable(reader, segment_s):
                got = _outcome(_named, _read_short, reader, tokenizer, segment_s, extra)
            else:
                long = True
                yield START, [index], None
                got = _outcome(_named, reader_segments, reader, tokenizer, segment_s, extra)
                if index + 1 < len(requests):
                    yield START, list(range(index + 1, len(requests))), None
        if isinstance(got, Exception):
            yield FAILED, [index], got
        elif isinstance(got, Record):
            groups.setdefault((float(got.fs), got.signal.shape), []).append(
                (index, got, segment_s, extra)
            )
        elif long:  # its rows at once: a batch of 24 h Holters must not pile up in memory
            yield ROWS, [index], _table(got)
        else:
            segments += got
            done.append(index)
    for members in (g for group in groups.values() for g in _split(group, GROUP_RECORDS)):
        indices = [m[0] for m in members]
        if len(members) > 1:
            yield START, indices, None
            got = _outcome(
                _same_shape_segments,
                [m[1] for m in members],
                tokenizer,
                [m[3] for m in members],
            )
            if not isinstance(got, Exception):
                segments += got
                done += indices
                continue
        for index, record, segment_s, extra in members:  # alone (or again, alone)
            yield START, [index], None
            got = _outcome(_tokenized_whole, record, tokenizer, segment_s, extra)
            if isinstance(got, Exception):
                yield FAILED, [index], got
            else:
                segments += got
                done.append(index)
    if done:
        yield ROWS, done, _table(segments)


def _table(segments: list[Segment]):
    from ecgtok.transforms.token_table import segments_table

    return segments_table(segments)


def _outcome(work, *args):
    """work(*args), or the exception it raised (MemoryError as a "limits" RecordError)."""
    try:
        return work(*args)
    except MemoryError:
        return RecordError("limits", "out_of_memory", "record needs more memory than allowed")
    except Exception as exc:
        return exc


def _tokenized_whole(
    record: Record, tokenizer: Tokenizer, segment_s: float, extra: dict
) -> list[Segment]:
    """The segments of one whole record already read (one of a batch's short records),
    as `record_segments` makes them."""
    return _named(reader_segments, _InMemoryReader(record), tokenizer, segment_s, extra)
