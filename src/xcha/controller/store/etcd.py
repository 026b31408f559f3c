"""The etcd store: several controllers, one elected leader (etcd v3 over gRPC).

Keys under a prefix (default `/xcha/<cluster name>/`):

    leader                      {"name", "address"} of the leader, attached to the leader's lease
    epoch                       the epoch, in decimal (absent: 0)
    paused                      "true" or "false"
    groups/<name>               a group's record (`codec.encode_group`)
    members/<datanode>/<name>   a member's record (`codec.encode_member`)
    events/<id, 20 digits>      an event (`codec.encode_event`)

Leadership is the leader key: created only where there is none, attached to a lease that the
leader keeps alive; its create_revision is the term and fencing token. The leader stops acting
by its own clock: its deadline is the send time of the last keep-alive that etcd answered, plus
the lease TTL, minus a margin. A reply delayed by a pause of the process proves nothing beyond
its send time; etcd cannot have let the lease expire before then. The clock is CLOCK_BOOTTIME
where there is one, so that time spent suspended counts.

Every write is one transaction that also compares the leader key's create_revision with the
writer's token: once another controller leads, a deposed leader's write is refused by etcd
(`Deposed`), whatever its own clock says. Its other comparisons make the epoch and the group
records compare-and-set (`Conflict`). When the transaction fails, its failure branch reads the
leader key and the written key at the same revision, to tell one from the other.

Calls go to one endpoint at a time and move on to the next when it does not answer
(`StoreUnavailable` once none did). A write retried on another endpoint may have been applied
by the first attempt: a retried write that finds exactly the value it meant to write succeeded.
"""

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from aetcd import rpc

from xcha.controller.store.base import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    LeaderInfo,
    Leadership,
    MemberRecord,
    Snapshot,
    Store,
    StoreUnavailable,
)
from xcha.controller.store.codec import (
    decode_event,
    decode_group,
    decode_member,
    encode_event,
    encode_group,
    encode_member,
)
from xcha.errors import InvalidInput, XchaError

log = logging.getLogger(__name__)

T = TypeVar("T")

