"""User-facing errors: one sentence naming the field, the value and what is allowed."""

from __future__ import annotations


class DiffgenError(ValueError):
    """An error caused by the user's input or environment, reported without a traceback."""


class InvalidRequestError(DiffgenError):
    """A request field is out of range or of the wrong kind."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickled between processes (worker groups): both arguments, not the joined text
        return type(self), (self.field, self.message)


class ModelLoadError(DiffgenError):
    """A checkpoint cannot be found, read or matched to a supported pipeline."""


class CancelledError(Exception):
    """A request was cancelled while it was queued or running."""
