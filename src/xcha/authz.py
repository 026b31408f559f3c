"""Who may call what: the one authorization table of both servers, and the one server
interceptor that enforces it.

mTLS only authenticates: any certificate of the cluster's CA gets through the handshake. Every
call is then authorized by the identity its client certificate names (`xcha.tls.Identity`):
its role must be among the RPC's, and where the table says so the request must speak only for
that identity (an agent heartbeats as its own member of its own datanode, never as another).
A refusal is PERMISSION_DENIED naming the identity and the RPC; the servicer never runs, so
nothing changes; it is counted (metrics) and reported (log, and the controller's events).

gRPC's aio interceptors see the method name but not the peer's certificate, so `Guard` wraps
the method's handler: the check runs inside the call, with the servicer context, before the
servicer. The identity of an authorized call is in `caller` while the servicer runs.

With `[tls] insecure = true` there is no certificate and so no identity: `create_server`
installs no guard, every call is served (the scale benchmark's simulators), and it says so
loudly at start.
"""

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from xcha.errors import InvalidInput
from xcha.tls import ROLES, CertificateInfo, Identity, certificate_info, read_certificate
from xcha.v1 import xcha_pb2 as pb

log = logging.getLogger(__name__)

# The identity of the call being served (None: insecure mode).
caller: ContextVar[Identity | None] = ContextVar("caller", default=None)

# A refusal is logged (and made an event) at once, then at most once a minute for the same
# identity and RPC: a misconfigured agent heartbeats four times a second.
REPORT_INTERVAL = 60.0
SHOWN = 64  # characters of a request's value that a refusal quotes


def _shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN else value[:SHOWN] + "...")


def _heartbeat_as_itself(identity: Identity, request: pb.HeartbeatRequest) -> str:
    status = request.status
    if (status.datanode, status.member) == (identity.datanode, identity.name):
        return ""
    return f"as member {_shown(status.member)} of datanode {_shown(status.datanode)}"


@dataclass(frozen=True)
class Rule:
    roles: tuple[str, ...]
    # An "only as yourself" rule: given the caller and the request, what the request claims
    # beyond the caller's identity ("" when nothing), and the rule in words.
    as_itself: Callable[[Identity, Any], str] | None = None
    as_itself_text: str = ""


NODE_ROLE = Rule(("controller",))
# A stream (Heartbeats) is authorized when it opens and each report on it as it arrives.
HEARTBEAT = Rule(
    ("agent",),
    _heartbeat_as_itself,
    "an agent reports only as the member its certificate names, of that datanode",
)
OPERATOR = Rule(("operator",))
READING = Rule(("operator", "monitor"))

# Every RPC both servers serve; a method that is not here is refused (UNIMPLEMENTED).
TABLE: dict[str, Rule] = {
    "/xcha.v1.Controller/Heartbeat": HEARTBEAT,
    "/xcha.v1.Controller/Heartbeats": HEARTBEAT,
    "/xcha.v1.Controller/ReportNodeFailure": Rule(("operator", "coordinator")),
    "/xcha.v1.Controller/GetClusterStatus": READING,
    "/xcha.v1.Controller/ListEvents": READING,
    "/xcha.v1.Controller/Switchover": OPERATOR,
    "/xcha.v1.Controller/Failover": OPERATOR,
    "/xcha.v1.Controller/SetPaused": OPERATOR,
    "/xcha.v1.Controller/AddStandby": OPERATOR,
    "/xcha.v1.Controller/RemoveStandby": OPERATOR,
    "/xcha.v1.Controller/SetStandbyMode": OPERATOR,
    "/xcha.v1.Agent/GetStatus": Rule(("controller", "operator", "monitor")),
    "/xcha.v1.Agent/Promote": NODE_ROLE,
    "/xcha.v1.Agent/Follow": NODE_ROLE,
    "/xcha.v1.Agent/Fence": NODE_ROLE,
    "/xcha.v1.Agent/SetSynchronousStandbys": NODE_ROLE,
    "/xcha.v1.Agent/Checkpoint": NODE_ROLE,
    "/xcha.v1.Agent/Detach": NODE_ROLE,
    "/xcha.v1.Agent/Remove": NODE_ROLE,
    # The standard health service of both servers tells whether they serve, nothing more.
    "/grpc.health.v1.Health/Check": Rule(ROLES),
    "/grpc.health.v1.Health/Watch": Rule(ROLES),
    "/grpc.health.v1.Health/List": Rule(ROLES),
}


def short(rpc: str) -> str:
    """/xcha.v1.Controller/Heartbeat -> Controller.Heartbeat"""
    service, _, method = rpc.strip("/").partition("/")
    return f"{service.rpartition('.')[2]}.{method}"


def markdown() -> str:
    """The table as docs/design.md shows it (scripts/update_design_doc.py)."""
    lines = [
        "| RPC | " + " | ".join(ROLES) + " | only as itself |",
        "|---|" + ":-:|" * len(ROLES) + "---|",
    ]
    for rpc, rule in TABLE.items():
        cells = ["yes" if role in rule.roles else "-" for role in ROLES]
        lines.append(f"| `{short(rpc)}` | " + " | ".join(cells) + f" | {rule.as_itself_text} |")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=8192)  # an agent's certificate per member: thousands at scale
