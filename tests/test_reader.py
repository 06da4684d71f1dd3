"""The WFDB/EDF reader against wfdb-python on its own fixtures, and on broken records."""

from __future__ import annotations

import glob
import os
import shutil
import tracemalloc
import warnings

import numpy as np
import pytest

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.wfdb_reader import _unit_scale, open_record, read_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, os.environ.get("ECGTOK_DATA", "../shared/data")))
SAMPLE = os.path.join(DATA, "wfdb_sample")


def _need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"shared data not found: {path}")
    return path


def _sample_headers() -> list[str]:
    if not os.path.isdir(SAMPLE):
        return []
    found = glob.glob(os.path.join(SAMPLE, "**", "*.hea"), recursive=True)
    return sorted(os.path.relpath(h, SAMPLE) for h in found)


# Fixtures that must not decode, and why. Everything else in wfdb_sample must decode
# and match wfdb.rdrecord.
EXPECTED_ERRORS = {
    # Signal file left out of the copy (SOURCE.md).
    "1003.hea": "missing_signal_file",
    "12726.hea": "missing_signal_file",
    "drive02.hea": "missing_signal_file",
    "drive02-no-len.hea": "missing_signal_file",
    "n16.hea": "missing_signal_file",
    "n8_evoked_raw_95_F1_R9.hea": "missing_signal_file",
    "wave_4.hea": "missing_signal_file",
    "multi-segment/s00001/3975656_0009.hea": "missing_signal_file",
    "multi-segment/s00001/3975656_0010.hea": "missing_signal_file",
    "multi-segment/s00001/3975656_0011.hea": "missing_signal_file",
    "multi-segment/s00001/s00001-2896-10-10-00-31.hea": "missing_signal_file",
    # Only 2 of its 32 segment headers were copied.
    "multi-segment/p000878/p000878-2137-10-26-16-57.hea": "missing_segment",
    # Layout headers describe channels, hold no samples (and are not records).
    "multi-segment/p000878/3269321_layout.hea": "empty_record",
    "multi-segment/s00001/3248903_layout.hea": "empty_record",
    "multi-segment/s00001/3975656_layout.hea": "empty_record",
    "multi-segment/s25047/3234460_layout.hea": "empty_record",
    # Numerics records: one frame a minute is far below 50 Hz.
    "multi-segment/s00001/s00001-2896-10-09-01-56n.hea": "bad_sampling_rate",
    "multi-segment/s00001/s00001-2896-10-10-00-31n.hea": "bad_sampling_rate",
    "multi-segment/s25047/s25047-2704-05-04-10-44n.hea": "bad_sampling_rate",
}
SLOW = {"flac_3_constant.hea", "100.hea", "100-no-len.hea", "100skew.hea"}


def _params():
    out = []
    for rel in _sample_headers():
        marks = [pytest.mark.slow] if rel in SLOW else []
        out.append(pytest.param(rel, marks=marks, id=rel))
    return out or [pytest.param("absent", marks=pytest.mark.skip("no wfdb_sample"))]


