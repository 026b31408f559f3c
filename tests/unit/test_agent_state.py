"""The agent's state file (atomic, durable) and its epoch rule: refuse older epochs and
messages for another member, persist a newer epoch before acting on it."""

import asyncio
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

import xcha.agent.main
import xcha.cli
from xcha.agent.agent import Agent
from xcha.agent.config import load_agent_config
from xcha.agent.service import AgentService
from xcha.agent.state import AgentState, StateFile
from xcha.errors import AgentFailed, InvalidInput, PostgresError, StaleEpoch, XchaError
from xcha.names import Endpoint
from xcha.pg.instance import PostgresInstance, Timings
from xcha.pg.runner import OsUser, Runner
from xcha.pg.status import Downstream, PgStatus
from xcha.rpc import ROLE_NAMES, ROLES, status_from_proto, status_to_proto
from xcha.v1 import xcha_pb2 as pb

# ---- StateFile -----------------------------------------------------------------------------


def test_a_missing_state_file_is_the_initial_state(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "agent.json").load() == AgentState()
    assert AgentState() == AgentState(0, False, False, None, "", "", 0)


def test_state_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agent.json"  # the directory is created on save
    state = AgentState(
        epoch=12,
        fenced=True,
        removed=False,
        port=5544,
        role="standby",
        upstream_host="10.0.0.1",
        upstream_port=5432,
    )
    StateFile(path).save(state)
    assert StateFile(path).load() == state
    assert json.loads(path.read_text())["epoch"] == 12


def test_save_replaces_atomically_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    state_file = StateFile(path)
    state_file.save(AgentState(epoch=1))
    state_file.save(AgentState(epoch=2, role="master"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.json"]
    assert state_file.load() == AgentState(epoch=2, role="master")


def test_but_changes_only_the_given_fields() -> None:
    state = AgentState(epoch=3, role="master")
    changed = state.but(fenced=True)
    assert changed == AgentState(epoch=3, role="master", fenced=True)
    assert state.fenced is False  # frozen: the original is untouched


def test_unknown_keys_in_the_file_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"epoch": 4, "from_a_newer_version": True}))
    assert StateFile(path).load() == AgentState(epoch=4)


@pytest.mark.parametrize("content", ["{not json", "", '{"epoch": 1'])
def test_an_unreadable_state_file_names_its_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "agent.json"
    path.write_text(content)
    with pytest.raises(XchaError, match="unreadable") as caught:
        StateFile(path).load()
    assert str(path) in str(caught.value)


def test_a_directory_in_place_of_the_state_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.mkdir()
    with pytest.raises(XchaError) as caught:
        StateFile(path).load()
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", ["[]", "null", "7"])
def test_json_that_is_not_an_object_is_unreadable(tmp_path: Path, content: str) -> None:
    path = tmp_path / "agent.json"
    path.write_text(content)
    with pytest.raises(XchaError) as caught:
        StateFile(path).load()
    assert str(path) in str(caught.value)


# ---- the agent's epoch rule ----------------------------------------------------------------------


def write_config(tmp_path: Path, listen: str = "127.0.0.1:7001") -> Path:
    password = tmp_path / "replication.password"
    password.write_text("secret\n")
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f"""\
[agent]
datanode = "dn1"
member = "dn1a"
listen = "{listen}"
advertise = "127.0.0.1:7001"
controller = "127.0.0.1:7000"
state_dir = "{tmp_path}/state"

[postgres]
archive_dir = "{tmp_path}/archive"
replication_password_file = "{password}"
socket_dir = "/tmp"

[tls]
insecure = true
"""
    )
    return config_path


def build_agent(tmp_path: Path, state: AgentState | None = None, listen: str = "127.0.0.1:7001") -> Agent:
    config = load_agent_config(write_config(tmp_path, listen))
    runner = Runner(Path("/usr/lib/postgresql/15/bin"), OsUser.for_postgres())
    instance = PostgresInstance(config.postgres.instance_spec(config.member), runner, 150000)
    state_file = StateFile(tmp_path / "state" / "agent.json")
    if state is not None:
        state_file.save(state)
    return Agent(config, instance, state_file)


