"""The daemon's TOML configuration: parsed and checked in full before anything starts.

A bad file is refused with its name, the line and the reason (``ConfigError``). Only the
``[daemon]`` table is defined here; later parts of the stack (datapath, IKE connections) add
their own tables and check them the same way.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass(slots=True)
class Config:
    daemon: DaemonConfig
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
        if known[key] == (int, float):
            value = float(value)
        setattr(config, key, value)
    return config


KNOWN_TABLES = {"daemon"}


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
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(name, line, f"TOML syntax: {reason}") from exc
    locate = _Locator(text)
    for table in doc:
        if table not in KNOWN_TABLES | extra_tables:
            raise ConfigError(name, locate.line_of(table), f"unknown table [{table}]")
    daemon_table = doc.get("daemon", {})
    if not isinstance(daemon_table, dict):
        raise ConfigError(name, locate.line_of("", "daemon"), "daemon must be a table")
    return Config(daemon=parse_daemon_table(daemon_table, name, locate), source=name, raw=doc)
