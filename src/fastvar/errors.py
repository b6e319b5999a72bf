"""The one exception type for bad input from a user (a command-line flag or a public argument).

Why one type: the command line turns exactly this type into ``fastvar: error: <message>`` on one line with
exit status 2 (no traceback), and Python callers get the same message as an ordinary ``ValueError``. The
message names the option and its value, says what is wrong and how to fix it, on one line.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option value or input file; the one-line message names the option, the problem and the fix."""


class MissingInputError(UsageError, FileNotFoundError):
    """An input path that does not exist: a :class:`UsageError` that is also a ``FileNotFoundError``, so
    callers that catch either (older code catches ``FileNotFoundError``) see it."""


__all__ = ["MissingInputError", "UsageError"]
