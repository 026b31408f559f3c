"""One immutable picture of a PostgreSQL instance, taken in one go."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Downstream:
    """A standby streaming from this server (a pg_stat_replication row)."""

    name: str
    state: str
    sync_state: str
    flush_lsn: int | None
    replay_lsn: int | None
    reply_age: float | None = None  # seconds since the standby last confirmed, at taken_at
    pid: int | None = None  # its WAL sender's: a reconnected standby is another stream
    # Set by the master's agent (syncrep.CatchUp): confirming, and flushed past every commit
    # acknowledged before it confirmed.
    caught_up: bool = False


@dataclass(frozen=True)
class WalReceiver:
    """This standby's WAL receiver (pg_stat_wal_receiver)."""

    status: str
    upstream_host: str | None
    upstream_port: int | None
    last_message_age: float | None


@dataclass(frozen=True)
class PgStatus:
    running: bool
    postmaster_pid: int | None = None
    in_recovery: bool | None = None
    timeline: int | None = None
    system_identifier: int | None = None
    current_lsn: int | None = None
    receive_lsn: int | None = None
    flush_lsn: int | None = None
    replay_lsn: int | None = None
    wal_receiver: WalReceiver | None = None
    downstreams: tuple[Downstream, ...] = field(default=())
    synchronous_standby_names: str = ""
    port: int | None = None
    # master: pg_current_wal_lsn() read after pg_stat_replication. Every commit acknowledged
    # before that read lies below it, so a standby seen confirming in this picture that has
    # flushed up to it holds every commit acknowledged without it (syncrep.CatchUp).
    position_after_senders: int | None = None
    # time.monotonic() when the server was asked: ages measured then grow older with the
    # snapshot (a picture kept while the server does not answer).
    taken_at: float | None = field(default=None, compare=False)

    @property
    def role(self) -> str:
        """stopped, standby, master, or unknown: running, but whether it is in recovery is
        not known (this postmaster has not answered a status query yet)."""
        if not self.running:
            return "stopped"
        if self.in_recovery is None:
            return "unknown"
        return "standby" if self.in_recovery else "master"

    def reply_age(self, downstream: Downstream, now: float) -> float | None:
        """Seconds since downstream last confirmed, as of now rather than as of the snapshot."""
        if downstream.reply_age is None or self.taken_at is None:
            return downstream.reply_age
        return downstream.reply_age + max(0.0, now - self.taken_at)

    @property
    def position(self) -> int:
        """How far this server's WAL reaches: written (master) or flushed from upstream (standby)."""
        if self.in_recovery:
            return max(self.flush_lsn or 0, self.replay_lsn or 0)
        return self.current_lsn or 0

    def downstream(self, name: str) -> Downstream | None:
        return next((d for d in self.downstreams if d.name == name), None)
