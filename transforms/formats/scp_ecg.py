"""SCP-ECG (EN 1064 / ISO 11073-91064), versions 1.x to 3.0, `.scp` files.

File: CRC-CCITT (uint16, over bytes 2..end), file length (uint32), then sections, each
with a 16-byte header (CRC over the section from its byte 2, id, length, versions,
reserved). Section 0 points at the others (id, length, 1-based offset). Used here:

* 1: patient and acquisition tags (only age, sex, device model and, under the policy,
  the patient ID and acquisition date-time are kept; names never leave this module);
* 2: Huffman tables (19999 = the standard default table), absent = no Huffman coding;
* 3: leads: count, flags (bit 0: reference beat subtracted), per lead its first and
  last sample number and lead code;
* 6: rhythm data: amplitude multiplier (nV), sample interval (us), difference encoding
  (0 none, 1 first, 2 second differences), bimodal flag, byte length per lead, data.

Every CRC is checked, every length is checked against the bytes present before any
allocation, and Huffman decoding is bounded by the declared sample count. Reference-beat
subtraction and bimodal compression (sections 4/5) are refused as `unsupported`.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime as _dt
import struct

import numpy as np

from ecgtok.transforms.formats._common import MAX_LEADS, MAX_VALUES, fail, make_record
from ecgtok.transforms.formats.deid import DeidPolicy, Demographics
from ecgtok.transforms.wfdb_reader import Record

FORMAT = "scp_ecg"
DEFAULT_TABLE_ID = 19999
SECTION_HEADER = 16

# SCP-ECG lead codes (section 3), the common ones; others keep "lead code N".
LEAD_CODES = {
    0: "unspecified",
    1: "I",
    2: "II",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
    9: "V7",
    10: "V2R",
    11: "V3R",
    12: "V4R",
    13: "V5R",
    14: "V6R",
    15: "V7R",
    16: "X",
    17: "Y",
    18: "Z",
    19: "CC5",
    20: "CM5",
    21: "LA",
    22: "RA",
    23: "LL",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
    65: "-aVR",
    66: "V8",
    67: "V9",
    68: "V8R",
    69: "V9R",
    70: "D",
    71: "A",
    72: "J",
}

# The standard default Huffman table (Annex of EN 1064): (code bits MSB-first, value);
# the last two codes are escapes followed by an 8- or 16-bit two's-complement value.
_DEFAULT_CODES = [("0", 0)]
for _v in range(1, 9):  # '1'*v + '00' -> v, '1'*v + '01' -> -v ('100' = 1, ..., '1111111101' = -8)
    _DEFAULT_CODES += [("1" * _v + "00", _v), ("1" * _v + "01", -_v)]
_DEFAULT_ESCAPES = [("1111111110", 8), ("1111111111", 16)]


class HuffmanTable:
    """One prefix-code table: code -> (value) or (escape with n extra bits) or (switch)."""

    def __init__(self, entries: list[tuple[str, int, int, int]]):
        # entries: (code bits, total bits, mode (1 = value, 0 = switch table), value)
        if not entries:
            raise fail("bad_huffman", "SCP-ECG: empty Huffman table")
        self.max_prefix = max(len(c) for c, _, _, _ in entries)
        self.max_total = max(max(t, len(c)) for c, t, _, _ in entries)
        if self.max_prefix > 24 or self.max_total > 40:
            raise fail("bad_huffman", "SCP-ECG: Huffman code longer than 24 bits")
        size = 1 << self.max_prefix
        # lookup[window] = (prefix length, extra bits, mode, value); prefix length 0 = none
        self.lookup: list[tuple[int, int, int, int] | None] = [None] * size
        for code, total, mode, value in entries:
            if not code or any(ch not in "01" for ch in code) or total < len(code):
                raise fail("bad_huffman", "SCP-ECG: malformed Huffman code")
            lo = int(code, 2) << (self.max_prefix - len(code))
            hi = lo + (1 << (self.max_prefix - len(code)))
            entry = (len(code), total - len(code), mode, value)
            for w in range(lo, hi):
                if self.lookup[w] is None or self.lookup[w][0] > len(code):
                    self.lookup[w] = entry
        self._arrays: tuple[np.ndarray, ...] | None = None

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The lookup as NumPy arrays: prefix length, extra bits, mode, value (0 = no code)."""
        if self._arrays is None:
            rows = [e if e is not None else (0, 0, 1, 0) for e in self.lookup]
            self._arrays = tuple(np.array(col, dtype=np.int64) for col in zip(*rows))
        return self._arrays


def default_tables() -> list[HuffmanTable]:
    entries = [(c, len(c), 1, v) for c, v in _DEFAULT_CODES]
    entries += [(c, len(c) + n, 1, 0) for c, n in _DEFAULT_ESCAPES]
    return [HuffmanTable(entries)]


