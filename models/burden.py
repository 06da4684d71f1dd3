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


def score_windows(model, row: dict, window_beats: int = 48, step_beats: int = 24) -> list:
    """p_af of each run of `window_beats` beats of a token row: [(first, end, p_af)]."""
    import torch

    from ecgtok.models.model import collate, row_to_example

    ex = row_to_example(row, max_beats=10**9)
    t = ex["rhythm"].shape[0]
    if t == 0:
        return []
    starts = list(range(0, max(1, t - window_beats + 1), step_beats))
    if starts[-1] + window_beats < t:
        starts.append(t - window_beats)
    parts = []
    for s in starts:
        e = min(t, s + window_beats)
        part = dict(ex)
        part["words"], part["rhythm"] = ex["words"][:, s:e], ex["rhythm"][s:e]
        if "rr" in ex:
            part["rr"] = ex["rr"][s:e]
        parts.append(part)
    model.eval()
    with torch.inference_mode():
        p = model(**collate(parts))["p_af"].numpy()
    return [(s, min(t, s + window_beats), float(q)) for s, q in zip(starts, p, strict=True)]


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
