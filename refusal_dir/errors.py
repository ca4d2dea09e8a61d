"""Errors raised for bad input. Each message names the problem and the fix.

The CLI prints one line for any :class:`RefusalDirError` and exits with status 2.
"""

from __future__ import annotations


class RefusalDirError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(RefusalDirError, ValueError):
    """A setting is out of range or of the wrong kind."""


class DataError(RefusalDirError, ValueError):
    """A prompt set or dataset file is empty, malformed or inconsistent."""


class ModelLoadError(RefusalDirError):
    """A model id or directory cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """A model family, or one of its modules, is not in ``refusal_dir.architectures``."""


class DirectionMismatchError(RefusalDirError, ValueError):
    """A direction file does not fit the model or the request."""


class OutputDirError(RefusalDirError):
    """An output directory is unwritable or holds results of another configuration."""


def short_message(error: BaseException) -> str:
    """An error's message on one line, at most 160 characters (its type when it has none)."""
    text = str(error).strip().replace("\n", " ")
    return text[:160] or type(error).__name__
