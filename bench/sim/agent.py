"""A simulated datanode agent: the rules of xcha.agent.agent.Agent (the same method names)
over a simulated PostgreSQL. It reports what is, persists the highest epoch before acting,
refuses older epochs (and its current one while the controller has been silent for
failure_timeout), fences its master when a heartbeat reply says it is no master, and fences
itself when it hears neither the controller nor a synchronous standby for failure_timeout.
Operations take virtual time; while the host is hung they wait, and messages that arrive
meanwhile are carried out after it resumes (they waited in a socket)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace

from bench.sim.world import Postgres, World, common_prefix
from xcha.agent.state import AgentState
from xcha.errors import InvalidInput, PostgresError, StaleEpoch
from xcha.names import Endpoint
from xcha.pg.syncrep import CatchUp, SyncStandbys
from xcha.rpc import status_to_proto
from xcha.v1 import xcha_pb2 as pb

# How long PostgreSQL operations take (virtual seconds; measured orders of magnitude).
INITDB = 0.7
PROMOTE = 0.07
START = 0.1
RESTART = 0.2
REWIND = 0.6
CLONE = 0.4
KILL = 0.005
RELOAD = 0.005
WATCH_INTERVAL = 0.05
STREAM_WAIT = 5.0  # xcha.pg.instance.STREAM_WAIT


class SimAgent:
    def __init__(
        self, world: World, pg: Postgres, datanode: str, trace: Callable[[str], None], address: str
    ) -> None:
        self.world = world
        self.pg = pg
        self.name = pg.name
        self.datanode = datanode
        self.trace = trace
        self.address = address
        self.state = AgentState()  # what it persisted: survives agent restarts
        self.alive = False
        self.boots = 0
        self.awake = asyncio.Event()
        self.awake.set()
        self.tasks: list[asyncio.Task[object]] = []
        # Set by start():
        self.activity = "starting"
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.change_reason = ""
        self.postmaster_died = False
        self.seen_running = False
        self.controller_ok_at: float | None = None
        self.started = 0.0
        self.sequence = 0
        self.heartbeat_interval = 0.25
        self.failure_timeout = 2.0
        self.upstream_check = pb.UpstreamCheck(checked=False)
        self.fingerprint: tuple[object, ...] = ()
        self.next_refresh = 0.0
        self.catch_up = CatchUp()  # as xcha.agent.agent.Agent: which standbys have caught up

    @property
    def now(self) -> float:
        return self.world.clock()

    @property
    def hung(self) -> bool:
        return not self.awake.is_set()

    # ---- life cycle ------------------------------------------------------------------------

    def start(self, heartbeats: Callable[["SimAgent"], Coroutine[object, object, object]]) -> None:
        """The agent process starts: adopt a running postmaster, start a standby that is not
        running, never start a master on its own."""
        self.alive = True
        self.boots += 1
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.change_reason = ""
        self.postmaster_died = False
        self.controller_ok_at = None
        self.started = self.now
        self.sequence = 0
        self.heartbeat_interval, self.failure_timeout = 0.25, 2.0
        self.upstream_check = pb.UpstreamCheck(checked=False)
        self.catch_up = CatchUp()  # a new agent knows nothing of what its standbys caught up with
        pg = self.pg
        if not pg.running and pg.has_data and self.state.role == "standby" and not self.state.fenced:
            self.world.start(pg, standby=True)
        self.seen_running = pg.running
        self.activity = "idle"
        self.trace(f"agent {self.name}: started (boot {self.boots}, epoch {self.state.epoch})")
        self.tasks = []
        self.spawn(heartbeats(self))

    def kill(self) -> None:
        self.alive = False
        for task in self.tasks:
            task.cancel()
        self.tasks = []
        self.trace(f"agent {self.name}: killed")

    def spawn(self, work: Coroutine[object, object, object]) -> None:
        """Run work as this agent's: it dies with the agent."""
        self.tasks = [task for task in self.tasks if not task.done()]
        task = asyncio.ensure_future(work)
        task.add_done_callback(self._ended)
        self.tasks.append(task)

    def _ended(self, task: "asyncio.Task[object]") -> None:
        """A simulated agent's task must not fail: that would be a bug of the simulation."""
        if not task.cancelled() and task.exception() is not None:
            self.world.fail("simulation error", f"agent {self.name}: {task.exception()!r}")

    async def wait_awake(self) -> None:
        await self.awake.wait()

    async def sleep(self, seconds: float) -> None:
        """Time passes for an operation; a hung host finishes it only after it resumes."""
        await asyncio.sleep(seconds)
        await self.awake.wait()

    # ---- state -------------------------------------------------------------------------------

    def save(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def controller_silent_for(self) -> float:
        return self.now - max(self.controller_ok_at or 0.0, self.started)

    def accept_epoch(self, epoch: int, member: str) -> None:
        if member != self.name:
            raise InvalidInput(f"this is the agent of {self.name}, not of {member!r}")
        if epoch < self.state.epoch:
            raise StaleEpoch(f"epoch {epoch} is older than epoch {self.state.epoch} already seen")
        if epoch == self.state.epoch and self.controller_silent_for() > self.failure_timeout:
            raise StaleEpoch(f"out of contact with the controller: epoch {epoch} may be stale")
        if epoch > self.state.epoch:
            self.save(epoch=epoch)

    def signal_change(self, reason: str) -> None:
        if not self.change_reason:
            self.change_reason = reason
        self.changed.set()

    @property
    def upstream(self) -> Endpoint | None:
        return (
            Endpoint(self.state.upstream_host, self.state.upstream_port) if self.state.upstream_host else None
        )

    def member_status(self) -> pb.MemberStatus:
        self.sequence += 1
        pg = self.pg
        return pb.MemberStatus(
            datanode=self.datanode,
            member=self.name,
            postgres=pb.Endpoint(host=pg.host, port=pg.port),
            agent_address=self.address,
            postgres_status=status_to_proto(self.catch_up.mark(self.world.status(pg))),
            epoch=self.state.epoch,
            activity=self.activity,
            fenced=self.state.fenced,
            has_data=pg.has_data,
            upstream=self.upstream_check,
            boot_id=f"{self.name}-{self.boots}",
            sequence=self.sequence,
            postmaster_died=self.postmaster_died,
            detached=self.state.detached and not (pg.running and pg.in_recovery and pg.stream is not None),
        )

    # ---- watching PostgreSQL (called every WATCH_INTERVAL while alive and awake) -------------

    def watch(self) -> None:
        pg = self.pg
        if self.seen_running and not pg.running and not self.lock.locked():
            self.postmaster_died = True
            self.trace(f"agent {self.name}: postmaster gone")
            self.signal_change("postmaster died")
        if pg.running:
            self.postmaster_died = False
        self.seen_running = pg.running
        # While a confirming standby catches up, a picture at every watch (Agent._watch): the
        # moment it has caught up is a change to report.
        if self.now >= self.next_refresh or self.catch_up.waiting:
            self.next_refresh = self.now + self.heartbeat_interval
            self._check_upstream()
            fingerprint = self._significant()
            if fingerprint != self.fingerprint:
                self.fingerprint = fingerprint
                self.signal_change("PostgreSQL changed")
        self._self_fence_if_isolated()

    def _significant(self) -> tuple[object, ...]:
        pg = self.pg
        stream = pg.stream if pg.running and pg.in_recovery else None
        status = self.catch_up.mark(self.world.status(pg))
        return (
            pg.running,
            pg.in_recovery,
            pg.timeline,
            stream.upstream if stream else None,
            tuple(sorted((d.name, d.sync_state, d.caught_up) for d in status.downstreams)),
            pg.sync_names,
        )

    def _check_upstream(self) -> None:
        upstream = self.upstream
        pg = self.pg
        if pg.running and pg.in_recovery and upstream is not None:
            target = self.world.by_endpoint.get((upstream.host, upstream.port))
            ok = target is not None and self.world.pg_reachable(pg.host, target.name)
            if ok != self.upstream_check.ok or not self.upstream_check.checked:
                self.signal_change(f"upstream {upstream} {'answers' if ok else 'does not answer'}")
            self.upstream_check = pb.UpstreamCheck(checked=True, ok=ok, detail=str(upstream))
        else:
            self.upstream_check = pb.UpstreamCheck(checked=False)

    def _self_fence_if_isolated(self) -> None:
        pg = self.pg
        if not (pg.running and not pg.in_recovery and pg.sync_names) or self.lock.locked():
            return
        if self.controller_silent_for() < self.failure_timeout:
            return
        downstreams = self.world.downstreams(pg)
        states = self.world.sync_states(pg, downstreams)
        confirmed = any(
            states[s.standby] in ("sync", "quorum") and self.now - s.last_data_at < self.failure_timeout
            for s in downstreams
        )
        if not confirmed:
            self.spawn(self._self_fence())

    async def _self_fence(self) -> None:
        async with self.operation("self-fencing"):
            self.trace(f"agent {self.name}: no controller and no synchronous standby: fencing myself")
            await self.fence_instance()

    async def fence_instance(self, clean: bool = False) -> int:
        """fenced is saved before the server stops. clean: the shutdown checkpoint's LSN."""
        self.save(fenced=True)
        await self.sleep(KILL)
        if clean:
            return self.world.clean_stop(self.pg) if self.pg.running else 0
        self.world.stop(self.pg, "killed (fenced)")
        return 0

    # ---- heartbeat replies -------------------------------------------------------------------

    async def follow_reply(self, reply: pb.HeartbeatReply) -> None:
        if reply.heartbeat_interval > 0:
            self.heartbeat_interval = reply.heartbeat_interval
        if reply.failure_timeout > 0:
            self.failure_timeout = reply.failure_timeout
        if reply.epoch > self.state.epoch:
            self.save(epoch=reply.epoch)
            self.signal_change(f"epoch {reply.epoch}")
        upstream = reply.upstream
        if (
            reply.goal == pb.GOAL_STANDBY
            and upstream.host
            and self.upstream != Endpoint(upstream.host, upstream.port)
            and not self._is_master()
        ):
            self.save(upstream_host=upstream.host, upstream_port=upstream.port)
        deposed = reply.goal in (pb.GOAL_STANDBY, pb.GOAL_REMOVED) and self._is_master()
        if deposed and not self.lock.locked():
            async with self.operation("fencing"):
                self.trace(f"agent {self.name}: the controller (epoch {reply.epoch}) says I am no master")
                await self.fence_instance()

    def _is_master(self) -> bool:
        return self.pg.running and not self.pg.in_recovery

    # ---- node-role messages ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def operation(self, activity: str) -> AsyncIterator[None]:
        async with self.lock:
            self.activity = activity
            self.signal_change(activity)
            try:
                yield
            finally:
                self.activity = "idle"
                self.seen_running = self.pg.running  # the refresh after an operation
                self.signal_change(f"{activity} done")

    async def handle(self, method: str, request: object) -> pb.RoleReply | pb.MemberStatus:
        """Carry out one node-role message (as xcha.agent.service does)."""
        await self.wait_awake()
        if isinstance(request, pb.GetStatusRequest):
            return self.member_status()
        detail, final_lsn = "", 0
        if isinstance(request, pb.PromoteRequest):
            sync = None
            if request.HasField("synchronous_standbys"):
                message = request.synchronous_standbys
                sync = SyncStandbys.parse(f"{message.method} {message.count} ({', '.join(message.names)})")
            detail = await self.promote(request.epoch, request.member, sync)
        elif isinstance(request, pb.FollowRequest):
            detail = await self.follow(request.epoch, request.member, request.upstream)
        elif isinstance(request, pb.FenceRequest):
            final_lsn = await self.fence(request.epoch, request.member, request.clean)
            detail = "fenced"
        elif isinstance(request, pb.SetSynchronousStandbysRequest):
            message = request.synchronous_standbys
            sync = SyncStandbys.parse(f"{message.method} {message.count} ({', '.join(message.names)})")
            detail = await self.set_synchronous_standbys(request.epoch, request.member, sync)
        elif isinstance(request, pb.DetachRequest):
            detail = await self.detach(request.epoch, request.member)
        elif isinstance(request, pb.CheckpointRequest):
            self.accept_epoch(request.epoch, request.member)
            detail = "checkpoint"
        else:
            raise InvalidInput(f"{method} is not simulated")
        return pb.RoleReply(status=self.member_status(), detail=detail, final_lsn=final_lsn)

    async def promote(self, epoch: int, member: str, sync: SyncStandbys | None) -> str:
        self.accept_epoch(epoch, member)
        async with self.operation("promoting"):
            pg = self.pg
            if not pg.has_data:
                await self.sleep(INITDB)
                self.world.bootstrap(pg)
                detail = "bootstrapped"
            elif pg.running and pg.in_recovery:
                if sync is not None:
                    self.catch_up.reset()
                    pg.sync_names = sync.render(150000)
                await self.sleep(PROMOTE)
                if not pg.running:
                    raise PostgresError("PostgreSQL exited while being promoted")
                self.world.promote(pg)
                detail = "promoted a standby"
            elif pg.running:
                detail = "already the master"
            else:
                await self.sleep(START)
                self.world.start(pg, standby=False)
                detail = "started as master"
            self.save(fenced=False, role="master", upstream_host="", upstream_port=0, detached=False)
        self.trace(f"agent {self.name}: {detail} (epoch {epoch})")
        return detail

    async def follow(self, epoch: int, member: str, endpoint: pb.Endpoint) -> str:
        """Keep or restart a standby, pg_rewind a former master, or clone afresh
        (PostgresInstance.follow)."""
        self.accept_epoch(epoch, member)
        upstream = self.world.by_endpoint[(endpoint.host, endpoint.port)]
        async with self.operation("following"):
            self.save(upstream_host=endpoint.host, upstream_port=endpoint.port, detached=False)
            pg = self.pg
            if pg.running and not pg.in_recovery:
                await self.fence_instance()
            pg.upstream = upstream.name
            if not pg.has_data:
                detail = await self._clone(upstream)
            elif pg.in_recovery and await self._restart_and_stream(upstream):
                detail = f"restarted as a standby of {upstream.name}"
            else:  # a former master, or a standby that cannot follow the new timeline
                self.world.stop(pg, "stopped to rewind")
                if not self.world.pg_reachable(pg.host, upstream.name):
                    raise PostgresError(f"pg_rewind: {upstream.name} does not answer")
                await self.sleep(REWIND)
                fork = common_prefix(pg.wal, upstream.wal)
                if fork < len(pg.wal):
                    self.world.rewrite_wal(pg, pg.wal[:fork], f"pg_rewind from {upstream.name}")
                pg.in_recovery = True
                self.world.start(pg, standby=True)
                detail = f"rewound from {upstream.name}"
            self.save(fenced=False, role="standby")
        self.trace(f"agent {self.name}: {detail} (epoch {epoch})")
        return detail

    async def _restart_and_stream(self, upstream: Postgres) -> bool:
        """PostgresInstance.follow: restart as a standby, then wait up to STREAM_WAIT for the
        WAL receiver to stream from upstream (a standby holding WAL past the fork point never
        does)."""
        pg = self.pg
        self.world.stop(pg, "stopped to follow")
        await self.sleep(RESTART)
        self.world.start(pg, standby=True)
        waited = 0.0
        while waited < STREAM_WAIT:
            if pg.stream is not None and pg.stream.upstream == upstream.name:
                return True
            await self.sleep(WATCH_INTERVAL)
            waited += WATCH_INTERVAL
        return False

    async def _clone(self, upstream: Postgres) -> str:
        pg = self.pg
        if not self.world.pg_reachable(pg.host, upstream.name):
            raise PostgresError(f"pg_basebackup: {upstream.name} does not answer")
        await self.sleep(CLONE)
        if not self.world.pg_reachable(pg.host, upstream.name):
            raise PostgresError(f"pg_basebackup: lost {upstream.name}")
        pg.has_data, pg.in_recovery, pg.timeline = True, True, upstream.timeline
        self.world.rewrite_wal(pg, list(upstream.wal), f"clone from {upstream.name}")
        self.world.start(pg, standby=True)
        return f"cloned from {upstream.name}"

    async def detach(self, epoch: int, member: str) -> str:
        """Agent.detach: the standby streams from no one until the next Follow (primary_conninfo
        emptied and reloaded: its WAL receiver stops and is not started again)."""
        self.accept_epoch(epoch, member)
        pg = self.pg
        if pg.running and not pg.in_recovery:
            raise InvalidInput(f"{member} is not a standby: there is nothing to detach")
        if not pg.running and self.state.role != "standby":
            raise InvalidInput(f"{member} was not a standby when it stopped: nothing to detach")
        async with self.operation("detaching"):
            if pg.running:
                await self.sleep(RELOAD)
            self.world.detach(pg)
            self.save(detached=True)
        self.trace(f"agent {self.name}: detached (epoch {epoch})")
        return "detached"

    async def fence(self, epoch: int, member: str, clean: bool) -> int:
        self.accept_epoch(epoch, member)
        async with self.operation("fencing"):
            final = await self.fence_instance(clean)
        self.trace(f"agent {self.name}: fenced{' cleanly' if clean else ''} (epoch {epoch})")
        return final

    async def set_synchronous_standbys(self, epoch: int, member: str, sync: SyncStandbys) -> str:
        self.accept_epoch(epoch, member)
        async with self.operation("setting synchronous standbys"):
            await self.sleep(RELOAD)
            value = sync.render(150000)
            self.catch_up.reset()
            self.pg.sync_names = value
        self.trace(f"agent {self.name}: synchronous_standby_names = '{value}' (epoch {epoch})")
        return value
