"""Training commands: fit-tokenizer (a Beam job), fidelity, pretrain and finetune (torch).

    ecgtok fit-tokenizer --input SRC [SRC ...] --output DIR [--vocab-size 512]
                         [--max-beats 120000] [--seed 0] [--holdout 0.2]
    ecgtok fidelity --input SRC [SRC ...] [--tokenizer DIR] [--split all|holdout|fit]
    ecgtok pretrain --tokens DIR [DIR ...] --output DIR [--epochs 3] [--tokenizer DIR]
    ecgtok finetune --tokens DIR [DIR ...] --labels CSV --output DIR [--init DIR] [--epochs 8]

fit-tokenizer samples beat windows across the archive with a seeded hash priority and
keeps the `max-beats` smallest priorities with Beam's `Top` combiner, so its memory is
bounded whatever the archive's size and the sample is the same on every runner. With
`--holdout F` a seeded hash of each record id sets a fraction F of the records aside: they
are never sampled, and `ecgtok fidelity --split holdout` measures the tokenizer on them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from ecgtok.models.burden import P_AF_WINDOW
from ecgtok.models.tokenizer import (
    DEFAULT_VIEW,
    Tokenizer,
    _join,
    _read_bytes,
    fit_atrial_codebook,
    fit_codebook_in_subspace,
    tokenizer_meta,
    view_windows,
)


def _priority(seed: int, record_id: str, beat: int, lead: int) -> int:
    key = f"{seed}|{record_id}|{beat}|{lead}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def in_holdout(record_id: str, seed: int, fraction: float) -> bool:
    """Whether a record is set aside from fitting (seeded hash of its id)."""
    if fraction <= 0:
        return False
    return _priority(seed, "holdout|" + record_id, 0, 0) < fraction * 2.0**64


def beat_samples(ref, seed: int, per_record: int, holdout: float = 0.0, view: dict | None = None):
    """(priority, beat window + atrial window) pairs for up to `per_record` beats × leads
    of one record."""
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.record_tokens import find_beats
    from ecgtok.transforms.wfdb_reader import read_record

    if in_holdout(ref.record_id, seed, holdout):
        return
    try:
        rec = read_record(ref.source_path, ref.record_id)
        r_peaks, flags = find_beats(rec)
    except RecordError:
        return
    from ecgtok.transforms.beats import FLAG_NOISE_MASK

    wins, atrial = view_windows(
        rec.signal, rec.fs, r_peaks, DEFAULT_VIEW if view is None else view, atrial=True
    )
    # One sample row per beat and lead: the beat window, then its atrial window.
    both = np.concatenate([wins, atrial], axis=2)
    items = []
    for b in range(both.shape[0]):
        if flags.size and flags[b] & FLAG_NOISE_MASK:
            continue
        for lead in range(both.shape[1]):
            # Plain bytes: cheap to encode between stages on every runner.
            items.append((_priority(seed, ref.record_id, b, lead), both[b, lead].tobytes()))
    items.sort(key=lambda t: t[0])
    yield from items[:per_record]


def sample_beats(
    src: str | list[str],
    out_dir: str,
    max_beats: int,
    seed: int,
    per_record: int,
    beam_args: list[str],
    holdout: float = 0.0,
    view: dict | None = None,
):
    """Run the sampling Beam job; the sampled (beat windows (N, 96), atrial windows (N,
    ATRIAL_LEN)), sorted by priority."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from ecgtok.pipeline.options import is_local_default, local_runner
    from ecgtok.transforms.stages import DiscoverRecords

    options = PipelineOptions(beam_args)
    runner = local_runner(options) if is_local_default(options) else None
    # The sample travels back through a file beside the output, so any runner can run it.
    sample_path = _join(out_dir, "_beat_sample.npy")
    sources = [src] if isinstance(src, str) else list(src)
    with beam.Pipeline(runner=runner, options=options) as p:
        refs = [p | f"DiscoverRecords{i}" >> DiscoverRecords(s) for i, s in enumerate(sources)]
        _ = (
            (refs | "AllSources" >> beam.Flatten())
            | "SampleBeats" >> beam.FlatMap(beat_samples, seed, per_record, holdout, view)
            | "KeepSmallestPriorities" >> beam.combiners.Top.Smallest(max_beats, key=lambda t: t[0])
            | "WriteSample" >> beam.Map(_write_sample, sample_path)
        )
    data = _read_bytes(sample_path)
    FileSystems.delete([sample_path])
    sample = np.load(io.BytesIO(data), allow_pickle=False)
    if sample.shape[0] == 0:
        raise SystemExit("ecgtok: error: no beats found in --input")
    from ecgtok.transforms.windows import WINDOW_LEN

    return sample[:, :WINDOW_LEN], sample[:, WINDOW_LEN:]


