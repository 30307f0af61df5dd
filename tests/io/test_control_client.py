"""ControlClient (the daemon asking its IKE process) against a real ControlServer socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from userspace_ipsec import control
from userspace_ipsec.control import ControlClient, ControlError, ControlServer


def _server(path: Path, release: asyncio.Event | None = None) -> ControlServer:
    server = ControlServer(path)
    server.register("echo", lambda args: args)

    async def slow(_args: dict[str, Any]) -> str:
        assert release is not None
        await release.wait()
        return "slow done"

    def refuse(_args: dict[str, Any]) -> None:
        raise ControlError("refused for the test")

    server.register("slow", slow)
    server.register("refuse", refuse)
    return server


@contextlib.asynccontextmanager
async def _serving(path: Path, release: asyncio.Event | None = None
                   ) -> AsyncIterator[ControlClient]:
    server = _server(path, release)
    await server.start()
    client = ControlClient(path)
    try:
        yield client
    finally:
        if release is not None:
            release.set()
        client.close()
        await server.close()


def test_requests_share_a_kept_connection_and_run_side_by_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = asyncio.open_unix_connection

    async def counting_open(path: str, **kw: Any) -> Any:
        opened.append(path)
        return await real_open(path, **kw)

    monkeypatch.setattr(control.asyncio, "open_unix_connection", counting_open)

    async def scenario() -> None:
        release = asyncio.Event()
        async with _serving(tmp_path / "c.sock", release) as client:
            for i in range(50):
                assert await client.request("echo", {"i": i}) == {"i": i}
            assert len(opened) == 1
            # A long request does not hold up a short one: the short one gets a connection
            # of its own, and both are kept for later.
            slow = asyncio.create_task(client.request("slow"))
            await asyncio.sleep(0.05)
            assert await client.request("echo", {"x": 1}) == {"x": 1}
            assert not slow.done()
            release.set()
            assert await slow == "slow done"
            assert len(opened) == 2
            with pytest.raises(ControlError, match="refused for the test"):
                await client.request("refuse")
            with pytest.raises(ControlError, match="unknown command"):
                await client.request("nope")
            assert await client.request("echo", {"y": 2}) == {"y": 2}
            assert len(opened) == 2

    asyncio.run(scenario())


def test_a_kept_connection_that_died_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _serving(tmp_path / "c.sock") as client:
            assert await client.request("echo", {"a": 1}) == {"a": 1}
            # The other end drops the connection while it sits idle (a restart, a crash).
            (_, writer), = client._idle  # noqa: SLF001 - the kept connection
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            assert await client.request("echo", {"a": 2}) == {"a": 2}
        with pytest.raises(OSError):  # nobody listening any more: the caller learns it
            await client.request("echo")

    asyncio.run(scenario())


def test_a_request_without_answer_times_out_and_its_connection_is_dropped(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _serving(tmp_path / "c.sock", asyncio.Event()) as client:
            with pytest.raises(ControlError, match="no answer within 0.2 s"):
                await client.request("slow", timeout=0.2)
            assert await client.request("echo", {"b": 1}) == {"b": 1}

    asyncio.run(scenario())