def _reverse_bits(value: int, n: int) -> int:
    out = 0
    for _ in range(n):
        out = (out << 1) | (value & 1)
        value >>= 1
    return out


def parse_huffman_section(body: bytes) -> list[HuffmanTable] | None:
    """Section 2 body (after its 16-byte header) -> tables; None for 'no Huffman'."""
    if len(body) < 2:
        raise fail("truncated", "SCP-ECG: Huffman section cut short")
    n_tables = struct.unpack_from("<H", body, 0)[0]
    if n_tables == DEFAULT_TABLE_ID:
        return default_tables()
    if n_tables == 0 or n_tables > 256:
        raise fail(
            "bad_huffman", "SCP-ECG: Huffman section declares an impossible number of tables"
        )
    tables = []
    off = 2
    for _ in range(n_tables):
        if off + 2 > len(body):
            raise fail("truncated", "SCP-ECG: Huffman section cut short")
        n_codes = struct.unpack_from("<H", body, off)[0]
        off += 2
        if n_codes == 0 or off + 9 * n_codes > len(body):
            raise fail("truncated", "SCP-ECG: Huffman table cut short")
        entries = []
        for _ in range(n_codes):
            prefix, total, mode, value, base = struct.unpack_from("<BBBhI", body, off)
            off += 9
            if not (1 <= prefix <= 24):
                raise fail("bad_huffman", "SCP-ECG: Huffman code length out of range")
            code = format(_reverse_bits(base, prefix), f"0{prefix}b")
            entries.append((code, total if mode else prefix, mode, value))
        tables.append(HuffmanTable(entries))
    return tables


def _bit_windows(data: bytes, width: int) -> np.ndarray:
    """window[p] = the `width` bits of `data` starting at bit p, as an integer (MSB first)."""
    nbits = len(data) * 8
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    bits = np.concatenate([bits, np.zeros(width, dtype=np.uint8)])
    window = np.zeros(nbits, dtype=np.int64)
    for k in range(width):
        window <<= 1
        window |= bits[k : k + nbits]
    return window


