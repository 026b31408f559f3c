"""Prometheus metrics for the controller and the agents.

Collectors read the live state at scrape time, so nothing has to be kept in step with it;
only counts of past events (failovers, switchovers) and the heartbeat handling histogram
are accumulated.

prometheus_client scrapes on its HTTP server's thread while the event loop changes that
state. The controller's collector therefore takes its snapshot on the event loop (its
dicts change size as it runs); the agent's reads a handful of references to immutable
objects (PgStatus, its state, the upstream check), each once, so one scrape is consistent.
"""

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xcha.names import check_address

if TYPE_CHECKING:
    from xcha.agent.agent import Agent
    from xcha.authz import Guard
    from xcha.config import TlsConfig
    from xcha.controller.controller import Controller
    from xcha.controller.node import ControllerNode
    from xcha.v1 import xcha_pb2 as pb

ROLE_NAMES = ("master", "standby", "stopped")


class _SecurityCollector(Collector):
    """Refused calls and certificate expiry (both servers). The guard's dicts are replaced, never
    changed, by the event loop: one read each is a consistent snapshot."""

    def __init__(self, guard: "Guard", tls: "TlsConfig") -> None:
        self.guard = guard
        self.tls = tls

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from xcha.tls import EXPIRY_WARNING, material

        refused = CounterMetricFamily(
            "xcha_rpc_refused", "calls refused by the authorization table", labels=["rpc", "role"]
        )
        for (rpc, role), count in self.guard.refused.items():
            refused.add_metric([rpc, role], float(count))
        yield refused
        if self.tls.insecure:
            return
        files = material(self.tls).files
        expiries = {("own", str(files.identity)): files.info.not_after.timestamp()}
        expiries[("ca", files.ca_info.subject)] = files.ca_info.not_after.timestamp()
        for identity, expiry in self.guard.peer_expiry.items():
            expiries[("peer", identity)] = expiry
        now = time.time()
        left = GaugeMetricFamily(
            "xcha_certificate_expiry_seconds",
            "until the certificate expires: this process's own, its CA, and peers' expiring soon",
            labels=["certificate", "identity"],
        )
        for labels, expiry in expiries.items():
            left.add_metric(list(labels), expiry - now)
        yield left
        warning = GaugeMetricFamily(
            "xcha_certificate_expiry_warning",
            f"1 when a certificate expires within {EXPIRY_WARNING.days} days",
        )
        warning.add_metric([], float(min(expiries.values()) - now <= EXPIRY_WARNING.total_seconds()))
        yield warning


def _serve(registry: CollectorRegistry, address: str) -> object:
    host, port = check_address(address, "metrics address")
    server, _thread = start_http_server(port, host, registry=registry)
    return server


class _AgentCollector(Collector):
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agent = self.agent
        # Each read once: the event loop replaces these objects (never changes them) meanwhile.
        pg, state, upstream, controller_ok_at = (
            agent.pg,
            agent.state,
            agent.upstream_check,
            agent.controller_ok_at,
        )
        labels = [agent.config.datanode, agent.config.member]
        names = ["datanode", "member"]
        role = GaugeMetricFamily(
            "xcha_member_role", "1 for the role PostgreSQL has now", labels=[*names, "role"]
        )
        for name in ROLE_NAMES:
            role.add_metric([*labels, name], 1.0 if pg.role == name else 0.0)
        yield role
        for metric, text, value in (
            ("xcha_agent_epoch", "highest controller epoch persisted", state.epoch),
            ("xcha_agent_fenced", "1 when stopped on purpose", float(state.fenced)),
            ("xcha_postgres_timeline", "PostgreSQL timeline", pg.timeline or 0),
            ("xcha_upstream_ok", "1 when the standby's master answers", float(upstream.ok)),
        ):
            gauge = GaugeMetricFamily(metric, text, labels=names)
            gauge.add_metric(labels, float(value))
            yield gauge
        lsn = GaugeMetricFamily("xcha_wal_position_bytes", "WAL positions", labels=[*names, "kind"])
        for kind in ("current", "receive", "flush", "replay"):
            lsn.add_metric([*labels, kind], float(getattr(pg, f"{kind}_lsn") or 0))
        yield lsn
        if controller_ok_at is not None:
            age = GaugeMetricFamily(
                "xcha_controller_reply_age_seconds", "since the controller last answered", labels=names
            )
            age.add_metric(labels, time.monotonic() - controller_ok_at)
            yield age


class AgentMetrics:
    def __init__(
        self, agent: "Agent", address: str, guard: "Guard | None" = None, tls: "TlsConfig | None" = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_AgentCollector(agent))
        if guard is not None and tls is not None:
            self.registry.register(_SecurityCollector(guard, tls))
        self.server = _serve(self.registry, address)

    def close(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]


SNAPSHOT_TIMEOUT = 5.0  # a scrape waits this long for the controller's event loop


@dataclass(frozen=True)
class _ControllerSnapshot:
    epoch: int
    groups: "tuple[pb.GroupView, ...]"
    failovers: dict[str, int]
    switchovers: dict[str, int]
    last_failover: dict[str, dict[str, float]]


