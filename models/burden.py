"""AF burden and AF episodes of long records, from the model's scores of short beat windows.

The model was fine-tuned on runs of 8-48 beats, so a long token row (a 5-minute segment of
a Holter record) is scored window by window: `window_beats` beats, every `step_beats`.
Each beat takes the mean p_af of the windows that hold it; beats at or over the threshold
are in AF. Episodes are runs of AF beats (gaps shorter than `min_gap_s` bridged, runs
shorter than `min_episode_s` dropped), given by start and end sample at the original rate;
the burden is the fraction of the row's beat-covered time in AF episodes.

    windows = score_windows(model, row)            # [(start_beat, end_beat, p_af)]
    result = af_burden(row, windows, threshold)    # {"af_burden": ..., "af_episodes": [...]}
"""

from __future__ import annotations

import numpy as np

WINDOW_BEATS = 48
# Beats per run when a fine-tuned model scores p_af of a strip window by window (see
# windowed_p_af): the length chosen by 5-fold CV among 24, 32, 40 and 48.
P_AF_WINDOW = 24
STEP_BEATS = 24
# Rows with more beats than this (about 1.5 minutes) get a burden and episodes when scored.
LONG_ROW_BEATS = 2 * WINDOW_BEATS


# Windows scored per forward pass: bounds memory for hour-long rows.
WINDOW_CHUNK = 512
# Key prefix of the whole-row tensors `mark_for_burden` adds to an example.
BURDEN = "burden_"


def mark_for_burden(ex: dict, row: dict) -> dict:
    """Attach what a long row's burden needs to its example (in place): the whole row as an
    example of its own (the main example may keep only its first MAX_BEATS beats) and its
    R peaks. Short rows are left as they are."""
    import torch

    from ecgtok.models.model import row_to_example

    n = len(row.get("rhythm") or [])
    if n > LONG_ROW_BEATS and row.get("r_peaks") is not None and row.get("fs"):
        whole = row_to_example(row, max_beats=n)
        whole["r_peaks"] = torch.as_tensor(np.asarray(row["r_peaks"][:n], dtype=np.int64))
        whole["fs"] = torch.tensor(float(row["fs"]), dtype=torch.float64)
        # Flat tensors under a prefix: RunInference sizes every value of an example.
        for key in ("words", "atrial", "rhythm", "rr", "r_peaks", "fs"):
            if key in whole:
                ex[BURDEN + key] = whole[key]
    return ex


def _whole_row(ex: dict) -> dict | None:
    """The whole-row example `mark_for_burden` attached, or None."""
    if BURDEN + "r_peaks" not in ex:
        return None
    whole = {k[len(BURDEN) :]: v for k, v in ex.items() if k.startswith(BURDEN)}
    whole["leads"] = ex["leads"]
    return whole


def p_af_of_windows(model, parts: list[dict], device=None) -> np.ndarray:
    """p_af of each window example, in forward passes of up to WINDOW_CHUNK windows (which
    bounds memory for hour-long rows)."""
    import torch

    from ecgtok.models.model import collate

    p = []
    with torch.inference_mode():
        for lo in range(0, len(parts), WINDOW_CHUNK):
            batch = collate(parts[lo : lo + WINDOW_CHUNK])
            inputs = {k: v.to(device) if device else v for k, v in batch.items()}
            p.append(model(**inputs)["p_af"].float().cpu().numpy())
    return np.concatenate(p)


def burden_of_examples(model, examples: list[dict], threshold: float, device=None) -> dict:
    """{index: af_burden() result} for the examples marked by `mark_for_burden`: their
    windows scored in forward passes of up to WINDOW_CHUNK windows."""
    owners, spans, parts = [], [], []
    wholes = {i: _whole_row(ex) for i, ex in enumerate(examples)}
    for i, whole in wholes.items():
        if whole is None:
            continue
        sp, pa_ = window_examples(whole)
        owners += [i] * len(sp)
        spans += sp
        parts += pa_
    if not parts:
        return {}
    p = p_af_of_windows(model, parts, device)
    windows: dict[int, list] = {}
    for i, (s, e), q in zip(owners, spans, p, strict=True):
        windows.setdefault(i, []).append((s, e, float(q)))
    out = {}
    for i, win in windows.items():
        whole = wholes[i]
        beats = {"r_peaks": whole["r_peaks"].numpy(), "fs": float(whole["fs"])}
        out[i] = af_burden(beats, win, threshold)
    return out


