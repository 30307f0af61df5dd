"""The one exception the setkey language raises: where it went wrong and why."""

from __future__ import annotations


class SetkeyError(Exception):
    """A script error: file, 1-based line and column, the offending token and the reason."""

    def __init__(self, reason: str, *, filename: str, line: int, column: int, token: str) -> None:
        self.reason = reason
        self.filename = filename
        self.line = line
        self.column = column
        self.token = token
        super().__init__(str(self))

    def __str__(self) -> str:
        # Keys may be the offending token; a quoted-string token is shown only by its length.
        return f"{self.filename}:{self.line}:{self.column}: {self.reason} at [{self.token}]"
