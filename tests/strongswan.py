"""Run isolated strongSwan charon daemons (kernel-libipsec) as reference peers in tests.

Each ``Charon`` lives in a network namespace given by the caller and in its own mount namespace
whose /run is a bind mount of a private directory, so the compiled-in pid file path
(/var/run/charon.pid) never clashes between daemons. Everything else is private too: its
strongswan.conf (STRONGSWAN_CONF), vici socket, swanctl directory and log file all sit in one
temporary directory. swanctl talks to it with ``--uri unix://<dir>/charon.vici``.

This kernel has no XFRM, so charon uses kernel-libipsec (userspace ESP on a TUN device ``ipsec0``,
always UDP-encapsulated on port 4500, tunnel mode only) together with kernel-netlink, which here
only installs routes (table 220) and watches addresses. The gateway needs an address inside each
Child SA's local subnet: libipsec routes use it as source.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from userspace_ipsec.lab import stop_process

CHARON_PATH = Path("/usr/lib/ipsec/charon")
PLUGIN_DIR = Path("/usr/lib/ipsec/plugins")

# kernel-libipsec must come before kernel-netlink: the first kernel-ipsec backend wins, and the
# netlink one cannot work without XFRM. kdf is only present (and needed) on newer builds.
CHARON_PLUGINS = (
    "random", "nonce", "openssl", "aes", "sha1", "sha2", "hmac", "gcm", "kdf", "pem", "pkcs1",
    "pkcs8", "x509", "pubkey", "kernel-libipsec", "kernel-netlink", "socket-default", "vici",
)
SWANCTL_PLUGINS = ("random", "nonce", "openssl", "pem", "pkcs1", "pkcs8", "x509", "pubkey")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
SWANCTL_TIMEOUT = 30.0


class StrongSwanError(RuntimeError):
    """charon or swanctl is missing, failed to start, or a swanctl command failed."""


def require_strongswan() -> str:
    """Return the swanctl path; raise StrongSwanError naming what is missing (never skip)."""
    swanctl = shutil.which("swanctl") or ("/usr/sbin/swanctl" if os.access(
        "/usr/sbin/swanctl", os.X_OK) else None)
    missing = []
    if not os.access(CHARON_PATH, os.X_OK):
        missing.append(f"{CHARON_PATH} (apt-get install strongswan-charon)")
    if swanctl is None:
        missing.append("swanctl (apt-get install strongswan-swanctl)")
    for plugin in ("kernel-libipsec", "kernel-netlink", "vici", "openssl", "socket-default"):
        if not (PLUGIN_DIR / f"libstrongswan-{plugin}.so").exists():
            missing.append(f"plugin {plugin} (apt-get install libcharon-extra-plugins "
                           "strongswan-charon libstrongswan-standard-plugins)")
    if missing or swanctl is None:
        raise StrongSwanError("strongSwan is not usable here, missing: " + "; ".join(missing))
    return swanctl


def available_plugins(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (PLUGIN_DIR / f"libstrongswan-{n}.so").exists()]


def strongswan_conf(
    vici_socket: Path, log_file: Path, *, plugins: list[str], charon_extra: str = "",
    log_levels: str = "default = 1\n      ike = 2\n      cfg = 1\n      knl = 1\n",
) -> str:
    """A self-contained strongswan.conf (no include of /etc/strongswan.d)."""
    return f"""charon {{
  load_modular = no
  load = {' '.join(plugins)}
  install_routes = yes
  install_virtual_ip = no
  retransmit_tries = 3
  retransmit_timeout = 1.0
  filelog {{
    charon {{
      path = {log_file}
      time_format = %H:%M:%S
      ike_name = yes
      append = no
      flush_line = yes
      {log_levels}
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{vici_socket}
    }}
  }}
{charon_extra}
}}
swanctl {{
  load = {' '.join(available_plugins(SWANCTL_PLUGINS))}
  socket = unix://{vici_socket}
}}
"""


def psk_site_to_site(
    *, local_addr: str, remote_addr: str, local_id: str, remote_id: str, local_ts: str,
    remote_ts: str, conn: str = "gw", child: str = "net",
    ike_proposal: str = "aes128gcm16-prfsha256-x25519", esp_proposal: str = "aes128gcm16",
) -> str:
    """swanctl.conf ``connections`` text for a PSK IKEv2 subnet-to-subnet tunnel."""
    return f"""connections {{
  {conn} {{
    version = 2
    local_addrs = {local_addr}
    remote_addrs = {remote_addr}
    proposals = {ike_proposal}
    local {{
      auth = psk
      id = {local_id}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      {child} {{
        mode = tunnel
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = {esp_proposal}
      }}
    }}
  }}
}}
"""


def psk_secret(id_a: str, id_b: str, psk: str, name: str = "ike-psk") -> str:
    """The body of a swanctl ``secrets`` section holding one PSK shared by two identities."""
    return f'  {name} {{\n    id-1 = {id_a}\n    id-2 = {id_b}\n    secret = "{psk}"\n  }}\n'


def psk_gateway_pair(
    *, left_ns: str, right_ns: str, left_addr: str, right_addr: str, left_as_seen_by_right: str,
    left_net: str, right_net: str, psk: str, charon_extra: str = "",
) -> tuple[Charon, Charon]:
    """Two (unstarted) charons with a PSK subnet-to-subnet tunnel ``gw``/``net``, ids gwL/gwR."""
    secret = psk_secret("gwL", "gwR", psk)
    left = Charon(left_ns, psk_site_to_site(
        local_addr=left_addr, remote_addr=right_addr, local_id="gwL", remote_id="gwR",
        local_ts=left_net, remote_ts=right_net,
    ), secret, charon_extra=charon_extra)
    right = Charon(right_ns, psk_site_to_site(
        local_addr=right_addr, remote_addr=left_as_seen_by_right, local_id="gwR",
        remote_id="gwL", local_ts=right_net, remote_ts=left_net,
    ), secret, charon_extra=charon_extra)
    return left, right


# --- `swanctl --raw` output: key=value, key=[v v], key {...}; values are whitespace-free for the
# identities and addresses these tests use.
_RAW_TOKEN = re.compile(r"\s*(?:([^\s{}\[\]=]+)(=\[|=| \{)|(\})|(\])|([^\s\]]+))")


def parse_raw(text: str) -> dict[str, Any]:
    """Parse one ``swanctl --raw`` message body ``name {...}`` into nested dicts/lists/strings."""
    body = text.strip()
    if " {" in body.split("\n", 1)[0]:
        body = body[body.index("{") + 1:]
        body = body[: body.rindex("}")]
    root: dict[str, Any] = {}
    stack: list[Any] = [root]
    pos, limit = 0, len(body)
    for _ in range(limit + 1):
        match = _RAW_TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            break
        pos = match.end()
        key, kind, close_section, close_list, word = match.groups()
        top = stack[-1]
        if key is not None:
            if kind == "=":
                value = re.match(r"[^\s}]*", body[pos:])
                assert value is not None
                top[key] = value.group(0)
                pos += value.end()
            else:
                child: Any = [] if kind == "=[" else {}
                top[key] = child
                stack.append(child)
        elif (close_section or close_list) and len(stack) > 1:
            stack.pop()
        elif word is not None and isinstance(top, list):
            top.append(word)
    return root


@dataclass(slots=True)
class ChildSa:
    name: str
    state: str
    mode: str
    encap: bool
    encr_alg: str
    spi_in: str
    spi_out: str
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    local_ts: list[str]
    remote_ts: list[str]


@dataclass(slots=True)
class IkeSa:
    name: str
    state: str
    local_host: str
    remote_host: str
    encr_alg: str
    dh_group: str
    nat_any: bool
    children: list[ChildSa]


def _child_from_raw(raw: dict[str, Any]) -> ChildSa:
    return ChildSa(
        name=raw.get("name", ""), state=raw.get("state", ""), mode=raw.get("mode", ""),
        encap=raw.get("encap") == "yes", encr_alg=raw.get("encr-alg", ""),
        spi_in=raw.get("spi-in", ""), spi_out=raw.get("spi-out", ""),
        bytes_in=int(raw.get("bytes-in", 0)), bytes_out=int(raw.get("bytes-out", 0)),
        packets_in=int(raw.get("packets-in", 0)), packets_out=int(raw.get("packets-out", 0)),
        local_ts=list(raw.get("local-ts", [])), remote_ts=list(raw.get("remote-ts", [])),
    )


def parse_list_sas(output: str) -> list[IkeSa]:
    """Parse the ``list-sa event {...}`` lines printed by ``swanctl --list-sas --raw``."""
    sas = []
    for line in output.splitlines():
        if not line.startswith("list-sa event"):
            continue
        for name, raw in parse_raw(line).items():
            children = raw.get("child-sas", {})
            sas.append(IkeSa(
                name=name, state=raw.get("state", ""), local_host=raw.get("local-host", ""),
                remote_host=raw.get("remote-host", ""), encr_alg=raw.get("encr-alg", ""),
                dh_group=raw.get("dh-group", ""),
                nat_any=any(raw.get(k) == "yes" for k in ("nat-local", "nat-remote", "nat-any")),
                children=[_child_from_raw(c) for c in children.values()],
            ))
    return sas


@dataclass(slots=True)
class Charon:
    """One charon in network namespace ``netns``, configured by swanctl.conf text.

    ``connections`` is the ``connections { ... }`` section (and anything else swanctl.conf may
    hold except secrets); ``secrets`` is the body of the ``secrets { ... }`` section. Use as a
    context manager, or call ``start()`` and, always, ``stop()``.
    """

    netns: str
    connections: str
    secrets: str = field(default="", repr=False)
    charon_extra: str = ""
    plugins: tuple[str, ...] = CHARON_PLUGINS
    keep_dir: bool = False
    _workdir: Path | None = field(init=False, default=None)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _swanctl: str = field(init=False, default="swanctl")

    def __post_init__(self) -> None:
        self._swanctl = require_strongswan()

    @property
    def workdir(self) -> Path:
        """Private directory (config, run/, vici socket, logs); exists from start() to stop()."""
        if self._workdir is None:
            raise StrongSwanError("charon was not started")
        return self._workdir

    @property
    def vici_socket(self) -> Path:
        return self.workdir / "charon.vici"

    @property
    def log_file(self) -> Path:
        return self.workdir / "charon.log"

    @property
    def conf_file(self) -> Path:
        return self.workdir / "strongswan.conf"

    @property
    def swanctl_dir(self) -> Path:
        return self.workdir / "swanctl"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise StrongSwanError("charon is not running")
        return self.process.pid

    def _write_config(self) -> None:
        run_dir = self.workdir / "run"
        run_dir.mkdir(mode=0o700)
        self.swanctl_dir.mkdir(mode=0o700)
        self.conf_file.write_text(strongswan_conf(
            self.vici_socket, self.log_file, plugins=available_plugins(self.plugins),
            charon_extra=self.charon_extra,
        ))
        conf = self.swanctl_dir / "swanctl.conf"
        conf.write_text(f"{self.connections}\nsecrets {{\n{self.secrets}\n}}\n")
        conf.chmod(0o600)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["STRONGSWAN_CONF"] = str(self.conf_file)
        env["SWANCTL_DIR"] = str(self.swanctl_dir)
        return env

    def start(self) -> None:
        """Start charon, wait for its vici socket, and load the configuration."""
        if self.process is not None:
            raise StrongSwanError(f"charon in {self.netns} already started")
        self._workdir = Path(tempfile.mkdtemp(prefix=f"charon-{self.netns[-12:]}-"))
        try:
            self._write_config()
            self._spawn()
            self._wait_for_vici()
            self.swanctl("--load-all", "--file", str(self.swanctl_dir / "swanctl.conf"))
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        # A private mount namespace in which /run is our directory: pid file and any other
        # runtime state stay out of the host's /run and out of the other charons' way.
        script = 'mount --make-rprivate / && mount --bind "$1" /run && exec "$2"'
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation",
                "private", "--", "/bin/sh", "-c", script, "sh",
                str(self.workdir / "run"), str(CHARON_PATH)]
        with (self.workdir / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(argv, env=self._env(), stdout=stderr, stderr=stderr,
                                            stdin=subprocess.DEVNULL)

    def _wait_for_vici(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StrongSwanError(
                    f"charon in {self.netns} exited with {self.process.returncode}\n"
                    + self.diagnostics())
            if self.vici_socket.exists():
                done = self._run_swanctl(["--stats"], check=False)
                if done.returncode == 0:
                    return
            time.sleep(0.05)
        raise StrongSwanError(f"charon in {self.netns}: no vici socket after {START_TIMEOUT}s\n"
                              + self.diagnostics())

    def _run_swanctl(self, args: list[str], *, check: bool = True,
                     timeout: float = SWANCTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [self._swanctl, *args, "--uri", f"unix://{self.vici_socket}"]
        done = subprocess.run(argv, env=self._env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise StrongSwanError(
                f"swanctl {' '.join(args)} ({self.netns}) -> exit {done.returncode}\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n" + self.diagnostics())
        return done

    def swanctl(self, *args: str, timeout: float = SWANCTL_TIMEOUT) -> str:
        """Run swanctl against this charon; return stdout, raise StrongSwanError on failure."""
        return self._run_swanctl(list(args), timeout=timeout).stdout

    def initiate(self, child: str, ike: str | None = None, timeout: int = 20) -> None:
        """Initiate ``child`` (of ``ike``) and wait until swanctl reports success."""
        args = ["--initiate", "--child", child, "--timeout", str(timeout)]
        if ike is not None:
            args += ["--ike", ike]
        self.swanctl(*args, timeout=timeout + 10)

    def terminate(self, ike: str, timeout: int = 10) -> None:
        self.swanctl("--terminate", "--ike", ike, "--timeout", str(timeout),
                     timeout=timeout + 10)

    def list_sas(self) -> list[IkeSa]:
        return parse_list_sas(self.swanctl("--list-sas", "--raw", "--noblock"))

    def child_sa(self, child: str) -> ChildSa:
        """The one installed Child SA named ``child``; StrongSwanError if there is none."""
        for ike in self.list_sas():
            for sa in ike.children:
                if sa.name == child and sa.state == "INSTALLED":
                    return sa
        raise StrongSwanError(f"no installed Child SA {child!r} in {self.netns}")

    def log_text(self) -> str:
        parts = []
        for name in ("stderr.log", "charon.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def diagnostics(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} log lines of charon in {self.netns} ({self.workdir}):\n" + \
            "\n".join(tail)

    def stop(self) -> None:
        """SIGTERM charon by PID, SIGKILL after STOP_TIMEOUT; remove the work dir."""
        proc, self.process = self.process, None
        try:
            if proc is not None:
                stop_process(proc, STOP_TIMEOUT)
        finally:
            if not self.keep_dir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Charon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
