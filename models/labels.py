"""Label CSVs for `ecgtok finetune`, built from the label files of the shared data.

    python -m ecgtok.models.labels --data ../shared/data --output labels.csv [--prefix-folder]

Columns: `record_id, start_sample, p_af, p_noisy, p_other_rhythm, source, split`. An empty
cell is an unknown label (masked in training). `split` is `test` for a fixed 20% of the
records of each source (a salted hash of source and record id: by record, never by
segment), else `train`; the shipped model is fine-tuned on `train` only. `record_id` is what `ecgtok tokenize --input
DATA/<source>` gives: the header path relative to that folder, without `.hea`. With
`--prefix-folder` it is relative to DATA itself (`cinc2017_af/A00001`), as a run over the
whole data folder or a manifest gives.

Sources:

* `cinc2017_af/REFERENCE.csv` (no header: record,label): A -> p_af=1; ~ -> p_noisy=1;
  O -> p_other_rhythm=1; N -> all 0. One label per record (start_sample empty).
* `cinc2021_12lead/labels.csv` (SNOMED `dx_snomed`): AF (164889003) -> p_af=1; atrial
  flutter (164890007) without AF -> p_af unknown; otherwise p_af=0. p_noisy and
  p_other_rhythm unknown (the codes do not say).
* `mitdb/*.atr` rhythm annotations: each 5-minute segment (the pipeline's default
  segmentation, `start_sample` at 360 Hz; `--mitdb-segment-seconds 30` for 30 s windows,
  tokenized with the same `--segment_seconds`) gets p_af = the fraction of its time in
  `(AFIB`, p_other_rhythm = the fraction in a rhythm other than `(N` and `(AFIB` (AFL,
  NOD, VT, T, B, SVTA, AB, P, ...). p_noisy unknown. Segments shorter than 30 s are left
  out.
"""

from __future__ import annotations

import argparse
import csv
import os

HEADS = ("p_af", "p_noisy", "p_other_rhythm")
COLUMNS = ("record_id", "start_sample", *HEADS, "source", "split")
TEST_FRACTION = 0.2
SPLIT_SALT = "ecgtok-split-v1"
AF_SNOMED = "164889003"
AFL_SNOMED = "164890007"
SEGMENT_S = 300.0
MIN_SEGMENT_S = 30.0


def _row(record_id: str, start, source: str, **labels) -> dict:
    row = {"record_id": record_id, "start_sample": "" if start is None else int(start)}
    for h in HEADS:
        v = labels.get(h)
        row[h] = "" if v is None else round(float(v), 4)
    row["source"] = source
    row["split"] = split_of(source, record_id)
    return row


def split_of(source: str, record_id: str, fraction: float = TEST_FRACTION) -> str:
    """'test' for a fixed fraction of records (seeded hash of source and record), else 'train'.

    By record, never by segment: every segment of a record falls in the same split.
    """
    import hashlib

    key = f"{SPLIT_SALT}|{source}|{record_id}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return "test" if h < fraction * 2.0**64 else "train"


def cinc2017_labels(folder: str) -> list[dict]:
    """One row per record of REFERENCE.csv (record,label with N/A/O/~)."""
    rows = []
    with open(os.path.join(folder, "REFERENCE.csv"), newline="") as f:
        for rec, label in csv.reader(f):
            label = label.strip()
            if label not in ("N", "A", "O", "~"):
                continue
            rows.append(
                _row(
                    rec.strip(),
                    None,
                    "cinc2017",
                    p_af=label == "A",
                    p_noisy=label == "~",
                    p_other_rhythm=label == "O",
                )
            )
    return rows


def cinc2021_labels(folder: str) -> list[dict]:
    """One row per record of labels.csv: p_af from the SNOMED codes."""
    rows = []
    with open(os.path.join(folder, "labels.csv"), newline="") as f:
        for r in csv.DictReader(f):
            codes = {c.strip() for c in r["dx_snomed"].split(",") if c.strip()}
            if AF_SNOMED in codes:
                p_af = 1.0
            elif AFL_SNOMED in codes:
                p_af = None
            else:
                p_af = 0.0
            rows.append(_row(r["record"], None, "cinc2021", p_af=p_af))
    return rows


