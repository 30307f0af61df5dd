"""Who may connect, and how the daemon holds (or refuses) its run directory."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.daemon_proc import (
    RunningDaemon,
    StartDaemon,
    daemon_flags,
    subprocess_env,
    uipsec_cmd,
)
from userspace_ipsec.pfkey.constants import MsgType
from userspace_ipsec.pfkey.messages import Message

NOBODY = pwd.getpwnam("nobody")
GROUP = grp.getgrgid(NOBODY.pw_gid)  # nobody's primary group (nogroup)


def _connect_as(path: Path, uid: int, gid: int) -> str:
    """In a forked child running as uid/gid: connect, send a FLUSH, say what happened."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        outcome = "error"
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(5)
            try:
                sock.connect(str(path))
            except PermissionError:
                outcome = "EACCES"
            else:
                try:
                    sock.send(bytes.fromhex("02090000020000000100000001000000"))  # SADB_FLUSH
                    reply = sock.recv(4096)
                    outcome = "served" if len(reply) == 16 else "closed"
                except (ConnectionResetError, BrokenPipeError):
                    outcome = "closed"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"error {exc!r}"
        finally:
            os.write(write_fd, outcome.encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A run directory others can traverse (pytest's tmp_path is 0700): only the socket's own
    mode and the daemon's peer check stand between them and the socket."""
    path = Path(tempfile.mkdtemp(prefix="uipsec-access-"))
    path.chmod(0o755)
    yield path / "run"
    shutil.rmtree(path, ignore_errors=True)


def test_socket_is_0600_and_other_users_are_refused(start: StartDaemon, public_dir: Path) -> None:
    daemon = start(run_dir=public_dir)
    st = daemon.socket_path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert _connect_as(daemon.socket_path, NOBODY.pw_uid, NOBODY.pw_gid) == "EACCES"
    # Even past the file permission, the daemon checks the peer's credentials itself.
    os.chmod(daemon.socket_path, 0o666)
    assert _connect_as(daemon.socket_path, NOBODY.pw_uid, NOBODY.pw_gid) == "closed"
    daemon.wait_log("refused connection from pid")
    assert f"uid {NOBODY.pw_uid}" in daemon.log()
    assert daemon.client().request(Message(MsgType.FLUSH)).errno == 0  # root still served


def test_pfkey_group_opens_the_socket_to_its_members(start: StartDaemon, tmp_path: Path,
                                                     public_dir: Path) -> None:
    config = tmp_path / "uipsec.toml"
    config.write_text(f'[daemon]\npfkey_group = "{GROUP.gr_name}"\n')
    daemon = start("--config", str(config), run_dir=public_dir)
    st = daemon.socket_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GROUP.gr_gid
    assert _connect_as(daemon.socket_path, NOBODY.pw_uid, GROUP.gr_gid) == "served"
    assert _connect_as(daemon.socket_path, NOBODY.pw_uid, 0) == "EACCES"


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(uipsec_cmd(*args), capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, check=False)


def test_second_daemon_on_the_same_run_dir_refuses(daemon: RunningDaemon) -> None:
    second = _run("--run-dir", str(daemon.run_dir), "daemon", *daemon_flags())
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert lines == [f"uipsec: another daemon (pid {daemon.proc.pid}) holds run directory "
                     f"{daemon.run_dir}"]
    assert daemon.client().request(Message(MsgType.FLUSH)).errno == 0  # the first one lives on


def test_run_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run("--run-dir", str(blocker / "run"), "daemon", *daemon_flags())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"uipsec: cannot create run directory {blocker / 'run'}: Not a directory"]


def test_read_only_run_dir_is_refused(tmp_path: Path) -> None:
    # Root may write anywhere, except on a read-only file system: mount one privately.
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    script = ('mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"')
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(run_dir), *uipsec_cmd("--run-dir", str(run_dir), "daemon", *daemon_flags())],
        capture_output=True, text=True, env=subprocess_env(), timeout=30, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"uipsec: run directory {run_dir} is not writable"]


def test_sigterm_removes_socket_and_lock(daemon: RunningDaemon) -> None:
    assert daemon.lock_path.read_text().strip() == str(daemon.proc.pid)
    daemon.client().request(Message(MsgType.FLUSH))  # a connected client does not hold it up
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=15) == 0
    assert not daemon.socket_path.exists() and not daemon.lock_path.exists()
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[daemon]\nlarval_timeout = -1\n", 2, "daemon.larval_timeout must be positive"),
        ("# comment\n[daemon]\nlog_level = 'loud'\n", 3, "daemon.log_level must be one of"),
        ("[daemon]\nbogus = 1\n", 2, "unknown setting daemon.bogus"),
        ("[daemon]\npfkey_group = 7\n", 2, "daemon.pfkey_group must be a string"),
        ("[daemon\n", 1, "TOML syntax"),
    ],
)
def test_bad_config_is_refused_with_file_and_line(tmp_path: Path, text: str, line: int,
                                                  reason: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    run_dir = tmp_path / "run"
    result = _run("--run-dir", str(run_dir), "daemon", *daemon_flags(), "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"uipsec: {config}:{line}: "), lines
    assert reason in lines[0]
    assert not (run_dir / "pfkey.sock").exists()
