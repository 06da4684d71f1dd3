"""DICOM waveform ECGs: 12-lead, general ECG, ambulatory and hemodynamic SOP classes.

Decoded with pydicom (`Dataset.waveform_array`, which applies each channel's
sensitivity, correction factor and baseline). The recording is the multiplex group
labelled RHYTHM, else the longest group that is not a median beat. Channels whose
sensitivity is not a voltage (pressures in hemodynamic files) are left out. Every
declared size is checked against the bytes present before pydicom decodes anything.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import re
import warnings

import numpy as np

from ecgtok.transforms.formats._common import MAX_LEADS, MAX_VALUES, fail, make_record
from ecgtok.transforms.formats.deid import DeidPolicy, Demographics, normalise_sex, parse_date
from ecgtok.transforms.wfdb_reader import Record

FORMAT = "dicom_ecg"
WAVEFORM_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "general ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "ambulatory ECG",
    "1.2.840.10008.5.1.4.1.1.9.2.1": "hemodynamic",
    "1.2.840.10008.5.1.4.1.1.9.3.1": "cardiac electrophysiology",
}
_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_BYTES = {8: 1, 16: 2, 32: 4}
_PAREN = re.compile(r"\s*\(.*\)\s*$")


def _label(ch, index: int) -> str:
    try:
        src = ch.ChannelSourceSequence[0]
        name = str(src.get("CodeMeaning") or "").strip()
    except (AttributeError, IndexError, KeyError):
        name = ""
    name = name or str(ch.get("ChannelLabel") or "").strip() or f"channel {index + 1}"
    return _PAREN.sub("", name) or name


def _unit_mv(ch) -> float | None:
    try:
        code = str(ch.ChannelSensitivityUnitsSequence[0].CodeValue).strip().lower()
    except (AttributeError, IndexError, KeyError):
        return 1e-3  # sensitivity without units: DICOM ECGs are in uV in practice
    return _TO_MV.get(code)


def _pick_group(seq) -> int:
    best, best_n = None, -1
    for i, g in enumerate(seq):
        label = str(g.get("MultiplexGroupLabel") or "").upper()
        if label == "RHYTHM":
            return i
        if "MEDIAN" in label or "BEAT" in label:
            continue
        n = int(g.get("NumberOfWaveformSamples") or 0)
        if n > best_n:
            best, best_n = i, n
    if best is None:
        raise fail("no_signal", "DICOM: only median-beat waveforms, no rhythm")
    return best


def _check_group(g, index: int) -> tuple[int, int, float]:
    try:
        n_ch = int(g.NumberOfWaveformChannels)
        n = int(g.NumberOfWaveformSamples)
        fs = float(g.SamplingFrequency)
        bits = int(g.WaveformBitsAllocated)
        interp = str(g.WaveformSampleInterpretation)
        data = g.WaveformData
    except (AttributeError, TypeError, ValueError):
        raise fail(
            "bad_header", f"DICOM: waveform group {index + 1} lacks required attributes"
        ) from None
    if not (0 < n_ch <= MAX_LEADS):
        raise fail("bad_header", f"DICOM: waveform group {index + 1} declares {n_ch} channels")
    if n <= 0 or n * n_ch > MAX_VALUES:
        raise fail("bad_header", f"DICOM: waveform group {index + 1} declares {n} samples")
    if bits not in _BYTES or interp not in ("SS", "US", "SB", "UB", "MB", "AB", "SL", "UL"):
        raise fail("unsupported", f"DICOM: {bits}-bit {interp} waveform samples are not supported")
    if data is None or len(data) < n * n_ch * _BYTES[bits]:
        raise fail("truncated", "DICOM: waveform data is shorter than the declared samples")
    if len(g.ChannelDefinitionSequence) != n_ch:
        raise fail("bad_header", "DICOM: channel definitions do not match the channel count")
    return n_ch, n, fs


def _dicom_datetime(ds) -> _dt.datetime | None:
    value = str(ds.get("AcquisitionDateTime") or "").strip()
    if len(value) >= 8:
        from ecgtok.transforms.formats.deid import parse_hl7_ts

        return parse_hl7_ts(value)
    day = parse_date(str(ds.get("ContentDate") or ds.get("StudyDate") or ""))
    return _dt.datetime.combine(day, _dt.time()) if day else None


def _demographics(ds) -> Demographics:
    demo = Demographics(
        patient_id=str(ds.get("PatientID") or "").strip() or None,
        sex=normalise_sex(ds.get("PatientSex")),
        birth_date=parse_date(str(ds.get("PatientBirthDate") or "")),
        acquired=_dicom_datetime(ds),
    )
    age = str(ds.get("PatientAge") or "").strip()  # nnnD/W/M/Y
    if len(age) == 4 and age[:3].isdigit():
        demo.age = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(age[3].upper(), 0) * int(
            age[:3]
        ) or None
    make = " ".join(
        str(ds.get(k) or "").strip() for k in ("Manufacturer", "ManufacturerModelName")
    ).strip()
    demo.device = make or None
    return demo


def read_dicom(data: bytes, path: str, record_id: str, policy: DeidPolicy) -> Record:
    # pydicom's validation warnings quote element values (names, IDs): never let them out
    logging.getLogger("pydicom").disabled = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(data, path, record_id, policy)


def _read_dicom(data: bytes, path: str, record_id: str, policy: DeidPolicy) -> Record:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise fail(
            "missing_dependency", "DICOM exports need pydicom (pip install pydicom)"
        ) from None

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        sop = str(ds.get("SOPClassUID") or "")
        seq = ds.get("WaveformSequence")
    except InvalidDicomError:
        raise fail("bad_dicom", "DICOM: not a DICOM file") from None
    except Exception as e:  # pydicom raises many types on damaged files
        raise fail(
            "bad_dicom", f"DICOM: file is damaged or truncated ({type(e).__name__})"
        ) from None
    if not seq:
        if sop and sop not in WAVEFORM_SOP_CLASSES:
            raise fail(
                "unsupported", "DICOM: not a waveform object (SOP class is not an ECG waveform)"
            )
        raise fail("no_signal", "DICOM: file holds no WaveformSequence")
    try:
        index = _pick_group(seq)
        group = seq[index]
        n_ch, n, fs = _check_group(group, index)
        channels = list(group.ChannelDefinitionSequence)
        units = [_unit_mv(ch) for ch in channels]
        keep = [i for i, u in enumerate(units) if u is not None]
        if not keep:
            raise fail("no_signal", "DICOM: no channel is a voltage (no ECG leads)")
        arr = ds.waveform_array(index)
    except Exception as e:
        if hasattr(e, "stage"):
            raise
        raise fail("bad_dicom", f"DICOM: waveform cannot be decoded ({type(e).__name__})") from None
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape != (n, n_ch):
        raise fail("bad_dicom", "DICOM: decoded waveform does not match the declared size")
    signal = arr[:, keep] * np.array([units[i] for i in keep])
    names = [_label(channels[i], i) for i in keep]
    demo = _demographics(ds)
    meta = policy.meta(demo, FORMAT, sop_class=WAVEFORM_SOP_CLASSES.get(sop, sop or None))
    return make_record(record_id, path, fs, signal, names, meta, policy, "DICOM")
