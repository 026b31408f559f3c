"""What the state machine sees: immutable snapshots of a datanode group, built by the
controller from heartbeats, its own probes and its store. No I/O here."""

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from xcha import timings
from xcha.names import Endpoint
from xcha.pg.status import PgStatus
from xcha.pg.syncrep import SyncPolicy

NEVER = float("inf")


class GroupState(StrEnum):
    INITIALIZING = "initializing"  # no master yet
    SINGLE = "single"  # a master, not (yet) enough synchronous standbys
    PROTECTED = "protected"  # k synchronous standbys confirm every commit
    UNPROTECTED = "unprotected"  # sync standby lost, names reduced so writes go on (available)
    DEGRADED = "degraded"  # sync standby lost, writes wait for it (strict)
    FAILOVER = "failover"  # promoting a standby
    SWITCHOVER = "switchover"  # planned: master stopped cleanly, promoting the target
    REROUTING = "rerouting"  # waiting until every coordinator points at the new master
    NO_CANDIDATE = "no_candidate"  # master lost and no standby is safe to promote


class SyncFailurePolicy(StrEnum):
    AVAILABLE = "available"
    STRICT = "strict"


@dataclass(frozen=True)
class MemberView:
    name: str
    mode: str = "sync"  # sync or async standby when not the master
    heartbeat_age: float = NEVER  # seconds since the agent was last heard (report or open stream)
    report_age: float = NEVER  # seconds since its last report (positions are that old)
    pg: PgStatus = field(default_factory=lambda: PgStatus(running=False))
    endpoint: Endpoint | None = None  # where its PostgreSQL is reached
    epoch: int = 0  # the agent's persisted epoch
    activity: str = "idle"
    fenced: bool = False
    has_data: bool = False
    postmaster_died: bool = False  # the agent saw it exit unasked (not: found it stopped)
    upstream_checked: bool = False
    upstream_ok: bool = True
    probe_ok: bool | None = None  # the controller's own probe (None: not probed)
    probe_age: float = NEVER
    busy: bool = False  # a message to this agent is in flight
    follow_backoff: bool = False  # a recent Follow failed: wait before the next
    streaming_missing_for: float = NEVER  # since the master last reported it streaming
    removed: bool = False
    # Its agent stopped its WAL receiver on purpose (Detach) and none runs: it receives WAL
    # from no one until the next Follow, so its position is final and the old master can
    # confirm nothing more through it.
    detached: bool = False

    def reachable(self, failure_timeout: float) -> bool:
        return self.heartbeat_age < failure_timeout

    def receiving_wal(self) -> bool:
        """The standby's own view: WAL receiver streaming and its master answering."""
        receiver = self.pg.wal_receiver
        streaming = receiver is not None and receiver.status == "streaming"
        return streaming and (not self.upstream_checked or self.upstream_ok)


@dataclass(frozen=True)
class Request:
    """An operator's request waiting for the state machine."""

    kind: str  # switchover or failover
    target: str | None = None
    allow_data_loss: bool = False


@dataclass(frozen=True)
class GroupView:
    name: str
    state: GroupState
    members: tuple[MemberView, ...]
    master: str | None = None
    candidate: str | None = None  # the member being promoted
    sync_set: tuple[str, ...] = ()  # standbys that confirmed commits when last protected
    policy: SyncPolicy = field(default_factory=SyncPolicy)
    on_sync_failure: SyncFailurePolicy = SyncFailurePolicy.AVAILABLE
    allow_data_loss: bool = False
    paused: bool = False
    epoch: int = 0
    failure_timeout: float = timings.FAILURE_TIMEOUT
    heartbeat_interval: float = timings.HEARTBEAT_INTERVAL
    in_grace: bool = False  # the controller is still learning after its start
    busy: bool = False  # a group operation (promote, reroute, switchover) runs
    master_failed_for: float = 0.0  # how long the failure rule has held
    promote_attempts: int = 0
    rerouted: bool = False  # the reroute barrier completed for this epoch
    switchover_failed: bool = False
    promote_sent: bool = False  # a switchover's Promote went to its target (it may be a master)
    request: Request | None = None
    takeover_port: int = 0  # router takeover: the port the new master must be on

    @cached_property
    def memo(self) -> dict[str, object]:
        """What the state machine derives from this view, each computed once: the view never
        changes, and one decision asks for the same verdicts many times."""
        return {}

    def member(self, name: str | None) -> MemberView | None:
        return next((m for m in self.members if m.name == name), None) if name else None

    @property
    def master_view(self) -> MemberView | None:
        return self.member(self.master)

    @property
    def standbys(self) -> tuple[MemberView, ...]:
        return tuple(m for m in self.members if m.name != self.master and not m.removed)
