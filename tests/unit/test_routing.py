"""Router: a reroute is a barrier over every coordinator; one that fails is retried with
backoff until it acknowledges, never skipped."""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from xcha.controller.routing import Barrier, RecordingTarget, Router
from xcha.names import Endpoint

NEW = Endpoint("10.0.0.2", 5433)
OLD = Endpoint("10.0.0.1", 5432)

Event = tuple[str, str, str, dict[str, object]]


def make_router(*targets: object, timeout: float = 5.0) -> tuple[Router, list[Event]]:
    router = Router("test", list(targets), retry_initial=0.01, retry_max=0.05, timeout=timeout)  # type: ignore[arg-type]
    events: list[Event] = []
    router.on_event = lambda datanode, kind, message, details: events.append(
        (datanode, kind, message, details)
    )
    return router, events


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_reroute_completes_when_every_target_acknowledged() -> None:
    co1, co2 = RecordingTarget("co1"), RecordingTarget("co2")
    router, events = make_router(co1, co2)
    barrier = await asyncio.wait_for(router.reroute("dn1", NEW, OLD, 4), 2)
    assert isinstance(barrier, Barrier)
    assert (barrier.datanode, barrier.epoch, barrier.new) == ("dn1", 4, NEW)
    assert co1.calls == co2.calls == [("dn1", NEW, OLD, 4)]
    assert barrier.pending == [] and router.pending("dn1") == []
    for name in ("co1", "co2"):
        progress = barrier.targets[name]
        assert progress.acknowledged and progress.attempts == 1 and progress.last_error == ""
        assert progress.detail == f"dn1 -> {NEW}"
    assert events == []  # acknowledged at once: nothing to report


async def test_a_failing_target_holds_the_barrier_and_is_retried_not_skipped() -> None:
    co1, co2 = RecordingTarget("co1"), RecordingTarget("co2", failing=True)
    router, events = make_router(co1, co2)
    task = asyncio.create_task(router.reroute("dn1", NEW, None, 2))
    try:
        await until(lambda: len(co2.calls) >= 4)
        assert not task.done()
        assert [p.split()[0] for p in router.pending("dn1")] == ["co2"]
        assert len(co1.calls) == 1  # acknowledged once, not asked again
        progress = router.barriers["dn1"].targets["co2"]
        assert not progress.acknowledged
        assert progress.last_error == "co2 is unreachable"
        assert all(call == ("dn1", NEW, None, 2) for call in co2.calls)

        co2.failing = False
        barrier = await asyncio.wait_for(task, 2)
    finally:
        task.cancel()
    assert barrier.pending == [] and router.pending("dn1") == []
    assert barrier.targets["co2"].acknowledged
    assert barrier.targets["co2"].attempts == len(co2.calls) >= 5
    assert co2.calls[-1] == ("dn1", NEW, None, 2)

    # One retry event (the error did not change) and one late acknowledgement, both for co2.
    assert [(datanode, kind) for datanode, kind, _, _ in events] == [
        ("dn1", "reroute_retry"),
        ("dn1", "reroute_ack"),
    ]
    retry, ack = events
    assert retry[3] == {"coordinator": "co2", "attempt": 1}
    assert "co2" in retry[2] and "co2 is unreachable" in retry[2]
    assert ack[3] == {"coordinator": "co2"}
    assert f"after {len(co2.calls)} attempts" in ack[2]


@dataclass
class TimedTarget:
    """Fails `failures` times, recording when it was asked."""

    name: str
    failures: int
    times: list[float] = field(default_factory=list)

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        self.times.append(time.monotonic())
        if len(self.times) <= self.failures:
            raise ConnectionError(f"attempt {len(self.times)} failed")
        return "done"

    async def close(self) -> None:
        return None


async def test_retries_back_off_up_to_retry_max() -> None:
    target = TimedTarget("co1", failures=7)
    router, events = make_router(target)
    barrier = await asyncio.wait_for(router.reroute("dn1", NEW, OLD, 1), 5)
    assert barrier.targets["co1"].attempts == 8
    gaps = [later - earlier for earlier, later in zip(target.times, target.times[1:], strict=False)]
    expected = [0.01, 0.02, 0.04, 0.05, 0.05, 0.05, 0.05]
    assert len(gaps) == len(expected)
    for gap, delay in zip(gaps, expected, strict=True):
        assert gap >= delay * 0.9
    # Without the cap the last delays would be 0.32 s and 0.64 s.
    assert max(gaps[-2:]) < 0.3
    # A new message each time: every failure is reported, then the acknowledgement.
    assert [kind for _, kind, _, _ in events] == ["reroute_retry"] * 7 + ["reroute_ack"]
    assert [details["attempt"] for _, kind, _, details in events if kind == "reroute_retry"] == list(
        range(1, 8)
    )


@dataclass
class HangingTarget:
    """Never answers the first time; answers afterwards."""

    name: str
    calls: int = 0

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(3600)
        return "done"

    async def close(self) -> None:
        return None


async def test_a_target_that_does_not_answer_times_out_and_is_retried() -> None:
    target = HangingTarget("co1")
    router, events = make_router(target, timeout=0.05)
    barrier = await asyncio.wait_for(router.reroute("dn1", NEW, OLD, 1), 2)
    assert target.calls == 2 and barrier.targets["co1"].acknowledged
    assert [kind for _, kind, _, _ in events] == ["reroute_retry", "reroute_ack"]
    assert barrier.targets["co1"].last_error == "TimeoutError"


async def test_zero_targets_complete_immediately() -> None:
    router, events = make_router()
    barrier = await asyncio.wait_for(router.reroute("dn1", NEW, OLD, 1), 1)
    assert barrier.targets == {} and barrier.pending == []
    assert router.pending("dn1") == []
    assert events == []


async def test_cancelling_the_reroute_stops_retrying() -> None:
    co1 = RecordingTarget("co1", failing=True)
    router, _ = make_router(co1)
    task = asyncio.create_task(router.reroute("dn1", NEW, OLD, 3))
    await until(lambda: len(co1.calls) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    asked = len(co1.calls)
    await asyncio.sleep(0.3)  # several retry_max periods
    assert len(co1.calls) == asked
    assert [p.split()[0] for p in router.pending("dn1")] == ["co1"]  # never acknowledged


async def test_pending_for_an_unknown_datanode_is_empty() -> None:
    router, _ = make_router(RecordingTarget("co1"))
    assert router.pending("dn9") == []


async def test_a_new_reroute_replaces_the_barrier_of_its_datanode() -> None:
    co1 = RecordingTarget("co1")
    router, _ = make_router(co1)
    first = await router.reroute("dn1", OLD, None, 1)
    second = await router.reroute("dn1", NEW, OLD, 2)
    assert router.barriers["dn1"] is second and second is not first
    assert co1.calls == [("dn1", OLD, None, 1), ("dn1", NEW, OLD, 2)]
