"""Find the records of an archive: a folder, a glob, a gs:// prefix, or a manifest CSV.

Every record found is a `RecordRef`. Its `record_id` comes from the path, never from the
name written inside the header, so two archives with clashing internal names stay apart:

* folder or URL prefix: the header path relative to that root, without `.hea`;
* glob: the path relative to the glob's fixed leading folder;
* manifest: the `path` value as written, without `.hea`.

Which `.hea` files are records: where a folder has a `RECORDS` file, it lists that
folder's records. Elsewhere every header is a record, except `*_layout` headers and the
segment headers that a multi-segment header in the same folder names.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from apache_beam.io.filesystems import FileSystems

_GLOB_CHARS = re.compile(r"[*?\[]")


class SourceError(ValueError):
    """The --input cannot be used at all (a user mistake, reported in one line)."""


@dataclass(frozen=True)
class RecordRef:
    """Where one record lives and what the manifest said about it."""

    record_id: str
    source_path: str
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_remote(folder) else os.path.join(folder, name)


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def _read_text(path: str, limit: int = 1 << 20) -> str:
    with FileSystems.open(path, mime_type="application/octet-stream") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def source_kind(src: str) -> str:
    """One of 'manifest', 'glob', 'folder'."""
    if src.lower().endswith(".csv"):
        return "manifest"
    if _GLOB_CHARS.search(src):
        return "glob"
    return "folder"


def check_source(src: str) -> None:
    """Fail fast, with a one-line reason, on an --input that cannot be read at all."""
    kind = source_kind(src)
    if is_remote(src):
        if kind == "manifest" and not FileSystems.exists(src):
            raise SourceError(f"--input manifest {src} does not exist")
        return
    path = src[len("file://") :] if src.startswith("file://") else src
    if kind == "manifest" and not os.path.isfile(path):
        raise SourceError(f"--input manifest {src} does not exist")
    if kind == "folder" and not os.path.exists(path):
        raise SourceError(f"--input {src} does not exist")
    if kind == "folder" and os.path.isfile(path) and not path.endswith(".hea"):
        raise SourceError(f"--input {src} is neither a folder, a .hea, a glob nor a .csv manifest")


def _list_headers(root: str) -> list[str]:
    """Every *.hea under root, recursively, sorted."""
    if is_remote(root):
        pattern = root.rstrip("/") + "/**.hea"
        found = FileSystems.match([pattern])[0].metadata_list
        return sorted(m.path for m in found)
    out = []
    for folder, _dirs, files in os.walk(root):
        out.extend(os.path.join(folder, f) for f in files if f.endswith(".hea"))
    return sorted(out)


def _glob_headers(pattern: str) -> list[str]:
    found = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in found if m.path.endswith(".hea"))


def _segment_names(header_text: str) -> list[str]:
    """Segment record names that a multi-segment header names (empty for a plain one)."""
    lines = [ln for ln in header_text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines or "/" not in lines[0].split()[0]:
        return []
    n_seg = int(lines[0].split()[0].split("/")[1])
    return [ln.split()[0] for ln in lines[1 : 1 + n_seg] if ln.split()[0] != "~"]


def _records_in_folder(folder: str, headers: list[str]) -> list[str]:
    """Apply the discovery rule to one folder's headers."""
    records_file = _join(folder, "RECORDS")
    if FileSystems.exists(records_file):
        listed = [ln.strip() for ln in _read_text(records_file).splitlines() if ln.strip()]
        return [_join(folder, name + ".hea") for name in listed if "/" not in name]
    stems = {_basename_stem(h): h for h in headers}
    candidates = [h for s, h in stems.items() if not s.endswith("_layout")]
    if len(candidates) < 2:
        return candidates
    # Only a folder with several headers can hold segments of a multi-segment record.
    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(lambda h: _read_text(h, 64 << 10), candidates))
    segments: set[str] = set()
    for text in texts:
        segments.update(_segment_names(text))
    return [h for h in candidates if _basename_stem(h) not in segments]


def _basename_stem(path: str) -> str:
    base = posixpath.basename(path) if is_remote(path) else os.path.basename(path)
    return base[: -len(".hea")] if base.endswith(".hea") else base


def _apply_rule(headers: Iterable[str]) -> list[str]:
    by_folder: dict[str, list[str]] = defaultdict(list)
    for h in headers:
        by_folder[_dirname(h)].append(h)
    out: list[str] = []
    for folder in sorted(by_folder):
        out.extend(_records_in_folder(folder, by_folder[folder]))
    return out


def _relative_id(path: str, root: str) -> str:
    root = root.rstrip("/").rstrip(os.sep)
    rel = path[len(root) :].lstrip("/").lstrip(os.sep) if path.startswith(root) else path
    rel = rel.replace(os.sep, "/")
    return rel[: -len(".hea")] if rel.endswith(".hea") else rel


def _glob_root(pattern: str) -> str:
    """The fixed leading folder of a glob: everything before the first wildcard component."""
    head = _GLOB_CHARS.split(pattern, maxsplit=1)[0]
    return head if head.endswith(("/", os.sep)) else _dirname(head)


def _read_manifest(src: str) -> Iterator[RecordRef]:
    text = _read_text(src, limit=1 << 40)
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise SourceError(f"manifest {src} has no 'path' column")
    base = _dirname(src)
    for row in reader:
        written = (row.pop("path") or "").strip()
        if not written:
            continue
        hea = written if written.endswith(".hea") else written + ".hea"
        full = hea if (is_remote(hea) or os.path.isabs(hea)) else _join(base, hea)
        rid = written[: -len(".hea")] if written.endswith(".hea") else written
        yield RecordRef(rid, full, {k: (v if v is not None else "") for k, v in row.items()})


def manifest_columns(src: str) -> list[str]:
    """The manifest's columns other than `path`, in order; [] for a non-manifest input."""
    if source_kind(src) != "manifest":
        return []
    first = _read_text(src, limit=1 << 16).splitlines()[:1]
    names = next(csv.reader(first), []) if first else []
    return [n for n in names if n != "path"]


def discover(src: str) -> Iterator[RecordRef]:
    """Yield every record of `src`, sorted by path within each kind of source."""
    kind = source_kind(src)
    if kind == "manifest":
        yield from _read_manifest(src)
        return
    if kind == "glob":
        root = _glob_root(src)
        for path in _apply_rule(_glob_headers(src)):
            yield RecordRef(_relative_id(path, root), path)
        return
    if src.endswith(".hea"):
        yield RecordRef(_relative_id(src, _dirname(src)), src)
        return
    for path in _apply_rule(_list_headers(src)):
        yield RecordRef(_relative_id(path, src), path)
