"""Find the records of an archive: a folder, a glob, a gs:// prefix, or a manifest CSV.

Every record found is a `RecordRef`. Its `record_id` comes from the path, never from the
name written inside the header, so two archives with clashing internal names stay apart:

* folder or URL prefix: the header path relative to that root, without `.hea`;
* glob: the path relative to the glob's fixed leading folder;
* manifest: the `path` value as written, without `.hea`.

Which files are records (`_apply_rule`): where a folder has a `RECORDS` file, it lists
that folder's records (lines may name records in sub-folders, as PTB-XL's does, or
sub-folders ending in '/' that follow their own rule, as MIMIC's do). Elsewhere every
`.hea` is a record, except `*_layout` headers and the segment headers that a
multi-segment header in the same folder names; and an `.edf` file is a record unless a
header of the same name sits beside it. A record a RECORDS file lists but that is
absent is still yielded, so it ends as an error row rather than vanishing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from apache_beam.io.filesystems import FileSystems

_GLOB_CHARS = re.compile(r"[*?\[]")
_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    """One pool of reader threads for the whole listing (headers are small, reads are
    latency-bound on gs://); made once per process instead of once per folder."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ecgtok-discovery")
    return _POOL


def _map_reads(fn, paths: list[str]) -> list:
    """`fn` over paths: on the reader threads for remote files, in this thread for local
    ones, whose small reads take microseconds while handing each to a thread costs more
    (11,000 local headers: 0.37 s in one thread, 1.1-1.6 s through the pool)."""
    if paths and is_remote(paths[0]):
        return list(_io_pool().map(fn, paths))
    return [fn(p) for p in paths]


class SourceError(ValueError):
    """The --input cannot be used at all (a user mistake, reported in one line)."""


@dataclass(frozen=True)
class RecordRef:
    """Where one record lives and what the manifest said about it."""

    record_id: str
    source_path: str
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    # What outputs and error rows may show of the path ("" = source_path). Hospital
    # exports show a pseudonym: their file names can hold patient identifiers.
    display_path: str = ""
    # The header's signals, rate and length ("12 500 5000"), where the listing read the
    # header anyway; "" where it did not. Records of one shape are batched together, so
    # the guarded child can tokenize them together (stages.DiscoverRecords).
    shape: str = field(default="", hash=False, compare=False)

    @property
    def public_path(self) -> str:
        return self.display_path or self.source_path


def write_listing(path: str, refs: list[RecordRef]) -> None:
    """Write records as JSON lines, for a job to read back with `read_listing`.

    A chunk of a local run hands its records to the job this way instead of embedding
    them in the graph: Beam pickles and bz2-compresses a `Create`'s values each time it
    serialises the graph or builds a bundle processor (about 1.7 s of the launcher's
    CPU, before any record is read, for a chunk of 11,000 records).
    """
    lines = [
        json.dumps(
            [r.record_id, r.source_path, r.extra, r.display_path, r.shape], ensure_ascii=False
        )
        for r in refs
    ]
    with FileSystems.create(path, mime_type="application/x-ndjson") as f:
        f.write(("\n".join(lines) + "\n").encode())


def read_listing(path: str) -> Iterator[RecordRef]:
    """The records `write_listing` wrote, in order."""
    for line in _read_text(path, limit=None).splitlines():
        if line:
            yield RecordRef(*json.loads(line))


@dataclass(frozen=True)
class DeidSettings:
    """How hospital exports are de-identified: a key file path and the carry switch."""

    key_file: str | None = None
    carry_identifiers: bool = False

    def policy(self):
        from ecgtok.transforms.formats.deid import DeidPolicy

        return DeidPolicy.from_settings(self.key_file, self.carry_identifiers)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_remote(folder) else os.path.join(folder, name)


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def _read_text(path: str, limit: int | None = 1 << 20) -> str:
    """A file's text (at most `limit` bytes; None for all of it)."""
    if not is_remote(path):
        with open(_local(path), "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    else:
        with FileSystems.open(path, mime_type="application/octet-stream") as f:
            data = f.read() if limit is None else f.read(limit)
    return data.decode("utf-8-sig", errors="replace")


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
    if (
        kind == "folder"
        and os.path.isfile(path)
        and not (_is_record_file(path) or _is_export_candidate(path))
    ):
        raise SourceError(
            f"--input {src} is neither a folder, a record file, a glob nor a .csv manifest"
        )


def _is_record_file(path: str) -> bool:
    low = path.lower()
    return low.endswith(".hea") or low.endswith(".edf")


def _is_export_candidate(path: str) -> bool:
    from ecgtok.transforms.formats import is_export_file

    return is_export_file(path)


def _confirmed_exports(paths: list[str]) -> list[str]:
    """Export files among `paths`; `.xml` files are sniffed (other XML is not a record)."""
    from ecgtok.transforms.formats import SNIFF_BYTES, sniff_format

    def keep(path: str) -> bool:
        if not path.lower().endswith(".xml"):
            return True
        try:
            with FileSystems.open(path, mime_type="application/octet-stream") as f:
                return sniff_format(f.read(SNIFF_BYTES), path) is not None
        except Exception:
            return True  # unreadable: let the read stage turn it into an error row

    xml = [p for p in paths if p.lower().endswith(".xml")]
    if not xml:
        return sorted(paths)
    verdicts = dict(zip(xml, _map_reads(keep, xml)))
    return sorted(p for p in paths if verdicts.get(p, True))


def _export_ref(path: str, plain_id: str, policy, extra: dict | None = None) -> RecordRef:
    from ecgtok.transforms.formats.deid import export_record_id, public_path

    rid = export_record_id(plain_id, policy, plain_id=plain_id)
    return RecordRef(rid, path, extra or {}, public_path(path, rid, policy))


def _list_files(root: str) -> list[str]:
    """Every header, EDF file and RECORDS file under root, recursively, sorted."""
    if is_remote(root):
        pattern = root.rstrip("/") + "/**"
        found = FileSystems.match([pattern])[0].metadata_list
        paths = [m.path for m in found]
    else:
        paths = []
        for folder, dirs, files in os.walk(_local(root)):
            dirs.sort()
            paths.extend(os.path.join(folder, f) for f in files)
    return sorted(
        p
        for p in paths
        if _is_record_file(p) or _basename(p) == "RECORDS" or _is_export_candidate(p)
    )


def _glob_headers(pattern: str) -> list[str]:
    found = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in found if _is_record_file(m.path) or _is_export_candidate(m.path))


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _basename(path: str) -> str:
    return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def _stem(path: str) -> str:
    base = _basename(path)
    return base.rsplit(".", 1)[0] if _is_record_file(base) else base


def _header_lines(header_text: str) -> list[str]:
    return [ln for ln in header_text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _shape_of(header_text: str) -> str:
    """The record line's signal count, rate and length ("12 500 5000"), or "" for a
    multi-segment header: a key to batch records of one shape together, nothing more."""
    lines = _header_lines(header_text)
    fields = lines[0].split() if lines else []
    return "" if len(fields) < 2 or "/" in fields[0] else " ".join(fields[1:4])


def _segment_names(header_text: str) -> list[str]:
    """Record names that a multi-segment header names (empty for a plain one)."""
    lines = _header_lines(header_text)
    if not lines:
        return []
    first = lines[0].split()[0]
    if "/" not in first:
        return []
    try:
        n_seg = int(first.split("/")[1])
    except ValueError:
        return []
    names = [ln.split()[0] for ln in lines[1 : 1 + n_seg]]
    return [n for n in names if n != "~"]


def _records_list(records_file: str) -> tuple[list[str], list[str]]:
    """(record paths, sub-folder entries) a RECORDS file lists, relative to its folder."""
    records, folders = [], []
    for line in _read_text(records_file).splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        (folders if name.endswith("/") else records).append(name)
    return records, folders


def _listed_path(folder: str, name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p and p != "."]
    path = folder
    for p in parts:
        path = _join(path, p)
    return path if _is_record_file(path) else path + ".hea"


def _default_rule(folder_files: list[str], shapes: dict[str, str]) -> list[str]:
    """One folder without RECORDS: every header is a record, except layout headers and the
    segments a multi-segment header of the folder names; an EDF file is a record unless a
    header of the same name is. The headers read on the way leave their `_shape_of` in
    `shapes`."""
    headers = [f for f in folder_files if f.lower().endswith(".hea")]
    header_stems = {_stem(h) for h in headers}
    candidates = [h for h in headers if not _stem(h).endswith("_layout")]
    edfs = [f for f in folder_files if f.lower().endswith(".edf") and _stem(f) not in header_stems]
    if len(candidates) >= 2:
        texts = _map_reads(lambda h: _read_text(h, 1 << 20), candidates)
        segments: set[str] = set()
        for header, text in zip(candidates, texts, strict=True):
            segments.update(_segment_names(text))
            shapes[header] = _shape_of(text)
        candidates = [h for h in candidates if _stem(h) not in segments]
    return candidates + edfs


def _apply_rule(
    files: Iterable[str], root: str | None, shapes: dict[str, str] | None = None
) -> list[str]:
    """The discovery rule over a listing of headers, EDF files and RECORDS files.

    Where a folder has a RECORDS file, it lists that folder's records: the lines name
    records (possibly in sub-folders, as in PTB-XL) or, ending in '/', sub-folders that
    follow their own rule (as in MIMIC). A RECORDS file governs its folder and every
    sub-folder it does not hand on that way. Elsewhere `_default_rule` applies. With no
    `root` (a glob) only RECORDS files in a header's own folder count. `shapes` collects
    the shape of every header read on the way.
    """
    shapes = {} if shapes is None else shapes
    by_folder: dict[str, list[str]] = defaultdict(list)
    records_files: dict[str, str] = {}
    for f in files:
        folder = _dirname(f)
        if _basename(f) == "RECORDS":
            records_files[folder] = f
        else:
            by_folder[folder].append(f)
    if root is None:  # glob: look for a RECORDS file beside each header
        for folder in by_folder:
            candidate = _join(folder, "RECORDS")
            if FileSystems.exists(candidate):
                records_files[folder] = candidate
    listed: dict[str, tuple[list[str], list[str]]] = {
        folder: _records_list(path) for folder, path in records_files.items()
    }
    root_norm = None if root is None else _dirname(_join(root, "x"))

    def under(path: str, folder: str) -> bool:
        sep = "/" if is_remote(folder) else os.sep
        return path == folder or path.startswith(folder.rstrip(sep) + sep)

    def governed(folder: str) -> bool:
        """Whether a RECORDS file at or above `folder` (inside root) lists its records."""
        current = folder
        while True:
            if current in listed:
                if current == folder:
                    return True
                handed_on = [_join(current, d.strip("/")) for d in listed[current][1]]
                return not any(under(folder, d) for d in handed_on)
            if root_norm is None or current == root_norm or not under(current, root_norm):
                return False
            parent = _dirname(current)
            if parent == current or not parent:
                return False
            current = parent

    out: set[str] = set()
    for folder, names in listed.items():
        out.update(_listed_path(folder, n) for n in names[0])
    for folder in sorted(by_folder):
        if not governed(folder):
            out.update(_default_rule(by_folder[folder], shapes))
    return sorted(out)


def _relative_id(path: str, root: str) -> str:
    root = root.rstrip("/").rstrip(os.sep)
    rel = path[len(root) :].lstrip("/").lstrip(os.sep) if path.startswith(root) else path
    rel = rel.replace(os.sep, "/")
    return rel.rsplit(".", 1)[0] if _is_record_file(rel) else rel


def _glob_root(pattern: str) -> str:
    """The fixed leading folder of a glob: everything before the first wildcard component."""
    head = _GLOB_CHARS.split(pattern, maxsplit=1)[0]
    return head if head.endswith(("/", os.sep)) else _dirname(head)


def _read_manifest(src: str) -> Iterator[RecordRef]:
    text = _read_text(src, limit=None)
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise SourceError(f"manifest {src} has no 'path' column")
    base = _dirname(src)
    for row in reader:
        written = (row.pop("path") or "").strip()
        if not written:
            continue
        hea = written if _is_record_file(written) else written + ".hea"
        full = hea if (is_remote(hea) or os.path.isabs(hea)) else _join(base, hea)
        rid = written.rsplit(".", 1)[0] if _is_record_file(written) else written
        yield RecordRef(rid, full, {k: (v if v is not None else "") for k, v in row.items()})


def manifest_columns(src: str) -> list[str]:
    """The manifest's columns other than `path`, in order; [] for a non-manifest input."""
    if source_kind(src) != "manifest":
        return []
    first = _read_text(src, limit=1 << 16).splitlines()[:1]
    names = next(csv.reader(first), []) if first else []
    return [n for n in names if n != "path"]


def _split(files: list[str]) -> tuple[list[str], list[str]]:
    """(WFDB headers, EDF and RECORDS files) and (hospital export files)."""
    wfdb = [f for f in files if _is_record_file(f) or _basename(f) == "RECORDS"]
    taken = set(wfdb)
    exports = [f for f in files if f not in taken and _is_export_candidate(f)]
    return wfdb, exports


def discover(src: str, deid: DeidSettings | None = None) -> Iterator[RecordRef]:
    """Yield every record of `src`, sorted by path within each kind of source."""
    policy = (deid or DeidSettings()).policy()
    kind = source_kind(src)
    if kind == "manifest":
        for ref in _read_manifest(src):
            if _is_export_candidate(ref.source_path):
                yield _export_ref(ref.source_path, ref.record_id, policy, ref.extra)
            else:
                yield ref
        return
    single = kind == "folder" and (_is_record_file(src) or _is_export_candidate(src))
    if kind == "glob":
        root, files = _glob_root(src), _glob_headers(src)
    elif single:
        root, files = _dirname(src), [src]
    else:
        root = src if is_remote(src) else _local(src)
        files = _list_files(root)
    wfdb, exports = _split(files)
    shapes: dict[str, str] = {}
    wfdb_paths = wfdb if single else _apply_rule(wfdb, None if kind == "glob" else root, shapes)
    for path in wfdb_paths:
        yield RecordRef(_relative_id(path, root), path, shape=shapes.get(path, ""))
    for path in _confirmed_exports(exports):
        yield _export_ref(path, _relative_export_id(path, root), policy)


def _relative_export_id(path: str, root: str) -> str:
    root = root.rstrip("/").rstrip(os.sep)
    rel = path[len(root) :].lstrip("/").lstrip(os.sep) if path.startswith(root) else path
    rel = rel.replace(os.sep, "/")
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
