"""JobLanes: order within a lane, concurrency across lanes, a bound on jobs in flight, join;
KeyedLocks: exclusion per key only, and no lock left behind."""

from __future__ import annotations

import asyncio

import pytest

from ike.lanes import JobLanes, KeyedLocks


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_jobs_of_a_lane_run_in_order_and_lanes_run_alongside() -> None:
    async def main() -> None:
        lanes = JobLanes()
        seen: list[str] = []
        b_started = asyncio.Event()

        async def a1() -> None:
            await b_started.wait()  # only finishes if lane "b" runs meanwhile
            seen.append("a1")

        async def a2() -> None:
            seen.append("a2")

        async def b1() -> None:
            b_started.set()
            seen.append("b1")

        lanes.put("a", a1)
        lanes.put("a", a2)
        lanes.put("b", b1)
        assert lanes.pending == 3
        await lanes.join()
        assert seen == ["b1", "a1", "a2"] and lanes.pending == 0

    run(main())


def test_a_failing_job_does_not_stop_its_lane(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        lanes = JobLanes()
        seen: list[int] = []

        async def boom() -> None:
            raise RuntimeError("job bug")

        async def after() -> None:
            seen.append(1)

        lanes.put(1, boom)
        lanes.put(1, after)
        await lanes.join()
        assert seen == [1]

    run(main())
    assert "PF_KEY job failed" in caplog.text


def test_the_limit_bounds_jobs_in_flight_and_jobs_put_meanwhile_are_joined() -> None:
    async def main() -> None:
        lanes = JobLanes(limit=3)
        running = most = 0
        done: list[int] = []

        def job(i: int):  # type: ignore[no-untyped-def]
            async def body() -> None:
                nonlocal running, most
                running += 1
                most = max(most, running)
                await asyncio.sleep(0.001)
                running -= 1
                done.append(i)
                if i < 20:
                    lanes.put(i + 100, job(i + 100))  # work that makes more work
            return body

        for i in range(20):
            lanes.put(i, job(i))
        await lanes.join()
        assert most == 3 and len(done) == 40

    run(main())


def test_cancel_forgets_queued_jobs() -> None:
    async def main() -> None:
        lanes = JobLanes()
        ran: list[int] = []

        async def forever() -> None:
            await asyncio.sleep(3600)

        async def never() -> None:
            ran.append(1)

        lanes.put("x", forever)
        lanes.put("x", never)
        await asyncio.sleep(0)
        await lanes.cancel()
        await lanes.join()
        assert ran == [] and lanes.pending == 0

    run(main())


def test_keyed_locks_exclude_per_key_only_and_are_dropped_when_free() -> None:
    async def main() -> None:
        locks = KeyedLocks()
        inside: dict[str, int] = {"k": 0, "other": 0}
        most = {"k": 0, "other": 0}

        async def hold(key: str) -> None:
            async with locks.hold(key):
                inside[key] += 1
                most[key] = max(most[key], inside[key])
                await asyncio.sleep(0.001)
                inside[key] -= 1

        other_entered = asyncio.Event()

        async def slow_k() -> None:
            async with locks.hold("k"):
                await other_entered.wait()  # "other" must not wait for "k"

        async def other() -> None:
            async with locks.hold("other"):
                other_entered.set()

        await asyncio.gather(slow_k(), other(), *(hold("k") for _ in range(5)),
                             *(hold("other") for _ in range(5)))
        assert most == {"k": 1, "other": 1} and len(locks) == 0

    run(main())
