"""Certificates that name who holds them (`xcha://ROLE/NAME`), the `xcha tls` commands, keys
that are never readable by others, renewal on SIGHUP for servers and channels, and warnings
30 days before a certificate expires."""

import asyncio
import datetime
import os
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2

from tests.unit.servers import identityless_certificate
from xcha.authz import Guard
from xcha.cli import main
from xcha.config import TlsConfig
from xcha.errors import InvalidInput
from xcha.rpc import RenewingChannel, channel, create_server, mark_serving
from xcha.tls import (
    Identity,
    Material,
    certificate_info,
    create_ca,
    issue,
    material,
    reload_certificates,
    require_identity,
)


@pytest.mark.parametrize(
    ("text", "identity"),
    [
        ("xcha://agent/dn1/dn1a", Identity("agent", "dn1a", "dn1")),
        ("agent/dn1/dn1a", Identity("agent", "dn1a", "dn1")),
        ("xcha://controller/main", Identity("controller", "main")),
        ("operator/alice", Identity("operator", "alice")),
        ("xcha://coordinator/coord1", Identity("coordinator", "coord1")),
        ("monitor/grafana", Identity("monitor", "grafana")),
    ],
)
def test_identities_are_spelled_as_uris(text: str, identity: Identity) -> None:
    assert Identity.parse(text) == identity
    assert Identity.parse(identity.uri) == identity and identity.uri.startswith("xcha://")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "agent/dn1a",
        "agent/dn1/dn1a/x",
        "controller",
        "root/alice",
        "operator/Alice",
        "operator/a\x00",
        "operator/",
        "xcha://operator/alice/x",
        "controller/dn1/main",
    ],
)
def test_anything_else_is_no_identity(text: str) -> None:
    with pytest.raises(InvalidInput):
        Identity.parse(text)


def test_only_an_agent_names_a_datanode() -> None:
    with pytest.raises(InvalidInput, match="only an agent names a datanode"):
        Identity("operator", "alice", "dn1")
    with pytest.raises(InvalidInput, match="datanode name of an agent"):
        Identity("agent", "dn1a")


def test_a_certificate_names_its_identity_and_hosts(tmp_path: Path) -> None:
    create_ca(tmp_path)
    cert, key = issue(tmp_path, Identity("agent", "dn1a", "dn1"), ("10.0.0.5", "dn1a.example"))
    assert (cert.name, key.name) == ("dn1a.pem", "dn1a.key")
    info = certificate_info(x509.load_pem_x509_certificate(cert.read_bytes()))
    assert info.identity == Identity("agent", "dn1a", "dn1")
    assert set(info.hosts) == {"10.0.0.5", "dn1a.example"}
    assert info.expiry_warning() == ""


def test_keys_are_never_readable_by_others(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        create_ca(tmp_path)
        stale = tmp_path / "alice.key"
        stale.write_text("an older key, world-readable\n")
        stale.chmod(0o644)
        issue(tmp_path, Identity("operator", "alice"))
    finally:
        os.umask(previous)
    for key in tmp_path.glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key


def test_an_identity_without_a_ca_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no CA in"):
        issue(tmp_path, Identity("operator", "alice"))


def test_tls_commands_issue_and_show_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "tls")
    assert main(["tls", "init", directory, "--identities", "controller,operator,agent/dn1/dn1a"]) == 0
    assert "xcha://agent/dn1/dn1a" in capsys.readouterr().out
    assert (
        main(["tls", "issue", directory, "--role", "agent", "--name", "dn1/dn1c", "--host", "10.0.0.7"]) == 0
    )
    assert main(["tls", "issue", directory, "--role", "monitor", "--name", "grafana", "--days", "20"]) == 0
    capsys.readouterr()
    assert main(["tls", "show", f"{directory}/dn1c.pem", f"{directory}/grafana.pem"]) == 0
    shown = capsys.readouterr().out
    assert (
        "identity    xcha://agent/dn1/dn1c\nrole        agent\ndatanode    dn1\nname        dn1c\n" in shown
    )
    assert "hosts       10.0.0.7\n" in shown and "(824 days left)" in shown
    assert "identity    xcha://monitor/grafana" in shown and "(19 days left)" in shown
    assert "warning     the certificate of xcha://monitor/grafana expires in 19 day(s)" in shown
    for argv, message in (
        (["tls", "issue", directory, "--role", "agent", "--name", "dn1c"], "DATANODE/MEMBER"),
        (["tls", "issue", directory, "--role", "agent", "--name", "dn1/dn1c"], "give --force"),
        (["tls", "init", directory, "--identities", "dn1a"], "invalid identity 'dn1a'"),
        (["tls", "show", f"{directory}/nope.pem"], "cannot read"),
    ):
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert main(["tls", "issue", directory, "--role", "agent", "--name", "dn1/dn1c", "--force"]) == 0
    identityless_certificate(tmp_path / "tls", "anonymous")
    capsys.readouterr()
    assert main(["tls", "show", f"{directory}/anonymous.pem"]) == 0
    assert "identity    none (0 xcha:// identities" in capsys.readouterr().out


