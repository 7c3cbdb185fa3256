"""The data layer's one error type: a message that names the path, key or value at fault."""

from __future__ import annotations

from rayexperts.errors import InputError


class DataError(InputError, ValueError):
    """Bad or missing data: the message names the file/column/value and how to fix it."""
