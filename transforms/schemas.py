"""The output contract: one Arrow schema per output folder (tokens, scores, errors).

Manifest columns (other than `path`) are appended to the token and score schemas as
strings, so a cohort's own ids travel with every row.
"""

from __future__ import annotations

import pyarrow as pa

# From labels, not model: importing torch would cost every tokenize launch ~2 s.
from ecgtok.models.labels import HEADS

TOKEN_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("start_sample", pa.int64(), nullable=False),
    pa.field("n_samples", pa.int64()),
    pa.field("fs", pa.float64()),
    pa.field("lead_names", pa.list_(pa.string())),
    pa.field("original_lead_names", pa.list_(pa.string())),
    pa.field("r_peaks", pa.list_(pa.int64())),
    pa.field("beat_flags", pa.list_(pa.int32())),
    pa.field("tokens", pa.list_(pa.list_(pa.int32()))),
    # Per lead, one atrial word per beat; empty for tokenizers without atrial words.
    pa.field("atrial_tokens", pa.list_(pa.list_(pa.int32()))),
    pa.field("rhythm", pa.list_(pa.int32())),
    pa.field("sentence", pa.list_(pa.int32())),
    pa.field("sentence_lead", pa.list_(pa.int32())),
    pa.field("sentence_beat", pa.list_(pa.int32())),
    pa.field("tokenizer_id", pa.string()),
    pa.field("source_path", pa.string()),
    pa.field("age", pa.float64()),
    pa.field("sex", pa.string()),
    pa.field("dx", pa.list_(pa.string())),
    # Keyed pseudonym of the patient (hospital exports with a site key); never an MRN.
    pa.field("patient_key", pa.string()),
]

SCORE_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("start_sample", pa.int64(), nullable=False),
    pa.field("model_id", pa.string()),
    *[pa.field(h, pa.float32()) for h in HEADS],
    pa.field("n_beats", pa.int64()),
    pa.field("embedding", pa.list_(pa.float32())),
    # Rows longer than ~1.5 min (Holter segments): the fraction of the row's time in AF
    # episodes, and the episodes (R peak to R peak, samples at the record's rate); null
    # and empty for short rows.
    pa.field("af_burden", pa.float32()),
    pa.field(
        "af_episodes",
        pa.list_(
            pa.struct([pa.field("start_sample", pa.int64()), pa.field("end_sample", pa.int64())])
        ),
    ),
]

ERROR_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("source_path", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
]


FIXED_NAMES = {f.name for f in TOKEN_FIELDS + SCORE_FIELDS + ERROR_FIELDS}


def extra_field_names(columns: list[str]) -> list[str]:
    """Output names of manifest columns: one that clashes with a fixed column gets a prefix."""
    return [f"manifest_{c}" if c in FIXED_NAMES else c for c in columns]


def _with_extra(fields: list[pa.Field], extra: list[str], metadata: dict | None) -> pa.Schema:
    more = [pa.field(name, pa.string()) for name in extra_field_names(extra)]
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return pa.schema(fields + more, metadata=meta or None)


def token_schema(extra: list[str] = (), metadata: dict | None = None) -> pa.Schema:
    return _with_extra(TOKEN_FIELDS, list(extra), metadata)


def score_schema(extra: list[str] = (), metadata: dict | None = None) -> pa.Schema:
    return _with_extra(SCORE_FIELDS, list(extra), metadata)


def error_schema(metadata: dict | None = None) -> pa.Schema:
    return _with_extra(ERROR_FIELDS, [], metadata)
