"""gRPC plumbing shared by the controller and the agents: servers with the standard health
service and mTLS, client channels with keepalive, and the status message conversions."""

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xcha.config import TlsConfig
from xcha.errors import InvalidInput, NotFound, Refused, XchaError
from xcha.names import Endpoint
from xcha.pg.status import Downstream, PgStatus, WalReceiver
from xcha.v1 import xcha_pb2 as pb

# A dead peer (host gone, partition) is noticed within keepalive time + timeout even when
# no call is in flight; servers accept pings that often.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


T = TypeVar("T")
STATUS_CODES: tuple[tuple[type[XchaError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (XchaError, grpc.StatusCode.ABORTED),
)


async def answer(context: grpc.aio.ServicerContext, work: Callable[[], T | Awaitable[T]]) -> T:
    """Run a servicer's work; an xcha error becomes the matching gRPC status code with the
    operator-readable message (both servers map errors the same way)."""
    try:
        result = work()
        return await result if isinstance(result, Awaitable) else result
    except XchaError as error:
        code = next(code for kind, code in STATUS_CODES if isinstance(error, kind))
        await context.abort(code, str(error))
    raise AssertionError("unreachable")


def create_server(address: str, tls: TlsConfig) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A gRPC server bound to address (port 0 picks a free port) with the health service.
    Returns the server (not started), the bound port, and the health servicer."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls.insecure:
        port = server.add_insecure_port(address)
    else:
        ca, cert, key = tls.read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, *services: str) -> None:
    for service in ("", *services):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)


def channel(target: str, tls: TlsConfig) -> grpc.aio.Channel:
    if tls.insecure:
        return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(target, credentials, options=CLIENT_OPTIONS)


def endpoint_to_proto(endpoint: Endpoint | None) -> pb.Endpoint:
    return pb.Endpoint(host=endpoint.host, port=endpoint.port) if endpoint else pb.Endpoint()


def endpoint_from_proto(message: pb.Endpoint) -> Endpoint | None:
    return Endpoint(message.host, message.port) if message.host else None


ROLES = {"master": pb.ROLE_MASTER, "standby": pb.ROLE_STANDBY, "stopped": pb.ROLE_STOPPED}


def status_to_proto(status: PgStatus) -> pb.PostgresStatus:
    message = pb.PostgresStatus(
        running=status.running,
        role=ROLES[status.role],
        postmaster_pid=status.postmaster_pid or 0,
        timeline=status.timeline or 0,
        system_identifier=status.system_identifier or 0,
        current_lsn=status.current_lsn or 0,
        receive_lsn=status.receive_lsn or 0,
        flush_lsn=status.flush_lsn or 0,
        replay_lsn=status.replay_lsn or 0,
        synchronous_standby_names=status.synchronous_standby_names,
        port=status.port or 0,
        downstreams=[
            pb.Downstream(
                name=d.name,
                state=d.state,
                sync_state=d.sync_state,
                flush_lsn=d.flush_lsn or 0,
                replay_lsn=d.replay_lsn or 0,
                reply_age=d.reply_age if d.reply_age is not None else -1,
            )
            for d in status.downstreams
        ],
    )
    if status.wal_receiver is not None:
        receiver = status.wal_receiver
        upstream = (
            Endpoint(receiver.upstream_host, receiver.upstream_port)
            if receiver.upstream_host and receiver.upstream_port
            else None
        )
        message.wal_receiver.CopyFrom(
            pb.WalReceiver(
                status=receiver.status,
                upstream=endpoint_to_proto(upstream),
                last_message_age=receiver.last_message_age if receiver.last_message_age is not None else -1,
            )
        )
    return message


def status_from_proto(message: pb.PostgresStatus) -> PgStatus:
    receiver = None
    if message.HasField("wal_receiver"):
        age = message.wal_receiver.last_message_age
        receiver = WalReceiver(
            message.wal_receiver.status,
            message.wal_receiver.upstream.host or None,
            message.wal_receiver.upstream.port or None,
            age if age >= 0 else None,
        )
    return PgStatus(
        running=message.running,
        postmaster_pid=message.postmaster_pid or None,
        in_recovery=(message.role == pb.ROLE_STANDBY) if message.running else None,
        timeline=message.timeline or None,
        system_identifier=message.system_identifier or None,
        current_lsn=message.current_lsn or None,
        receive_lsn=message.receive_lsn or None,
        flush_lsn=message.flush_lsn or None,
        replay_lsn=message.replay_lsn or None,
        wal_receiver=receiver,
        downstreams=tuple(
            Downstream(
                d.name,
                d.state,
                d.sync_state,
                d.flush_lsn or None,
                d.replay_lsn or None,
                None,
                d.reply_age if d.reply_age >= 0 else None,
            )
            for d in message.downstreams
        ),
        synchronous_standby_names=message.synchronous_standby_names,
        port=message.port or None,
    )


def blocking_channel(target: str, tls: TlsConfig) -> grpc.Channel:
    """A synchronous channel, for the command line."""
    if tls.insecure:
        return grpc.insecure_channel(target, options=CLIENT_OPTIONS)
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(target, credentials, options=CLIENT_OPTIONS)
