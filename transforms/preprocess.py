"""ECG preprocessing: plain NumPy/SciPy functions over (samples,) or (samples, leads) arrays.

Every function takes the signal and its sampling rate `fs` (Hz), filters along axis 0 and
returns a new float array of the same shape (except `resample`). The choices:

* **Zero phase.** Filters run forwards and backwards (`scipy.signal.sosfiltfilt`), so an
  R peak stays on the sample where it was. Second-order sections keep low cut-offs at high
  rates numerically stable (a 0.5 Hz corner at 20 kHz is fine in SOS form, not in b/a).
* **Baseline wander** is removed with a 2nd-order Butterworth high-pass at 0.5 Hz run both
  ways (4th-order magnitude, -6 dB at 0.5 Hz). This is the AHA/IEC 60601-2-51 diagnostic
  lower corner; it keeps the ST segment and costs a fraction of a median-filter baseline.
* **Band-pass** defaults to 0.5-40 Hz (monitoring band); the QRS detector uses its own
  narrower 5-20 Hz band where QRS energy dominates P/T waves, wander and mains.
* **Power-line notch**: an IIR notch (quality factor 30, about 1.7 Hz wide at 50 Hz) at
  50 and 60 Hz, zero phase. Frequencies at or above Nyquist are skipped.
* **Resampling** uses polyphase filtering (`scipy.signal.resample_poly`) with the ratio
  reduced to small integers; its Kaiser anti-aliasing filter is applied once. FFT
  resampling is avoided: it needs the whole record in memory and rings at the edges.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps

BASELINE_CUTOFF_HZ = 0.5
BANDPASS_HZ = (0.5, 40.0)
MAINS_HZ = (50.0, 60.0)
NOTCH_Q = 30.0


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _padlen(sos: np.ndarray, n: int) -> int:
    # sosfiltfilt's default pad is tiny for low corners; cap at what the signal allows.
    return min(3 * (2 * len(sos) + 1), max(n - 1, 0))


@lru_cache(maxsize=64)
def butter_sos(order: int, cutoff: tuple[float, ...] | float, btype: str, fs: float) -> np.ndarray:
    """Cached Butterworth design in SOS form (designs are reused for every record)."""
    return sps.butter(order, cutoff, btype=btype, fs=fs, output="sos")


def _filtfilt(sos: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = _as_float(x)
    if x.shape[0] < 2:
        return x.copy()
    return sps.sosfiltfilt(sos, x, axis=0, padlen=_padlen(sos, x.shape[0]))


def remove_baseline(x: np.ndarray, fs: float, cutoff: float = BASELINE_CUTOFF_HZ) -> np.ndarray:
    """Remove baseline wander with a zero-phase 2nd-order Butterworth high-pass at `cutoff` Hz."""
    fs = float(fs)
    if cutoff >= fs / 2:
        raise ValueError(f"cutoff {cutoff} Hz is not below Nyquist ({fs / 2} Hz)")
    return _filtfilt(butter_sos(2, float(cutoff), "highpass", fs), x)


def bandpass(
    x: np.ndarray,
    fs: float,
    low: float = BANDPASS_HZ[0],
    high: float = BANDPASS_HZ[1],
    order: int = 2,
) -> np.ndarray:
    """Zero-phase Butterworth band-pass. `high` is clipped to 0.45*fs for low-rate inputs."""
    fs = float(fs)
    high = min(float(high), 0.45 * fs)
    if not 0 < low < high:
        raise ValueError(f"band {low}-{high} Hz is empty at fs={fs} Hz")
    return _filtfilt(butter_sos(order, (float(low), high), "bandpass", fs), x)


def notch(x: np.ndarray, fs: float, freqs=MAINS_HZ, q: float = NOTCH_Q) -> np.ndarray:
    """Zero-phase IIR notch at each mains frequency in `freqs` below Nyquist."""
    fs = float(fs)
    y = _as_float(x)
    for f0 in freqs:
        if not 0 < f0 < 0.5 * fs * 0.98:
            continue
        b, a = sps.iirnotch(float(f0), q, fs=fs)
        sos = sps.tf2sos(b, a)
        y = _filtfilt(sos, y)
    return y


def resample_ratio(fs_in: float, fs_out: float, max_den: int = 1000) -> tuple[int, int]:
    """(up, down) small integers with up/down ~= fs_out/fs_in."""
    frac = Fraction(float(fs_out) / float(fs_in)).limit_denominator(max_den)
    return max(frac.numerator, 1), max(frac.denominator, 1)


def resample(x: np.ndarray, fs: float, fs_out: float) -> tuple[np.ndarray, float]:
    """Polyphase resampling along axis 0. Returns (y, actual output rate).

    The actual rate is `fs * up / down` for the rational ratio used; it equals `fs_out`
    whenever the ratio is exact (all common ECG rates), else it is within 0.1 %.
    """
    x = _as_float(x)
    fs = float(fs)
    up, down = resample_ratio(fs, fs_out)
    if up == down:
        return x.copy(), fs
    return sps.resample_poly(x, up, down, axis=0), fs * up / down


def preprocess(x: np.ndarray, fs: float, fs_out: float | None = None) -> tuple[np.ndarray, float]:
    """Standard chain for tokenising: notch, baseline removal, 0.5-40 Hz band, optional resample."""
    y = notch(x, fs)
    y = bandpass(y, fs, *BANDPASS_HZ)
    if fs_out is not None:
        return resample(y, fs, fs_out)
    return y, float(fs)
