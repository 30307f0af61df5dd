"""Address and prefix literals parsed once: every IKE SA of a gateway names the same few local
and peer addresses again (NAT hashes, PF_KEY requests, identities), a configuration with
thousands of connections the same prefixes, and ``ipaddress`` parses text slowly."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=1 << 14)
def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address(text)``, cached (ValueError for what is not an address)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=1 << 16)
def network_literal(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``text`` as an address or prefix (ValueError if it is neither, e.g. a host name)."""
    return ipaddress.ip_network(text, strict=False)
