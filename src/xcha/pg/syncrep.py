"""synchronous_standby_names: what it means and how each PostgreSQL version spells it."""

import re
from dataclasses import dataclass, replace
from typing import Literal

from xcha.errors import InvalidInput
from xcha.names import check_name
from xcha.pg.status import PgStatus

SyncMethod = Literal["first", "any"]


@dataclass(frozen=True)
class SyncPolicy:
    """How many standbys must confirm a commit: FIRST k (priority order) or ANY k (quorum)."""

    method: SyncMethod = "first"
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "SyncPolicy":
        """'FIRST 1' or 'ANY 2' (case-insensitive)."""
        match = re.fullmatch(r"\s*(first|any)\s+(\d+)\s*", text, re.IGNORECASE)
        if match is None or int(match.group(2)) < 1:
            raise InvalidInput(f"invalid synchronous policy {text!r}: expected 'FIRST k' or 'ANY k', k >= 1")
        method: SyncMethod = "first" if match.group(1).lower() == "first" else "any"
        return cls(method, int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.count}"


@dataclass(frozen=True)
class SyncStandbys:
    """A policy applied to named standbys (their application_name, i.e. member names)."""

    policy: SyncPolicy
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in self.names:
            check_name(name, "standby name")
        if len(set(self.names)) != len(self.names):
            raise InvalidInput(f"standby names repeat: {', '.join(self.names)}")

    @property
    def required(self) -> int:
        """Standbys that must confirm a commit: k, or all of them when fewer are named."""
        return min(self.policy.count, len(self.names))

    def render(self, version: int) -> str:
        """The synchronous_standby_names value for this server version ('' = asynchronous)."""
        if not self.names:
            return ""
        listed = ", ".join(self.names)
        if version >= 100000:
            return f"{self.policy.method.upper()} {self.required} ({listed})"
        if self.policy.method == "any":
            raise InvalidInput("ANY k (quorum commit) needs PostgreSQL 10 or newer")
        if version >= 90600:
            return f"{self.required} ({listed})"
        if self.required != 1:
            raise InvalidInput("more than one synchronous standby needs PostgreSQL 9.6 or newer")
        return listed

    @classmethod
    def parse(cls, text: str) -> "SyncStandbys":
        """Read a synchronous_standby_names value in any version's spelling."""
        text = text.strip()
        if not text:
            return cls(SyncPolicy(), ())
        match = re.fullmatch(r"(?:(first|any)\s+)?(\d+)\s*\((.*)\)", text, re.IGNORECASE | re.DOTALL)
        if match is not None:
            method: SyncMethod = "any" if (match.group(1) or "").lower() == "any" else "first"
            policy = SyncPolicy(method, int(match.group(2)))
            listed = match.group(3)
        else:
            policy, listed = SyncPolicy(), text
        names = tuple(part.strip().strip('"') for part in listed.split(",") if part.strip())
        return cls(policy, names)


CONFIRMING = ("sync", "quorum")


class CatchUp:
    """Which standbys a master's agent may report as caught up: confirming commits now (a
    streaming WAL sender in state sync or quorum) AND flushed up to the master's WAL position
    read after the agent first saw that WAL sender confirm under the current
    synchronous_standby_names. A commit acknowledged without waiting for the standby (while
    the names were empty, or another standby confirmed) lies below that position: its commit
    record was written before the acknowledgement. Every later commit waits for it (FIRST k)
    or for the quorum it belongs to (ANY k).

    Conservative by construction: a new WAL sender (the standby reconnected), a change of the
    names (seen, or made by this agent: `reset`) and a new agent start each take a new, later
    position. A standby that stops confirming and confirms again with the same WAL sender
    between two pictures is not seen; the agent takes pictures often while a standby catches up.
    """

    def __init__(self) -> None:
        self._names: str | None = None
        self._points: dict[tuple[str, int | None], int] = {}
        self.waiting = False  # a confirming standby has not caught up yet

    def reset(self) -> None:
        """The agent is changing synchronous_standby_names (or the role): every standby must
        catch up again with a position read once the change is in effect."""
        self._names = None
        self._points.clear()

    def mark(self, status: PgStatus) -> PgStatus:
        """The picture with each downstream's caught_up set."""
        if not status.running or status.in_recovery is not False:
            self.reset()
            self.waiting = False
            return status
        if status.synchronous_standby_names != self._names:
            self._names = status.synchronous_standby_names
            self._points.clear()
        position = status.position_after_senders
        points: dict[tuple[str, int | None], int] = {}
        marked = []
        waiting = False
        for downstream in status.downstreams:
            caught_up = False
            if downstream.state == "streaming" and downstream.sync_state in CONFIRMING:
                key = (downstream.name, downstream.pid)
                point = self._points.get(key, position)
                if point is not None:
                    points[key] = point
                    caught_up = downstream.flush_lsn is not None and downstream.flush_lsn >= point
                waiting = waiting or not caught_up
            marked.append(
                replace(downstream, caught_up=caught_up) if caught_up != downstream.caught_up else downstream
            )
        self._points = points
        self.waiting = waiting
        return replace(status, downstreams=tuple(marked))
