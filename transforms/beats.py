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


def _lead_major(signal: np.ndarray) -> np.ndarray:
    """(leads, samples) C-contiguous float32. Every pass below runs along contiguous
    rows: NumPy reductions along axis 0 of a (samples, 12) array are ~30x slower."""
    return np.ascontiguousarray(_as_2d(signal).T)


def _block_ptp(xt: np.ndarray, w: int) -> np.ndarray:
    """Peak-to-peak per consecutive block of w samples, (leads, blocks); the last block
    is padded with the last sample."""
    n_leads, n = xt.shape
    nb = -(-n // w)
    pad = nb * w - n
    if pad:
        xt = np.concatenate([xt, np.repeat(xt[:, -1:], pad, axis=1)], axis=1)
    blocks = xt.reshape(n_leads, nb, w)
    return blocks.max(axis=2) - blocks.min(axis=2)


def lead_off_mask(signal: np.ndarray, fs: float, flat_mv: float = FLAT_MV) -> np.ndarray:
    """(samples, leads) bool: True where a lead is flat or not finite.

    Flat means a peak-to-peak under `flat_mv` mV within a 100 ms block and in one of its
    neighbours. Lead-off electrodes read a constant or near-constant value (often 0 or
    a rail); a real ECG moves by far more than 10 uV in 200 ms.
    """
    return _lead_off_rows(_lead_major(signal), fs, flat_mv).T


def _lead_off_rows(xt: np.ndarray, fs: float, flat_mv: float = FLAT_MV) -> np.ndarray:
    """`lead_off_mask` on a (leads, samples) array, returned (leads, samples)."""
    n = xt.shape[1]
    finite = np.isfinite(xt)
    all_finite = bool(finite.all())
    xf = xt if all_finite else np.where(finite, xt, 0.0)
    w = max(1, int(round(FLAT_WINDOW_S * fs / 2)))
    low = _block_ptp(xf, w) < flat_mv  # (leads, blocks)
    if not low.any():  # the common case: nothing flat, no per-sample work
        return np.zeros(xt.shape, dtype=bool) if all_finite else ~finite
    # Flat over 200 ms: this block and the previous or the next one are flat. Judged
    # per block; the last w samples have no next block and keep their own flatness.
    prev = np.concatenate([low[:, :1], low[:, :-1]], axis=1)
    nxt = np.concatenate([low[:, 1:], low[:, -1:]], axis=1)
    off = np.repeat(low & (prev | nxt), w, axis=1)[:, :n]
    own = np.repeat(low, w, axis=1)[:, :n]
    if n > w:
        off[:, n - w :] = own[:, n - w :]
    else:
        off = own
    return off | ~finite


def saturation_mask(signal: np.ndarray, fs: float) -> np.ndarray | None:
    """(samples, leads) bool: True where a lead holds its own extreme value for at least
    SAT_RUN_S (clipping), or None when no lead does. A lead that never repeats its
    extreme is never flagged."""
    sat = _saturation_rows(_lead_major(signal), fs)
    return None if sat is None else sat.T


def _saturation_rows(xt: np.ndarray, fs: float) -> np.ndarray | None:
    """`saturation_mask` on a (leads, samples) array, returned (leads, samples)."""
    run = max(2, int(round(SAT_RUN_S * fs)))
    fin = np.isfinite(xt)
    if fin.all():
        at_hi = xt == xt.max(axis=1, keepdims=True)
        at_lo = xt == xt.min(axis=1, keepdims=True)
    else:  # rails are the extremes of the finite samples
        at_hi = (xt == np.where(fin, xt, -np.inf).max(axis=1, keepdims=True)) & fin
        at_lo = (xt == np.where(fin, xt, np.inf).min(axis=1, keepdims=True)) & fin
    # Only leads that touch a rail `run` times need the filters.
    candidates = [
        (lead, at[lead])
        for at in (at_hi, at_lo)
        for lead in np.flatnonzero(np.count_nonzero(at, axis=1) >= run)
    ]
    if not candidates:
        return None
    out = np.zeros(xt.shape, dtype=bool)
    for lead, at in candidates:
        held = minimum_filter1d(at.view(np.uint8), run) > 0
        out[lead] |= maximum_filter1d(held.view(np.uint8), run) > 0
    return out


def _window_sums(prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sums over [lo, hi) per beat, (beats, leads), from a prefix sum (leads, samples + 1)."""
    return (prefix[:, hi] - prefix[:, lo]).T


def _prefix(v: np.ndarray) -> np.ndarray:
    """Prefix sums along each row of (leads, samples), with a leading 0 column."""
    p = np.zeros((v.shape[0], v.shape[1] + 1), dtype=np.float64)
    np.cumsum(v, axis=1, out=p[:, 1:])
    return p


def beat_quality(signal: np.ndarray, fs: float, r_peaks: np.ndarray) -> np.ndarray:
    """uint8 flags per beat (see the module doc). Costs a few passes over the record."""
    xt = _lead_major(signal)
    r = np.asarray(r_peaks, dtype=np.int64).ravel()
    flags = np.zeros(r.size, dtype=np.uint8)
    n_leads, n = xt.shape
    if r.size == 0 or n == 0:
        return flags
    r = np.clip(r, 0, n - 1)
    pre, post, q = (int(round(v * fs)) for v in (PRE_S, POST_S, QRS_S))
    lo, hi = np.maximum(r - pre, 0), np.minimum(r + post + 1, n)
    qlo, qhi = np.maximum(r - q, 0), np.minimum(r + q + 1, n)
    length = (hi - lo)[:, None].astype(np.float64)

    off = _lead_off_rows(xt, fs)
    if off.any():
        flat_frac = _window_sums(_prefix(off), lo, hi) / length  # (beats, leads)
        flags[(flat_frac > 0.5).any(axis=1)] |= FLAG_FLAT
    else:  # the common case: no prefix sum over the record
        flat_frac = np.zeros((r.size, n_leads))

    sat = _saturation_rows(xt, fs)
    if sat is not None:
        flags[(_window_sums(_prefix(sat), lo, hi) > 0).any(axis=1)] |= FLAG_SATURATED

    # noise: broadband residual outside the QRS against the QRS peak-to-peak
    xf = xt if np.isfinite(xt).all() else np.where(np.isfinite(xt), xt, np.float32(0.0))
    resid = xf - uniform_filter1d(xf, max(1, int(round(0.04 * fs))) | 1, axis=1)
    p2 = _prefix(resid * resid)
    outside_sum = _window_sums(p2, lo, hi) - _window_sums(p2, qlo, qhi)
    outside_n = np.maximum(length - (qhi - qlo)[:, None], 1.0)
    rms = np.sqrt(np.maximum(outside_sum, 0.0) / outside_n)
    idx = np.clip(r[:, None] + np.arange(-q, q + 1)[None, :], 0, n - 1)
    seg = xf[:, idx]  # (leads, beats, qrs window)
    qrs_ptp = (seg.max(axis=2) - seg.min(axis=2)).T
    noisy = rms > NOISE_RATIO * np.maximum(qrs_ptp, 1e-6)
    clean_lead = ~noisy & (flat_frac <= 0.5)
    flags[~clean_lead.any(axis=1)] |= FLAG_NOISE
    return flags
