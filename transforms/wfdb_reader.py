"""Read one WFDB record, local or on any Beam filesystem (gs://, ...), into a `Record`.

Decoding is wfdb-python's: it knows every WFDB format. What this module adds is what a
pipeline needs around it:

* every file of a record is checked (present, inside the record's folder, long enough
  for the samples the header declares) *before* any sample is decoded, so a truncated
  file becomes an error, never a partial record, and never a huge allocation;
* records on a non-local filesystem are read through Beam's `FileSystems`: only the
  files of that one record are staged in a private temporary folder, never the archive;
* samples come out as float32 millivolts, with lead names normalised and kept.
"""

from __future__ import annotations

import math
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.leads import normalise_lead_name

STAGE = "read"
MIN_FS, MAX_FS = 50.0, 20_000.0

# Bytes per sample for each fixed-width WFDB format (numerator, denominator).
_FORMAT_BYTES = {
    "8": (1, 1),
    "16": (2, 1),
    "24": (3, 1),
    "32": (4, 1),
    "61": (2, 1),
    "80": (1, 1),
    "160": (2, 1),
    "212": (3, 2),
    "310": (4, 3),
    "311": (4, 3),
}
_FLAC_FORMATS = {"508", "516", "524"}
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


@dataclass
class Record:
    """One decoded recording. `signal` is (samples, leads), float32, in mV."""

    record_id: str
    source_path: str
    fs: float
    signal: np.ndarray
    lead_names: list[str]
    original_lead_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _strip_ext(hea_path: str) -> str:
    if not hea_path.endswith(".hea"):
        raise RecordError(STAGE, "not_a_header", f"{hea_path} is not a .hea header path")
    return hea_path[: -len(".hea")]


def _safe_member(folder: str, name: str) -> str:
    """Resolve a file name from a header inside `folder`; refuse any that escapes it."""
    if not name or name.startswith(("/", "\\")) or "://" in name:
        raise RecordError(STAGE, "unsafe_path", f"file name {name!r} in header is not relative")
    parts = name.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts) or os.path.isabs(name):
        raise RecordError(STAGE, "unsafe_path", f"file name {name!r} escapes the record's folder")
    return posixpath.join(folder, name) if not _is_local(folder) else os.path.join(folder, name)


def _rdheader(base: str):
    import wfdb

    try:
        return wfdb.rdheader(base)
    except FileNotFoundError as exc:
        raise RecordError(STAGE, "missing_file", f"header not found: {exc}") from exc
    except Exception as exc:  # wfdb raises many kinds for a malformed header
        raise RecordError(
            STAGE, "bad_header", f"header could not be parsed: {type(exc).__name__}: {exc}"
        ) from exc


def _check_rate(header, where: str) -> None:
    fs = header.fs
    if fs is None or not math.isfinite(float(fs)) or float(fs) <= 0:
        raise RecordError(STAGE, "bad_sampling_rate", f"{where}: sampling rate {fs!r} is not valid")
    spf = [s or 1 for s in (getattr(header, "samps_per_frame", None) or [1])]
    for s in set(spf):
        eff = float(fs) * s
        if not (MIN_FS <= eff <= MAX_FS):
            raise RecordError(
                STAGE,
                "bad_sampling_rate",
                f"{where}: effective rate {eff:g} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz",
            )


def _expected_bytes(header, file_name: str) -> int | None:
    """Bytes the samples of `file_name` need, from the header; None when not knowable."""
    idx = [i for i, f in enumerate(header.file_name) if f == file_name]
    fmts = {header.fmt[i] for i in idx}
    if len(fmts) != 1 or header.sig_len is None:
        return None
    fmt = fmts.pop()
    if fmt not in _FORMAT_BYTES:
        return None
    num, den = _FORMAT_BYTES[fmt]
    spf = sum((header.samps_per_frame[i] or 1) for i in idx)
    offset = (header.byte_offset[idx[0]] or 0) if header.byte_offset else 0
    return offset + math.ceil(header.sig_len * spf * num / den)


def check_signal_files(header, folder: str, size_of) -> None:
    """Raise a RecordError unless every signal file exists, is safe and is long enough."""
    if header.n_sig == 0 or not header.file_name:
        raise RecordError(STAGE, "no_signals", "header declares no signals")
    if header.sig_len is not None and header.sig_len <= 0:
        raise RecordError(STAGE, "empty_record", f"header declares {header.sig_len} samples")
    for fmt in set(header.fmt):
        if fmt not in _FORMAT_BYTES and fmt not in _FLAC_FORMATS:
            raise RecordError(
                STAGE, "unsupported_format", f"signal format {fmt!r} is not supported"
            )
    for name in dict.fromkeys(header.file_name):
        path = _safe_member(folder, name)
        size = size_of(path)
        if size is None:
            raise RecordError(STAGE, "missing_signal_file", f"signal file {name} is missing")
        need = _expected_bytes(header, name)
        if need is not None and size < need:
            raise RecordError(
                STAGE,
                "truncated_signal_file",
                f"signal file {name} holds {size} bytes; the header needs {need}",
            )


