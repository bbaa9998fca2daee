"""The one error type users see, and the one mapping from a broken file to it.

A `StokerError` is a usage or input problem that the user can fix: the CLI prints its message
on one line and exits with code 2, never a traceback. Anything else is a bug (exit 1).

Files are where most input problems live (a truncated shard, a pickle where safetensors was
expected, a half-written JSON line, a full disk). `file_errors` turns the exceptions such a
file raises while it is read or written into one `StokerError` of the form
`<path>: <what> (<reason>); <fix>`, and `file_error` builds the same message for a problem
found by a check rather than by an exception. Import-light on purpose: the CLI imports this
module before anything else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StokerError(Exception):
    """A bad config, path, argument, shard or checkpoint. The message names what and how to fix."""

    exit_code = 2


def describe_exception(exc: BaseException) -> str:
    """A short one-line cause: the strerror of an OSError ("No space left on device"), the
    position of a JSON or UTF-8 error, else the first line of the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}: line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not UTF-8"
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def file_error(path: str | Path, what: str, fix: str, reason: str | None = None) -> StokerError:
    """`<path>: <what> (<reason>); <fix>` as a StokerError (no parentheses without a reason),
    always one line: the CLI prints it as `stoker: error: ...`."""
    cause = f" ({reason})" if reason else ""
    return StokerError(" ".join(f"{path}: {what}{cause}; {fix}".splitlines()))


def _file_exception_types(also: tuple[type[BaseException], ...]) -> tuple[type, ...]:
    """OSError and ValueError (which covers json.JSONDecodeError and UnicodeDecodeError), plus
    safetensors' SafetensorError when safetensors is loaded (an error of that type implies it
    is, so this module never imports it), plus `also`."""
    types: list[type] = [OSError, ValueError, *also]
    for name in ("safetensors", "safetensors._safetensors_rust"):
        err = getattr(sys.modules.get(name), "SafetensorError", None)
        if isinstance(err, type):
            types.append(err)
    return tuple(types)


@contextmanager
def file_errors(
    path: str | Path, what: str, fix: str, *, also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Re-raise what a broken or unwritable `path` raises inside the block as one StokerError.

    Mapped: OSError (missing file, EACCES, EROFS, ENOSPC, ...), ValueError (which includes
    json.JSONDecodeError and UnicodeDecodeError, and numpy's "buffer is smaller than
    requested"), safetensors' SafetensorError, and any type in `also`. Each becomes
    `file_error(path, what, fix, describe_exception(e))`, with the OSError's own file name
    appended when it is another file (e.g. one inside the directory `path`), chained to the
    original (`__cause__`) for debugging. A StokerError and every other exception pass through
    unchanged, so keep the block to the file operation itself: a ValueError from a bug must not
    read as a bad file. Examples:

        with file_errors(path, "is not valid JSON", "restore it from the model's source"):
            config = json.loads(path.read_bytes())

        # torch.load(..., weights_only=True) of a damaged checkpoint raises these as well
        with file_errors(path, "cannot read the optimizer state", "resume from another "
                         "checkpoint", also=(RuntimeError, EOFError, pickle.UnpicklingError)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    """
    try:
        yield
    except StokerError:
        raise
    except Exception as e:
        if not isinstance(e, _file_exception_types(also)):
            raise
        reason = describe_exception(e)
        other = getattr(e, "filename", None) if isinstance(e, OSError) else None
        if other is not None and str(other) != str(path):  # e.g. one file of a directory
            reason += f": {other}"
        raise file_error(path, what, fix, reason) from e
