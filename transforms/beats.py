"""Per-beat quality flags (placeholder until the beat-quality work lands)."""

from __future__ import annotations

import numpy as np

FLAG_NOISE = 1
FLAG_SATURATED = 2
FLAG_FLAT = 4
FLAG_NOISE_MASK = FLAG_NOISE | FLAG_SATURATED | FLAG_FLAT


def beat_quality(signal: np.ndarray, fs: float, r_peaks: np.ndarray) -> np.ndarray:
    return np.zeros(len(r_peaks), dtype=np.uint8)
