"""IKE connections in TOML, modelled on swanctl.conf: `[connections.NAME]`, their
`[connections.NAME.children.CHILD]`, `[ike]` (sockets) and `[secrets]`.

Everything is checked before anything starts; every problem is a `ConfigError` with the file,
the line (found by `userspace_ipsec.config`'s locator) and the reason. Pre-shared keys live in
`[secrets.psk.NAME]` tables (in the configuration or in `secrets.file`), never in a repr, and a
file that holds one must not be readable by group or others.

As a responder the daemon answers IKE_SA_INIT with the first connection whose addresses match,
then, in IKE_AUTH, takes among those the one for the peer's identity: a connection naming it
(`remote_id`) beats one that takes any identity, one whose `local_id` is the IDr the peer asked
for beats one that is not, and the first configured wins a tie; an identity no connection
accepts is refused (AUTHENTICATION_FAILED). Several peers can thus share `%any` with their own
PSKs and subnets, as with strongSwan.

    [connections.site]
    local_addrs = ["192.0.2.1"]
    remote_addrs = ["198.51.100.7"]
    local_id = "gw1.example.org"          # IPv4, IPv6, fqdn, user@fqdn, keyid:TEXT, @#HEX
    remote_id = "gw2.example.org"         # default %any
    proposals = ["aes256gcm16-prfsha256-x25519"]
    dpd_delay = 30
    [connections.site.children.net]
    local_ts = ["10.1.0.0/16"]
    remote_ts = ["10.2.0.0/16[tcp/443]"]
    start_action = "trap"
    [secrets.psk.site]
    id = ["gw1.example.org", "gw2.example.org"]
    secret = "0x5ec2e7..."                # hex with 0x, else the UTF-8 text itself
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ike.addresses import network_literal
from ike.constants import IdType
from ike.payloads import TrafficSelector
from ike.proposals import DEFAULT_ESP, DEFAULT_IKE, ProposalError, ProposalSpec, parse_proposal
from userspace_ipsec import config as base_config
from userspace_ipsec.config import Config, ConfigError, _Locator

TABLES = frozenset({"connections", "secrets", "ike"})
ANY = "%any"
Identity = tuple[int, bytes]

START_ACTIONS = ("none", "trap", "start")
DPD_ACTIONS = ("clear", "trap", "restart")
CLOSE_ACTIONS = ("none", "trap", "start")
MODES = ("tunnel", "transport")


@dataclass(slots=True)
class ChildConfig:
    name: str
    local_ts: list[str]  # as written: CIDR, range or "dynamic", with optional [proto/port]
    remote_ts: list[str]
    mode: str = "tunnel"
    esp_proposals: list[ProposalSpec] = field(default_factory=list)
    start_action: str = "none"
    dpd_action: str = "clear"
    close_action: str = "none"
    rekey_time: float = 3600.0  # soft lifetime of the Child SAs (before jitter)
    life_time: float = 3960.0  # hard lifetime: the SA is gone at this age
    jitter: float = 360.0  # the soft lifetime is rekey_time minus up to this, at random
    replay_window: int = 32
    esn: bool = False  # offer/accept extended sequence numbers (from esp_proposals)

    def selectors(self, local: bool, ike_addr: str) -> list[TrafficSelector]:
        """Selectors for one side; "dynamic" is that side's IKE address."""
        return [_parse_ts_cached(ts, ike_addr)
                for ts in (self.local_ts if local else self.remote_ts)]


@dataclass(slots=True)
class ConnectionConfig:
    name: str
    local_addrs: list[str]  # addresses or "%any"
    remote_addrs: list[str]  # addresses, hostnames or "%any"
    local_port: int = 500
    remote_port: int = 500
    local_id: Identity | None = None  # None: our IKE address
    remote_id: Identity | None = None  # None: any identity that knows the PSK
    proposals: list[ProposalSpec] = field(default_factory=list)
    encap: bool = False  # force UDP encapsulation (pretend a NAT)
    dpd_delay: float = 0.0  # 0: no liveness checks
    rekey_time: float = 14400.0  # IKE SA rekey
    jitter: float = 1440.0
    children: dict[str, ChildConfig] = field(default_factory=dict)
    psk: bytes = field(default=b"", repr=False)
    line: int | None = field(default=None, compare=False)  # where it was defined (messages)

    def matches_remote(self, addr: str) -> bool:
        return ANY in self.remote_addrs or _addr_in(addr, self.remote_addrs)

    def matches_local(self, addr: str) -> bool:
        return ANY in self.local_addrs or _addr_in(addr, self.local_addrs)


