"""ISHNE Holter (.ecg, ISHNE 1.0): a long recording read by byte ranges, bounded memory.

Layout: magic `ISHNE1.0` (8 bytes), CRC-CCITT (uint16) of the header from byte 10 to
the ECG block, a 512-byte fixed header (little endian), a variable-length block, then
interleaved int16 samples (`nLeads` per frame), `Resolution` nV per unit per lead.
Samples equal to -32768 are invalid and read as 0. The `.ann` beside the file holds
beat annotations and is not a record.

`open_ishne` checks the header, its CRC and that the file holds every declared sample
before any sample is decoded; the returned `IshneReader` has the `RecordReader`
interface of the WFDB reader (`read`, `chunks`, `record`), so a 24-hour Holter is
decoded chunk by chunk with memory bounded by the chunk.
"""

from __future__ import annotations

import binascii
import datetime as _dt

import numpy as np

from ecgtok.transforms.formats._common import MAX_LEADS, check_fs, fail
from ecgtok.transforms.formats.deid import DeidPolicy, Demographics
from ecgtok.transforms.leads import STANDARD_LEADS, normalise_lead_name
from ecgtok.transforms.wfdb_reader import Record, SampleReader

FORMAT = "ishne"
MAGIC = b"ISHNE1.0"
HEADER_END = 522  # magic 8 + crc 2 + fixed header 512
MAX_VAR_BLOCK = 16 << 20
MAX_SAMPLES_PER_LEAD = 1 << 34
READ_BLOCK_FRAMES = 1 << 18  # frames decoded per read call inside `read`
INVALID = -32768
# ISHNE lead specification codes
LEAD_CODES = {
    0: "unknown",
    1: "generic bipolar",
    2: "X",
    3: "Y",
    4: "Z",
    **{5 + i: name for i, name in enumerate(STANDARD_LEADS)},
    17: "ES",
    18: "AS",
    19: "AI",
}


def _i16(h: bytes, off: int, n: int = 1) -> list[int]:
    return np.frombuffer(h, dtype="<i2", count=n, offset=off).astype(int).tolist()


def _i32(h: bytes, off: int) -> int:
    return int.from_bytes(h[off : off + 4], "little", signed=True)


def _date(d: list[int]) -> _dt.date | None:
    day, month, year = d
    try:
        return _dt.date(year, month, day) if year > 0 else None
    except ValueError:
        return None


class IshneHeader:
    """The checked fixed header of an ISHNE file (identifiers only in `demographics`)."""

    def __init__(self, head: bytes, file_size: int) -> None:
        if len(head) < HEADER_END:
            raise fail("truncated", "ISHNE: file is shorter than its 522-byte header")
        if head[:8] != MAGIC:
            raise fail("unknown_format", "ISHNE: magic number ISHNE1.0 not found")
        self.var_len = _i32(head, 10)
        self.n_samples = _i32(head, 14)  # per lead
        self.var_offset = _i32(head, 18)
        self.ecg_offset = _i32(head, 22)
        self.n_leads = _i16(head, 156)[0]
        self.lead_codes = _i16(head, 158, 12)
        self.resolution_nv = _i16(head, 206, 12)
        self.fs = float(_i16(head, 272)[0])
        if not (0 <= self.var_len <= MAX_VAR_BLOCK):
            raise fail("bad_header", "ISHNE: variable-length block size is out of range")
        if self.ecg_offset < HEADER_END + self.var_len or self.ecg_offset > file_size:
            raise fail("bad_header", "ISHNE: ECG block offset is out of range")
        if not (1 <= self.n_leads <= min(12, MAX_LEADS)):
            raise fail(
                "bad_header", f"ISHNE: header declares {self.n_leads} leads (1 to 12 allowed)"
            )
        if not (0 < self.n_samples <= MAX_SAMPLES_PER_LEAD):
            raise fail("bad_header", "ISHNE: header declares no samples")
        check_fs(self.fs, "ISHNE")
        res = self.resolution_nv[: self.n_leads]
        if any(r <= 0 for r in res):
            raise fail("bad_header", "ISHNE: a lead has a non-positive amplitude resolution")
        need = self.ecg_offset + self.n_samples * self.n_leads * 2
        if file_size < need:
            raise fail(
                "truncated",
                f"ISHNE: file holds {max(0, file_size - self.ecg_offset) // (2 * self.n_leads)} of "
                f"{self.n_samples} declared samples per lead",
            )
        self.gain_mv = np.array(res, dtype=np.float32) * np.float32(1e-6)
        self.original_lead_names = [
            LEAD_CODES.get(c, f"lead code {c}") for c in self.lead_codes[: self.n_leads]
        ]
        self._head = head

    def check_crc(self, crc_region: bytes) -> None:
        stored = int.from_bytes(self._head[8:10], "little")
        if binascii.crc_hqx(crc_region, 0xFFFF) != stored:
            raise fail("bad_crc", "ISHNE: header fails its CRC-CCITT check (corrupted header)")

    def demographics(self) -> Demographics:
        h = self._head
        sex = _i16(h, 128)[0]
        demo = Demographics(
            patient_id=h[108:128].split(b"\0", 1)[0].decode("latin-1").strip() or None,
            sex={1: "M", 2: "F"}.get(sex),
            birth_date=_date(_i16(h, 132, 3)),
        )
        day = _date(_i16(h, 138, 3))
        if day is not None:
            hh, mm, ss = _i16(h, 150, 3)
            try:
                demo.acquired = _dt.datetime.combine(day, _dt.time(hh, mm, ss))
            except ValueError:
                demo.acquired = _dt.datetime.combine(day, _dt.time())
        recorder = h[232:272].split(b"\0", 1)[0].decode("latin-1").strip()
        demo.device = recorder if recorder and recorder.lower() != "none" else None
        return demo


