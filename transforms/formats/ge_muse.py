"""GE MUSE resting ECG XML (root `RestingECG`).

Each `<Waveform>` block (Median, Rhythm) holds `<LeadData>` elements with base64
little-endian int16 `<WaveFormData>`, `LeadAmplitudeUnitsPerBit` (uV) and a CRC-32 of
the decoded bytes. The Rhythm block is the recording. MUSE stores 8 independent leads
(I, II, V1-V6); III, aVR, aVL and aVF are derived by Einthoven's and Goldberger's laws.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import zlib

import numpy as np

from ecgtok.transforms.formats._common import (
    child,
    fail,
    make_record,
    parse_root,
    text,
    to_float,
)
from ecgtok.transforms.formats.deid import DeidPolicy, Demographics, normalise_sex, parse_date
from ecgtok.transforms.leads import normalise_lead_name
from ecgtok.transforms.wfdb_reader import Record

FORMAT = "ge_muse_xml"
ROOT = "RestingECG"
_UNITS_TO_MV = {"MICROVOLTS": 1e-3, "MILLIVOLTS": 1.0, "NANOVOLTS": 1e-6}
ORDER = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def derive_limb_leads(i: np.ndarray, ii: np.ndarray) -> dict[str, np.ndarray]:
    """III, aVR, aVL, aVF from I and II (any float arrays of one shape)."""
    return {
        "III": ii - i,
        "aVR": -(i + ii) / 2.0,
        "aVL": i - ii / 2.0,
        "aVF": ii - i / 2.0,
    }


def _decode_lead(lead, index: int) -> tuple[str, np.ndarray, float]:
    raw_name = text(lead, "LeadID")
    if raw_name is None:
        raise fail("bad_header", f"GE MUSE: lead {index + 1} has no LeadID")
    payload = text(lead, "WaveFormData")
    if payload is None:
        raise fail("no_signal", f"GE MUSE: lead {index + 1} has no WaveFormData")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise fail(
            "bad_signal", f"GE MUSE: lead {index + 1} WaveFormData is not valid base64"
        ) from None
    size = int(to_float(text(lead, "LeadSampleSize") or "2", "LeadSampleSize"))
    if size != 2:
        raise fail("unsupported", f"GE MUSE: {size}-byte samples are not supported (only 2)")
    declared = text(lead, "LeadSampleCountTotal")
    if declared is not None:
        n = int(to_float(declared, "LeadSampleCountTotal"))
        if len(data) < 2 * n:
            raise fail(
                "truncated",
                f"GE MUSE: lead {index + 1} holds {len(data) // 2} samples, header says {n}",
            )
        data = data[: 2 * n]
    crc = text(lead, "LeadDataCRC32")
    if crc is not None and crc.isdigit() and zlib.crc32(data) != int(crc):
        raise fail("bad_crc", f"GE MUSE: lead {index + 1} waveform fails its CRC-32 check")
    if len(data) % 2:
        data = data[:-1]
    units = (text(lead, "LeadAmplitudeUnits") or "MICROVOLTS").upper()
    if units not in _UNITS_TO_MV:
        raise fail("unsupported", "GE MUSE: amplitude units are not volts")
    per_bit = to_float(text(lead, "LeadAmplitudeUnitsPerBit") or "4.88", "LeadAmplitudeUnitsPerBit")
    return raw_name, np.frombuffer(data, dtype="<i2"), per_bit * _UNITS_TO_MV[units]


def _demographics(root) -> Demographics:
    pat = child(root, "PatientDemographics")
    test = child(root, "TestDemographics")
    demo = Demographics(
        patient_id=text(pat, "PatientID"),
        sex=normalise_sex(text(pat, "Gender")),
        birth_date=parse_date(text(pat, "DateofBirth")),
        device=text(test, "AcquisitionDevice"),
    )
    age, units = text(pat, "PatientAge"), (text(pat, "AgeUnits") or "YEARS").upper()
    if age is not None:
        try:
            a = float(age)
            demo.age = {"YEARS": a, "MONTHS": a / 12, "WEEKS": a / 52, "DAYS": a / 365}.get(units)
        except ValueError:
            pass
    day = parse_date(text(test, "AcquisitionDate"))
    if day is not None:
        t = _dt.datetime.combine(day, _dt.time())
        clock = text(test, "AcquisitionTime") or ""
        try:
            h, m, s = (int(x) for x in (clock.split(":") + ["0", "0"])[:3])
            t = t.replace(hour=h, minute=m, second=s)
        except ValueError:
            pass
        demo.acquired = t
    for stmt in root.iter("DiagnosisStatement"):
        s = text(stmt, "StmtText")
        if s:
            demo.statements.append(s)
    return demo


def read_muse(data: bytes, path: str, record_id: str, policy: DeidPolicy) -> Record:
    root = parse_root(data, "GE MUSE", ROOT, "GE MUSE RestingECG")
    rhythm = None
    for wf in root.iter("Waveform"):
        kind = (text(wf, "WaveformType") or "").lower()
        if kind == "rhythm":
            rhythm = wf
            break
    if rhythm is None:
        raise fail("no_signal", "GE MUSE: no Rhythm waveform block")
    base = to_float(text(rhythm, "SampleBase"), "GE MUSE SampleBase")
    exponent = to_float(text(rhythm, "SampleExponent") or "0", "GE MUSE SampleExponent")
    fs = base * 10.0**exponent
    leads = {}
    for index, lead in enumerate(rhythm.iter("LeadData")):
        name, samples, gain = _decode_lead(lead, index)
        leads[normalise_lead_name(name)] = (name, samples, gain)
    if not leads:
        raise fail("no_signal", "GE MUSE: the Rhythm block holds no leads")
    n = min(len(s) for _, s, _ in leads.values())
    mv = {k: s[:n].astype(np.float64) * g for k, (_, s, g) in leads.items()}
    originals = {k: name for k, (name, _, _) in leads.items()}
    if "I" in mv and "II" in mv:
        for k, v in derive_limb_leads(mv["I"], mv["II"]).items():
            if k not in mv:
                mv[k] = v
                originals[k] = k
    names = [k for k in ORDER if k in mv] + [k for k in mv if k not in ORDER]
    signal = np.stack([mv[k] for k in names], axis=1) if n else np.zeros((0, len(names)))
    demo = _demographics(root)
    version = text(root, "MuseInfo", "MuseVersion")
    meta = policy.meta(demo, FORMAT, schema_version=version)
    rec = make_record(
        record_id, path, fs, signal, [originals[k] for k in names], meta, policy, "GE MUSE"
    )
    return rec