def windowed_p_af(model, examples: list[dict], device=None) -> dict[int, float]:
    """{index: p_af} for the examples a model scores window by window: with
    `model.p_af_window` = w > 0, a row of more than w and at most LONG_ROW_BEATS beats gets
    the mean p_af of its runs of w beats every w // 2 (the last run ends at the last beat).

    Why: fine-tuning sees random runs of 8-48 beats, and a 30-60 s strip read whole is
    longer than most of them; the mean over runs of the length the heads were trained on
    scored higher in 5-fold CV (CinC 2017 0.9652 -> 0.9677 at w = 24, the same fold
    models) and on held-out Holter windows (0.949 -> 0.952). Longer rows keep their
    whole-row p_af, which their max pooling keeps sensitive to a short episode; their
    windows give af_burden and af_episodes instead (`burden_of_examples`).
    """
    w = int(getattr(model, "p_af_window", 0) or 0)
    if w <= 0:
        return {}
    owners, parts = [], []
    for i, ex in enumerate(examples):
        t = ex["rhythm"].shape[0]
        if w < t <= LONG_ROW_BEATS:
            _, pa_ = window_examples(ex, w, max(1, w // 2))
            owners += [i] * len(pa_)
            parts += pa_
    if not parts:
        return {}
    p = p_af_of_windows(model, parts, device).astype(np.float64)
    sums = np.bincount(owners, weights=p)
    counts = np.bincount(owners)
    return {i: float(sums[i] / counts[i]) for i in sorted(set(owners))}


def window_examples(
    ex: dict, window_beats: int = WINDOW_BEATS, step_beats: int = STEP_BEATS
) -> tuple[list[tuple[int, int]], list[dict]]:
    """([(first, end)], [example]) for each run of `window_beats` beats of an example
    (`models.model.row_to_example`), every `step_beats`; the last run ends at the last beat."""
    from ecgtok.models.model import BEAT_KEYS, LEAD_BEAT_KEYS, slice_beats

    t = ex["rhythm"].shape[0]
    if t == 0:
        return [], []
    starts = list(range(0, max(1, t - window_beats + 1), step_beats))
    if starts[-1] + window_beats < t:
        starts.append(t - window_beats)
    spans, parts = [], []
    for s in starts:
        e = min(t, s + window_beats)
        kept = ("leads", "tokenizer", *LEAD_BEAT_KEYS, *BEAT_KEYS)
        part = slice_beats({k: v for k, v in ex.items() if k in kept}, s, e)
        spans.append((s, e))
        parts.append(part)
    return spans, parts


def score_windows(
    model, row: dict, window_beats: int = WINDOW_BEATS, step_beats: int = STEP_BEATS
) -> list:
    """p_af of each run of `window_beats` beats of a token row: [(first, end, p_af)]."""
    from ecgtok.models.model import row_to_example

    spans, parts = window_examples(row_to_example(row, max_beats=10**9), window_beats, step_beats)
    if not parts:
        return []
    model.eval()
    p = p_af_of_windows(model, parts)
    return [(s, e, float(q)) for (s, e), q in zip(spans, p, strict=True)]


def af_burden(
    row: dict,
    windows: list,
    threshold: float,
    min_episode_s: float = 30.0,
    min_gap_s: float = 10.0,
) -> dict:
    """AF burden (0..1) and episodes [(start_sample, end_sample)] of one token row."""
    r = np.asarray(row["r_peaks"], dtype=np.int64)
    fs = float(row["fs"])
    if r.size < 2 or not windows:
        return {"af_burden": 0.0, "af_episodes": []}
    total = np.zeros(r.size)
    count = np.zeros(r.size)
    for s, e, p in windows:
        total[s:e] += p
        count[s:e] += 1
    beat_p = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    in_af = beat_p >= threshold
    # Runs of AF beats, each spanning from its first to its last R peak.
    runs = []
    i = 0
    while i < r.size:
        if in_af[i]:
            j = i
            while j + 1 < r.size and in_af[j + 1]:
                j += 1
            runs.append([int(r[i]), int(r[j])])
            i = j + 1
        else:
            i += 1
    merged: list[list[int]] = []
    for run in runs:
        if merged and (run[0] - merged[-1][1]) / fs < min_gap_s:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    episodes = [(a, b) for a, b in merged if (b - a) / fs >= min_episode_s]
    span = max(1, int(r[-1] - r[0]))
    burden = sum(b - a for a, b in episodes) / span
    return {"af_burden": round(float(min(1.0, burden)), 4), "af_episodes": episodes}
