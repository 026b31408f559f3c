"""What a controller must not forget, and who may write it.

`Store` keeps the epoch, the cluster's pause flag, each group's record, the members and the
event history. Every write is fenced: it carries the fencing token of the `Leadership` the
store was opened with and is refused (`Deposed`) once another controller has taken over, so a
deposed leader that wakes up cannot overwrite its successor's decisions. The epoch and group
records are also compare-and-set (`Conflict` when the stored value is not the expected one).

Reads (`load`, `events`) are not fenced: a follower answers status questions from them.
"""

from dataclasses import dataclass, field
from typing import Protocol

from xcha.controller.views import GroupState, Request
from xcha.errors import XchaError


class Deposed(XchaError):
    """A fenced write was refused, or leadership lapsed: another controller may lead now."""


class Conflict(XchaError):
    """A compare-and-set found another value than the one expected."""


class StoreUnavailable(XchaError):
    """The store did not answer in time (etcd unreachable, no quorum)."""


@dataclass(frozen=True)
class MemberRecord:
    datanode: str
    name: str
    mode: str = "sync"
    removed: bool = False
    host: str = ""
    port: int = 0
    agent_address: str = ""


@dataclass(frozen=True)
class GroupRecord:
    name: str
    state: GroupState = GroupState.INITIALIZING
    master: str | None = None
    candidate: str | None = None
    sync_set: tuple[str, ...] = ()
    paused: bool = False
    promote_attempts: int = 0
    rerouted_epoch: int = 0
    request: Request | None = None
    reason: str = ""
    takeover_port: int = 0  # router takeover: the port the new master takes
    handover_member: str | None = None  # ... and the former master, rejoining, takes
    handover_port: int = 0  # the new master's former port
    switchover_failed: bool = False  # the switchover under way failed (cleared when leaving it)
    # A Promote went to the switchover's target: the old master may serve again only once the
    # target is known not to be a master (its reply may have been lost after it promoted).
    promote_sent: bool = False


@dataclass(frozen=True)
class EventRecord:
    id: int
    time: float
    datanode: str
    kind: str
    epoch: int
    message: str
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """Everything a new leader starts from, read linearizably."""

    epoch: int = 0
    paused: bool = False
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    members: tuple[MemberRecord, ...] = ()


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads: the controller's name, the address its gRPC server is reached at, and its
    term (the fencing token)."""

    name: str
    address: str
    term: int


class Leadership(Protocol):
    """Leader election. `campaign` returns once this controller leads, with its fencing token;
    from then on `leading()` says, by this controller's own clock, whether it still may act:
    it turns False at its own deadline (the last successful keep-alive's send time plus the
    lease TTL minus a margin), whatever a delayed reply later says."""

    name: str

    async def campaign(self) -> int: ...
    def leading(self) -> bool: ...
    @property
    def token(self) -> int: ...
    async def lost(self) -> None: ...
    async def leader(self) -> LeaderInfo | None: ...
    async def resign(self) -> None: ...
    async def close(self) -> None: ...


class Store(Protocol):
    async def load(self) -> Snapshot: ...
    async def set_epoch(self, expected: int, epoch: int) -> None: ...
    async def set_cluster_paused(self, paused: bool) -> None: ...
    async def save_group(self, group: GroupRecord, expected: GroupRecord | None) -> None: ...
    async def save_member(self, member: MemberRecord) -> None: ...
    async def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object]
    ) -> EventRecord: ...
    async def events(
        self, after_id: int = 0, limit: int = 100, datanode: str = "", newest: bool = False
    ) -> list[EventRecord]: ...
    async def close(self) -> None: ...