def _write_sample(items, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    from ecgtok.transforms.atrial import ATRIAL_LEN
    from ecgtok.transforms.windows import WINDOW_LEN

    width = WINDOW_LEN + ATRIAL_LEN
    arr = np.frombuffer(b"".join(w for _, w in items), dtype=np.float32).reshape(-1, width)
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def fit_tokenizer_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ecgtok fit-tokenizer")
    ap.add_argument("--input", required=True, nargs="+", help="one or more archives")
    ap.add_argument("--output", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument(
        "--search-dims",
        type=int,
        default=48,
        help="fit and search words in this many principal directions (0: all 96)",
    )
    ap.add_argument(
        "--atrial-vocab",
        type=int,
        default=512,
        help="atrial words (what the atria do before each beat); 0: none",
    )
    ap.add_argument("--max-beats", type=int, default=120_000)
    ap.add_argument("--per-record", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--holdout", type=float, default=0.0, help="fraction of records set aside (by id hash)"
    )
    ap.add_argument(
        "--beat-norm",
        choices=("l2", "zl2", "none"),
        default=None,
        help="how each beat window is scaled (default: the tokenizer's default view)",
    )
    args, beam_args = ap.parse_known_args(argv)
    view = dict(DEFAULT_VIEW)
    if args.beat_norm:
        view["beat_norm"] = args.beat_norm
    if not FileSystems.exists(args.output):
        FileSystems.mkdirs(args.output)
    beats, atrial = sample_beats(
        args.input,
        args.output,
        args.max_beats,
        args.seed,
        args.per_record,
        beam_args,
        args.holdout,
        view,
    )
    codebook, basis = fit_codebook_in_subspace(beats, args.vocab_size, args.search_dims, args.seed)
    atrial_codebook = None
    if args.atrial_vocab > 0:
        atrial_codebook = fit_atrial_codebook(atrial, args.atrial_vocab, args.seed)
    source = " ".join(_portable(s) for s in args.input)
    meta = tokenizer_meta(codebook.shape[0], args.seed, len(beats), source, view)
    meta["holdout_fraction"] = args.holdout
    meta["per_record"] = args.per_record
    tok = Tokenizer(codebook, meta, basis, atrial_codebook)
    tid = tok.save(args.output)
    shapes = {"codebook": list(codebook.shape)}
    if atrial_codebook is not None:
        shapes["atrial_codebook"] = list(atrial_codebook.shape)
    print(json.dumps({"tokenizer_id": tid, "beats": len(beats), **shapes}))
    return 0


def _portable(path: str) -> str:
    """A source path as stored in artifacts: relative to the working directory if local."""
    import os

    if "://" in path or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


# ---- fidelity ----------------------------------------------------------------------------
def record_fidelity(ref, tokenizer_dir: str, per_record: int, seed: int):
    """Per-beat Pearson r, PRD, assigned code and RR check of one record (None if unread)."""
    from ecgtok.models.tokenizer import Tokenizer as Tok
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.record_tokens import find_beats
    from ecgtok.transforms.wfdb_reader import read_record

    tok = _cached_tokenizer(tokenizer_dir)
    try:
        rec = read_record(ref.source_path, ref.record_id)
        r_peaks, _flags = find_beats(rec)
    except RecordError:
        return None
    wins, atrial = view_windows(rec.signal, rec.fs, r_peaks, tok.view, atrial=True)
    x = wins.reshape(-1, wins.shape[-1])
    a = atrial.reshape(-1, atrial.shape[-1])  # the same (beat, lead) order as x
    if per_record and x.shape[0] > per_record:
        pri = np.array(
            [_priority(seed, ref.record_id, i, 0) for i in range(x.shape[0])], dtype=np.uint64
        )
        keep = np.sort(np.argsort(pri, kind="stable")[:per_record])
        x, a = x[keep], a[keep]
    # Every beat, noisy ones included, is scored against its nearest word.
    codes = tok.assign(x)
    r, prd = _reconstruction(x, tok.decode(codes + tok.morph_offset))
    out_atrial = {}
    if tok.atrial_size:
        a = a[np.abs(a).sum(axis=1) > 0]  # windows left wholly masked have no shape
        a_codes = tok.assign_atrial(a)
        a_r, a_prd = _reconstruction(a, tok.decode_atrial(a_codes + tok.atrial_offset))
        out_atrial = {"atrial_r": a_r, "atrial_prd": a_prd, "atrial_codes": a_codes}
    # Rhythm: the RR each rhythm word stands for (its bin's geometric centre) vs the true RR.
    rr_err = np.zeros(0)
    if r_peaks.size > 1:
        rr = np.diff(r_peaks) / rec.fs
        words = Tok.rhythm_words(r_peaks, rec.fs)[1:]
        rr_err = rhythm_word_rr(words) - rr
    return {
        "r": r.astype(np.float32),
        "prd": prd.astype(np.float32),
        "codes": codes.astype(np.int32),
        "rr_err": rr_err.astype(np.float32),
        "rr": (np.diff(r_peaks) / rec.fs).astype(np.float32) if r_peaks.size > 1 else rr_err,
        **out_atrial,
    }


def _reconstruction(x: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row Pearson r and PRD (%) between windows and their words' centroids."""
    from ecgtok.models.tokenizer import pearson_r

    energy = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    err = np.sqrt(((x.astype(np.float64) - decoded) ** 2).sum(axis=1))
    prd = np.where(energy > 0, 100.0 * err / np.maximum(energy, 1e-12), np.nan)
    return pearson_r(x, decoded), prd


def rhythm_word_rr(words: np.ndarray) -> np.ndarray:
    """The RR interval (s) a rhythm word stands for: its bin's geometric centre."""
    from ecgtok.models.tokenizer import N_SPECIAL, RR_EDGES_S

    edges = np.concatenate([[RR_EDGES_S[0] / 1.15], RR_EDGES_S, [RR_EDGES_S[-1] * 1.15]])
    centres = np.sqrt(edges[:-1] * edges[1:])
    b = np.clip(np.asarray(words) - N_SPECIAL - 1, 0, len(centres) - 1)
    return centres[b]


_TOKENIZERS: dict = {}


def _cached_tokenizer(folder: str):
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = Tokenizer.load(folder)
    return _TOKENIZERS[folder]


def _fidelity_job(args):
    ref, tokenizer_dir, per_record, seed = args
    return record_fidelity(ref, tokenizer_dir, per_record, seed)


def fidelity(
    sources: list[str], tokenizer_dir: str, split: str = "all", per_record: int = 600, workers=0
) -> dict:
    """Reconstruction fidelity of a tokenizer on the records of `sources`."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from ecgtok.pipeline.discovery import discover

    tok = Tokenizer.load(tokenizer_dir)
    frac = float(tok.meta.get("holdout_fraction", 0.0))
    seed = int(tok.meta.get("seed", 0))
    refs = []
    for src in sources:
        for ref in discover(src):
            held = in_holdout(ref.record_id, seed, frac)
            if split == "all" or (split == "holdout") == held:
                refs.append(ref)
    jobs = [(ref, tokenizer_dir, per_record, seed) for ref in refs]
    workers = workers or min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_fidelity_job, jobs, chunksize=8))
    else:
        results = [_fidelity_job(j) for j in jobs]
    results = [x for x in results if x is not None]
    if not results:
        raise SystemExit("ecgtok: error: no readable record with beats in --input")
    r = np.concatenate([x["r"] for x in results])
    prd = np.concatenate([x["prd"] for x in results])
    codes = np.concatenate([x["codes"] for x in results])
    rr_err = np.concatenate([x["rr_err"] for x in results])
    rr = np.concatenate([x["rr"] for x in results])
    k = tok.codebook.shape[0]
    counts = np.bincount(codes, minlength=k)
    p = counts[counts > 0] / max(1, counts.sum())
    rel = np.abs(rr_err) / np.maximum(rr, 1e-6) if rr.size else np.zeros(0)
    return {
        "tokenizer_id": tok.tokenizer_id,
        "codebook_size": int(k),
        "split": split,
        "n_records": len(results),
        "n_beats": int(r.size),
        "median_r": _round(np.nanmedian(r)),
        "p10_r": _round(np.nanpercentile(r, 10)),
        "mean_r": _round(np.nanmean(r)),
        "prd_median": _round(np.nanmedian(prd), 2),
        "prd_p90": _round(np.nanpercentile(prd, 90), 2),
        "codes_used_fraction": _round((counts > 0).mean()),
        "perplexity": _round(float(np.exp(-(p * np.log(p)).sum())), 1),
        "rhythm_rr_rel_error_median": _round(np.median(rel)) if rel.size else None,
        "rhythm_rr_rel_error_p90": _round(np.percentile(rel, 90)) if rel.size else None,
        "rhythm_words_checked": int(rr.size),
        **_atrial_fidelity(results, tok.atrial_size),
    }


def _atrial_fidelity(results: list[dict], size: int) -> dict:
    """Atrial words' reconstruction figures (windows with something left unmasked)."""
    if not size:
        return {}
    r = np.concatenate([x["atrial_r"] for x in results])
    prd = np.concatenate([x["atrial_prd"] for x in results])
    counts = np.bincount(np.concatenate([x["atrial_codes"] for x in results]), minlength=size)
    p = counts[counts > 0] / max(1, counts.sum())
    return {
        "atrial_codebook_size": int(size),
        "atrial_windows": int(r.size),
        "atrial_median_r": _round(np.nanmedian(r)) if r.size else None,
        "atrial_p10_r": _round(np.nanpercentile(r, 10)) if r.size else None,
        "atrial_prd_median": _round(np.nanmedian(prd), 2) if r.size else None,
        "atrial_codes_used_fraction": _round((counts > 0).mean()),
        "atrial_perplexity": _round(float(np.exp(-(p * np.log(p)).sum())), 1),
    }


def _round(x, nd: int = 4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def fidelity_main(argv: list[str]) -> int:
    from ecgtok.pipeline.flags import default_tokenizer_dir

    ap = argparse.ArgumentParser(prog="ecgtok fidelity")
    ap.add_argument("--input", required=True, nargs="+")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument(
        "--split",
        choices=("all", "holdout", "fit"),
        default="all",
        help="records set aside when the tokenizer was fitted (holdout), the others (fit)",
    )
    ap.add_argument("--per-record", type=int, default=600, help="beats × leads per record")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    out = fidelity(
        args.input,
        args.tokenizer or default_tokenizer_dir(),
        args.split,
        args.per_record,
        args.workers,
    )
    print(json.dumps(out))
    return 0


# ---- torch training --------------------------------------------------------------------
ROW_COLUMNS = (
    "record_id",
    "start_sample",
    "fs",
    "lead_names",
    "r_peaks",
    "tokens",
    "atrial_tokens",
    "rhythm",
    "tokenizer_id",
    "age",
    "sex",
)


def load_token_rows(folders: list[str]) -> list[dict]:
    """All token rows of the given run outputs or tokens/ folders (sorted, deterministic)."""
    import glob
    import os

    import pyarrow.parquet as pq

    rows = []
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "tokens", "*.parquet"))) or sorted(
            glob.glob(os.path.join(folder, "*.parquet"))
        )
        for f in files:
            names = set(pq.read_schema(f).names)
            cols = [c for c in ROW_COLUMNS if c in names]
            rows.extend(pq.read_table(f, columns=cols).to_pylist())
    rows.sort(key=lambda r: (r["record_id"], int(r["start_sample"])))
    return rows


def check_rows_tokenizer(rows: list[dict], tokenizer_id: str) -> None:
    """Refuse token rows made by another tokenizer than the one training expects."""
    from ecgtok.models.tokenizer import ArtifactError

    found = {r.get("tokenizer_id") for r in rows} - {None, ""}
    if found and found != {tokenizer_id}:
        raise ArtifactError(
            f"token rows come from tokenizer(s) {sorted(found)}, not {tokenizer_id}: "
            "re-tokenize with the same tokenizer"
        )


def _batches(n: int, size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for i in range(0, n, size):
        yield order[i : i + size]


def _set_threads() -> None:
    """One torch thread unless ECGTOK_TORCH_THREADS says otherwise: these models are small,
    and on a shared 2-core machine extra threads spin and run 3-10x slower."""
    import os

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("ECGTOK_TORCH_THREADS", "1"))))