def _reference(hea: str):
    """wfdb's physical samples held to the record's highest rate, in mV, NaN as 0."""
    import wfdb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = wfdb.rdrecord(hea[:-4], physical=True, smooth_frames=False, m2s=True)
    m = max(len(s) for s in ref.e_p_signal) // ref.sig_len
    out = {}
    for name, x, units in zip(ref.sig_name, ref.e_p_signal, ref.units):
        x = np.asarray(x, dtype=np.float64)
        spf = len(x) // ref.sig_len
        if spf != m:
            x = np.repeat(x, m // spf)
        out[name] = np.nan_to_num(x * _unit_scale(units or "mV")[0], nan=0.0)
    return ref, m, out


@pytest.mark.parametrize("rel", _params())
def test_fixture_matches_wfdb_or_fails_clearly(rel):
    hea = os.path.join(SAMPLE, rel)
    if rel in EXPECTED_ERRORS:
        with pytest.raises(RecordError) as err:
            read_record(hea)
        assert err.value.error_type == EXPECTED_ERRORS[rel], str(err.value)
        assert err.value.stage == "read" and err.value.message
        return
    rec = read_record(hea)
    ref, m, expected = _reference(hea)
    assert rec.fs == pytest.approx(float(ref.fs) * m)
    assert rec.signal.dtype == np.float32
    assert rec.signal.shape == (ref.sig_len * m, len(rec.original_lead_names))
    for k, name in enumerate(rec.original_lead_names):
        want = expected[name]
        tol = 2e-6 * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
        np.testing.assert_allclose(rec.signal[:, k], want, rtol=0, atol=tol, err_msg=name)


def test_formats_fixture_covers_every_binary_format():
    rec = read_record(_need(os.path.join(SAMPLE, "binformats.hea")))
    fmts = [n.split("fmt ")[1] for n in rec.original_lead_names]
    assert fmts == ["8", "16", "61", "80", "160", "212", "310", "311", "24", "32"]
    flac = read_record(os.path.join(SAMPLE, "flacformats.hea"))
    assert [n.split("fmt ")[1] for n in flac.original_lead_names] == ["508", "516", "524"]


def test_frames_give_the_effective_rate():
    # 1 frame/s x 200 samples per frame is an effective 200 Hz (the example).
    rec = read_record(_need(os.path.join(SAMPLE, "test_generator_2.hea")))
    assert rec.fs == 200.0 and rec.signal.shape == (120000, 11)
    assert "EDF Annotations" not in rec.original_lead_names
    mixed = read_record(os.path.join(SAMPLE, "mixedsignals.hea"))
    assert mixed.fs == pytest.approx(62.4725 * 4)


def test_edf_matches_its_wfdb_conversion():
    edf = read_record(_need(os.path.join(SAMPLE, "test_generator_2.edf")))
    hea = read_record(os.path.join(SAMPLE, "test_generator_2.hea"))
    assert edf.fs == hea.fs == 200.0
    assert edf.original_lead_names == hea.original_lead_names
    assert edf.record_id == "test_generator_2"
    for k, unit in enumerate(edf.units):
        if unit == hea.units[k]:  # the .hea lost two non-ASCII unit names
            # The WFDB copy rounded baselines to integers: half a digital step apart.
            np.testing.assert_allclose(edf.signal[:, k], hea.signal[:, k], atol=2e-5)


def test_edf_with_only_annotations_is_an_error():
    with pytest.raises(RecordError) as err:
        read_record(_need(os.path.join(SAMPLE, "test_edfann.edf")))
    assert err.value.error_type == "no_signals"


def test_metadata_columns_from_comments():
    cinc = _need(os.path.join(DATA, "cinc2021_12lead", "CPSC_CPSC-Extra", "A0001.hea"))
    rec = read_record(cinc, "CPSC_CPSC-Extra/A0001")
    assert rec.record_id == "CPSC_CPSC-Extra/A0001"
    assert rec.meta == {"age": 74.0, "sex": "M", "dx": ["59118001"]}
    assert rec.lead_names == [
        "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
    ]  # fmt: skip
    assert rec.fs == 500.0 and rec.signal.shape == (7500, 12)
    other = read_record(os.path.join(SAMPLE, "test01_00s.hea"))
    assert other.meta["age"] == 25.0 and other.meta["sex"] == "M"


def test_lead_names_normalised_and_kept():
    rec = read_record(_need(os.path.join(SAMPLE, "s0010_re.hea")))
    assert rec.lead_names[:12] == [
        "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
    ]  # fmt: skip
    assert rec.original_lead_names[:4] == ["i", "ii", "iii", "avr"]
    holter = read_record(os.path.join(SAMPLE, "100.hea"))
    assert holter.lead_names == ["MLII", "V5"]


@pytest.mark.parametrize(
    "rel,chunk",
    [
        ("binformats.hea", 37),  # every format, format 8 differences across chunks
        ("test01_00s_skewframe.hea", 333),  # skew and 2 samples per frame
        ("multi-segment/s25047/s25047-2704-05-04-10-44.hea", 50_001),  # segments, gaps
        ("multi-segment/041s/041s.hea", 777),
        ("flacformats.hea", 100),
        ("310derive_3.hea", 7),
    ],
)
def test_chunks_equal_the_whole_record(rel, chunk):
    reader = open_record(_need(os.path.join(SAMPLE, rel)))
    whole = reader.read()
    parts = list(reader.chunks(chunk))
    assert [s for s, _ in parts] == list(range(0, reader.n_samples, chunk))
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), whole)


