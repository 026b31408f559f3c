"""Both xcha servers, real and in this process, for the authorization and fuzz tests: a
controller (dn1 = dn1a + dn1b, router none, automatic actions paused) and the agent of dn1a
(no PostgreSQL: nothing starts one), each on 127.0.0.1 port 0 with mTLS and the authorization
interceptor, on an event loop in a thread of their own. Clients are blocking channels with a
certificate per role, so that hypothesis drives them from plain test functions.
"""

import asyncio
import datetime
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xcha.agent.agent import Agent
from xcha.agent.config import load_agent_config
from xcha.agent.service import AgentService
from xcha.agent.state import StateFile
from xcha.authz import Guard
from xcha.config import TlsConfig
from xcha.controller.config import load_controller_config
from xcha.controller.node import ControllerNode
from xcha.controller.routing import Router
from xcha.controller.service import ControllerService
from xcha.controller.store import SqliteLeadership, SqliteStore
from xcha.pg.instance import PostgresInstance
from xcha.pg.runner import OsUser, Runner
from xcha.rpc import blocking_channel, create_server, liveness_options, mark_serving
from xcha.tls import Identity, create_ca, issue
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

T = TypeVar("T")

# The caller of each role; the agent is dn1's standby dn1b, calling as itself.
CALLERS = {
    "agent": Identity("agent", "dn1b", "dn1"),
    "controller": Identity("controller", "controller"),
    "operator": Identity("operator", "alice"),
    "coordinator": Identity("coordinator", "coord1"),
    "monitor": Identity("monitor", "grafana"),
}
SERVED_AGENT = Identity("agent", "dn1a", "dn1")
NOT_KNOWN = "dn9"  # a datanode and member neither server knows: allowed calls change nothing


def harmless_request(rpc: str, caller: Identity) -> Any:
    """For each RPC a request that an allowed caller may make without changing anything: the
    matrix is about who may call, not about what a call does."""
    requests: dict[str, Any] = {
        "/xcha.v1.Controller/Heartbeat": pb.HeartbeatRequest(
            status=pb.MemberStatus(datanode=caller.datanode or "dn1", member=caller.name)
        ),
        "/xcha.v1.Controller/Heartbeats": pb.HeartbeatRequest(
            status=pb.MemberStatus(datanode=caller.datanode or "dn1", member=caller.name)
        ),
        "/xcha.v1.Controller/ReportNodeFailure": pb.NodeFailureReport(datanode=NOT_KNOWN),
        "/xcha.v1.Controller/GetClusterStatus": pb.ClusterStatusRequest(),
        "/xcha.v1.Controller/ListEvents": pb.EventsRequest(limit=1),
        "/xcha.v1.Controller/Switchover": pb.SwitchoverRequest(datanode=NOT_KNOWN),
        "/xcha.v1.Controller/Failover": pb.FailoverRequest(datanode=NOT_KNOWN),
        "/xcha.v1.Controller/SetPaused": pb.PauseRequest(datanode=NOT_KNOWN, paused=True),
        "/xcha.v1.Controller/AddStandby": pb.AddStandbyRequest(datanode=NOT_KNOWN, member=NOT_KNOWN),
        "/xcha.v1.Controller/RemoveStandby": pb.RemoveStandbyRequest(datanode=NOT_KNOWN, member=NOT_KNOWN),
        "/xcha.v1.Controller/SetStandbyMode": pb.StandbyModeRequest(
            datanode=NOT_KNOWN, member=NOT_KNOWN, mode="sync"
        ),
        "/xcha.v1.Agent/GetStatus": pb.GetStatusRequest(),
        "/xcha.v1.Agent/Promote": pb.PromoteRequest(member=NOT_KNOWN),
        "/xcha.v1.Agent/Follow": pb.FollowRequest(
            member=NOT_KNOWN, upstream=pb.Endpoint(host="127.0.0.1", port=5432)
        ),
        "/xcha.v1.Agent/Fence": pb.FenceRequest(member=NOT_KNOWN),
        "/xcha.v1.Agent/SetSynchronousStandbys": pb.SetSynchronousStandbysRequest(
            member=NOT_KNOWN, synchronous_standbys=pb.SyncStandbys(method="first", count=1)
        ),
        "/xcha.v1.Agent/Checkpoint": pb.CheckpointRequest(member=NOT_KNOWN),
        "/xcha.v1.Agent/Detach": pb.DetachRequest(member=NOT_KNOWN),
        "/xcha.v1.Agent/Remove": pb.RemoveRequest(member=NOT_KNOWN),
    }
    return requests[rpc] if rpc in requests else request_class(rpc)()  # the health service


def _method(rpc: str) -> tuple[Any, Any]:
    """The module of an RPC's messages, and its method descriptor."""
    from grpc_health.v1 import health_pb2

    service, _, method = rpc.strip("/").partition("/")
    module = health_pb2 if service == "grpc.health.v1.Health" else pb
    return module, module.DESCRIPTOR.services_by_name[service.rpartition(".")[2]].methods_by_name[method]


def request_class(rpc: str) -> Any:
    module, method = _method(rpc)
    return getattr(module, method.input_type.name)


def response_class(rpc: str) -> Any:
    module, method = _method(rpc)
    return getattr(module, method.output_type.name)


def identityless_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate of the CA in directory that names no xcha identity (as `xcha tls init` made
    them before identities): authenticated, but allowed nothing."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem, key_path


