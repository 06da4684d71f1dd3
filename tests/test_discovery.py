"""Which files of an archive are records: RECORDS files, layouts, segments, nesting."""

from __future__ import annotations

import os
import shutil

import pytest

from ecgtok.pipeline.discovery import (
    RecordRef,
    SourceError,
    check_source,
    discover,
    manifest_columns,
    read_listing,
    write_listing,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, os.environ.get("ECGTOK_DATA", "../shared/data")))
SAMPLE = os.path.join(DATA, "wfdb_sample")
MULTI = os.path.join(SAMPLE, "multi-segment")

HEADER = "{name} 1 360 10\n{name}.dat 16 200 16 0 0 0 0 II\n"


def _need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"shared data not found: {path}")
    return path


def _ids(src: str) -> list[str]:
    return [r.record_id for r in discover(src)]


def _write(folder, name, text=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".hea"), "w") as fh:
        fh.write(text if text is not None else HEADER.format(name=name))


def test_multi_segment_masters_not_their_segments_or_layouts():
    ids = _ids(_need(MULTI))
    assert ids == [
        "041s/041s",
        "fixed1/v102s",
        "p000878/p000878-2137-10-26-16-57",
        "s00001/s00001-2896-10-09-01-56",
        "s00001/s00001-2896-10-09-01-56n",
        "s00001/s00001-2896-10-10-00-31",
        "s00001/s00001-2896-10-10-00-31n",
        "s25047/s25047-2704-05-04-10-44",
        "s25047/s25047-2704-05-04-10-44n",
    ]
    refs = list(discover(MULTI))
    assert all(os.path.isfile(r.source_path) for r in refs)


def test_glob_applies_the_same_rule():
    pattern = os.path.join(_need(MULTI), "s25047", "*.hea")
    assert _ids(pattern) == ["s25047-2704-05-04-10-44", "s25047-2704-05-04-10-44n"]


def test_wfdb_sample_top_level_and_edf():
    ids = _ids(_need(SAMPLE))
    assert "test_generator_2" in ids  # the .hea; its .edf twin is not a second record
    assert ids.count("test_generator_2") == 1
    assert "test_edfann" in ids  # an EDF with no header beside it
    assert not any(i.endswith("_layout") for i in ids)
    assert "multi-segment/s00001/3975656_0001" not in ids


def test_records_file_lists_its_folder(tmp_path):
    root = tmp_path / "db"
    for name in ("a", "b", "c"):
        _write(root, name)
    (root / "RECORDS").write_text("a\nc\n\n")
    assert _ids(str(root)) == ["a", "c"]


def test_records_file_may_list_nested_records_and_missing_ones(tmp_path):
    root = tmp_path / "ptbxl"
    _write(root / "records100" / "00000", "00001_lr")
    _write(root / "records100" / "00000", "00002_lr")
    _write(root / "records500" / "00000", "00001_hr")
    (root / "RECORDS").write_text("records100/00000/00001_lr\nrecords100/00000/00009_lr\n")
    refs = list(discover(str(root)))
    assert [r.record_id for r in refs] == [
        "records100/00000/00001_lr",
        "records100/00000/00009_lr",  # listed but absent: becomes an error row later
    ]


def test_records_file_handing_on_sub_folders(tmp_path):
    # MIMIC style: top RECORDS lists folders; each patient folder has its own RECORDS.
    root = tmp_path / "mimic"
    p1 = root / "p00" / "p000020"
    _write(p1, "p000020-2183-04-28-17-47")
    _write(p1, "p000020-2183-04-28-17-47n")
    _write(p1, "3544749_0001")
    (p1 / "RECORDS").write_text("p000020-2183-04-28-17-47\n")
    p2 = root / "p00" / "p000030"  # no RECORDS of its own: the default rule
    _write(p2, "x1")
    _write(p2, "x2_layout")
    (root / "RECORDS").write_text("p00/\n")
    assert _ids(str(root)) == ["p00/p000020/p000020-2183-04-28-17-47", "p00/p000030/x1"]


def test_nested_patient_study_folders(tmp_path):
    root = tmp_path / "mimic-iv-ecg" / "files"
    _write(root / "p1000" / "p10000032" / "s40689238", "40689238")
    _write(root / "p1000" / "p10000032" / "s44458630", "44458630")
    _write(root / "p1001" / "p10010058" / "s40035385", "40035385")
    assert _ids(str(tmp_path / "mimic-iv-ecg")) == [
        "files/p1000/p10000032/s40689238/40689238",
        "files/p1000/p10000032/s44458630/44458630",
        "files/p1001/p10010058/s40035385/40035385",
    ]


def test_segments_named_by_a_master_in_another_folder_are_records(tmp_path):
    src = _need(os.path.join(MULTI, "041s"))
    shutil.copytree(src, tmp_path / "a")
    os.makedirs(tmp_path / "b")
    shutil.move(str(tmp_path / "a" / "041s.hea"), tmp_path / "b" / "041s.hea")
    assert _ids(str(tmp_path)) == ["a/041s01", "a/041s02", "b/041s"]


