"""Lead names normalised to one vocabulary, so 'lead ii', 'II' and 'ECG II' read the same."""

from __future__ import annotations

import re

STANDARD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
# Holter and monitoring names kept as their own words.
HOLTER_LEADS = ["MLI", "MLII", "MLIII", "CM5", "CC5", "ML5", "D1", "D2", "D3"]
VOCABULARY = STANDARD_LEADS + HOLTER_LEADS
_CANONICAL = {name.upper(): name for name in VOCABULARY}
_PREFIXES = re.compile(r"^((ECG|EKG|LEAD)[\s_\-:.]*)+", re.IGNORECASE)
# Other spellings of vocabulary leads (keys upper-case, without separators).
_ALIASES = {"DI": "I", "DII": "II", "DIII": "III"}


def normalise_lead_name(name: str) -> str:
    """Map a raw lead name to the project's vocabulary; unknown names are returned trimmed.

    Case, separators and ECG/EKG/LEAD prefixes are ignored ('ECG lead II' -> 'II',
    'avr' -> 'aVR', 'DII' -> 'II'). `VOCABULARY` itself is fixed: model artifacts size
    their lead embedding by it.
    """
    raw = str(name).strip()
    key = _PREFIXES.sub("", raw).replace(" ", "").replace("_", "").replace("-", "")
    upper = key.upper()
    if upper in _CANONICAL:
        return _CANONICAL[upper]
    if upper in _ALIASES:
        return _ALIASES[upper]
    return raw


def lead_index(name: str) -> int:
    """Position of a normalised lead in VOCABULARY; unknown leads share the last index."""
    try:
        return VOCABULARY.index(name)
    except ValueError:
        return len(VOCABULARY)
