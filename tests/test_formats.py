"""Hospital exports (issue 11): every fixture decodes, cross-format pairs agree, no
identifier leaves the reader, broken files give a clean RecordError, ISHNE is bounded."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import os
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
from conftest import data_path
from gcs_emulator import gcs  # noqa: F401  (pytest fixture)

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.formats import (
    DeidPolicy,
    export_record_id,
    is_export_file,
    philips_xml,
    read_export,
    read_export_bytes,
    scp_ecg,
    sniff_format,
)
from ecgtok.transforms.formats.deid import MAX_AGE
from ecgtok.transforms.formats.ishne import open_ishne, read_ishne_annotations


def fmt_path(*parts: str) -> str:
    return data_path("formats", *parts)


# (folder, file, leads, fs, samples per lead) as each SOURCE.md states
FIXTURES = [
    ("ge-muse-xml", "braveheart_example1.xml", 12, 500.0, 5000),
    ("ge-muse-xml", "braveheart_example2.xml", 12, 500.0, 5000),
    ("ge-muse-xml", "musephi_muse_ecg1.xml", 12, 500.0, 5000),
    ("ge-muse-xml", "musephi_muse_ecg2.xml", 12, 500.0, 5000),
    ("hl7-aecg", "fda_minimum_aecg.xml", 1, 500.0, 13),
    ("hl7-aecg", "hl7_example_aECG.xml", 12, 500.0, 5000),
    ("hl7-aecg", "jhu_calecg2_example2.xml", 12, 1000.0, 10000),
    ("hl7-aecg", "philips_ad4d3d80-d165_converted_aecg.xml", 12, 500.0, 5500),
    ("philips-xml", "sierra_1-03_129DYPRG.xml", 12, 500.0, 5500),
    ("philips-xml", "sierra_1-04-01_2020-5-18_15-48-11.xml", 12, 500.0, 5500),
    ("philips-xml", "sierra_1-04_3191723_ZZDEMOPTONLY.xml", 12, 500.0, 5500),
    ("philips-xml", "sierra_1-04_ad4d3d80-d165_orig.xml", 12, 500.0, 5500),
    ("dicom-ecg", "ge_maclab_hemodynamic_test_ecg.dcm", 12, 240.0, 2400),
    ("scp-ecg", "ecgtoolkit_Example.scp", 12, 500.0, 5000),
    ("scp-ecg", "ecgviewer_demo.scp", 8, 1000.0, 10000),
    ("scp-ecg", "welchallyn_cardiocontrol_ANON000004.SCP", 8, 1e6 / 1667, 6000),
    ("scp-ecg", "welchallyn_cardiocontrol_ANON000009.SCP", 8, 1e6 / 1667, 6000),
    ("ishne-holter", "ECG_P28.01.ecg", 12, 1000.0, 95573),
]
FORMAT_OF = {
    "ge-muse-xml": "ge_muse_xml",
    "hl7-aecg": "hl7_aecg",
    "philips-xml": "philips_xml",
    "dicom-ecg": "dicom_ecg",
    "scp-ecg": "scp_ecg",
    "ishne-holter": "ishne",
}
STD12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _read(folder: str, name: str, policy: DeidPolicy | None = None):
    path = fmt_path(folder, name)
    if folder == "dicom-ecg":
        pytest.importorskip("pydicom")
    return read_export(path, export_record_id(path, policy), policy)


def _pydicom_ecg() -> str:
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    return get_testdata_file("waveform_ecg.dcm")


@pytest.mark.parametrize("folder,name,leads,fs,n", FIXTURES, ids=[f[1] for f in FIXTURES])
def test_fixture_decodes(folder, name, leads, fs, n):
    rec = _read(folder, name)
    assert rec.signal.shape == (n, leads)
    assert rec.signal.dtype == np.float32
    assert rec.fs == pytest.approx(fs, rel=1e-4)
    assert rec.meta["format"] == FORMAT_OF[folder]
    assert np.isfinite(rec.signal).all()
    if n > 100:
        assert 0.05 < np.abs(rec.signal).max() < 50  # mV, not uV or V
    if leads >= 8:
        assert {"I", "II", "V1", "V6"} <= set(rec.lead_names)
    if leads == 12:
        assert sorted(rec.lead_names) == sorted(STD12)
    with open(fmt_path(folder, name), "rb") as f:
        assert sniff_format(f.read(4096), name) == FORMAT_OF[folder]


def test_dicom_pydicom_waveform_ecg():
    path = _pydicom_ecg()
    rec = read_export(path, "dcm")
    assert rec.signal.shape == (10000, 12)  # RHYTHM group, not the 1200-sample median
    assert rec.fs == 1000.0
    assert rec.lead_names == STD12
    assert rec.original_lead_names[0] == "Lead I"  # "(Einthoven)" dropped
    import pydicom

    ref = pydicom.dcmread(path).waveform_array(0) * 1e-3  # uV -> mV
    np.testing.assert_allclose(rec.signal, ref, atol=1e-6)


def _by_lead(rec, names):
    return rec.signal[:, [rec.lead_names.index(k) for k in names]].astype(np.float64)


def test_scp_equals_its_aecg_original():
    """scp-ecg/ecgtoolkit_Example.scp is hl7-aecg/hl7_example_aECG.xml converted: exact."""
    scp = _read("scp-ecg", "ecgtoolkit_Example.scp")
    xml = _read("hl7-aecg", "hl7_example_aECG.xml")
    assert scp.fs == xml.fs and scp.signal.shape == xml.signal.shape
    diff = np.abs(_by_lead(scp, STD12) - _by_lead(xml, STD12))
    lsb = 0.0025  # 2.5 uV, both files
    assert diff.max() <= 0.5 * lsb  # Huffman + 2nd differences undone bit for bit


def test_philips_agrees_with_its_aecg_conversion():
    """The converter (TraceMasterVue) re-filtered: a few LSB of mostly 60 Hz, no offset or lag."""
    orig = _read("philips-xml", "sierra_1-04_ad4d3d80-d165_orig.xml")
    conv = _read("hl7-aecg", "philips_ad4d3d80-d165_converted_aecg.xml")
    assert orig.fs == conv.fs and orig.signal.shape == conv.signal.shape
    lsb = 0.005
    d = (_by_lead(orig, STD12) - _by_lead(conv, STD12)) / lsb
    assert np.abs(d).max() <= 5
    assert np.sqrt((d**2).mean()) <= 1.0
    assert np.abs(d.mean(axis=0)).max() <= 0.5
    lagged = np.abs(_by_lead(orig, STD12)[1:] - _by_lead(conv, STD12)[:-1]).max() / lsb
    assert lagged > 20  # a one-sample shift would not pass, so alignment is checked


def test_xli_bit_exact_against_sierraecg():
    sierraecg = pytest.importorskip("sierraecg")
    for name in [f[1] for f in FIXTURES if f[0] == "philips-xml"]:
        path = fmt_path("philips-xml", name)
        rec = read_export(path, "p")
        ref = sierraecg.read_file(path)
        for k, lead in enumerate(ref.leads):
            assert rec.lead_names[k] == lead.label
            got = np.round(rec.signal[:, k] / 0.005).astype(np.int64)
            np.testing.assert_array_equal(got, lead.samples.astype(np.int64)[: len(got)])


def test_xli_round_trip_on_synthetic_lzw():
    """A hand-made XLI chunk: literal LZW codes of the byte planes of encoded differences."""
    x = np.array([10, 12, 15, 15, 11, 4, -3, -8, -8, -5, 300, -300], dtype=np.int64)
    # decoder: x[i] = 2x[i-1] - x[i-2] - c[i], c[2] = start, c[i] = d[i-1] - 64 (i >= 3)
    c = np.zeros_like(x)
    c[2:] = 2 * x[1:-1] - x[:-2] - x[2:]
    d = np.zeros_like(x)
    d[:2] = x[:2]
    d[2:-1] = c[3:] + 64
    raw = d.astype(np.int16).view(np.uint16)
    planes = bytes((raw >> 8).astype(np.uint8)) + bytes((raw & 0xFF).astype(np.uint8))
    codes = list(planes) + [1023]  # literal codes only, then end of stream
    bits = "".join(format(code, "010b") for code in codes)
    bits += "0" * (-len(bits) % 8)
    packed = int(bits, 2).to_bytes(len(bits) // 8, "big")
    chunk = struct.pack("<iHh", len(packed), 0, int(c[2])) + packed
    (out,) = philips_xml.xli_decode(chunk)
    np.testing.assert_array_equal(out, x)
    # a repeated pattern exercises dictionary codes (and the KwKwK case)
    assert philips_xml.lzw_decode(_lzw_encode(b"abababababab" * 20)) == b"abababababab" * 20
    with pytest.raises(philips_xml.XliError):
        philips_xml.xli_decode(chunk[:-3])  # size field now exceeds the data
    with pytest.raises(philips_xml.XliError):
        philips_xml.lzw_decode(bytes([0xFF, 0x40]))  # first code 1021 is undefined


def _lzw_encode(data: bytes, bits: int = 10) -> bytes:
    table = {bytes([i]): i for i in range(256)}
    out, w = [], b""
    for ch in data:
        wc = w + bytes([ch])
        if wc in table:
            w = wc
            continue
        out.append(table[w])
        if len(table) <= (1 << bits) - 2:
            table[wc] = len(table)
        w = bytes([ch])
    out.append(table[w])
    out.append((1 << bits) - 1)
    s = "".join(format(code, f"0{bits}b") for code in out)
    s += "0" * (-len(s) % 8)
    return int(s, 2).to_bytes(len(s) // 8, "big")


def test_muse_derived_leads():
    path = fmt_path("ge-muse-xml", "musephi_muse_ecg1.xml")
    rec = read_export(path, "m")
    with open(path, "rb") as f:
        text = f.read().decode("latin-1")
    rhythm = text[text.index("<WaveformType>Rhythm") :]
    blocks = re.findall(
        r"<LeadID>(\w+)</LeadID>.*?<WaveFormData>(.*?)</WaveFormData>", rhythm, re.S
    )
    raw = {
        k: np.frombuffer(base64.b64decode("".join(v.split())), "<i2") * 4.88e-3 for k, v in blocks
    }
    assert sorted(raw) == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    got = {k: rec.signal[:, i].astype(np.float64) for i, k in enumerate(rec.lead_names)}
    for k in raw:
        np.testing.assert_allclose(got[k], raw[k], atol=1e-6)
    i, ii = raw["I"], raw["II"]
    np.testing.assert_allclose(got["III"], ii - i, atol=1e-5)
    np.testing.assert_allclose(got["aVR"], -(i + ii) / 2, atol=1e-5)
    np.testing.assert_allclose(got["aVL"], i - ii / 2, atol=1e-5)
    np.testing.assert_allclose(got["aVF"], ii - i / 2, atol=1e-5)
    assert rec.lead_names == STD12


def test_muse_crc_catches_altered_samples():
    path = fmt_path("ge-muse-xml", "braveheart_example1.xml")
    with open(path, "rb") as f:
        data = f.read()
    rhythm = data.index(b"<WaveformType>Rhythm")
    i = data.index(b"<WaveFormData>", rhythm) + len(b"<WaveFormData>")
    while data[i : i + 1] in b" \r\n\t":
        i += 1
    swapped = b"B" if data[i : i + 1] != b"B" else b"C"
    bad = data[:i] + swapped + data[i + 1 :]
    with pytest.raises(RecordError) as e:
        read_export_bytes(bad, path, "m")
    assert e.value.error_type == "bad_crc"


# Identifiers written in the fixtures (names, IDs, birth and acquisition dates, staff,
# sites, free text). None may appear anywhere in the Record or its errors.
IDENTIFIERS = {
    ("ge-muse-xml", "musephi_muse_ecg1.xml"): [
        "JAX01234",
        "TEST 05",
        "Doe, John",
        "123456",
        "LAST",
        "FIRST",
        "2021-05-10",
        "05-10-2021",
        "Research",
        "10173",
        "Confirmed by",
    ],
    ("ge-muse-xml", "musephi_muse_ecg2.xml"): ["JAX12345", "TEST 04", "LAST", "FIRST"],
    ("hl7-aecg", "hl7_example_aECG.xml"): [
        "Clark",
        "SBJ-123",
        "19530508",
        "1953-05-08",
        "JMK",
        "KAB",
        "TECH-221",
        "John Smith",
        "River City",
        "2002-11-22",
        "20021122",
        "dizzy",
    ],
    ("hl7-aecg", "jhu_calecg2_example2.xml"): ["106_ABC", "19710616", "1971-06-16"],
    ("hl7-aecg", "philips_ad4d3d80-d165_converted_aecg.xml"): ["2008-12-23", "ad4d3d80"],
    ("philips-xml", "sierra_1-03_129DYPRG.xml"): [
        "1112010721168bdc",
        "2011-12-01",
        "GE EMS",
        "129DYPRG",
    ],
    ("philips-xml", "sierra_1-04_3191723_ZZDEMOPTONLY.xml"): [
        "ZZDEMOPTONLY",
        "3191723",
        "EKG1715",
        "1950-01-01",
        "2010-01-19",
    ],
    ("philips-xml", "sierra_1-04_ad4d3d80-d165_orig.xml"): [
        "ad4d3d80",
        "EKG16296",
        "1976-01-01",
        "2008-12-23",
        "134742",
        "ELECTROLYTE",
    ],
    ("philips-xml", "sierra_1-04-01_2020-5-18_15-48-11.xml"): [
        "xxxxxx",
        "US71621374",
        "1951-01-01",
        "2020-05-18",
        "PLACE",
    ],
    ("dicom-ecg", "ge_maclab_hemodynamic_test_ecg.dcm"): [
        "Patient^Test",
        "Test Hospital",
        "1999-12-23",
        "19991223",
    ],
    ("scp-ecg", "ecgtoolkit_Example.scp"): ["Clark", "SBJ-123"],
    ("scp-ecg", "ecgviewer_demo.scp"): ["12-678-QW", "Patient Demo"],
    ("scp-ecg", "welchallyn_cardiocontrol_ANON000004.SCP"): ["ANON000004", "2000-01-01", "REMOV"],
    ("ishne-holter", "ECG_P28.01.ecg"): ["2000-01-01", "ECG_P28"],
}


def _visible(rec) -> str:
    """Everything of a Record a writer could emit, except the float samples."""
    shown = dataclasses.replace(rec, signal=np.zeros(0, dtype=np.float32))
    return repr(shown) + json.dumps(rec.meta, default=str) + rec.record_id + rec.source_path


@pytest.mark.parametrize("key", list(IDENTIFIERS), ids=[k[1] for k in IDENTIFIERS])
def test_no_identifier_reaches_the_record(key):
    folder, name = key
    for policy in (DeidPolicy(), DeidPolicy(key=b"site secret")):
        rec = _read(folder, name, policy)
        seen = _visible(rec).lower()
        for ident in IDENTIFIERS[key]:
            assert ident.lower() not in seen, ident
        assert set(rec.meta) <= {
            "age",
            "sex",
            "dx",
            "format",
            "device",
            "patient_key",
            "acquired",
            "schema_version",
            "sop_class",
        }
        assert rec.meta["dx"] == []
        assert rec.meta["age"] is None or rec.meta["age"] <= MAX_AGE


def test_no_identifier_in_pydicom_test_file():
    path = _pydicom_ecg()
    rec = read_export(path, export_record_id(path), DeidPolicy(key=b"k"))
    seen = _visible(rec).lower()
    for ident in ["642341", "19710123", "1971-01-23", "Galliera", "2013-01-25", "20130125"]:
        assert ident.lower() not in seen


def test_pseudonym_key_date_shift_and_carry():
    path = fmt_path("hl7-aecg", "hl7_example_aECG.xml")
    plain = read_export(path, "r", DeidPolicy())
    assert plain.meta["patient_key"] is None and plain.meta["acquired"] is None
    keyed = read_export(path, "r", DeidPolicy(key=b"k1"))
    again = read_export(path, "r", DeidPolicy(key=b"k1"))
    other = read_export(path, "r", DeidPolicy(key=b"k2"))
    assert re.fullmatch(r"[0-9a-f]{32}", keyed.meta["patient_key"])
    assert keyed.meta["patient_key"] == again.meta["patient_key"] != other.meta["patient_key"]
    true_time = dt.datetime(2002, 11, 22, 9, 10)
    shifted = dt.datetime.fromisoformat(keyed.meta["acquired"])
    assert shifted != true_time and abs((shifted - true_time).days) <= 365
    assert (shifted - true_time).seconds == 0  # whole days: time of day and intervals kept
    carried = read_export(path, "r", DeidPolicy(key=b"k1", carry_identifiers=True))
    assert carried.meta["patient_id"] == "SBJ-123"
    assert carried.meta["acquired"] == true_time.isoformat()
    assert carried.source_path == path
    muse = read_export(
        fmt_path("ge-muse-xml", "musephi_muse_ecg1.xml"), "m", DeidPolicy(carry_identifiers=True)
    )
    assert any("Paced" in s or "paced" in s for s in muse.meta["dx"])


def test_record_id_hides_the_file_name():
    path = fmt_path("philips-xml", "sierra_1-04_3191723_ZZDEMOPTONLY.xml")
    plain, keyed = export_record_id(path), export_record_id(path, DeidPolicy(key=b"k"))
    assert plain != keyed
    assert export_record_id(path, DeidPolicy(key=b"k")) == keyed
    for rid in (plain, keyed):
        assert re.fullmatch(r"x[0-9a-f]{24}", rid)
    assert "ZZDEMOPTONLY" in export_record_id(path, DeidPolicy(carry_identifiers=True))
    rec = read_export(path, keyed, DeidPolicy(key=b"k"))
    assert rec.source_path == f"export:{keyed}"


ALL_FILES = [(f[0], f[1]) for f in FIXTURES]


@pytest.mark.parametrize("folder,name", ALL_FILES, ids=[f[1] for f in ALL_FILES])
def test_truncated_and_corrupted_files_give_record_errors(folder, name):
    path = fmt_path(folder, name)
    with open(path, "rb") as f:
        data = f.read()
    if name.endswith(".ecg"):  # ISHNE: in and after the header, in the samples
        cuts = [0, 100, 521, 600, len(data) // 2, len(data) - 1]
    else:  # the last cut drops the final '>' of the document
        cuts = [0, 10, 300, len(data) // 3, len(data) // 2, len(data) - 1]
        if b"<" in data[:600].replace(b"\0", b""):
            cuts[-1] = data.rindex(b">")
    for cut in cuts:
        t0 = time.perf_counter()
        with pytest.raises(RecordError) as e:
            read_export_bytes(data[:cut], path, "rid")
        assert e.value.stage == "read"
        assert name not in e.value.message and path not in str(e.value)
        assert time.perf_counter() - t0 < 5
    rng = np.random.default_rng(0)
    for _ in range(12):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), size=3):
            bad[pos] = int(rng.integers(0, 256))
        t0 = time.perf_counter()
        try:
            rec = read_export_bytes(bytes(bad), path, "rid")
            assert np.isfinite(rec.signal).all()
        except RecordError as e:
            assert name not in e.message
        assert time.perf_counter() - t0 < 5


def test_scp_crc_and_length_checks():
    path = fmt_path("scp-ecg", "welchallyn_cardiocontrol_ANON000009.SCP")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    bad = bytearray(data)
    bad[3000] ^= 0x10
    with pytest.raises(RecordError) as e:
        read_export_bytes(bytes(bad), path, "s")
    assert e.value.error_type == "bad_crc"
    # fix the file CRC: the section CRC must still catch it
    bad[0:2] = struct.pack("<H", binascii.crc_hqx(bytes(bad[2:]), 0xFFFF))
    with pytest.raises(RecordError) as e:
        read_export_bytes(bytes(bad), path, "s")
    assert e.value.error_type == "bad_crc" and "section 6" in e.value.message


def _table_in_file_format(table: list[tuple[str, int, int, int]]) -> bytes:
    """Section 2 body for one table: codes stored with their bits reversed (LSB first)."""
    out = struct.pack("<HH", 1, len(table))
    for code, total, mode, value in table:
        base = int(code[::-1], 2)
        out += struct.pack("<BBBhI", len(code), total, mode, value, base)
    return out


def test_scp_huffman_table_from_section_2_matches_default():
    entries = [(c, len(c), 1, v) for c, v in scp_ecg._DEFAULT_CODES]
    entries += [(c, len(c) + n, 1, 0) for c, n in scp_ecg._DEFAULT_ESCAPES]
    tables = scp_ecg.parse_huffman_section(_table_in_file_format(entries))
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.integers(-8, 9, 500), [100, -100, 30000, -30000, 0]])
    bits = ""
    lookup = {v: c for c, v in scp_ecg._DEFAULT_CODES}
    for v in values.tolist():
        if v in lookup:
            bits += lookup[v]
        elif -128 <= v < 128:
            bits += "1111111110" + format(v & 0xFF, "08b")
        else:
            bits += "1111111111" + format(v & 0xFFFF, "016b")
    bits += "0" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    for t in (tables, scp_ecg.default_tables()):
        np.testing.assert_array_equal(scp_ecg.huffman_decode(data, len(values), t), values)
    with pytest.raises(RecordError):
        scp_ecg.huffman_decode(data[:10], len(values), tables)


def test_scp_undifference():
    x = np.array([5, -3, 8, 100, -20, 7, 7, 0], dtype=np.int64)
    d1 = np.concatenate([x[:1], np.diff(x)])
    np.testing.assert_array_equal(scp_ecg.undifference(d1, 1), x)
    d2 = x.copy()
    d2[2:] = x[2:] - 2 * x[1:-1] + x[:-2]
    np.testing.assert_array_equal(scp_ecg.undifference(d2, 2), x)


def _ishne_file(path: str, n: int, leads: int = 3, fs: int = 200) -> np.ndarray:
    head = bytearray(512)
    struct.pack_into("<iiiih", head, 0, 0, n, 522, 522, 1)
    head[18:58] = b"Jane".ljust(40, b"\0")  # first name at file offset 28
    head[98:118] = b"PAT-0042".ljust(20, b"\0")  # ID at file offset 108
    struct.pack_into("<h", head, 118, 2)  # sex: female
    struct.pack_into("<hhh", head, 122, 3, 4, 1950)  # birth date
    struct.pack_into("<h", head, 146, leads)
    struct.pack_into("<12h", head, 148, *([5, 6, 11] + [0] * 9))  # I, II, V1
    struct.pack_into("<12h", head, 196, *([2500] * 12))  # nV per unit
    struct.pack_into("<h", head, 262, fs)
    crc = binascii.crc_hqx(bytes(head), 0xFFFF)
    pattern = (np.arange(n * leads, dtype=np.int64) % 2000 - 1000).astype("<i2")
    with open(path, "wb") as f:
        f.write(b"ISHNE1.0" + struct.pack("<H", crc) + bytes(head))
        f.write(pattern.tobytes())
    return pattern.reshape(n, leads)


def test_ishne_streams_in_bounded_memory(tmp_path):
    n = 2_000_000  # 3 leads x 2 M samples = 12 MB of int16 on disk
    path = str(tmp_path / "long_holter.ecg")
    digital = _ishne_file(path, n)
    with open_ishne(path, "h") as reader:
        assert reader.n_samples == n and reader.lead_names == ["I", "II", "V1"]
        assert reader.meta["sex"] == "F" and "PAT-0042" not in _visible(reader.record(0, 10))
        tracemalloc.start()
        checked, total = 0, 0.0
        for _, chunk in reader.chunks(50_000):
            checked += len(chunk)
            total += float(chunk[:, 0].sum(dtype=np.float64))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        for start in (0, 650_000, n - 50_000):
            chunk = reader.read(start, start + 50_000)
            np.testing.assert_allclose(chunk, digital[start : start + 50_000] * 2.5e-3, rtol=1e-6)
    assert checked == n
    assert total == pytest.approx(digital[:, 0].sum(dtype=np.float64) * 2.5e-3, rel=1e-5)
    assert peak < 4 << 20, peak  # a few chunks, never the 12 MB recording
    tracemalloc.start()
    rec = read_export(path, "h")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rec.signal.shape == (n, 3)
    assert peak < rec.signal.nbytes + (6 << 20)  # the output plus one read block


def test_ishne_header_crc_and_length(tmp_path):
    path = str(tmp_path / "h.ecg")
    _ishne_file(path, 1000)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    bad = bytearray(data)
    bad[300] ^= 1
    with pytest.raises(RecordError) as e:
        read_export_bytes(bytes(bad), "h.ecg", "h")
    assert e.value.error_type == "bad_crc"
    with pytest.raises(RecordError) as e:
        read_export_bytes(bytes(data[:-2]), "h.ecg", "h")
    assert e.value.error_type == "truncated"
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(RecordError) as e:
        read_export(path, "h")
    assert e.value.error_type == "truncated"
    with pytest.raises(RecordError) as e:
        read_export(str(tmp_path / "absent.ecg"), "h")
    assert e.value.error_type == "missing_file"


AECG_TWO_SETS = b"""<?xml version="1.0"?>
<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<component><series><code code="RHYTHM"/>
%s
</series></component></AnnotatedECG>"""
SEQ_SET = b"""<component><sequenceSet>
<component><sequence><code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ">
<head value="%s" unit="s"/><increment value="2" unit="ms"/></value></sequence></component>
%s
</sequenceSet></component>"""
LEAD = b"""<component><sequence><code code="MDC_ECG_LEAD_%s"/><value xsi:type="SLIST_PQ">
<origin value="0" unit="uV"/><scale value="5" unit="uV"/><digits>%s</digits></value></sequence></component>"""


def test_aecg_sequence_sets_on_one_time_axis():
    """Leads recorded in turn (two sequence sets, different heads, lead order V1 before I)."""
    set1 = SEQ_SET % (b"0", LEAD % (b"V1", b"1 2 3 4") + LEAD % (b"I", b"5 6 7 8"))
    set2 = SEQ_SET % (b"0.004", LEAD % (b"AVF", b"10 20 30 40"))
    rec = read_export_bytes(AECG_TWO_SETS % (set1 + set2), "a.xml", "a")
    assert rec.fs == 500.0
    assert rec.lead_names == ["I", "aVF", "V1"]
    expected = np.array(
        [[5, 0, 1], [6, 0, 2], [7, 10, 3], [8, 20, 4], [0, 30, 0], [0, 40, 0]], dtype=float
    )
    np.testing.assert_allclose(rec.signal, expected * 5e-3, atol=1e-7)


def test_sniffing_and_suffixes():
    assert sniff_format(b"<?xml version='1.0'?>\n<!-- c -->\n<RestingECG>") == "ge_muse_xml"
    assert (
        sniff_format(b'<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n<RestingECG>') == "ge_muse_xml"
    )
    assert sniff_format(b'<v3:AnnotatedECG xmlns:v3="urn:hl7-org:v3">') == "hl7_aecg"
    assert (
        sniff_format("<?xml version='1.0' encoding='utf-16'?><restingecgdata>".encode("utf-16"))
        == "philips_xml"
    )
    assert sniff_format(b"<?xml version='1.0'?><html>", "x.xml") is None
    assert sniff_format(b"\0" * 128 + b"DICM", "x") == "dicom_ecg"
    assert sniff_format(b"ISHNE1.0" + b"\0" * 20, "x.ecg") == "ishne"
    assert sniff_format(b"ANN  1.0" + b"\0" * 20, "x.ann") is None
    with open(fmt_path("scp-ecg", "ecgtoolkit_Example.scp"), "rb") as f:
        scp = f.read()
    assert sniff_format(scp[:4096], "renamed.ecg") == "scp_ecg"  # v2 magic, any name
    assert is_export_file("a/b/c.XML") and is_export_file("gs://b/x.dcm")
    assert not is_export_file("a/b.ann") and not is_export_file("a/b.hea")
    assert not is_export_file("x.xml", b"<?xml version='1.0'?><html>")
    with pytest.raises(RecordError) as e:
        read_export(fmt_path("ishne-holter", "ECG_P28.01.ann"), "a")
    assert e.value.error_type == "unknown_format"
    with pytest.raises(RecordError) as e:
        read_export(os.path.join(os.path.dirname(__file__), "no_such_export.xml"), "a")
    assert e.value.error_type == "missing_file"


def test_xml_entities_refused():
    bomb = b"""<?xml version="1.0"?><!DOCTYPE RestingECG [<!ENTITY a "aaaaaaaaaa">
<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><RestingECG>&b;</RestingECG>"""
    with pytest.raises(RecordError) as e:
        read_export_bytes(bomb, "x.xml", "x")
    assert e.value.error_type == "bad_xml"


def test_exports_read_from_gcs(gcs):  # noqa: F811
    """gs:// URLs through Beam's FileSystems (ISHNE by ranges), same Records as local."""
    for folder, name in [
        ("ge-muse-xml", "musephi_muse_ecg1.xml"),
        ("philips-xml", "sierra_1-04_ad4d3d80-d165_orig.xml"),
        ("scp-ecg", "ecgtoolkit_Example.scp"),
        ("ishne-holter", "ECG_P28.01.ecg"),
    ]:
        local = fmt_path(folder, name)
        url = gcs.upload(local, f"exports/{name}")
        assert url.startswith("gs://")
        remote, ref = read_export(url, "r"), read_export(local, "r")
        np.testing.assert_array_equal(remote.signal, ref.signal)
        assert remote.lead_names == ref.lead_names and remote.meta == ref.meta
        assert name not in remote.source_path
    with open_ishne(gcs.url("exports/ECG_P28.01.ecg"), "r") as reader:
        first = next(reader.chunks(1000))[1]
    np.testing.assert_array_equal(first, ref.signal[:1000])
    with pytest.raises(RecordError) as e:
        read_export(gcs.url("exports/absent.xml"), "r")
    assert e.value.error_type == "missing_file"


def test_ishne_beats_match_its_annotation_file():
    """The decoded Holter against its .ann: the project's R peaks sit on the N beats."""
    from ecgtok.transforms.record_tokens import find_beats

    rec = _read("ishne-holter", "ECG_P28.01.ecg")
    samples, labels = read_ishne_annotations(fmt_path("ishne-holter", "ECG_P28.01.ann"))
    assert len(labels) == len(samples) == 97 and labels.count("N") == 87
    beats = np.array([s for s, lab in zip(samples, labels) if lab == "N"])
    peaks, _ = find_beats(rec)
    dist = np.abs(peaks[None, :] - beats[:, None]).min(axis=1) / rec.fs
    assert (dist < 0.05).mean() >= 0.95  # within 50 ms
    from ecgtok.transforms.formats.ishne import parse_ishne_annotations

    with open(fmt_path("ishne-holter", "ECG_P28.01.ann"), "rb") as f:
        data = f.read()
    assert data[8:10] == b"\0\0"  # this writer leaves the header CRC unset
    for bad, kind in [(data[:300], "truncated"), (b"ANN  2.0" + data[8:], "unknown_format")]:
        with pytest.raises(RecordError) as e:
            parse_ishne_annotations(bad)
        assert e.value.error_type == kind
    signed = bytearray(data)
    signed[8:10] = struct.pack("<H", binascii.crc_hqx(data[10:522], 0xFFFF))
    assert len(parse_ishne_annotations(bytes(signed))[0]) == 97
    signed[200] ^= 1
    with pytest.raises(RecordError) as e:
        parse_ishne_annotations(bytes(signed))
    assert e.value.error_type == "bad_crc"
