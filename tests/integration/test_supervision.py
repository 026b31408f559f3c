"""`xcha up` leaves its deployment to a supervisor, as systemd runs it in production: a
controller or an agent killed with kill -9 is restarted (and no failover follows), `xcha up` on a
deployment that partly runs starts what is missing and says so, `xcha ctl status --workdir`
shows the restarts, and `xcha down` leaves no process."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import default_plan, processes_under
from xcha.errors import XchaError
from xcha.supervisor import SupervisorStatus
from xcha.topology import TOPOLOGY_FILE, Topology, settled
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

Supervised = Callable[[], Awaitable[Topology]]


@pytest.fixture
async def supervised(workdir: Path) -> AsyncIterator[Supervised]:
    """A deployment started as `xcha up` starts it (dn1 pair, coord1, under a supervisor);
    afterwards whatever topology.json then records is stopped by PID."""
    made: list[Topology] = []

    async def make() -> Topology:
        topology = Topology(workdir / "x", default_plan(), supervise=True)
        made.append(topology)
        await topology.up()
        return topology

    yield make
    for topology in made:
        if (topology.workdir / TOPOLOGY_FILE).exists():
            await Topology.load(topology.workdir).down()  # also a supervisor `xcha up` started
        await topology.down()  # reaps this process's own children


def xcha(*args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    """The real command line, finding PostgreSQL as this run does, no other XCHA_* setting."""
    keep = ("XCHA_PG_BINDIR", "XCHA_PG_USER")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCHA_") or k in keep}
    return subprocess.run(
        [sys.executable, "-m", "xcha", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


async def supervisor_says(
    topology: Topology, check: Callable[[SupervisorStatus], bool], what: str, timeout: float = 60
) -> SupervisorStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = topology.supervisor_status()
        if status is not None and check(status):
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {what} within {timeout:.0f} s: {topology.supervisor_status()}")


def member(status: pb.ClusterStatus, name: str) -> pb.MemberView:
    return next(m for g in status.groups for m in g.members if m.name == name)


async def answers(topology: Topology, timeout: float = 60) -> pb.ClusterStatus:
    """The controller's status as soon as it answers, over a new channel each try (a kept one
    would wait out gRPC's reconnect back-off)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(topology.status)
        except XchaError:
            topology.close_channel()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def test_a_killed_agent_is_restarted_and_no_failover_follows(supervised: Supervised) -> None:
    topology = await supervised()
    status = topology.status()
    master = status.groups[0].master
    standby = next(m.name for m in status.groups[0].members if m.name != master)
    for name in (standby, master):
        key = f"agent:{name}"
        before = topology.supervised()[key]
        boot_id = member(topology.status(), name).status.boot_id
        os.kill(before, signal.SIGKILL)
        killed = time.monotonic()
        after = await supervisor_says(
            topology, lambda s, k=key, b=before: s.processes[k].pid not in (0, b), "restart"
        )
        restarted = time.monotonic() - killed
        entry = after.processes[key]
        assert entry.restarts == 1, entry
        assert entry.last_exit is not None and entry.last_exit.signal == signal.SIGKILL, entry
        assert topology.supervised()[key] == entry.pid
        await topology.wait_for(
            lambda s, n=name, b=boot_id: (
                member(s, n).status.boot_id not in ("", b) and member(s, n).heartbeat_age < 1
            ),
            60,
            f"the restarted agent of {name} to report",
        )
        print(
            f"\nkill -9 of the agent of {name}: restarted as PID {entry.pid} after "
            f"{restarted * 1000:.0f} ms, reporting after {(time.monotonic() - killed) * 1000:.0f} ms"
        )
        status = await topology.wait_for(settled, 90, "dn1 protected again")
        assert status.groups[0].master == master
    assert not topology.events(kind="failover"), [e.message for e in topology.events(kind="failover")]

    shown = xcha("ctl", "status", "--workdir", str(topology.workdir), timeout=60)
    assert shown.returncode == 0, shown.stderr
    section = shown.stdout.split("supervised processes (supervisor PID ", 1)[1].splitlines()
    assert section[0].endswith(", running):"), section
    rows = {line.split()[0]: line.split() for line in section[2:]}
    assert rows[f"agent:{master}"][2:4] == ["1", "SIGKILL"] and rows["controller"][2:4] == ["0", "-"], rows
    data = json.loads(xcha("ctl", "status", "--json", "--workdir", str(topology.workdir), timeout=60).stdout)
    assert data["groups"][0]["state"] == "protected"
    agent = data["supervisor"]["processes"][f"agent:{standby}"]
    assert agent["restarts"] == 1 and agent["last_exit"]["signal"] == signal.SIGKILL, agent