def rhythm_intervals(ann_samples, symbols, aux_notes, n_samples: int) -> list[tuple[int, int, str]]:
    """(start, end, rhythm) spans from WFDB rhythm annotations ('+' with aux '(AFIB' etc.)."""
    marks = [
        (int(s), a.strip("\x00 ").lstrip("("))
        for s, sym, a in zip(ann_samples, symbols, aux_notes, strict=True)
        if sym == "+" and a and a.strip("\x00 ").startswith("(")
    ]
    out = []
    for i, (start, rhythm) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else n_samples
        if end > start:
            out.append((start, end, rhythm))
    return out


def segment_fractions(
    spans: list[tuple[int, int, str]], start: int, end: int
) -> tuple[float, float, float]:
    """Fractions of [start, end) in AF, in other non-sinus rhythms, and annotated at all."""
    af = other = known = 0
    for s, e, rhythm in spans:
        overlap = max(0, min(e, end) - max(s, start))
        if not overlap:
            continue
        known += overlap
        if rhythm == "AFIB":
            af += overlap
        elif rhythm != "N":
            other += overlap
    n = max(1, end - start)
    return af / n, other / n, known / n


def mitdb_labels(folder: str, segment_s: float = SEGMENT_S) -> list[dict]:
    """One row per segment (5 minutes by default) of every annotated record."""
    import wfdb

    rows = []
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".atr"))
    for name in names:
        base = os.path.join(folder, name)
        header = wfdb.rdheader(base)
        ann = wfdb.rdann(base, "atr")
        n, fs = int(header.sig_len), float(header.fs)
        spans = rhythm_intervals(ann.sample, ann.symbol, ann.aux_note, n)
        seg = int(round(segment_s * fs))
        starts = [0] if n <= seg else list(range(0, n, seg))
        for start in starts:
            end = min(start + seg, n)
            if end - start < MIN_SEGMENT_S * fs:
                continue
            af, other, known = segment_fractions(spans, start, end)
            if known < 0.5:
                continue
            rows.append(_row(name, start, "mitdb", p_af=af, p_other_rhythm=other))
    return rows


BUILDERS = {
    "cinc2017_af": cinc2017_labels,
    "cinc2021_12lead": cinc2021_labels,
    "mitdb": mitdb_labels,
}


def build_labels(
    data: str, prefix_folder: bool = False, mitdb_segment_s: float = SEGMENT_S
) -> list[dict]:
    """Rows for every known source present under `data`; MIT-BIH in segments of
    `mitdb_segment_s` (tokenize it with the same `--segment_seconds`)."""
    rows = []
    for sub, builder in BUILDERS.items():
        folder = os.path.join(data, sub)
        if not os.path.isdir(folder):
            continue
        found = builder(folder, mitdb_segment_s) if sub == "mitdb" else builder(folder)
        for r in found:
            if prefix_folder:
                r["record_id"] = f"{sub}/{r['record_id']}"
            rows.append(r)
    return rows


def write_labels(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ecgtok.models.labels")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--output", required=True)
    ap.add_argument("--prefix-folder", action="store_true")
    ap.add_argument(
        "--mitdb-segment-seconds",
        type=float,
        default=SEGMENT_S,
        help="MIT-BIH label segments (e.g. 30 for 30 s Holter windows)",
    )
    args = ap.parse_args(argv)
    rows = build_labels(args.data, args.prefix_folder, args.mitdb_segment_seconds)
    write_labels(rows, args.output)
    counts: dict = {}
    for r in rows:
        c = counts.setdefault(f"{r['source']}/{r['split']}", {"rows": 0, "p_af>=0.5": 0})
        c["rows"] += 1
        c["p_af>=0.5"] += r["p_af"] != "" and float(r["p_af"]) >= 0.5
    print(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
