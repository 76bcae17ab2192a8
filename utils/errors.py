"""The kit's own errors. Each message names the file (and line, column or key) it is about, so a
user can act on it without a traceback; every script lets them propagate."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file, and the line and column where it applies."""


class ConfigError(ValueError):
    """A config key is unknown, has a value of the wrong type, or a value outside its choices."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops rather than poisoning the checkpoint."""


class SearchFailed(RuntimeError):
    """A search ran and every trial of it failed: nothing to report, so the command fails too."""


class StaleError(DataError):
    """A derived file no longer matches the inputs it was made from (they changed since)."""
