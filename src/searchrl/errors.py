"""User-facing errors. The CLI prints these as one clear message instead of a traceback."""

from __future__ import annotations


class SearchRLError(Exception):
    """Base class: something the user can fix (bad input file, wrong index, bad config...)."""


class DataFormatError(SearchRLError):
    """A data file is malformed. Carries the file, the 1-based line (or record) number and why."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class IndexFormatError(SearchRLError):
    """An index directory is missing, corrupt, or does not match what was asked for."""


class ConfigError(SearchRLError):
    """A configuration value is invalid; the message names the field."""


class RetrieverUnavailable(SearchRLError):
    """A remote retriever could not be reached (after retries)."""
