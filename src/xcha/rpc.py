"""gRPC plumbing shared by the controller and the agents: servers with the standard health
service, mTLS and authorization (`xcha.authz`), client channels with keepalive, certificates
renewed without a restart, and every conversion between a message and its domain type (the
agents' and the controller's, both ways)."""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xcha import timings
from xcha.authz import Guard
from xcha.config import TlsConfig
from xcha.errors import InvalidInput, NotFound, NotLeader, Refused, XchaError
from xcha.names import Endpoint
from xcha.pg.status import Downstream, PgStatus, WalReceiver
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.tls import Material, material
from xcha.v1 import xcha_pb2 as pb

if TYPE_CHECKING:
    from xcha.controller.store import EventRecord

log = logging.getLogger(__name__)

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


def liveness_options(keepalive: timings.Keepalive) -> list[tuple[str, int]]:
    """HTTP/2 keep-alive pings on an agent's connection to the controller, both ends: gRPC's
    transport answers them (no Python runs, measured), and one unanswered within the timeout
    closes the connection and so ends its Heartbeats stream. A ping received resets the
    receiver's own ping timer, so pings mostly flow one way."""
    every = max(1, round(keepalive.interval * 1000))
    timeout = round(keepalive.timeout * 1000)
    return [
        ("grpc.keepalive_time_ms", every),
        ("grpc.keepalive_timeout_ms", timeout),
        ("grpc.http2.ping_timeout_ms", timeout),  # without it the timeout above is not applied
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", every),
        ("grpc.http2.min_ping_interval_without_data_ms", every),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(1, every // 2)),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _options(base: list[tuple[str, int]], extra: list[tuple[str, int]] | None) -> list[tuple[str, int]]:
    return list({**dict(base), **dict(extra or [])}.items())


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
# An error quotes what it refused; a request can carry megabytes, a status message must not
# (it travels in an HTTP/2 trailer, 8 KiB at most by default).
MAX_DETAILS = 1000
# A channel replaced after a certificate reload lets its calls in flight finish for this long.
RETIRED_CHANNEL_GRACE = 60.0


LEADER_METADATA = "xcha-leader-address"  # on NotLeader refusals: where the leader is


async def answer(context: grpc.aio.ServicerContext, work: Callable[[], T | Awaitable[T]]) -> T:
    """Run a servicer's work; an xcha error becomes the matching gRPC status code with the
    operator-readable message (both servers map errors the same way), a PostgreSQL error that
    the work did not expect becomes ABORTED."""
    try:
        result = work()
        return await result if isinstance(result, Awaitable) else result
    except (XchaError, psycopg.Error) as error:
        await refuse(context, error)


async def refuse(context: grpc.aio.ServicerContext, error: XchaError | psycopg.Error) -> NoReturn:
    """End the call with the status `answer` gives the error."""
    if isinstance(error, XchaError):
        code = next(code for kind, code in STATUS_CODES if isinstance(error, kind))
        details = str(error)
        if isinstance(error, NotLeader) and error.leader_address:
            context.set_trailing_metadata(((LEADER_METADATA, error.leader_address),))
    else:  # PostgreSQL gone or refusing: an answer, not a crash
        code, details = grpc.StatusCode.ABORTED, f"PostgreSQL: {str(error).strip() or type(error).__name__}"
    if len(details) > MAX_DETAILS:
        details = details[:MAX_DETAILS] + f"... ({len(details)} characters)"
    await context.abort(code, details)
    raise AssertionError("unreachable")


def create_server(
    address: str, tls: TlsConfig, guard: Guard | None = None, options: list[tuple[str, int]] | None = None
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A gRPC server bound to address (port 0 picks a free port) with the health service,
    requiring a client certificate from the CA and authorizing every call (guard: the one
    interceptor, `xcha.authz`); options override the defaults (`liveness_options`). Returns
    the server (not started), the bound port, and the health servicer."""
    merged = _options(SERVER_OPTIONS, options)
    if tls.insecure:
        server = grpc.aio.server(options=merged)
        port = server.add_insecure_port(address)
        log.warning(
            "PLAINTEXT on %s ([tls] insecure = true): callers are neither authenticated nor "
            "authorized; anyone who reaches this port may change roles of datanodes",
            address,
        )
    else:
        server = grpc.aio.server(interceptors=[guard or Guard()], options=merged)
        port = server.add_secure_port(address, _server_credentials(material(tls)))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, port, health_servicer


def _server_configuration(used: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(used.files.key, used.files.cert)], root_certificates=used.files.ca
    )


def _server_credentials(used: Material) -> grpc.ServerCredentials:
    """Asked at every handshake for newer files: a reload takes effect for new connections."""
    served = [used.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if served[0] == used.generation:
            return None
        served[0] = used.generation
        return _server_configuration(used)

    return grpc.dynamic_ssl_server_credentials(
        _server_configuration(used), fetch, require_client_authentication=True
    )


async def mark_serving(health_servicer: health.aio.HealthServicer, *services: str) -> None:
    for service in ("", *services):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)


def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """The client side of mTLS: this side's certificate, and the CA the server's must come from."""
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel(
    target: str, tls: TlsConfig, options: list[tuple[str, int]] | None = None
) -> "grpc.aio.Channel | RenewingChannel":
    """A channel to target; options override the defaults (`liveness_options`)."""
    merged = _options(CLIENT_OPTIONS, options)
    if tls.insecure:
        return grpc.aio.insecure_channel(target, options=merged)
    return RenewingChannel(target, material(tls), merged)


class RenewingChannel:
    """A secure channel that follows its certificate files: after a reload (SIGHUP) the next
    call opens a new channel with the new files, and the old one closes once its calls are done.
    It offers what xcha's stubs use: unary calls, streams, close, `async with`."""

    def __init__(self, target: str, used: Material, options: list[tuple[str, int]] | None = None) -> None:
        self.target = target
        self.used = used
        self.options = options or CLIENT_OPTIONS
        self._generation = used.generation
        self._channel = self._open()
        self._callables: dict[str, Any] = {}
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def _open(self) -> grpc.aio.Channel:
        files = self.used.files
        credentials = grpc.ssl_channel_credentials(
            root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
        )
        return grpc.aio.secure_channel(self.target, credentials, options=self.options)

    def current(self) -> grpc.aio.Channel:
        if self._generation != self.used.generation:
            retired = self._channel
            self._generation = self.used.generation
            self._channel = self._open()
            self._callables.clear()
            task = asyncio.ensure_future(retired.close(RETIRED_CHANNEL_GRACE))
            self._retiring[task] = retired
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return self._channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        def call(request: object, **options: Any) -> Any:
            current = self.current()
            callable_ = self._callables.get(method)
            if callable_ is None:
                callable_ = self._callables[method] = current.unary_unary(method, *args, **kwargs)
            return callable_(request, **options)

        return call

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """A stream opened on the channel of the files in use when it opens; it stays on that
        channel (its owner opens a new stream after a reload: `generation`)."""

        def call(*request: object, **options: Any) -> Any:
            return self.current().stream_stream(method, *args, **kwargs)(*request, **options)

        return call

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        for task, retired in list(self._retiring.items()):
            task.cancel()
            await retired.close(grace)

    async def __aenter__(self) -> "RenewingChannel":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def generation(opened: "grpc.aio.Channel | RenewingChannel") -> int:
    """How many certificate reloads the channel has followed (0 for plaintext): a stream opened
    at an older generation still uses the old certificate."""
    return opened.used.generation if isinstance(opened, RenewingChannel) else 0


def endpoint_to_proto(endpoint: Endpoint | None) -> pb.Endpoint:
    return pb.Endpoint(host=endpoint.host, port=endpoint.port) if endpoint else pb.Endpoint()


def endpoint_from_proto(message: pb.Endpoint) -> Endpoint | None:
    return Endpoint(message.host, message.port) if message.host else None


def sync_to_proto(sync: SyncStandbys) -> pb.SyncStandbys:
    return pb.SyncStandbys(method=sync.policy.method, count=sync.policy.count, names=list(sync.names))


def sync_from_proto(message: pb.SyncStandbys) -> SyncStandbys:
    """A request's synchronous standbys; InvalidInput for a policy no server would accept."""
    if message.method not in ("first", "any") or message.count < 1:
        raise InvalidInput(f"invalid synchronous policy {message.method!r} {message.count}")
    return SyncStandbys(SyncPolicy(message.method, message.count), tuple(message.names))  # type: ignore[arg-type]


# PgStatus.role <-> the wire: "unknown" is a running server whose recovery state is not known.
ROLES = {
    "master": pb.ROLE_MASTER,
    "standby": pb.ROLE_STANDBY,
    "stopped": pb.ROLE_STOPPED,
    "unknown": pb.ROLE_UNSPECIFIED,
}
ROLE_NAMES = {number: name for name, number in ROLES.items()}
_IN_RECOVERY = {pb.ROLE_MASTER: False, pb.ROLE_STANDBY: True}


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
                caught_up=d.caught_up,
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
        in_recovery=_IN_RECOVERY.get(message.role) if message.running else None,
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
                d.reply_age if d.reply_age >= 0 else None,
                caught_up=d.caught_up,
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
    return grpc.secure_channel(target, _credentials(tls), options=CLIENT_OPTIONS)


def event_to_proto(event: "EventRecord") -> pb.Event:
    return pb.Event(
        id=event.id,
        time=event.time,
        datanode=event.datanode,
        kind=event.kind,
        epoch=event.epoch,
        message=event.message,
        details_json=json.dumps(event.details),
    )