# ------------------------------------------------------------------------ bad input


def _copy_100(tmp_path, lines_hook=None, dat_bytes=None):
    src = _need(os.path.join(SAMPLE, "100.hea"))
    dst = tmp_path / "rec"
    dst.mkdir(exist_ok=True)
    with open(os.path.join(SAMPLE, "100.dat"), "rb") as fh:
        dat = fh.read()
    (dst / "100.dat").write_bytes(dat if dat_bytes is None else dat_bytes(dat))
    with open(src) as fh:
        text = fh.read()
    if lines_hook:
        text = lines_hook(text)
    (dst / "100.hea").write_text(text)
    return str(dst / "100.hea")


def _error(path) -> RecordError:
    with pytest.raises(RecordError) as err:
        read_record(path)
    assert err.value.stage == "read" and err.value.message
    return err.value


def test_truncated_signal_file(tmp_path):
    hea = _copy_100(tmp_path, dat_bytes=lambda b: b[: len(b) // 2])
    err = _error(hea)
    assert err.error_type == "truncated_signal_file"
    assert "100.dat" in err.message


def test_header_declaring_more_samples_than_the_file_is_an_error_without_allocating(
    tmp_path,
):
    hea = _copy_100(tmp_path, lines_hook=lambda t: t.replace("360 650000", "360 900000000000"))
    tracemalloc.start()
    try:
        err = _error(hea)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.error_type == "truncated_signal_file"
    assert peak < 5 << 20


@pytest.mark.parametrize(
    "text",
    [
        "this is not a header\n",
        "",
        "# only a comment\n",
        "rec 2 360 100\nrec.dat 212 200 11 1024 995 -22131 0 MLII\n",  # 2 signals, 1 line
        "rec/3 2 360 100\nseg1 50\n",  # 3 segments, 1 line
    ],
    ids=["prose", "empty", "comment", "signal-count", "segment-count"],
)
def test_malformed_headers(tmp_path, text):
    (tmp_path / "rec.hea").write_text(text)
    err = _error(str(tmp_path / "rec.hea"))
    assert err.error_type in ("bad_header", "signal_count_mismatch", "segment_count_mismatch")


def test_binary_garbage_header(tmp_path):
    (tmp_path / "rec.hea").write_bytes(bytes(range(256)) * 4)
    assert _error(str(tmp_path / "rec.hea")).error_type == "bad_header"


@pytest.mark.parametrize("name", ["../x.dat", "/etc/passwd", "sub/../../x.dat", "gs://b/x.dat"])
def test_unsafe_signal_file_names_are_refused(tmp_path, name):
    (tmp_path / "x.dat").write_bytes(b"\0" * 400)
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "rec.hea").write_text(f"rec 1 360 100\n{name} 16 200 16 0 0 0 0 II\n")
    assert _error(str(folder / "rec.hea")).error_type in ("unsafe_path", "bad_header")


def test_unsafe_segment_name_is_refused(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "rec.hea").write_text("rec/1 1 360 100\n../evil 100\n")
    assert _error(str(folder / "rec.hea")).error_type in ("unsafe_path", "bad_header")


@pytest.mark.parametrize(
    "record_line,kind",
    [
        ("100 2 0 650000", "bad_sampling_rate"),
        ("100 2 10 650000", "bad_sampling_rate"),
        ("100 2 30000 650000", "bad_sampling_rate"),
        ("100 2 360 0", "empty_record"),
        ("100 2 -360 650000", "bad_sampling_rate"),
        ("100 2 360 -650000", "bad_length"),
        ("100 2 abc 650000", "bad_header"),
    ],
)
def test_absurd_rates_and_lengths(tmp_path, record_line, kind):
    hea = _copy_100(tmp_path, lines_hook=lambda t: t.replace("100 2 360 650000", record_line))
    assert _error(hea).error_type == kind


def test_unsupported_format(tmp_path):
    hea = _copy_100(tmp_path, lines_hook=lambda t: t.replace("100.dat 212", "100.dat 999"))
    assert _error(hea).error_type == "unsupported_format"


def test_missing_header_and_not_a_header(tmp_path):
    assert _error(str(tmp_path / "nope.hea")).error_type == "missing_header"
    assert _error(str(tmp_path / "nope.txt")).error_type == "not_a_header"


def test_segment_length_mismatch(tmp_path):
    src = _need(os.path.join(SAMPLE, "multi-segment", "041s"))
    dst = tmp_path / "041s"
    shutil.copytree(src, dst)
    master = dst / "041s.hea"
    master.write_text(
        master.read_text().replace("041s02 1000", "041s02 1200").replace(" 2000 ", " 2200 ")
    )
    assert _error(str(master)).error_type == "segment_length_mismatch"


def test_missing_segment_header(tmp_path):
    src = _need(os.path.join(SAMPLE, "multi-segment", "041s"))
    dst = tmp_path / "041s"
    shutil.copytree(src, dst)
    os.remove(dst / "041s02.hea")
    err = _error(str(dst / "041s.hea"))
    assert err.error_type == "missing_segment" and "041s02" in err.message


def test_file_url_is_local(tmp_path):
    hea = _copy_100(tmp_path)
    rec = read_record("file://" + hea, "x")
    assert rec.signal.shape == (650000, 2) and rec.source_path.startswith("file://")


def test_truncated_edf(tmp_path):
    src = _need(os.path.join(SAMPLE, "test_generator_2.edf"))
    with open(src, "rb") as fh:
        data = fh.read()
    (tmp_path / "t.edf").write_bytes(data[: len(data) - 5000])
    err = _error(str(tmp_path / "t.edf"))
    assert err.error_type == "truncated_signal_file"
    (tmp_path / "g.edf").write_bytes(b"not an edf at all" * 20)
    assert _error(str(tmp_path / "g.edf")).error_type == "bad_header"


def test_chunked_reading_memory_does_not_grow_with_length():
    # 30 minutes of MIT-BIH read in 10 s chunks: the peak is the chunk's, not the record's.
    reader = open_record(_need(os.path.join(DATA, "mitdb", "100.hea")))
    chunk = int(10 * reader.fs)

    def peak(n_chunks: int) -> int:
        tracemalloc.start()
        for i, (_, part) in enumerate(reader.chunks(chunk)):
            del part
            if i + 1 == n_chunks:
                break
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, whole = peak(3), peak(10**9)
    record_bytes = reader.n_samples * reader.n_leads * 4
    assert whole < record_bytes / 20
    assert whole < 2 * short + (64 << 10)


def _single_headers() -> list[str]:
    return [r for r in _sample_headers() if "multi-segment" not in r or "_00" in r]


@pytest.mark.parametrize("rel", _single_headers() or ["absent"])
def test_header_parser_agrees_with_wfdb(rel):
    import wfdb

    from ecgtok.transforms.wfdb_formats import parse_header

    path = _need(os.path.join(SAMPLE, rel))
    ref = wfdb.rdheader(path[:-4])
    with open(path, "rb") as fh:
        ours = parse_header(fh.read(), rel)
    assert ours.n_sig == ref.n_sig
    assert ours.fs == pytest.approx(float(ref.fs))
    assert ours.sig_len == ref.sig_len
    assert ours.comments == ref.comments
    for i, s in enumerate(ours.signals):
        assert (s.file_name, s.fmt, s.spf) == (
            ref.file_name[i],
            ref.fmt[i],
            ref.samps_per_frame[i],
        )
        assert s.skew == (ref.skew[i] or 0) and s.byte_offset == (ref.byte_offset[i] or 0)
        assert s.gain == pytest.approx(ref.adc_gain[i]) and s.baseline == ref.baseline[i]
        assert s.units == ref.units[i]
        assert s.name == (ref.sig_name[i] or f"ch{i}")


def test_affine_columns_equal_broadcast_operations():
    from ecgtok.transforms.wfdb_reader import _affine_columns

    rng = np.random.default_rng(0)
    for n in (0, 1, 63, 64, 65, 1000, 5003):
        frames = rng.integers(-32768, 32767, (n, 12)).astype(np.int16)
        base = rng.integers(-100, 100, 12).astype(np.float32)
        factor = (1 / rng.uniform(50, 2000, 12)).astype(np.float32)
        want = np.empty((n, 12), np.float32)
        np.subtract(frames, base, out=want, casting="unsafe")
        want *= factor
        got = frames.astype(np.float32)
        _affine_columns(got, base, factor)
        np.testing.assert_array_equal(got, want)
