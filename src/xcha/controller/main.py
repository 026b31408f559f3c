"""`xcha controller --config controller.toml`: the controller process."""

import asyncio
import logging
import signal

from xcha.authz import Guard
from xcha.controller.config import ControllerConfig
from xcha.controller.controller import Controller
from xcha.controller.routers import build_router
from xcha.controller.service import ControllerService
from xcha.controller.store import SqliteStore
from xcha.rpc import create_server, mark_serving
from xcha.tls import reload_certificates, require_identity
from xcha.v1 import xcha_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


async def serve_controller(config: ControllerConfig) -> None:
    require_identity(config.tls, "controller")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(config.state_dir / "controller.sqlite3")
    controller = Controller(config, store, build_router(config))
    guard = Guard()
    server, port, health = create_server(config.listen, config.tls, guard)
    pb_grpc.add_ControllerServicer_to_server(ControllerService(controller, guard), server)
    metrics = None
    if config.metrics_listen:
        from xcha.metrics import ControllerMetrics

        metrics = ControllerMetrics(controller, config.metrics_listen, guard=guard, tls=config.tls)
    await server.start()
    await mark_serving(health, "xcha.v1.Controller")
    log.info(
        "controller listening on port %d, epoch %d, %d datanode(s), router %s",
        port,
        controller.epoch,
        len(config.datanodes),
        config.router.kind,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificates)
    runner = asyncio.create_task(controller.run())
    try:
        await stopping.wait()
    finally:
        await server.stop(grace=1.0)
        await controller.stop()
        runner.cancel()
        store.close()
        if metrics is not None:
            metrics.close()
        log.info("controller stopped")