def pretrain(
    rows: list[dict],
    vocab_size: int,
    epochs: int,
    seed: int,
    arch: dict,
    log=print,
    shapes: np.ndarray | None = None,
    inversion: np.ndarray | None = None,
):
    """Masked-beat pretraining: hide 15% of beats (all leads) and predict their words.

    `shapes` (vocab_size, 96): each word's centroid waveform, for `arch["shape_dim"]`.
    `inversion` (with `arch["flip_single_lead"]`): the tokenizer's inversion map; single-lead
    crops are then read upside down half the time, inputs and targets alike.
    """
    import torch

    from ecgtok.models.model import EcgLM, collate, row_to_example
    from ecgtok.models.tokenizer import MASK, PAD

    _set_threads()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EcgLM(vocab_size, **arch)
    if model.shape_dim:
        model.set_word_shapes(shapes)
    flip_ids = None
    if model.flip_single_lead:
        model.enable_flip(inversion)
        flip_ids = model.flip_ids
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    examples = [row_to_example(r) for r in rows if len(r["rhythm"]) >= 2]
    for epoch in range(epochs):
        total, count = 0.0, 0
        model.train()
        for idx in _batches(len(examples), 32, rng):
            b = collate([_maybe_flip(_crop(examples[i], rng, 64), rng, flip_ids) for i in idx])
            beat_ok = b["rhythm"] != PAD
            masked = (torch.rand(beat_ok.shape) < 0.15) & beat_ok
            if not masked.any():
                continue
            # A masked beat hides all its words (morphology and atrial, every lead), and
            # each of them that is present is a target for that beat's state.
            inputs, targets = {}, []
            for key in ("words", "atrial"):
                if key not in b:
                    continue
                target = b[key]
                hidden = target.clone()
                hidden[masked[:, None, :].expand_as(hidden)] = MASK
                hidden[target == PAD] = PAD
                inputs[key] = hidden
                targets.append(target)
            logits = model.mlm_logits(
                inputs["words"], b["rhythm"], b["leads"], b["rr"], inputs.get("atrial")
            )  # (B, T, V)
            lead_ok = (b["leads"] >= 0)[:, :, None] & masked[:, None, :]
            expanded = logits[:, None, :, :].expand(-1, b["words"].shape[1], -1, -1)
            picked = [(expanded[lead_ok & (t != PAD)], t[lead_ok & (t != PAD)]) for t in targets]
            loss = torch.nn.functional.cross_entropy(
                torch.cat([lg for lg, _ in picked]), torch.cat([t for _, t in picked])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        log(f"pretrain epoch {epoch + 1}/{epochs}: masked-word loss {total / max(count, 1):.3f}")
    return model


def _crop(example: dict, rng: np.random.Generator, max_beats: int, min_beats: int = 0) -> dict:
    """A random run of beats (length min_beats..max_beats) of an example, all leads."""
    t = example["rhythm"].shape[0]
    if t <= max_beats and not min_beats:
        return example
    from ecgtok.models.model import slice_beats

    n = int(rng.integers(min(min_beats or max_beats, t), min(max_beats, t) + 1))
    s = int(rng.integers(0, t - n + 1))
    return slice_beats(example, s, s + n)


def _lead_dropout(example: dict, rng: np.random.Generator) -> dict:
    """Multi-lead records: half the time one random lead, else a random subset of leads."""
    n = example["leads"].shape[0]
    if n < 2 or rng.random() < 0.3:
        return example
    from ecgtok.models.model import select_leads

    keep = (
        [int(rng.integers(n))]
        if rng.random() < 0.5
        else sorted(rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False).tolist())
    )
    return select_leads(example, keep)