# etcd answers UNAVAILABLE when it has no leader or a request timed out inside it;
# RESOURCE_EXHAUSTED when its database is full (alarm NOSPACE) or too many requests are pending.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
CHANNEL_OPTIONS = (
    # Reconnect soon to a member that comes back: a channel in back-off fails every call at once.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
EVENT_ID_DIGITS = 20
EVENTS_PAGE = 256  # events read per range when filtering by datanode
# Every etcd write is kept in its log until compacted and the keyspace has a quota (2 GiB by
# default): the newest events are kept, older ones deleted every PRUNE_EVERY events.
EVENTS_KEPT = 20000
PRUNE_EVERY = 1000

if hasattr(time, "CLOCK_BOOTTIME"):

    def clock() -> float:
        """Seconds on a clock that never goes back and keeps counting while suspended."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)

else:  # pragma: no cover - not Linux
    clock = time.monotonic


@dataclasses.dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how xcha uses it. endpoints: host:port, http://host:port or
    https://host:port; TLS when `ca` is set or an endpoint says https (client certificate:
    `cert` and `key`). ttl: the leader's lease, in whole seconds (etcd's smallest is 2 s with its
    default election timeout). timeout: of each call to one endpoint."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/xcha/xcha/"
    ttl: float = 5.0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float = 2.0

    @staticmethod
    def default_prefix(cluster: str) -> str:
        return f"/xcha/{cluster}/"

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise InvalidInput("etcd: at least one endpoint is needed")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise InvalidInput(f"etcd prefix {self.prefix!r} must start and end with '/'")
        if not 1 <= self.ttl <= 3600:
            raise InvalidInput(f"etcd lease TTL {self.ttl} s: expected 1 to 3600 seconds")
        if not 0 < self.timeout <= 60:
            raise InvalidInput(f"etcd call timeout {self.timeout} s: expected more than 0, at most 60")
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("etcd client certificate: set both cert and key, or neither")


def _target(endpoint: str) -> tuple[str, bool]:
    """host:port, and whether the endpoint asks for TLS."""
    for scheme, tls in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            return endpoint.removeprefix(scheme).rstrip("/"), tls
    return endpoint, False


class EtcdError(XchaError):
    """etcd refused a call (an error other than not answering)."""

    def __init__(self, message: str, code: Any) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Stubs:
    """The etcd services on one endpoint's channel."""

    endpoint: str
    channel: Any
    kv: Any
    lease: Any
    maintenance: Any


class EtcdClient:
    """Channels to etcd's endpoints (opened when first used). A call goes to the endpoint that
    answered last and moves on to the next while one is unreachable or does not answer in
    time; other errors are raised at once."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._stubs: dict[int, Stubs] = {}
        self._current = 0

    def _credentials(self) -> Any:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        settings = self.settings
        return grpc.ssl_channel_credentials(read(settings.ca), read(settings.key), read(settings.cert))

    def stubs(self, index: int) -> Stubs:
        stubs = self._stubs.get(index)
        if stubs is None:
            endpoint = self.settings.endpoints[index]
            target, tls = _target(endpoint)
            if tls or self.settings.ca is not None:
                channel = grpc.aio.secure_channel(target, self._credentials(), CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
            stubs = Stubs(
                endpoint, channel, rpc.KVStub(channel), rpc.LeaseStub(channel), rpc.MaintenanceStub(channel)
            )
            self._stubs[index] = stubs
        return stubs

    async def attempts(
        self, call: Callable[[Stubs, float], Awaitable[T]], timeout: float | None = None
    ) -> tuple[T, bool]:
        """The call's result, and whether an endpoint had been tried before without an answer
        (a write sent there may have been applied)."""
        timeout = timeout or self.settings.timeout
        count = len(self.settings.endpoints)
        failures = []
        for step in range(count):
            index = (self._current + step) % count
            stubs = self.stubs(index)
            try:
                result = await call(stubs, timeout)
            except grpc.aio.AioRpcError as error:
                reason = f"{stubs.endpoint}: {error.details() or error.code().name}"
                if error.code() not in RETRYABLE:
                    raise EtcdError(f"etcd at {reason}", error.code()) from None
                failures.append(reason)
                continue
            self._current = index
            return result, step > 0
        raise StoreUnavailable(f"etcd did not answer ({'; '.join(failures)})")

    async def first(self, call: Callable[[Stubs, float], Awaitable[T]], timeout: float | None = None) -> T:
        """The call made on every endpoint at once: the first answer (for a keep-alive, that
        neither a dead member nor one waiting for a raft election holds up)."""
        timeout = timeout or self.settings.timeout
        tasks: dict[asyncio.Future[T], int] = {
            asyncio.ensure_future(call(self.stubs(index), timeout)): index
            for index in range(len(self.settings.endpoints))
        }
        failures = []
        try:
            while tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = tasks.pop(task)
                    error = task.exception()
                    if error is None:
                        self._current = index
                        return task.result()
                    if not isinstance(error, grpc.aio.AioRpcError):
                        raise error
                    failures.append(
                        f"{self.settings.endpoints[index]}: {error.details() or error.code().name}"
                    )
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: an answer came first
        raise StoreUnavailable(f"etcd did not answer ({'; '.join(failures)})")

    async def call(self, call: Callable[[Stubs, float], Awaitable[T]], timeout: float | None = None) -> T:
        return (await self.attempts(call, timeout))[0]

    async def range(self, request: Any) -> Any:
        return await self.call(lambda s, t: s.kv.Range(request, timeout=t))

    async def txn(self, request: Any) -> tuple[Any, bool]:
        return await self.attempts(lambda s, t: s.kv.Txn(request, timeout=t))

    async def close(self) -> None:
        stubs, self._stubs = list(self._stubs.values()), {}
        for each in stubs:
            await each.channel.close()


# ---- requests ----------------------------------------------------------------------------------


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with prefix."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\0"


def _created_at(key: bytes, revision: int) -> Any:
    """Compare: the key's create_revision is `revision` (0: the key does not exist)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=revision)


def _holds(key: bytes, value: bytes) -> Any:
    """Compare: the key exists and holds value."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=key, value=value)


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _get(key: bytes, range_end: bytes = b"", by_creation: bool = False) -> Any:
    request = rpc.RangeRequest(key=key, range_end=range_end)
    if by_creation:
        request.sort_order = rpc.RangeRequest.ASCEND
        request.sort_target = rpc.RangeRequest.CREATE
    return rpc.RequestOp(request_range=request)


def _kvs(response: Any, index: int) -> list[Any]:
    """The key-values that the index-th range of a transaction found."""
    return list(response.responses[index].response_range.kvs)


def _first(kvs: Sequence[Any]) -> Any | None:
    return kvs[0] if kvs else None


# ---- leadership -------------------------------------------------------------------------------


class EtcdLeadership:
    """Leader election on the leader key. `campaign` waits (polling every TTL/20) until there
    is no leader key, then creates it with a fresh lease. Background tasks keep the lease alive
    (every TTL/5, one keep-alive request per stream, to every endpoint at once: the first answer
    counts) and move the deadline on, end the term at the deadline, and check that the leader
    key is still this term's. A term that ended (`lost`) stays ended: campaign again for a new
    one, with a new lease."""

    def __init__(
        self,
        settings: EtcdSettings,
        name: str = "controller",
        address: str = "",
        client: EtcdClient | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.address = address
        self.etcd = client or EtcdClient(settings)
        self.key = f"{settings.prefix}leader".encode()
        self._token = 0
        self._lease = 0
        self._ttl = float(settings.ttl)
        self._deadline = 0.0
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._revocations: set[asyncio.Task[None]] = set()
        self._unrevoked: set[int] = set()  # leases of ended terms that could not be revoked yet
        self._failing = False  # keep-alives are not answered

    @property
    def token(self) -> int:
        return self._token

    @property
    def deadline(self) -> float:
        """When this term ends unless a keep-alive is answered first (`clock()` seconds)."""
        return self._deadline

    @property
    def margin(self) -> float:
        """How long before its lease could expire the leader stops acting."""
        return max(0.5, self._ttl / 5)

    def leading(self) -> bool:
        return self._token > 0 and not self._lost.is_set() and clock() < self._deadline

    async def lost(self) -> None:
        await self._lost.wait()

    async def _leader_kv(self, serializable: bool = False) -> Any | None:
        """The leader key, read linearizably (or from the member asked, which may lag behind)."""
        response = await self.etcd.range(rpc.RangeRequest(key=self.key, serializable=serializable))
        return _first(response.kvs)

    async def leader(self) -> LeaderInfo | None:
        kv = await self._leader_kv()
        if kv is None:
            return None
        data = json.loads(kv.value)
        return LeaderInfo(str(data["name"]), str(data["address"]), int(kv.create_revision))

    async def campaign(self) -> int:
        await self._end_term("campaigning again")
        value = json.dumps({"name": self.name, "address": self.address}, sort_keys=True).encode()
        poll = max(0.05, min(0.1, self.settings.ttl / 20))  # a take-over waits at most this long
        pending: tuple[int, float, float] | None = None  # a lease granted for a try not answered
        while True:
            try:
                # Serializable, without a quorum round: only the transaction must be up to date.
                kv = await self._leader_kv(serializable=True)
                if kv is not None and pending is not None and kv.lease == pending[0]:
                    return self._begin(int(kv.create_revision), *pending)  # that try did succeed
                if kv is not None and kv.lease in self._unrevoked:
                    await self._revoke(int(kv.lease))  # my own earlier term's key: out of the way
                    if kv.lease not in self._unrevoked:
                        continue
                if pending is not None:
                    self._revoke_later(pending[0])
                    pending = None
                if kv is None:
                    pending = await self._grant()
                    request = rpc.TxnRequest(
                        compare=[_created_at(self.key, 0)],
                        success=[_put(self.key, value, lease=pending[0]), _get(self.key)],
                    )
                    response, _ = await self.etcd.txn(request)
                    if response.succeeded:
                        return self._begin(int(_kvs(response, 1)[0].create_revision), *pending)
            except StoreUnavailable as error:
                log.debug("campaign: %s; trying again", error)
            await asyncio.sleep(poll)

    async def _grant(self) -> tuple[int, float, float]:
        """A new lease: its ID, the time the request was sent, its TTL."""
        sent = clock()
        request = rpc.LeaseGrantRequest(TTL=math.ceil(self.settings.ttl))
        grant = await self.etcd.call(lambda s, t: s.lease.LeaseGrant(request, timeout=t))
        if grant.error:
            raise XchaError(f"etcd refused a lease: {grant.error}")
        return int(grant.ID), sent, float(grant.TTL)

    def _begin(self, token: int, lease: int, sent: float, ttl: float) -> int:
        self._token, self._lease, self._ttl = token, lease, ttl
        self._deadline = sent + ttl - self.margin
        self._lost.clear()
        self._tasks = [
            asyncio.create_task(self._keep_alive(token, sent)),
            asyncio.create_task(self._watch_deadline(token)),
            asyncio.create_task(self._watch_key(token)),
        ]
        log.info("leading as %s, term %d (lease %x, TTL %g s)", self.name, token, lease, ttl)
        return token

    async def _keep_alive(self, token: int, sent: float) -> None:
        """A keep-alive every TTL/5 while they are answered in time. One that is not answered
        within TTL/20 stays out (until the deadline) and another one follows: a member waiting
        for a raft election holds a renewal up to an election timeout (1 s) after the new raft
        leader is known, where a new request goes through at once. Every TTL/5, since all this
        must end before the deadline, TTL - margin - (time since the last ping) away: 3 s or
        more with the default TTL (5 s), and an election takes 1 to 3 s with etcd's defaults."""
        interval, resend = self._ttl / 5, max(0.1, self._ttl / 20)
        lease = self._lease
        pings: set[asyncio.Task[bool]] = set()
        next_ping = sent + interval
        try:
            while self._token == token and not self._lost.is_set():
                await asyncio.sleep(max(0.0, next_ping - clock()))
                sent = clock()
                ping = asyncio.create_task(self._ping(token, lease, sent))
                pings.add(ping)
                ping.add_done_callback(pings.discard)
                done, _ = await asyncio.wait({ping}, timeout=resend)
                next_ping = sent + (interval if ping in done and ping.result() else resend)
        finally:
            for ping in pings:
                ping.cancel()

    async def _ping(self, token: int, lease: int, sent: float) -> bool:
        """One keep-alive, sent at `sent` to every endpoint: whether it renewed the lease."""
        request = rpc.LeaseKeepAliveRequest(ID=lease)
        wait = max(self._ttl / 20, self._deadline - clock())  # it is of no use after the deadline
        try:
            response = await self.etcd.first(lambda s, t: _keep_alive_once(s, request, t), wait)
        except XchaError as error:
            if self._token == token and not self._lost.is_set() and not self._failing:
                log.warning("lease keep-alive failed: %s (%.1f s left)", error, self._deadline - clock())
                self._failing = True  # said once, until one is answered again
            return False
        if response is None:
            return False
        if response.TTL <= 0:
            self.deposed(token, "the lease expired")
            return False
        if self._token == token:
            self._deadline = max(self._deadline, sent + int(response.TTL) - self.margin)
            if self._failing:
                log.info("lease keep-alive answered again (%.1f s left)", self._deadline - clock())
                self._failing = False
        return True

    async def _watch_key(self, token: int) -> None:
        """Whether the leader key is still this term's (an operator may have deleted it): a
        task of its own, since a read waits for a quorum, and keep-alives must not."""
        while self._token == token and not self._lost.is_set():
            await asyncio.sleep(self._ttl / 5)
            try:
                kv = await self._leader_kv()
            except XchaError:
                continue
            if kv is None or kv.create_revision != token:
                self.deposed(token, "the leader key is gone or another's")
                return

    async def _watch_deadline(self, token: int) -> None:
        while self._token == token and not self._lost.is_set():
            left = self._deadline - clock()
            if left <= 0:
                self.deposed(token, "no keep-alive was answered in time")
                return
            await asyncio.sleep(min(left, 1.0))  # asyncio's clock stops while suspended: look again

    def deposed(self, token: int, reason: str) -> None:
        """End term `token` (when it is the current one): a keep-alive or a fenced write showed
        that it is over, or its deadline passed. Its lease is revoked in the background."""
        if token != self._token or self._lost.is_set():
            return
        log.warning("leadership lost (term %d): %s", token, reason)
        self._lost.set()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._lease:
            self._revoke_later(self._lease)
            self._lease = 0

    def _revoke_later(self, lease: int) -> None:
        task = asyncio.create_task(self._revoke(lease))
        self._revocations.add(task)
        task.add_done_callback(self._revocations.discard)

    async def _revoke(self, lease: int) -> None:
        """Best effort: the lease expires by itself anyway (and the next campaign tries again)."""
        self._unrevoked.add(lease)
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self.etcd.call(lambda s, t: s.lease.LeaseRevoke(request, timeout=t))
        except EtcdError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: it expired already
                log.info("revoking lease %x: %s", lease, error)
                return
        except XchaError as error:
            log.info("revoking lease %x: %s", lease, error)
            return
        self._unrevoked.discard(lease)

    async def _end_term(self, reason: str) -> None:
        if self._token:
            self.deposed(self._token, reason)
        self._lost.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._revocations, return_exceptions=True)

    async def resign(self) -> None:
        await self._end_term("resigned")

    async def close(self) -> None:
        await self.resign()
        await self.etcd.close()