def test_nested_multi_segment_masters(tmp_path):
    folder = tmp_path / "n"
    _write(folder, "outer", "outer/2 1 360 20\ninner 10\nplain 10\n")
    _write(folder, "inner", "inner/1 1 360 10\nleaf 10\n")
    _write(folder, "leaf")
    _write(folder, "plain")
    _write(folder, "other")
    assert _ids(str(tmp_path)) == ["n/other", "n/outer"]


def test_nested_master_reads(tmp_path):
    # A master whose segment is itself a multi-segment record.
    import numpy as np

    from ecgtok.transforms.wfdb_reader import read_record

    folder = tmp_path / "n"
    os.makedirs(folder)
    data = (np.arange(20, dtype="<i2") * 10).tobytes()
    (folder / "leaf.dat").write_bytes(data[:20])
    (folder / "plain.dat").write_bytes(data[20:])
    _write(folder, "outer", "outer/2 1 360 20\ninner 10\nplain 10\n")
    _write(folder, "inner", "inner/1 1 360 10\nleaf 10\n")
    _write(folder, "leaf")
    _write(folder, "plain")
    rec = read_record(str(folder / "outer.hea"))
    np.testing.assert_allclose(rec.signal[:, 0], np.arange(20) * 10 / 200.0, rtol=1e-6)


def test_single_header_and_edf_sources():
    hea = os.path.join(_need(SAMPLE), "100.hea")
    assert _ids(hea) == ["100"]
    assert _ids(os.path.join(SAMPLE, "test_generator_2.edf")) == ["test_generator_2"]


def test_file_url_root(tmp_path):
    _write(tmp_path / "x", "r1")
    assert _ids("file://" + str(tmp_path)) == ["x/r1"]


def test_manifest_carries_columns(tmp_path):
    _write(tmp_path / "d", "r1")
    (tmp_path / "m.csv").write_text("path,label,site\nd/r1,AF,x\nd/r2.hea,N,y\n")
    refs = list(discover(str(tmp_path / "m.csv")))
    assert [r.record_id for r in refs] == ["d/r1", "d/r2"]
    assert refs[0].extra == {"label": "AF", "site": "x"}
    assert refs[1].source_path == os.path.join(str(tmp_path), "d/r2.hea")
    assert manifest_columns(str(tmp_path / "m.csv")) == ["label", "site"]


def test_a_listing_gives_back_the_records_it_was_given(tmp_path):
    # A chunk's job reads its records from this file, so every field must come back.
    refs = [
        RecordRef("d/r1", "/a/d/r1.hea", {"label": "AF", "site": "Zürich"}),
        RecordRef("exports/x", "/a/MUSE 001.xml", {}, "pseudonym/7f3a"),
    ]
    path = str(tmp_path / "records.jsonl")
    write_listing(path, refs)
    back = list(read_listing(path))
    assert back == refs
    assert [(r.extra, r.display_path) for r in back] == [(r.extra, r.display_path) for r in refs]
    write_listing(path, [])
    assert list(read_listing(path)) == []


def test_check_source(tmp_path):
    with pytest.raises(SourceError):
        check_source(str(tmp_path / "absent"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(SourceError):
        check_source(str(tmp_path / "x.txt"))
    check_source(str(tmp_path))


def test_records_file_may_name_edf_files(tmp_path):
    root = tmp_path / "sleep"
    root.mkdir()
    (root / "SC4001E0-PSG.edf").write_bytes(b"0")
    (root / "SC4001EC-Hypnogram.edf").write_bytes(b"0")
    (root / "RECORDS").write_text("SC4001E0-PSG.edf\n")
    refs = list(discover(str(root)))
    assert [r.record_id for r in refs] == ["SC4001E0-PSG"]
    assert refs[0].source_path.endswith("SC4001E0-PSG.edf")


def test_discovery_keeps_each_headers_shape_and_batches_are_of_one_shape(tmp_path):
    """The header shapes discovery reads on the way reach the job through the listing,
    and the job's batches keep records of one shape together, losing none."""
    import collections

    from conftest import data_path

    from ecgtok.pipeline.discovery import discover, read_listing, write_listing
    from ecgtok.transforms.stages import _shape_batches

    refs = list(discover(data_path("cinc2021_12lead")))
    shapes = collections.Counter(r.shape for r in refs)
    assert shapes["12 500 5000"] > 90 and len(shapes) > 3 and "" not in shapes
    listing = str(tmp_path / "records.jsonl")
    write_listing(listing, refs)
    back = list(read_listing(listing))
    assert [(r.record_id, r.shape) for r in back] == [(r.record_id, r.shape) for r in refs]
    batches = list(_shape_batches(back, 32))
    assert all(len({r.shape for r in b}) == 1 and len(b) <= 32 for b in batches)
    assert sorted(r.record_id for b in batches for r in b) == sorted(r.record_id for r in refs)
    # every shape with more than one record shares a batch with another of its shape
    for shape, n in shapes.items():
        if n > 1:
            assert max(len(b) for b in batches if b[0].shape == shape) > 1
