"""Prometheus metrics for the controller and the agents.

Collectors read the live state at scrape time, so nothing has to be kept in step with it;
only counts of past events (failovers, switchovers) and the heartbeat handling histogram
are accumulated.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xcha.names import check_address

if TYPE_CHECKING:
    from xcha.agent.agent import Agent
    from xcha.controller.controller import Controller

ROLE_NAMES = ("master", "standby", "stopped")


def _serve(registry: CollectorRegistry, address: str) -> object:
    host, port = check_address(address, "metrics address")
    server, _thread = start_http_server(port, host, registry=registry)
    return server


class _AgentCollector(Collector):
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agent = self.agent
        labels = [agent.config.datanode, agent.config.member]
        names = ["datanode", "member"]
        role = GaugeMetricFamily(
            "xcha_member_role", "1 for the role PostgreSQL has now", labels=[*names, "role"]
        )
        for name in ROLE_NAMES:
            role.add_metric([*labels, name], 1.0 if agent.pg.role == name else 0.0)
        yield role
        for metric, text, value in (
            ("xcha_agent_epoch", "highest controller epoch persisted", agent.state.epoch),
            ("xcha_agent_fenced", "1 when stopped on purpose", float(agent.state.fenced)),
            ("xcha_postgres_timeline", "PostgreSQL timeline", agent.pg.timeline or 0),
            ("xcha_upstream_ok", "1 when the standby's master answers", float(agent.upstream_check.ok)),
        ):
            gauge = GaugeMetricFamily(metric, text, labels=names)
            gauge.add_metric(labels, float(value))
            yield gauge
        lsn = GaugeMetricFamily("xcha_wal_position_bytes", "WAL positions", labels=[*names, "kind"])
        for kind in ("current", "receive", "flush", "replay"):
            lsn.add_metric([*labels, kind], float(getattr(agent.pg, f"{kind}_lsn") or 0))
        yield lsn
        if agent.controller_ok_at is not None:
            import time

            age = GaugeMetricFamily(
                "xcha_controller_reply_age_seconds", "since the controller last answered", labels=names
            )
            age.add_metric(labels, time.monotonic() - agent.controller_ok_at)
            yield age


class AgentMetrics:
    def __init__(self, agent: "Agent", address: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_AgentCollector(agent))
        self.server = _serve(self.registry, address)

    def close(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]


class _ControllerCollector(Collector):
    def __init__(self, controller: "Controller", metrics: "ControllerMetrics") -> None:
        self.controller = controller
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        controller = self.controller
        epoch = GaugeMetricFamily("xcha_epoch", "the controller's epoch")
        epoch.add_metric([], float(controller.epoch))
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
        for datanode in list(controller.groups):
            view = controller.group_status(datanode)
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
        for datanode, count in list(self.metrics.failovers.items()):
            failovers.add_metric([datanode], float(count))
        for datanode, count in list(self.metrics.switchovers.items()):
            switchovers.add_metric([datanode], float(count))
        yield failovers
        yield switchovers
        duration = GaugeMetricFamily(
            "xcha_last_failover_seconds", "the last failover, by phase", labels=["datanode", "phase"]
        )
        for datanode, phases in list(self.metrics.last_failover.items()):
            for phase, seconds in phases.items():
                duration.add_metric([datanode, phase], seconds)
        yield duration


class ControllerMetrics:
    def __init__(self, controller: "Controller", address: str) -> None:
        self.failovers: dict[str, int] = {}
        self.switchovers: dict[str, int] = {}
        self.last_failover: dict[str, dict[str, float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_ControllerCollector(controller, self))
        self.heartbeat_seconds = Histogram(
            "xcha_heartbeat_handling_seconds",
            "time to handle one heartbeat",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        controller.on_event = self._count
        controller.heartbeat_observer = self.heartbeat_seconds.observe
        self.server = _serve(self.registry, address)

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
