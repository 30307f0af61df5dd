"""Tokens of the setkey(8) script language.

setkey's flex scanner splits on blanks, ``;`` and quoted strings, and treats ``#`` outside a
quoted string as the start of a comment running to the end of the line. We keep the same cut but
leave the inner structure of a word (``10.0.0.0/24[any]``, ``esp/tunnel/a-b/require``) to the
parser, which knows what it expects at each point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import SetkeyError


class TokenKind(Enum):
    WORD = "word"
    QUOTED = "quoted"  # "..." with the quotes removed; may span lines
    SEMI = ";"
    EOF = "end of file"


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    text: str
    line: int
    column: int

    def shown(self) -> str:
        """The token as error messages show it (quoted strings may be keys: never echoed)."""
        if self.kind is TokenKind.QUOTED:
            return f'"<{len(self.text)} characters>"'
        if self.kind is TokenKind.EOF:
            return "end of file"
        if _LONG_HEX.fullmatch(self.text):  # key-sized (64 bits or more): never echoed
            return f"0x<{len(self.text) - 2} hex digits>"
        return self.text


_LONG_HEX = re.compile(r"0[xX][0-9A-Fa-f]{16,}")
_BLANKS = frozenset(" \t\r\n\f\v")
_WORD_END = _BLANKS | {";", '"', "#"}


def tokenize(text: str, filename: str = "<stdin>") -> list[Token]:
    """Split ``text`` into tokens; an unterminated quoted string is the only lexical error."""
    tokens: list[Token] = []
    i, line, line_start, n = 0, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            i += 1
            line, line_start = line + 1, i
        elif ch in _BLANKS:
            i += 1
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch == ";":
            tokens.append(Token(TokenKind.SEMI, ";", line, i - line_start + 1))
            i += 1
        elif ch == '"':
            end = text.find('"', i + 1)
            column = i - line_start + 1
            if end < 0:
                raise SetkeyError(
                    "unterminated quoted string", filename=filename, line=line,
                    column=column, token='"',
                )
            body = text[i + 1 : end]
            tokens.append(Token(TokenKind.QUOTED, body, line, column))
            newlines = body.count("\n")
            if newlines:
                line += newlines
                line_start = i + 1 + body.rfind("\n") + 1
            i = end + 1
        else:
            start = i
            while i < n and text[i] not in _WORD_END:
                i += 1
            tokens.append(Token(TokenKind.WORD, text[start:i], line, start - line_start + 1))
    tokens.append(Token(TokenKind.EOF, "", line, i - line_start + 1))
    return tokens


class Cursor:
    """A position in a token list, and the errors that point at tokens."""

    __slots__ = ("filename", "pos", "tokens")

    def __init__(self, tokens: list[Token], filename: str) -> None:
        self.tokens = tokens
        self.filename = filename
        self.pos = 0

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        token = self.peek()
        if token.kind is not TokenKind.EOF:
            self.pos += 1
        return token

    def peek_word(self) -> str | None:
        token = self.peek()
        return token.text if token.kind is TokenKind.WORD else None

    def word(self, what: str) -> Token:
        token = self.next()
        if token.kind is not TokenKind.WORD:
            raise self.error(token, f"expected {what}")
        return token

    def error(self, token: Token, reason: str, shown: str | None = None) -> SetkeyError:
        return SetkeyError(
            reason, filename=self.filename, line=token.line, column=token.column,
            token=token.shown() if shown is None else shown,
        )
