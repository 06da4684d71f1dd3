"""gs:// end to end against a local Cloud Storage emulator: discovery and reading."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gcs_emulator import gcs  # noqa: F401  (pytest fixture)

from ecgtok.pipeline.discovery import discover
from ecgtok.transforms.errors import RecordError
from ecgtok.transforms.wfdb_reader import open_record, read_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, os.environ.get("ECGTOK_DATA", "../shared/data")))
SAMPLE = os.path.join(DATA, "wfdb_sample")
CINC = os.path.join(DATA, "cinc2021_12lead")


def _copy_files(src_dir: str, names: list[str], dst_dir: str) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(src_dir, n), os.path.join(dst_dir, n))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, gcs):  # noqa: F811
    """A small mixed archive, local and uploaded under gs://bucket/arch."""
    for path in (SAMPLE, CINC):
        if not os.path.isdir(path):
            pytest.skip(f"shared data not found: {path}")
    root = str(tmp_path_factory.mktemp("arch"))
    cpsc = os.path.join(CINC, "CPSC_CPSC-Extra")
    _copy_files(cpsc, ["A0001.hea", "A0001.mat", "A0002.hea", "A0002.mat"], f"{root}/cinc")
    _copy_files(
        SAMPLE,
        [
            "flacformats.hea",
            "flacformats.d0",
            "flacformats.d1",
            "flacformats.d2",
            "test01_00s_skewframe.hea",
            "test01_00s.dat",
            "test_generator_2.edf",
            "binformats.hea",
            *[f"binformats.d{i}" for i in range(10)],
            "n16.hea",  # its signal file is missing
        ],
        f"{root}/formats",
    )
    shutil.copytree(os.path.join(SAMPLE, "multi-segment", "041s"), f"{root}/multi/041s")
    # Variable layout, 18 segments and a gap: segments load in threads when remote.
    shutil.copytree(os.path.join(SAMPLE, "multi-segment", "s25047"), f"{root}/multi/s25047")
    # A truncated copy of a record.
    _copy_files(cpsc, ["A0003.hea", "A0003.mat"], f"{root}/bad")
    with open(f"{root}/bad/A0003.mat", "r+b") as fh:
        fh.truncate(1000)
    url = gcs.upload_tree(root, "arch")
    return root, url


def test_discover_gs_prefix_matches_local(archive):
    root, url = archive
    local = [(r.record_id, os.path.relpath(r.source_path, root)) for r in discover(root)]
    remote = [(r.record_id, r.source_path[len(url) + 1 :]) for r in discover(url)]
    assert remote == local
    assert [i for i, _ in remote] == [
        "bad/A0003",
        "cinc/A0001",
        "cinc/A0002",
        "formats/binformats",
        "formats/flacformats",
        "formats/n16",
        "formats/test01_00s_skewframe",
        "formats/test_generator_2",
        "multi/041s/041s",
        "multi/s25047/s25047-2704-05-04-10-44",
        "multi/s25047/s25047-2704-05-04-10-44n",
    ]
    # A glob over gs:// too.
    assert [r.record_id for r in discover(url + "/cinc/*.hea")] == ["A0001", "A0002"]


@pytest.mark.parametrize(
    "rel",
    [
        "cinc/A0001.hea",
        "formats/binformats.hea",
        "formats/flacformats.hea",
        "formats/test01_00s_skewframe.hea",
        "formats/test_generator_2.edf",
        "multi/041s/041s.hea",
        "multi/s25047/s25047-2704-05-04-10-44.hea",
    ],
)
def test_read_gs_equals_local(archive, rel):
    root, url = archive
    local = read_record(os.path.join(root, rel), "x")
    remote = read_record(f"{url}/{rel}", "x")
    assert remote.fs == local.fs
    assert remote.lead_names == local.lead_names
    assert remote.meta == local.meta
    np.testing.assert_array_equal(remote.signal, local.signal)


