"""Fuzzing the parsers and decoders with Hypothesis: decoded samples or a clean error.

Every input must give either a result or a `RecordError`: never another exception, never
a hang (Hypothesis' per-example deadline), and never an allocation far beyond the
input's own size (tracemalloc). The budget per test is `ECGTOK_FUZZ_EXAMPLES` examples
(default 150), so CI runs the fuzzers with a bounded cost; raise it for a longer campaign.
"""

from __future__ import annotations

import contextlib
import os
import random
import tracemalloc

import pytest
import wfdb.io.header  # noqa: E402,F401 - warm the lazy import outside the timed examples
from conftest import data_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.wfdb_formats import BLOCK, decode_flat, parse_header

EXAMPLES = int(os.environ.get("ECGTOK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=10_000,  # a hang shows up as a deadline failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs on every CI run; raise the budget to explore
)
SLACK_BYTES = 32 << 20  # decoders may hold a few buffers of their own


def _real_headers() -> list[bytes]:
    root = data_path("wfdb_sample")
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".hea"):
            with open(os.path.join(root, name), "rb") as f:
                out.append(f.read())
    return out


def _mutate(data: bytes, seed: int, n_edits: int) -> bytes:
    """Byte flips, deletions, insertions and truncation, seeded."""
    rng = random.Random(seed)
    b = bytearray(data)
    for _ in range(n_edits):
        if not b:
            break
        op = rng.randrange(4)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            del b[i]
        elif op == 2:
            b.insert(i, rng.choice(b" 0123456789/-.x\n#:"))
        else:
            del b[i:]
    return bytes(b)


def _bounded(fn, input_size: int):
    tracemalloc.start()
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 64 * input_size + SLACK_BYTES, f"allocated {peak} bytes"


@FUZZ
@given(st.binary(max_size=2048))
def test_header_parser_random_bytes(raw):
    with contextlib.suppress(RecordError):
        _bounded(lambda: parse_header(raw), len(raw))


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 40))
def test_header_parser_mutated_real_headers(seed, n_edits):
    headers = _real_headers()
    raw = _mutate(headers[seed % len(headers)], seed, n_edits)
    with contextlib.suppress(RecordError):
        _bounded(lambda: parse_header(raw), len(raw))


@FUZZ
@given(st.sampled_from(sorted(BLOCK)), st.binary(max_size=4096), st.integers(0, 5000))
def test_fixed_width_decoders_random_bytes(fmt, buf, n_samp):
    try:
        out = _bounded(lambda: decode_flat(fmt, buf, n_samp), len(buf))
    except (RecordError, ValueError):
        # numpy refuses a count larger than the buffer: the reader checks sizes before.
        return
    assert len(out) <= max(n_samp, len(buf) * 2)


def _record_files() -> list[str]:
    root = data_path("wfdb_sample")
    names = ["100", "binformats", "flacformats", "a103l", "test01_00s_skewframe", "310derive"]
    return [os.path.join(root, n + ".hea") for n in names]


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 30), st.booleans())
def test_whole_record_read_on_mutated_headers_and_signals(tmp_path, seed, n_edits, mutate_dat):
    import wfdb

    from ecgtok.transforms.wfdb_reader import read_record

    src = _record_files()[seed % len(_record_files())]
    header = wfdb.rdheader(src[: -len(".hea")])
    import tempfile

    folder = tmp_path / "case"
    folder.mkdir(exist_ok=True)
    folder = type(tmp_path)(tempfile.mkdtemp(dir=folder))
    size = 0
    for name in dict.fromkeys(header.file_name):
        with open(os.path.join(os.path.dirname(src), name), "rb") as f:
            data = f.read()
        if mutate_dat:
            data = _mutate(data, seed + 1, n_edits)
        size += len(data)
        (folder / name).write_bytes(data)
    with open(src, "rb") as f:
        raw = _mutate(f.read(), seed, n_edits) if not mutate_dat else f.read()
    hea = folder / os.path.basename(src)
    hea.write_bytes(raw)
    try:
        rec = _bounded(lambda: read_record(str(hea), "fuzz"), size + len(raw))
    except RecordError:
        return
    assert rec.signal.ndim == 2 and rec.fs > 0


def _export_files() -> list[str]:
    root = data_path("formats")
    out = []
    for folder, _dirs, files in os.walk(root):
        out.extend(
            os.path.join(folder, f)
            for f in files
            if f.lower().endswith((".xml", ".dcm", ".scp", ".ecg"))
        )
    return sorted(out)


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 25))
def test_hospital_export_readers_on_mutated_files(seed, n_edits):
    from ecgtok.transforms.formats import read_export_bytes

    files = _export_files()
    path = files[seed % len(files)]
    with open(path, "rb") as f:
        data = _mutate(f.read(), seed, n_edits)
    try:
        rec = _bounded(lambda: read_export_bytes(data, path, "fuzz"), len(data))
    except RecordError:
        return
    assert rec.signal.ndim == 2


@pytest.mark.parametrize("n", [0, 1, 7])
def test_mutation_helper_changes_bytes(n):
    data = b"100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n"
    out = _mutate(data, 3, n)
    assert (out == data) == (n == 0)


def test_regression_header_with_a_dash_for_a_number_is_a_clean_error():
    # Found by the fuzzer: int('-') escaped as a ValueError.
    with pytest.raises(RecordError) as info:
        parse_header(b"rec 1 250 1000\nrec.dat 16 200 16 - 0 0 0 II\n")
    assert info.value.error_type == "bad_header"


def test_regression_xml_with_an_unknown_encoding_is_a_clean_error():
    # Found by the fuzzer: a mutated encoding name escaped as a LookupError.
    from ecgtok.transforms.formats import read_export_bytes

    data = b'<?xml version="1.0" encoding="Ytf-16"?><restingecgdata></restingecgdata>'
    with pytest.raises(RecordError):
        read_export_bytes(data, "x.xml", "r")
