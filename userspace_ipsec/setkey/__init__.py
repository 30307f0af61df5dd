"""The setkey(8) language of ipsec-tools: scripts to PF_KEY messages, and setkey's dump format.

Public API:

- ``parse_script(text, filename="<stdin>", *, rfc_mode=True, resolve=None) -> list[Command]``
- ``Command``, ``CommandKind``, ``SaSelector``, ``deleteall_requests(command, dump_replies)``
- ``SetkeyError`` (filename, line, column, token, reason)
- ``format_sa``, ``format_policy``, ``format_message_debug``

Supported beyond the obvious: ``update``, ``getspi src dst proto spi`` (ipsec-tools' form: one
SPI, 0 lets the kernel choose; there is no range form), ``-4``/``-6``/``-n``, ``-ctx``,
``esp-udp [NAT-OA]``, ``spdadd -P in`` twinned with a fwd policy in RFC mode (setkey's default on
Linux), ICMP type/code and GRE key selectors, ``exit``. Refused with a reason: ``esp-old``,
``ah-old``, ``ipcomp``, ``tcp`` (TCP-MD5), ``-C``, ``spdadd tagged``, algorithms this stack does
not implement. Accepted and ignored (with a warning): ``-f`` pad options, ``-m`` on get/delete.
Weak algorithms (des-cbc, 3des-cbc, hmac-md5) parse, with a warning; the kernel decides.
Differences from setkey's bytes: sadb_sa_flags is 0 (setkey sets KAME's CYCSEQ flag, which
Linux ignores); no key extension for ``null``; a replay window above 255 goes in the private
UIPSEC extension.
"""

from .commands import Command, CommandKind, SaSelector, deleteall_requests
from .debug import format_message_debug
from .errors import SetkeyError
from .parser import parse_script
from .printer import format_policy, format_policy_spec, format_sa

__all__ = [
    "Command",
    "CommandKind",
    "SaSelector",
    "SetkeyError",
    "deleteall_requests",
    "format_message_debug",
    "format_policy",
    "format_policy_spec",
    "format_sa",
    "parse_script",
]