async def test_the_agent_loads_its_state_file(tmp_path: Path) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, port=6543, role="standby"))
    assert agent.state == AgentState(epoch=5, port=6543, role="standby")
    assert agent.instance.port == 6543  # a port taken over earlier is kept


async def test_an_older_epoch_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, role="master"))
    before = agent.state_file.path.read_bytes()
    with pytest.raises(StaleEpoch, match="epoch 4 is older than epoch 5"):
        agent.accept_epoch(4, "dn1a")
    assert agent.state == AgentState(epoch=5, role="master")
    assert agent.state_file.path.read_bytes() == before


async def test_a_newer_epoch_is_persisted_before_returning(tmp_path: Path) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, fenced=True))
    agent.accept_epoch(8, "dn1a")
    assert agent.state == AgentState(epoch=8, fenced=True)
    assert StateFile(agent.state_file.path).load() == AgentState(epoch=8, fenced=True)
    with pytest.raises(StaleEpoch):
        agent.accept_epoch(7, "dn1a")


async def test_a_newer_epoch_is_persisted_from_the_initial_state(tmp_path: Path) -> None:
    agent = build_agent(tmp_path)
    assert agent.state.epoch == 0 and not agent.state_file.path.exists()
    agent.accept_epoch(1, "dn1a")
    assert StateFile(agent.state_file.path).load().epoch == 1


async def test_the_epoch_is_written_before_accept_epoch_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=2))
    saved: list[AgentState] = []
    real_save = agent.state_file.save

    def save(state: AgentState) -> None:
        real_save(state)
        saved.append(StateFile(agent.state_file.path).load())

    monkeypatch.setattr(agent.state_file, "save", save)
    agent.accept_epoch(3, "dn1a")
    assert saved == [AgentState(epoch=3)]


async def test_an_equal_epoch_is_accepted(tmp_path: Path) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5))
    before = agent.state_file.path.stat().st_mtime_ns
    agent.accept_epoch(5, "dn1a")
    assert agent.state.epoch == 5
    assert StateFile(agent.state_file.path).load().epoch == 5
    assert agent.state_file.path.stat().st_mtime_ns == before  # nothing new to write


@pytest.mark.parametrize("epoch", [4, 5, 6])
async def test_a_message_for_another_member_is_refused(tmp_path: Path, epoch: int) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5))
    before = agent.state_file.path.read_bytes()
    with pytest.raises(InvalidInput, match="this is the agent of dn1a, not of 'dn1b'"):
        agent.accept_epoch(epoch, "dn1b")
    assert agent.state.epoch == 5
    assert agent.state_file.path.read_bytes() == before


async def test_an_epoch_that_could_not_be_saved_is_not_taken_as_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5))
    real_save = agent.state_file.save

    def full_disk(state: AgentState) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(agent.state_file, "save", full_disk)
    with pytest.raises(OSError):
        agent.accept_epoch(6, "dn1a")
    monkeypatch.setattr(agent.state_file, "save", real_save)
    agent.accept_epoch(6, "dn1a")  # the controller retries: this time it must be written
    assert StateFile(agent.state_file.path).load().epoch == 6


async def test_a_current_epoch_message_is_refused_after_losing_contact_with_the_controller(
    tmp_path: Path,
) -> None:
    """After a stall (SIGSTOP of the host) a queued message may be stale: the agent hears the
    controller first. A newer epoch is taken at once: it comes from whoever acts now."""
    agent = build_agent(tmp_path, AgentState(epoch=5))
    agent.failure_timeout = 2.0
    agent.controller_ok_at = time.monotonic() - 1.0
    agent.accept_epoch(5, "dn1a")
    agent.controller_ok_at = time.monotonic() - 2.5
    agent._started = time.monotonic() - 10
    with pytest.raises(StaleEpoch, match="out of contact with the controller"):
        agent.accept_epoch(5, "dn1a")
    agent.accept_epoch(6, "dn1a")
    assert agent.state.epoch == 6


# ---- what the agent makes of its PostgreSQL ------------------------------------------------------


