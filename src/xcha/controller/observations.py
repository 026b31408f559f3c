"""What the controller knows of each member: the agent's last report and the controller's own
probes. A report that changes nothing the state machine looks at (its fingerprint) does not
trigger an evaluation."""

from dataclasses import dataclass

from xcha.controller.views import NEVER
from xcha.pg.status import PgStatus
from xcha.rpc import status_from_proto
from xcha.v1 import xcha_pb2 as pb


@dataclass
class Observation:
    """What the controller knows of one member, from its agent and its own probes."""

    status: pb.MemberStatus | None = None
    received_at: float = -NEVER
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
        return True


def fingerprint(status: pb.MemberStatus) -> tuple[object, ...]:
    """The parts of a report the state machine decides on."""
    pg = status.postgres_status
    return (
        pg.running,
        pg.role,
        pg.timeline,
        pg.port,
        pg.wal_receiver.status,
        pg.wal_receiver.upstream.port,
        tuple((d.name, d.state, d.sync_state, d.caught_up) for d in pg.downstreams),
        pg.synchronous_standby_names,
        status.activity,
        status.fenced,
        status.upstream.ok,
        status.epoch,
        status.has_data,
        status.postmaster_died,
    )
