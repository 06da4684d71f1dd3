"""Hospital ECG exports: GE MUSE XML, HL7 aECG, Philips XML, DICOM, SCP-ECG, ISHNE.

`read_export(path, record_id)` opens the file through Beam's `FileSystems` (local paths
and any Beam URL), sniffs its format from its first bytes (the suffix only breaks ties)
and decodes it in memory into the same `Record` the WFDB reader returns: float32 mV,
normalised lead names, and a `meta` holding only what `deid.DeidPolicy` allows.

Which files are exports (`FORMAT_SUFFIXES`, `is_export_file`): `.xml` files are claimed
when their root element is one of `RestingECG`, `AnnotatedECG`, `restingecgdata`;
`.dcm`/`.dicom` files; `.scp` files; `.ecg` files starting with `ISHNE1.0`. ISHNE `.ann`
annotation files are not records. `sniff_format(head, path)` tells which from the first
4 KiB (None if none).
"""

from __future__ import annotations

import posixpath
import re

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.formats._common import fail
from ecgtok.transforms.formats.deid import DeidPolicy, export_record_id, public_path
from ecgtok.transforms.wfdb_reader import Record

__all__ = [
    "FORMAT_SUFFIXES",
    "FORMATS",
    "DeidPolicy",
    "export_record_id",
    "public_path",
    "is_export_file",
    "read_export",
    "read_export_bytes",
    "sniff_format",
]

# format -> file-name suffixes (lower case) it may claim; sniffing decides.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "ge_muse_xml": (".xml",),
    "hl7_aecg": (".xml",),
    "philips_xml": (".xml",),
    "dicom_ecg": (".dcm", ".dicom"),
    "scp_ecg": (".scp",),
    "ishne": (".ecg",),
}
FORMATS = tuple(FORMAT_SUFFIXES)
ALL_SUFFIXES = tuple(sorted({s for v in FORMAT_SUFFIXES.values() for s in v}))
XML_ROOTS = {
    "RestingECG": "ge_muse_xml",
    "AnnotatedECG": "hl7_aecg",
    "restingecgdata": "philips_xml",
}
SNIFF_BYTES = 4096
MAX_EXPORT_BYTES = 1 << 30  # one export held in memory; ISHNE is read by ranges instead

_XML_ROOT = re.compile(rb"<\s*(?:[A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)[\s>/]")


def _suffix(path: str) -> str:
    base = posixpath.basename(path.replace("\\", "/"))
    return ("." + base.rsplit(".", 1)[-1].lower()) if "." in base else ""


