"""Read one WFDB (or EDF) record, local or on any Beam filesystem (gs://, ...).

`open_record(path)` parses the header(s) and checks every file and segment of the
record *before* any sample is decoded: present, inside the record's folder, long enough
for the samples the header declares, a supported format, a sane sampling rate. Any
problem is a `RecordError(stage, error_type, message)`; nothing is allocated for samples
a file does not hold. The returned `RecordReader` then decodes any sample range, so a
24-hour Holter can be read in chunks with bounded memory (`RecordReader.chunks`).
`read_record(path)` reads the whole record into a `Record`.

Decoding is native NumPy for the fixed-width WFDB formats (8, 16, 24, 32, 61, 80, 160,
212, 310, 311, and Challenge `.mat` files, which are format 16 after a byte offset), via
`soundfile` for FLAC (508, 516, 524), and EDF/EDF+ files are read as format 16. Files on
a non-local filesystem are read through Beam's `FileSystems`, byte ranges only, never
copied to local disk.

Output conventions:

* `signal` is (samples, leads) float32 in mV (voltage units converted; other units,
  such as mmHg, left as they are and named in `units`). Missing samples (WFDB's invalid
  value, or gaps between segments) are 0.
* Signals with several samples per frame: the record's rate is the highest effective
  rate (frame rate x samples per frame); slower signals are held sample-and-hold to it.
  Every signal's effective rate must lie in [50 Hz, 20 kHz].
* Multi-segment records are concatenated, mapping channels by name through the layout
  header (variable layout) or by position (fixed layout); nested masters work too.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ecgtok.transforms.edf import edf_header_size, is_annotation, parse_edf_header
from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.leads import normalise_lead_name
from ecgtok.transforms.wfdb_formats import (
    FLAC_FORMATS,
    INVALID,
    SUPPORTED_FORMATS,
    Header,
    SignalSpec,
    byte_range,
    bytes_for_samples,
    decode_flat,
    parse_header,
    samples_in_bytes,
)

STAGE = "read"
MIN_FS, MAX_FS = 50.0, 20_000.0
MAX_HEADER_BYTES = 16 << 20
MAX_TOTAL_SAMPLES = 1 << 40  # samples x leads; beyond this a length is absurd
MAX_NESTING = 4
SLAB_SAMPLES = 1 << 21
SEGMENT_THREADS = 8
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6, "kv": 1e6}


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
    units: list[str] = field(default_factory=list)
    start_sample: int = 0


# ------------------------------------------------------------------------ file access


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _dirname(path: str) -> str:
    return os.path.dirname(_local(path)) if _is_local(path) else posixpath.dirname(path)


def _basename(path: str) -> str:
    return os.path.basename(path) if _is_local(path) else posixpath.basename(path)


class _Files:
    """Sizes and byte ranges of a record's files, local or through Beam's FileSystems.

    On a remote filesystem a size costs a request, so the file is opened once: its size
    comes from the open reader (GCS fetches the object's metadata on open), and the
    reader is kept (a few at a time) for the byte ranges read later.
    """

    MAX_OPEN = 16

    def __init__(self) -> None:
        self._sizes: dict[str, int | None] = {}
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()  # segments of a remote record load in threads

    def size(self, path: str) -> int | None:
        if path not in self._sizes:
            self._sizes[path] = self._local_size(path) if _is_local(path) else self._remote(path)
        return self._sizes[path]

    @staticmethod
    def _local_size(path: str) -> int | None:
        try:
            st = os.stat(_local(path))
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def _remote(self, path: str) -> int | None:
        """Open a remote file, keep its reader, return its size (None when absent)."""
        try:
            f = self.open(path)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise _storage_error(exc, path) from exc
        try:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
        except Exception:
            f.close()
            from apache_beam.io.filesystems import FileSystems

            try:
                found = FileSystems.match([path])[0].metadata_list
            except Exception:
                return None
            return next((m.size_in_bytes for m in found if m.path == path), None)
        self._keep(path, f)
        return size

    def _keep(self, path: str, f) -> None:
        evicted = []
        with self._lock:
            while len(self._handles) >= self.MAX_OPEN:
                evicted.append(self._handles.pop(next(iter(self._handles))))
            old = self._handles.pop(path, None)
            if old is not None:
                evicted.append(old)
            self._handles[path] = f
        for g in evicted:
            g.close()

    def open(self, path: str):
        """A new reader (the caller closes it)."""
        if _is_local(path):
            return open(_local(path), "rb")
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        return FileSystems.open(
            path,
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,
        )

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            f = self._handles.pop(path, None)
        try:
            if f is None:
                f = self.open(path)
            f.seek(offset)
            data = f.read() if length is None else f.read(length)
        except Exception as exc:
            if f is not None:
                f.close()
            if _is_local(path) or isinstance(exc, RecordError):
                raise
            raise _storage_error(exc, path) from exc
        if _is_local(path):
            f.close()
        else:
            self._keep(path, f)
        return data

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for f in handles:
            f.close()


def _not_found(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    try:
        from google.api_core.exceptions import NotFound
    except ImportError:  # pragma: no cover - no GCP libraries
        NotFound = ()  # noqa: N806
    if NotFound and isinstance(exc, NotFound):
        return True
    details = getattr(exc, "exception_details", None)  # Beam's BeamIOError
    if isinstance(details, dict) and details:
        return all(_not_found(e) for e in details.values() if isinstance(e, BaseException))
    return False


def _storage_error(exc: BaseException, path: str) -> Exception:
    """An error from the storage layer: access refused or a client error is the record's
    (an error row); anything else (5xx, timeouts, a dropped connection) is transient,
    raised as ConnectionError so the runner retries instead of writing an error row."""
    try:
        from google.api_core import exceptions as gexc
    except ImportError:  # pragma: no cover - no GCP libraries
        gexc = None
    if gexc is not None:
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return RecordError(STAGE, "access_denied", f"cannot read {path}: {exc}")
        if isinstance(exc, gexc.ClientError) and not isinstance(exc, gexc.TooManyRequests):
            return RecordError(STAGE, "read_failed", f"cannot read {path}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return exc if isinstance(exc, Exception) else ConnectionError(str(exc))
    return ConnectionError(f"storage failure reading {path}: {type(exc).__name__}: {exc}")


_TRANSIENT = (ConnectionError, TimeoutError)


def _safe_member(folder: str, name: str) -> str:
    """Resolve a file name from a header inside `folder`; refuse any that escapes it."""
    if not name or name.startswith(("/", "\\", "~")) or "://" in name or ":" in name:
        raise RecordError(STAGE, "unsafe_path", f"file name {name!r} in header is not relative")
    parts = name.replace("\\", "/").split("/")
    if any(p in ("..", ".", "") for p in parts) or os.path.isabs(name):
        raise RecordError(STAGE, "unsafe_path", f"file name {name!r} escapes the record's folder")
    if _is_local(folder):
        return os.path.join(_local(folder), *parts)
    return posixpath.join(folder, *parts)


_AFFINE_FRAMES = 64  # frames per row of the reshaped view in `_affine_columns`


def _affine_columns(x: np.ndarray, base: np.ndarray, factor: np.ndarray) -> None:
    """x[:, j] = (x[:, j] - base[j]) * factor[j] in place, for C-contiguous (n, c) float32.

    Broadcasting (c,) over (n, c) runs NumPy's inner loop on c = 12 values at a time,
    5,000 times for a 10 s record at 500 Hz (~0.15 ms for the two operations); viewed as
    rows of _AFFINE_FRAMES frames against the parameters tiled as often, the same
    element-wise operations run in long loops (~2x faster).
    """
    n, c = x.shape
    k = _AFFINE_FRAMES
    m = n - n % k
    if m:
        block = x[:m].reshape(m // k, k * c)
        block -= np.tile(base, k)
        block *= np.tile(factor, k)
    if m < n:
        x[m:] -= base
        x[m:] *= factor


@lru_cache(maxsize=1024)
def _lead_name(name: str) -> str:
    """`normalise_lead_name`, remembered: archives repeat the same dozen names, and the
    regular expressions cost ~6 us a name (~70 us a 12-lead record)."""
    return normalise_lead_name(name)


def _unit_scale(units: str) -> tuple[float, str]:
    """Factor to mV for a voltage unit (and the unit after conversion)."""
    scale = _UNIT_TO_MV.get((units or "mV").strip().lower())
    return (scale, "mV") if scale is not None else (1.0, units)


# ----------------------------------------------------------------------------- sources


def _expand(samples: np.ndarray, spf: int, m: int) -> np.ndarray:
    """Hold a signal with `spf` samples per frame to `m` samples per frame."""
    if spf == m:
        return samples
    if m % spf == 0:
        return np.repeat(samples, m // spf)
    n_frames = len(samples) // spf
    idx = (np.arange(n_frames * m, dtype=np.int64) * spf) // m
    return samples[idx]


@dataclass
class _DatFile:
    """The signals one signal file holds, in header order."""

    name: str
    path: str
    fmt: str
    byte_offset: int
    channels: list[int]  # indices into the leaf's signal list
    spf: list[int]
    skew: list[int]

    @property
    def tspf(self) -> int:
        return sum(self.spf)


class _Leaf:
    """A single-segment record (or an EDF file): signal files over `n_frames` frames."""

    def __init__(self, header: Header, folder: str, files: _Files, where: str) -> None:
        self.header = header
        self.where = where
        self._files = files
        sigs = header.signals
        if not sigs:
            raise RecordError(STAGE, "no_signals", f"{where} declares no signals")
        groups: dict[str, _DatFile] = {}
        for i, s in enumerate(sigs):
            if s.fmt not in SUPPORTED_FORMATS:
                raise RecordError(
                    STAGE,
                    "unsupported_format",
                    f"{where}: signal format {s.fmt!r} ({s.name}) is not supported",
                )
            if s.file_name not in groups:
                groups[s.file_name] = _DatFile(
                    s.file_name, _safe_member(folder, s.file_name), s.fmt, s.byte_offset, [], [], []
                )
            g = groups[s.file_name]
            if s.fmt != g.fmt:
                raise RecordError(STAGE, "bad_header", f"{where}: file {s.file_name} mixes formats")
            g.channels.append(i)
            g.spf.append(s.spf)
            g.skew.append(s.skew)
        self.dat_files = list(groups.values())
        self._diff_state: dict[str, tuple[int, list[int]]] = {}
        self.keep = [i for i, s in enumerate(sigs) if not is_annotation(s.name)]
        if not self.keep:
            raise RecordError(STAGE, "no_signals", f"{where} holds only annotation channels")
        self.n_frames = header.sig_len if header.sig_len is not None else self._infer_len()
        if self.n_frames <= 0:
            raise RecordError(STAGE, "empty_record", f"{where} declares {self.n_frames} samples")
        self._check_files()

    # The names, units and samples per frame of the kept (output) channels.
    @property
    def names(self) -> list[str]:
        return [self.header.signals[i].name for i in self.keep]

    @property
    def units(self) -> list[str]:
        return [_unit_scale(self.header.signals[i].units)[1] for i in self.keep]

    def spfs(self) -> list[int]:
        return [self.header.signals[i].spf for i in self.keep]

    def rate_specs(self) -> list[tuple[str, float]]:
        return [
            (self.header.signals[i].name, self.header.fs * self.header.signals[i].spf)
            for i in self.keep
        ]

    def _infer_len(self) -> int:
        first = self.dat_files[0]
        size = self._files.size(first.path)
        if size is None:
            raise RecordError(STAGE, "missing_signal_file", f"signal file {first.name} is missing")
        if first.fmt in FLAC_FORMATS:
            return self._flac_frames(first)
        data = max(0, size - first.byte_offset)
        return samples_in_bytes(first.fmt, data) // first.tspf

    def _flac_frames(self, dat: _DatFile) -> int:
        import soundfile

        try:
            with self._files.open(dat.path) as fp, soundfile.SoundFile(fp) as sf:
                return (sf.frames - dat.byte_offset) // dat.spf[0]
        except Exception as exc:
            raise RecordError(
                STAGE, "bad_signal_file", f"FLAC file {dat.name} cannot be opened: {exc}"
            ) from exc

    def _check_files(self) -> None:
        for dat in self.dat_files:
            size = self._files.size(dat.path)
            if size is None:
                raise RecordError(
                    STAGE, "missing_signal_file", f"signal file {dat.name} is missing"
                )
            if dat.fmt in FLAC_FORMATS:
                if len(set(dat.spf)) != 1:
                    raise RecordError(
                        STAGE,
                        "unsupported_format",
                        f"FLAC file {dat.name} mixes samples per frame",
                    )
                have = self._flac_frames(dat)
                if have < self.n_frames:
                    raise RecordError(
                        STAGE,
                        "truncated_signal_file",
                        f"signal file {dat.name} holds {have} frames; the header needs "
                        f"{self.n_frames}",
                    )
                continue
            need = dat.byte_offset + bytes_for_samples(dat.fmt, self.n_frames * dat.tspf)
            if size < need:
                raise RecordError(
                    STAGE,
                    "truncated_signal_file",
                    f"signal file {dat.name} holds {size} bytes; the header's "
                    f"{self.n_frames} samples need {need}",
                )

    def read_into(self, out: np.ndarray, f0: int, f1: int, m: int, cols: list[int]) -> None:
        """Write frames [f0, f1), at `m` samples per frame, into out[:, cols[kept index]]."""
        col_of = {ch: cols[k] for k, ch in enumerate(self.keep)}
        sigs = self.header.signals
        for dat in self.dat_files:
            wanted = [c for c in dat.channels if col_of.get(c, -1) >= 0]
            if not wanted:
                continue
            max_skew = max(dat.skew)
            fe = min(f1 + max_skew, self.n_frames)
            fs0 = f0
            if dat.fmt == "8":  # differences: continue from the last frame decoded, or 0
                state = self._diff_state.get(dat.name)
                fs0 = state[0] if state is not None and state[0] <= f0 else 0
            invalid = INVALID[dat.fmt]
            if (
                m == 1
                and dat.fmt not in FLAC_FORMATS
                and dat.fmt != "8"
                and max_skew == 0
                and len(wanted) == len(dat.channels)
            ):
                # Fast path: one sample per frame, no skew: one vectorised conversion.
                frames = self._read_frames(dat, f0, f1)
                self._frames_to_physical(out, frames, dat, [col_of[c] for c in wanted], invalid)
                continue
            if dat.fmt in FLAC_FORMATS:
                per_channel = self._read_flac(dat, fs0, fe)
            else:
                per_channel = self._read_fixed(dat, fs0, fe)
            pos = {c: j for j, c in enumerate(dat.channels)}
            for c in wanted:
                j = pos[c]
                spec = sigs[c]
                s, skew = dat.spf[j], dat.skew[j]
                x = per_channel[j]
                a = (f0 - fs0 + skew) * s
                want = (f1 - f0) * s
                x = x[a : a + want]
                pad = want - len(x)
                x = _expand(x, s, m)
                _to_physical(out[: len(x), col_of[c]], x, spec, invalid)
                if pad > 0:
                    out[len(x) :, col_of[c]] = 0.0

    def _frames_to_physical(
        self, out: np.ndarray, frames: np.ndarray, dat: _DatFile, cols: list[int], invalid
    ) -> None:
        specs = [self.header.signals[c] for c in dat.channels]
        base = np.array([s.baseline for s in specs], dtype=np.float32)
        factor = np.array([_unit_scale(s.units)[0] / s.gain for s in specs], dtype=np.float32)
        a = cols[0]
        if cols == list(range(a, a + len(cols))):
            dst = out[:, a : a + len(cols)]
            if np.result_type(frames.dtype, np.float32) == np.float32 and dst.flags.c_contiguous:
                # 8/16-bit samples: to float32 by assignment (exact), then the same float32
                # (x - base) * factor as below, on rows of many frames at once
                dst[...] = frames
                _affine_columns(dst, base, factor)
            else:  # wider samples are subtracted in float64, then rounded
                np.subtract(frames, base, out=dst, casting="unsafe")
                dst *= factor
        else:
            out[:, cols] = (frames - base) * factor
        if invalid is not None:
            bad = frames == invalid
            if bad.any():
                rows, chans = np.nonzero(bad)
                out[rows, np.asarray(cols)[chans]] = 0.0

    def _read_frames(self, dat: _DatFile, f0: int, fe: int) -> np.ndarray:
        """Digital samples of frames [f0, fe) as a (frames, samples per frame) array."""
        t = dat.tspf
        s0, s1 = f0 * t, fe * t
        b0, b1, lead = byte_range(dat.fmt, s0, s1)
        buf = self._files.read(dat.path, dat.byte_offset + b0, b1 - b0)
        n = lead + (s1 - s0)
        if len(buf) < bytes_for_samples(dat.fmt, n):
            raise RecordError(
                STAGE,
                "truncated_signal_file",
                f"signal file {dat.name} ended early while reading (it changed?)",
            )
        return decode_flat(dat.fmt, buf, n)[lead:].reshape(-1, t)

    def _read_fixed(self, dat: _DatFile, f0: int, fe: int) -> list[np.ndarray]:
        frames = self._read_frames(dat, f0, fe)
        out, c0 = [], 0
        if dat.fmt == "8":
            state = self._diff_state.get(dat.name)
            if state is not None and state[0] == f0:
                start = state[1]
            else:
                start = [self.header.signals[c].init_value for c in dat.channels]
            last = []
            for j, s in enumerate(dat.spf):
                d = frames[:, c0 : c0 + s].reshape(-1).cumsum(dtype=np.int64)
                d += start[j]
                out.append(d)
                last.append(int(d[-1]) if len(d) else start[j])
                c0 += s
            # Where the next sequential read (chunks) can start without re-reading.
            self._diff_state[dat.name] = (fe, last)
            return out
        for s in dat.spf:
            out.append(frames[:, c0] if s == 1 else frames[:, c0 : c0 + s].reshape(-1))
            c0 += s
        return out

    def _read_flac(self, dat: _DatFile, f0: int, fe: int) -> list[np.ndarray]:
        import soundfile

        s = dat.spf[0]
        bits = FLAC_FORMATS[dat.fmt]
        with self._files.open(dat.path) as fp, soundfile.SoundFile(fp) as sf:
            if sf.channels != len(dat.channels):
                raise RecordError(
                    STAGE,
                    "bad_signal_file",
                    f"FLAC file {dat.name} has {sf.channels} channels; the header "
                    f"declares {len(dat.channels)}",
                )
            sf.seek(dat.byte_offset + f0 * s)
            data = sf.read((fe - f0) * s, dtype="int16" if bits <= 16 else "int32")
        if data.ndim == 1:
            data = data[:, None]
        if bits == 8 or bits == 24:
            data = data >> 8
        return [data[:, j] for j in range(data.shape[1])]


def _to_physical(dst: np.ndarray, digital: np.ndarray, spec: SignalSpec, invalid) -> None:
    """dst[:] = (digital - baseline) / gain in mV; invalid samples become 0."""
    scale, _ = _unit_scale(spec.units)
    np.subtract(digital, np.float32(spec.baseline), out=dst, casting="unsafe")
    dst *= np.float32(scale / spec.gain)
    if invalid is not None:
        bad = digital == invalid
        if bad.any():
            dst[bad] = 0.0


class _Multi:
    """A multi-segment record: segments (or gaps) concatenated over a channel layout."""

    def __init__(self, header: Header, folder: str, files: _Files, where: str, depth: int) -> None:
        self.header = header
        self.where = where
        names, lens = header.seg_names or [], header.seg_lens or []
        if not names:
            raise RecordError(STAGE, "bad_header", f"{where} names no segments")
        self.variable = lens[0] == 0
        layout: Header | None = None
        body = list(zip(names, lens))
        if self.variable:
            layout_name = names[0]
            if layout_name == "~":
                raise RecordError(STAGE, "bad_header", f"{where}: layout segment is a gap")
            try:
                layout = _load_header(files, _safe_member(folder, layout_name + ".hea"), "layout")
            except RecordError as err:
                if err.error_type == "missing_header":
                    raise RecordError(
                        STAGE, "missing_segment", f"layout {layout_name} of {where} is missing"
                    ) from err
                raise
            if layout.is_multi or not layout.signals:
                raise RecordError(
                    STAGE, "bad_header", f"{where}: layout header {layout_name} has no signals"
                )
            body = body[1:]
        for seg_name, seg_len in body:
            if seg_len < 0:
                raise RecordError(STAGE, "bad_length", f"{where}: segment {seg_name} length")

        def load(item: tuple[str, int]):
            seg_name, seg_len = item
            if seg_name == "~" or seg_len == 0:
                return None
            path = _safe_member(folder, seg_name + ".hea")
            try:
                seg_header = _load_header(files, path, f"segment {seg_name}")
            except RecordError as err:
                if err.error_type == "missing_header":
                    raise RecordError(
                        STAGE, "missing_segment", f"segment {seg_name} of {where} is missing"
                    ) from err
                raise
            src = _make_source(seg_header, folder, files, f"segment {seg_name}", depth + 1)
            if src.n_frames != seg_len:
                raise RecordError(
                    STAGE,
                    "segment_length_mismatch",
                    f"segment {seg_name} holds {src.n_frames} samples; {where} says {seg_len}",
                )
            if not math.isclose(seg_header.fs, header.fs, rel_tol=1e-6):
                raise RecordError(
                    STAGE,
                    "segment_rate_mismatch",
                    f"segment {seg_name} runs at {seg_header.fs:g} Hz; {where} at {header.fs:g}",
                )
            return src

        sources = _map_in_order(load, body, parallel=not _is_local(folder))
        self.segments: list[tuple[int, int, object | None, list[int]]] = []
        start = 0
        for (_name, seg_len), src in zip(body, sources):
            self.segments.append((start, seg_len, src, []))
            start += seg_len
        self.n_frames = start
        if header.sig_len is not None and header.sig_len != start:
            raise RecordError(
                STAGE,
                "segment_length_mismatch",
                f"{where}: segments hold {start} samples; the header declares {header.sig_len}",
            )
        if self.n_frames <= 0:
            raise RecordError(STAGE, "empty_record", f"{where} holds no samples")
        # Output channels: the layout's (variable) or the first segment's (fixed).
        if layout is not None:
            self.names = [s.name for s in layout.signals if not is_annotation(s.name)]
            self.units = [
                _unit_scale(s.units)[1] for s in layout.signals if not is_annotation(s.name)
            ]
            self._layout_specs = [
                (s.name, header.fs * s.spf) for s in layout.signals if not is_annotation(s.name)
            ]
        else:
            first = next((src for _, _, src, _ in self.segments if src is not None), None)
            if first is None:
                raise RecordError(STAGE, "no_signals", f"{where} holds only gaps")
            self.names, self.units = list(first.names), list(first.units)
            self._layout_specs = []
        for k, (st, n, src, _) in enumerate(self.segments):
            if src is None:
                continue
            self.segments[k] = (st, n, src, self._map_channels(src))

    def _map_channels(self, src) -> list[int]:
        if not self.variable:
            if len(src.names) != len(self.names):
                raise RecordError(
                    STAGE,
                    "segment_layout_mismatch",
                    f"{self.where}: a segment has {len(src.names)} signals; the fixed layout "
                    f"has {len(self.names)}",
                )
            return list(range(len(self.names)))
        used: set[int] = set()
        out = []
        for name in src.names:
            idx = next((j for j, n in enumerate(self.names) if n == name and j not in used), -1)
            if idx >= 0:
                used.add(idx)
            out.append(idx)
        return out

    def spfs(self) -> list[int]:
        out: list[int] = []
        for _, _, src, mapping in self.segments:
            if src is not None:
                out.extend(s for s, j in zip(src.spfs(), mapping) if j >= 0)
        return out or [1]

    def rate_specs(self) -> list[tuple[str, float]]:
        out = list(self._layout_specs)
        for _, _, src, mapping in self.segments:
            if src is not None:
                out.extend(r for r, j in zip(src.rate_specs(), mapping) if j >= 0)
        return out

    def read_into(self, out: np.ndarray, f0: int, f1: int, m: int, cols: list[int]) -> None:
        for st, n, src, mapping in self.segments:
            a, b = max(f0, st), min(f1, st + n)
            if a >= b:
                continue
            view = out[(a - f0) * m : (b - f0) * m]
            if src is None:
                for c in cols:
                    if c >= 0:
                        view[:, c] = 0.0
                continue
            seg_cols = [cols[j] if j >= 0 else -1 for j in mapping]
            covered = {c for c in seg_cols if c >= 0}
            for c in cols:
                if c >= 0 and c not in covered:
                    view[:, c] = 0.0
            src.read_into(view, a - st, b - st, m, seg_cols)


def _map_in_order(fn, items: list, parallel: bool) -> list:
    """[fn(x) for x in items]; on a remote filesystem with a few threads, since each
    segment costs round trips. The first failure in item order is raised, as the
    sequential loop would."""
    if not parallel or len(items) < 4:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=SEGMENT_THREADS) as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]


def _load_header(files: _Files, path: str, where: str) -> Header:
    size = files.size(path)
    if size is None:
        raise RecordError(STAGE, "missing_header", f"{where} header {_basename(path)} not found")
    if size > MAX_HEADER_BYTES:
        raise RecordError(STAGE, "bad_header", f"{where} header is {size} bytes long")
    try:
        raw = files.read(path)
    except _TRANSIENT:
        raise
    except OSError as exc:
        raise RecordError(STAGE, "missing_header", f"{where} header unreadable: {exc}") from exc
    return parse_header(raw, where)


def _make_source(header: Header, folder: str, files: _Files, where: str, depth: int = 0):
    if depth > MAX_NESTING:
        raise RecordError(STAGE, "bad_header", f"{where}: segments nest too deeply")
    if header.is_multi:
        return _Multi(header, folder, files, where, depth)
    return _Leaf(header, folder, files, where)


# ------------------------------------------------------------------------ public API


_COMMENT_PAIR = re.compile(r"<\s*([^>]+?)\s*>\s*:\s*(\S+)")


def _sex(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("m", "male"):
        return "M"
    if v in ("f", "female"):
        return "F"
    return None


def parse_comments(comments: list[str]) -> dict:
    """Age, sex and diagnosis codes from header comments.

    Challenge style (`#Age: 54`, `#Sex: Male`, `#Dx: 164889003,59118001`) and the
    PhysioNet `<age>: 54 <sex>: M` style. Sex becomes 'M' or 'F' (None if unknown).
    """
    meta: dict = {"age": None, "sex": None, "dx": []}

    def put(key: str, value: str) -> None:
        key = key.strip().lower()
        value = value.strip()
        if key == "age":
            try:
                age = float(value)
            except ValueError:
                return
            meta["age"] = age if math.isfinite(age) and 0 <= age < 150 else None
        elif key in ("sex", "gender"):
            meta["sex"] = _sex(value)
        elif key == "dx":
            meta["dx"] = [c.strip() for c in value.split(",") if c.strip()]

    for line in comments or []:
        pairs = _COMMENT_PAIR.findall(line)
        if pairs:
            for key, value in pairs:
                put(key, value)
            continue
        key, sep, value = line.partition(":")
        if sep:
            put(key, value)
    return meta


def _check_rates(source, where: str, fs: float) -> None:
    if fs is None or not math.isfinite(fs) or fs <= 0:
        raise RecordError(STAGE, "bad_sampling_rate", f"{where}: sampling rate {fs!r} is not valid")
    for name, eff in source.rate_specs():
        if not math.isfinite(eff) or not (MIN_FS <= eff <= MAX_FS):
            raise RecordError(
                STAGE,
                "bad_sampling_rate",
                f"{where}: signal {name!r} has an effective rate of {eff:g} Hz, outside "
                f"{MIN_FS:g}-{MAX_FS:g} Hz",
            )


class SampleReader:
    """What every reader shares: ranges as `Record`s, chunks, and `with` support.

    A subclass sets `record_id`, `source_path`, `fs`, `n_samples`, `lead_names`,
    `original_lead_names`, `units` and `meta`, and defines `read(start, stop)` returning
    (n, leads) float32 mV.
    """

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reader holds open (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chunks(self, chunk_samples: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start_sample, samples) for consecutive chunks; memory bounded by the chunk."""
        if chunk_samples <= 0:
            raise ValueError("chunk_samples must be positive")
        for start in range(0, self.n_samples, chunk_samples):
            yield start, self.read(start, start + chunk_samples)

    def record(self, start: int = 0, stop: int | None = None) -> Record:
        return Record(
            record_id=self.record_id,
            source_path=self.source_path,
            fs=self.fs,
            signal=self.read(start, stop),
            lead_names=list(self.lead_names),
            original_lead_names=list(self.original_lead_names),
            meta=dict(self.meta),
            units=list(self.units),
            start_sample=max(0, start),
        )


class RecordReader(SampleReader):
    """A checked record, ready to decode any range of its samples."""

    def __init__(self, path: str, record_id: str | None = None) -> None:
        self.source_path = path
        self._files = files = _Files()
        try:
            self._open(path, record_id, files)
        except BaseException:
            files.close()
            raise

    def _open(self, path: str, record_id: str | None, files: _Files) -> None:
        folder = _dirname(path)
        name = _basename(path)
        lower = name.lower()
        if lower.endswith(".hea"):
            header = _load_header(files, path, "record")
            stem = name[: -len(".hea")]
        elif lower.endswith(".edf"):
            size = files.size(path)
            if size is None:
                raise RecordError(STAGE, "missing_header", f"EDF file {name} not found")
            with files.open(path) as f:
                first = f.read(256)
                n = edf_header_size(first) if len(first) == 256 else 256
                if n > MAX_HEADER_BYTES:
                    raise RecordError(STAGE, "bad_header", f"EDF header of {n} bytes")
                raw = first + f.read(max(0, n - 256))
            header = parse_edf_header(raw, name, size)
            stem = name[: -len(".edf")]
        else:
            raise RecordError(STAGE, "not_a_header", f"{path} is not a .hea header or .edf file")
        self.record_id = record_id or stem
        if not header.is_multi and header.sig_len == 0:
            raise RecordError(STAGE, "empty_record", "header declares 0 samples")
        source = _make_source(header, folder, files, "record")
        _check_rates(source, "record", header.fs)
        self._source = source
        self._m = max(source.spfs())
        self.fs = float(header.fs) * self._m
        self.n_samples = int(source.n_frames) * self._m
        self.original_lead_names = [str(n) for n in source.names]
        self.lead_names = [_lead_name(n) for n in self.original_lead_names]
        self.units = list(source.units)
        self.meta = parse_comments(header.comments)
        if self.n_samples * max(1, len(self.lead_names)) > MAX_TOTAL_SAMPLES:
            raise RecordError(STAGE, "bad_length", f"record declares {self.n_samples} samples")

    @property
    def n_leads(self) -> int:
        return len(self.lead_names)

    def close(self) -> None:
        """Release the remote readers kept open (local files are never kept open)."""
        self._files.close()

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples [start, stop) as (n, leads) float32 mV."""
        stop = self.n_samples if stop is None else min(stop, self.n_samples)
        start = max(0, start)
        if stop <= start:
            return np.zeros((0, self.n_leads), dtype=np.float32)
        m = self._m
        f0, f1 = start // m, -(-stop // m)
        out = np.empty(((f1 - f0) * m, self.n_leads), dtype=np.float32)
        cols = list(range(self.n_leads))
        try:
            # In slabs of about SLAB_SAMPLES digital samples, so decoding temporaries
            # stay small beside the output however long the range.
            slab = max(1, SLAB_SAMPLES // (m * max(1, self.n_leads)))
            for a in range(f0, f1, slab):
                b = min(f1, a + slab)
                self._source.read_into(out[(a - f0) * m : (b - f0) * m], a, b, m, cols)
        except (RecordError, *_TRANSIENT):
            raise
        except Exception as exc:
            raise RecordError(
                STAGE, "decode_failed", f"signal could not be decoded: {type(exc).__name__}: {exc}"
            ) from exc
        a = start - f0 * m
        if a or out.shape[0] != stop - start:
            out = out[a : a + stop - start]
        return out


def open_record(path: str, record_id: str | None = None) -> RecordReader:
    """Parse and check every header, segment and signal file of a record; decode nothing."""
    try:
        return RecordReader(path, record_id)
    except (RecordError, *_TRANSIENT):
        raise
    except Exception as exc:
        raise RecordError(
            STAGE, "read_failed", f"record could not be opened: {type(exc).__name__}: {exc}"
        ) from exc


def read_record(hea_path: str, record_id: str | None = None) -> Record:
    """Read the record whose header is `hea_path` (local path or any Beam filesystem URL)."""
    with open_record(hea_path, record_id) as reader:
        return reader.record()
