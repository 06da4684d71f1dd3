"""Per-beat quality flags and lead-off masks (plain NumPy/SciPy).

`beat_quality(signal, fs, r_peaks)` returns one uint8 per beat, a bitwise OR of:

* `FLAG_NOISE`: no lead is clean around the beat: in every lead the broadband residual
  (signal minus its 40 ms moving average, outside the QRS) is large against the QRS;
* `FLAG_SATURATED`: some lead sits on its rail (its extreme value, repeated) inside the
  beat window: the amplifier or ADC clipped;
* `FLAG_FLAT`: some lead is flat (lead-off or disconnected) over most of the window.

The beat window is [R - 250 ms, R + 400 ms], cut short at the record's edges; the first
and last beats are flagged like any other.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d, minimum_filter1d, uniform_filter1d

FLAG_NOISE = 1
FLAG_SATURATED = 2
FLAG_FLAT = 4
FLAG_NOISE_MASK = FLAG_NOISE | FLAG_SATURATED | FLAG_FLAT  # any flag: beat is unreliable

PRE_S, POST_S = 0.25, 0.40
QRS_S = 0.06  # half-width of the QRS part of the window
FLAT_MV = 0.01  # peak-to-peak below this over FLAT_WINDOW_S = lead off / flat
FLAT_WINDOW_S = 0.20
NOISE_RATIO = 0.12  # residual RMS / QRS peak-to-peak above which a lead is noisy
SAT_RUN_S = 0.01  # a rail has to be held this long to count as clipping


def _as_2d(signal: np.ndarray) -> np.ndarray:
    x = np.asarray(signal, dtype=np.float32)
    return x[:, None] if x.ndim == 1 else x


def _block_ptp(x: np.ndarray, w: int) -> np.ndarray:
    """Peak-to-peak per consecutive block of w samples, repeated back to (samples, leads)."""
    n, n_leads = x.shape
    nb = -(-n // w)
    pad = nb * w - n
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    blocks = x.reshape(nb, w, n_leads)
    ptp = blocks.max(axis=1) - blocks.min(axis=1)
    return np.repeat(ptp, w, axis=0)[:n]


def lead_off_mask(signal: np.ndarray, fs: float, flat_mv: float = FLAT_MV) -> np.ndarray:
    """(samples, leads) bool: True where a lead is flat or not finite.

    Flat means a peak-to-peak under `flat_mv` mV within a 100 ms block and in one of its
    neighbours. Lead-off electrodes read a constant or near-constant value (often 0 or
    a rail); a real ECG moves by far more than 10 uV in 200 ms.
    """
    x = _as_2d(signal)
    n = x.shape[0]
    finite = np.isfinite(x)
    xf = np.where(finite, x, 0.0)
    w = max(1, int(round(FLAT_WINDOW_S * fs / 2)))
    low = _block_ptp(xf, w) < flat_mv
    # flat over 200 ms: this block and the previous or the next one are flat
    prev = np.concatenate([low[:w], low[:-w]]) if n > w else low
    nxt = np.concatenate([low[w:], low[-w:]]) if n > w else low
    return (low & (prev | nxt)) | ~finite


def saturation_mask(signal: np.ndarray, fs: float) -> np.ndarray:
    """(samples, leads) bool: True where a lead holds its own extreme value for at least
    SAT_RUN_S (clipping). A lead that never repeats its extreme is never flagged."""
    x = _as_2d(signal)
    run = max(2, int(round(SAT_RUN_S * fs)))
    out = np.zeros(x.shape, dtype=bool)
    for lead in range(x.shape[1]):
        v = x[:, lead]
        fin = np.isfinite(v)
        if not fin.any():
            continue
        for rail in (v[fin].max(), v[fin].min()):
            at = v == rail
            if np.count_nonzero(at) < run:
                continue
            held = minimum_filter1d(at.view(np.uint8), run) > 0
            out[:, lead] |= maximum_filter1d(held.view(np.uint8), run) > 0
    return out


def _window_sums(prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sums over [lo, hi) per beat from a prefix sum (samples + 1, leads)."""
    return prefix[hi] - prefix[lo]


def _prefix(v: np.ndarray) -> np.ndarray:
    p = np.zeros((v.shape[0] + 1, v.shape[1]), dtype=np.float64)
    np.cumsum(v, axis=0, out=p[1:])
    return p


def beat_quality(signal: np.ndarray, fs: float, r_peaks: np.ndarray) -> np.ndarray:
    """uint8 flags per beat (see the module doc). Costs a few passes over the record."""
    x = _as_2d(signal)
    r = np.asarray(r_peaks, dtype=np.int64).ravel()
    flags = np.zeros(r.size, dtype=np.uint8)
    n, n_leads = x.shape
    if r.size == 0 or n == 0:
        return flags
    r = np.clip(r, 0, n - 1)
    pre, post, q = (int(round(v * fs)) for v in (PRE_S, POST_S, QRS_S))
    lo, hi = np.maximum(r - pre, 0), np.minimum(r + post + 1, n)
    qlo, qhi = np.maximum(r - q, 0), np.minimum(r + q + 1, n)
    length = (hi - lo)[:, None].astype(np.float64)

    off = lead_off_mask(x, fs)
    flat_frac = _window_sums(_prefix(off), lo, hi) / length  # (beats, leads)
    flags[(flat_frac > 0.5).any(axis=1)] |= FLAG_FLAT

    sat = saturation_mask(x, fs)
    if sat.any():
        flags[(_window_sums(_prefix(sat), lo, hi) > 0).any(axis=1)] |= FLAG_SATURATED

    # noise: broadband residual outside the QRS against the QRS peak-to-peak
    xf = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    resid = xf - uniform_filter1d(xf, max(1, int(round(0.04 * fs))) | 1, axis=0)
    p2 = _prefix(resid * resid)
    outside_sum = _window_sums(p2, lo, hi) - _window_sums(p2, qlo, qhi)
    outside_n = np.maximum(length - (qhi - qlo)[:, None], 1.0)
    rms = np.sqrt(np.maximum(outside_sum, 0.0) / outside_n)
    idx = np.clip(r[:, None] + np.arange(-q, q + 1)[None, :], 0, n - 1)
    seg = xf[idx]  # (beats, qrs window, leads)
    qrs_ptp = seg.max(axis=1) - seg.min(axis=1)
    noisy = rms > NOISE_RATIO * np.maximum(qrs_ptp, 1e-6)
    clean_lead = ~noisy & (flat_frac <= 0.5)
    flags[~clean_lead.any(axis=1)] |= FLAG_NOISE
    return flags
