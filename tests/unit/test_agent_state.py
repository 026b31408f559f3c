"""The agent's state file (atomic, durable) and its epoch rule: refuse older epochs and
messages for another member, persist a newer epoch before acting on it."""

import json
import time
from pathlib import Path

import pytest

from xcha.agent.agent import Agent
from xcha.agent.config import load_agent_config
from xcha.agent.state import AgentState, StateFile
from xcha.errors import InvalidInput, StaleEpoch, XchaError
from xcha.pg.instance import PostgresInstance
from xcha.pg.runner import OsUser, Runner

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


def build_agent(tmp_path: Path, state: AgentState | None = None) -> Agent:
    password = tmp_path / "replication.password"
    password.write_text("secret\n")
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f"""\
[agent]
datanode = "dn1"
member = "dn1a"
listen = "127.0.0.1:7001"
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
    config = load_agent_config(config_path)
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