def _xml_root(head: bytes) -> str | None:
    """Local name of the first element after the prolog (declaration, comments, DOCTYPE)."""
    h = head
    if h.startswith(b"\xef\xbb\xbf"):
        h = h[3:]
    elif h[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            h = h.decode("utf-16").encode()
        except UnicodeDecodeError:
            return None
    i = 0
    while True:
        j = h.find(b"<", i)
        if j < 0 or j + 1 >= len(h):
            return None
        nxt = h[j + 1 : j + 2]
        if nxt == b"?":
            k = h.find(b"?>", j)
        elif h.startswith(b"<!--", j):
            k = h.find(b"-->", j)
        elif nxt == b"!":
            # DOCTYPE, possibly with an internal subset in [...]
            bracket, end = h.find(b"[", j), h.find(b">", j)
            if 0 <= bracket < end:
                k = h.find(b"]>", bracket)
                k = h.find(b">", k) if k >= 0 else -1
            else:
                k = end
        else:
            m = _XML_ROOT.match(h, j)
            return m.group(1).decode("ascii", "replace") if m else None
        if k < 0:
            return None
        i = k + 1


def _looks_scp(head: bytes) -> bool:
    """SCP-ECG: CRC, file length, then section 0's header (id 0, 'SCPECG' in v2+)."""
    if len(head) < 22:
        return False
    sec_id = int.from_bytes(head[8:10], "little")
    return sec_id == 0 and (head[16:22] == b"SCPECG" or int.from_bytes(head[10:14], "little") >= 16)


def sniff_format(head: bytes, path: str = "") -> str | None:
    """The export format of a file from its first bytes (and suffix for SCP), or None."""
    if head.startswith(b"ISHNE1.0"):
        return "ishne"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom_ecg"
    root = _xml_root(head) if b"<" in head[:SNIFF_BYTES] else None
    if root in XML_ROOTS:
        return XML_ROOTS[root]
    if head[8:10] == b"\0\0" and head[16:22] == b"SCPECG":
        return "scp_ecg"  # SCP-ECG v2+ under any name
    suffix = _suffix(path)
    if suffix == ".scp" and _looks_scp(head):
        return "scp_ecg"
    if suffix in (".dcm", ".dicom"):
        return "dicom_ecg"  # DICOM without preamble; pydicom decides
    if suffix == ".scp":
        return "scp_ecg"  # let the reader give the precise error
    return None


def is_export_file(path: str, head: bytes | None = None) -> bool:
    """Whether discovery should treat this file as an export (head: its first 4 KiB).

    Without `head` only the suffix is looked at (`.xml` then needs sniffing to be sure).
    """
    suffix = _suffix(path)
    if suffix not in ALL_SUFFIXES:
        return False
    if head is None:
        return True
    return sniff_format(head, path) is not None


def _open_bytes(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(
            path, mime_type="application/octet-stream", compression_type="uncompressed"
        ) as f:
            data = f.read(MAX_EXPORT_BYTES + 1)
    except Exception as e:  # Beam and its filesystems raise their own types
        try:
            missing = not FileSystems.exists(path)
        except Exception:
            missing = isinstance(e, FileNotFoundError)
        if missing:
            raise fail("missing_file", "export file not found") from None
        raise fail("io_error", f"export file cannot be read ({type(e).__name__})") from None
    if len(data) > MAX_EXPORT_BYTES:
        raise fail("too_large", f"export file is larger than {MAX_EXPORT_BYTES >> 20} MiB")
    return data


def read_export_bytes(
    data: bytes, path: str, record_id: str, policy: DeidPolicy | None = None, fmt: str | None = None
) -> Record:
    """Decode an export already in memory (`path` only names it; it is not opened)."""
    policy = policy or DeidPolicy()
    fmt = fmt or sniff_format(data[:SNIFF_BYTES], path)
    if fmt is None:
        if not data:
            raise fail("truncated", "export file is empty")
        raise fail(
            "unknown_format",
            "file is not a supported ECG export (MUSE, aECG, Philips, DICOM, SCP, ISHNE)",
        )
    if fmt == "ge_muse_xml":
        from ecgtok.transforms.formats.ge_muse import read_muse

        return read_muse(data, path, record_id, policy)
    if fmt == "hl7_aecg":
        from ecgtok.transforms.formats.hl7_aecg import read_aecg

        return read_aecg(data, path, record_id, policy)
    if fmt == "philips_xml":
        from ecgtok.transforms.formats.philips_xml import read_philips

        return read_philips(data, path, record_id, policy)
    if fmt == "dicom_ecg":
        from ecgtok.transforms.formats.dicom_ecg import read_dicom

        return read_dicom(data, path, record_id, policy)
    if fmt == "scp_ecg":
        from ecgtok.transforms.formats.scp_ecg import read_scp

        return read_scp(data, path, record_id, policy)
    if fmt == "ishne":
        from ecgtok.transforms.formats.ishne import read_ishne_bytes

        return read_ishne_bytes(data, path, record_id, policy)
    raise fail("unknown_format", f"unknown export format {fmt!r}")


def read_export(path: str, record_id: str, policy: DeidPolicy | None = None) -> Record:
    """Read one hospital export (local path or Beam URL) into a `Record`.

    Every failure is a `RecordError("read", kind, message)`. ISHNE Holter files are
    read by byte ranges (`ishne.read_ishne`) rather than whole.
    """
    policy = policy or DeidPolicy()
    if _suffix(path) == ".ecg":
        from ecgtok.transforms.formats.ishne import read_ishne

        try:
            return read_ishne(path, record_id, policy)
        except RecordError as e:
            if e.error_type != "unknown_format":
                raise
            # not ISHNE: some carts name SCP-ECG files .ecg; sniff the bytes
    return read_export_bytes(_open_bytes(path), path, record_id, policy)