def _maybe_flip(example: dict, rng: np.random.Generator, flip_ids) -> dict:
    """Single-lead examples, half the time: every word replaced by its polarity-inverted
    word (the lead as a device held the other way records it; see EcgLM.flip_single_lead)."""
    from ecgtok.models.model import LEAD_BEAT_KEYS

    if flip_ids is None or example["leads"].shape[0] != 1 or rng.random() < 0.5:
        return example
    out = dict(example)
    for key in LEAD_BEAT_KEYS:
        if key in out:
            out[key] = flip_ids[out[key]]
    return out


def set_flip_single_lead(model, config: dict, on: bool, tokenizer_dir: str | None = None):
    """Turn on the single-lead polarity flip (training and scoring) with the inversion map
    of the model's tokenizer; a model that already has it keeps it."""
    from ecgtok.models.model import check_model_tokenizer
    from ecgtok.pipeline.flags import default_tokenizer_dir

    if not on or model.flip_single_lead:
        return model, config
    tok = Tokenizer.load(tokenizer_dir or default_tokenizer_dir())
    check_model_tokenizer(config, tok.tokenizer_id)
    model.enable_flip(tok.inversion_map())
    return model, {**config, "arch": {**config["arch"], "flip_single_lead": True}}


def labelled(rows: list[dict], labels: dict) -> list[tuple[dict, dict]]:
    """(row, labels) pairs: a segment label first, else the record's label."""
    out = []
    for r in rows:
        y = labels.get((r["record_id"], int(r["start_sample"])))
        if y is None:
            y = labels.get((r["record_id"], None))
        if y is not None:
            out.append((r, y))
    return out


