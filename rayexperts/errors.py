"""Errors that name the key, file or value at fault (shared by every layer)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""
