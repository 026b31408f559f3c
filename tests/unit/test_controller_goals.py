"""What the controller answers an agent ("what should be"), in the states where a wrong
answer makes an agent fence a server that must serve; and how it carries out the steps the
state machine decides (agents replaced by recording stubs)."""

import asyncio
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from xcha.controller.config import load_controller_config
from xcha.controller.controller import Controller
from xcha.controller.fsm import Action, Decision, Step
from xcha.controller.metrics import SAMPLE_SLICE, Completed, _ControllerCollector
from xcha.controller.routing import Router
from xcha.controller.status import ClusterSample
from xcha.controller.steps import BEST_EFFORT_FENCE_TIMEOUT, DETACH_TIMEOUT, FENCE_TIMEOUT
from xcha.controller.store import EventRecord, GroupRecord, Snapshot, SqliteLeadership, SqliteStore
from xcha.controller.views import GroupState
from xcha.errors import Refused
from xcha.v1 import xcha_pb2 as pb


def make_controller(tmp_path: Path, members: list[str]) -> Controller:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "controller.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:7000"
state_dir = "{tmp_path}/state"

[[datanode]]
name = "dn1"
members = {json.dumps(members)}

[tls]
insecure = true
""")
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path, SqliteLeadership(path))
    return Controller(
        load_controller_config(config), store, Snapshot(), Router("none", []), RecordingAgents()
    )


def put_group(controller: Controller, **changes: Any) -> None:
    """A group record as if it had been written: both the working and the durable copy."""
    record = replace(controller.groups["dn1"], **changes)
    controller.groups["dn1"] = controller.ledger.groups["dn1"] = record


async def durable_events(controller: Controller, datanode: str = "") -> list[EventRecord]:
    await controller.ledger.flush()
    return await controller.ledger.store.events(0, 100, datanode)


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    return make_controller(tmp_path, ["dn1a", "dn1b"])


def goal(controller: Controller, member: str) -> int:
    return controller.goal(controller.records[member]).goal


def test_the_master_is_told_master_and_the_others_wait_until_its_address_is_known(
    controller: Controller,
) -> None:
    put_group(controller, state=GroupState.PROTECTED, master="dn1a")
    assert goal(controller, "dn1a") == pb.GOAL_MASTER
    assert goal(controller, "dn1b") == pb.GOAL_WAIT


def test_a_switchover_target_is_the_master_from_its_promotion_on(controller: Controller) -> None:
    """Before the group record names it, a heartbeat of the just promoted target must not be
    answered "standby": its agent would fence it (measured in a switchover benchmark)."""
    put_group(controller, state=GroupState.SWITCHOVER, master="dn1a", candidate="dn1b")
    assert goal(controller, "dn1b") == pb.GOAL_MASTER
    assert goal(controller, "dn1a") == pb.GOAL_MASTER, "stopped cleanly by the switchover, not by itself"


def test_a_removed_member_is_told_so(controller: Controller) -> None:
    controller.records["dn1b"] = replace(controller.records["dn1b"], removed=True)
    assert goal(controller, "dn1b") == pb.GOAL_REMOVED


async def test_addresses_come_from_the_last_report_kept_in_the_member_record(controller: Controller) -> None:
    put_group(controller, state=GroupState.PROTECTED, master="dn1a")
    for sequence, port in ((1, 5432), (2, 5442)):
        status = pb.MemberStatus(
            member="dn1a",
            datanode="dn1",
            postgres=pb.Endpoint(host="10.0.0.1", port=port),
            agent_address="10.0.0.1:7001",
            boot_id="boot",
            sequence=sequence,
        )
        controller.observe("dn1a", status)
        reply = controller.goal(controller.records["dn1b"])
        assert reply.goal == pb.GOAL_STANDBY and reply.upstream_member == "dn1a"
        assert (reply.upstream.host, reply.upstream.port) == ("10.0.0.1", port)
    await controller.ledger.flush()
    members = (await controller.ledger.store.load()).members
    assert [(r.host, r.port, r.agent_address) for r in members if r.name == "dn1a"] == [
        ("10.0.0.1", 5442, "10.0.0.1:7001")
    ]
    controller._stub("dn1a")
    assert controller.agents.stubs["dn1a"]  # type: ignore[attr-defined]


# ---- carrying out steps, with recording agents ----------------------------------------------


@dataclass
class RecordingStub:
    """An agent's stub: answers at once and records (member, method, timeout)."""

    member: str
    calls: list[tuple[str, str, float]]

    def _status(self) -> pb.MemberStatus:
        return pb.MemberStatus(member=self.member, datanode="dn1", sequence=len(self.calls))

    async def GetStatus(self, request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus:
        self.calls.append((self.member, "GetStatus", timeout))
        return self._status()

    async def Fence(self, request: pb.FenceRequest, timeout: float) -> pb.RoleReply:
        self.calls.append((self.member, "Fence", timeout))
        return pb.RoleReply(status=self._status(), detail="fenced")

    async def Detach(self, request: pb.DetachRequest, timeout: float) -> pb.RoleReply:
        self.calls.append((self.member, "Detach", timeout))
        status = self._status()
        status.detached = True
        return pb.RoleReply(status=status, detail="detached")


@dataclass
class RecordingAgents:
    """The controller's `Agents`: a recording stub per member."""

    calls: list[tuple[str, str, float]] = field(default_factory=list)
    stubs: dict[str, RecordingStub] = field(default_factory=dict)

    def stub(self, member: str, address: str) -> RecordingStub:
        return self.stubs.setdefault(member, RecordingStub(member, self.calls))

    async def close(self) -> None:
        return None


def recording_agents(controller: Controller) -> list[tuple[str, str, float]]:
    assert isinstance(controller.agents, RecordingAgents)
    calls = controller.agents.calls
    for index, name in enumerate(controller.records):
        address = f"127.0.0.1:{7100 + index}"
        controller.records[name] = replace(controller.records[name], agent_address=address)
        controller.agents.stub(name, address)
    # Paused: the evaluations the answers cause decide nothing of their own.
    put_group(controller, state=GroupState.PROTECTED, master="dn1a", paused=True)
    return calls


async def test_a_detach_asks_each_standby_the_state_machine_named_once_in_one_task(tmp_path: Path) -> None:
    """One DETACH step per standby: one group task detaches exactly those, and their replies
    (final positions, `detached`) are observed like heartbeats."""
    controller = make_controller(tmp_path, ["dn1a", "dn1b", "dn1c", "dn1d"])
    calls = recording_agents(controller)
    steps = (Step(Action.DETACH, "dn1b"), Step(Action.DETACH, "dn1c"))
    decision = Decision(GroupState.PROTECTED, steps, "detaching the standbys")
    controller._apply(controller.view("dn1"), decision)
    task = controller.group_tasks["dn1"]
    assert len(controller._tasks) == 1
    await asyncio.wait_for(task, 5)
    assert sorted(calls) == [("dn1b", "Detach", DETACH_TIMEOUT), ("dn1c", "Detach", DETACH_TIMEOUT)]
    for name in ("dn1b", "dn1c"):
        status = controller.observations[name].status
        assert status is not None and status.member == name and status.detached
    assert controller.observations["dn1d"].status is None


async def test_the_fence_beside_a_promotion_is_best_effort_and_a_stray_master_fence_is_not(
    controller: Controller,
) -> None:
    calls = recording_agents(controller)
    best_effort = Decision(GroupState.PROTECTED, (Step(Action.FENCE, "dn1a", best_effort=True),), "promoting")
    controller._apply(controller.view("dn1"), best_effort)
    assert not controller.observations["dn1a"].busy, "the promotion does not wait for the old master"
    await asyncio.wait_for(asyncio.gather(*controller._tasks), 5)
    assert calls == [("dn1a", "Fence", BEST_EFFORT_FENCE_TIMEOUT)]
    calls.clear()
    stray = Decision(GroupState.PROTECTED, (Step(Action.FENCE, "dn1b"),), "dn1b accepts writes")
    controller._apply(controller.view("dn1"), stray)
    assert controller.observations["dn1b"].busy, "a member task: nothing else is sent to dn1b meanwhile"
    await asyncio.wait_for(asyncio.gather(*controller._tasks), 5)
    assert calls == [("dn1b", "Fence", FENCE_TIMEOUT)]
    assert not controller.observations["dn1b"].busy


async def test_a_failed_switchover_is_remembered_until_the_group_leaves_the_switchover(
    controller: Controller,
) -> None:
    put_group(controller, state=GroupState.SWITCHOVER, master="dn1a", candidate="dn1b")
    assert not controller.view("dn1").switchover_failed
    await controller._switchover_failed("dn1", "dn1b", "dn1b did not catch up")
    assert controller.groups["dn1"].reason == "switchover failed: dn1b did not catch up"
    assert controller.view("dn1").switchover_failed
    controller._apply(controller.view("dn1"), Decision(GroupState.SWITCHOVER, (), "still switching over"))
    assert controller.view("dn1").switchover_failed
    controller._apply(controller.view("dn1"), Decision(GroupState.SINGLE, (), "restarting dn1a"))
    assert not controller.groups["dn1"].switchover_failed
    await controller.ledger.flush()
    assert (await controller.ledger.store.load()).groups["dn1"] == controller.groups["dn1"]


async def test_a_scrape_from_another_thread_reads_the_controller_on_its_event_loop(
    controller: Controller,
) -> None:
    """prometheus_client scrapes on its HTTP thread; the controller's dicts change size on the
    event loop meanwhile, so the collector asks the loop for the groups, a slice at a time."""
    readers: list[tuple[int, int]] = []
    sample = controller.sample

    def recording_sample(start: int, count: int) -> ClusterSample:
        readers.append((threading.get_ident(), start))
        return sample(start, count)

    for index in range(2, 2 * SAMPLE_SLICE + 2):  # three slices
        controller.groups[f"dn{index}"] = GroupRecord(f"dn{index}")
    completed = Completed(failovers={"dn1": 2}, last_failover={"dn1": {"reroute": 0.5}})
    collector = _ControllerCollector(recording_sample, completed, asyncio.get_running_loop())
    for families in (
        await asyncio.to_thread(lambda: list(collector.collect())),  # the HTTP thread
        list(collector.collect()),  # on the loop itself: no waiting for itself
    ):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
        assert samples[("xcha_group_state", (("datanode", "dn1"), ("state", "initializing")))] == 1.0
        assert len([key for key in samples if key[0] == "xcha_group_state"]) == 2 * SAMPLE_SLICE + 1
        assert (
            samples[("xcha_member_role", (("datanode", "dn1"), ("member", "dn1a"), ("role", "stopped")))] == 1
        )
        assert samples[("xcha_failovers_total", (("datanode", "dn1"),))] == 2.0
        assert samples[("xcha_last_failover_seconds", (("datanode", "dn1"), ("phase", "reroute")))] == 0.5
        assert samples[("xcha_epoch", ())] == controller.epoch
    slices = [(threading.get_ident(), start) for start in (0, SAMPLE_SLICE, 2 * SAMPLE_SLICE)]
    assert readers == slices * 2


def report(controller: Controller, member: str, epoch: int) -> None:
    """What observe() keeps of a heartbeat (without evaluating the group)."""
    controller.observations[member].status = pb.MemberStatus(datanode="dn1", member=member, epoch=epoch)


def test_after_a_start_nothing_is_judged_until_every_member_reported_at_its_epoch(tmp_path: Path) -> None:
    """A clean restart of the deployment: agents come back one by one, each first with the
    epoch it had. Silence or a persisted state proves nothing until all of them answered at
    the new epoch; a member that never does holds the grace for startup_grace at most
    (failure_timeout by default)."""
    now = [100.0]
    for directory in ("all", "one_silent"):
        controller = make_controller(tmp_path / directory, ["dn1a", "dn1b"])
        controller.clock = lambda: now[0]
        controller.started = now[0]
        epoch = controller.epoch
        assert controller.view("dn1").in_grace
        report(controller, "dn1a", epoch)
        if directory == "all":
            report(controller, "dn1b", epoch - 1)
            assert controller.view("dn1").in_grace, "dn1b has not reported at this epoch yet"
            report(controller, "dn1b", epoch)
            assert not controller.view("dn1").in_grace
            report(controller, "dn1b", epoch - 1)
            assert not controller.view("dn1").in_grace, "once over, the grace does not come back"
        else:
            now[0] += 1.9
            assert controller.view("dn1").in_grace, "dn1b not heard from: still learning"
            now[0] += 0.2
            assert not controller.view("dn1").in_grace, "startup_grace has passed"


async def test_a_reply_in_another_members_name_is_refused(tmp_path: Path) -> None:
    """An agent that reported another agent's address would answer node-role messages and
    status requests meant for that member: the reply must name the member asked."""
    controller = make_controller(tmp_path, ["dn1a", "dn1b"])
    calls = recording_agents(controller)
    controller.agents.stubs["dn1b"].member = "dn1a"  # type: ignore[attr-defined]
    with pytest.raises(Refused, match="answered as dn1/dn1a, not dn1/dn1b"):
        await controller._get_status("dn1b", 1.0, "test")
    assert controller.observations["dn1b"].status is None
    assert await controller._fence("dn1b", "test") is None
    assert controller.observations["dn1a"].status is None, "nothing observed in dn1a's name either"
    assert [call[1] for call in calls] == ["GetStatus", "Fence"]
    assert any("answered as dn1/dn1a" in e.message for e in await durable_events(controller))


async def test_a_switchover_whose_promote_reply_was_lost_never_restarts_the_old_master(
    tmp_path: Path,
) -> None:
    """The target promoted but its reply was lost (found by the simulator: the old master was
    restarted at the same epoch, two masters). Until the target says it is a standby, the
    switchover stalls instead of failing; then it fails and the old master may restart."""
    controller = make_controller(tmp_path, ["dn1a", "dn1b"])
    recording_agents(controller)
    controller.groups["dn1"] = replace(
        controller.groups["dn1"],
        state=GroupState.SWITCHOVER,
        master="dn1a",
        candidate="dn1b",
        promote_sent=True,
    )
    stub = controller.agents.stubs["dn1b"]  # type: ignore[attr-defined]

    async def unreachable(request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus:
        raise Refused("connection reset")

    stub.GetStatus = unreachable
    await controller._switchover_failed("dn1", "dn1b", "dn1b did not become master")
    assert not controller.groups["dn1"].switchover_failed
    assert "switchover stalled" in (await durable_events(controller, "dn1"))[-1].message

    async def standby(request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus:
        status = pb.MemberStatus(member="dn1b", datanode="dn1", sequence=99)
        status.postgres_status.role = pb.ROLE_STANDBY
        return status

    stub.GetStatus = standby
    await controller._switchover_failed("dn1", "dn1b", "dn1b did not become master")
    assert controller.groups["dn1"].switchover_failed
    controller._apply(controller.view("dn1"), Decision(GroupState.SINGLE, (), "restarting dn1a"))
    assert not controller.groups["dn1"].promote_sent


async def test_a_switchover_stops_waiting_for_a_target_whose_postgresql_does_not_run(
    tmp_path: Path,
) -> None:
    """A target whose agent, idle, says PostgreSQL does not run receives nothing until
    something starts it: the switchover stops waiting at once (not after 30 s) and the state
    machine, which sees that a Promote went out (view.promote_sent), decides what starts."""
    controller = make_controller(tmp_path, ["dn1a", "dn1b"])
    recording_agents(controller)
    put_group(controller, promote_sent=True)  # (the evaluations the answers cause stay paused)
    assert controller.view("dn1").promote_sent
    asked = []

    async def stopped(request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus:
        asked.append(request)
        return pb.MemberStatus(member="dn1b", datanode="dn1", sequence=len(asked), activity="idle")

    controller.agents.stubs["dn1b"].GetStatus = stopped  # type: ignore[attr-defined]
    assert not await controller._reaches("dn1b", 100, 30)
    assert len(asked) == 1


async def test_a_tick_evaluates_a_group_when_time_can_change_its_decision(tmp_path: Path) -> None:
    """A member silent for less than failure_timeout decides nothing yet: its group is evaluated
    by the once-a-second sweep only (at scale, a busy controller that delays heartbeats must not
    then evaluate all of their groups at every tick); from failure_timeout minus one tick of
    silence on, and while a failure is under way, at every tick."""
    now = [100.0]
    controller = make_controller(tmp_path, ["dn1a", "dn1b"])
    controller.clock = lambda: now[0]
    put_group(controller, state=GroupState.PROTECTED, master="dn1a")
    evaluated: list[float] = []
    controller.evaluate = lambda datanode: evaluated.append(now[0]) or ""  # type: ignore[method-assign]
    controller._probe = lambda member: asyncio.sleep(0)  # type: ignore[method-assign,assignment,return-value]
    ticks = round(1.0 / controller.config.tick_interval)
    for observation in controller.observations.values():
        observation.received_at = observation.last_heard = now[0]
    for silent in (0.1, 1.0):  # late, but far from failure_timeout
        evaluated.clear()
        now[0] = 100.0 + silent
        for _ in range(ticks):
            controller.tick()
        assert len(evaluated) == 1, f"silent {silent} s: the sweep only, once a second"
    evaluated.clear()
    now[0] = 100.0 + controller.config.failure_timeout - controller.config.tick_interval / 2
    for _ in range(3):
        controller.tick()
    assert len(evaluated) == 3, "about to be judged silent: every tick"
    for observation in controller.observations.values():
        observation.received_at = observation.last_heard = now[0]
    controller.failures["dn1"] = (now[0], 0.0)
    evaluated.clear()
    for _ in range(3):
        controller.tick()
    assert len(evaluated) == 3, "a failure under way: every tick"
    await asyncio.sleep(0)