@dataclass(slots=True)
class IkeSettings:
    """`[ike]`: where the daemon listens."""

    listen: tuple[str, ...] = ("0.0.0.0", "::")
    port: int = 500
    natt_port: int = 4500  # used only when the daemon runs without a datapath
    retransmit_timeout: float = 4.0  # strongSwan's defaults: 4 s * 1.8**n, 5 retransmissions
    retransmit_tries: int = 5


@dataclass(slots=True)
class Connections:
    connections: dict[str, ConnectionConfig]
    settings: IkeSettings
    source: str = "<defaults>"


class _IndexedLocator(_Locator):
    """userspace_ipsec.config's locator with the tables' line ranges indexed once: each lookup
    scans one table's lines, not the whole text, so a configuration with thousands of
    connections is located in linear time (it took seconds for 1,000)."""

    _HEADER = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*(#.*)?$")

    def __init__(self, text: str) -> None:
        super().__init__(text)
        starts: list[tuple[int, str]] = []
        for index, line in enumerate(self.lines):
            match = self._HEADER.match(line)
            if match:
                starts.append((index, match.group(1)))
        # table -> (header index, first index past its block), in order; "" is the top.
        self._blocks: dict[str, list[tuple[int, int]]] = {
            "": [(-1, starts[0][0] if starts else len(self.lines))]}
        for n, (index, table) in enumerate(starts):
            end = starts[n + 1][0] if n + 1 < len(starts) else len(self.lines)
            self._blocks.setdefault(table, []).append((index, end))

    def line_of(self, table: str, key: str | None = None) -> int | None:
        blocks = self._blocks.get(table, [])
        if key is None:
            return next((header + 1 for header, _ in blocks if header >= 0), None)
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for header, end in blocks:
            for index in range(header + 1, end):
                if key_re.match(self.lines[index]):
                    return index + 1
        return None


# -- values ---------------------------------------------------------------------------------


def _addr_in(addr: str, entries: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    for entry in entries:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a hostname: compared after resolution by the service
    return False


@functools.lru_cache(maxsize=1 << 14)  # an identity is immutable; each is seen per IKE SA
def parse_identity(text: str) -> Identity:
    """strongSwan's identity syntax: addresses, "@fqdn", user@fqdn, "keyid:text", "@#hex",
    or an explicit "fqdn:", "email:", "ipv4:", "ipv6:" prefix."""
    prefixes = {"fqdn:": IdType.FQDN, "email:": IdType.RFC822_ADDR,
                "rfc822:": IdType.RFC822_ADDR, "keyid:": IdType.KEY_ID}
    for prefix, kind in prefixes.items():
        if text.startswith(prefix) and len(text) > len(prefix):
            return int(kind), text[len(prefix):].encode()
    for prefix, version in (("ipv4:", 4), ("ipv6:", 6)):
        if text.startswith(prefix):
            ip = ipaddress.ip_address(text[len(prefix):])
            if ip.version != version:
                raise ValueError(f"{text!r} is not an IPv{version} address")
            text = str(ip)
    if text.startswith("@#"):
        return int(IdType.KEY_ID), bytes.fromhex(text[2:])
    if text.startswith("@") and len(text) > 1:
        return int(IdType.FQDN), text[1:].encode()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return (int(IdType.IPV4_ADDR) if ip.version == 4 else int(IdType.IPV6_ADDR)), ip.packed
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not an identity")
    if "@" in text:
        return int(IdType.RFC822_ADDR), text.encode()
    return int(IdType.FQDN), text.encode()


def format_identity(ident: Identity | None) -> str:
    if ident is None:
        return ANY
    kind, data = ident
    if kind == IdType.IPV4_ADDR and len(data) == 4:
        return str(ipaddress.IPv4Address(data))
    if kind == IdType.IPV6_ADDR and len(data) == 16:
        return str(ipaddress.IPv6Address(data))
    if kind == IdType.KEY_ID:
        return "@#" + data.hex()
    if kind in (IdType.FQDN, IdType.RFC822_ADDR):
        return data.decode(errors="replace")
    return f"{kind}:{data.hex()}"


def address_identity(addr: str) -> Identity:
    return parse_identity(str(ipaddress.ip_address(addr)))


_TS_RE = re.compile(r"^(?P<net>[^\[\]]+?)\s*(\[(?P<proto>[^/\]]*)(/(?P<port>[^\]]*))?\])?$")


def _proto_number(text: str) -> int:
    if text in ("", "any", "%any"):
        return 0
    if text.isdigit():
        value = int(text)
    else:
        try:
            value = socket.getprotobyname(text)
        except OSError:
            raise ValueError(f"unknown protocol {text!r}") from None
    if not 0 <= value <= 255:
        raise ValueError(f"protocol {value} out of range")
    return value


def _port_range(text: str, proto: int) -> tuple[int, int]:
    if text in ("", "any", "%any"):
        return 0, 65535
    low, _, high = text.partition("-")
    try:
        start = int(low) if low.isdigit() else socket.getservbyname(low)
        end = int(high) if high else start
    except OSError:
        raise ValueError(f"unknown port {low!r}") from None
    except ValueError:
        raise ValueError(f"bad port range {text!r}") from None
    if not 0 <= start <= end <= 65535:
        raise ValueError(f"bad port range {text!r}")
    if proto not in (6, 17, 132, 1, 58):
        raise ValueError("ports need a protocol that has them (tcp, udp, sctp, icmp)")
    return start, end


def parse_ts(text: str, ike_addr: str | None = None) -> TrafficSelector:
    """"10.1.0.0/16", "10.0.0.1-10.0.0.9", "dynamic" (the IKE address), each optionally
    followed by "[proto]" or "[proto/port]" / "[proto/low-high]"."""
    match = _TS_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a traffic selector")
    net = match.group("net").strip()
    proto = _proto_number((match.group("proto") or "").strip())
    sport, eport = _port_range((match.group("port") or "").strip(), proto)
    if net == "dynamic":
        if ike_addr is None:
            raise ValueError("'dynamic' needs the IKE address")
        net = ike_addr
    if "-" in net and "/" not in net:
        low_s, high_s = net.split("-", 1)
        low, high = ipaddress.ip_address(low_s.strip()), ipaddress.ip_address(high_s.strip())
        if low.version != high.version or int(low) > int(high):
            raise ValueError(f"{text!r}: bad address range")
        return TrafficSelector(low, high, proto, sport, eport)
    network = ipaddress.ip_network(net, strict=False)
    return TrafficSelector(network.network_address, network.broadcast_address, proto, sport,
                           eport)


# Selectors and proposals are immutable: each text is parsed once, not once per IKE SA or per
# connection of a configuration with thousands.
_parse_ts_cached = functools.lru_cache(maxsize=1 << 16)(parse_ts)


@functools.lru_cache(maxsize=1 << 12)
def _parse_proposal_cached(text: str, kind: str, allow_weak: bool) -> ProposalSpec:
    return parse_proposal(text, kind, allow_weak=allow_weak)  # type: ignore[arg-type]


# -- parsing --------------------------------------------------------------------------------


class _Reader:
    """Typed access to one table with located errors."""

    def __init__(self, table: dict[str, Any], name: str, path: str, locate: _Locator) -> None:
        self.table, self.name, self.path, self.locate = table, name, path, locate
        self.used: set[str] = set()

    def where(self, key: str | None = None) -> int | None:
        line = self.locate.line_of(self.name, key) if key else None
        return line or self.locate.line_of(self.name)

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.path, self.where(key), reason)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = {str: "a string", bool: "true or false", int: "an integer",
                     float: "a number", list: "a list"}
            raise self.error(key, f"{self.name}.{key} must be "
                             + " or ".join(names.get(k, k.__name__) for k in kinds))
        return value

    def strings(self, key: str, default: list[str]) -> list[str]:
        value = self.get(key, (list, str), default)
        if isinstance(value, str):
            value = [value]
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, f"{self.name}.{key} must be a list of strings")
        return list(value)

    def seconds(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = float(self.get(key, (int, float), default))
        if value < minimum:
            raise self.error(key, f"{self.name}.{key} must be at least {minimum:g}")
        return value

    def port(self, key: str, default: int) -> int:
        value = int(self.get(key, int, default))
        if not 1 <= value <= 65535:
            raise self.error(key, f"{self.name}.{key} must be within 1..65535")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = str(self.get(key, str, default))
        if value not in choices:
            raise self.error(key, f"{self.name}.{key} must be one of {', '.join(choices)}")
        return value

    def identity(self, key: str) -> Identity | None:
        value = self.get(key, str, None)
        if value is None or value == ANY:
            return None
        try:
            return parse_identity(value)
        except ValueError as exc:
            raise self.error(key, f"{self.name}.{key}: {exc}") from None

    def proposals(self, key: str, kind: str, defaults: tuple[str, ...],
                  allow_weak: bool) -> list[ProposalSpec]:
        texts = self.strings(key, ["default"])
        out: list[ProposalSpec] = []
        for text in texts:
            for one in defaults if text == "default" else (text,):
                try:
                    out.append(_parse_proposal_cached(one, kind, allow_weak))
                except ProposalError as exc:
                    raise self.error(key, f"{self.name}.{key}: {exc}") from None
        if not out:
            raise self.error(key, f"{self.name}.{key} is empty")
        return out

    def check_unknown(self, known: set[str] | None = None) -> None:
        for key in self.table:
            if key not in self.used and key not in (known or set()):
                raise self.error(key, f"unknown setting {self.name}.{key}")


def _addresses(reader: _Reader, key: str, allow_names: bool) -> list[str]:
    values = reader.strings(key, [ANY])
    if not values:
        raise reader.error(key, f"{reader.name}.{key} is empty")
    for value in values:
        if value == ANY:
            continue
        try:
            network_literal(value)
        except ValueError:
            if not allow_names or not re.fullmatch(r"[A-Za-z0-9.-]+", value):
                raise reader.error(key, f"{reader.name}.{key}: {value!r} is not an address")\
                    from None
    return values


def _child(table: dict[str, Any], name: str, prefix: str, path: str, locate: _Locator,
           allow_weak: bool) -> ChildConfig:
    r = _Reader(table, f"{prefix}.children.{name}", path, locate)
    local_ts = r.strings("local_ts", ["dynamic"])
    remote_ts = r.strings("remote_ts", ["dynamic"])
    for key, values in (("local_ts", local_ts), ("remote_ts", remote_ts)):
        if not values:
            raise r.error(key, f"{r.name}.{key} is empty")
        for value in values:
            try:
                _parse_ts_cached(value, "0.0.0.0")
            except ValueError as exc:
                raise r.error(key, f"{r.name}.{key}: {exc}") from None
    child = ChildConfig(name, local_ts, remote_ts)
    child.mode = r.choice("mode", MODES, "tunnel")
    child.esp_proposals = r.proposals("esp_proposals", "esp", DEFAULT_ESP, allow_weak)
    child.start_action = r.choice("start_action", START_ACTIONS, "none")
    child.dpd_action = r.choice("dpd_action", DPD_ACTIONS, "clear")
    child.close_action = r.choice("close_action", CLOSE_ACTIONS, "none")
    child.rekey_time = r.seconds("rekey_time", 3600.0)
    child.life_time = r.seconds("life_time", child.rekey_time * 1.1)
    child.jitter = r.seconds("jitter", child.life_time - child.rekey_time)
    if child.rekey_time and child.life_time <= child.rekey_time:
        raise r.error("life_time", f"{r.name}.life_time must exceed rekey_time")
    if child.jitter > child.rekey_time:
        raise r.error("jitter", f"{r.name}.jitter must not exceed rekey_time")
    child.replay_window = int(r.get("replay_window", int, 32))
    if not 0 <= child.replay_window <= 1 << 20:
        raise r.error("replay_window", f"{r.name}.replay_window must be within 0..1048576")
    child.esn = any(spec.esn and spec.esn[0] == 1 for spec in child.esp_proposals)
    r.check_unknown()
    return child


def _connection(table: dict[str, Any], name: str, path: str, locate: _Locator,
                allow_weak: bool) -> ConnectionConfig:
    prefix = f"connections.{name}"
    r = _Reader(table, prefix, path, locate)
    conn = ConnectionConfig(name, _addresses(r, "local_addrs", False),
                            _addresses(r, "remote_addrs", True), line=r.where())
    conn.local_port = r.port("local_port", 500)
    conn.remote_port = r.port("remote_port", 500)
    conn.local_id = r.identity("local_id")
    conn.remote_id = r.identity("remote_id")
    r.choice("auth", ("psk",), "psk")
    conn.proposals = r.proposals("proposals", "ike", DEFAULT_IKE, allow_weak)
    conn.encap = bool(r.get("encap", bool, False))
    conn.dpd_delay = r.seconds("dpd_delay", 0.0)
    conn.rekey_time = r.seconds("rekey_time", 14400.0)
    conn.jitter = r.seconds("jitter", conn.rekey_time / 10)
    if conn.jitter > conn.rekey_time:
        raise r.error("jitter", f"{prefix}.jitter must not exceed rekey_time")
    children = r.get("children", dict, {})
    if not children:
        raise r.error(None, f"{prefix} has no children")
    for child_name, child_table in children.items():
        if not isinstance(child_table, dict):
            raise r.error("children", f"{prefix}.children.{child_name} must be a table")
        conn.children[child_name] = _child(child_table, child_name, prefix, path, locate,
                                           allow_weak)
    if conn.local_id is None and ANY in conn.local_addrs and len(conn.local_addrs) == 1:
        pass  # the address the IKE SA runs on, known only then
    r.check_unknown()
    return conn


@dataclass(slots=True)
class _Secret:
    name: str
    ids: list[Identity]
    secret: bytes = field(repr=False)


def _secrets(table: dict[str, Any], path: str, locate: _Locator,
             base: Path) -> list[_Secret]:
    r = _Reader(table, "secrets", path, locate)
    out: list[_Secret] = []
    file = r.get("file", str, None)
    psk = r.get("psk", dict, {})
    r.check_unknown()
    for name, entry in psk.items():
        er = _Reader(entry if isinstance(entry, dict) else {}, f"secrets.psk.{name}", path,
                     locate)
        if not isinstance(entry, dict):
            raise er.error(None, f"secrets.psk.{name} must be a table")
        ids = []
        for text in er.strings("id", []):
            try:
                ids.append(parse_identity(text))
            except ValueError as exc:
                raise er.error("id", f"{er.name}.id: {exc}") from None
        text = er.get("secret", str, None)
        if not text:
            raise er.error("secret", f"{er.name}.secret is missing or empty")
        try:
            value = bytes.fromhex(text[2:]) if text.startswith("0x") else text.encode()
        except ValueError:
            raise er.error("secret", f"{er.name}.secret: bad hex (the value is not shown)")\
                from None
        er.check_unknown()
        out.append(_Secret(name, ids, value))
    if out:
        _check_private(Path(path), path)
    if file is not None:
        out += _secrets_file(base / file, path, r.where("file"))
    return out


def _check_private(file: Path, shown: str) -> None:
    try:
        mode = file.stat().st_mode
    except OSError:
        return  # text given directly (loads), not a file
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(shown, None, f"holds secrets but its mode is {stat.S_IMODE(mode):04o}:"
                          " group and others must have no access (chmod 600)")


def _secrets_file(file: Path, referrer: str, line: int | None) -> list[_Secret]:
    name = str(file)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(referrer, line, f"secrets file {name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(name, None, f"secrets file mode is {stat.S_IMODE(mode):04o}: "
                              "group and others must have no access (chmod 600)")
        raw = handle.read()
    try:
        text = raw.decode()
        doc = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(name, None, f"not a TOML secrets file: {exc}") from None
    locate = _IndexedLocator(text)
    for key in doc:
        if key != "secrets":
            raise ConfigError(name, locate.line_of(key), f"unknown table [{key}]")
    table = doc.get("secrets", {})
    if not isinstance(table, dict) or "file" in table:
        raise ConfigError(name, locate.line_of("secrets"), "a secrets file holds [secrets.psk.*]"
                          " tables only")
    return _secrets(table, name, locate, file.parent)


def _default_ids(ident: Identity | None, addrs: list[str]) -> list[Identity]:
    """The identity, or (unset) the address identities it will default to."""
    if ident is not None:
        return [ident]
    out = []
    for addr in addrs:
        try:
            out.append(address_identity(addr))
        except ValueError:
            continue  # %any, a subnet or a hostname
    return out


def _find_psk(conn: ConnectionConfig, secrets: list[_Secret]) -> bytes:
    """The secret naming both identities, else one of them, else one with no identities."""
    mine = _default_ids(conn.local_id, conn.local_addrs)
    theirs = _default_ids(conn.remote_id, conn.remote_addrs)
    best, score = b"", -1
    for secret in secrets:
        s = 0
        if secret.ids:
            s = any(i in secret.ids for i in mine) + 2 * any(i in secret.ids for i in theirs)
            if s == 0:
                continue
        if s > score:
            best, score = secret.secret, s
    return best


def _settings(table: dict[str, Any], path: str, locate: _Locator) -> IkeSettings:
    r = _Reader(table, "ike", path, locate)
    listen = r.strings("listen", ["0.0.0.0", "::"])
    for addr in listen:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise r.error("listen", f"ike.listen: {addr!r} is not an IP address") from None
    settings = IkeSettings(tuple(listen), r.port("port", 500), r.port("natt_port", 4500),
                           r.seconds("retransmit_timeout", 4.0, 0.05),
                           int(r.get("retransmit_tries", int, 5)))
    if not 0 <= settings.retransmit_tries <= 20:
        raise r.error("retransmit_tries", "ike.retransmit_tries must be within 0..20")
    r.check_unknown()
    return settings


def from_config(config: Config) -> Connections:
    """The IKE part of a loaded daemon configuration (`config.raw`)."""
    doc = config.raw or {}
    path = config.source
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    return from_document(doc, path, text, config.daemon.allow_weak_algorithms)


def from_document(doc: dict[str, Any], path: str, text: str,
                  allow_weak: bool = False) -> Connections:
    locate = _IndexedLocator(text)
    for key in TABLES:
        if key in doc and not isinstance(doc[key], dict):
            raise ConfigError(path, locate.line_of("", key), f"{key} must be a table")
    settings = _settings(doc.get("ike", {}), path, locate)
    secrets = _secrets(doc.get("secrets", {}), path, locate, Path(path).parent)
    conns: dict[str, ConnectionConfig] = {}
    for name, table in doc.get("connections", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(path, locate.line_of("connections", name),
                              f"connections.{name} must be a table")
        conn = _connection(table, name, path, locate, allow_weak)
        conn.psk = _find_psk(conn, secrets)
        if not conn.psk:
            raise ConfigError(path, conn.line, f"connections.{name}: no pre-shared key in "
                              "[secrets.psk.*] matches its identities")
        conns[name] = conn
    return Connections(conns, settings, path)


def load(path: str | Path) -> tuple[Config, Connections]:
    """Read a daemon configuration with its IKE tables; raise ConfigError, located."""
    config = base_config.load(path, extra_tables=TABLES)
    return config, from_config(config)


def loads(text: str, name: str = "<string>") -> tuple[Config, Connections]:
    config = base_config.loads(text, name, extra_tables=TABLES)
    return config, from_document(config.raw or {}, name, text,
                                 config.daemon.allow_weak_algorithms)
