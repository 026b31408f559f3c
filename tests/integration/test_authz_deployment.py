"""Authorization and secrets on a whole deployment made by `xcha up` (two datanodes, a
coordinator, four agents and a controller under a supervisor, real PostgreSQL):

- a standby's certificate claiming its master's postmaster died, fencing the master, promoting
  itself or pausing the cluster changes nothing and causes no failover; each refusal is an event;
- certificates renewed on disk are taken on SIGHUP, without a restart, by servers and clients,
  and one expiring within 30 days is reported;
- no password or private key is on any process's command line, in its environment or in any log.
"""

import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.conftest import SESSION_BASE, processes_under
from xcha.config import TlsConfig
from xcha.rpc import blocking_channel
from xcha.tls import Identity, issue
from xcha.topology import TOPOLOGY_FILE, Topology
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
DENIED = grpc.StatusCode.PERMISSION_DENIED


def xcha(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The real command line, finding PostgreSQL as this run does, no other XCHA_* setting."""
    keep = ("XCHA_PG_BINDIR", "XCHA_PG_USER")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCHA_") or k in keep}
    return subprocess.run(
        [sys.executable, "-m", "xcha", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


class Deployment:
    def __init__(self, workdir: Path, up: subprocess.CompletedProcess[str]) -> None:
        self.workdir = workdir
        self.up = up
        self.topology = Topology.load(workdir, supervise=True)

    def tls(self, name: str) -> TlsConfig:
        directory = self.workdir / "tls"
        return TlsConfig(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")

    def agent_address(self, member: str) -> str:
        return f"127.0.0.1:{self.topology.members[member].agent_port}"

    @property
    def controller_address(self) -> str:
        return f"127.0.0.1:{self.topology.controller_port}"

    def group(self, datanode: str) -> pb.GroupView:
        return self.topology.group(datanode)

    def pid(self, key: str) -> int:
        return self.topology.supervised()[key]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    workdir = Path(os.path.realpath(SESSION_BASE)) / "authz-up"
    up = xcha("up", "--workdir", str(workdir))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Deployment(workdir, up)
    finally:
        down = xcha("down", "--workdir", str(workdir), timeout=120)
        if (workdir / TOPOLOGY_FILE).exists():  # whatever `xcha down` could not stop
            import asyncio

            asyncio.run(Topology.load(workdir).down())
        assert down.returncode == 0, down.stderr


def _code(call: "grpc.UnaryUnaryMultiCallable", request: object) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_standbys_certificate_cannot_fail_over_its_master(deployment: Deployment) -> None:
    # The deployment's own calls are all allowed: nothing was refused while it came up.
    assert not deployment.topology.events(kind="refused")
    for log in (deployment.workdir / "logs").glob("*.log"):
        assert "refused:" not in log.read_text(), log
    group = deployment.group("dn1")
    master = group.master
    standby = next(m.name for m in group.members if m.name != master)
    postmaster = deployment.topology.postmaster_pid(master)
    epoch = deployment.topology.status().epoch
    events_before = {e.id for e in deployment.topology.events()}
    as_standby = deployment.tls(standby)
    with (
        blocking_channel(deployment.controller_address, as_standby) as controller,
        blocking_channel(deployment.agent_address(master), as_standby) as master_agent,
        blocking_channel(deployment.agent_address(standby), as_standby) as own_agent,
    ):
        to_controller = pb_grpc.ControllerStub(controller)
        dead_master = pb.HeartbeatRequest(
            status=pb.MemberStatus(
                datanode="dn1",
                member=master,
                postgres_status=pb.PostgresStatus(running=False, role=pb.ROLE_STOPPED),
                epoch=epoch,
                boot_id="impostor",
                sequence=2**63,
                postmaster_died=True,
            ),
            reason="postmaster died",
        )
        for _ in range(8):  # as often as the master's own agent reports, for 2 s
            code, details = _code(to_controller.Heartbeat, dead_master)
            assert code == DENIED and f"xcha://agent/dn1/{standby}" in details, details
            time.sleep(0.25)
        attempts = {
            "report the master failed": (
                to_controller.ReportNodeFailure,
                pb.NodeFailureReport(datanode="dn1", member=master, reporter=standby),
            ),
            "fail over to itself": (
                to_controller.Failover,
                pb.FailoverRequest(datanode="dn1", to_member=standby),
            ),
            "pause the cluster": (to_controller.SetPaused, pb.PauseRequest(paused=True)),
            "fence the master": (
                pb_grpc.AgentStub(master_agent).Fence,
                pb.FenceRequest(epoch=epoch, member=master, reason="impostor"),
            ),
            "promote itself": (
                pb_grpc.AgentStub(own_agent).Promote,
                pb.PromoteRequest(epoch=epoch, member=standby),
            ),
        }
        for what, (method, request) in attempts.items():
            code, details = _code(method, request)
            assert code == DENIED, f"{what}: {code} {details}"
    with blocking_channel(deployment.agent_address(master), deployment.tls("operator")) as channel:
        code, _ = _code(pb_grpc.AgentStub(channel).Fence, pb.FenceRequest(epoch=epoch, member=master))
        assert code == DENIED, "an operator sends no node-role messages either"
    time.sleep(2 * deployment.topology.plan.failure_timeout)
    group = deployment.group("dn1")
    assert group.master == master and group.state == "protected" and not group.paused
    assert deployment.topology.postmaster_pid(master) == postmaster, "the master was not touched"
    new = [e for e in deployment.topology.events() if e.id not in events_before]
    assert not [e.message for e in new if e.kind in ("failover", "fence", "switchover", "pause")]
    refused = [e.message for e in new if e.kind == "refused"]
    assert any(
        f"xcha://agent/dn1/{standby} may not call Controller.Heartbeat as member" in m for m in refused
    )
    assert any(f"xcha://agent/dn1/{standby} may not call Controller.SetPaused" in m for m in refused)
    log = (deployment.workdir / "logs" / f"agent-{master}.log").read_text()
    assert f"refused: xcha://agent/dn1/{standby} may not call Agent.Fence" in log


def _served_serial(address: str, tls: TlsConfig) -> int:
    """The serial number of the certificate a server presents on a new connection."""
    assert tls.ca_file and tls.cert_file and tls.key_file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(tls.ca_file)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as plain,
        context.wrap_socket(plain, server_hostname=host) as secure,
    ):
        der = secure.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _until(check: "object", what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def _renew(deployment: Deployment, identity: Identity, days: int) -> int:
    hosts = ("127.0.0.1", "::1", "localhost")
    cert, _ = issue(deployment.workdir / "tls", identity, hosts, datetime.timedelta(days=days))
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def test_certificates_are_renewed_on_sighup_without_a_restart(deployment: Deployment) -> None:
    member, operator = "dn2b", deployment.tls("operator")
    agent_pid, controller_pid = deployment.pid(f"agent:{member}"), deployment.pid("controller")
    address = deployment.agent_address(member)
    old = _served_serial(address, operator)
    renewed = _renew(deployment, Identity("agent", member, "dn2"), days=10)
    assert _served_serial(address, operator) == old, "nothing changes before SIGHUP"
    os.kill(agent_pid, signal.SIGHUP)
    _until(lambda: _served_serial(address, operator) == renewed, "new certificate served by the agent")
    # Its heartbeats reconnect with the renewed certificate: the controller sees it expire soon.
    _until(
        lambda: any(
            f"xcha://agent/dn2/{member} expires in 9 day(s)" in e.message
            for e in deployment.topology.events(kind="certificate")
        ),
        "expiry warning from the controller",
    )
    log = (deployment.workdir / "logs" / f"agent-{member}.log").read_text()
    assert f"certificates reloaded: xcha://agent/dn2/{member}" in log

    renewed = _renew(deployment, Identity("controller", "controller"), days=825)
    os.kill(controller_pid, signal.SIGHUP)
    _until(
        lambda: _served_serial(deployment.controller_address, operator) == renewed,
        "new certificate served by the controller",
    )
    assert deployment.pid(f"agent:{member}") == agent_pid and deployment.pid("controller") == controller_pid
    group = deployment.group("dn2")
    assert group.state == "protected", group.reason
    assert all(0 <= m.heartbeat_age < 1 for m in group.members), "the agents still report"


def _secrets(workdir: Path) -> dict[str, bytes]:
    """Each password, and each private key's first base64 line (enough to recognize it)."""
    found = {p.name: p.read_bytes().strip() for p in (workdir / "secrets").glob("*.password")}
    for key in (workdir / "tls").glob("*.key"):
        found[key.name] = key.read_bytes().splitlines()[1]
    assert len(found) >= 2 + 6, found.keys()  # 2 passwords; CA, controller, operator, 4 agents
    return found


def _leaks(data: bytes, secrets: dict[str, bytes]) -> list[str]:
    return [name for name, secret in secrets.items() if secret in data]


def test_no_password_or_key_in_command_lines_environments_or_logs(deployment: Deployment) -> None:
    workdir = deployment.workdir
    secrets = _secrets(workdir)
    processes = processes_under(workdir)
    assert len(processes) >= 1 + 1 + 4 + 4 + 1, processes  # supervisor, controller, agents, PostgreSQL
    for pid, what in processes:
        for kind in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{kind}").read_bytes()
            except OSError:
                continue  # it ended meanwhile
            assert not _leaks(data, secrets), f"PID {pid} ({what[:80]}): {kind} holds {_leaks(data, secrets)}"
    assert not _leaks((deployment.up.stdout + deployment.up.stderr).encode(), secrets), "xcha up's output"
    logs = [
        p
        for p in workdir.rglob("*")
        if p.is_file() and (p.suffix == ".log" or p.parent.name in ("logs", "log"))
    ]
    assert len(logs) >= 6, logs
    for log in logs:
        assert not _leaks(log.read_bytes(), secrets), f"{log} holds {_leaks(log.read_bytes(), secrets)}"
    private = [*(workdir / "secrets").iterdir(), *(workdir / "tls").glob("*.key")]
    private += [p for p in workdir.rglob("pgpass") if p.is_file()]
    for path in private:
        assert path.stat().st_mode & 0o777 == 0o600, f"{path}: {oct(path.stat().st_mode & 0o777)}"
    assert (workdir / "secrets").stat().st_mode & 0o777 == 0o700
