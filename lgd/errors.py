"""Errors the engine raises for bad input: each names the problem in plain words."""


class LgdError(Exception):
    """Base class: caught at the command line and printed without a traceback."""


class ConfigError(LgdError):
    """An invalid configuration value or combination."""


class CheckpointError(LgdError):
    """A missing, corrupt or mismatched model checkpoint."""


class DataError(LgdError):
    """A missing or malformed dataset."""


class DamagedFileError(DataError):
    """A file of a run directory that is there but cannot be read (truncated, overwritten)."""


def first_line(exc: BaseException) -> str:
    """An exception in one line: its message's first line, or its type when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
