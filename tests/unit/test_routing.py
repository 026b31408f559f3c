"""Router: a reroute is a barrier over every coordinator; one that fails is retried with
backoff until it acknowledges, never skipped. An operator's command the barrier gives up on
is never left running."""

import asyncio
import importlib
import os
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xcha.config import TlsConfig
from xcha.controller import routers
from xcha.controller.config import ControllerConfig, DatanodeConfig
from xcha.controller.routers import build_router, command, fdw, pgxc
from xcha.controller.routers.base import CoordinatorConfig, RouterConfig
from xcha.controller.routers.command import CommandTarget
from xcha.controller.routers.process import run_command
from xcha.controller.routing import Barrier, Router, Target
from xcha.controller.views import SyncFailurePolicy
from xcha.names import Endpoint
from xcha.pg.syncrep import SyncPolicy

NEW = Endpoint("10.0.0.2", 5433)
OLD = Endpoint("10.0.0.1", 5432)

Event = tuple[str, str, str, dict[str, object]]


@dataclass
class RecordingTarget:
    """Records what it is asked; fails while `failing` is set."""

    name: str
    calls: list[tuple[str, Endpoint, Endpoint | None, int]] = field(default_factory=list)
    failing: bool = False
    attempt_timeout: float = 5.0

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        self.calls.append((datanode, new, old, epoch))
        if self.failing:
            raise ConnectionError(f"{self.name} is unreachable")
        return f"{datanode} -> {new}"

    async def close(self) -> None:
        return None


def make_router(*targets: Target) -> tuple[Router, list[Event]]:
    router = Router("test", list(targets), retry_initial=0.01, retry_max=0.05)
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
    attempt_timeout: float = 5.0

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
    attempt_timeout: float
    calls: int = 0

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(3600)
        return "done"

    async def close(self) -> None:
        return None


async def test_a_target_that_does_not_answer_times_out_and_is_retried() -> None:
    target = HangingTarget("co1", attempt_timeout=0.05)
    router, events = make_router(target)
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


# ---- an operator's command is never left running --------------------------------------------


def sleeper(directory: Path) -> tuple[Path, Path]:
    """A script that records its pid and the pid of the sleep it starts, then waits for it."""
    pids = directory / "pids"
    script = directory / "sleeper.sh"
    script.write_text(f"#!/bin/sh\necho $$ >> '{pids}'\nsleep 60 &\necho $! >> '{pids}'\nwait\n")
    script.chmod(0o755)
    return script, pids


def recorded(pids: Path) -> list[int]:
    return [int(line) for line in pids.read_text().split()] if pids.exists() else []


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def none_alive(pids: list[int]) -> None:
    await until(lambda: not any(alive(pid) for pid in pids), timeout=2.0)


async def test_a_command_that_times_out_is_killed_with_its_children(tmp_path: Path) -> None:
    script, pids = sleeper(tmp_path)
    with pytest.raises(RuntimeError, match=r"sleeper\.sh did not finish within 1 s"):
        await run_command([str(script)], 1.0)
    started = recorded(pids)
    assert len(started) == 2 and os.getpid() not in started
    await none_alive(started)


async def test_a_cancelled_command_is_killed_with_its_children(tmp_path: Path) -> None:
    script, pids = sleeper(tmp_path)
    task = asyncio.create_task(run_command([str(script)], 30))
    try:
        await until(lambda: len(recorded(pids)) == 2)
        assert all(alive(pid) for pid in recorded(pids))
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    await none_alive(recorded(pids))


def children() -> set[int]:
    me = os.getpid()
    return {int(pid) for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split()}


async def test_a_command_cancelled_while_it_starts_is_killed_with_its_children(tmp_path: Path) -> None:
    """Cancelled before its start completed (the barrier's timeout on a loaded machine), asyncio
    kills the child alone and waits for the sleep it started to end (60 s)."""
    script, pids = sleeper(tmp_path)
    before = children()
    task = asyncio.create_task(run_command([str(script)], 30))
    try:
        for _ in range(1000):  # until forked: its pipes are connected only in a later iteration
            await asyncio.sleep(0)
            if children() - before:
                break
        time.sleep(1.0)  # holds the event loop while the script starts its sleep
        started = recorded(pids)
    finally:
        # Only this task: cancelling asyncio's own pipe-connecting task would hang the loop.
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    assert len(started) == 2
    await none_alive(started)