async def _keep_alive_once(stubs: Stubs, request: Any, timeout: float) -> Any | None:
    """One LeaseKeepAlive request on its own stream, and its answer (None: no answer)."""
    call = stubs.lease.LeaseKeepAlive(iter([request]), timeout=timeout)
    try:
        async for response in call:
            return response
        return None
    finally:
        call.cancel()


# ---- store ------------------------------------------------------------------------------------


class EtcdStore:
    """The controller's records in etcd, every write fenced by `leadership.token` (and refused
    without asking etcd once `leadership.leading()` is False)."""

    def __init__(
        self, settings: EtcdSettings, leadership: Leadership, client: EtcdClient | None = None
    ) -> None:
        self.settings = settings
        self.leadership = leadership
        self.etcd = client or EtcdClient(settings)
        self._owns_client = client is None
        prefix = settings.prefix
        self.leader_key = f"{prefix}leader".encode()
        self.epoch_key = f"{prefix}epoch".encode()
        self.paused_key = f"{prefix}paused".encode()
        self.groups_prefix = f"{prefix}groups/".encode()
        self.members_prefix = f"{prefix}members/".encode()
        self.events_prefix = f"{prefix}events/".encode()
        self._next_event: tuple[int, int] | None = None  # (term, next event id)
        self._adding = asyncio.Lock()  # events are written one at a time: ids commit in order

    def group_key(self, name: str) -> bytes:
        return self.groups_prefix + name.encode()

    def member_key(self, datanode: str, name: str) -> bytes:
        return self.members_prefix + f"{datanode}/{name}".encode()

    def event_key(self, event_id: int) -> bytes:
        return self.events_prefix + f"{event_id:0{EVENT_ID_DIGITS}d}".encode()

    async def load(self) -> Snapshot:
        """One read-only transaction: linearizable, every key at one revision."""
        request = rpc.TxnRequest(
            success=[
                _get(self.epoch_key),
                _get(self.paused_key),
                _get(self.groups_prefix, prefix_end(self.groups_prefix)),
                _get(self.members_prefix, prefix_end(self.members_prefix), by_creation=True),
            ]
        )
        response, _ = await self.etcd.txn(request)
        epoch, paused = _first(_kvs(response, 0)), _first(_kvs(response, 1))
        groups = [decode_group(kv.value.decode()) for kv in _kvs(response, 2)]
        self._next_event = None
        return Snapshot(
            epoch=int(epoch.value) if epoch is not None else 0,
            paused=paused is not None and paused.value == b"true",
            groups={group.name: group for group in groups},
            members=tuple(decode_member(kv.value.decode()) for kv in _kvs(response, 3)),
        )

    def _fence_token(self) -> int:
        if not self.leadership.leading():
            raise Deposed(f"{self.leadership.name} does not lead (any more): not writing")
        return self.leadership.token

    def _deposed(self, token: int, leader: Any | None) -> Deposed:
        if leader is None:
            reason = f"no controller leads: term {token} ended"
        else:
            reason = f"term {leader.create_revision} began after mine ({token}): deposed"
        if isinstance(self.leadership, EtcdLeadership):
            self.leadership.deposed(token, reason)
        return Deposed(f"write refused: {reason}")

    async def _write(self, compares: list[Any], key: bytes, value: bytes) -> tuple[bool, Any | None]:
        """Put value at key if the compares hold, fenced. Returns (True, None) when written,
        else (False, what key holds); raises Deposed when the fence failed."""
        token = self._fence_token()
        request = rpc.TxnRequest(
            compare=[_created_at(self.leader_key, token), *compares],
            success=[_put(key, value)],
            failure=[_get(self.leader_key), _get(key)],
        )
        response, retried = await self.etcd.txn(request)
        if response.succeeded:
            return True, None
        leader, stored = _first(_kvs(response, 0)), _first(_kvs(response, 1))
        if leader is None or leader.create_revision != token:
            raise self._deposed(token, leader)
        if retried and stored is not None and stored.value == value:
            return True, None  # the attempt that did not answer was applied
        return False, stored

    async def _check_fence(self) -> None:
        token = self._fence_token()
        response = await self.etcd.range(rpc.RangeRequest(key=self.leader_key))
        leader = _first(response.kvs)
        if leader is None or leader.create_revision != token:
            raise self._deposed(token, leader)

    async def set_epoch(self, expected: int, epoch: int) -> None:
        if epoch < expected:
            await self._check_fence()
            raise Conflict(f"the epoch only grows: {epoch} < {expected}")
        compare = _holds(self.epoch_key, str(expected).encode()) if expected else None
        for _ in range(2):
            compares = [compare if compare is not None else _created_at(self.epoch_key, 0)]
            done, stored = await self._write(compares, self.epoch_key, str(epoch).encode())
            if done:
                return
            value = int(stored.value) if stored is not None else 0
            if stored is None or value != expected or compare is not None:
                raise Conflict(f"epoch is {value}, not {expected}")
            compare = _holds(self.epoch_key, stored.value)  # a stored "0": absent counts as 0 too
        raise Conflict(f"epoch changed under me while setting it to {epoch}")

    async def set_cluster_paused(self, paused: bool) -> None:
        done, _ = await self._write([], self.paused_key, b"true" if paused else b"false")
        if not done:
            raise Conflict("the pause flag could not be written")

    async def save_group(self, group: GroupRecord, expected: GroupRecord | None) -> None:
        key = self.group_key(group.name)
        compare = _created_at(key, 0) if expected is None else _holds(key, encode_group(expected).encode())
        for _ in range(2):
            done, stored = await self._write([compare], key, encode_group(group).encode())
            if done:
                return
            current = decode_group(stored.value.decode()) if stored is not None else None
            if current != expected or stored is None:
                raise Conflict(f"group {group.name} changed under me: {current} is not {expected}")
            compare = _holds(key, stored.value)  # the same record, encoded differently
        raise Conflict(f"group {group.name} changed under me while saving it")

    async def save_member(self, member: MemberRecord) -> None:
        done, _ = await self._write(
            [], self.member_key(member.datanode, member.name), encode_member(member).encode()
        )
        if not done:
            raise Conflict(f"member {member.datanode}/{member.name} could not be written")

    async def _highest_event_id(self) -> int:
        request = rpc.RangeRequest(
            key=self.events_prefix,
            range_end=prefix_end(self.events_prefix),
            limit=1,
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.KEY,
            keys_only=True,
        )
        last = _first((await self.etcd.range(request)).kvs)
        return int(last.key[len(self.events_prefix) :]) if last is not None else 0

    async def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object]
    ) -> EventRecord:
        async with self._adding:
            return await self._add_event(EventRecord(0, time.time(), datanode, kind, epoch, message, details))

    async def _add_event(self, event: EventRecord) -> EventRecord:
        for _ in range(3):
            token = self.leadership.token
            if self._next_event is None or self._next_event[0] != token:
                self._next_event = (token, await self._highest_event_id() + 1)
            event = dataclasses.replace(event, id=self._next_event[1])
            key = self.event_key(event.id)
            done, _ = await self._write([_created_at(key, 0)], key, encode_event(event).encode())
            if done:
                self._next_event = (token, event.id + 1)
                if event.id % PRUNE_EVERY == 0 and event.id > EVENTS_KEPT:
                    await self._prune_events(event.id - EVENTS_KEPT)
                return event
            self._next_event = None  # that id is taken: read the highest one again
        raise Conflict("no free event id: events are being added elsewhere")

    async def _prune_events(self, below: int) -> None:
        """Delete the events with ids below `below` (fenced like every write)."""
        token = self._fence_token()
        delete = rpc.DeleteRangeRequest(key=self.events_prefix, range_end=self.event_key(below))
        request = rpc.TxnRequest(
            compare=[_created_at(self.leader_key, token)],
            success=[rpc.RequestOp(request_delete_range=delete)],
        )
        response, _ = await self.etcd.txn(request)
        if not response.succeeded:
            raise self._deposed(token, None)

    async def events(
        self, after_id: int = 0, limit: int = 100, datanode: str = "", newest: bool = False
    ) -> list[EventRecord]:
        """Events after `after_id` in order, or with `newest` the last `limit` of them (a
        negative limit: all)."""
        if limit == 0:
            return []
        start, end = self.event_key(max(after_id + 1, 0)), prefix_end(self.events_prefix)
        found: list[EventRecord] = []
        while True:
            wanted = limit - len(found) if limit > 0 else 0
            request = rpc.RangeRequest(
                key=start,
                range_end=end,
                limit=EVENTS_PAGE if datanode else wanted,
                sort_order=rpc.RangeRequest.DESCEND if newest else rpc.RangeRequest.ASCEND,
                sort_target=rpc.RangeRequest.KEY,
            )
            response = await self.etcd.range(request)
            for kv in response.kvs:
                event = decode_event(kv.value.decode())
                if datanode in ("", event.datanode) and len(found) != limit:
                    found.append(event)
            if len(found) == limit or not response.more or not response.kvs:
                break
            last = response.kvs[-1].key
            start, end = (start, last) if newest else (last + b"\0", end)
        return found[::-1] if newest else found

    async def close(self) -> None:
        if self._owns_client:
            await self.etcd.close()


__all__ = ["EtcdClient", "EtcdError", "EtcdLeadership", "EtcdSettings", "EtcdStore", "prefix_end"]

if TYPE_CHECKING:

    def _implements(leadership: EtcdLeadership, store: EtcdStore) -> tuple[Leadership, Store]:
        return leadership, store
