"""The README picture: one synthetic recording, its beats and a token id above each beat."""

from __future__ import annotations

import numpy as np
import pytest

from ecgtok.transforms.figure import plot_record_with_tokens
from ecgtok.transforms.synth import STANDARD_LEADS, synthesize_ecg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tokens(n_leads: int, n_beats: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 512, n_beats).tolist() for _ in range(n_leads)]


def test_renders_a_png(tmp_path):
    sig, peaks = synthesize_ecg(10, 500, rhythm="af", heart_rate=90, seed=1)
    out = tmp_path / "fig" / "record.png"
    plot_record_with_tokens(
        sig, 500, peaks, _tokens(12, len(peaks)), STANDARD_LEADS, str(out), leads=("II", "V1")
    )
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(str(out))
    assert img.shape[0] > 300 and img.shape[1] > 600


def test_single_lead_holter_names_and_no_beats(tmp_path):
    sig, peaks = synthesize_ecg(20, 360, ["MLII", "V5"], seed=2)
    out = tmp_path / "holter.png"
    plot_record_with_tokens(sig, 360, peaks, _tokens(2, len(peaks)), ["MLII", "V5"], str(out),
                            seconds=5.0)  # fmt: skip
    assert out.read_bytes()[:8] == PNG_MAGIC
    flat, none = synthesize_ecg(10, 500, ["I"], rhythm="flat")
    out2 = tmp_path / "flat.png"
    plot_record_with_tokens(flat, 500, none, [[]], ["I"], str(out2))  # II absent: first lead
    assert out2.read_bytes()[:8] == PNG_MAGIC


def test_misaligned_tokens_are_refused(tmp_path):
    sig, peaks = synthesize_ecg(10, 500, ["II"], seed=0)
    with pytest.raises(ValueError):
        plot_record_with_tokens(sig, 500, peaks, [[1, 2]], ["II"], str(tmp_path / "x.png"))
