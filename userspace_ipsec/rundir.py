"""The run directory: where a daemon keeps its sockets and its lock.

Several daemons (one per network namespace) can run on one host, each with its own run directory;
every command takes ``--run-dir`` (or ``UIPSEC_RUN_DIR``) to say which one it means.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = "/run/uipsec"
ENV_RUN_DIR = "UIPSEC_RUN_DIR"

PFKEY_SOCKET = "pfkey.sock"
CONTROL_SOCKET = "control.sock"
IKE_CONTROL_SOCKET = "ike-control.sock"  # the IKE process's, behind the daemon's
LOCK_FILE = "uipsec.pid"


class RunDirError(Exception):
    """The run directory cannot be used; the message says why, in one line."""


def resolve(run_dir: str | os.PathLike[str] | None) -> Path:
    if run_dir is None:
        run_dir = os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR
    return Path(run_dir)


@dataclass(slots=True)
class RunDir:
    path: Path

    @property
    def pfkey_socket(self) -> Path:
        return self.path / PFKEY_SOCKET

    @property
    def control_socket(self) -> Path:
        return self.path / CONTROL_SOCKET

    @property
    def ike_control_socket(self) -> Path:
        return self.path / IKE_CONTROL_SOCKET

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE


class RunDirLock:
    """Exclusive ownership of a run directory for one daemon, held by an flock on its pid file.

    The lock dies with the process, so a crashed daemon never leaves a directory that looks held.
    """

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.run_dir.path
        try:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"run directory {path} is not writable")
        try:
            fd = os.open(self.run_dir.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot open {self.run_dir.lock_file}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(
                    f"another daemon (pid {holder}) holds run directory {path}"
                ) from exc
            raise RunDirError(f"cannot lock {self.run_dir.lock_file}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.run_dir.lock_file.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def listen_unix(path: Path, kind: int, *, group_gid: int | None = None,
                backlog: int = 128) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 (0660 with ``group_gid``).

    It is bound under a temporary name and renamed into place once listening, so whoever sees
    the file can connect: no window where it exists but refuses, and none where it has looser
    permissions than intended.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(temporary))
        finally:
            os.umask(old_umask)
        if group_gid is not None:
            os.chown(temporary, -1, group_gid)
            os.chmod(temporary, 0o660)
        sock.listen(backlog)
        sock.setblocking(False)
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock
