"""The one error type users see.

A `StokerError` is a usage or input problem that the user can fix: the CLI prints its message
on one line and exits with code 2, never a traceback. Anything else is a bug (exit 1).
"""

from __future__ import annotations


class StokerError(Exception):
    """A bad config, path, argument, shard or checkpoint. The message names what and how to fix."""

    exit_code = 2
