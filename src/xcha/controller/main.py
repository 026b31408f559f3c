"""`xcha controller --config controller.toml`: the controller process."""

import asyncio
import logging
import signal
import sys

from xcha.authz import Guard
from xcha.controller.config import ControllerConfig
from xcha.controller.heap import keep_heap_frozen
from xcha.controller.node import ControllerNode
from xcha.controller.service import ControllerService
from xcha.controller.store import Leadership, SqliteLeadership, SqliteStore, Store
from xcha.rpc import create_server, liveness_options, mark_serving
from xcha.tls import reload_certificates, require_identity
from xcha.v1 import xcha_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long another Python thread (prometheus_client's HTTP thread formatting a scrape) may keep
# the event loop waiting for the interpreter lock: 5 ms by default, paid at every step of a
# failover that falls in a scrape. Measured with 1,000 groups (`./run bench scale`, the crash
# that falls on the scrape closing the window): crash to Promote 68 ms, 45 ms with 1 ms.
SWITCH_INTERVAL = 0.001


def open_store(config: ControllerConfig) -> tuple[Store, Leadership]:
    """The store and leader election `[store]` names: SQLite in the state directory (one
    controller) or etcd (several)."""
    if config.store.kind == "etcd":
        from xcha.controller.store.etcd import EtcdLeadership, EtcdSettings, EtcdStore

        settings = EtcdSettings(
            endpoints=config.store.endpoints,
            prefix=config.store.prefix,
            ttl=config.store.lease_ttl,
            ca=config.store.ca_file,
            cert=config.store.cert_file,
            key=config.store.key_file,
            timeout=config.store.timeout,
        )
        etcd_leadership = EtcdLeadership(settings, config.name, config.advertise)
        return EtcdStore(settings, etcd_leadership), etcd_leadership
    path = config.state_dir / "controller.sqlite3"
    leadership = SqliteLeadership(path, config.name, config.advertise)
    return SqliteStore(path, leadership), leadership


async def serve_controller(config: ControllerConfig) -> None:
    require_identity(config.tls, "controller")
    sys.setswitchinterval(SWITCH_INTERVAL)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store, leadership = open_store(config)
    node = ControllerNode(config, store, leadership)
    guard = Guard()
    server, port, health = create_server(config.listen, config.tls, guard, liveness_options(config.keepalive))
    pb_grpc.add_ControllerServicer_to_server(ControllerService(node, guard), server)
    metrics = None
    if config.metrics_listen:
        from xcha.controller.metrics import ControllerMetrics

        metrics = ControllerMetrics(node, config.metrics_listen, guard=guard, tls=config.tls)
    await server.start()
    await mark_serving(health, "xcha.v1.Controller")
    log.info(
        "controller listening on port %d as %s, %d datanode(s), router %s, store %s",
        port,
        config.name,
        len(config.datanodes),
        config.router.kind,
        config.store.kind,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificates)
    runner = asyncio.create_task(node.run())
    heap = asyncio.create_task(keep_heap_frozen())
    try:
        await stopping.wait()
    finally:
        heap.cancel()
        await node.stop()
        await asyncio.gather(runner, return_exceptions=True)
        await server.stop(grace=1.0)
        await store.close()
        await leadership.close()
        if metrics is not None:
            metrics.close()
        log.info("controller stopped")