def finetune(
    model,
    pairs: list[tuple[dict, dict]],
    heads,
    epochs: int,
    seed: int,
    soup: int = 1,
    log=print,
    **options,
):
    """Fine-tune `model` on labelled rows (`finetune_once`, which takes `options`: lr,
    max_beats, min_beats); with `soup` > 1, that many times from the same start with
    seeds seed, seed + 1, ..., and the weights averaged (a uniform "model soup",
    Wortsman et al. 2022): about what an ensemble of the runs would score, at the cost of
    one model when scoring."""
    import copy

    if soup <= 1:
        return finetune_once(model, pairs, heads, epochs, seed, log, **options)
    states = []
    for k in range(soup):
        log(f"soup: fine-tuning run {k + 1}/{soup} (seed {seed + k})")
        run = finetune_once(copy.deepcopy(model), pairs, heads, epochs, seed + k, log, **options)
        states.append(run.state_dict())
    model.load_state_dict(average_states(states))
    return model


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts of one architecture (integer buffers: the first)."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key] for s in states) / len(states)
        else:
            out[key] = first
    return out


def finetune_once(
    model,
    pairs: list[tuple[dict, dict]],
    heads,
    epochs: int,
    seed: int,
    log=print,
    lr=5e-4,
    max_beats: int = 48,
    min_beats: int = 8,
):
    """Fit the task heads and the encoder on labelled rows; missing labels are masked.

    Augmentation for records of any length, device and lead set: every row is cut to a
    random run of 8 to `max_beats` beats (about 5-40 s, like the short recordings the
    model is judged on, and fast to train) each time it is seen, and multi-lead rows
    often lose some or all but one of their leads.
    """
    import torch

    from ecgtok.models.model import collate, row_to_example

    _set_threads()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    flip_ids = model.flip_ids if model.flip_single_lead else None
    data = []
    for row, y in pairs:
        # Fractions near 0 or 1 (segments almost wholly in or out of AF) become hard labels;
        # the others stay soft: a crop of the segment is in AF about that often.
        vals = [y.get(h, np.nan) for h in heads]
        vals = [v if np.isnan(v) or 0.05 < v < 0.95 else float(v >= 0.5) for v in vals]
        data.append((row_to_example(row), np.array(vals, dtype=np.float32)))
    if not data:
        raise SystemExit("ecgtok: error: no token row matches a label row")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(data) + 31) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in _batches(len(data), 32, rng):
            exs = []
            for i in idx:
                ex = _lead_dropout(_crop(data[i][0], rng, max_beats, min_beats), rng)
                exs.append(_maybe_flip(ex, rng, flip_ids))
            b = collate(exs)
            y = torch.from_numpy(np.stack([data[i][1] for i in idx]))
            out = model(**b)
            p = torch.stack([out[h] for h in heads], dim=1).clamp(1e-6, 1 - 1e-6)
            known = ~torch.isnan(y)
            loss = torch.nn.functional.binary_cross_entropy(p[known], y[known])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        log(
            f"finetune epoch {epoch + 1}/{epochs}: loss {total / max(count, 1):.3f} on {len(data)} rows"
        )
    return model


def predict(model, rows: list[dict], batch: int = 64) -> dict[str, np.ndarray]:
    """Head probabilities for rows (eval mode, no augmentation), as a job scores them:
    rows of fewer than MIN_BEATS_FOR_RHYTHM beats have no rhythm scores (NaN)."""
    import torch

    from ecgtok.models.burden import windowed_p_af
    from ecgtok.models.model import MIN_BEATS_FOR_RHYTHM, RHYTHM_HEADS, collate, row_to_example

    model.eval()
    outs: dict[str, list] = {h: [] for h in model.heads}
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            examples = [row_to_example(r) for r in rows[i : i + batch]]
            o = {h: v.numpy() for h, v in model(**collate(examples)).items()}
            for k, p_af in windowed_p_af(model, examples).items():  # as the job scores
                o["p_af"][k] = p_af
            for h in model.heads:
                outs[h].append(o[h])
    out = {h: np.concatenate(v) if v else np.zeros(0) for h, v in outs.items()}
    few = np.array([len(r["rhythm"]) < MIN_BEATS_FOR_RHYTHM for r in rows], dtype=bool)
    for h in RHYTHM_HEADS:
        if h in out and few.any():
            out[h] = np.where(few, np.nan, out[h]).astype(out[h].dtype)
    return out


def never_flagged(score: np.ndarray) -> np.ndarray:
    """A row with no score (NaN: no beats to read) is never flagged: it ranks as 0. So
    every labelled row counts in the metrics, for the model and the baselines alike."""
    return np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)


def read_labels(path: str, heads, split: str | None = None) -> dict:
    """CSV of record_id [, start_sample], label columns (0..1, empty = unknown).

    With `split`, only rows whose `split` column equals it (a CSV without that column
    keeps all rows).
    """
    import csv

    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if split and row.get("split") not in (None, split):
                continue
            start = row.get("start_sample")
            key = (row["record_id"], int(start) if start not in (None, "") else None)
            out[key] = {h: float(row[h]) for h in heads if row.get(h) not in (None, "")}
    return out


def read_label_sources(path: str) -> dict:
    """(record_id, start_sample or None) -> source column of a labels CSV."""
    import csv

    with open(path, newline="") as f:
        return {
            (r["record_id"], int(r["start_sample"]) if r.get("start_sample") else None): r.get(
                "source", ""
            )
            for r in csv.DictReader(f)
        }


def _train_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--tokens", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    return ap