def test_gs_chunks(archive):
    root, url = archive
    reader = open_record(f"{url}/multi/041s/041s.hea")
    parts = [p for _, p in reader.chunks(1500)]
    np.testing.assert_array_equal(
        np.concatenate(parts), read_record(f"{root}/multi/041s/041s.hea").signal
    )


@pytest.mark.parametrize(
    "rel,kind",
    [
        ("bad/A0003.hea", "truncated_signal_file"),
        ("formats/n16.hea", "missing_signal_file"),
        ("formats/absent.hea", "missing_header"),
        ("multi/s25047/s25047-2704-05-04-10-44n.hea", "bad_sampling_rate"),
    ],
)
def test_gs_errors(archive, rel, kind):
    _, url = archive
    with pytest.raises(RecordError) as err:
        read_record(f"{url}/{rel}")
    assert err.value.error_type == kind


def test_gs_output_round_trip(gcs):  # noqa: F811
    """Beam's FileSystems can write to and list the emulator (for pipeline outputs)."""
    from apache_beam.io.filesystems import FileSystems

    path = gcs.url("out/tokens/part-0.txt")
    with FileSystems.create(path) as fh:
        fh.write(b"hello")
    with FileSystems.open(path) as fh:
        assert fh.read() == b"hello"
    found = FileSystems.match([gcs.url("out/**")])[0].metadata_list
    assert [m.path for m in found] == [path]


@pytest.mark.slow
def test_job_end_to_end_gs_in_gs_out(gcs):  # noqa: F811
    """`ecgtok run` with gs:// input and output: tokens, scores, errors and summary."""
    import io
    import json

    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from ecgtok.pipeline.run import run_job

    cpsc = os.path.join(CINC, "CPSC_CPSC-Extra")
    if not os.path.isdir(cpsc):
        pytest.skip(f"shared data not found: {cpsc}")
    for n in ("A0001.hea", "A0001.mat", "A0002.hea", "A0002.mat"):
        gcs.upload(os.path.join(cpsc, n), f"job/in/{n}")
    gcs.client().bucket(gcs.bucket).blob("job/in/bad.hea").upload_from_string(b"not a header")
    src, dst = gcs.url("job/in"), gcs.url("job/out")
    outcome = run_job(["--input", src, "--output", dst, "--direct_num_workers=1"])
    summary = outcome.summary
    assert (summary["discovered"], summary["tokenized"], summary["failed"]) == (3, 2, 1)
    with FileSystems.open(dst + "/summary.json") as fh:
        assert json.loads(fh.read())["discovered"] == 3

    def rows(folder: str) -> list[dict]:
        found = FileSystems.match([f"{dst}/{folder}/*"])[0].metadata_list
        assert found and all(m.path.endswith(".parquet") for m in found)
        out = []
        for m in found:
            with FileSystems.open(m.path) as fh:
                out.extend(pq.read_table(io.BytesIO(fh.read())).to_pylist())
        return out

    assert sorted(r["record_id"] for r in rows("tokens")) == ["A0001", "A0002"]
    assert sorted(r["record_id"] for r in rows("scores")) == ["A0001", "A0002"]
    errors = rows("errors")
    assert [(e["record_id"], e["stage"], e["error_type"]) for e in errors] == [
        ("bad", "read", "bad_header")
    ]


def test_storage_failures_are_classified():
    """Absent -> missing; refused -> error row; a storage outage -> retry (ConnectionError)."""
    from google.api_core import exceptions as gexc

    from ecgtok.transforms.wfdb_reader import _not_found, _storage_error

    assert _not_found(gexc.NotFound("x")) and _not_found(FileNotFoundError())
    assert not _not_found(gexc.ServiceUnavailable("x"))
    denied = _storage_error(gexc.Forbidden("no"), "gs://b/x.hea")
    assert isinstance(denied, RecordError) and denied.error_type == "access_denied"
    assert isinstance(_storage_error(gexc.ServiceUnavailable("busy"), "p"), ConnectionError)
    assert isinstance(_storage_error(gexc.RetryError("gave up", None), "p"), ConnectionError)
    assert isinstance(_storage_error(gexc.TooManyRequests("slow"), "p"), ConnectionError)
