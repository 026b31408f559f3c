"""The controller's Prometheus metrics, fed by what the controller publishes: its events
(`on_event`: failovers and switchovers, counted and timed by phase), the time it takes to
handle each heartbeat (`heartbeat_observer`), and its groups (`sample()`, plain values read
on its event loop a slice at a time at each scrape)."""

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xcha.controller.status import ClusterSample, GroupSample
from xcha.metrics import Exporter, on_loop

if TYPE_CHECKING:
    from xcha.authz import Guard
    from xcha.config import TlsConfig
    from xcha.controller.controller import Controller
    from xcha.controller.store import EventRecord

HEARTBEAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


class Publisher(Protocol):
    """What the metrics need of the controller process (`xcha.controller.node.ControllerNode`):
    each term's controller as it starts, and the controller of this term while it leads."""

    term_listeners: "list[Callable[[Controller], None]]"

    def leading(self) -> "Controller | None": ...


@dataclass
class Completed:
    """Failovers and switchovers counted from the controller's events (on its event loop)."""

    failovers: dict[str, int] = field(default_factory=dict)
    switchovers: dict[str, int] = field(default_factory=dict)
    last_failover: dict[str, dict[str, float]] = field(default_factory=dict)  # datanode -> phase -> s

    def observe(self, event: "EventRecord") -> None:
        """A `rerouted` event completes a failover or a switchover; its marks time the phases."""
        if event.kind != "rerouted":
            return
        details = event.details
        counts = self.switchovers if details.get("switchover") else self.failovers
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

    def copy(self) -> "Completed":
        return Completed(dict(self.failovers), dict(self.switchovers), dict(self.last_failover))


SAMPLE_SLICE = 100  # groups read per turn of the event loop


class _ControllerCollector(Collector):
    def __init__(
        self,
        sample: Callable[[int, int], ClusterSample],
        completed: Completed,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.sample = sample
        self.completed = completed
        self.loop = loop

    def snapshot(self) -> tuple[int, list[GroupSample], Completed]:
        """The groups read a slice per turn of the event loop (where nothing changes while a
        slice is read), so that a scrape never holds up a failover for long."""
        sample, completed = on_loop(self.loop, lambda: (self.sample(0, SAMPLE_SLICE), self.completed.copy()))
        epoch, groups = sample.epoch, list(sample.sampled)
        while sample.sampled and len(groups) < sample.groups:
            sample = on_loop(self.loop, partial(self.sample, len(groups), SAMPLE_SLICE))
            groups += sample.sampled
        return epoch, groups, completed

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        epoch_value, groups, completed = self.snapshot()
        epoch = GaugeMetricFamily("xcha_epoch", "the controller's epoch")
        epoch.add_metric([], float(epoch_value))
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
        for group in groups:
            datanode = group.name
            state.add_metric([datanode, group.state], 1.0)
            pending.add_metric([datanode], float(group.reroute_pending))
            paused.add_metric([datanode], float(group.paused))
            for member in group.members:
                role.add_metric([datanode, member.name, member.role], 1.0)
                if member.heartbeat_age is not None:
                    age.add_metric([datanode, member.name], member.heartbeat_age)
                lag.add_metric([datanode, member.name], float(member.lag_bytes))
                if member.sync_state:
                    sync.add_metric([datanode, member.name, member.sync_state], 1.0)
        yield from (state, role, age, lag, sync, pending, paused)
        failovers = CounterMetricFamily("xcha_failovers", "completed failovers", labels=["datanode"])
        switchovers = CounterMetricFamily("xcha_switchovers", "completed switchovers", labels=["datanode"])
        for datanode, count in completed.failovers.items():
            failovers.add_metric([datanode], float(count))
        for datanode, count in completed.switchovers.items():
            switchovers.add_metric([datanode], float(count))
        yield failovers
        yield switchovers
        duration = GaugeMetricFamily(
            "xcha_last_failover_seconds", "the last failover, by phase", labels=["datanode", "phase"]
        )
        for datanode, phases in completed.last_failover.items():
            for phase, seconds in phases.items():
                duration.add_metric([datanode, phase], seconds)
        yield duration


class ControllerMetrics(Exporter):
    def __init__(
        self,
        controller: Publisher,
        address: str,
        loop: asyncio.AbstractEventLoop | None = None,
        guard: "Guard | None" = None,
        tls: "TlsConfig | None" = None,
    ) -> None:
        """Made on the controller's event loop (or given it); subscribes to each term's events
        and heartbeat timings, then serves. A process that does not lead reports no groups."""
        self.completed = Completed()
        loop = loop or asyncio.get_running_loop()

        def sample(start: int, count: int) -> ClusterSample:
            leader = controller.leading()
            return leader.sample(start, count) if leader is not None else ClusterSample(0, 0, ())

        super().__init__(address, [_ControllerCollector(sample, self.completed, loop)], guard, tls)
        self.heartbeat_seconds = Histogram(
            "xcha_heartbeat_handling_seconds",
            "time to handle one heartbeat",
            registry=self.registry,
            buckets=HEARTBEAT_BUCKETS,
        )
        controller.term_listeners.append(self._subscribe)
        self.start()

    def _subscribe(self, controller: "Controller") -> None:
        controller.ledger.subscribers.append(self.completed.observe)
        controller.heartbeat_observer = self.heartbeat_seconds.observe
