"""Rerouting end to end: the specification's port takeover under writes through a real PostgreSQL
coordinator, and what happens when the old master still holds its port; an operator's command;
and `xcha demo --json` itself. (The fdw router's barrier with a coordinator down is
tests/chaos/test_faults.py.)"""

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import LoadedFactory, acknowledges_a_write, assert_nothing_lost, default_plan
from xcha.topology import Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


async def fdw_options(topology: Topology, coordinator: str, server: str) -> list[str]:
    async with await topology.coordinator(coordinator).connect() as conn:
        cursor = await conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = %s", [server])
        row = await cursor.fetchone()
        assert row is not None and isinstance(row[0], list), f"{coordinator} has no server {server}"
        return [str(option) for option in row[0]]


def member(status: pb.ClusterStatus, name: str) -> pb.MemberView:
    return next(m for m in status.groups[0].members if m.name == name)


async def test_takeover_moves_the_promoted_standby_to_the_old_port_and_the_coordinator_needs_no_change(
    loaded: LoadedFactory,
) -> None:
    cluster = await loaded(default_plan(router="takeover"))
    topology = cluster.topology
    before = await fdw_options(topology, "coord1", "dn1")
    fault = cluster.kill_master()
    old, old_port = fault.member, topology.members[fault.member].port
    status = await topology.wait_for(
        lambda s: s.groups[0].master != old and s.groups[0].state == "protected",
        60,
        "the failover and the old master's rejoin",
    )
    new = status.groups[0].master
    assert member(status, new).status.postgres.port == old_port, "the promoted standby took over the old port"
    assert member(status, old).status.postgres.port == topology.members[new].port, (
        "the old master took the other one"
    )
    assert member(status, old).sync_state == "sync"
    assert await fdw_options(topology, "coord1", "dn1") == before
    await cluster.wait_for_writes(20, "dn1")
    assert_nothing_lost(await cluster.finish())


async def test_takeover_with_the_old_master_still_holding_its_port_says_so_and_the_new_master_keeps_its_own(
    loaded: LoadedFactory,
) -> None:
    """A hung old master host keeps its port bound: the promoted standby cannot take it over. The
    controller says so in an event and the new master serves on its own port (clients of the old
    port reach nothing writable until an operator acts, as docs/design.md says)."""
    cluster = await loaded(default_plan(router="takeover"))
    topology = cluster.topology
    await cluster.wait_for_writes(50, "dn1")  # acknowledged commits that must survive the hang
    fault = cluster.hang_master()
    old = fault.member
    try:
        new = await topology.wait_new_master("dn1", old, 60)
        new_port = topology.members[new].port
        error = next(
            (
                e
                for e in topology.events("dn1", "error")
                if e.epoch > fault.epoch and "port takeover failed" in e.message
            ),
            None,
        )
        assert error is not None, [e.message for e in topology.events("dn1") if e.epoch > fault.epoch]
        assert f"{new} stays on port {new_port}" in error.message, error.message
        assert member(topology.status(), new).status.postgres.port == new_port
    finally:
        cluster.resume(old)
    acknowledged = await acknowledges_a_write(
        topology.app_conninfo(old), "INSERT INTO xcha_writes (id) VALUES (-1)"
    )
    assert not acknowledged, f"{old} acknowledged a write after SIGCONT"
    status = await topology.wait_for(
        lambda s: s.groups[0].master == new and s.groups[0].state == "protected",
        60,
        f"{old} to rejoin as the standby",
    )
    assert member(status, new).status.postgres.port == new_port, "the new master kept its own port"
    assert member(status, old).status.postgres.port == topology.members[old].port, "the old one kept its own"
    assert member(status, old).sync_state == "sync"
    print(f"\n  {old} hung holding its port: {new} stays master on its own port {new_port}; {error.message}")
    # Nothing acknowledged before the hang is lost: read on the new master itself (the coordinator
    # still points at the old port, where only a standby answers now).
    assert_nothing_lost(await cluster.finish(topology.group_conninfos("dn1")))


@pytest.fixture
async def deployments(workdir: Path) -> AsyncIterator[list[Topology]]:
    started: list[Topology] = []
    yield started
    for topology in started:
        await topology.down()


async def test_command_router_passes_the_change_in_the_environment_and_retries_until_it_succeeds(
    deployments: list[Topology], workdir: Path
) -> None:
    record = workdir / "reroutes.log"
    script = workdir / "repoint.sh"
    script.write_text(f"""#!/bin/sh
env | grep '^XCHA_' | sort >> {record}
echo --- >> {record}
if [ ! -e {workdir}/second-time ]; then touch {workdir}/second-time; echo "vip not ready" >&2; exit 1; fi
echo "vip moved to $XCHA_NEW_HOST:$XCHA_NEW_PORT"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    plan = TopologyPlan(router="command", router_settings={"command": [str(script)], "retry_initial": 0.05})
    topology = Topology(workdir / "x", plan)
    deployments.append(topology)
    await topology.up()
    old = topology.master("dn1")
    os.kill(topology.postmaster_pid(old), signal.SIGKILL)  # type: ignore[arg-type]
    status = await topology.wait_for(
        lambda s: s.groups[0].master != old and s.groups[0].state in ("single", "protected"),
        30,
        "the command to acknowledge",
    )
    new = status.groups[0].master
    calls = [block for block in record.read_text().split("---\n") if block.strip()]
    assert len(calls) == 2, "the first (failing) run is retried"
    env = dict(line.split("=", 1) for line in calls[-1].split())
    assert env["XCHA_DATANODE"] == "dn1"
    assert env["XCHA_NEW_PORT"] == str(topology.members[new].port)
    assert env["XCHA_OLD_PORT"] == str(topology.members[old].port)
    assert int(env["XCHA_EPOCH"]) == status.epoch


@pytest.mark.parametrize("reroute", ["fdw", "takeover"])
def test_demo_json_reports_a_failover_without_loss(workdir: Path, reroute: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcha",
            "demo",
            "--json",
            "--reroute",
            reroute,
            "--workdir",
            str(workdir / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nxcha demo --reroute {reroute}: {report}")
    assert report["lost"] == 0 and report["unexpected"] == 0 and report["acknowledged"] > 100
    assert report["failed_over"] and report["old_master_rejoined"] and report["epoch"] >= 2
    assert report["rto_ms"] is not None and report["rto_ms"] > 0
    assert report["router"] == reroute
    from tests.conftest import processes_under

    assert processes_under(workdir / "demo") == [], "the demo stops every process it started"
