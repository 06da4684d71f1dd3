"""One record to its token rows: read, find beats, tokenize, cut into segments.

Plain Python over NumPy, no Beam: the Beam wrapper (`transforms/stages.py`) calls
`tokenize_record` once per record and turns a `RecordError` into an error row.
"""

from __future__ import annotations

import numpy as np
from ecgtok.models.tokenizer import Tokenizer, build_sentence
from ecgtok.transforms.errors import TRANSIENT_ERRORS, RecordError
from ecgtok.transforms.wfdb_reader import Record, read_record

DEFAULT_SEGMENT_S = 300.0


def find_beats(record: Record) -> tuple[np.ndarray, np.ndarray]:
    """R peaks (int64, original rate) and per-beat quality flags (uint8) of a record."""
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


def _meta_columns(record: Record) -> dict:
    meta = record.meta or {}
    return {
        "age": meta.get("age"),
        "sex": meta.get("sex"),
        "dx": [str(c) for c in meta.get("dx", [])],
        "patient_key": meta.get("patient_key"),
    }


def token_rows(
    record: Record,
    r_peaks: np.ndarray,
    flags: np.ndarray,
    tokenizer: Tokenizer,
    segment_s: float = DEFAULT_SEGMENT_S,
    extra: dict | None = None,
) -> list[dict]:
    """Tokenize a record whose beats are known, one row per segment."""
    from ecgtok.transforms.beats import FLAG_NOISE_MASK

    try:
        noisy = (flags & FLAG_NOISE_MASK) != 0 if flags.size else np.zeros(0, dtype=bool)
        words, rhythm = tokenizer.encode(record.signal, record.fs, r_peaks, noisy)
    except Exception as exc:
        raise RecordError("tokenize", type(exc).__name__, str(exc)) from exc
    rows = []
    n = record.signal.shape[0]
    for start, end in segment_bounds(n, record.fs, segment_s):
        sel = (r_peaks >= start) & (r_peaks < end)
        seg_words = words[:, sel]
        seg_rhythm = rhythm[sel]
        sentence, s_lead, s_beat = build_sentence(seg_words, seg_rhythm)
        rows.append(
            {
                "record_id": record.record_id,
                "start_sample": int(start),
                "n_samples": int(end - start),
                "fs": float(record.fs),
                "lead_names": list(record.lead_names),
                "original_lead_names": list(record.original_lead_names),
                "r_peaks": r_peaks[sel].astype(np.int64).tolist(),
                "beat_flags": flags[sel].astype(np.int32).tolist(),
                "tokens": seg_words.astype(np.int32).tolist(),
                "rhythm": seg_rhythm.astype(np.int32).tolist(),
                "sentence": sentence.tolist(),
                "sentence_lead": s_lead.astype(np.int32).tolist(),
                "sentence_beat": s_beat.tolist(),
                "tokenizer_id": tokenizer.tokenizer_id,
                "source_path": record.source_path,
                **_meta_columns(record),
                **(extra or {}),
            }
        )
    return rows


def read_any(source_path: str, record_id: str) -> Record:
    """A WFDB record, or a hospital export (MUSE, aECG, Philips, DICOM, SCP, ISHNE)."""
    from ecgtok.transforms.formats import is_export_file, read_export
    from ecgtok.transforms.formats.deid import DeidPolicy

    if is_export_file(source_path):
        # The pseudonym key reaches workers through the environment, never the graph.
        return read_export(source_path, record_id, DeidPolicy.from_env())
    return read_record(source_path, record_id)


def tokenize_record(
    source_path: str,
    record_id: str,
    tokenizer: Tokenizer,
    segment_s: float = DEFAULT_SEGMENT_S,
    extra: dict | None = None,
) -> list[dict]:
    """Read, find beats and tokenize one record. Raises RecordError naming the stage."""
    try:
        record = read_any(source_path, record_id)
    except (RecordError, *TRANSIENT_ERRORS):
        raise
    except Exception as exc:
        raise RecordError("read", type(exc).__name__, str(exc)) from exc
    r_peaks, flags = find_beats(record)
    return token_rows(record, r_peaks, flags, tokenizer, segment_s, extra)
