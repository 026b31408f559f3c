"""What the controller knows of each member: the agent's last report, whether its Heartbeats
stream is open, and the controller's own probes. A report that changes nothing the state
machine looks at (its fingerprint, `xcha.reports`) does not trigger an evaluation."""

from dataclasses import dataclass

from xcha.controller.views import NEVER
from xcha.pg.status import PgStatus
from xcha.rpc import status_from_proto
from xcha.v1 import xcha_pb2 as pb


@dataclass
class Observation:
    """What the controller knows of one member, from its agent and its own probes.

    Liveness: a member is heard now while a Heartbeats stream of its agent is open (keep-alive
    pings keep it open only while both ends run) and its last report is younger than
    `stale_after` (an agent whose reports stopped while its connection lives is stuck); else it
    was last heard at its last report, or shortly before its last stream ended (`closed`)."""

    status: pb.MemberStatus | None = None
    received_at: float = -NEVER  # the last report
    last_heard: float = -NEVER  # the last sign of life known when no stream is open
    streams: int = 0  # Heartbeats streams open (two while an agent reconnects)
    probe_ok: bool | None = None
    probe_detail: str = "not probed"
    probe_at: float = -NEVER
    probing: bool = False
    busy: bool = False
    follow_failed_at: float = -NEVER
    streaming_seen_at: float = -NEVER
    fingerprint: tuple[object, ...] = ()
    _pg: PgStatus | None = None

    @property
    def pg(self) -> PgStatus:
        """The status as a PgStatus, converted when first needed (most heartbeats of a large
        cluster are never looked at: converting each one would cost the controller)."""
        if self._pg is None:
            self._pg = (
                status_from_proto(self.status.postgres_status) if self.status else PgStatus(running=False)
            )
        return self._pg

    def heard_at(self, now: float, stale_after: float) -> float:
        """When the member was last known alive."""
        if self.streams and now - self.received_at < stale_after:
            return now
        return self.last_heard

    def update(self, status: pb.MemberStatus, now: float) -> bool:
        """Take a report; False when it is older than the one held (it arrived late)."""
        previous = self.status
        if (
            previous is not None
            and previous.boot_id == status.boot_id
            and status.sequence <= previous.sequence
        ):
            return False
        self.status = status
        self._pg = None
        self.received_at = now
        self.last_heard = max(self.last_heard, now)
        return True

    def closed(self, now: float, silence: float, stale_after: float) -> None:
        """A stream ended at now: its far end was alive up to `silence` before
        (`timings.Keepalive.silence`), unless its reports had gone stale before that."""
        self.streams = max(0, self.streams - 1)
        self.last_heard = max(self.last_heard, min(now - silence, self.received_at + stale_after))
