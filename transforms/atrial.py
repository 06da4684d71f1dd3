"""Atrial windows: what the atria do before each beat, cut for the tokenizer's atrial words.

AF shows in two places: the rhythm (irregular RR intervals) and the atria (no P wave,
fibrillatory waves in the baseline instead). The morphology word of a beat describes its
whole 0.96 s window scaled to unit energy, so the QRS complex dominates it and a P wave a
tenth of its size barely moves the nearest word. An atrial word describes only the stretch
before the QRS, at the size it has relative to that beat's QRS:

* the window is ATRIAL_LEN samples at the tokenizer's 100 Hz view, from 0.40 s to 0.05 s
  before the R peak (the P wave, the PR segment and, at slow rates, the TQ baseline where
  fibrillatory waves are seen);
* samples that still belong to the previous beat (before its R peak + 0.6 RR, capped at
  0.40 s: its ST segment and T wave) are masked, so a fast rate does not turn a T wave
  into a "P wave";
* the kept samples have their mean removed and are divided by the beat's QRS peak-to-peak
  amplitude in the same lead (over +-50 ms of R), then clipped to +-1. A flat stretch, a
  P wave of 10% of the QRS and coarse fibrillatory waves therefore land on different words
  whatever the gain of the recording.

Plain NumPy over the tokenizer's 100 Hz signal (`transforms.windows`), vectorised over
beats and leads.
"""

from __future__ import annotations

import numpy as np

from ecgtok.transforms.windows import WINDOW_FS

ATRIAL_START = -40  # first sample, relative to R, at WINDOW_FS (0.40 s before R)
ATRIAL_END = -5  # one past the last sample (0.05 s before R: QRS onset is later)
ATRIAL_LEN = ATRIAL_END - ATRIAL_START
PREVIOUS_BEAT_FRACTION = 0.6  # the previous beat's ST-T lasts about 0.6 of its RR interval
PREVIOUS_BEAT_MAX = int(0.40 * WINDOW_FS)  # ... and at most 0.40 s after its R peak
QRS_HALF = int(0.05 * WINDOW_FS)  # QRS amplitude: peak-to-peak within +-50 ms of R
MIN_QRS = 1e-3  # a lead whose QRS is smaller than this (mV) has no atrial window (zeros)
MIN_KEPT = 5  # fewer kept samples than this: the window is all masked (zeros)


def atrial_windows(clean: np.ndarray, r_peaks: np.ndarray) -> np.ndarray:
    """Atrial windows (beats, leads, ATRIAL_LEN) float32, relative to each beat's QRS.

    `clean` is the tokenizer's 100 Hz view (n, leads); `r_peaks` are indices into it.
    Masked samples (the previous beat's ST-T, outside the recording) are 0.
    """
    return atrial_windows_many(clean[:, None, :], [r_peaks])


def atrial_windows_many(clean: np.ndarray, r_peaks: list[np.ndarray]) -> np.ndarray:
    """`atrial_windows` of several recordings of one length at once: `clean` (n,
    records, leads), one R-peak array each; windows one recording after another, each
    the same as alone."""
    from ecgtok.transforms.windows import _beats_of

    n, _, n_leads = clean.shape
    r, record, first, _ = _beats_of(r_peaks)
    if r.size == 0 or n == 0:
        return np.zeros((0, n_leads, ATRIAL_LEN), dtype=np.float32)
    idx = r[:, None] + np.arange(ATRIAL_START, ATRIAL_END)[None, :]  # (beats, L)
    keep = (idx >= 0) & (idx < n)
    # The previous beat's repolarisation; a recording's first beat has no known previous.
    rr_prev = np.diff(r, prepend=r[0] - 10**6)
    rr_prev[first] = 10**6
    after = np.minimum(PREVIOUS_BEAT_MAX, (PREVIOUS_BEAT_FRACTION * rr_prev).astype(np.int64))
    keep &= idx >= (r - rr_prev + after)[:, None]
    keep[np.count_nonzero(keep, axis=1) < MIN_KEPT] = False
    rows = record[:, None]
    w = (
        clean[np.clip(idx, 0, n - 1), rows].transpose(0, 2, 1).astype(np.float64)
    )  # (beats, leads, L)
    kept = keep[:, None, :]
    count = np.maximum(np.count_nonzero(keep, axis=1), 1)[:, None, None]
    mean = np.where(kept, w, 0.0).sum(axis=2, keepdims=True) / count
    qrs = _qrs_amplitude(clean, r, rows)[:, :, None]  # (beats, leads, 1)
    scale = np.where(qrs > MIN_QRS, 1.0 / np.maximum(qrs, MIN_QRS), 0.0)
    out = np.where(kept, (w - mean) * scale, 0.0)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _qrs_amplitude(clean: np.ndarray, r: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Peak-to-peak of each lead within +-QRS_HALF samples of each R peak, (beats, leads);
    `clean` (n, records, leads), `rows` the recording of each beat (beats, 1)."""
    n = clean.shape[0]
    idx = np.clip(r[:, None] + np.arange(-QRS_HALF, QRS_HALF + 1)[None, :], 0, n - 1)
    seg = clean[idx, rows]  # (beats, 2h+1, leads)
    return (seg.max(axis=1) - seg.min(axis=1)).astype(np.float64)