def _local_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _remote_size(path: str) -> int | None:
    from apache_beam.io.filesystems import FileSystems

    try:
        found = FileSystems.match([path])[0].metadata_list
    except Exception:
        return None
    return found[0].size_in_bytes if found else None


def _stage_remote(hea_path: str, workdir: str) -> str:
    """Copy one record's header, segment headers and signal files to `workdir`."""
    from apache_beam.io.filesystems import FileSystems

    folder = posixpath.dirname(hea_path)

    def fetch(remote: str) -> str:
        local = os.path.join(workdir, posixpath.basename(remote))
        try:
            with FileSystems.open(remote, mime_type="application/octet-stream") as src:
                with open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as exc:
            raise RecordError(STAGE, "missing_file", f"cannot read {remote}: {exc}") from exc
        return local

    local_hea = fetch(hea_path)
    header = _rdheader(local_hea[:-4])
    headers = [header]
    if getattr(header, "seg_name", None):
        for seg in header.seg_name:
            if seg and seg != "~":
                fetch(_safe_member(folder, seg + ".hea"))
                headers.append(_rdheader(os.path.join(workdir, seg)))
    for h in headers:
        if getattr(h, "file_name", None):
            check_signal_files(h, folder, _remote_size)
            for name in dict.fromkeys(h.file_name):
                fetch(_safe_member(folder, name))
    return local_hea


def parse_comments(comments: list[str]) -> dict:
    """Age, sex and diagnosis codes from Challenge-style header comments (#Age: 54 ...)."""
    meta: dict = {"age": None, "sex": None, "dx": []}
    for line in comments or []:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "age":
            try:
                age = float(value)
                meta["age"] = age if math.isfinite(age) else None
            except ValueError:
                pass
        elif key == "sex":
            meta["sex"] = value or None
        elif key == "dx":
            meta["dx"] = [c.strip() for c in value.split(",") if c.strip()]
    return meta


def _to_mv(signal: np.ndarray, units: list[str] | None) -> np.ndarray:
    for i, unit in enumerate(units or []):
        scale = _UNIT_TO_MV.get((unit or "mV").strip().lower(), 1.0)
        if scale != 1.0:
            signal[:, i] *= scale
    return signal


def _decode_local(base: str, header) -> tuple[np.ndarray, object]:
    import wfdb

    folder = os.path.dirname(base) or "."
    if getattr(header, "seg_name", None):
        for seg in header.seg_name:
            if seg and seg != "~":
                seg_header = _rdheader(_safe_member(folder, seg))
                _check_rate(seg_header, f"segment {seg}")
                if getattr(seg_header, "file_name", None):
                    check_signal_files(seg_header, folder, _local_size)
    else:
        check_signal_files(header, folder, _local_size)
    try:
        rec = wfdb.rdrecord(base, physical=True, m2s=True, smooth_frames=True, return_res=32)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(
            STAGE, "decode_failed", f"signal could not be decoded: {type(exc).__name__}: {exc}"
        ) from exc
    signal = rec.p_signal
    if signal is None or signal.ndim != 2 or signal.shape[0] == 0:
        raise RecordError(STAGE, "empty_record", "record holds no samples")
    if header.sig_len and signal.shape[0] != header.sig_len:
        raise RecordError(
            STAGE,
            "length_mismatch",
            f"decoded {signal.shape[0]} samples; the header declares {header.sig_len}",
        )
    return signal, rec


def read_record(hea_path: str, record_id: str | None = None) -> Record:
    """Read the record whose header is `hea_path` (local path or any Beam filesystem URL)."""
    base = _strip_ext(hea_path)
    workdir = None
    try:
        if not _is_local(hea_path):
            workdir = tempfile.mkdtemp(prefix="ecgtok-")
            base = _stage_remote(hea_path, workdir)[:-4]
        elif hea_path.startswith("file://"):
            base = base[len("file://") :]
        header = _rdheader(base)
        _check_rate(header, "record")
        signal, rec = _decode_local(base, header)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    signal = np.nan_to_num(signal.astype(np.float32, copy=False), nan=0.0)
    signal = _to_mv(signal, rec.units)
    original = [str(n) for n in (rec.sig_name or [f"ch{i}" for i in range(signal.shape[1])])]
    return Record(
        record_id=record_id or os.path.basename(base),
        source_path=hea_path,
        fs=float(rec.fs),
        signal=signal,
        lead_names=[normalise_lead_name(n) for n in original],
        original_lead_names=original,
        meta=parse_comments(rec.comments),
    )
