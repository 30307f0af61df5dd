"""The control socket: JSON requests to the daemon for what PF_KEY has no message for.

``control.sock`` in the run directory is a Unix stream socket (0600, like the PF_KEY socket);
each request is one line of JSON ``{"command": NAME, "args": {...}}`` and gets one line back:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. The daemon's parts register
the commands they answer (``stats`` from the datapath, ``up``/``down``/``status`` from IKE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .rundir import listen_unix

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]

MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 256 << 20  # `status` of thousands of IKE SAs


class ControlError(Exception):
    """A control request failed; the message is for the user."""


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, command: str, handler: Handler) -> None:
        self._handlers[command] = handler

    async def start(self) -> None:
        listener = listen_unix(self.path, socket.SOCK_STREAM)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=listener, limit=MAX_REQUEST
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await self._reply(writer, await self._answer(line))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            command = request["command"]
            args = request.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        handler = self._handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            result = handler(args)
            if asyncio.iscoroutine(result):
                result = await result
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:  # a handler bug must not take the daemon down
            log.exception("control: %s failed", command)
            return {"ok": False, "error": f"{command} failed inside the daemon (see its log)"}
        return {"ok": True, "result": result}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        await writer.drain()


def request(path: Path, command: str, args: dict[str, Any] | None = None,
            timeout: float = 30.0) -> Any:
    """Send one control request; return its result or raise ControlError / OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the control connection")
            data += chunk
    response = json.loads(data)
    if not response.get("ok"):
        raise ControlError(response.get("error", "request failed"))
    return response.get("result")


class ControlClient:
    """``request`` for a caller inside an event loop (the daemon asking its IKE process),
    over connections kept open between requests: ``stats`` is polled, and a connection set up
    per request cost more than the answer. One request per connection at a time; a request
    that fails or times out closes its connection."""

    def __init__(self, path: Path, keep: int = 4) -> None:
        self.path = path
        self.keep = keep
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, command: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        line = json.dumps({"command": command, "args": args or {}}).encode() + b"\n"
        conn = self._idle.pop() if self._idle else None
        try:
            try:
                answer = await asyncio.wait_for(self._exchange(conn, line), timeout)
            except (ControlError, ConnectionError):
                if conn is None:
                    raise
                # A kept connection the other end has closed meanwhile: once more, afresh.
                answer = await asyncio.wait_for(self._exchange(None, line), timeout)
        except TimeoutError:
            raise ControlError(f"{command}: no answer within {timeout:g} s") from None
        except (ValueError, asyncio.LimitOverrunError):
            raise ControlError(f"{command}: answer too long") from None
        response = json.loads(answer)
        if not response.get("ok"):
            raise ControlError(response.get("error", "request failed"))
        return response.get("result")

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
                        line: bytes) -> bytes:
        if conn is None:
            conn = await asyncio.open_unix_connection(str(self.path), limit=MAX_RESPONSE)
        reader, writer = conn
        kept = False
        try:
            writer.write(line)
            await writer.drain()
            answer = await reader.readline()
            if not answer:
                raise ControlError("the other end closed the control connection")
            if len(self._idle) < self.keep:
                self._idle.append(conn)
                kept = True
            return answer
        finally:
            if not kept:
                writer.close()

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