class FakePostgres:
    """Stands in for the instance's process and SQL: a postmaster PID, a status query that
    answers or fails, and a record of what the agent did to the server."""

    def __init__(self, agent: Agent, monkeypatch: pytest.MonkeyPatch, pid: int = 4321) -> None:
        self.agent = agent
        self.pid: int | None = pid
        self.answer: PgStatus | Exception = TimeoutError("no answer within 2.00 s")
        self.calls: list[str] = []
        self.fenced_when_killed: list[bool] = []
        instance = agent.instance
        monkeypatch.setattr(instance, "postmaster_pid", lambda: self.pid)
        monkeypatch.setattr(instance, "has_cluster", lambda: True)
        monkeypatch.setattr(instance, "status", self.status)
        monkeypatch.setattr(instance, "kill", self.kill)
        monkeypatch.setattr(instance, "promote", self.promote)
        monkeypatch.setattr(agent, "_watch_pid", lambda pid: None)

    async def status(self, timeout: float = 2, pid: int | None = None) -> PgStatus:
        assert pid == self.pid, "the agent passes the PID it has just looked up"
        self.calls.append("status")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def kill(self) -> None:
        self.calls.append("kill")
        self.fenced_when_killed.append(self.agent.state.fenced)
        self.pid = None

    async def promote(self, timeout: float = 30) -> float:
        self.calls.append("promote")
        return 0.01


SYNC_NAMES = "FIRST 1 (dn1b)"


def master_picture(pid: int, reply_age: float, taken_at: float) -> PgStatus:
    return PgStatus(
        running=True,
        postmaster_pid=pid,
        in_recovery=False,
        downstreams=(Downstream("dn1b", "streaming", "sync", 1, 1, reply_age),),
        synchronous_standby_names=SYNC_NAMES,
        taken_at=taken_at,
    )


def test_the_role_of_a_running_server_not_known_to_be_in_recovery_or_not_is_unknown() -> None:
    assert PgStatus(running=False).role == "stopped"
    assert PgStatus(running=True, in_recovery=True).role == "standby"
    assert PgStatus(running=True, in_recovery=False).role == "master"
    assert PgStatus(running=True).role == "unknown"


@pytest.mark.parametrize(
    ("status", "role"),
    [
        (PgStatus(running=True, in_recovery=False), pb.ROLE_MASTER),
        (PgStatus(running=True, in_recovery=True), pb.ROLE_STANDBY),
        (PgStatus(running=False), pb.ROLE_STOPPED),
        (PgStatus(running=True), pb.ROLE_UNSPECIFIED),
    ],
)
def test_the_role_travels_both_ways(status: PgStatus, role: int) -> None:
    message = status_to_proto(status)
    assert message.role == role
    assert ROLE_NAMES[message.role] == status.role and ROLES[status.role] == role
    back = status_from_proto(message)
    assert (back.running, back.in_recovery, back.role) == (status.running, status.in_recovery, status.role)


