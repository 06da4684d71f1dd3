"""Cut beat windows for the tokenizer: HeartLang's layout, vectorised over beats and leads.

A beat is 96 samples at 100 Hz with its R peak at sample 48 (0.48 s each side). As in
HeartLang, the window is RR-adaptive: samples before the midpoint to the previous R peak
and after the midpoint to the next one are set to the window's baseline, so a word
describes one beat's morphology and not its neighbours'. The first and last beats keep
their (possibly short) windows; samples beyond the recording are baseline too.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np

WINDOW_FS = 100.0
WINDOW_LEN = 96
R_INDEX = WINDOW_LEN // 2
# Band for the tokenizer's view of a beat: keeps P, QRS and T, drops wander and EMG.
BAND_HZ = (0.5, 40.0)


def clean_for_windows(signal: np.ndarray, fs: float) -> np.ndarray:
    """Band-pass each lead and resample it to WINDOW_FS. Returns (n, leads) float32."""
    # scipy.signal is imported here, not at the top: the launcher imports this module
    # (through the tokenizer) but never filters, and scipy.signal costs ~1 s to import.
    from scipy import signal as sps

    x = np.asarray(signal, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    sos = _band_sos(float(fs))
    # sosfiltfilt's default padding needs more than 3 * (2 * sections + 1) samples.
    if x.shape[0] > 3 * (2 * sos.shape[0] + 1):
        x = sps.sosfiltfilt(sos, x, axis=0)
    up, down = _rational(WINDOW_FS / fs)
    if (up, down) != (1, 1):
        x = sps.resample_poly(x, up, down, axis=0, window=_resample_fir(up, down))
    return x.astype(np.float32)


# The filter designs depend on the rate only: designed once per rate, not per record
# (butter + firwin cost about a tenth of a 10 s 12-lead record's filtering). They are
# exactly what `sps.butter` / `sps.resample_poly` would design on each call.
@lru_cache(maxsize=64)
def _band_sos(fs: float) -> np.ndarray:
    from scipy import signal as sps

    high = min(BAND_HZ[1], 0.45 * fs)
    # left writable: scipy's sosfilt takes a writable memoryview (it does not write to it)
    return sps.butter(2, [BAND_HZ[0], high], btype="bandpass", fs=fs, output="sos")


@lru_cache(maxsize=64)
def _resample_fir(up: int, down: int) -> np.ndarray:
    """resample_poly's default anti-aliasing filter (Kaiser, beta 5, 10 periods each side)."""
    from scipy import signal as sps

    max_rate = max(up, down)
    h = sps.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    h.setflags(write=False)  # resample_poly copies it before scaling
    return h


@lru_cache(maxsize=256)
def _rational(ratio: float, max_den: int = 1000) -> tuple[int, int]:
    f = Fraction(ratio).limit_denominator(max_den)
    return f.numerator, f.denominator


def beat_windows(clean: np.ndarray, r_peaks_window_fs: np.ndarray) -> np.ndarray:
    """Windows (beats, leads, WINDOW_LEN) around R peaks given at WINDOW_FS.

    `clean` is the output of `clean_for_windows`. Each window has its median removed
    and is masked outside the midpoints to its neighbouring beats.
    """
    n, leads = clean.shape
    r = np.asarray(r_peaks_window_fs, dtype=np.int64)
    if r.size == 0 or n == 0:
        return np.zeros((0, leads, WINDOW_LEN), dtype=np.float32)
    offsets = np.arange(WINDOW_LEN) - R_INDEX
    idx = r[:, None] + offsets[None, :]  # (beats, L)
    inside = (idx >= 0) & (idx < n)
    # RR-adaptive mask: keep from the midpoint to the previous R to the midpoint to the next.
    prev_mid = np.empty_like(r)
    next_mid = np.empty_like(r)
    prev_mid[0] = -(10**9)
    next_mid[-1] = 10**9
    mids = (r[1:] + r[:-1]) // 2
    prev_mid[1:] = mids
    next_mid[:-1] = mids
    keep = inside & (idx >= prev_mid[:, None]) & (idx < next_mid[:, None])
    w = clean[np.clip(idx, 0, n - 1)]  # (beats, L, leads)
    w = np.transpose(w, (0, 2, 1))  # (beats, leads, L)
    base = np.median(np.where(keep[:, None, :], w, np.nan), axis=2, keepdims=True)
    base = np.nan_to_num(base, nan=0.0)
    w = np.where(keep[:, None, :], w - base, 0.0)
    return w.astype(np.float32)


def to_window_rate(r_peaks: np.ndarray, fs: float) -> np.ndarray:
    """R-peak indices at the original rate -> nearest index at WINDOW_FS."""
    return np.rint(np.asarray(r_peaks, dtype=np.float64) * (WINDOW_FS / fs)).astype(np.int64)
