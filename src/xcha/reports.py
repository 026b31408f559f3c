"""What in an agent's report the controller decides on. On a Heartbeats stream an agent sends
its report when this changes (and every report_interval regardless); the controller evaluates
a group when a member's changes. One definition for both sides, so that nothing the state
machine looks at can change without a report."""

from xcha.v1 import xcha_pb2 as pb


def fingerprint(status: pb.MemberStatus) -> tuple[object, ...]:
    """The parts of a report the state machine decides on."""
    pg = status.postgres_status
    return (
        pg.running,
        pg.role,
        pg.timeline,
        pg.port,
        pg.wal_receiver.status,
        pg.wal_receiver.upstream.host,
        pg.wal_receiver.upstream.port,
        tuple((d.name, d.state, d.sync_state, d.caught_up) for d in pg.downstreams),
        pg.synchronous_standby_names,
        status.activity,
        status.fenced,
        status.upstream.ok,
        status.epoch,
        status.has_data,
        status.postmaster_died,
        status.detached,
    )