def _peer(pem: bytes) -> CertificateInfo:
    """Parsed once per certificate: an agent presents the same one four times a second."""
    return certificate_info(read_certificate(pem))


def peer_certificate(context: grpc.aio.ServicerContext) -> CertificateInfo | None:
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return _peer(pems[0])
    except InvalidInput:
        return None


Listener = Callable[[str, str], None]  # (kind: "refused" or "certificate", sentence)
Authorize = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Identity]]
Claim = Callable[[Identity, Any, grpc.aio.ServicerContext], Awaitable[None]]


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The server interceptor of both servers (`xcha.rpc.create_server` installs it)."""

    def __init__(self) -> None:
        # Replaced, never changed in place: the metrics thread reads them while calls are served.
        self.refused: dict[tuple[str, str], int] = {}  # (RPC, role) -> refusals
        self.peer_expiry: dict[str, float] = {}  # a peer's identity -> its expiry, once it warns
        self.listeners: list[Listener] = []
        self._reported: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last report, since)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method
        rule = TABLE.get(rpc)
        if rule is None:
            return None
        return _guarded(
            handler, functools.partial(self.authorize, rpc, rule), functools.partial(self.claim, rpc, rule)
        )

    async def authorize(
        self, rpc: str, rule: Rule, request: object, context: grpc.aio.ServicerContext
    ) -> Identity:
        """The caller's identity if the table lets it make this call; else PERMISSION_DENIED.
        request None: a request stream as it opens (each request is checked by `claim`)."""
        info = peer_certificate(context)
        if info is None or info.identity is None:
            who = info.subject if info else "a caller without a certificate"
            denial = (
                f"{who} may not call {short(rpc)}: its certificate names no xcha identity "
                f"({info.problem if info else 'none presented'}); issue one with `xcha tls issue`"
            )
            await self._refuse(context, rpc, who, "none", denial)
        identity = info.identity
        if identity.role not in rule.roles:
            denial = f"{identity} may not call {short(rpc)}: it is for {', '.join(rule.roles)} only"
            await self._refuse(context, rpc, str(identity), identity.role, denial)
        if request is not None:
            await self.claim(rpc, rule, identity, request, context)
        self._check_expiry(info)
        return identity

    async def claim(
        self, rpc: str, rule: Rule, identity: Identity, request: object, context: grpc.aio.ServicerContext
    ) -> None:
        """The "only as itself" rule for one request of an authorized caller."""
        if rule.as_itself is not None and (claim := rule.as_itself(identity, request)):
            denial = f"{identity} may not call {short(rpc)} {claim}: {rule.as_itself_text}"
            await self._refuse(context, rpc, str(identity), identity.role, denial)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, rpc: str, who: str, role: str, denial: str
    ) -> NoReturn:
        key = (short(rpc), role)
        self.refused = {**self.refused, key: self.refused.get(key, 0) + 1}
        now = time.monotonic()
        last, since = self._reported.get((who, rpc), (-REPORT_INTERVAL, 0))
        if now - last >= REPORT_INTERVAL:
            self._reported[(who, rpc)] = (now, 0)
            more = f" ({since} more refused since the last report)" if since else ""
            self._tell("refused", f"refused: {denial}{more}")
        else:
            self._reported[(who, rpc)] = (last, since + 1)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {denial}")
        raise AssertionError("abort raises")

    def _check_expiry(self, info: CertificateInfo) -> None:
        """A peer's certificate close to expiry is reported once (an agent's, seen by the
        controller on its heartbeats: one place to see every certificate that must be renewed)."""
        who = str(info.identity)
        expiry = info.not_after.timestamp()
        if self.peer_expiry.get(who) == expiry:
            return
        if warning := info.expiry_warning():
            self.peer_expiry = {**self.peer_expiry, who: expiry}
            self._tell("certificate", warning)

    def _tell(self, kind: str, sentence: str) -> None:
        log.warning("%s", sentence)
        for listener in self.listeners:
            listener(kind, sentence)


def _guarded(
    handler: grpc.RpcMethodHandler, authorize: Authorize, claim: Claim
) -> grpc.RpcMethodHandler | None:
    """The same handler, authorizing before the servicer runs. xcha's RPCs are unary but for
    Heartbeats, a stream of requests each checked as it arrives, answered through the context
    (as the health service's Watch streams its answers)."""
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> object:
            caller.set(await authorize(request, context))
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(request: object, context: grpc.aio.ServicerContext) -> None:
            caller.set(await authorize(request, context))
            await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        both = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> None:
            identity = await authorize(None, context)
            caller.set(identity)
            await both(_Checked(requests, identity, claim, context), context)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return None  # client streaming only: no xcha RPC


class _Checked:
    """A stream's requests, each checked by the "only as itself" rule as it arrives (a plain
    iterator, not an async generator: one report per agent every heartbeat interval passes
    through it)."""

    def __init__(
        self,
        requests: AsyncIterator[object],
        identity: Identity,
        claim: Claim,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.requests = requests.__aiter__()
        self.identity = identity
        self.claim = claim
        self.context = context

    def __aiter__(self) -> "_Checked":
        return self

    async def __anext__(self) -> object:
        request = await self.requests.__anext__()
        await self.claim(self.identity, request, self.context)
        return request