class _ControllerCollector(Collector):
    def __init__(
        self,
        leading: "Callable[[], Controller | None]",
        metrics: "ControllerMetrics",
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """leading: the controller of this term, None while this process does not lead."""
        self.current = leading
        self.metrics = metrics
        self.loop = loop

    def _take(self) -> _ControllerSnapshot:
        """On the event loop's thread: nothing changes while it runs."""
        controller, metrics = self.current(), self.metrics
        if controller is None:
            return _ControllerSnapshot(0, (), dict(metrics.failovers), dict(metrics.switchovers), {})
        return _ControllerSnapshot(
            controller.epoch,
            tuple(controller.group_status(datanode) for datanode in controller.groups),
            dict(metrics.failovers),
            dict(metrics.switchovers),
            dict(metrics.last_failover),
        )

    def snapshot(self) -> _ControllerSnapshot:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # no loop in this thread: prometheus_client's HTTP thread
            on_loop = False
        if on_loop:
            return self._take()

        async def take() -> _ControllerSnapshot:
            return self._take()

        future = asyncio.run_coroutine_threadsafe(take(), self.loop)
        try:
            return future.result(SNAPSHOT_TIMEOUT)
        except BaseException:
            future.cancel()
            raise

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self.snapshot()
        epoch = GaugeMetricFamily("xcha_epoch", "the controller's epoch")
        epoch.add_metric([], float(snapshot.epoch))
        yield epoch
        state = GaugeMetricFamily("xcha_group_state", "1 for the group's state", labels=["datanode", "state"])
        role = GaugeMetricFamily(
            "xcha_member_role", "1 for the member's reported role", labels=["datanode", "member", "role"]
        )
        age = GaugeMetricFamily(
            "xcha_heartbeat_age_seconds",
            "since the member's agent last reported",
            labels=["datanode", "member"],
        )
        lag = GaugeMetricFamily(
            "xcha_replication_lag_bytes", "behind the master", labels=["datanode", "member"]
        )
        sync = GaugeMetricFamily(
            "xcha_member_sync_state",
            "1 for the sync state the master reports",
            labels=["datanode", "member", "sync_state"],
        )
        pending = GaugeMetricFamily(
            "xcha_reroute_pending_coordinators", "coordinators not yet re-pointed", labels=["datanode"]
        )
        paused = GaugeMetricFamily(
            "xcha_group_paused", "1 while automatic actions are paused", labels=["datanode"]
        )
        for view in snapshot.groups:
            datanode = view.name
            state.add_metric([datanode, view.state], 1.0)
            pending.add_metric([datanode], float(len(view.reroute_pending)))
            paused.add_metric([datanode], float(view.paused))
            for member in view.members:
                reported = {1: "master", 2: "standby", 3: "stopped"}.get(
                    member.status.postgres_status.role, "stopped"
                )
                role.add_metric([datanode, member.name, reported], 1.0)
                if member.heartbeat_age >= 0:
                    age.add_metric([datanode, member.name], member.heartbeat_age)
                lag.add_metric([datanode, member.name], float(member.lag_bytes))
                if member.sync_state:
                    sync.add_metric([datanode, member.name, member.sync_state], 1.0)
        yield from (state, role, age, lag, sync, pending, paused)
        failovers = CounterMetricFamily("xcha_failovers", "completed failovers", labels=["datanode"])
        switchovers = CounterMetricFamily("xcha_switchovers", "completed switchovers", labels=["datanode"])
        for datanode, count in snapshot.failovers.items():
            failovers.add_metric([datanode], float(count))
        for datanode, count in snapshot.switchovers.items():
            switchovers.add_metric([datanode], float(count))
        yield failovers
        yield switchovers
        duration = GaugeMetricFamily(
            "xcha_last_failover_seconds", "the last failover, by phase", labels=["datanode", "phase"]
        )
        for datanode, phases in snapshot.last_failover.items():
            for phase, seconds in phases.items():
                duration.add_metric([datanode, phase], seconds)
        yield duration


class ControllerMetrics:
    def __init__(
        self,
        node: "ControllerNode",
        address: str,
        loop: asyncio.AbstractEventLoop | None = None,
        guard: "Guard | None" = None,
        tls: "TlsConfig | None" = None,
    ) -> None:
        """Made on the controller's event loop (or given it)."""
        self.failovers: dict[str, int] = {}
        self.switchovers: dict[str, int] = {}
        self.last_failover: dict[str, dict[str, float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_ControllerCollector(node.leading, self, loop or asyncio.get_running_loop()))
        if guard is not None and tls is not None:
            self.registry.register(_SecurityCollector(guard, tls))
        self.heartbeat_seconds = Histogram(
            "xcha_heartbeat_handling_seconds",
            "time to handle one heartbeat",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        node.term_listeners.append(self._subscribe)
        self.server = _serve(self.registry, address)

    def _subscribe(self, controller: "Controller") -> None:
        controller.ledger.subscribers.append(self._count)
        controller.heartbeat_observer = self.heartbeat_seconds.observe

    def _count(self, event: object) -> None:
        from xcha.controller.store import EventRecord

        assert isinstance(event, EventRecord)
        if event.kind != "rerouted":
            return
        details = event.details
        kind = "switchovers" if details.get("switchover") else "failovers"
        counts = getattr(self, kind)
        counts[event.datanode] = counts.get(event.datanode, 0) + 1
        detected = details.get("detected_at")
        promoted = details.get("promoted_at")
        rerouted = details.get("rerouted_at")
        if isinstance(promoted, float) and isinstance(rerouted, float):
            phases = {"reroute": rerouted - promoted}
            if isinstance(detected, float):
                phases["detect_to_promoted"] = promoted - detected
                phases["total"] = rerouted - detected
            promote_seconds = details.get("promote_seconds")
            if isinstance(promote_seconds, float):
                phases["promote"] = promote_seconds
            self.last_failover[event.datanode] = phases

    def close(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]
