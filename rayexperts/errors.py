"""The project's two kinds of error (shared by every layer): every error the project raises derives from one.

:class:`InputError` (bad input: a config key or value, a data file, a storage location, a cluster address, a
run directory of another configuration) and :class:`RunError` (a run or a stage of a job failed). Each message is
one line naming the file, key or value at fault. Only the command line (``rayexperts.cli.main``) turns them into
an exit status: 2 for bad input, 1 for a failed run.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input; the message names the file, key or value at fault. Exit status 2 on the command line."""


class RunError(Exception):
    """A run (or a stage of a job) failed; the message names it and where its traceback is. Exit status 1."""


class ConfigError(InputError, ValueError):
    """A config file, key or value is invalid; the message names it."""