def huffman_decode(data: bytes, n: int, tables: list[HuffmanTable]) -> np.ndarray:
    """Decode n values from an MSB-first bit stream (trailing padding ignored)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if len(tables) == 1 and all(e is None or e[2] == 1 for e in tables[0].lookup):
        return _huffman_decode_one_table(data, n, tables[0])
    return _huffman_decode_switching(data, n, tables)


def _huffman_decode_one_table(data: bytes, n: int, table: HuffmanTable) -> np.ndarray:
    """One table, no switch codes (the default table): the code at every bit position is
    looked up with NumPy, then one Python step per value follows the chain of code starts."""
    width = max(table.max_total, table.max_prefix)
    nbits = len(data) * 8
    window = _bit_windows(data, width)
    lut = table.arrays()
    idx = window >> (width - table.max_prefix)
    step = lut[0][idx] + lut[1][idx]  # 0 where no code matches
    steps = step.tolist()
    starts = []
    append = starts.append
    p = 0
    for _ in range(n):
        if p >= nbits:
            raise fail("truncated", f"SCP-ECG: lead data holds {len(starts)} of {n} samples")
        s = steps[p]
        if s == 0:
            raise fail(
                "bad_huffman", "SCP-ECG: bit pattern matches no Huffman code (corrupted data)"
            )
        append(p)
        p += s
    pos = np.asarray(starts, dtype=np.int64)
    e = idx[pos]
    plen, extra, value = lut[0][e], lut[1][e], lut[3][e].copy()
    esc = extra > 0
    if esc.any():
        w, pl, ex = window[pos[esc]], plen[esc], extra[esc]
        raw = (w >> (width - pl - ex)) & ((1 << ex) - 1)
        value[esc] = np.where(raw >= (1 << (ex - 1)), raw - (1 << ex), raw)
    return value


def _huffman_decode_switching(data: bytes, n: int, tables: list[HuffmanTable]) -> np.ndarray:
    """General case (several tables, switch codes): one Python step per code."""
    width = max(t.max_prefix for t in tables) + max(t.max_total for t in tables)
    nbits = len(data) * 8
    win = _bit_windows(data, width).tolist()
    table = tables[0]
    p = 0
    res: list[int] = []
    append = res.append
    while len(res) < n:
        if p >= nbits:
            raise fail("truncated", f"SCP-ECG: lead data holds {len(res)} of {n} samples")
        w = win[p]
        entry = table.lookup[w >> (width - table.max_prefix)]
        if entry is None:
            raise fail(
                "bad_huffman", "SCP-ECG: bit pattern matches no Huffman code (corrupted data)"
            )
        plen, extra, mode, value = entry
        if mode == 0:  # switch table
            if not (1 <= value <= len(tables)):
                raise fail("bad_huffman", "SCP-ECG: Huffman table switch to a missing table")
            table = tables[value - 1]
            p += plen
            continue
        if extra:
            raw = (w >> (width - plen - extra)) & ((1 << extra) - 1)
            if raw >= 1 << (extra - 1):
                raw -= 1 << extra
            value = raw
        append(value)
        p += plen + extra
    return np.asarray(res, dtype=np.int64)


def undifference(d: np.ndarray, order: int) -> np.ndarray:
    """Undo SCP first (x[i] = x[i-1] + d[i]) or second (x[i] = d[i] + 2x[i-1] - x[i-2]) differences."""
    if order == 0 or len(d) == 0:
        return d
    if order == 1:
        return np.cumsum(d)
    if order == 2:
        if len(d) <= 2:
            return d.copy()
        x = np.empty_like(d)
        x[:2] = d[:2]
        y = (d[1] - d[0]) + np.cumsum(d[2:])  # first differences x[i]-x[i-1], i >= 2
        x[2:] = d[1] + np.cumsum(y)
        return x
    raise fail("unsupported", f"SCP-ECG: difference encoding {order} is not defined")


def _crc_ok(blob: bytes, stored: int) -> bool:
    return binascii.crc_hqx(blob, 0xFFFF) == stored


def _sections(data: bytes) -> dict[int, bytes]:
    if len(data) < 6 + SECTION_HEADER:
        raise fail("truncated", "SCP-ECG: file is shorter than its headers")
    crc, size = struct.unpack_from("<HI", data, 0)
    if size != len(data):
        if size > len(data):
            raise fail("truncated", f"SCP-ECG: file holds {len(data)} of {size} declared bytes")
        raise fail("bad_header", "SCP-ECG: file is longer than its declared length")
    if not _crc_ok(data[2:], crc):
        raise fail("bad_crc", "SCP-ECG: file fails its CRC-CCITT check (corrupted)")
    sec0 = _section_at(data, 7, 0)
    sections = {0: sec0}
    body = sec0[SECTION_HEADER:]
    for k in range(len(body) // 10):
        sid, length, index = struct.unpack_from("<HII", body, 10 * k)
        if length == 0 or sid == 0:
            continue
        sections[sid] = _section_at(data, index, sid, length)
    return sections


def _section_at(data: bytes, index: int, sid: int, length: int | None = None) -> bytes:
    start = index - 1
    if start < 6 or start + SECTION_HEADER > len(data):
        raise fail("bad_header", f"SCP-ECG: section {sid} lies outside the file")
    crc, got_id, got_len = struct.unpack_from("<HHI", data, start)
    if got_id != sid:
        raise fail("bad_header", f"SCP-ECG: section {sid} pointer leads to another section")
    if length is not None and got_len != length:
        raise fail("bad_header", f"SCP-ECG: section {sid} length disagrees with section 0")
    if got_len < SECTION_HEADER or start + got_len > len(data):
        raise fail("truncated", f"SCP-ECG: section {sid} runs past the end of the file")
    sec = data[start : start + got_len]
    if not _crc_ok(sec[2:], crc):
        raise fail("bad_crc", f"SCP-ECG: section {sid} fails its CRC-CCITT check (corrupted)")
    return sec


def _tags(sec1: bytes) -> dict[int, bytes]:
    tags: dict[int, bytes] = {}
    off = SECTION_HEADER
    while off + 3 <= len(sec1):
        tag, length = struct.unpack_from("<BH", sec1, off)
        off += 3
        if tag == 255:
            break
        value = sec1[off : off + length]
        off += length
        tags.setdefault(tag, value)
    return tags


def _string(b: bytes | None) -> str | None:
    if not b:
        return None
    s = b.split(b"\0", 1)[0].decode("latin-1").strip()
    return s or None


def _demographics(sec1: bytes | None) -> Demographics:
    demo = Demographics()
    if not sec1:
        return demo
    t = _tags(sec1)
    demo.patient_id = _string(t.get(2))
    if len(t.get(4, b"")) >= 3:
        age, unit = struct.unpack_from("<HB", t[4], 0)
        factor = {1: 1.0, 2: 1 / 12, 3: 1 / 52, 4: 1 / 365, 5: 1 / 8760}.get(unit)
        demo.age = age * factor if factor and age else None
    if len(t.get(5, b"")) >= 4:
        y, m, d = struct.unpack_from("<HBB", t[5], 0)
        with contextlib.suppress(ValueError):
            demo.birth_date = _dt.date(y, m, d) if y else None
    if len(t.get(8, b"")) >= 1:
        demo.sex = {1: "M", 2: "F"}.get(t[8][0])
    if len(t.get(25, b"")) >= 4:
        y, m, d = struct.unpack_from("<HBB", t[25], 0)
        hh, mm, ss = tuple(t.get(26, b"\0\0\0")[:3]) if len(t.get(26, b"")) >= 3 else (0, 0, 0)
        with contextlib.suppress(ValueError):
            demo.acquired = _dt.datetime(y, m, d, hh, mm, ss)
    dev = t.get(14, b"")
    if len(dev) >= 14:
        demo.device = _string(dev[8:14])
    return demo


def _lead_table(sec3: bytes) -> tuple[list[tuple[int, int, int]], int]:
    if len(sec3) < SECTION_HEADER + 2:
        raise fail("truncated", "SCP-ECG: lead section cut short")
    n_leads, flags = sec3[SECTION_HEADER], sec3[SECTION_HEADER + 1]
    if not (0 < n_leads <= MAX_LEADS):
        raise fail("bad_header", f"SCP-ECG: lead section declares {n_leads} leads")
    if len(sec3) < SECTION_HEADER + 2 + 9 * n_leads:
        raise fail("truncated", "SCP-ECG: lead section cut short")
    leads = [struct.unpack_from("<IIB", sec3, SECTION_HEADER + 2 + 9 * k) for k in range(n_leads)]
    return leads, flags


def read_scp(data: bytes, path: str, record_id: str, policy: DeidPolicy) -> Record:
    sections = _sections(data)
    if 3 not in sections or 6 not in sections:
        raise fail("no_signal", "SCP-ECG: no lead (3) or rhythm (6) section")
    leads, flags = _lead_table(sections[3])
    if flags & 1 and 4 in sections and 5 in sections:
        raise fail("unsupported", "SCP-ECG: reference-beat subtraction is not supported")
    tables = parse_huffman_section(sections[2][SECTION_HEADER:]) if 2 in sections else None
    sec6 = sections[6]
    if len(sec6) < SECTION_HEADER + 6 + 2 * len(leads):
        raise fail("truncated", "SCP-ECG: rhythm section cut short")
    avm_nv, interval_us, diff, bimodal = struct.unpack_from("<HHBB", sec6, SECTION_HEADER)
    if bimodal:
        raise fail("unsupported", "SCP-ECG: bimodal compression is not supported")
    if avm_nv == 0 or interval_us == 0:
        raise fail("bad_header", "SCP-ECG: amplitude multiplier or sample interval is 0")
    lengths = struct.unpack_from(f"<{len(leads)}H", sec6, SECTION_HEADER + 6)
    off = SECTION_HEADER + 6 + 2 * len(leads)
    if off + sum(lengths) > len(sec6):
        raise fail("truncated", "SCP-ECG: lead data runs past the rhythm section")
    starts = [max(1, s) for s, _, _ in leads]
    counts = [e - s + 1 for (_, e, _), s in zip(leads, starts)]
    if any(c <= 0 for c in counts):
        raise fail("bad_header", "SCP-ECG: a lead's last sample precedes its first")
    first = min(starts)
    total = max(s - first + c for s, c in zip(starts, counts))
    if total * len(leads) > MAX_VALUES:
        raise fail("too_large", "SCP-ECG: declared recording is too large")
    for k, (n, nbytes) in enumerate(zip(counts, lengths)):
        fits = n <= 8 * nbytes if tables is not None else n <= nbytes // 2 + 1
        if not fits:
            raise fail("truncated", f"SCP-ECG: lead {k + 1} data is too short for {n} samples")
    signal = np.zeros((total, len(leads)), dtype=np.float64)
    for k, ((_, _, _code), n, nbytes) in enumerate(zip(leads, counts, lengths)):
        chunk = sec6[off : off + nbytes]
        off += nbytes
        if tables is None:
            got = min(n, nbytes // 2)  # a last sample number one too high is common (v1.x)
            values = np.frombuffer(chunk, dtype="<i2", count=got).astype(np.int64)
        else:
            values = huffman_decode(chunk, n, tables)
        values = undifference(values, diff)
        s = starts[k] - first
        signal[s : s + len(values), k] = values * (avm_nv * 1e-6)
    names = [LEAD_CODES.get(code, f"lead code {code}") for _, _, code in leads]
    fs = round(1e6 / interval_us, 3)
    version = sections[0][9] if len(sections[0]) > 9 else None
    meta = policy.meta(_demographics(sections.get(1)), FORMAT, schema_version=f"SCP-ECG {version}")
    return make_record(record_id, path, fs, signal, names, meta, policy, "SCP-ECG")
