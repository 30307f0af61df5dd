"""PF_KEY work of the IKE daemon, in lanes: in order within a lane, concurrently across lanes.

A Child SA install is five PF_KEY round trips, and the IKE answer that follows it must wait for
them (the peer uses the SA as soon as it has the answer). One queue for the whole daemon would
put those round trips of a thousand tunnels end to end; one lane per IKE SA keeps what must be
ordered in order (its installs, the answers that follow them, its deletes) and lets the others
proceed; what IKE SAs share (policies) is guarded by ``KeyedLocks``. ``limit`` bounds the jobs
in flight, and so the requests waiting in the PF_KEY socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]
DEFAULT_LIMIT = 64


class JobLanes:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._lanes: dict[Hashable, deque[Job]] = {}
        self._slots = asyncio.Semaphore(limit)
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, lane: Hashable, job: Job) -> None:
        self._pending += 1
        self._idle.clear()
        queue = self._lanes.get(lane)
        if queue is not None:  # its runner is on it
            queue.append(job)
            return
        self._lanes[lane] = deque((job,))
        task = asyncio.get_running_loop().create_task(self._run(lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, lane: Hashable) -> None:
        queue = self._lanes[lane]
        try:
            while queue:
                job = queue[0]
                try:
                    async with self._slots:
                        await job()
                except Exception:  # one job's failure must not stop its lane
                    log.exception("ike: PF_KEY job failed")
                finally:
                    queue.popleft()
                    self._done(1)
        finally:
            if self._lanes.get(lane) is queue:
                del self._lanes[lane]
                self._done(len(queue))  # cancelled: what was left will not run

    def _done(self, count: int) -> None:
        self._pending -= count
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    async def join(self) -> None:
        """Until every job put so far (and any put meanwhile) has run."""
        await self._idle.wait()

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class KeyedLocks:
    """One asyncio lock per key, alive while someone holds or waits for it: for state that
    jobs of several lanes share (policies installed once for every Child SA with the same
    selectors), where a check and the PF_KEY requests that follow must not interleave."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
