"""Resumable local runs: the archive is listed once and processed in chunks of records.

A local job over a large archive (think 800,000 records on one machine) runs as a
sequence of Beam jobs, one per chunk of `--chunk_records` records, each writing its
finished shards under `DST/_staging/<run>/chunks/NNNNN/` and then a `_DONE` marker. A run
that is killed leaves its finished chunks behind; `--resume` finds that staging folder,
checks that the archive still lists the same records (`plan.json`), skips the chunks that
are done and runs the rest. Only when every chunk is done are the outputs promoted into
DST, so a reader never sees a partial set.

Distributed runners (Dataflow, Flink) run one job: they retry failed work themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems

from ecgtok.pipeline import outputs
from ecgtok.pipeline.discovery import DeidSettings, RecordRef, discover, write_listing

DEFAULT_CHUNK_RECORDS = 20_000
PLAN = "plan.json"
DONE = "_DONE"
LISTING = "records.jsonl"  # the chunk's records, which its job reads (see write_listing)


class ResumeError(ValueError):
    """--resume cannot continue the run it found (reported in one line)."""


def _plan_of(refs: list[RecordRef], chunk_records: int, mode: str) -> dict:
    digest = hashlib.sha256()
    for r in refs:
        digest.update(f"{r.record_id}\0{r.source_path}\n".encode())
    return {
        "mode": mode,
        "records": len(refs),
        "chunk_records": chunk_records,
        "records_sha256": digest.hexdigest(),
    }


def find_resumable(dst: str) -> str | None:
    """The staging folder of the most recent unfinished run in DST, if any."""
    root = outputs.join(dst, outputs.STAGING)
    plans = FileSystems.match([outputs.join(root, "*", PLAN)])[0].metadata_list
    if not plans:
        return None
    newest = max(plans, key=lambda m: (m.last_updated_in_seconds, m.path))
    return posixpath.dirname(newest.path) if "://" in dst else os.path.dirname(newest.path)


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def chunk_dir(staged: str, index: int) -> str:
    return outputs.join(staged, "chunks", f"{index:05d}")


def run_chunks(
    src: str,
    staged: str,
    mode: str,
    chunk_records: int,
    resume: bool,
    run_one: Callable[[str, str], object],
    deid: DeidSettings | None = None,
) -> tuple[list[object], int, int]:
    """Run every unfinished chunk with `run_one(listing, out_dir)`, where `listing` is
    the file in `out_dir` that lists the chunk's records.

    Returns (pipeline results of the chunks run now, records discovered, chunks skipped).
    """
    refs = list(discover(src, deid))
    plan = _plan_of(refs, chunk_records, mode)
    plan_path = outputs.join(staged, PLAN)
    if resume and FileSystems.exists(plan_path):
        old = _read_json(plan_path)
        if old != plan:
            raise ResumeError(
                "--resume: the input now lists other records or another chunk size than the "
                "killed run; rerun with --overwrite instead"
            )
    else:
        outputs.write_json(plan_path, plan)
    results, skipped = [], 0
    for index in range(0, max(1, -(-len(refs) // chunk_records))):
        out = chunk_dir(staged, index)
        if FileSystems.exists(outputs.join(out, DONE)):
            skipped += 1
            continue
        stale = outputs.files_under(out)
        if stale:  # a chunk the killed run did not finish: start it again, clean
            FileSystems.delete(stale)
        chunk = refs[index * chunk_records : (index + 1) * chunk_records]
        listing = outputs.join(out, LISTING)
        write_listing(listing, chunk)
        results.append(run_one(listing, out))
        outputs.write_json(outputs.join(out, DONE), {"records": len(chunk)})
    return results, len(refs), skipped


def gather(staged: str, folders: tuple[str, ...]) -> None:
    """Move every chunk's shards into `staged/<folder>/`, prefixed by the chunk number."""
    moves_from, moves_to = [], []
    for name in folders:
        for path in outputs.parquet_files(outputs.join(staged, "chunks")):
            parts = path.replace("\\", "/").split("/")
            if parts[-2] != name:
                continue
            chunk = parts[-3]
            moves_from.append(path)
            moves_to.append(outputs.join(staged, name, f"chunk{chunk}-{parts[-1]}"))
        if "://" not in staged:
            os.makedirs(outputs.join(staged, name), exist_ok=True)
    if moves_from:
        FileSystems.rename(moves_from, moves_to)
