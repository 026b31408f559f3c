"""Rerouting end to end: writes through a real PostgreSQL coordinator (postgres_fdw), a
failover, and nothing acknowledged lost; the reroute barrier with a coordinator down; the
seed's port takeover; an operator's command; and `xcha demo --json` itself."""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xcha.topology import Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Writer, verify_all

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
async def deployments(workdir: Path) -> AsyncIterator[list[Topology]]:
    started: list[Topology] = []
    yield started
    for topology in started:
        await topology.down()


async def start(deployments: list[Topology], workdir: Path, plan: TopologyPlan) -> Topology:
    topology = Topology(workdir / "x", plan)
    deployments.append(topology)
    topology.write()
    topology.start()
    await topology.start_coordinators()
    await topology.wait_protected()
    await topology.setup_sharding()
    return topology


def group(topology: Topology, datanode: str = "dn1") -> pb.GroupView:
    return next(g for g in topology.status().groups if g.name == datanode)


async def fdw_options(topology: Topology, coordinator: str, server: str) -> list[str]:
    async with await topology.coordinator(coordinator).connect() as conn:
        cursor = await conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = %s", [server])
        row = await cursor.fetchone()
        assert row is not None
        return list(row[0])  # type: ignore[call-overload]


async def write_through(topology: Topology, coordinator: str = "coord1") -> tuple[Writer, asyncio.Task[None]]:
    writer = Writer([topology.coordinator_app_conninfo(coordinator)])
    task = asyncio.create_task(writer.run())
    deadline = time.monotonic() + 20
    while len(writer.acknowledged) < 20:
        assert time.monotonic() < deadline, f"no writes through {coordinator}: {writer.failures[-3:]}"
        await asyncio.sleep(0.05)
    return writer, task


async def finish(
    topology: Topology, writer: Writer, task: asyncio.Task[None], coordinator: str = "coord1"
) -> None:
    writer.stop()
    await task
    await writer.close()
    outcome = await verify_all([writer], [topology.coordinator_app_conninfo(coordinator)])
    assert outcome.acknowledged > 0 and outcome.lost == [] and outcome.unexpected == [], outcome


async def test_fdw_reroute_is_a_barrier_that_waits_for_an_unreachable_coordinator(
    deployments: list[Topology], workdir: Path
) -> None:
    plan = TopologyPlan(
        router="fdw",
        coordinators=("coord1", "coord2"),
        startup_grace=0.5,
        router_settings={"retry_initial": 0.1, "retry_max": 0.5},
    )
    topology = await start(deployments, workdir, plan)
    writer, task = await write_through(topology)
    old = group(topology).master
    await topology.coordinator("coord2").kill()
    os.kill(topology.postmaster_pid(old), signal.SIGKILL)  # type: ignore[arg-type]
    status = await topology.wait_for(
        lambda s: (
            s.groups[0].state == "rerouting" and any("coord2" in p for p in s.groups[0].reroute_pending)
        ),
        30,
        "the barrier to wait for coord2",
    )
    new = status.groups[0].master
    assert new != old
    new_port = str(topology.members[new].port)
    # coord1 is re-pointed and carries writes; the failover is not complete while coord2 is down.
    assert f"port={new_port}" in await fdw_options(topology, "coord1", "dn1")
    acked = len(writer.acknowledged)
    await asyncio.sleep(2)
    assert len(writer.acknowledged) > acked + 20
    assert group(topology).state == "rerouting"
    await topology.coordinator("coord2").start()
    await topology.wait_for(
        lambda s: s.groups[0].state in ("single", "protected"), 30, "the barrier to complete"
    )
    assert f"port={new_port}" in await fdw_options(topology, "coord2", "dn1")
    from xcha.ctl import call

    events = call(
        topology.target, lambda stub: stub.ListEvents(pb.EventsRequest(limit=1000), timeout=5)
    ).events
    assert any(e.kind == "reroute_retry" and "coord2" in e.message for e in events)
    rerouted = next(e for e in events if e.kind == "rerouted")
    coord2 = json.loads(rerouted.details_json)["coordinators"]["coord2"]
    assert coord2["attempts"] > 1 and "ALTER SERVER dn1" in coord2["detail"]
    await topology.wait_protected()
    await finish(topology, writer, task)


async def test_takeover_moves_the_promoted_standby_to_the_old_port_and_the_coordinator_needs_no_change(
    deployments: list[Topology], workdir: Path
) -> None:
    plan = TopologyPlan(router="takeover", coordinators=("coord1",), startup_grace=0.5)
    topology = await start(deployments, workdir, plan)
    writer, task = await write_through(topology)
    old = group(topology).master
    old_port = topology.members[old].port
    before = await fdw_options(topology, "coord1", "dn1")
    os.kill(topology.postmaster_pid(old), signal.SIGKILL)  # type: ignore[arg-type]
    status = await topology.wait_for(
        lambda s: s.groups[0].master != old and s.groups[0].state == "protected",
        60,
        "the failover and the old master's rejoin",
    )
    members = {m.name: m for m in status.groups[0].members}
    new = status.groups[0].master
    assert new != old
    assert members[new].status.postgres.port == old_port, "the promoted standby took over the old port"
    assert members[old].status.postgres.port == topology.members[new].port, (
        "the old master took the other one"
    )
    assert members[old].sync_state == "sync"
    assert await fdw_options(topology, "coord1", "dn1") == before
    await asyncio.sleep(0.5)
    await finish(topology, writer, task)


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
    plan = TopologyPlan(
        router="command", startup_grace=0.5, router_settings={"command": [str(script)], "retry_initial": 0.05}
    )
    topology = await start(deployments, workdir, plan)
    old = group(topology).master
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