async def test_a_server_that_has_not_answered_since_the_agent_started_has_an_unknown_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby in crash recovery when its agent restarts does not answer: it is no master."""
    agent = build_agent(tmp_path, AgentState(epoch=5, role="standby"))
    FakePostgres(agent, monkeypatch)
    status = await agent.refresh()
    assert (status.running, status.postmaster_pid, status.in_recovery) == (True, 4321, None)
    assert status.role == "unknown"
    assert agent.last_error == "status query failed: no answer within 2.00 s"
    report = agent.member_status().postgres_status
    assert report.running and report.role == pb.ROLE_UNSPECIFIED
    assert status_from_proto(report).in_recovery is None  # nor does the controller take it for one


async def test_the_last_picture_is_kept_only_for_the_same_postmaster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path)
    fake = FakePostgres(agent, monkeypatch)
    agent.pg = master_picture(4321, 0.1, time.monotonic())
    assert (await agent.refresh()).role == "master"  # a master that is slow to answer
    fake.pid = 9876  # a new postmaster: the old one's picture says nothing about it
    status = await agent.refresh()
    assert status.role == "unknown" and status.postmaster_pid == 9876
    assert status.downstreams == () and status.synchronous_standby_names == ""


async def test_a_server_of_unknown_role_is_neither_deposed_nor_promoted_nor_self_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, role="standby"))
    fake = FakePostgres(agent, monkeypatch)
    await agent.refresh()
    agent.controller_ok_at = time.monotonic()
    upstream = pb.Endpoint(host="127.0.0.1", port=5432)
    await agent._follow_reply(pb.HeartbeatReply(epoch=5, goal=pb.GOAL_STANDBY, upstream=upstream))
    assert "kill" not in fake.calls and not agent.state.fenced
    with pytest.raises(PostgresError, match="running but does not answer: status query failed"):
        await agent.promote(5, "dn1a")
    assert "promote" not in fake.calls and "kill" not in fake.calls
    assert agent.state.role == "standby"
    # Not even with synchronous standbys configured and the controller silent.
    agent.pg = PgStatus(running=True, postmaster_pid=4321, synchronous_standby_names=SYNC_NAMES)
    agent.controller_ok_at, agent._started = None, time.monotonic() - 60
    await agent._self_fence_if_isolated()
    assert "kill" not in fake.calls and not agent.state.fenced


async def test_a_master_told_it_is_no_master_is_fenced_durably_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, role="master"))
    fake = FakePostgres(agent, monkeypatch)
    fake.answer = master_picture(4321, 0.1, time.monotonic())
    await agent.refresh()
    agent.controller_ok_at = time.monotonic()
    upstream = pb.Endpoint(host="127.0.0.1", port=5432)
    await agent._follow_reply(pb.HeartbeatReply(epoch=6, goal=pb.GOAL_STANDBY, upstream=upstream))
    assert fake.fenced_when_killed == [True]
    assert StateFile(agent.state_file.path).load().fenced
    assert agent.pg.role == "stopped"  # the operation's own refresh saw the result


async def test_a_master_that_stops_answering_fences_itself_once_its_picture_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept picture's reply ages were measured when it was taken: they grow older with it,
    or a master whose status queries keep failing would never fence itself."""
    agent = build_agent(tmp_path, AgentState(epoch=5, role="master"))
    fake = FakePostgres(agent, monkeypatch)
    agent.failure_timeout = 2.0
    agent._started = time.monotonic() - 60  # the controller has not answered for a minute
    fake.answer = master_picture(4321, 0.1, time.monotonic())
    await agent.refresh()
    await agent._self_fence_if_isolated()
    assert "kill" not in fake.calls  # the synchronous standby confirmed 0.1 s ago
    taken_at = time.monotonic() - 3
    agent.pg = master_picture(4321, 0.1, taken_at)
    fake.answer = TimeoutError()
    kept = await agent.refresh()
    assert kept.downstreams == agent.pg.downstreams and kept.taken_at == taken_at
    reply_age = kept.reply_age(kept.downstreams[0], time.monotonic())
    assert reply_age is not None and 3.1 <= reply_age < 4
    await agent._self_fence_if_isolated()
    assert fake.fenced_when_killed == [True]
    assert agent.state.fenced and agent.pg.role == "stopped"


