"""``uipsec setkey`` / ``sa list`` / ``spd list`` against a running daemon: a setkey script goes in,
and every listing shows exactly what it said."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner, Result

from tests.daemon.daemon_proc import RunningDaemon, subprocess_env, uipsec_cmd
from userspace_ipsec.cli import main

GCM_1 = "a1" * 32 + "c0ffee01"
GCM_2 = "b2" * 32 + "c0ffee02"
GCM_3 = "70" * 32 + "decade01"
GCM_6 = "66" * 32 + "decade06"
CBC_1 = "3c" * 32
SHA_1 = "5e" * 32
CBC_2 = "4d" * 16
SHA_2 = "6f" * 32

SCRIPT = f"""\
# Both kinds of ESP SA, both cipher families, one NAT-T SA, policies both ways.
flush;
spdflush;
add 192.0.2.1 192.0.2.2 esp 0x1001 -m transport -r 64 -E aes-gcm-16 0x{GCM_1};
add 192.0.2.2 192.0.2.1 esp 0x1002 -m transport
\t-E aes-cbc 0x{CBC_2} -A hmac-sha256 0x{SHA_2};
add 192.0.2.1 192.0.2.3 esp 0x2001 -m tunnel -u 101
\t-E aes-cbc 0x{CBC_1} -A hmac-sha256 0x{SHA_1};
add 192.0.2.3 192.0.2.1 esp 0x2002 -m tunnel -u 102 -E aes-gcm-16 0x{GCM_2};
add 192.0.2.1[4500] 203.0.113.77[31337] esp-udp 0x3001 -m tunnel -E aes-gcm-16 0x{GCM_3};
add 2001:db8::1 2001:db8::2 esp 0x6001 -m transport -E aes-gcm-16 0x{GCM_6};

