"""An agent's Prometheus metrics, read at each scrape from what the agent reports: the
MemberStatus it sends the controller (role, epoch, fenced, timeline, WAL positions, the
upstream check) and when the controller last answered it (`Reading`, taken on the agent's
event loop)."""

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from xcha.metrics import Exporter, on_loop
from xcha.rpc import status_from_proto
from xcha.v1 import xcha_pb2 as pb

if TYPE_CHECKING:
    from xcha.authz import Guard
    from xcha.config import TlsConfig

ROLE_NAMES = ("master", "standby", "stopped")
LSN_KINDS = ("current", "receive", "flush", "replay")


@dataclass(frozen=True)
class Reading:
    status: pb.MemberStatus  # as the agent reports itself (Agent.member_status())
    controller_ok_at: float | None  # time.monotonic() of the controller's last answer, if any


class _AgentCollector(Collector):
    def __init__(self, read: Callable[[], Reading], loop: asyncio.AbstractEventLoop) -> None:
        self.read = read
        self.loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = on_loop(self.loop, self.read)
        status = reading.status
        pg = status_from_proto(status.postgres_status)
        labels = [status.datanode, status.member]
        names = ["datanode", "member"]
        role = GaugeMetricFamily(
            "xcha_member_role", "1 for the role PostgreSQL has now", labels=[*names, "role"]
        )
        for name in ROLE_NAMES:
            role.add_metric([*labels, name], 1.0 if pg.role == name else 0.0)
        yield role
        for metric, text, value in (
            ("xcha_agent_epoch", "highest controller epoch persisted", status.epoch),
            ("xcha_agent_fenced", "1 when stopped on purpose", float(status.fenced)),
            ("xcha_postgres_timeline", "PostgreSQL timeline", pg.timeline or 0),
            ("xcha_upstream_ok", "1 when the standby's master answers", float(status.upstream.ok)),
        ):
            gauge = GaugeMetricFamily(metric, text, labels=names)
            gauge.add_metric(labels, float(value))
            yield gauge
        lsn = GaugeMetricFamily("xcha_wal_position_bytes", "WAL positions", labels=[*names, "kind"])
        for kind in LSN_KINDS:
            lsn.add_metric([*labels, kind], float(getattr(pg, f"{kind}_lsn") or 0))
        yield lsn
        if reading.controller_ok_at is not None:
            age = GaugeMetricFamily(
                "xcha_controller_reply_age_seconds", "since the controller last answered", labels=names
            )
            age.add_metric(labels, time.monotonic() - reading.controller_ok_at)
            yield age


class AgentMetrics(Exporter):
    def __init__(
        self,
        read: Callable[[], Reading],
        address: str,
        loop: asyncio.AbstractEventLoop | None = None,
        guard: "Guard | None" = None,
        tls: "TlsConfig | None" = None,
    ) -> None:
        """Made on the agent's event loop (or given it), where read() runs at each scrape."""
        collector = _AgentCollector(read, loop or asyncio.get_running_loop())
        super().__init__(address, [collector], guard, tls)
        self.start()
