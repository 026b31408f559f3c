"""Authorization: every RPC x every role against the real servers (allowed, or PERMISSION_DENIED
naming the identity and the RPC, with nothing changed), the "only as itself" rule of heartbeats,
certificates that authenticate nobody, and refusals counted and reported."""

import contextlib
import random
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.servers import CALLERS, Servers, harmless_request, servers_of
from xcha.authz import TABLE, Guard, markdown, short
from xcha.config import TlsConfig
from xcha.metrics import _SecurityCollector
from xcha.rpc import create_server
from xcha.tls import ROLES, Identity, create_ca, issue
from xcha.v1 import xcha_pb2 as pb

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("authz"))
    running.start()
    yield running
    running.stop()


def test_the_table_names_every_rpc_of_both_servers_and_nothing_else() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for service in (
            *pb.DESCRIPTOR.services_by_name.values(),
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        )
        for method in service.methods
    }
    assert set(TABLE) == served
    assert all(set(rule.roles) <= set(ROLES) and rule.roles for rule in TABLE.values())


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rpc", list(TABLE), ids=short)
def test_every_rpc_for_every_role(servers: Servers, rpc: str, role: str) -> None:
    caller = CALLERS[role]
    for server in servers_of(rpc):
        before = servers.state()
        code, details = servers.call(server, rpc, harmless_request(rpc, caller), caller.name)
        if role in TABLE[rpc].roles:
            assert code != DENIED, f"{caller} was refused {short(rpc)} on the {server}: {details}"
        else:
            assert code == DENIED, f"{caller} was not refused {short(rpc)} on the {server}: {code}"
            assert str(caller) in details and short(rpc) in details, details
            assert servers.state() == before, "a refused call changed something"


@pytest.mark.parametrize(
    ("datanode", "member"), [("dn1", "dn1a"), ("dn2", "dn1b"), ("dn1", ""), ("", "dn1b")]
)
def test_an_agent_heartbeats_only_as_the_member_its_certificate_names(
    servers: Servers, datanode: str, member: str
) -> None:
    """A standby's certificate claiming the master's postmaster died is refused: before this
    rule, it made the controller fence a healthy master and promote."""
    claim = pb.HeartbeatRequest(
        status=pb.MemberStatus(
            datanode=datanode,
            member=member,
            postgres_status=pb.PostgresStatus(running=False, role=pb.ROLE_STOPPED),
            postmaster_died=True,
        ),
        reason="postmaster died",
    )
    before = servers.state()
    code, details = servers.call("controller", "/xcha.v1.Controller/Heartbeat", claim, "dn1b")
    assert code == DENIED
    assert "xcha://agent/dn1/dn1b may not call Controller.Heartbeat as member" in details
    assert servers.state() == before


def test_an_agents_own_heartbeat_is_served(servers: Servers) -> None:
    own = pb.HeartbeatRequest(status=pb.MemberStatus(datanode="dn1", member="dn1b", boot_id="b", sequence=1))
    assert servers.call("controller", "/xcha.v1.Controller/Heartbeat", own, "dn1b")[0] == grpc.StatusCode.OK
    assert servers.run(_observed(servers, "dn1b"))


def test_each_report_on_a_stream_is_checked_as_it_arrives(servers: Servers) -> None:
    """A Heartbeats stream is authorized when it opens and each report on it again: the
    agent's own reports are answered, one as another member ends the stream refused."""
    channel = servers.channel("controller", "dn1b")
    call = channel.stream_stream(
        "/xcha.v1.Controller/Heartbeats",
        request_serializer=pb.HeartbeatRequest.SerializeToString,
        response_deserializer=pb.HeartbeatReply.FromString,
    )
    own = pb.HeartbeatRequest(status=pb.MemberStatus(datanode="dn1", member="dn1b", boot_id="s", sequence=1))
    other = pb.HeartbeatRequest(
        status=pb.MemberStatus(
            datanode="dn1",
            member="dn1a",
            postgres_status=pb.PostgresStatus(running=False, role=pb.ROLE_STOPPED),
            postmaster_died=True,
        ),
        reason="postmaster died",
    )
    replies = call(iter([own]), timeout=10)
    assert next(replies).heartbeat_interval > 0
    assert servers.run(_observed(servers, "dn1b"))
    before = servers.state()
    replies = call(iter([own, other]), timeout=10)
    assert next(replies).heartbeat_interval > 0
    with pytest.raises(grpc.RpcError) as refused:
        next(replies)
    assert refused.value.code() == DENIED
    assert "xcha://agent/dn1/dn1b may not call Controller.Heartbeats as member 'dn1a'" in (
        refused.value.details() or ""
    )
    assert servers.state() == before, "a refused report changed something"


async def _observed(servers: Servers, member: str) -> bool:
    return servers.controller.observations[member].status is not None


def test_a_certificate_without_an_identity_may_call_nothing(servers: Servers) -> None:
    for rpc in TABLE:
        for server in servers_of(rpc):
            code, details = servers.call(server, rpc, harmless_request(rpc, CALLERS["operator"]), "anonymous")
            assert code == DENIED, short(rpc)
            assert "CN=anonymous" in details and "names no xcha identity" in details, details