class IshneReader(SampleReader):
    """A checked ISHNE file, ready to decode any range of samples (WFDB RecordReader API)."""

    def __init__(
        self, path: str, record_id: str, policy: DeidPolicy | None = None, data: bytes | None = None
    ):
        self.policy = policy or DeidPolicy()
        self.record_id = record_id
        self.source_path = self.policy.public_path(path, record_id)
        self._data = data
        self._f = None
        if data is None:
            from apache_beam.io.filesystems import FileSystems

            try:
                size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
                self._f = FileSystems.open(
                    path, mime_type="application/octet-stream", compression_type="uncompressed"
                )
            except Exception as e:
                raise fail(
                    "missing_file", f"ISHNE: file cannot be opened ({type(e).__name__})"
                ) from None
        else:
            size = len(data)
        try:
            head = self._range(0, HEADER_END)
            hdr = IshneHeader(head, size)
            hdr.check_crc(self._range(10, hdr.ecg_offset))
        except BaseException:
            self.close()
            raise
        self.header = hdr
        self.fs = hdr.fs
        self.n_samples = hdr.n_samples
        self.original_lead_names = list(hdr.original_lead_names)
        self.lead_names = [normalise_lead_name(n) for n in self.original_lead_names]
        self.units = ["mV"] * hdr.n_leads
        self.meta = self.policy.meta(hdr.demographics(), FORMAT)

    def _range(self, start: int, stop: int) -> bytes:
        if self._data is not None:
            return self._data[start:stop]
        self._f.seek(start)
        out = self._f.read(stop - start)
        if len(out) < stop - start:
            raise fail("truncated", "ISHNE: file ended before the declared samples")
        return out

    @property
    def n_leads(self) -> int:
        return self.header.n_leads

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples [start, stop) as (n, leads) float32 mV."""
        stop = self.n_samples if stop is None else min(stop, self.n_samples)
        start = max(0, start)
        nl = self.n_leads
        out = np.empty((max(0, stop - start), nl), dtype=np.float32)
        frame = 2 * nl
        base = self.header.ecg_offset
        for s in range(start, stop, READ_BLOCK_FRAMES):
            e = min(stop, s + READ_BLOCK_FRAMES)
            raw = self._range(base + s * frame, base + e * frame)
            digital = np.frombuffer(raw, dtype="<i2").reshape(e - s, nl)
            block = out[s - start : e - start]
            np.multiply(digital, self.header.gain_mv, out=block, casting="unsafe")
            block[digital == INVALID] = 0.0
        return out


def open_ishne(path: str, record_id: str, policy: DeidPolicy | None = None) -> IshneReader:
    """Check an ISHNE file's header, CRC and length; decode nothing yet."""
    return IshneReader(path, record_id, policy)


def read_ishne(path: str, record_id: str, policy: DeidPolicy | None = None) -> Record:
    with open_ishne(path, record_id, policy) as reader:
        return reader.record()


def read_ishne_bytes(
    data: bytes, path: str, record_id: str, policy: DeidPolicy | None = None
) -> Record:
    with IshneReader(path, record_id, policy, data=data) as reader:
        return reader.record()


ANN_MAGIC = b"ANN  1.0"
MAX_ANN_BYTES = 64 << 20


def parse_ishne_annotations(data: bytes) -> tuple[np.ndarray, list[str]]:
    """An ISHNE `.ann` file (ANN 1.0) -> (sample numbers int64, beat labels).

    Layout: magic, header CRC, the 512-byte header of the `.ecg`, its variable block,
    a uint32 first-annotation sample, then 4-byte annotations (label char, subtype char,
    uint16 samples since the previous annotation).
    """
    if len(data) < HEADER_END + 4:
        raise fail("truncated", "ISHNE annotations: file is shorter than its header")
    if data[:8] != ANN_MAGIC:
        raise fail("unknown_format", "ISHNE annotations: magic number ANN  1.0 not found")
    var_len = _i32(data, 10)
    start = HEADER_END + var_len
    if not (0 <= var_len <= MAX_VAR_BLOCK) or start + 4 > len(data):
        raise fail("bad_header", "ISHNE annotations: variable-length block size is out of range")
    stored = int.from_bytes(data[8:10], "little")  # 0: not filled in, as some writers do
    if stored and binascii.crc_hqx(data[10:start], 0xFFFF) != stored:
        raise fail("bad_crc", "ISHNE annotations: header fails its CRC-CCITT check")
    first = int.from_bytes(data[start : start + 4], "little")
    body = data[start + 4 :]
    body = body[: len(body) // 4 * 4]
    rec = np.frombuffer(body, dtype=[("label", "S1"), ("sub", "S1"), ("toc", "<u2")])
    samples = first + np.cumsum(rec["toc"].astype(np.int64))
    labels = [b.decode("latin-1") for b in rec["label"].tolist()]
    return samples, labels


def read_ishne_annotations(path: str) -> tuple[np.ndarray, list[str]]:
    """Beat annotations of an ISHNE recording (local path or Beam URL of its `.ann`)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(
            path, mime_type="application/octet-stream", compression_type="uncompressed"
        ) as f:
            data = f.read(MAX_ANN_BYTES)
    except Exception as e:
        raise fail(
            "missing_file", f"ISHNE annotations cannot be opened ({type(e).__name__})"
        ) from None
    return parse_ishne_annotations(data)
