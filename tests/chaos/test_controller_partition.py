"""Three controllers in network namespaces of their own, etcd in another, the agents and
PostgreSQL in theirs (tests/chaos/netns.py, 192.0.2.0/24 only): the leading controller cut
off from the network stops acting within its lease; another leads; no datanode fails over.

The test process writes through the members' Unix sockets and asks the controllers by
running `xcha ctl` inside a controller's namespace."""

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos.netns import NamespacesUnavailable, Network
from tests.conftest import assert_nothing_lost
from xcha.errors import InvalidInput
from xcha.etcd_cluster import find_etcd
from xcha.topology import DatanodePlan, Topology, TopologyPlan
from xcha.workload import Writer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

TTL = 5.0  # the default leader lease
HOSTS = {
    "c1": "192.0.2.131",
    "c2": "192.0.2.132",
    "c3": "192.0.2.133",
    "etcd": "192.0.2.140",
    "dn1a": "192.0.2.151",
    "dn1b": "192.0.2.152",
}
CONTROLLERS = ("c1", "c2", "c3")


class Deployment:
    def __init__(self, network: Network, topology: Topology) -> None:
        self.network = network
        self.topology = topology
        self.writer = Writer([])
        self.task: asyncio.Task[None] | None = None

    def socket_conninfo(self, member: str) -> str:
        info = self.topology.members[member]
        return make_conninfo(
            "", host=str(Path(info.directory) / "run"), port=info.port, user="postgres", dbname="postgres"
        )

    def ctl(self, via: str, *args: str) -> str:
        """`xcha ctl ARGS` run in controller `via`'s namespace, asking that controller first."""
        tls = self.topology.operator_tls
        address = self.topology.controller_address(via)
        result = self.network.run(
            via,
            [sys.executable, "-m", "xcha", "ctl", *args, "--controller", address,
             "--ca", str(tls.ca_file), "--cert", str(tls.cert_file), "--key", str(tls.key_file)],
            timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return result.stdout

    def status(self, via: str) -> dict[str, object]:
        status: dict[str, object] = json.loads(self.ctl(via, "status", "--json"))
        return status

    async def wait_leader(self, via: str, other_than: str = "", timeout: float = 60) -> tuple[str, float]:
        started = time.monotonic()
        last: object = "no answer"
        while time.monotonic() - started < timeout:
            try:
                status = await asyncio.to_thread(self.status, via)
                groups = status["groups"]
                assert isinstance(groups, list)
                settled = all(g["state"] == "protected" for g in groups)
                if status["leading"] and status["leader"] != other_than and settled:
                    return str(status["leader"]), time.monotonic() - started
                last = status
            except RuntimeError as error:
                last = str(error)
            await asyncio.sleep(0.2)
        raise AssertionError(f"no leader (other than {other_than!r}) via {via}: {last}")

    def log(self, name: str) -> str:
        return (self.topology.workdir / "logs" / f"controller-{name}.log").read_text(errors="replace")


@pytest.fixture
async def deployment(workdir: Path) -> AsyncIterator[Deployment]:
    try:
        find_etcd()
    except InvalidInput as missing:
        pytest.skip(str(missing))
    network = Network(f"xp{secrets.token_hex(3)}")
    try:
        hosts = network.create(HOSTS)
    except NamespacesUnavailable as error:
        network.destroy()
        pytest.skip(f"network namespaces unavailable: {error}")
    plan = TopologyPlan(datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),), controllers=3, hosts=hosts)
    topology = Topology(workdir / "x", plan)
    cluster = Deployment(network, topology)
    try:
        topology.write()
        cluster.writer.conninfos = [cluster.socket_conninfo(m) for m in ("dn1a", "dn1b")]
        await topology.start_etcd()
        topology.start()
        await cluster.wait_leader("c2")
        await cluster.writer.prepare()
        cluster.task = asyncio.create_task(cluster.writer.run())
        yield cluster
    finally:
        cluster.writer.stop()
        if cluster.task is not None:
            await asyncio.gather(cluster.task, return_exceptions=True)
        await cluster.writer.close()
        await topology.down()
        network.destroy()


async def test_the_leader_cut_off_stops_acting_within_its_lease(deployment: Deployment) -> None:
    leader, _ = await deployment.wait_leader("c1")
    observer = next(name for name in CONTROLLERS if name != leader)
    offset = len(deployment.log(leader))
    await asyncio.sleep(1)
    cut = time.monotonic()
    deployment.network.cut(leader)
    stopped = None
    while stopped is None:
        if "no longer leads" in deployment.log(leader)[offset:]:
            stopped = time.monotonic() - cut
        assert time.monotonic() - cut < TTL + 1, f"{leader} still leads {TTL + 1} s after losing etcd"
        await asyncio.sleep(0.05)
    successor, waited = await deployment.wait_leader(observer, other_than=leader)
    print(
        f"\n{leader} cut off: stopped leading after {stopped:.2f} s; {successor} leads {waited:.2f} s after"
    )
    assert stopped <= TTL, f"{leader} acted for {stopped:.2f} s, longer than its {TTL} s lease"
    acked = len(deployment.writer.acknowledged)
    await asyncio.sleep(2)
    assert len(deployment.writer.acknowledged) > acked + 50, "writes go on"
    deployment.network.heal(leader)
    await asyncio.sleep(2)
    status = await asyncio.to_thread(deployment.status, leader)  # asked of the healed one first
    assert (status["controller"], status["leader"]) == (successor, successor), "it follows: redirected"
    output = await asyncio.to_thread(deployment.ctl, observer, "events", "--json", "--limit", "1000")
    events = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert not [e for e in events if e.get("kind") == "failover"], "no datanode failed over"
    deployment.writer.stop()
    if deployment.task is not None:
        await deployment.task
        deployment.task = None
    assert_nothing_lost(await deployment.writer.verify())