def test_refusals_are_counted_and_reported_once_a_minute(servers: Servers) -> None:
    guard = servers.guards["controller"]
    request = pb.PauseRequest(datanode="dn1", paused=False)
    before = guard.refused.get(("Controller.SetPaused", "monitor"), 0)
    for _ in range(3):
        assert servers.call("controller", "/xcha.v1.Controller/SetPaused", request, "grafana")[0] == DENIED
    assert guard.refused[("Controller.SetPaused", "monitor")] == before + 3
    events = [
        e.message
        for e in servers.run(_events(servers))
        if e.kind == "refused" and "xcha://monitor/grafana may not call Controller.SetPaused" in e.message
    ]
    assert len(events) == 1, events  # the matrix refused it first; these three fell in that minute
    registry = CollectorRegistry()
    registry.register(_SecurityCollector(guard, servers.tls("controller")))
    text = generate_latest(registry).decode()
    assert f'xcha_rpc_refused_total{{role="monitor",rpc="Controller.SetPaused"}} {before + 3}.0' in text
    assert (
        'xcha_certificate_expiry_seconds{certificate="own",identity="xcha://controller/controller"}' in text
    )
    assert "xcha_certificate_expiry_warning 0.0" in text


async def _events(servers: Servers) -> list[object]:
    await servers.controller.ledger.flush()
    return list(await servers.controller.ledger.store.events(limit=100000))


def test_a_report_names_the_certificate_that_made_it(servers: Servers) -> None:
    report = pb.NodeFailureReport(datanode="dn1", member="dn1a", reporter="somebody", detail="unreachable")
    code, _ = servers.call("controller", "/xcha.v1.Controller/ReportNodeFailure", report, "coord1")
    assert code == grpc.StatusCode.OK
    assert any(
        "somebody (xcha://coordinator/coord1) reports dn1a failing" in getattr(e, "message", "")
        for e in servers.run(_events(servers))
    )


def test_unauthenticated_callers_never_get_through_the_handshake(servers: Servers, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    create_ca(rogue)
    cert, key = issue(rogue, Identity("operator", "alice"))
    ca = (servers.tls_dir / "ca.pem").read_bytes()
    attempts = {
        "no client certificate": grpc.ssl_channel_credentials(root_certificates=ca),
        "a certificate from another CA (same identity)": grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        ),
    }
    request = health_pb2.HealthCheckRequest()
    for address in (servers.controller_address, servers.agent_address):
        for what, credentials in attempts.items():
            with grpc.secure_channel(address, credentials) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    _health_check(channel, request)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                _health_check(channel, request)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "plaintext"


def _health_check(channel: grpc.Channel, request: health_pb2.HealthCheckRequest) -> None:
    channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(request, timeout=5)


def _raw(address: str, payload: bytes) -> None:
    """Bytes straight onto a server's port, then EOF; read until it hangs up (it may at once)."""
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(2)
        while connection.recv(65536):
            pass


def test_random_bytes_and_oversized_messages_leave_both_servers_serving(servers: Servers) -> None:
    rng = random.Random(7)
    status = pb.ClusterStatusRequest()
    for address in (servers.controller_address, servers.agent_address):
        for size in (1, 100, 70000):
            _raw(address, rng.randbytes(size))
        _raw(address, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(5000))  # plaintext HTTP/2
        # TLS done right, then garbage where HTTP/2 should be.
        context = ssl.create_default_context(cafile=str(servers.tls_dir / "ca.pem"))
        context.load_cert_chain(servers.tls_dir / "alice.pem", servers.tls_dir / "alice.key")
        host, _, port = address.rpartition(":")
        with (
            contextlib.suppress(OSError),  # the server may hang up before all of it arrives
            socket.create_connection((host, int(port)), timeout=5) as plain,
            context.wrap_socket(plain, server_hostname="localhost") as secure,
        ):
            secure.sendall(rng.randbytes(20000))
    oversized = pb.AddStandbyRequest(datanode="dn1", member="x" * (5 << 20))
    code, _ = servers.call("controller", "/xcha.v1.Controller/AddStandby", oversized, "alice")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = servers.call(
        "agent", "/xcha.v1.Agent/Fence", pb.FenceRequest(member="x" * (5 << 20)), "controller"
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    garbage = servers.channel("controller", "alice").unary_unary("/xcha.v1.Controller/SetPaused")
    for size in (3, 50, 4000):
        with pytest.raises(grpc.RpcError):
            garbage(rng.randbytes(size) + b"\xff\xff\xff\xff\xff", timeout=5)
    assert (
        servers.call("controller", "/xcha.v1.Controller/GetClusterStatus", status, "alice")[0]
        == grpc.StatusCode.OK
    )
    assert (
        servers.call("agent", "/xcha.v1.Agent/GetStatus", pb.GetStatusRequest(), "controller")[0]
        == grpc.StatusCode.OK
    )


async def test_insecure_servers_authorize_nothing_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    server, port, _ = create_server("127.0.0.1:0", TlsConfig(insecure=True), Guard())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)
    assert any(
        "PLAINTEXT" in r.message and "neither authenticated nor authorized" in r.message
        for r in caplog.records
    )


def test_the_table_is_printed_from_the_code() -> None:
    design = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    assert f"<!-- authz-table:begin -->\n{markdown()}<!-- authz-table:end -->" in design
    lines = markdown().splitlines()
    assert lines[0] == "| RPC | agent | controller | operator | coordinator | monitor | only as itself |"
    assert "| `Controller.SetPaused` | - | - | yes | - | - |  |" in lines
    assert len(lines) == 2 + len(TABLE)