async def test_a_master_without_reply_ages_trusts_a_streaming_synchronous_standby(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres-XL 10 / XC 1.2 report no reply_time: a streaming synchronous standby counts
    (until wal_sender_timeout drops it); without one, an isolated master fences itself."""
    agent = build_agent(tmp_path, AgentState(epoch=5, role="master"))
    fake = FakePostgres(agent, monkeypatch)
    agent.failure_timeout = 2.0
    agent._started = time.monotonic() - 60
    streaming = Downstream("dn1b", "streaming", "sync", 1, 1, None)
    fake.answer = replace(master_picture(4321, 0.1, time.monotonic()), downstreams=(streaming,))
    await agent.refresh()
    await agent._self_fence_if_isolated()
    assert "kill" not in fake.calls
    fake.answer = replace(master_picture(4321, 0.1, time.monotonic()), downstreams=())
    await agent.refresh()
    await agent._self_fence_if_isolated()
    assert fake.fenced_when_killed == [True]


def test_reply_ages_grow_with_the_snapshot() -> None:
    picture = master_picture(1, 0.5, taken_at=100.0)
    downstream = picture.downstreams[0]
    assert picture.reply_age(downstream, 102.0) == 2.5
    assert picture.reply_age(downstream, 99.0) == 0.5  # never younger than measured
    assert PgStatus(running=True, downstreams=(downstream,)).reply_age(downstream, 102.0) == 0.5
    never = Downstream("dn1c", "startup", "async", None, None)
    assert picture.reply_age(never, 102.0) is None


@pytest.mark.parametrize(("exited", "how"), [(True, "exited"), (False, "no longer running")])
async def test_a_dead_postmaster_is_reported_with_how_it_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, exited: bool, how: str
) -> None:
    agent = build_agent(tmp_path)
    fake = FakePostgres(agent, monkeypatch)
    agent.pg = PgStatus(running=True, postmaster_pid=4321, in_recovery=True)
    fake.pid = None
    if exited:
        agent._postmaster_gone.set()  # what the pidfd reader does
    with caplog.at_level(logging.WARNING):
        watch = asyncio.create_task(agent._watch())
        for _ in range(100):
            if "postmaster gone" in caplog.text:
                break
            await asyncio.sleep(0.01)
        agent.stop()
        await asyncio.wait_for(watch, 5)
    assert f"dn1a: postmaster gone ({how})" in caplog.messages
    assert agent.pg.role == "stopped"
    assert agent.member_status().postmaster_died, "a postmaster seen exiting unasked is a crash"


async def test_a_postmaster_found_stopped_at_start_is_no_crash_until_a_start_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean restart of the deployment, a reboot: the controller starts such a master in
    place. Only when starting it fails does the agent report a failure it saw."""
    agent = build_agent(tmp_path, AgentState(epoch=3, role="master"))
    fake = FakePostgres(agent, monkeypatch)
    fake.pid = None
    await agent.resume()
    assert agent.pg.role == "stopped"
    assert not agent.member_status().postmaster_died

    async def start(timeout: float = 60) -> float:
        raise PostgresError("could not start: the data directory is damaged")

    monkeypatch.setattr(agent.instance, "configure", lambda role, upstream=None: None)
    monkeypatch.setattr(agent.instance, "start", start)
    agent.controller_ok_at = time.monotonic()
    with pytest.raises(PostgresError):
        await agent.promote(3, "dn1a")
    assert agent.member_status().postmaster_died
    fake.pid = 4321
    fake.answer = PgStatus(running=True, postmaster_pid=4321, in_recovery=False)
    await agent.refresh()
    assert not agent.member_status().postmaster_died, "running again: nothing to report"


# ---- ports in role messages ----------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def test_bad_ports_are_refused_before_anything_changes(tmp_path: Path) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5))
    before = agent.state_file.path.read_bytes()
    with pytest.raises(InvalidInput, match="invalid takeover port 70000"):
        await agent.promote(6, "dn1a", takeover_port=70000)
    with pytest.raises(InvalidInput, match="invalid port 70000"):
        await agent.follow(6, "dn1a", Endpoint("127.0.0.1", 5432), port=70000)
    assert agent.state.epoch == 5 and agent.state_file.path.read_bytes() == before
    service = AgentService(agent)
    with pytest.raises(Aborted, match="invalid takeover port 70000") as caught:
        await service.Promote(pb.PromoteRequest(epoch=6, member="dn1a", takeover_port=70000), FakeContext())  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    upstream = pb.Endpoint(host="127.0.0.1", port=5432)
    request = pb.FollowRequest(epoch=6, member="dn1a", upstream=upstream, port=70000)
    with pytest.raises(Aborted, match="invalid port 70000") as caught:
        await service.Follow(request, FakeContext())  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.state.epoch == 5 and agent.state_file.path.read_bytes() == before


async def test_a_port_takeover_after_promotion_does_not_promote_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path, AgentState(epoch=5, role="standby"))
    fake = FakePostgres(agent, monkeypatch)
    fake.answer = PgStatus(running=True, postmaster_pid=4321, in_recovery=True)
    agent.controller_ok_at = time.monotonic()
    moved: list[int] = []

    async def take_over_port(port: int) -> Timings:
        moved.append(port)
        return Timings((("restart", 0.5),))

    monkeypatch.setattr(agent.instance, "take_over_port", take_over_port)
    detail, _ = await agent.promote(6, "dn1a", takeover_port=6543)
    assert fake.calls.count("promote") == 1 and moved == [6543]
    assert detail == "promoted a standby in 10 ms; took over port 6543: restart 500 ms"


