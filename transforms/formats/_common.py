"""Helpers the export readers share: errors, bounded XML parsing, building a `Record`."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.formats.deid import DeidPolicy
from ecgtok.transforms.leads import normalise_lead_name
from ecgtok.transforms.wfdb_reader import Record

STAGE = "read"
MIN_FS, MAX_FS = 50.0, 20_000.0
MAX_LEADS = 64
# samples x leads beyond which a declared size is absurd for one export held in memory
# (64 Mi values: 12 leads x 93 min at 1 kHz); checked before anything is allocated
MAX_VALUES = 1 << 26
MAX_XML_BYTES = 256 << 20


def fail(kind: str, message: str) -> RecordError:
    """A read error; messages never quote the path or any value read from the file."""
    return RecordError(STAGE, kind, message)


def local_name(tag: object) -> str:
    t = tag if isinstance(tag, str) else ""
    return t.rsplit("}", 1)[-1]


def parse_xml(data: bytes, what: str) -> ET.Element:
    """Parse an XML export in one streaming pass (expat via defusedxml), namespaces dropped.

    Entity declarations are refused (no billion-laughs or external entities); a DOCTYPE
    naming an external DTD, as MUSE's does, is allowed (it is never fetched).
    """
    if len(data) > MAX_XML_BYTES:
        raise fail("too_large", f"{what} file is larger than {MAX_XML_BYTES >> 20} MiB")
    try:
        from defusedxml import DefusedXmlException
        from defusedxml.ElementTree import iterparse
    except ImportError:
        raise fail(
            "missing_dependency", "XML exports need defusedxml (pip install defusedxml)"
        ) from None

    root = None
    try:
        for _event, elem in iterparse(
            io.BytesIO(data), events=("start",), forbid_dtd=False, forbid_entities=True
        ):
            elem.tag = local_name(elem.tag)
            if root is None:
                root = elem
            for k in list(elem.attrib):
                if "}" in k:
                    elem.attrib[local_name(k)] = elem.attrib.pop(k)
    except ET.ParseError as e:
        pos = getattr(e, "position", None)
        where = f" (line {pos[0]})" if pos else ""
        raise fail(
            "bad_xml", f"{what} file is not well-formed XML{where}: truncated or corrupted"
        ) from None
    except DefusedXmlException:
        raise fail("bad_xml", f"{what} file declares XML entities, which are refused") from None
    except (LookupError, ValueError, UnicodeError):  # e.g. an unknown declared encoding
        raise fail("bad_xml", f"{what} file declares an encoding that cannot be read") from None
    if root is None:
        raise fail("bad_xml", f"{what} file holds no XML element")
    return root


def parse_root(data: bytes, what: str, tag: str, kind: str) -> ET.Element:
    """Parse an export and check its root element (`kind` names the schema in the error)."""
    root = parse_xml(data, what)
    if root.tag != tag:
        raise fail("unknown_schema", f"not a {kind} file")
    return root


def child(elem: ET.Element | None, *names: str) -> ET.Element | None:
    """The first descendant along a path of child local names (None if absent)."""
    for name in names:
        if elem is None:
            return None
        elem = elem.find(name)
    return elem


def text(elem: ET.Element | None, *names: str) -> str | None:
    e = child(elem, *names)
    if e is None or e.text is None:
        return None
    t = e.text.strip()
    return t or None


def to_float(value: str | None, what: str, kind: str = "bad_header") -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise fail(kind, f"{what} is missing or not a number") from None
    if not np.isfinite(v):
        raise fail(kind, f"{what} is not finite")
    return v


def check_fs(fs: float, fmt: str) -> float:
    if not (MIN_FS <= fs <= MAX_FS):
        raise fail("bad_sampling_rate", f"{fmt}: sampling rate {fs:g} Hz is outside [50, 20000] Hz")
    return float(fs)


def check_size(n_samples: int, n_leads: int, fmt: str) -> None:
    if n_leads <= 0 or n_samples <= 0:
        raise fail("no_signal", f"{fmt}: the export holds no waveform samples")
    if n_leads > MAX_LEADS:
        raise fail("bad_header", f"{fmt}: {n_leads} leads is more than {MAX_LEADS}")
    if n_samples * n_leads > MAX_VALUES:
        raise fail("too_large", f"{fmt}: {n_samples} samples x {n_leads} leads is too large")


def make_record(
    record_id: str,
    path: str,
    fs: float,
    signal: np.ndarray,
    names: list[str],
    meta: dict,
    policy: DeidPolicy,
    fmt: str,
) -> Record:
    """A `Record` in mV with normalised lead names; the path only where allowed."""
    fs = check_fs(fs, fmt)
    sig = np.ascontiguousarray(signal, dtype=np.float32)
    if sig.ndim != 2 or sig.shape[1] != len(names):
        raise fail("bad_header", f"{fmt}: lead table and waveform data disagree")
    check_size(sig.shape[0], sig.shape[1], fmt)
    if not np.all(np.isfinite(sig)):
        raise fail("bad_signal", f"{fmt}: waveform holds non-finite values")
    originals = [str(n) for n in names]
    return Record(
        record_id=record_id,
        source_path=policy.public_path(path, record_id),
        fs=fs,
        signal=sig,
        lead_names=[normalise_lead_name(n) for n in originals],
        original_lead_names=originals,
        meta=meta,
        units=["mV"] * len(originals),
    )
