"""The daemon's TOML configuration: parsed and checked in full before anything starts.

A bad file is refused with its name, the line and the reason (``ConfigError``). The
``[daemon]`` and ``[datapath]`` tables are defined here; later parts of the stack (IKE
connections) add their own tables and check them the same way.
"""

from __future__ import annotations

import ipaddress
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import toml_lines


class ConfigError(Exception):
    """A configuration problem, located: ``file:line: reason``."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")


@dataclass(slots=True)
class DaemonConfig:
    pfkey_group: str | None = None  # group allowed on the PF_KEY socket (mode 0660)
    allow_weak_algorithms: bool = False  # DES, 3DES, MD5 (RFC 8221 MUST NOTs)
    larval_timeout: float = 30.0  # seconds a GETSPI SA waits for its UPDATE
    acquire_interval: float = 1.0  # minimum seconds between ACQUIREs for one policy and flow
    log_level: str = "info"
    # IKE negotiates in a process of its own (keying this one through PF_KEY, as racoon keys a
    # kernel): two cores share the work of many tunnels. False: one process does everything.
    ike_process: bool = True
    # racoon's privsep: the IKE process, once its sockets are open, runs as this user; the
    # daemon then reads the configuration (root's, 0600) for it on reload.
    ike_user: str | None = None


@dataclass(slots=True)
class DatapathConfig:
    """``[datapath]``: the TUN/ESP engine (``uipsec daemon --no-datapath`` overrides enabled)."""

    enabled: bool = True
    tun_name: str = "uipsec0"
    path_mtu: int = 1500  # outer MTU towards the peers; the TUN MTU is this minus ESP overhead
    tun_mtu: int = 0  # fixed TUN MTU; 0: path_mtu minus the overhead of the SAs in use
    udp_port: int = 4500  # RFC 3948 ESP-in-UDP (and IKE after a NAT is found)
    udp_bind: tuple[str, ...] = ("0.0.0.0", "::")  # one UDP socket per address
    raw_esp: bool = True  # IP protocol 50 sockets for SAs without NAT-T
    always_encap: bool = False  # UDP-encapsulate every SA, NAT-T type or not
    keepalive_interval: float = 20.0  # RFC 3948 4: NAT keepalive after this much silence
    acquire_queue: int = 32  # packets held per policy while an SA is being negotiated
    fwmark: int = 0x220  # SO_MARK of the outer sockets, excluded from the routing table
    table: int = 220  # routing table of the routes into the TUN


@dataclass(slots=True)
class Config:
    daemon: DaemonConfig
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    source: str = "<defaults>"
    raw: dict[str, Any] | None = None  # the whole document, for the tables other layers read


_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Locator:
    """Finds the line of a key in the TOML text, since tomllib reports positions only for
    syntax errors. Good enough for ``[table]`` + ``key = value`` documents."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None = None) -> int | None:
        in_table = table == ""
        header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*(#.*)?$")
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=") if key else None
        for number, line in enumerate(self.lines, start=1):
            match = header.match(line)
            if match:
                in_table = match.group(1) == table
                if in_table and key_re is None:
                    return number
                continue
            if in_table and key_re is not None and key_re.match(line):
                return number
        return None


def _expect(
    value: object, kind: type | tuple[type, ...], path: str, where: int | None, name: str
) -> None:
    if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
        raise ConfigError(path, where, f"{name} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(path, where, f"{name} must be {_kind_name(kind)}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def parse_daemon_table(
    table: dict[str, Any], path: str, locate: _Locator
) -> DaemonConfig:
    config = DaemonConfig()
    known: dict[str, type | tuple[type, ...]] = {
        "pfkey_group": str,
        "allow_weak_algorithms": bool,
        "larval_timeout": (int, float),
        "acquire_interval": (int, float),
        "log_level": str,
        "ike_process": bool,
        "ike_user": str,
    }
    for key, value in table.items():
        where = locate.line_of("daemon", key)
        if key not in known:
            raise ConfigError(path, where, f"unknown setting daemon.{key}")
        _expect(value, known[key], path, where, f"daemon.{key}")
        if key in ("larval_timeout", "acquire_interval") and value <= 0:
            raise ConfigError(path, where, f"daemon.{key} must be positive")
        if key == "log_level" and value not in _LOG_LEVELS:
            raise ConfigError(path, where, f"daemon.log_level must be one of {_LOG_LEVELS}")
        if key == "ike_user":
            try:
                pwd.getpwnam(value)
            except KeyError:
                raise ConfigError(path, where, f"daemon.ike_user: no user {value!r}") from None
        if known[key] == (int, float):
            value = float(value)
        setattr(config, key, value)
    if config.ike_user is not None and not config.ike_process:
        raise ConfigError(path, locate.line_of("daemon", "ike_user"),
                          "daemon.ike_user needs the IKE process (ike_process = true)")
    return config


_DATAPATH_KEYS: dict[str, type | tuple[type, ...]] = {
    "enabled": bool, "tun_name": str, "path_mtu": int, "tun_mtu": int, "udp_port": int,
    "udp_bind": list,
    "raw_esp": bool, "always_encap": bool, "keepalive_interval": (int, float),
    "acquire_queue": int, "fwmark": int, "table": int,
}
# Inclusive bounds of the integer settings (and the keepalive interval).
_DATAPATH_RANGES: dict[str, tuple[float, float]] = {
    "path_mtu": (700, 65535), "tun_mtu": (0, 65535), "udp_port": (1, 65535),
    "keepalive_interval": (1, 3600),
    "acquire_queue": (0, 4096), "fwmark": (1, 0xFFFFFFFF), "table": (1, 0xFFFFFFFF),
}


def parse_datapath_table(table: dict[str, Any], path: str, locate: _Locator) -> DatapathConfig:
    config = DatapathConfig()
    for key, value in table.items():
        where = locate.line_of("datapath", key)
        kind = _DATAPATH_KEYS.get(key)
        if kind is None:
            raise ConfigError(path, where, f"unknown setting datapath.{key}")
        _expect(value, kind, path, where, f"datapath.{key}")
        bounds = _DATAPATH_RANGES.get(key)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(path, where,
                              f"datapath.{key} must be within {bounds[0]:g}..{bounds[1]:g}")
        if key == "table" and value in (253, 254, 255):
            raise ConfigError(path, where, f"datapath.table {value} is a reserved table")
        if key == "tun_mtu" and 0 < value < 576:
            raise ConfigError(path, where, "datapath.tun_mtu must be 0 (automatic) or >= 576")
        if key == "tun_name" and not 0 < len(value) < 16:
            raise ConfigError(path, where, "datapath.tun_name must be 1 to 15 characters")
        if key == "udp_bind":
            value = tuple(_bind_address(v, path, where) for v in value)
        elif kind == (int, float):
            value = float(value)
        setattr(config, key, value)
    return config


def _bind_address(value: object, path: str, where: int | None) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, where, "datapath.udp_bind must be a list of IP addresses")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, where, f"datapath.udp_bind: {value!r} is not an IP address")\
            from None
    return value


KNOWN_TABLES = {"daemon", "datapath"}


def load(path: str | Path, *, extra_tables: set[str] | frozenset[str] = frozenset()) -> Config:
    """Read and check ``path``; raise ConfigError, located, on any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, None, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, None, f"not UTF-8 text: {exc.reason}") from exc
    return loads(text, name, extra_tables=extra_tables)


def loads(
    text: str, name: str = "<string>", *, extra_tables: set[str] | frozenset[str] = frozenset()
) -> Config:
    try:
        doc = toml_lines.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(name, line, f"TOML syntax: {reason}") from exc
    locate = _Locator(text)
    for table in doc:
        if table not in KNOWN_TABLES | extra_tables:
            raise ConfigError(name, locate.line_of(table), f"unknown table [{table}]")
    tables = {}
    for table in ("daemon", "datapath"):
        tables[table] = doc.get(table, {})
        if not isinstance(tables[table], dict):
            raise ConfigError(name, locate.line_of("", table), f"{table} must be a table")
    return Config(daemon=parse_daemon_table(tables["daemon"], name, locate),
                  datapath=parse_datapath_table(tables["datapath"], name, locate),
                  source=name, raw=doc)
