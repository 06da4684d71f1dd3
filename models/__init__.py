"""The heartbeat tokenizer and the torch scoring model, their artifacts and training."""

from __future__ import annotations

import os


def artifacts_dir() -> str:
    """Folder of the default artifacts shipped with the package."""
    return os.path.join(os.path.dirname(__file__), "artifacts")
