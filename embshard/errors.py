"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class EmbshardError(Exception):
    """Base class: the message says what was wrong and where."""


class ConfigError(EmbshardError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


class DataError(EmbshardError):
    """Input data is missing or malformed; the message names the file, column and row."""


class StorageError(EmbshardError):
    """Object storage refused or could not be reached (missing bucket, credentials, endpoint);
    the message names the URI."""


class PlanError(EmbshardError):
    """A dimension or shard plan cannot be built (infeasible budget, topology too small, ...)."""


class Interrupted(Exception):
    """Ctrl-C stopped a job cleanly (a checkpoint was written): the CLI prints it and exits 130.
    Not an EmbshardError: nothing was wrong with the input."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`: enough to act on, short enough for a one-line error."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