def _beats(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def _add_finetune_arguments(ap: argparse.ArgumentParser) -> None:
    """The fine-tuning flags `finetune` and `evaluate` share (read by _finetune_options)."""
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop-beats", type=int, default=48, help="longest training crop")
    ap.add_argument("--min-crop", type=int, default=8, help="shortest training crop")
    ap.add_argument("--pool", choices=("mean", "meanmax"), default=None, help="see pretrain")
    ap.add_argument("--rr-head", type=int, default=None, help="see pretrain")
    ap.add_argument(
        "--soup", type=int, default=1, help="fine-tune this many times and average the weights"
    )
    ap.add_argument(
        "--flip-single-lead",
        action="store_true",
        help="train and score single-lead rows as they are and polarity-inverted (a "
        "handheld lead held the other way)",
    )
    ap.add_argument(
        "--p-af-window",
        type=_beats,
        default=None,
        help="score p_af of rows up to 96 beats as the mean over runs of this many beats "
        f"(0: the whole row; default {P_AF_WINDOW} when fine-tuning, a --model's own)",
    )


def _finetune_options(args) -> dict:
    """finetune()'s keyword options from the finetune/evaluate command line."""
    return {
        "log": _err,
        "lr": args.lr,
        "max_beats": args.crop_beats,
        "min_beats": args.min_crop,
        "soup": args.soup,
    }


def word_shapes(tok) -> np.ndarray:
    """(vocab_size, window) centroid waveform of every morphology word, and of every atrial
    word placed where it lies in a beat window; 0 for other ids."""
    from ecgtok.transforms.atrial import ATRIAL_END, ATRIAL_START
    from ecgtok.transforms.windows import R_INDEX

    k = tok.codebook.shape[0]
    out = np.zeros((tok.vocab_size, tok.codebook.shape[1]), dtype=np.float32)
    out[tok.morph_offset : tok.morph_offset + k] = tok.decode(np.arange(k) + tok.morph_offset)
    if tok.atrial_size:
        ids = np.arange(tok.atrial_size) + tok.atrial_offset
        out[ids, R_INDEX + ATRIAL_START : R_INDEX + ATRIAL_END] = tok.decode_atrial(ids)
    return out


def pretrain_main(argv: list[str]) -> int:
    from ecgtok.models.model import HEADS, N_RR_FEATURES, save_model
    from ecgtok.pipeline.flags import default_tokenizer_dir

    ap = _train_parser("ecgtok pretrain")
    ap.add_argument(
        "--pool",
        choices=("mean", "meanmax"),
        default="meanmax",
        help="what the heads read: the mean of the beat states, or their mean and max",
    )
    ap.add_argument(
        "--rr-head",
        type=int,
        default=0,
        help="width of an MLP of the row's mean RR features that the heads also read (0: none)",
    )
    ap.add_argument(
        "--word-shapes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a linear map of each word's codebook waveform to its embedding",
    )
    ap.add_argument(
        "--flip-single-lead",
        action="store_true",
        help="read single-lead crops upside down half the time (see finetune)",
    )
    args = ap.parse_args(argv)
    tok = Tokenizer.load(args.tokenizer or default_tokenizer_dir())
    rows = load_token_rows(args.tokens)
    check_rows_tokenizer(rows, tok.tokenizer_id)
    arch = {"d_model": args.d_model, "n_layers": args.layers, "rr_features": N_RR_FEATURES}
    if args.pool != "mean":
        arch["pool"] = args.pool
    if args.rr_head:
        arch["rr_head"] = args.rr_head
    shapes = None
    if args.word_shapes:
        shapes = word_shapes(tok)
        arch["shape_dim"] = int(shapes.shape[1])
    inversion = None
    if args.flip_single_lead:
        arch["flip_single_lead"] = True
        inversion = tok.inversion_map()
    model = pretrain(rows, tok.vocab_size, args.epochs, args.seed, arch, _err, shapes, inversion)
    config = {
        "arch": {"vocab_size": tok.vocab_size, **arch, "heads": list(HEADS)},
        "tokenizer_id": tok.tokenizer_id,
        "stage": "pretrained",
        "pretrain": {
            "rows": len(rows),
            "tokens": [_portable(t) for t in args.tokens],
            "epochs": args.epochs,
            "seed": args.seed,
        },
    }
    print(json.dumps({"model_id": save_model(model, config, args.output), "rows": len(rows)}))
    return 0


def set_pool(model, config: dict, pool: str | None, rr_head: int | None = None):
    """Switch what the (not yet fine-tuned) heads read: new heads if it changes."""
    import torch

    pool = pool or model.pool
    rr_head = model.rr_head if rr_head is None else (rr_head if model.rr_features else 0)
    if pool == model.pool and rr_head == model.rr_head:
        return model, config
    model.pool, model.rr_head = pool, rr_head
    torch.manual_seed(0)
    d = model.norm.normalized_shape[0]
    model.rr_mlp = (
        torch.nn.Sequential(torch.nn.Linear(model.rr_features, rr_head), torch.nn.GELU())
        if rr_head
        else None
    )
    model.task = torch.nn.Linear(model.head_inputs(d), len(model.heads))
    config = {**config, "arch": {**config["arch"], "pool": pool, "rr_head": rr_head}}
    return model, config


def set_p_af_window(model, config: dict, beats: int | None):
    """How the model scores p_af (models.burden.windowed_p_af): `beats`, or left as it is
    where None."""
    if beats is None:
        return model, config
    model.p_af_window = int(beats)
    return model, {**config, "arch": {**config["arch"], "p_af_window": int(beats)}}


def finetune_main(argv: list[str]) -> int:
    from ecgtok.models.model import HEADS, load_model, save_model

    ap = _train_parser("ecgtok finetune")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--init", required=True, help="pretrained model folder")
    ap.add_argument("--split", default=None, help="use only label rows of this split")
    _add_finetune_arguments(ap)
    ap.add_argument(
        "--p-af-threshold",
        type=float,
        default=0.5,
        help="operating point stored in config.json (from `ecgtok evaluate` cross-validation)",
    )
    args = ap.parse_args(argv)
    model, config = set_pool(*load_model(args.init), args.pool, args.rr_head)
    window = P_AF_WINDOW if args.p_af_window is None else args.p_af_window
    model, config = set_p_af_window(model, config, window)
    model, config = set_flip_single_lead(model, config, args.flip_single_lead, args.tokenizer)
    rows = load_token_rows(args.tokens)
    check_rows_tokenizer(rows, config["tokenizer_id"])
    labels = read_labels(args.labels, HEADS, args.split)
    pairs = labelled(rows, labels)
    model = finetune(model, pairs, HEADS, args.epochs, args.seed, **_finetune_options(args))
    config = {k: v for k, v in config.items() if k != "model_id"}
    config.update(
        p_af_threshold=args.p_af_threshold,
        stage="finetuned",
        finetune={
            "labels": _portable(args.labels),
            "split": args.split,
            "rows": len(pairs),
            "epochs": args.epochs,
            "lr": args.lr,
            "crop_beats": args.crop_beats,
            "min_crop": args.min_crop,
            "seed": args.seed,
            "soup": args.soup,
            "flip_single_lead": args.flip_single_lead,
        },
    )
    print(json.dumps({"model_id": save_model(model, config, args.output), "rows": len(pairs)}))
    return 0


# ---- evaluation ------------------------------------------------------------------------
def rr_baseline(row: dict) -> float:
    """Model-free AF score: RMSSD / mean RR of the row's beats (nan with < 3 beats)."""
    r = np.asarray(row.get("r_peaks") or [], dtype=np.float64)
    if r.size < 3:
        return float("nan")
    rr = np.diff(r) / float(row["fs"])
    return float(np.sqrt(np.mean(np.diff(rr) ** 2)) / max(rr.mean(), 1e-6))


def rr_irregularity(row: dict) -> float:
    """Model-free AF score: fraction of successive RR changes over 10% (|log ratio| > 0.1)."""
    r = np.asarray(row.get("r_peaks") or [], dtype=np.float64)
    if r.size < 4:
        return float("nan")
    lrr = np.log(np.clip(np.diff(r) / float(row["fs"]), 0.15, 3.0))
    return float(np.mean(np.abs(np.diff(lrr)) > 0.1))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict:
    """AUROC, AUPRC, and sensitivity/specificity at a threshold (labels >= 0.5 positive)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    ok = ~(np.isnan(y) | np.isnan(p))
    y, p = (y[ok] >= 0.5).astype(int), p[ok]
    out = {"n": int(y.size), "n_pos": int(y.sum())}
    if 0 < y.sum() < y.size:
        out["auroc"] = round(float(roc_auc_score(y, p)), 4)
        out["auprc"] = round(float(average_precision_score(y, p)), 4)
    if threshold is not None and y.size:
        pred = p >= threshold
        if y.sum():
            out["sensitivity"] = round(float(pred[y == 1].mean()), 4)
        if (y == 0).sum():
            out["specificity"] = round(float((~pred[y == 0]).mean()), 4)
        out["threshold"] = threshold
    return out


def operating_point(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.9) -> float:
    """The highest threshold whose sensitivity is at least `min_sensitivity`."""
    ok = ~(np.isnan(y) | np.isnan(p))
    pos = np.sort(p[ok][y[ok] >= 0.5])
    if not pos.size:
        return 0.5
    k = int(np.floor((1.0 - min_sensitivity) * pos.size))
    return round(float(pos[min(k, pos.size - 1)]), 4)


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 5) -> dict:
    """Brier score and mean predicted vs observed rate in equal-width bins."""
    ok = ~(np.isnan(y) | np.isnan(p))
    y, p = (y[ok] >= 0.5).astype(float), p[ok]
    edges = np.linspace(0, 1, bins + 1)
    table = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            table.append(
                [
                    round(lo, 2),
                    round(hi, 2),
                    int(m.sum()),
                    round(float(p[m].mean()), 3),
                    round(float(y[m].mean()), 3),
                ]
            )
    return {"brier": round(float(np.mean((p - y) ** 2)), 4), "bins": table}


def _group_folds(keys: list[str], folds: int, seed: int) -> np.ndarray:
    """Fold of each row, by a seeded hash of its record (all segments in one fold)."""
    return np.array([_priority(seed, "fold|" + k, 0, 0) % folds for k in keys])


def report(pairs, sources, preds: dict, baselines: dict, threshold: float | None) -> dict:
    """Metrics per source and head, with the model-free RR baselines beside p_af; then per
    subgroup of sex and age where the rows carry them (`subgroups`)."""
    out: dict = {}
    src = np.array(sources)
    groups = {name: src == name for name in sorted(set(sources))}
    groups["all"] = np.ones(len(pairs), bool)
    groups.update(subgroups([r for r, _ in pairs]))
    for name, m in groups.items():
        entry = {}
        for h, p in preds.items():
            y = np.array([pr[1].get(h, np.nan) for pr in pairs], dtype=np.float64)[m]
            if np.isnan(y).all():
                continue
            met = binary_metrics(y, p[m], threshold if h == "p_af" else None)
            if "auroc" in met or met["n_pos"]:
                entry[h] = met
        y_af = np.array([pr[1].get("p_af", np.nan) for pr in pairs], dtype=np.float64)[m]
        if not np.isnan(y_af).all():
            for bname, score in baselines.items():
                entry[f"baseline_{bname}"] = binary_metrics(y_af, score[m])
        out[name] = entry
    return out


AGE_SPLIT = 65  # years: the usual line in AF epidemiology


def subgroups(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row masks by sex and by age (under / at least AGE_SPLIT), for the rows that carry
    them (header comments or hospital exports); groups with no row are left out."""
    sex = np.array([str(r.get("sex") or "").upper()[:1] for r in rows])
    age = np.array([np.nan if r.get("age") is None else float(r["age"]) for r in rows])
    masks = {
        "sex=F": sex == "F",
        "sex=M": sex == "M",
        f"age<{AGE_SPLIT}": age < AGE_SPLIT,
        f"age>={AGE_SPLIT}": age >= AGE_SPLIT,
    }
    return {name: m for name, m in masks.items() if m.any()}


def evaluate_main(argv: list[str]) -> int:
    """Cross-validate (--init: fine-tune per fold) or score a trained --model on labels."""
    import copy

    from ecgtok.models.model import HEADS, RHYTHM_HEADS, load_model

    ap = argparse.ArgumentParser(prog="ecgtok evaluate")
    ap.add_argument("--tokens", nargs="+", required=True)
    ap.add_argument("--labels", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--init", help="pretrained model: fine-tune and test fold by fold")
    g.add_argument("--model", help="trained model: score the labelled rows")
    ap.add_argument("--split", default=None, help="use only label rows of this split")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8)
    _add_finetune_arguments(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="p_af operating point")
    ap.add_argument("--predictions", default=None, help="write per-row predictions CSV here")
    args = ap.parse_args(argv)
    rows = load_token_rows(args.tokens)
    labels = read_labels(args.labels, HEADS, args.split)
    srcs = read_label_sources(args.labels)
    pairs = labelled(rows, labels)
    sources = [
        srcs.get((r["record_id"], int(r["start_sample"])), srcs.get((r["record_id"], None), ""))
        for r, _ in pairs
    ]
    preds = {h: np.full(len(pairs), np.nan) for h in HEADS}
    base_model, config = load_model(args.init or args.model)
    if args.init:
        base_model, config = set_pool(base_model, config, args.pool, args.rr_head)
    window = P_AF_WINDOW if args.init and args.p_af_window is None else args.p_af_window
    base_model, config = set_p_af_window(base_model, config, window)
    if args.init:
        base_model, config = set_flip_single_lead(base_model, config, args.flip_single_lead)
    check_rows_tokenizer([r for r, _ in pairs], config["tokenizer_id"])
    fold = np.zeros(len(pairs), dtype=int)
    if args.model:
        out = predict(base_model, [r for r, _ in pairs])
        for h in HEADS:
            preds[h] = out[h]
    else:
        fold = _group_folds(
            [f"{s}/{r['record_id']}" for (r, _), s in zip(pairs, sources, strict=True)],
            args.folds,
            args.seed,
        )
        for k in range(args.folds):
            train = [pairs[i] for i in np.flatnonzero(fold != k)]
            test = np.flatnonzero(fold == k)
            options = _finetune_options(args)
            model = finetune(
                copy.deepcopy(base_model), train, HEADS, args.epochs, args.seed, **options
            )
            out = predict(model, [pairs[i][0] for i in test])
            for h in HEADS:
                preds[h][test] = out[h]
            _err(f"fold {k + 1}/{args.folds} done ({len(train)} train rows, {len(test)} test rows)")
    for h in RHYTHM_HEADS:
        preds[h] = never_flagged(preds[h])
    baseline = never_flagged([rr_baseline(r) for r, _ in pairs])
    baselines = {
        "rmssd_over_mean_rr": baseline,
        "rr_changes_over_10pct": never_flagged([rr_irregularity(r) for r, _ in pairs]),
    }
    y_af = np.array([y.get("p_af", np.nan) for _, y in pairs])
    threshold = (
        args.threshold if args.threshold is not None else operating_point(y_af, preds["p_af"])
    )
    result = {
        "model_id": config["model_id"],
        "mode": "cross-validation" if args.init else "trained model",
        "folds": args.folds if args.init else None,
        "split": args.split,
        "p_af_threshold": threshold,
        "p_af_window": int(getattr(base_model, "p_af_window", 0)),
        "metrics": report(pairs, sources, preds, baselines, threshold),
        "p_af_calibration": calibration(y_af, preds["p_af"]),
    }
    if args.predictions:
        import csv

        with open(args.predictions, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "record_id",
                    "start_sample",
                    "source",
                    "fold",
                    *HEADS,
                    "rr_baseline",
                    *[f"y_{h}" for h in HEADS],
                ]
            )
            for i, ((r, y), s) in enumerate(zip(pairs, sources, strict=True)):
                w.writerow(
                    [
                        r["record_id"],
                        r["start_sample"],
                        s,
                        fold[i],
                        *[round(float(preds[h][i]), 5) for h in HEADS],
                        round(baseline[i], 5),
                        *[y.get(h, "") for h in HEADS],
                    ]
                )
    print(json.dumps(result))
    return 0


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(command: str, argv: list[str]) -> int:
    return {
        "fit-tokenizer": fit_tokenizer_main,
        "fidelity": fidelity_main,
        "pretrain": pretrain_main,
        "finetune": finetune_main,
        "evaluate": evaluate_main,
    }[command](argv)


if __name__ == "__main__":
    import os

    os.environ.setdefault("NO_GCE_CHECK", "true")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
