"""The peers that NAT keepalives go to: the far end of every usable UDP-encapsulated SA.

Followed from the SAD's change log, so that installing one SA among thousands costs O(1).
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from datapath.sockets import UdpSocket
from userspace_ipsec.pfkey.constants import NatTType
from userspace_ipsec.sa import SecurityAssociation
from userspace_ipsec.sad import SAD

Peer = tuple[Any, ...]  # (host, port) as sendto takes it


class KeepalivePeers:
    __slots__ = ("peers", "_of", "_refs", "_cursor", "_local")

    def __init__(self) -> None:
        self.peers: dict[Peer, UdpSocket] = {}
        self._of: dict[SecurityAssociation, Peer] = {}  # SA -> the peer it counts for
        self._refs: Counter[Peer] = Counter()
        self._cursor = -1
        self._local: frozenset[bytes] | None = None  # what "the far end" was judged by

    def follow(self, sad: SAD, local: frozenset[bytes], udp: dict[int, UdpSocket]
               ) -> list[Peer]:
        """Take in the SAD's changes (all of it again when the local addresses changed);
        returns the peers that appeared."""
        changed = sad.changes.since(self._cursor) if local == self._local else None
        self._cursor = sad.changes.cursor
        self._local = local
        if changed is None:
            self.peers, self._of, self._refs = {}, {}, Counter()
            changed = list(sad)
        added = []
        for sa in dict.fromkeys(changed):
            old = self._of.pop(sa, None)
            if old is not None:
                self._release(old)
            if sa.natt_type == NatTType.NONE or not sa.usable() or sa not in sad:
                continue
            if sa.dst.packed in local:
                host, port = sa.src, sa.natt_sport
            else:
                host, port = sa.dst, sa.natt_dport
            sock = udp.get(socket.AF_INET if host.version == 4 else socket.AF_INET6)
            if sock is None or not port:
                continue
            peer = self._of[sa] = (str(host), port)
            self._refs[peer] += 1
            if peer not in self.peers:
                self.peers[peer] = sock
                added.append(peer)
        return added

    def _release(self, peer: Peer) -> None:
        self._refs[peer] -= 1
        if self._refs[peer] <= 0:
            del self._refs[peer]
            self.peers.pop(peer, None)