spdadd 192.0.2.1 192.0.2.2 any -P out ipsec esp/transport//require;
spdadd 192.0.2.2 192.0.2.1 any -P in ipsec esp/transport//require;
spdadd 198.51.100.0/24 203.0.113.0/24 any -P out ipsec
\tesp/tunnel/192.0.2.1-192.0.2.3/unique:101;
spdadd 203.0.113.0/24 198.51.100.0/24 tcp -P in ipsec
\tesp/tunnel/192.0.2.3-192.0.2.1/unique:102;
"""

class Sa(NamedTuple):
    spi: int
    mode: str
    src: str
    dst: str
    encap: str | None
    reqid: int
    enc: str
    integ: str | None
    replay: int
    keys: tuple[str, str | None]


# What the script says, SA by SA.
SAS = [Sa(*sa) for sa in [
    (0x1001, "transport", "192.0.2.1", "192.0.2.2", None, 0, "aes-gcm-16", None, 64,
     (GCM_1, None)),
    (0x1002, "transport", "192.0.2.2", "192.0.2.1", None, 0, "aes-cbc", "hmac-sha256", 0,
     (CBC_2, SHA_2)),
    (0x2001, "tunnel", "192.0.2.1", "192.0.2.3", None, 101, "aes-cbc", "hmac-sha256", 0,
     (CBC_1, SHA_1)),
    (0x2002, "tunnel", "192.0.2.3", "192.0.2.1", None, 102, "aes-gcm-16", None, 0,
     (GCM_2, None)),
    (0x3001, "tunnel", "192.0.2.1[4500]", "203.0.113.77[31337]", "espinudp", 0, "aes-gcm-16",
     None, 0, (GCM_3, None)),
    (0x6001, "transport", "2001:db8::1", "2001:db8::2", None, 0, "aes-gcm-16", None, 0,
     (GCM_6, None)),
]]
# Policies: (direction, src, dst, upper protocol, [(mode, endpoints, level, reqid)]).
# RFC mode (setkey's default) gives every "in" policy a "fwd" twin at level require.
POLICIES = [
    ("out", "192.0.2.1/32", "192.0.2.2/32", "any", [("transport", "", "require", 0)]),
    ("in", "192.0.2.2/32", "192.0.2.1/32", "any", [("transport", "", "require", 0)]),
    ("fwd", "192.0.2.2/32", "192.0.2.1/32", "any", [("transport", "", "require", 0)]),
    ("out", "198.51.100.0/24", "203.0.113.0/24", "any",
     [("tunnel", "192.0.2.1-192.0.2.3", "unique", 101)]),
    ("in", "203.0.113.0/24", "198.51.100.0/24", "tcp",
     [("tunnel", "192.0.2.3-192.0.2.1", "unique", 102)]),
    ("fwd", "203.0.113.0/24", "198.51.100.0/24", "tcp",
     [("tunnel", "192.0.2.3-192.0.2.1", "require", 0)]),
]
ALL_KEYS = [k for sa in SAS for k in sa[9] if k]


def uipsec(daemon: RunningDaemon | Path, *args: str, **kwargs: Any) -> Result:
    run_dir = daemon if isinstance(daemon, Path) else daemon.run_dir
    return CliRunner().invoke(main, ["--run-dir", str(run_dir), *args], **kwargs)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "site.conf"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def loaded(daemon: RunningDaemon, script: Path) -> RunningDaemon:
    result = uipsec(daemon, "setkey", "-f", str(script))
    assert result.exit_code == 0, result.output
    assert result.output == ""
    return daemon


def test_sa_list_json_is_the_script(loaded: RunningDaemon) -> None:
    result = uipsec(loaded, "sa", "list", "--json")
    assert result.exit_code == 0, result.output
    records = sorted(json.loads(result.stdout), key=lambda r: r["spi"])
    assert len(records) == len(SAS)
    for record, (spi, mode, src, dst, encap, reqid, enc, integ, replay, _) in zip(
            records, SAS, strict=True):
        assert (record["spi"], record["spi_hex"], record["protocol"]) == (
            spi, f"0x{spi:08x}", "esp")
        assert (record["mode"], record["src"], record["dst"]) == (mode, src, dst)
        assert (record["encap"], record["reqid"], record["state"]) == (encap, reqid, "mature")
        assert (record["encryption"], record["integrity"]) == (enc, integ)
        assert record["replay_window"] == replay
        assert "encryption_key" not in record and "integrity_key" not in record
    assert not any(key in result.stdout for key in ALL_KEYS)


def test_sa_list_shows_keys_only_when_asked(loaded: RunningDaemon) -> None:
    table = uipsec(loaded, "sa", "list")
    assert table.exit_code == 0 and not any(key in table.stdout for key in ALL_KEYS)
    assert len(table.stdout.splitlines()) == 1 + len(SAS)
    result = uipsec(loaded, "sa", "list", "--json", "--show-keys")
    records = sorted(json.loads(result.stdout), key=lambda r: r["spi"])
    assert [(r["encryption_key"], r["integrity_key"]) for r in records] == [s[9] for s in SAS]
    shown = uipsec(loaded, "sa", "list", "--show-keys").stdout
    assert all(key in shown for key in ALL_KEYS)


def test_spd_list_json_is_the_script(loaded: RunningDaemon) -> None:
    result = uipsec(loaded, "spd", "list", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    got = sorted(
        (r["direction"], r["src"]["prefix"], r["dst"]["prefix"], r["upper_protocol"],
         [(q["mode"], q["endpoints"], q["level"], q["reqid"]) for q in r["requests"]])
        for r in records
    )
    assert got == sorted(POLICIES)
    assert all(r["action"] == "ipsec" and r["id"] > 0 for r in records)
    assert all(q["protocol"] == "esp" for r in records for q in r["requests"])
    assert len({r["id"] for r in records}) == len(POLICIES)


_SA_HEAD = re.compile(r"^(\S+) (\S+) \n\t(esp|esp-udp) mode=(\w+) spi=(\d+)\(0x([0-9a-f]{8})\) "
                      r"reqid=(\d+)\(0x[0-9a-f]{8}\)\n", re.M)


def test_setkey_dump_is_the_script(loaded: RunningDaemon) -> None:
    result = uipsec(loaded, "setkey", "-D")
    assert result.exit_code == 0, result.output
    blocks = _SA_HEAD.findall(result.stdout)
    got = sorted((int(spi), mode, src, dst, proto, int(reqid))
                 for src, dst, proto, mode, spi, _, reqid in blocks)
    want = sorted((spi, mode, src, dst, "esp-udp" if encap else "esp", reqid)
                  for spi, mode, src, dst, encap, reqid, *_ in SAS)
    assert got == want
    algs = re.findall(r"^\t([EA]): (\S+) <(\d+) bits hidden>$", result.stdout, re.M)
    want_algs = [("E", sa.enc, str(len(sa.keys[0]) * 4)) for sa in SAS]
    want_algs += [("A", sa.integ, str(len(sa.keys[1] or "") * 4)) for sa in SAS if sa.integ]
    assert sorted(algs) == sorted(want_algs)
    assert sorted(re.findall(r"replay=(\d+) ", result.stdout)) == sorted(
        str(sa[8]) for sa in SAS)
    assert not any(key in result.stdout for key in ALL_KEYS)


def test_setkey_policy_dump_is_the_script(loaded: RunningDaemon) -> None:
    result = uipsec(loaded, "setkey", "-DP")
    assert result.exit_code == 0, result.output
    blocks = re.findall(r"^(\S+)\[any\] (\S+)\[any\] (\S+)\n\t(\w+) prio def ipsec\n\t(\S+)\n",
                        result.stdout, re.M)
    got = sorted((d, s, t, proto, req) for s, t, proto, d, req in blocks)

    def spec(mode: str, ends: str, level: str, reqid: int) -> str:
        return f"esp/{mode}/{ends}/{level}" + (f":{reqid}" if reqid else "")

    def prefix(p: str) -> str:
        return p.removesuffix("/32")

    want = sorted((d, prefix(s), prefix(t), proto, spec(*reqs[0]))
                  for d, s, t, proto, reqs in POLICIES)
    assert got == want


def test_script_error_names_file_line_token_and_applies_nothing(
        daemon: RunningDaemon, script: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    lines = SCRIPT.splitlines()
    lines.insert(12, "spdadd 192.0.2.9 192.0.2.8 any -P sideways none;")  # line 13
    bad.write_text("\n".join(lines) + "\n")
    result = uipsec(daemon, "setkey", "-f", str(bad))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"uipsec: {bad}:13:")
    assert "sideways" in result.stderr and len(result.stderr.splitlines()) == 1
    assert uipsec(daemon, "setkey", "-D").stdout == "No SAD entries.\n"
    assert uipsec(daemon, "setkey", "-DP").stdout == "No SPD entries.\n"


def test_kernel_refusal_names_the_line_and_exits_1(daemon: RunningDaemon,
                                                   tmp_path: Path) -> None:
    dup = tmp_path / "dup.conf"
    dup.write_text(f"add 192.0.2.1 192.0.2.2 esp 0x1001 -E aes-gcm-16 0x{GCM_1};\n"
                   f"add 192.0.2.1 192.0.2.2 esp 0x1001 -E aes-gcm-16 0x{GCM_1};\n")
    result = uipsec(daemon, "setkey", "-f", str(dup))
    assert result.exit_code == 1
    assert result.stderr == f"uipsec: {dup}:2: add: ADD: File exists\n"


def test_trace_prints_every_message(daemon: RunningDaemon, script: Path) -> None:
    result = uipsec(daemon, "setkey", "-x", "-f", str(script))
    assert result.exit_code == 0, result.output
    types = re.findall(r"^sadb_msg\{ version=2 type=\d+\((\w+)\) errno=(\d+)", result.stdout,
                       re.M)
    sent = ["flush", "x_spdflush"] + ["add"] * len(SAS) + ["x_spdadd"] * 6
    # Each request, then its reply (the socket is the only one: no other news).
    assert [t for t, _ in types] == [t for t in sent for _ in (0, 1)]
    assert all(err == "0" for _, err in types)
    assert "hexdump{" in result.stdout


def test_daemon_not_running_is_one_line_and_status_1(tmp_path: Path, script: Path) -> None:
    for args in (["sa", "list"], ["spd", "list", "--json"], ["setkey", "-D"],
                 ["setkey", "-f", str(script)], ["sa", "flush"]):
        result = subprocess.run(uipsec_cmd("--run-dir", str(tmp_path / "none"), *args),
                                capture_output=True, text=True, env=subprocess_env(),
                                timeout=60, check=False)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("uipsec: no uipsec daemon is listening on ")
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_run_dir_option_and_environment(daemon: RunningDaemon, script: Path) -> None:
    assert uipsec(daemon, "setkey", "-f", str(script)).exit_code == 0
    by_env = CliRunner().invoke(main, ["sa", "list", "--json"],
                                env={"UIPSEC_RUN_DIR": str(daemon.run_dir)})
    assert by_env.exit_code == 0, by_env.output
    assert len(json.loads(by_env.stdout)) == len(SAS)
    # The option wins over the environment.
    elsewhere = CliRunner().invoke(main, ["--run-dir", str(daemon.run_dir / "nope"), "sa",
                                          "list"], env={"UIPSEC_RUN_DIR": str(daemon.run_dir)})
    assert elsewhere.exit_code == 1


def test_flush_commands_empty_the_databases(loaded: RunningDaemon) -> None:
    assert uipsec(loaded, "sa", "flush").exit_code == 0
    assert json.loads(uipsec(loaded, "sa", "list", "--json").stdout) == []
    assert len(json.loads(uipsec(loaded, "spd", "list", "--json").stdout)) == len(POLICIES)
    assert uipsec(loaded, "spd", "flush").exit_code == 0
    assert json.loads(uipsec(loaded, "spd", "list", "--json").stdout) == []


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:")[1]
    for name in ("daemon", "sa", "setkey", "spd"):
        assert re.search(rf"^\s+{name}\s", commands, re.M), name
    assert "--run-dir" in result.stdout
