"""Errors of the data layer, in their own module so that readers, field mapping and checks can share them."""

from __future__ import annotations

from guardedp2p.errors import ConfigError


class DataFormatError(ConfigError):
    """A data file is unreadable or its records do not follow one accepted schema."""


class MissingDependencyError(ConfigError):
    """An optional package needed for this input is not installed."""
