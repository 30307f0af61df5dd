"""What a parsed setkey statement asks for: the PF_KEY messages to send and how to use replies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from ..pfkey.constants import IPSEC_PROTO_ANY, ExtType, MsgType, SaType
from ..pfkey.messages import AddressExt, IPAddress, Message, SA2Ext, SAExt


class CommandKind(Enum):
    """One per setkey operation. How the CLI runs each is told in ``Command``'s docstring."""

    ADD = "add"
    UPDATE = "update"
    GETSPI = "getspi"
    GET = "get"
    DELETE = "delete"
    DELETEALL = "deleteall"
    FLUSH = "flush"
    DUMP = "dump"
    SPDADD = "spdadd"
    SPDUPDATE = "spdupdate"
    SPDDELETE = "spddelete"
    SPDFLUSH = "spdflush"
    SPDDUMP = "spddump"


@dataclass(frozen=True, slots=True)
class SaSelector:
    """``deleteall src dst proto``: which SAs of a dump to delete (setkey's spigrep on Linux)."""

    satype: SaType
    src: IPAddress
    dst: IPAddress

    def matches(self, sa_msg: Message) -> bool:
        src, dst, sa = sa_msg.src, sa_msg.dst, sa_msg.sa
        return (
            sa is not None
            and src is not None
            and dst is not None
            and int(sa_msg.satype) == int(self.satype)
            and src.address == self.src
            and dst.address == self.dst
        )

    def delete_request(self, sa_msg: Message) -> Message:
        """SADB_DELETE for one matching SA of a dump reply."""
        sa = sa_msg.sa
        if sa is None:
            raise ValueError("dump reply without an SA extension")
        sa2 = sa_msg.sa2
        return Message(
            MsgType.DELETE,
            self.satype,
            ext={
                ExtType.SA: SAExt(spi=sa.spi, state=sa.state),
                ExtType.ADDRESS_SRC: AddressExt(self.src, proto=IPSEC_PROTO_ANY),
                ExtType.ADDRESS_DST: AddressExt(self.dst, proto=IPSEC_PROTO_ANY),
                ExtType.X_SA2: SA2Ext(mode=sa2.mode if sa2 else SA2Ext().mode),
            },
        )



@dataclass(slots=True)
class Command:
    """One setkey statement, parsed and checked, ready to send.

    How the CLI executes ``kind``:

    - ADD, UPDATE, GETSPI, DELETE, FLUSH, SPDADD, SPDUPDATE, SPDDELETE, SPDFLUSH: send every
      message of ``messages`` in order; a reply with errno != 0 is a failure of this statement
      (report ``filename:line``). ``messages`` holds several entries when a host name resolved to
      several addresses, or for ``spdadd ... -P in`` in RFC mode (the extra fwd policy).
    - GET: send ``messages[0]``; print the reply with ``format_sa``.
    - DUMP / SPDDUMP: send ``messages[0]``; print every reply (until the one with seq 0) with
      ``format_sa`` / ``format_policy``.
    - DELETEALL: send ``messages[0]`` (an SADB_DUMP of the protocol), collect the replies, then
      send each message of ``deleteall_requests(command, replies)``.

    ``warnings`` are notes for the user (weak algorithm, ignored option) that do not stop the run.
    """

    kind: CommandKind
    messages: list[Message]
    filename: str
    line: int
    column: int
    warnings: list[str] = field(default_factory=list)
    selectors: list[SaSelector] = field(default_factory=list)  # DELETEALL only


def deleteall_requests(command: Command, dump_replies: Iterable[Message]) -> list[Message]:
    """Step two of ``deleteall``: one SADB_DELETE per dumped SA that a selector matches."""
    requests: list[Message] = []
    for reply in dump_replies:
        if reply.errno:
            continue
        for selector in command.selectors:
            if selector.matches(reply):
                requests.append(selector.delete_request(reply))
                break
    return requests
