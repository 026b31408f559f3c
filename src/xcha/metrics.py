"""Prometheus metrics: what the controller's (`xcha.controller.metrics`) and the agents'
(`xcha.agent.metrics`) exporters share: the HTTP server, the security metrics of both gRPC
servers, and reading a process's state on its event loop.

Collectors read the live state at scrape time, so nothing has to be kept in step with it;
only counts of past events (failovers, switchovers) and the heartbeat handling histogram
are accumulated, by subscribers.

prometheus_client scrapes on its HTTP server's thread while the event loop changes that
state, so a process's state is read on its event loop (`on_loop`): one scrape sees one
consistent picture.
"""

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xcha.names import check_address

if TYPE_CHECKING:
    from xcha.authz import Guard
    from xcha.config import TlsConfig

SNAPSHOT_TIMEOUT = 5.0  # a scrape waits this long for the process's event loop
T = TypeVar("T")


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


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], T], timeout: float = SNAPSHOT_TIMEOUT) -> T:
    """read() on the event loop's thread, where nothing changes while it runs: at once when
    called there, else (prometheus_client's HTTP thread) waiting up to timeout for the loop."""
    try:
        there = asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop in this thread
        there = False
    if there:
        return read()

    async def run() -> T:
        return read()

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


class Exporter:
    """One process's metrics, served over HTTP at address: its own collectors, and the
    security metrics when it has a guard and TLS settings."""

    def __init__(
        self,
        address: str,
        collectors: Iterable[Collector] = (),
        guard: "Guard | None" = None,
        tls: "TlsConfig | None" = None,
    ) -> None:
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        if guard is not None and tls is not None:
            self.registry.register(_SecurityCollector(guard, tls))
        self._address = address
        self._server: object = None

    def start(self) -> None:
        host, port = check_address(self._address, "metrics address")
        self._server, _thread = start_http_server(port, host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None