async def test_a_command_the_barrier_gives_up_on_is_not_left_running(tmp_path: Path) -> None:
    """The barrier's own timeout (attempt_timeout) cancels the attempt; the command router used
    to kill its child only on its own timeout, so every attempt left one running."""
    script, pids = sleeper(tmp_path)
    target = CommandTarget((str(script),), 0.2)
    router, events = make_router(target)
    task = asyncio.create_task(router.reroute("dn1", NEW, OLD, 1))
    try:
        await until(lambda: len(recorded(pids)) >= 6, timeout=10.0)  # a third attempt started
        first_two = recorded(pids)[:4]
        await none_alive(first_two)
        assert router.barriers["dn1"].targets[target.name].attempts >= 3
        assert events and events[0][1] == "reroute_retry"
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    await none_alive(recorded(pids))


async def test_a_command_acknowledges_with_its_last_line_and_fails_with_its_output(tmp_path: Path) -> None:
    script = tmp_path / "repoint.sh"
    script.write_text(
        '#!/bin/sh\necho "$XCHA_DATANODE $XCHA_OLD_PORT -> $XCHA_NEW_HOST:$XCHA_NEW_PORT"\n'
        'echo warned >&2\nexit "$XCHA_EPOCH"\n'
    )
    script.chmod(0o755)
    target = CommandTarget((str(script),), 5.0)
    assert target.name == "repoint.sh" and target.attempt_timeout == 5.0
    assert await target.apply("dn1", NEW, OLD, 0) == f"{script} acknowledged: warned"
    with pytest.raises(RuntimeError, match=r"exited 3: dn1  -> 10\.0\.0\.2:5433\nwarned"):
        await target.apply("dn1", NEW, None, 3)


# ---- the kinds ----------------------------------------------------------------------------------


def test_every_router_module_with_a_kind_is_registered() -> None:
    """A new kind is one module: it must be in the registry, under its own name."""
    declared = {}
    for info in pkgutil.iter_modules(routers.__path__):
        module = importlib.import_module(f"{routers.__name__}.{info.name}")
        if hasattr(module, "KIND"):
            declared[module.KIND] = module
    assert declared == routers.KINDS
    assert list(routers.KINDS) == ["none", "fdw", "pgxc", "takeover", "command"]


def controller_config(router: RouterConfig) -> ControllerConfig:
    datanodes = tuple(
        DatanodeConfig(name, (f"{name}a", f"{name}b"), SyncPolicy(), SyncFailurePolicy.AVAILABLE, False, ())
        for name in ("dn1", "dn2")
    )
    return ControllerConfig(
        listen="127.0.0.1:0",
        state_dir=Path("/nonexistent"),
        heartbeat_interval=0.25,
        failure_timeout=2.0,
        probe_timeout=0.5,
        startup_grace=2.0,
        tick_interval=0.05,
        metrics_listen=None,
        log_format="text",
        datanodes=datanodes,
        router=router,
        tls=TlsConfig(insecure=True),
    )


async def test_each_kind_builds_its_targets_and_bounds_their_attempts() -> None:
    coordinators = (CoordinatorConfig("co1", "host=x"), CoordinatorConfig("co2", "host=y"))
    for kind in ("none", "takeover"):
        router = build_router(controller_config(RouterConfig(kind)))
        assert (router.kind, router.targets) == (kind, [])
    router = build_router(controller_config(RouterConfig("fdw", 0.2, 3.0, 2.0, fdw.Settings(coordinators))))
    assert (router.retry_initial, router.retry_max) == (0.2, 3.0)
    assert [(t.name, t.attempt_timeout) for t in router.targets] == [("co1", 6.0), ("co2", 6.0)]
    settings = pgxc.Settings(coordinators, "xl", True, ("pgxc_clean", "-a"))
    router = build_router(controller_config(RouterConfig("pgxc", timeout=2.0, settings=settings)))
    first, second = router.targets
    assert isinstance(first, pgxc.PgxcTarget) and isinstance(second, pgxc.PgxcTarget)
    assert (first.name, first.first, first.datanodes, first.clean_command) == (
        "co1",
        True,
        ("dn1", "dn2"),
        ("pgxc_clean", "-a"),
    )
    assert (second.name, second.first) == ("co2", False)
    # Every statement may take the timeout; the first XL coordinator also re-points each
    # datanode (2 statements) and runs the in-doubt cleanup (its attempts, their pauses).
    assert second.attempt_timeout == 6 * 2.0
    cleanup = pgxc.CLEAN_ATTEMPTS * pgxc.CLEAN_TIMEOUT + (pgxc.CLEAN_ATTEMPTS - 1) * pgxc.CLEAN_RETRY
    assert first.attempt_timeout == (6 + 2 * 2) * 2.0 + cleanup
    router = build_router(
        controller_config(RouterConfig("command", timeout=2.0, settings=command.Settings(("/bin/true",))))
    )
    assert [(t.name, t.attempt_timeout) for t in router.targets] == [("true", 2.0)]
    await router.close()