async def test_a_killed_controller_is_restarted_and_no_failover_follows(supervised: Supervised) -> None:
    topology = await supervised()
    status = topology.status()
    master, epoch = status.groups[0].master, status.epoch
    before = topology.supervised()["controller"]
    os.kill(before, signal.SIGKILL)
    killed = time.monotonic()
    after = await supervisor_says(
        topology, lambda s: s.processes["controller"].pid not in (0, before), "restart"
    )
    restarted = time.monotonic() - killed
    await answers(topology)
    print(
        f"\nkill -9 of the controller: restarted as PID {after.processes['controller'].pid} after "
        f"{restarted * 1000:.0f} ms, answering after {(time.monotonic() - killed) * 1000:.0f} ms"
    )
    entry = after.processes["controller"]
    assert entry.restarts == 1 and entry.last_exit is not None and entry.last_exit.signal == signal.SIGKILL
    status = await topology.wait_for(lambda s: s.epoch > epoch and settled(s), 90, "the restarted controller")
    await asyncio.sleep(2 * topology.plan.failure_timeout)
    assert topology.master("dn1") == master and not topology.events(kind="failover")


async def test_up_starts_what_is_missing_and_down_leaves_nothing(supervised: Supervised) -> None:
    topology = await supervised()
    directory = topology.workdir
    master = topology.master("dn1")
    standby = next(name for name in topology.members if name != master)
    running = topology.supervised()
    # The supervisor killed: what it ran goes on, unsupervised; then the standby's agent and the
    # coordinator die too, and nothing restarts them.
    topology.kill_process("supervisor")
    await asyncio.sleep(0.5)
    assert topology.supervised() == running, "its processes outlive a killed supervisor"
    os.kill(running[f"agent:{standby}"], signal.SIGKILL)
    await topology.coordinator("coord1").kill()
    await asyncio.sleep(0.5)
    assert f"agent:{standby}" not in topology.supervised(), "no supervisor: it stays dead"

    up = xcha("up", "--workdir", str(directory))
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr
    lines = up.stdout.splitlines()
    started = next(line for line in lines if line.startswith("started: "))
    already = next(line for line in lines if line.startswith("already running: "))
    assert set(started.removeprefix("started: ").split(", ")) == {
        "supervisor",
        f"agent:{standby}",
        "coordinator:coord1",
    }, up.stdout
    assert set(already.removeprefix("already running: ").split(", ")) == {"controller", f"agent:{master}"}
    now = Topology.load(directory).supervised()
    assert {k: now[k] for k in ("controller", f"agent:{master}")} == {
        k: running[k] for k in ("controller", f"agent:{master}")
    }, "adopted, not started again"
    assert now[f"agent:{standby}"] != running[f"agent:{standby}"]
    status = await answers(topology)
    assert settled(status) and status.groups[0].master == master, status
    assert not topology.events(kind="failover")

    again = xcha("up", "--workdir", str(directory))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("everything is already running: supervisor, controller, "), again.stdout

    supervisor = Topology.load(directory).pids["supervisor"]
    pids = [
        supervisor,
        *now.values(),
        *running.values(),
        topology.coordinator("coord1").postmaster_pid() or 0,
    ]
    down = xcha("down", "--workdir", str(directory), timeout=120)
    assert down.returncode == 0, down.stderr
    for key in ("supervisor", "controller", f"agent:{master}", f"agent:{standby}", f"postgres:{master}"):
        assert key in down.stdout, (key, down.stdout)
    assert "coordinator:coord1" in down.stdout, down.stdout
    assert processes_under(directory) == [], "still running after xcha down"
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"], pids


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"
