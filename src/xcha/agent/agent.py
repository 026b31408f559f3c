"""The datanode agent: owns one PostgreSQL instance beside it, reports what is, and carries
out the controller's node-role messages.

It never decides a role change itself, with one exception: a master that hears neither the
controller nor a synchronous standby for failure_timeout fences itself, because a
controller on the other side of that partition may be promoting a standby.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace

import grpc

from xcha import __version__, timings
from xcha.agent.config import AgentConfig
from xcha.agent.state import StateFile
from xcha.agent.stream import ReportFailed, ReportStream, retry_delay
from xcha.errors import AgentFailed, InvalidInput, PostgresError, StaleEpoch, XchaError
from xcha.names import Endpoint, check_port
from xcha.pg.instance import PostgresInstance, Timings
from xcha.pg.probe import ping
from xcha.pg.status import PgStatus
from xcha.pg.syncrep import CatchUp, SyncStandbys
from xcha.reports import fingerprint
from xcha.rpc import (
    RenewingChannel,
    channel,
    endpoint_from_proto,
    endpoint_to_proto,
    liveness_options,
    status_to_proto,
)
from xcha.v1 import xcha_pb2 as pb

log = logging.getLogger(__name__)

# The local server answers in milliseconds; a loaded machine can take much longer, and a
# snapshot given up too early leaves the controller with a stale picture.
LOCAL_STATUS_TIMEOUT = 2.0
# A Detach waits this long for the WAL receiver to go (a reload, or a restart before 13): a
# hung standby fails it, and the failover goes on without its position, not 30 s later.
DETACH_WAIT = 5.0


class Agent:
    def __init__(self, config: AgentConfig, instance: PostgresInstance, state_file: StateFile) -> None:
        self.config = config
        self.instance = instance
        self.state_file = state_file
        self.state = state_file.load()
        if self.state.port is not None:
            instance.port = self.state.port
        self.pg = PgStatus(running=False, port=instance.port)
        # Which confirming standbys have flushed every commit acknowledged before they
        # confirmed: a new agent (an adopted master) knows of none until they catch up again.
        self.catch_up = CatchUp()
        self.activity = "starting"
        self.last_error = ""
        self.upstream_check = pb.UpstreamCheck(checked=False)
        self._upstream_ok_at = time.monotonic()
        self.heartbeat_interval = timings.HEARTBEAT_INTERVAL  # until the controller says
        self.failure_timeout = timings.FAILURE_TIMEOUT
        self.report_interval = timings.REPORT_INTERVAL
        self.keepalive_interval = timings.KEEPALIVE_INTERVAL
        self.controller_ok_at: float | None = None
        # The stream on which the leader last answered: while it is open, the controller is
        # heard (keep-alive pings close it when either end stops).
        self._contact: ReportStream | None = None
        self._ignored_epoch = 0  # the last older epoch whose replies were ignored (logged once)
        self._operation_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._change_reason = ""
        self._postmaster_gone = asyncio.Event()
        # Seen exiting while running, unasked: a crash. A postmaster found stopped at start
        # is not one (a clean restart, a reboot): the controller starts that one in place.
        self.postmaster_died = False
        self._watched_pid: int | None = None
        self._stopping = asyncio.Event()
        self._started = time.monotonic()
        self._boot_id = uuid.uuid4().hex
        self._sequence = itertools.count(1)

    # ---- state ---------------------------------------------------------------------------

    def _save(self, **changes: object) -> None:
        """Durable first: the agent acts on a state only once it is on disk."""
        state = self.state.but(**changes)
        self.state_file.save(state)
        self.state = state

    def accept_epoch(self, epoch: int, member: str) -> None:
        """Refuse messages for another member or from an older epoch; persist a newer epoch
        before acting on it. A message of the current epoch is refused too while this agent
        has been out of contact with the controller for failure_timeout: it may have waited in
        a socket while the agent (or its host) was stopped, and a newer epoch may exist that
        the next heartbeat reply will bring."""
        if member != self.config.member:
            raise InvalidInput(f"this is the agent of {self.config.member}, not of {member!r}")
        if epoch < self.state.epoch:
            raise StaleEpoch(f"epoch {epoch} is older than epoch {self.state.epoch} already seen")
        if epoch == self.state.epoch:
            silent = self.controller_silent_for()
            if silent > self.failure_timeout:
                raise StaleEpoch(
                    f"out of contact with the controller for {silent:.1f} s: "
                    f"epoch {epoch} may be stale until the next heartbeat"
                )
        if epoch > self.state.epoch:
            self._save(epoch=epoch)

    def controller_silent_for(self) -> float:
        """Seconds since the leading controller was last heard: 0 while the stream on which it
        answered is open; else since its last reply, or shortly before that stream ended
        (since start-up when it has not answered yet)."""
        if self._contact is not None and not self._contact.ended:
            return 0.0
        return time.monotonic() - max(self.controller_ok_at or 0.0, self._started)

    def _stream_ended(self, stream: "ReportStream") -> None:
        """The stream the leader answered on ended (closed by either end, or a keep-alive ping
        went unanswered): report again at once, on a new one. A stream that failed before that
        is the heartbeat loop's to retry, after `retry_delay`."""
        if stream is self._contact:
            self._contact = None
            heard = time.monotonic() - stream.silence
            self.controller_ok_at = max(self.controller_ok_at or 0.0, heard)
            self.signal_change("controller stream ended")

    def signal_change(self, reason: str) -> None:
        """Something that matters changed: heartbeat now, not at the next interval."""
        if not self._change_reason:
            self._change_reason = reason
        self._changed.set()

    @property
    def upstream(self) -> Endpoint | None:
        if self.state.upstream_host:
            return Endpoint(self.state.upstream_host, self.state.upstream_port)
        return None

    def member_status(self) -> pb.MemberStatus:
        """The report sent to the controller (numbered: the controller drops older ones)."""
        status = self.status_report()
        status.sequence = next(self._sequence)
        return status

    def status_report(self) -> pb.MemberStatus:
        """What the agent would report now, unnumbered (metrics)."""
        return pb.MemberStatus(
            datanode=self.config.datanode,
            member=self.config.member,
            postgres=endpoint_to_proto(Endpoint(self.instance.spec.host, self.instance.port)),
            agent_address=self.config.advertise,
            postgres_status=status_to_proto(self.pg),
            epoch=self.state.epoch,
            agent_version=__version__,
            activity=self.activity,
            fenced=self.state.fenced,
            has_data=self.instance.has_cluster(),
            last_error=self.last_error,
            upstream=self.upstream_check,
            boot_id=self._boot_id,
            postmaster_died=self.postmaster_died,
            # Said only while no WAL receiver runs: a report is never "detached" while one does.
            detached=self.state.detached and self.pg.wal_receiver is None,
        )

    # ---- observing PostgreSQL ------------------------------------------------------------

    def _significant(self, status: PgStatus) -> tuple[object, ...]:
        """What of the PostgreSQL status the controller decides on (the report's fingerprint)."""
        return fingerprint(pb.MemberStatus(postgres_status=status_to_proto(status)))

    async def refresh(self) -> PgStatus:
        """Take a new snapshot; a server that does not answer in time keeps its last picture."""
        return await self._refresh(self.instance.postmaster_pid())

    async def _refresh(self, pid: int | None) -> PgStatus:
        """refresh() for the postmaster PID just looked up. The picture kept for a server that
        does not answer is that postmaster's last one: a new postmaster (or one that has not
        answered since the agent started) is running, role unknown, until it answers."""
        before = self._significant(self.pg)
        if pid is None:
            status = PgStatus(running=False, port=self.instance.port)
        else:
            try:
                status = await self.instance.status(timeout=LOCAL_STATUS_TIMEOUT, pid=pid)
            except Exception as error:
                self.last_error = f"status query failed: {str(error).strip() or type(error).__name__}"
                last = self.pg if self.pg.postmaster_pid == pid else PgStatus(running=True)
                status = replace(last, running=True, postmaster_pid=pid, port=self.instance.port)
        status = self.catch_up.mark(status)
        self.pg = status
        if status.running:
            self.postmaster_died = False
        self._watch_pid(status.postmaster_pid)
        if self._significant(status) != before:
            self.signal_change(f"PostgreSQL is now {status.role}")
        return status

    def _watch_pid(self, pid: int | None) -> None:
        """A pidfd becomes readable the moment the postmaster exits, whether or not it is
        this process's child: the crash is reported without waiting for the next poll."""
        if pid == self._watched_pid:
            return
        self._watched_pid = pid
        self._postmaster_gone.clear()
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._postmaster_gone.set()

        loop.add_reader(fd, exited)

    async def _watch(self) -> None:
        """Every watch_interval (or at once when the postmaster exits): is it still there?"""
        next_refresh = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._postmaster_gone.wait(), self.config.watch_interval)
            exited = self._postmaster_gone.is_set()  # the refresh below clears it
            pid = self.instance.postmaster_pid()  # polls (and so reaps) a postmaster xcha started
            now = time.monotonic()
            # While a confirming standby catches up, a picture at every watch: the moment it
            # has caught up is a change to report (the controller counts it from then on).
            if (pid is not None) != self.pg.running or now >= next_refresh or self.catch_up.waiting:
                was_running = self.pg.running
                await self._refresh(pid)
                if was_running and not self.pg.running and not self._operation_lock.locked():
                    self.postmaster_died = True
                    log.warning(
                        "%s: postmaster gone (%s)",
                        self.config.member,
                        "exited" if exited else "no longer running",
                    )
                    self.signal_change("postmaster died")
                next_refresh = now + self.heartbeat_interval
            await self._self_fence_if_isolated()

    async def _check_upstream(self) -> None:
        """A standby asks its master itself: a hung master keeps the WAL receiver's TCP
        connection open long after it stopped sending."""
        while not self._stopping.is_set():
            upstream = self.upstream
            if self.pg.running and self.pg.in_recovery and upstream is not None:
                result = await ping(upstream, self.config.probe_timeout)
                now = time.monotonic()
                if result.ok:
                    self._upstream_ok_at = now
                was_ok = self.upstream_check.ok
                self.upstream_check = pb.UpstreamCheck(
                    checked=True,
                    ok=result.ok,
                    seconds_since_ok=now - self._upstream_ok_at,
                    detail=f"{upstream}: {result.detail}",
                )
                if was_ok != result.ok:
                    self.signal_change(f"upstream {upstream} {'answers' if result.ok else 'does not answer'}")
            else:
                self.upstream_check = pb.UpstreamCheck(checked=False)
                self._upstream_ok_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.heartbeat_interval)

    async def _self_fence_if_isolated(self) -> None:
        if not (self.pg.role == "master" and self.pg.synchronous_standby_names):
            return
        if self.controller_silent_for() < self.failure_timeout:
            return
        # Ages as of now: a picture kept while the server does not answer grows old too.
        now = time.monotonic()
        # Before PostgreSQL 12 (Postgres-XL 10, XC 1.2) there is no reply age: a streaming
        # synchronous standby counts until its WAL sender gives up on it (wal_sender_timeout).
        ages = (
            self.pg.reply_age(d, now)
            for d in self.pg.downstreams
            if d.sync_state in ("sync", "quorum") and d.state == "streaming"
        )
        confirmed = any(age is None or age < self.failure_timeout for age in ages)
        if confirmed or self._operation_lock.locked():
            return
        async with self._operation("self-fencing"):
            log.warning(
                "%s: no controller and no synchronous standby for %.1f s: fencing myself",
                self.config.member,
                self.failure_timeout,
            )
            await self._fence_instance()

    async def _fence_instance(self, clean: bool = False) -> None:
        """Stop PostgreSQL and keep it stopped: fenced is on disk before the instance stops,
        so an agent restarted meanwhile does not start it again. clean: a fast shutdown;
        otherwise SIGKILL (a master that must stop writing now, hung or not)."""
        self._save(fenced=True)
        if clean:
            await self.instance.stop("fast")
        else:
            await self.instance.kill()

    # ---- heartbeats ---------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Reports to the leading controller, on one stream kept open to it (`ReportStream`): at
        once when something the controller decides on changed (`xcha.reports.fingerprint`,
        checked every heartbeat_interval besides the changes signalled at once), and every
        report_interval regardless; between reports keep-alive pings on the connection stand
        for heartbeats. With several controllers, a failed exchange moves to the next address
        and a follower's reply ("not the leader") to the leader it names; only the leader's
        replies count as contact and are acted on."""
        addresses = list(self.config.controller_addresses)
        channels: dict[str, grpc.aio.Channel | RenewingChannel] = {}
        stream: ReportStream | None = None
        current = 0
        failures = 0  # exchanges in a row that got no reply
        unreachable_logged = False
        sent: tuple[object, ...] = ()
        sent_at = -float("inf")
        channel_keepalive: timings.Keepalive | None = None
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.heartbeat_interval)
                self._changed.clear()
                reason, self._change_reason = self._change_reason or "interval", ""
                address = addresses[current]
                keepalive = timings.Keepalive.of(
                    self.heartbeat_interval, self.keepalive_interval, self.failure_timeout
                )
                if keepalive != channel_keepalive:  # the controller's timings differ: new channels
                    for each in channels.values():
                        await each.close()
                    channels, channel_keepalive = {}, keepalive
                if address not in channels:
                    channels[address] = channel(address, self.config.tls, liveness_options(keepalive))
                if stream is not None and not stream.usable(address, channels[address]):
                    stream.close()
                    stream = None
                status = self.status_report()
                seen = fingerprint(status)
                # Before any answer (or from an older controller) every interval, as before.
                every = self.report_interval if self._contact is not None else self.heartbeat_interval
                unchanged = stream is not None and reason == "interval" and seen == sent
                if unchanged and time.monotonic() - sent_at < every:
                    continue
                if stream is None:
                    stream = ReportStream(
                        address, channels[address], self.heartbeat_interval, self._stream_ended
                    )
                status.sequence = next(self._sequence)
                request = pb.HeartbeatRequest(status=status, reason=reason)
                sent, sent_at = seen, time.monotonic()
                try:
                    reply = await stream.exchange(request, timings.reply_timeout(self.heartbeat_interval))
                except ReportFailed as error:
                    stream.close()
                    stream = None
                    if not unreachable_logged:
                        log.warning("%s: controller %s unreachable: %s", self.config.member, address, error)
                        unreachable_logged = True
                    current = (current + 1) % len(addresses)
                    failures += 1
                    if failures % len(addresses):
                        self.signal_change("next controller")  # one not tried this round: at once
                    else:
                        delay = retry_delay(failures // len(addresses), self.heartbeat_interval)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stopping.wait(), delay)
                    continue
                failures = 0
                if reply.not_leader:
                    leader = reply.leader_address
                    if leader and leader not in addresses:
                        addresses.append(leader)
                    current = addresses.index(leader) if leader else (current + 1) % len(addresses)
                    self.signal_change("leader moved")  # ask the leader at once
                    await asyncio.sleep(0.02 if leader else self.heartbeat_interval)
                    continue
                if unreachable_logged:
                    log.info("%s: controller %s reachable again", self.config.member, address)
                    unreachable_logged = False
                self.controller_ok_at = time.monotonic()
                self._contact = stream if reply.report_interval > 0 else None
                await self._follow_reply(reply)
        finally:
            self._contact = None
            if stream is not None:
                stream.close()
            for each in channels.values():
                await each.close()

    async def _follow_reply(self, reply: pb.HeartbeatReply) -> None:
        if reply.epoch < self.state.epoch:
            # From a controller that has been deposed since (a newer leader has answered):
            # nothing in it is what should be now.
            log.info(
                "%s: ignoring a reply of epoch %d < %d", self.config.member, reply.epoch, self.state.epoch
            )
            return
        if reply.heartbeat_interval > 0:
            self.heartbeat_interval = reply.heartbeat_interval
        if reply.failure_timeout > 0:
            self.failure_timeout = reply.failure_timeout
        if reply.report_interval > 0:
            self.report_interval = reply.report_interval
        if reply.keepalive_interval > 0:
            self.keepalive_interval = reply.keepalive_interval
        if reply.epoch > self.state.epoch:
            self._save(epoch=reply.epoch)
            # The controller waits for every member's report at its epoch before it trusts
            # silence after its start: say it at once, not one interval later.
            self.signal_change(f"epoch {reply.epoch}")
        upstream = endpoint_from_proto(reply.upstream)
        if (
            reply.goal == pb.GOAL_STANDBY
            and upstream is not None
            and self.upstream != upstream
            and self.pg.role != "master"
        ):
            self._save(upstream_host=upstream.host, upstream_port=upstream.port)
        deposed = reply.goal in (pb.GOAL_STANDBY, pb.GOAL_REMOVED) and self.pg.role == "master"
        if deposed and not self._operation_lock.locked():
            async with self._operation("fencing"):
                log.warning(
                    "%s: the controller (epoch %d) says I am no master: fencing",
                    self.config.member,
                    reply.epoch,
                )
                await self._fence_instance()
        if reply.goal == pb.GOAL_REMOVED and not self.state.removed:
            self._save(removed=True)

    # ---- node-role messages --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self, activity: str) -> AsyncIterator[None]:
        """One role change at a time; the activity is reported while it runs."""
        async with self._operation_lock:
            self.activity = activity
            self.signal_change(activity)
            started = time.monotonic()
            try:
                yield
                self.last_error = ""
            except Exception as error:
                self.last_error = f"{activity} failed: {error}"
                log.error("%s: %s", self.config.member, self.last_error)
                raise
            finally:
                self.activity = "idle"
                log.info(
                    "%s: %s took %.0f ms", self.config.member, activity, (time.monotonic() - started) * 1000
                )
                await self.refresh()
                self.signal_change(f"{activity} done")

    async def promote(
        self, epoch: int, member: str, takeover_port: int = 0, sync: SyncStandbys | None = None
    ) -> tuple[str, float]:
        """Become the master: promote a standby, start a stopped master, or initdb an empty one."""
        if takeover_port:
            check_port(takeover_port, "takeover port")
        self.accept_epoch(epoch, member)
        if self.state.removed:
            raise InvalidInput(f"{member} was removed from its group")
        started = time.monotonic()
        async with self._operation("promoting"):
            if not self.instance.has_cluster():
                timings = await self.instance.bootstrap_master()
                detail = f"bootstrapped: {_steps(timings)}"
            else:
                status = await self.refresh()
                if status.role == "standby":
                    if sync is not None:
                        self.catch_up.reset()
                        await self.instance.set_synchronous_standbys(sync)
                    detail = f"promoted a standby in {await self.instance.promote() * 1000:.0f} ms"
                elif status.role == "master":
                    detail = "already the master"
                elif status.running:
                    raise PostgresError(f"PostgreSQL is running but does not answer: {self.last_error}")
                else:
                    self.instance.configure("master")
                    try:
                        seconds = await self.instance.start()
                    except BaseException:
                        # It will not come up: a failure seen here, which the controller
                        # treats as a crash (a failover when a standby holds every commit).
                        self.postmaster_died = True
                        raise
                    detail = f"started as master in {seconds * 1000:.0f} ms"
            if takeover_port and takeover_port != self.instance.port:
                try:
                    timings = await self.instance.take_over_port(takeover_port)
                    detail += f"; took over port {takeover_port}: {_steps(timings)}"
                except PostgresError as error:
                    detail += f"; no port takeover: {error}"
                    log.error("%s: %s", member, error)
            self._save(
                fenced=False,
                role="master",
                port=self.instance.port,
                upstream_host="",
                upstream_port=0,
                detached=False,
            )
        log.info("%s: %s (epoch %d)", member, detail, epoch)
        return detail, time.monotonic() - started

    async def follow(self, epoch: int, member: str, upstream: Endpoint, port: int = 0) -> tuple[str, float]:
        """Become a standby of upstream: keep, reconfigure, pg_rewind, or clone afresh."""
        if port:
            check_port(port)
        self.accept_epoch(epoch, member)
        if self.state.removed:
            raise InvalidInput(f"{member} was removed from its group")
        started = time.monotonic()
        async with self._operation("following"):
            self._save(upstream_host=upstream.host, upstream_port=upstream.port, detached=False)
            status = await self.refresh()
            if status.running and not status.in_recovery:  # a master, or not known not to be one
                await self._fence_instance()
            if port and port != self.instance.port:
                await self.instance.stop("fast")
                self.instance.port = port
                self._save(port=port)
            timings = await self.instance.follow(upstream)
            self._save(fenced=False, role="standby")
        detail = f"following {upstream}: {_steps(timings)}"
        log.info("%s: %s (epoch %d)", member, detail, epoch)
        return detail, time.monotonic() - started

    async def fence(self, epoch: int, member: str, reason: str, clean: bool) -> tuple[str, int, float]:
        """Stop serving writes and stay stopped. clean: a fast shutdown, after which every WAL
        record up to the returned position has reached the streaming standbys."""
        self.accept_epoch(epoch, member)
        started = time.monotonic()
        final_lsn = 0
        async with self._operation("fencing"):
            await self._fence_instance(clean)
            if clean:
                final_lsn = await self.instance.shutdown_checkpoint_lsn()
        log.warning("%s: fenced (%s), epoch %d", member, reason or "no reason given", epoch)
        return f"fenced: {reason}", final_lsn, time.monotonic() - started

    async def set_synchronous_standbys(self, epoch: int, member: str, sync: SyncStandbys) -> str:
        self.accept_epoch(epoch, member)
        async with self._operation("setting synchronous standbys"):
            # Every standby catches up again with a position read once the names are in effect
            # (the refresh that ends the operation): a commit acknowledged before then may have
            # waited for none of them.
            self.catch_up.reset()
            value = await self.instance.set_synchronous_standbys(sync)
        log.info("%s: synchronous_standby_names = '%s' (epoch %d)", member, value, epoch)
        return f"synchronous_standby_names = '{value}'"

    async def detach(self, epoch: int, member: str, reason: str = "") -> tuple[str, float]:
        """Stay a standby but stop receiving WAL from the upstream, until the next Follow: a
        failover reads positions only once the old master can confirm nothing more through
        this standby (its position is then final). Idempotent; a stopped standby is configured
        so that it streams from no one when it starts. A master is refused."""
        self.accept_epoch(epoch, member)
        if self.state.removed:
            raise InvalidInput(f"{member} was removed from its group")
        started = time.monotonic()
        async with self._operation("detaching"):
            status = await self.refresh()
            if status.running and not status.in_recovery:
                raise InvalidInput(f"{member} is not a standby: there is nothing to detach")
            if not status.running and self.state.role != "standby":
                raise InvalidInput(f"{member} was not a standby when it stopped: nothing to detach")
            seconds = await self.instance.detach(timeout=DETACH_WAIT)
            self._save(detached=True)
        detail = f"detached ({reason or 'no reason given'}): WAL receiver stopped in {seconds * 1000:.0f} ms"
        log.warning("%s: %s (epoch %d)", member, detail, epoch)
        return detail, time.monotonic() - started

    async def checkpoint(self, epoch: int, member: str) -> str:
        self.accept_epoch(epoch, member)
        started = time.monotonic()
        await self.instance.checkpoint()
        return f"checkpoint in {(time.monotonic() - started) * 1000:.0f} ms"

    async def remove(self, epoch: int, member: str) -> str:
        self.accept_epoch(epoch, member)
        async with self._operation("leaving the group"):
            self._save(removed=True, fenced=True)
            await self.instance.stop("fast")
        log.warning("%s: removed from datanode %s (epoch %d)", member, self.config.datanode, epoch)
        return "stopped and removed"

    # ---- life cycle ----------------------------------------------------------------------

    async def resume(self) -> None:
        """On start: adopt a running postmaster; start a standby that is not running; never
        start a master on its own (the controller may have promoted another meanwhile)."""
        pid = self.instance.postmaster_pid()
        if pid is not None:
            log.info("%s: adopted running PostgreSQL (PID %d)", self.config.member, pid)
        elif (
            self.instance.has_cluster()
            and self.state.role == "standby"
            and not self.state.fenced
            and not self.state.removed
        ):
            log.info("%s: starting PostgreSQL as a standby", self.config.member)
            try:
                await self.instance.start()
            except XchaError as error:
                self.last_error = f"start failed: {error}"
                log.error("%s: %s", self.config.member, self.last_error)
        await self.refresh()
        self.activity = "idle"

    async def run(self) -> None:
        """Run until stop(). The loops never end on their own: when one does (an unexpected
        error, a state file that cannot be written), the agent stops and raises AgentFailed,
        and the process exits non-zero (systemd restarts it) rather than serving on without
        heartbeats or self-fencing."""
        await self.resume()
        loops: dict[str, Coroutine[object, object, None]] = {
            "watching PostgreSQL": self._watch(),
            "heartbeats": self._heartbeats(),
            "checking the upstream": self._check_upstream(),
        }
        tasks = {asyncio.create_task(loop, name=name): name for name, loop in loops.items()}
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, *tasks):
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
        # A loop that ends because stop() was called at that moment has not failed.
        failed = next(
            (
                task
                for task in tasks
                if task in done
                and not task.cancelled()
                and (task.exception() is not None or not self._stopping.is_set())
            ),
            None,
        )
        if failed is None:
            return
        error = failed.exception()
        why = (str(error).strip() or type(error).__name__) if error else "it ended"
        log.critical(
            "%s: %s failed, stopping the agent: %s", self.config.member, tasks[failed], why, exc_info=error
        )
        raise AgentFailed(f"agent {self.config.member}: {tasks[failed]} failed: {why}") from error

    def stop(self) -> None:
        self._stopping.set()


def _steps(timings: Timings) -> str:
    return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in timings.steps)
