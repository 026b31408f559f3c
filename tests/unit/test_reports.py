"""The report fingerprint: what the state machine decides on changes it, bookkeeping does not.
The agent signals a change after a refresh by the same definition (`Agent._significant`)."""

from xcha.reports import fingerprint
from xcha.v1 import xcha_pb2 as pb


def report(host: str = "10.0.0.1", sequence: int = 1, sync_state: str = "sync") -> pb.MemberStatus:
    return pb.MemberStatus(
        member="dn1b",
        sequence=sequence,
        postgres_status=pb.PostgresStatus(
            running=True,
            role=pb.ROLE_STANDBY,
            wal_receiver=pb.WalReceiver(status="streaming", upstream=pb.Endpoint(host=host, port=5432)),
            downstreams=[pb.Downstream(name="dn1c", state="streaming", sync_state=sync_state)],
            flush_lsn=100,
        ),
    )


def test_what_the_state_machine_reads_changes_the_fingerprint_and_bookkeeping_does_not() -> None:
    base = fingerprint(report())
    assert fingerprint(report(sequence=2)) == base
    moved = report()
    moved.postgres_status.flush_lsn = 200  # positions travel with the next report, not at once
    assert fingerprint(moved) == base
    assert fingerprint(report(host="10.0.0.2")) != base, "a new upstream on the same port"
    assert fingerprint(report(sync_state="potential")) != base
