"""Shared test fixtures: where the real recordings are, and small archives built from them."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, os.environ.get("ECGTOK_DATA", "../shared/data")))


def data_path(*parts: str) -> str:
    """Path under the shared data folder; skips the test when that data is absent."""
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def data_dir() -> str:
    return data_path()


def copy_record(src_hea: str, dst_dir: str, name: str | None = None) -> str:
    """Copy one WFDB record (header + its signal files) into dst_dir; returns the new .hea."""
    import wfdb

    base = src_hea[: -len(".hea")]
    header = wfdb.rdheader(base)
    os.makedirs(dst_dir, exist_ok=True)
    name = name or os.path.basename(base)
    files = {}
    for f in dict.fromkeys(header.file_name):
        new = f.replace(os.path.basename(base), name, 1)
        shutil.copy(os.path.join(os.path.dirname(base), f), os.path.join(dst_dir, new))
        files[f] = new
    with open(src_hea) as fh:
        text = fh.read()
    lines = text.splitlines()
    first = lines[0].split()
    first[0] = name
    lines[0] = " ".join(first)
    out = [lines[0]]
    for line in lines[1:]:
        parts = line.split(" ", 1)
        if parts and parts[0] in files:
            line = files[parts[0]] + (" " + parts[1] if len(parts) > 1 else "")
        out.append(line)
    dst = os.path.join(dst_dir, name + ".hea")
    with open(dst, "w") as fh:
        fh.write("\n".join(out) + "\n")
    return dst