# ---- a loop that fails stops the agent -----------------------------------------------------------


LOOPS = {
    "_watch": "watching PostgreSQL",
    "_heartbeats": "heartbeats",
    "_check_upstream": "checking the upstream",
}


def patch_loops(agent: Agent, monkeypatch: pytest.MonkeyPatch, failing: str | None) -> list[str]:
    """resume() does nothing; the loop named failing raises, the others run until cancelled."""
    cancelled: list[str] = []

    async def nothing() -> None:
        pass

    def loop(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            if name == failing:
                raise OSError(28, "No space left on device")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    monkeypatch.setattr(agent, "resume", nothing)
    for name in LOOPS:
        monkeypatch.setattr(agent, name, loop(name))
    return cancelled


@pytest.mark.parametrize("failing", list(LOOPS))
async def test_a_loop_that_fails_stops_the_agent_with_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    agent = build_agent(tmp_path)
    cancelled = patch_loops(agent, monkeypatch, failing)
    with (
        caplog.at_level(logging.CRITICAL),
        pytest.raises(AgentFailed, match=f"agent dn1a: {LOOPS[failing]} failed: .*No space left on device"),
    ):
        await asyncio.wait_for(agent.run(), 5)
    assert sorted(cancelled) == sorted(set(LOOPS) - {failing})
    critical = [record for record in caplog.records if record.levelno == logging.CRITICAL]
    assert len(critical) == 1 and critical[0].exc_info is not None


async def test_a_loop_that_ends_by_itself_stops_the_agent_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = build_agent(tmp_path)
    patch_loops(agent, monkeypatch, None)

    async def ends() -> None:
        pass

    monkeypatch.setattr(agent, "_heartbeats", ends)
    with pytest.raises(AgentFailed, match="heartbeats failed: it ended"):
        await asyncio.wait_for(agent.run(), 5)


async def test_stop_ends_the_agent_without_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = build_agent(tmp_path)
    patch_loops(agent, monkeypatch, None)
    stopped: list[str] = []

    def until_stopped(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await agent._stopping.wait()  # a loop that sees stop() returns at the same moment
            stopped.append(name)

        return run

    for name in LOOPS:
        monkeypatch.setattr(agent, name, until_stopped(name))
    run = asyncio.create_task(agent.run())
    await asyncio.sleep(0.05)
    agent.stop()
    await asyncio.wait_for(run, 5)


async def test_a_state_file_that_cannot_be_written_while_self_fencing_stops_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch loop's self-fencing persists fenced first; when that fails, the agent must not
    serve on without its watch loop."""
    agent = build_agent(tmp_path, AgentState(epoch=5, role="master"))
    fake = FakePostgres(agent, monkeypatch)
    fake.answer = master_picture(4321, 30.0, time.monotonic())  # the standby went quiet
    agent.failure_timeout = 2.0
    agent._started = time.monotonic() - 60
    patch_loops(agent, monkeypatch, None)
    monkeypatch.setattr(agent, "_watch", Agent._watch.__get__(agent))  # the real watch loop

    def full_disk(state: AgentState) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(agent.state_file, "save", full_disk)
    with pytest.raises(AgentFailed, match=r"watching PostgreSQL failed: .*No space left on device"):
        await asyncio.wait_for(agent.run(), 5)
    assert "kill" not in fake.calls  # fenced could not be made durable: nothing was killed


def test_an_agent_that_fails_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole way: serve_agent stops its server and `xcha agent` exits 1 (systemd restarts it)."""
    agent = build_agent(tmp_path, listen="127.0.0.1:0")
    patch_loops(agent, monkeypatch, "_heartbeats")
    monkeypatch.setattr(xcha.agent.main, "build_agent", lambda config: agent)
    monkeypatch.setattr(xcha.cli, "setup_logging", lambda log_format, name: None)
    assert xcha.cli.main(["agent", "--config", str(tmp_path / "agent.toml")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "xcha: error: agent dn1a: heartbeats failed: [Errno 28] No space left on device"
    ]