@dataclass
class Servers:
    directory: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    controller_address: str = ""
    agent_address: str = ""
    guards: dict[str, Guard] = field(default_factory=dict)
    channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    def tls(self, name: str) -> TlsConfig:
        return TlsConfig(self.tls_dir / "ca.pem", self.tls_dir / f"{name}.pem", self.tls_dir / f"{name}.key")

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the servers' event loop (their state is only touched there)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def start(self) -> None:
        self.tls_dir.mkdir(parents=True)
        create_ca(self.tls_dir)
        for identity in (*CALLERS.values(), SERVED_AGENT):
            issue(self.tls_dir, identity)
        identityless_certificate(self.tls_dir, "anonymous")
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.run(self._start())

    async def _start(self) -> None:
        self.node = self._node()
        self.node_task = asyncio.ensure_future(self.node.run())
        while self.node.leading() is None:
            await asyncio.sleep(0.01)
        self.controller = self.node.leading()
        self.controller.set_paused(None, True)  # fuzzed heartbeats must not start a bootstrap
        await self.controller.ledger.flush()
        self.agent = self._agent()
        self.guards = {"controller": Guard(), "agent": Guard()}
        server, port, health = create_server(
            "127.0.0.1:0",
            self.tls("controller"),
            self.guards["controller"],
            liveness_options(self.node.config.keepalive),
        )
        pb_grpc.add_ControllerServicer_to_server(
            ControllerService(self.node, self.guards["controller"]), server
        )
        await server.start()
        await mark_serving(health, "xcha.v1.Controller")
        self.controller_server, self.controller_address = server, f"127.0.0.1:{port}"
        server, port, health = create_server("127.0.0.1:0", self.tls("dn1a"), self.guards["agent"])
        pb_grpc.add_AgentServicer_to_server(AgentService(self.agent), server)
        await server.start()
        await mark_serving(health, "xcha.v1.Agent")
        self.agent_server, self.agent_address = server, f"127.0.0.1:{port}"

    def _node(self) -> ControllerNode:
        tls = self.tls("controller")
        path = self.directory / "controller.toml"
        path.write_text(
            f"""
[controller]
listen = "127.0.0.1:7000"
state_dir = "{self.directory}/controller"

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]

[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
"""
        )
        config = load_controller_config(path)
        leadership = SqliteLeadership(self.directory / "controller.sqlite3")
        store = SqliteStore(self.directory / "controller.sqlite3", leadership)
        return ControllerNode(config, store, leadership, router=lambda: Router("none", []))

    def _agent(self) -> Agent:
        tls = self.tls("dn1a")
        password = self.directory / "replication.password"
        password.write_text("secret\n")
        path = self.directory / "agent.toml"
        path.write_text(
            f"""
[agent]
datanode = "dn1"
member = "dn1a"
listen = "127.0.0.1:7001"
controller = "127.0.0.1:7000"
state_dir = "{self.directory}/agent"

[postgres]
data_dir = "{self.directory}/dn1a/data"
archive_dir = "{self.directory}/archive"
replication_password_file = "{password}"
socket_dir = "{self.directory}"

[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
"""
        )
        config = load_agent_config(path)
        runner = Runner(Path("/nonexistent/bindir"), OsUser.for_postgres())  # runs nothing
        instance = PostgresInstance(config.postgres.instance_spec(config.member), runner, 150000)
        return Agent(config, instance, StateFile(config.state_dir / "agent-state.json"))

    def channel(self, server: str, name: str) -> grpc.Channel:
        """A kept blocking channel to "controller" or "agent" with NAME.pem (one TLS handshake)."""
        key = (server, name)
        if key not in self.channels:
            address = self.controller_address if server == "controller" else self.agent_address
            self.channels[key] = blocking_channel(address, self.tls(name))
        return self.channels[key]

    def call(
        self, server: str, rpc: str, request: Any, name: str, timeout: float = 10
    ) -> tuple[grpc.StatusCode, str]:
        """One call to "controller" or "agent" as NAME.pem: (status code, details). A streaming
        call (the health service's Watch) counts as answered with its first response; a stream
        of requests (Heartbeats) carries this one request and is answered with one response."""
        channel = self.channel(server, name)
        options: dict[str, Any] = {
            "request_serializer": lambda message: message.SerializeToString(),
            "response_deserializer": response_class(rpc).FromString,
        }
        try:
            if rpc.endswith("/Watch"):
                responses = channel.unary_stream(rpc, **options)(request, timeout=timeout)
                next(responses)
                responses.cancel()
            elif rpc.endswith("/Heartbeats"):
                responses = channel.stream_stream(rpc, **options)(iter([request]), timeout=timeout)
                next(responses)
                responses.cancel()
            else:
                channel.unary_unary(rpc, **options)(request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    def state(self) -> tuple[object, ...]:
        """Everything a call could change on either server (the refusals' own events aside)."""
        return self.run(self._state())

    async def _state(self) -> tuple[object, ...]:
        controller, agent = self.controller, self.agent
        await controller.ledger.flush()
        events = [
            (e.datanode, e.kind, e.message)
            for e in await controller.ledger.store.events(limit=100000)
            if e.kind not in ("refused", "certificate")
        ]
        observed = {
            name: o.status.SerializeToString(deterministic=True) if o.status else None
            for name, o in controller.observations.items()
        }
        return (
            controller.epoch,
            controller.cluster_paused,
            dict(controller.groups),
            dict(controller.records),
            observed,
            events,
            agent.state,
            agent.state_file.path.read_bytes() if agent.state_file.path.exists() else b"",
            agent.activity,
        )

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()

        async def stop() -> None:
            await self.controller_server.stop(None)
            await self.agent_server.stop(None)
            await self.node.stop()
            await self.node_task
            await self.node.store.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


def servers_of(rpc: str) -> tuple[str, ...]:
    """Which of the two servers serve an RPC: the health service runs on both."""
    if rpc.startswith("/xcha.v1.Agent/"):
        return ("agent",)
    if rpc.startswith("/xcha.v1.Controller/"):
        return ("controller",)
    return ("controller", "agent")
