"""One exception type for everything that can go wrong with one record.

Every failure inside a per-record step is raised as (or converted to) a `RecordError`,
so the Beam wrappers can turn it into an error row naming the record, the stage and
the reason, and the job goes on.
"""

from __future__ import annotations


class RecordError(Exception):
    """A record cannot be processed. `stage` is where, `error_type` a short stable kind."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}/{self.error_type}: {self.message}"

    def __reduce__(self):  # crosses the guarded child's pipe intact
        return (type(self), (self.stage, self.error_type, self.message))


# Failures worth a retry by the runner (a storage hiccup), not an error row.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