def _files(directory: Path, name: str) -> TlsConfig:
    return TlsConfig(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")


def test_a_daemon_starts_only_with_a_certificate_of_its_own(tmp_path: Path) -> None:
    create_ca(tmp_path)
    issue(tmp_path, Identity("agent", "dn1b", "dn1"))
    issue(tmp_path, Identity("operator", "alice"))
    identityless_certificate(tmp_path, "anonymous")
    tls = _files(tmp_path, "dn1b")
    require_identity(tls, "agent", Identity("agent", "dn1b", "dn1"))
    with pytest.raises(
        InvalidInput, match="names xcha://agent/dn1/dn1b, but this process is xcha://agent/dn1/dn1a"
    ):
        require_identity(tls, "agent", Identity("agent", "dn1a", "dn1"))
    with pytest.raises(InvalidInput, match="but this process is a controller"):
        require_identity(_files(tmp_path, "alice"), "controller")
    with pytest.raises(InvalidInput, match="names no xcha identity"):
        require_identity(_files(tmp_path, "anonymous"), "controller")
    require_identity(TlsConfig(insecure=True), "controller")


def test_a_reload_takes_only_a_good_certificate_of_the_same_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_ca(tmp_path)
    identity = Identity("operator", "alice")
    issue(tmp_path, identity)
    used = Material(_files(tmp_path, "alice"))
    assert not used.reload() and used.generation == 0, "unchanged files"
    key = (tmp_path / "alice.key").read_bytes()
    issue(tmp_path, identity, validity=datetime.timedelta(days=5))
    (tmp_path / "alice.key").write_bytes(key)  # half-written renewal: the old key, the new certificate
    assert not used.reload() and "is not the key of" in caplog.text
    issue(tmp_path, Identity("operator", "bob"))
    for suffix in ("pem", "key"):
        (tmp_path / f"alice.{suffix}").write_bytes((tmp_path / f"bob.{suffix}").read_bytes())
    assert not used.reload() and "an identity does not change" in caplog.text
    other = tmp_path / "other"
    create_ca(other)
    issue(other, identity)
    for suffix in ("pem", "key"):
        (tmp_path / f"alice.{suffix}").write_bytes((other / f"alice.{suffix}").read_bytes())
    assert not used.reload() and "was not issued by the CA" in caplog.text
    assert used.generation == 0 and used.files.identity == identity
    issue(tmp_path, identity, validity=datetime.timedelta(days=5))
    assert used.reload() and used.generation == 1
    assert "expires in 4 day(s)" in used.files.warnings()[0]


async def test_servers_and_channels_take_renewed_certificates_without_a_restart(tmp_path: Path) -> None:
    """SIGHUP's work: the server presents the new certificate to new connections, and a channel
    opens a new connection with its own new certificate at its next call."""
    create_ca(tmp_path)
    server_identity, client_identity = Identity("controller", "controller"), Identity("operator", "alice")
    issue(tmp_path, server_identity)
    issue(tmp_path, client_identity)
    seen: list[tuple[str, str]] = []
    guard = Guard()
    guard.listeners.append(lambda kind, sentence: seen.append((kind, sentence)))
    server, port, health = create_server("127.0.0.1:0", _files(tmp_path, "controller"), guard)
    await server.start()
    await mark_serving(health)
    client = channel(f"localhost:{port}", _files(tmp_path, "alice"))
    assert isinstance(client, RenewingChannel)
    check = client.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        await check(health_pb2.HealthCheckRequest(), timeout=5)
        assert seen == []
        before = await asyncio.to_thread(_served, port, tmp_path)
        issue(tmp_path, client_identity, validity=datetime.timedelta(days=3))
        renewed, _ = issue(tmp_path, server_identity, validity=datetime.timedelta(days=400))
        assert await asyncio.to_thread(_served, port, tmp_path) == before, "nothing changes before SIGHUP"
        reload_certificates()
        assert material(_files(tmp_path, "alice")).generation == 1
        assert await asyncio.to_thread(_served, port, tmp_path) == renewed.read_bytes()
        await check(health_pb2.HealthCheckRequest(), timeout=5)
        assert len(seen) == 1 and seen[0][0] == "certificate", seen
        assert "xcha://operator/alice expires in 2 day(s)" in seen[0][1]
    finally:
        await client.close()
        await server.stop(None)


def _served(port: int, directory: Path) -> bytes:
    """The certificate (PEM) the server presents on a new connection."""
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    context.load_cert_chain(directory / "alice.pem", directory / "alice.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as plain,
        context.wrap_socket(plain, server_hostname="localhost") as secure,
    ):
        der = secure.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_an_expiring_certificate_warns_30_days_ahead(tmp_path: Path) -> None:
    create_ca(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    for days, warns in ((31, False), (30, True), (1, True)):
        cert, _ = issue(tmp_path, Identity("operator", "alice"), validity=datetime.timedelta(days=days))
        info = certificate_info(x509.load_pem_x509_certificate(cert.read_bytes()))
        assert bool(info.expiry_warning(now + datetime.timedelta(minutes=1))) == warns, days
    assert "expired on" in info.expiry_warning(now + datetime.timedelta(days=2))


def test_a_certificate_expiring_soon_is_a_warning_in_the_cluster_status(tmp_path: Path) -> None:
    """`xcha ctl status` (text and JSON) says which certificate to renew, 30 days ahead."""
    import datetime
    import json as json_module

    from xcha.controller.agents import GrpcAgents
    from xcha.controller.config import load_controller_config
    from xcha.controller.controller import Controller
    from xcha.controller.node import ControllerNode
    from xcha.controller.routing import Router
    from xcha.controller.service import ControllerService
    from xcha.controller.store import Snapshot, SqliteLeadership, SqliteStore
    from xcha.ctl import status_json, status_table
    from xcha.tls import Identity, create_ca, issue

    tls = tmp_path / "tls"
    create_ca(tls)
    issue(tls, Identity("controller", "controller"), validity=datetime.timedelta(days=10))
    config = tmp_path / "controller.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:7000"
state_dir = "{tmp_path}/state"

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]

[tls]
ca_file = "{tls}/ca.pem"
cert_file = "{tls}/controller.pem"
key_file = "{tls}/controller.key"
""")
    loaded = load_controller_config(config)
    path = tmp_path / "state.sqlite3"
    leadership = SqliteLeadership(path)
    store = SqliteStore(path, leadership)
    controller = Controller(loaded, store, Snapshot(), Router("none", []), GrpcAgents(loaded.tls))
    warnings = ControllerService(ControllerNode(loaded, store, leadership)).certificate_warnings()
    assert len(warnings) == 1 and "xcha://controller/controller expires in 9 day(s)" in warnings[0], warnings
    status = controller.cluster_status()
    status.warnings.extend(warnings)
    assert f"WARNING: {warnings[0]}" in status_table(status)
    assert json_module.loads(json_module.dumps(status_json(status)))["warnings"] == warnings
