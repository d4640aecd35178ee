"""Exceptions and exit codes shared by the library and the CLI."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1          # findings over --fail-on
EXIT_USAGE = 2             # usage, input and internal errors (one line on stderr)
EXIT_INTERRUPTED = 130     # Ctrl-C


class PoisonscanError(Exception):
    """Base class of every error poisonscan raises on purpose."""


class UsageError(PoisonscanError):
    """Bad input or usage: the CLI prints one line and exits with code 2."""


class DataError(UsageError):
    """A data source, sample or manifest cannot be read."""


class CheckpointError(UsageError):
    """A checkpoint is missing, unsafe to load, or does not match the architecture."""


class ConfigError(UsageError):
    """A config file or flag is invalid."""
