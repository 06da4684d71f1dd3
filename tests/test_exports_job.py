"""Hospital exports through the whole job: tokens and scores, and no identifier in any output."""

from __future__ import annotations

import glob
import json
import os
import re

import pyarrow.parquet as pq
import pytest
from conftest import data_path
from test_formats import IDENTIFIERS

from ecgtok.pipeline.cli import main as cli


def _all_output_text(dst: str) -> str:
    parts = []
    for f in sorted(glob.glob(os.path.join(dst, "**", "*.parquet"), recursive=True)):
        table = pq.read_table(f)
        parts.append(json.dumps(table.to_pylist(), default=str))
        parts.append(
            json.dumps({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()})
        )
    with open(os.path.join(dst, "summary.json")) as fh:
        summary = json.load(fh)
    summary.pop("input")  # the archive's own folder name, given by the user
    parts.append(json.dumps(summary))
    return "\n".join(parts).lower()


@pytest.fixture(scope="module")
def exports_run(tmp_path_factory):
    src = data_path("formats")
    out = tmp_path_factory.mktemp("exports")
    key_file = out / "site.key"
    key_file.write_text("site secret\n")
    dst = str(out / "run")
    code = cli(["run", "--input", src, "--output", dst, f"--pseudonym_key_file={key_file}"])
    return code, dst


@pytest.mark.slow
def test_every_export_is_tokenized_or_an_error_row(exports_run):
    code, dst = exports_run
    assert code == 0
    with open(os.path.join(dst, "summary.json")) as fh:
        s = json.load(fh)
    assert s["discovered"] == 18 and s["discovered"] == s["tokenized"] + s["failed"]
    assert s["tokenized"] >= 16 and s["scored"] >= s["tokenized"]
    rows = []
    for f in glob.glob(os.path.join(dst, "tokens", "*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    twelve_lead = [r for r in rows if len(r["lead_names"]) == 12]
    assert len(twelve_lead) >= 10
    for r in rows:
        assert r["record_id"].startswith("x") and r["source_path"].startswith("export:")
    # 10 s resting ECGs: a human number of beats.
    assert sum(6 <= len(r["r_peaks"]) <= 30 for r in twelve_lead) >= 0.8 * len(twelve_lead)
    # A site key gives patient pseudonyms where the export names a patient.
    assert any(r["patient_key"] for r in rows)


@pytest.mark.slow
def test_no_identifier_from_the_fixtures_reaches_any_output(exports_run):
    _, dst = exports_run
    text = _all_output_text(dst)
    # Not inside a longer run of digits: the score rows' floats (embeddings) hold every
    # short digit string somewhere, e.g. "10173" in -1.3010173...; a leaked number stands
    # on its own.
    leaked = sorted(
        {
            ident
            for idents in IDENTIFIERS.values()
            for ident in idents
            if re.search(rf"(?<!\d){re.escape(ident.lower())}(?!\d)", text)
        }
    )
    assert not leaked, f"identifiers in outputs: {leaked}"
