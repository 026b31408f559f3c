"""Each process's metrics, fed by what it publishes: the controller's events, heartbeat
timings and cluster status; an agent's own status report. Served over HTTP, read on the
process's event loop. (On a running deployment: tests/integration/test_operator_cli.py.)"""

import asyncio
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from xcha.agent.metrics import AgentMetrics, Reading
from xcha.controller.metrics import Completed, ControllerMetrics
from xcha.controller.status import ClusterSample, GroupSample, MemberSample
from xcha.controller.store import EventRecord
from xcha.pg.status import PgStatus, WalReceiver
from xcha.rpc import status_to_proto
from xcha.topology import free_port
from xcha.v1 import xcha_pb2 as pb

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def rerouted(datanode: str, **details: object) -> EventRecord:
    return EventRecord(1, time.time(), datanode, "rerouted", 3, "rerouted", details)


def test_completed_failovers_and_switchovers_are_counted_from_rerouted_events() -> None:
    completed = Completed()
    completed.observe(EventRecord(1, 0.0, "dn1", "promoted", 2, "promoted"))  # not a completion
    completed.observe(
        rerouted("dn1", detected_at=10.0, promoted_at=10.5, rerouted_at=10.75, promote_seconds=0.25)
    )
    completed.observe(rerouted("dn1", switchover=True))
    completed.observe(rerouted("dn2"))
    assert completed.failovers == {"dn1": 1, "dn2": 1}
    assert completed.switchovers == {"dn1": 1}
    assert completed.last_failover == {
        "dn1": {"reroute": 0.25, "detect_to_promoted": 0.5, "total": 0.75, "promote": 0.25}
    }
    copy = completed.copy()
    completed.observe(rerouted("dn2"))
    assert copy.failovers == {"dn1": 1, "dn2": 1}, "a snapshot does not change afterwards"


class Ledger:
    def __init__(self) -> None:
        self.subscribers: list[Callable[[EventRecord], None]] = []


class Term:
    """What a term's Controller publishes: its events (to the ledger's subscribers), heartbeat
    timings, its cluster status."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.heartbeat_observer: Callable[[float], None] | None = None

    def publish(self, event: EventRecord) -> None:
        for subscriber in self.ledger.subscribers:
            subscriber(event)

    def sample(self, start: int, count: int) -> ClusterSample:
        member = MemberSample("dn1a", "master", heartbeat_age=0.125, lag_bytes=0, sync_state="")
        group = GroupSample("dn1", "single", paused=False, reroute_pending=1, members=(member,))
        return ClusterSample(epoch=7, groups=1, sampled=(group,)[start : start + count])


class Node:
    """What a ControllerNode offers: each term's controller as it starts, the leading one."""

    def __init__(self) -> None:
        self.term_listeners: list[Callable[[Term], None]] = []
        self.term: Term | None = None

    def start_term(self) -> Term:
        self.term = Term()
        for listener in self.term_listeners:
            listener(self.term)
        return self.term

    def leading(self) -> Term | None:
        return self.term


async def test_the_controller_metrics_follow_each_term_and_serve() -> None:
    node = Node()
    port = free_port()
    metrics = ControllerMetrics(node, f"127.0.0.1:{port}")  # type: ignore[arg-type]
    try:
        assert (await asyncio.to_thread(scrape, port))[("xcha_epoch", ())] == 0, "not leading: no groups"
        node.start_term()
        term = node.start_term()  # a second term: its events count too
        term.publish(rerouted("dn1", promoted_at=1.0, rerouted_at=1.5))
        assert term.heartbeat_observer is not None
        term.heartbeat_observer(0.003)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        metrics.close()
    assert samples[("xcha_epoch", ())] == 7
    assert samples[("xcha_group_state", (("datanode", "dn1"), ("state", "single")))] == 1
    assert samples[("xcha_member_role", (("datanode", "dn1"), ("member", "dn1a"), ("role", "master")))] == 1
    assert samples[("xcha_heartbeat_age_seconds", (("datanode", "dn1"), ("member", "dn1a")))] == 0.125
    assert samples[("xcha_reroute_pending_coordinators", (("datanode", "dn1"),))] == 1
    assert samples[("xcha_failovers_total", (("datanode", "dn1"),))] == 1
    assert samples[("xcha_last_failover_seconds", (("datanode", "dn1"), ("phase", "reroute")))] == 0.5
    assert samples[("xcha_heartbeat_handling_seconds_count", ())] == 1


async def test_the_agent_metrics_show_what_the_agent_reports() -> None:
    pg = PgStatus(
        running=True,
        in_recovery=True,
        timeline=3,
        receive_lsn=300,
        flush_lsn=200,
        replay_lsn=100,
        wal_receiver=WalReceiver("streaming", "10.0.0.1", 5432, 0.1),
    )
    status = pb.MemberStatus(
        datanode="dn1",
        member="dn1b",
        epoch=5,
        postgres_status=status_to_proto(pg),
        upstream=pb.UpstreamCheck(checked=True, ok=True),
    )
    readers: list[int] = []

    def read() -> Reading:
        readers.append(id(asyncio.get_running_loop()))
        return Reading(status, time.monotonic() - 1.0)

    port = free_port()
    metrics = AgentMetrics(read, f"127.0.0.1:{port}")
    try:
        samples = await asyncio.to_thread(scrape, port)
    finally:
        metrics.close()
    assert readers == [id(asyncio.get_running_loop())], "read on the agent's event loop"
    member = {"datanode": "dn1", "member": "dn1b"}
    roles = ("master", "standby", "stopped")
    assert [at(samples, "xcha_member_role", **member, role=role) for role in roles] == [0, 1, 0]
    assert at(samples, "xcha_agent_epoch", **member) == 5
    assert at(samples, "xcha_agent_fenced", **member) == 0
    assert at(samples, "xcha_postgres_timeline", **member) == 3
    assert at(samples, "xcha_upstream_ok", **member) == 1
    kinds = ("current", "receive", "flush", "replay")
    assert [at(samples, "xcha_wal_position_bytes", **member, kind=kind) for kind in kinds] == [
        0,
        300,
        200,
        100,
    ]
    assert 1.0 <= at(samples, "xcha_controller_reply_age_seconds", **member) < 5.0
