"""`xcha agent --config agent.toml`: the agent process."""

import asyncio
import logging
import signal

from xcha.agent.agent import Agent
from xcha.agent.config import AgentConfig
from xcha.agent.service import AgentService
from xcha.agent.state import StateFile
from xcha.authz import Guard
from xcha.pg.instance import PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.rpc import create_server, mark_serving
from xcha.tls import Identity, reload_certificates, require_identity
from xcha.v1 import xcha_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def build_agent(config: AgentConfig) -> Agent:
    flavor = config.postgres.flavor  # plain PostgreSQL, Postgres-XL or Postgres-XC binaries
    bindir = find_bindir(str(config.postgres.bindir) if config.postgres.bindir else None, flavor)
    runner = Runner(bindir, OsUser.for_postgres(config.postgres.run_as))
    version = server_version(bindir, flavor)
    instance = PostgresInstance(config.postgres.instance_spec(config.member), runner, version)
    runner.make_dir(config.state_dir, 0o755)
    return Agent(config, instance, StateFile(config.state_dir / "agent-state.json"))


async def serve_agent(config: AgentConfig) -> None:
    require_identity(config.tls, "agent", Identity("agent", config.member, config.datanode))
    agent = build_agent(config)
    guard = Guard()
    server, port, health = create_server(config.listen, config.tls, guard)
    pb_grpc.add_AgentServicer_to_server(AgentService(agent), server)
    metrics = None
    if config.metrics_listen:
        from xcha.agent.metrics import AgentMetrics, Reading

        metrics = AgentMetrics(
            lambda: Reading(agent.status_report(), agent.controller_ok_at),
            config.metrics_listen,
            guard=guard,
            tls=config.tls,
        )
    await server.start()
    await mark_serving(health, "xcha.v1.Agent")
    log.info(
        "agent %s of %s listening on port %d (PostgreSQL port %d, data %s)",
        config.member,
        config.datanode,
        port,
        agent.instance.port,  # a port taken over earlier, from the state file
        config.postgres.data_dir,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    loop.add_signal_handler(signal.SIGHUP, reload_certificates)
    try:
        await agent.run()
    finally:
        # PostgreSQL keeps running: an agent restart adopts it, and stopping the agent must
        # not take a datanode down.
        await server.stop(grace=1.0)
        if metrics is not None:
            metrics.close()
        log.info("agent %s stopped (PostgreSQL left as it is)", config.member)
