"""The one error type users see: what went wrong, where, and how to fix it.

Every command catches `UserError`, prints its message on one line to stderr and exits with
status 2. Anything else is a bug in this package and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request, reported as `what (where). Fix: remedy`."""

    exit_status = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        message = what
        if where:
            message += f" [{where}]"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)
