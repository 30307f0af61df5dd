"""Exceptions raised by the IKE codec and crypto: each carries the notify the RFC asks for."""

from __future__ import annotations

from ike.constants import NotifyType


class IkeError(Exception):
    """Base class for IKE errors that carry an RFC 7296 notify type."""

    def __init__(self, message: str, notify: NotifyType, notify_data: bytes = b"") -> None:
        super().__init__(message)
        self.notify = notify
        self.notify_data = notify_data


class IkeParseError(IkeError):
    """Malformed or unacceptable input. The only exception the decoders raise.

    `header` is set when the fixed IKE header itself was readable, so a caller can still
    address an error notify (e.g. UNSUPPORTED_CRITICAL_PAYLOAD) to the peer.
    """

    def __init__(
        self,
        message: str,
        notify: NotifyType = NotifyType.INVALID_SYNTAX,
        notify_data: bytes = b"",
        header: object | None = None,
    ) -> None:
        super().__init__(message, notify, notify_data)
        self.header = header


class IkeIntegrityError(IkeParseError):
    """ICV or AEAD tag mismatch: RFC 7296 2.21.2 says drop the message silently."""


class IkeCryptoError(IkeError):
    """A peer's key exchange value or a crypto parameter is unacceptable."""

    def __init__(self, message: str, notify: NotifyType = NotifyType.INVALID_SYNTAX) -> None:
        super().__init__(message, notify)
