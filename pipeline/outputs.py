"""The output folder: refuse or replace old outputs, stage new ones, count what was written.

A job writes into `DST/_staging/<run id>/`. Only after it succeeds are the old
`tokens/`, `scores/`, `errors/` and `summary.json` removed and the staged files moved in,
so the outputs of two runs are never mixed, and a failed run leaves the last good one.
"""

from __future__ import annotations

import json
import os
import posixpath

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

OUTPUT_FOLDERS = ("tokens", "scores", "errors")
SUMMARY = "summary.json"
STAGING = "_staging"


class OutputError(ValueError):
    """The --output cannot be used (a user mistake, reported in one line)."""


def join(folder: str, *names: str) -> str:
    if "://" in folder:
        return posixpath.join(folder, *names)
    return os.path.join(folder, *names)


def _entries(folder: str) -> list[str]:
    if "://" in folder:
        found = FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list
        return [m.path for m in found]
    if not os.path.exists(folder):
        return []
    if not os.path.isdir(folder):
        raise OutputError(f"--output {folder} exists and is not a folder")
    return os.listdir(folder)


def check_output(dst: str, overwrite: bool) -> None:
    """Refuse a non-empty DST unless --overwrite; create a local DST."""
    if _entries(dst) and not overwrite:
        raise OutputError(f"--output {dst} is not empty; pass --overwrite to replace its outputs")
    if "://" not in dst:
        try:
            os.makedirs(dst, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--output {dst} cannot be created: {exc.strerror}") from exc
        if not os.access(dst, os.W_OK | os.X_OK):
            raise OutputError(f"--output {dst} is not writable")


def check_not_input(dst: str, src: str) -> None:
    """Refuse an --output whose replacement could delete or shadow the --input."""
    if "://" in dst or "://" in src:
        same = dst.rstrip("/") == src.rstrip("/")
        inside = any(src.startswith(join(dst, name)) for name in OUTPUT_FOLDERS)
    else:
        real_dst, real_src = os.path.realpath(dst), os.path.realpath(src)
        same = real_dst == real_src
        inside = any(
            os.path.commonpath([real_src, os.path.join(real_dst, name)])
            == os.path.join(real_dst, name)
            for name in OUTPUT_FOLDERS
        )
    if same or inside:
        raise OutputError(f"--output {dst} would overwrite the --input {src}")


def staging_dir(dst: str, run_id: str) -> str:
    return join(dst, STAGING, run_id)


def files_under(folder: str) -> list[str]:
    if "://" in folder:
        return [m.path for m in FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list]
    out = []
    for root, _dirs, files in os.walk(folder):
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def _delete(paths: list[str]) -> None:
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


def promote(staged: str, dst: str, folders: tuple[str, ...] = OUTPUT_FOLDERS) -> None:
    """Replace DST's outputs with the staged ones (old files first removed, then moved)."""
    old = []
    for name in folders:
        old.extend(files_under(join(dst, name)))
    old.append(join(dst, SUMMARY))
    _delete(old)
    for name in folders:
        src_files = [f for f in files_under(join(staged, name)) if f.endswith(".parquet")]
        if "://" not in dst:
            os.makedirs(join(dst, name), exist_ok=True)
        dest = [join(dst, name, posixpath.basename(f)) for f in src_files]
        if src_files:
            FileSystems.rename(src_files, dest)
    _delete(files_under(staged))
    if "://" not in dst:
        import shutil

        shutil.rmtree(join(dst, STAGING), ignore_errors=True)


def parquet_files(folder: str) -> list[str]:
    return sorted(f for f in files_under(folder) if f.endswith(".parquet"))


def read_column_table(folder: str, columns: list[str]):
    """Concatenate `columns` of every Parquet file in `folder` into one Arrow table."""
    import pyarrow as pa

    tables = []
    for path in parquet_files(folder):
        with FileSystems.open(path, mime_type="application/octet-stream") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return None
    return pa.concat_tables(tables)


def write_json(path: str, obj: dict) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(data)
