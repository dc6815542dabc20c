"""One way for every command line to fail: one line naming the file, key or value, and an exit code.

Exit codes: 0 success, 1 bad data (a file, shard, checkpoint or value found wrong while working),
2 bad usage (a flag, config key or launch that cannot work), 130 interrupted. Expected errors print as
``PROG: error: MESSAGE`` without a traceback; ``BGTRAIN_DEBUG=1`` shows the traceback as well.

Library code raises :class:`UserError` subclasses (or plain ``ValueError`` / ``OSError`` with a clear
message); only the entry points call :func:`run_cli`.
"""
from __future__ import annotations

import os
import sys
import tarfile
import traceback
import zipfile
from typing import Callable, Sequence

DEBUG_ENV = "BGTRAIN_DEBUG"


class UserError(Exception):
    """An expected error the user can fix; ``str(e)`` names the culprit. Exit code 1 unless a subclass says."""

    exit_code = 1


class DataError(UserError):
    """A file, shard, checkpoint or value is wrong (exit code 1)."""

    exit_code = 1


class UsageError(UserError):
    """A flag, config key or launch cannot work as given (exit code 2)."""

    exit_code = 2


def _expected() -> tuple[type[BaseException], ...]:
    """Exception types that carry a message for the user, not a bug report."""
    from bgtrain.config import ConfigError

    return (UserError, ConfigError, OSError, ValueError, tarfile.TarError, zipfile.BadZipFile)


def exit_code(error: BaseException) -> int:
    """1 for data errors, 2 for usage errors (config errors count as usage)."""
    from bgtrain.config import ConfigError

    if isinstance(error, UserError):
        return error.exit_code
    return 2 if isinstance(error, ConfigError) else 1


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a FileNotFoundError without text names its file)."""
    text = str(error)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {error.strerror or text}"
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(error).__name__


def debug() -> bool:
    """True when ``BGTRAIN_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main: Callable[..., object], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Call ``main(argv)`` and turn expected errors into one line on stderr and an exit code.

    ``main`` returns an exit code (None counts as 0, a non-int result such as a report dict as 0).
    """
    prog = prog or os.path.basename(sys.argv[0] or "bgtrain")
    try:
        code = main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _expected() as e:
        if debug():
            traceback.print_exc()
        hint = "" if debug() else f" ({DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        return exit_code(e)
    return code if isinstance(code, int) and not isinstance(code, bool) else 0
