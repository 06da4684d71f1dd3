"""EDF and EDF+ (continuous) files as WFDB-like headers, so one decoder reads both.

An EDF file is a header followed by data records; each data record holds, for each
signal in turn, that signal's samples for the record's duration as 16-bit little-endian
integers. That is exactly a WFDB format-16 signal file whose frames are EDF data records
and whose samples per frame are each signal's samples per record, with the byte offset
at the end of the EDF header. `parse_edf_header` returns that description as a
`Header`; the WFDB decoder does the rest. EDF+ annotation channels are kept in the
header (they occupy bytes in every data record) and dropped from the decoded output.
"""

from __future__ import annotations

import math
import re

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.wfdb_formats import Header, SignalSpec

STAGE = "read"
ANNOTATION_LABEL = "edf annotations"


def _bad(message: str) -> RecordError:
    return RecordError(STAGE, "bad_header", message)


def _field(raw: bytes, start: int, width: int) -> str:
    return raw[start : start + width].decode("latin-1").strip()


def _num(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise _bad(f"EDF {what} {text!r} is not a number") from exc
    if not math.isfinite(value):
        raise _bad(f"EDF {what} {text!r} is not finite")
    return value


def edf_header_size(first256: bytes) -> int:
    """Total header bytes (256 + 256 per signal), read from the fixed part."""
    if len(first256) < 256:
        raise _bad("EDF file is shorter than its 256-byte fixed header")
    return int(_num(_field(first256, 184, 8), "header size"))


def parse_edf_header(raw: bytes, file_name: str, file_size: int) -> Header:
    """Describe an EDF file as a single-segment WFDB header over format 16."""
    if len(raw) < 256:
        raise _bad("EDF file is shorter than its 256-byte fixed header")
    version = raw[:8]
    if version[:1] == b"\xff":
        raise RecordError(STAGE, "unsupported_format", "BDF (24-bit EDF) is not supported")
    if version.strip() != b"0":
        raise _bad(f"not an EDF file (version field {version!r})")
    reserved = _field(raw, 192, 44)
    if reserved.startswith("EDF+D"):
        raise RecordError(
            STAGE, "unsupported_format", "EDF+D (discontinuous) recordings are not supported"
        )
    header_bytes = int(_num(_field(raw, 184, 8), "header size"))
    n_records = int(_num(_field(raw, 236, 8), "number of data records"))
    duration = _num(_field(raw, 244, 8), "data record duration")
    ns = int(_num(_field(raw, 252, 4), "number of signals"))
    if ns <= 0 or header_bytes != 256 * (ns + 1):
        raise _bad(f"EDF header declares {ns} signals and {header_bytes} header bytes")
    if len(raw) < header_bytes:
        raise _bad("EDF header is truncated")

    def column(offset: int, width: int) -> list[str]:
        base = 256 + offset * ns
        return [_field(raw, base + i * width, width) for i in range(ns)]

    labels = column(0, 16)
    units = column(16 + 80, 8)
    pmin = [_num(v, "physical minimum") for v in column(16 + 80 + 8, 8)]
    pmax = [_num(v, "physical maximum") for v in column(16 + 80 + 16, 8)]
    dmin = [_num(v, "digital minimum") for v in column(16 + 80 + 24, 8)]
    dmax = [_num(v, "digital maximum") for v in column(16 + 80 + 32, 8)]
    spr = [int(_num(v, "samples per record")) for v in column(16 + 80 + 40 + 80, 8)]
    if all(is_annotation(label) for label in labels):
        raise RecordError(STAGE, "no_signals", "EDF file holds only annotation channels")
    if duration <= 0:
        raise RecordError(
            STAGE, "bad_sampling_rate", f"EDF data record duration {duration:g} s is not valid"
        )
    if any(s <= 0 for s in spr):
        raise _bad("EDF header declares a signal with no samples per data record")
    record_bytes = 2 * sum(spr)
    if n_records < 0:  # -1: unknown, still being recorded
        n_records = max(0, (file_size - header_bytes) // record_bytes)
    signals = []
    for i in range(ns):
        span_d, span_p = dmax[i] - dmin[i], pmax[i] - pmin[i]
        if span_d == 0 or span_p == 0:
            gain, baseline = 1.0, 0.0
        else:
            gain = span_d / span_p
            baseline = dmin[i] - pmin[i] * gain
        signals.append(
            SignalSpec(
                file_name=file_name,
                fmt="16",
                spf=spr[i],
                skew=0,
                byte_offset=header_bytes,
                gain=gain,
                baseline=baseline,
                units=units[i] or "mV",
                adc_res=16,
                adc_zero=0,
                init_value=0,
                name=labels[i] or f"ch{i}",
            )
        )
    header = Header(
        name=file_name.rsplit(".", 1)[0],
        n_sig=ns,
        fs=1.0 / duration,
        sig_len=n_records,
        signals=signals,
        comments=[],
    )
    header.comments = _patient_comments(_field(raw, 8, 80), reserved.startswith("EDF+"))
    return header


def is_annotation(name: str) -> bool:
    return name.strip().lower() == ANNOTATION_LABEL


_SEX = re.compile(r"^[MF]$")


def _patient_comments(patient: str, plus: bool) -> list[str]:
    """EDF+ patient field 'code sex birthdate name' -> a `Sex:` comment line."""
    if not plus:
        return []
    parts = patient.split()
    if len(parts) >= 2 and _SEX.match(parts[1]):
        return [f"Sex: {parts[1]}"]
    return []
