"""One seeded history: the real controller, simulated agents and PostgreSQL, faults drawn
from random.Random(seed), the invariants after every tick, a trace line per event."""

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from unittest import mock

import grpc

from bench.sim.agent import WATCH_INTERVAL, SimAgent
from bench.sim.loop import VirtualLoop
from bench.sim.world import CONTROLLER, Postgres, Violation, World
from xcha.config import TlsConfig
from xcha.controller import observing as observing_module
from xcha.controller.agents import AgentStub
from xcha.controller.config import ControllerConfig, DatanodeConfig, RouterConfig
from xcha.controller.controller import Controller
from xcha.controller.routing import Router
from xcha.controller.store import EventRecord, SqliteStore
from xcha.controller.views import GroupState, SyncFailurePolicy
from xcha.errors import InvalidInput, PostgresError, StaleEpoch, XchaError
from xcha.names import Endpoint
from xcha.pg.probe import ProbeResult
from xcha.pg.syncrep import SyncPolicy
from xcha.v1 import xcha_pb2 as pb

DATANODE = "dn1"
TICK = WATCH_INTERVAL
FAILURE_TIMEOUT = 2.0
KEEPALIVE = 7.0  # gRPC keepalive: 5 s pings, 2 s timeout: a dead connection fails a call
START_BOUND = 20.0  # from nothing (initdb, clones) to protected
FAULT_WINDOW = 12.0  # faults start within this long after the group is first protected
MAX_FAULT = 5.0  # and last at most this long
RECOVERY_BOUND = 40.0  # every fault healed: protected again, every member back, within this
SETTLE = 1.0  # protected this long before the history ends
COORDINATORS = ("coord1", "coord2")

T = TypeVar("T")

FAULT_KINDS = (
    "crash",
    "hang",
    "restart",
    "partition",
    "delay",
    "loss",
    "duplication",
    "reorder",
    "agent_death",
    "controller_restart",
    "coordinator_down",
    "switchover",
)


@dataclass(frozen=True)
class Shape:
    """A datanode group: its members and synchronous replication settings."""

    members: int
    policy: str = "FIRST 1"
    async_last: bool = False
    strict: bool = False


SHAPES = {
    "pair": Shape(2),
    "three": Shape(3),
    "async": Shape(3, async_last=True),
    "quorum": Shape(3, "ANY 1"),
    "strict": Shape(2, strict=True),
}


@dataclass
class Outcome:
    seed: int
    shape: str
    allow_data_loss: bool
    faults: list[str]
    violation: Violation | None
    step: int
    time: float
    trace: list[str]
    commits: int
    acknowledged: int
    failovers: int
    recovered_after: float | None  # s from the last heal to protected with every member back


@dataclass
class _Heal:
    at: float
    what: str
    undo: "list[object]" = field(default_factory=list)


def _settle(future: "asyncio.Future[T]", value: T) -> None:
    if not future.done():
        future.set_result(value)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _code(error: XchaError) -> grpc.StatusCode:
    if isinstance(error, StaleEpoch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class _Stub:
    """The controller's AgentStub: each call goes through the simulated network."""

    def __init__(self, history: "History", agent: SimAgent) -> None:
        self.history, self.agent = history, agent

    async def GetStatus(self, request: pb.GetStatusRequest, timeout: float) -> pb.MemberStatus:
        reply = await self.history.rpc(self.agent, request, timeout)
        assert isinstance(reply, pb.MemberStatus)
        return reply

    async def _role(self, request: object, timeout: float) -> pb.RoleReply:
        reply = await self.history.rpc(self.agent, request, timeout)
        assert isinstance(reply, pb.RoleReply)
        return reply

    async def Promote(self, request: pb.PromoteRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def Follow(self, request: pb.FollowRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def Fence(self, request: pb.FenceRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def SetSynchronousStandbys(
        self, request: pb.SetSynchronousStandbysRequest, timeout: float
    ) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def Checkpoint(self, request: pb.CheckpointRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def Detach(self, request: pb.DetachRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)

    async def Remove(self, request: pb.RemoveRequest, timeout: float) -> pb.RoleReply:
        return await self._role(request, timeout)


class _Agents:
    """The controller's `Agents`: every member's stub goes through the simulated network."""

    def __init__(self, history: "History") -> None:
        self.history = history

    def stub(self, member: str, address: str) -> AgentStub:
        return _Stub(self.history, self.history.agents[member])

    async def close(self) -> None:
        return None


class _Term:
    """The simulated controller always leads with the store's first term (token 0)."""

    token = 0


class _Coordinator:
    """A coordinator the reroute barrier re-points; down while a fault says so."""

    def __init__(self, name: str, history: "History") -> None:
        self.name, self.history = name, history

    @property
    def attempt_timeout(self) -> float:
        return 5.0

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        await asyncio.sleep(0.005)
        if self.name in self.history.coordinators_down:
            raise PostgresError(f"coordinator {self.name} does not answer")
        return f"{datanode} -> {new}"

    async def close(self) -> None:
        return None


class History:
    def __init__(self, seed: int, shapes: tuple[str, ...] = tuple(SHAPES)) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.shape_name = self.rng.choice(shapes)
        self.shape = SHAPES[self.shape_name]
        self.allow_data_loss = self.rng.random() < 0.1
        self.loop = VirtualLoop()
        self.t0 = self.loop.time()
        self.lines: list[str] = []
        names = [f"{DATANODE}{chr(ord('a') + i)}" for i in range(self.shape.members)]
        members = [Postgres(name, f"10.0.0.{i + 1}") for i, name in enumerate(names)]
        self.world = World(self.rng, members, self.loop.time, self.trace, self.allow_data_loss)
        self.agents = {
            m.name: SimAgent(self.world, m, DATANODE, self.trace, f"{m.host}:7001") for m in members
        }
        self.config = ControllerConfig(
            listen="127.0.0.1:7000",
            state_dir=Path("/nonexistent"),
            heartbeat_interval=0.25,
            failure_timeout=FAILURE_TIMEOUT,
            probe_timeout=0.5,
            startup_grace=FAILURE_TIMEOUT,
            tick_interval=0.05,
            metrics_listen=None,
            log_format="text",
            datanodes=(
                DatanodeConfig(
                    DATANODE,
                    tuple(names),
                    SyncPolicy.parse(self.shape.policy),
                    SyncFailurePolicy.STRICT if self.shape.strict else SyncFailurePolicy.AVAILABLE,
                    self.allow_data_loss,
                    (names[-1],) if self.shape.async_last else (),
                ),
            ),
            router=RouterConfig("none"),
            tls=TlsConfig(insecure=True),
        )
        self.store = SqliteStore(Path(":memory:"), _Term())
        self.controller: Controller | None = None
        self.controller_task: asyncio.Task[None] | None = None
        self.coordinators_down: set[str] = set()
        self.heals: list[_Heal] = []
        self.faults: list[str] = []
        self.failovers = 0

    # ---- the trace -------------------------------------------------------------------------

    def trace(self, text: str) -> None:
        self.lines.append(f"{len(self.lines):5d} {self.loop.time() - self.t0:8.3f}s  {text}")

    def _event(self, record: EventRecord) -> None:
        if record.kind == "failover":
            self.failovers += 1
        self.trace(f"controller [{record.kind}, epoch {record.epoch}] {record.message}")

    # ---- the controller --------------------------------------------------------------------

    def start_controller(self) -> None:
        router = Router("none", [_Coordinator(name, self) for name in COORDINATORS], 0.1, 5.0)
        controller = Controller(
            self.config, self.store, self.store.snapshot(), router, _Agents(self), clock=self.loop.time
        )
        controller.ledger.subscribers.append(self._event)
        self.controller = controller
        self.controller_task = asyncio.ensure_future(controller.run())
        self.trace(f"controller started, epoch {controller.epoch}")

    def kill_controller(self) -> "asyncio.Future[None]":
        """The controller process dies: at once no heartbeat reaches it; its tasks end."""
        controller, task = self.controller, self.controller_task
        self.controller = self.controller_task = None

        async def stopped() -> None:
            if controller is not None:
                await controller.stop()
            if task is not None:
                await task

        if controller is not None:
            self.trace("controller stopped (its tasks die with it)")
        return asyncio.ensure_future(stopped())

    async def ping(self, endpoint: Endpoint, timeout: float) -> ProbeResult:
        """The controller's wire-protocol probe, over the simulated network."""
        pg = self.world.by_endpoint[(endpoint.host, endpoint.port)]
        if not self.world.up(CONTROLLER, pg.host) or pg.hung:
            await asyncio.sleep(timeout)
            return ProbeResult(False, f"no answer within {timeout:.2f} s", timeout)
        await asyncio.sleep(0.002)
        if not pg.running:
            return ProbeResult(False, "connection refused", 0.002)
        return ProbeResult(True, "answers", 0.002)

    async def heartbeats(self, agent: SimAgent) -> None:
        """The agent's heartbeat loop (Agent._heartbeats) over the simulated network."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agent.changed.wait(), agent.heartbeat_interval)
            await agent.wait_awake()
            agent.changed.clear()
            reason, agent.change_reason = agent.change_reason or "interval", ""
            request = pb.HeartbeatRequest(status=agent.member_status(), reason=reason)
            answer: asyncio.Future[pb.HeartbeatReply] = asyncio.get_running_loop().create_future()
            self.world.send(agent.pg.host, CONTROLLER, self._arrives(agent.pg.host, request, answer))
            await asyncio.wait({answer}, timeout=max(agent.heartbeat_interval, 0.5))
            await agent.wait_awake()
            if not answer.done():
                answer.cancel()
                continue
            agent.controller_ok_at = self.loop.time()
            await agent.follow_reply(answer.result())

    def _arrives(
        self, host: str, request: pb.HeartbeatRequest, answer: "asyncio.Future[pb.HeartbeatReply]"
    ) -> Callable[[], None]:
        """A heartbeat reaching the controller (if it runs), its reply sent back."""

        def arrive() -> None:
            controller = self.controller
            if controller is not None:
                reply = controller.heartbeat(request)
                self.world.send(CONTROLLER, host, lambda: _settle(answer, reply))

        return arrive

    def _connected(self, agent: SimAgent) -> bool:
        return agent.alive and not agent.hung and self.world.up(CONTROLLER, agent.pg.host)

    async def rpc(self, agent: SimAgent, request: object, timeout: float) -> object:
        """A unary call: answered, refused, or failed by its deadline or by keepalive; a
        lost message resets the connection (gRPC rides on TCP: nothing is silently lost)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[object] = loop.create_future()
        host = agent.pg.host
        method = type(request).__name__.removesuffix("Request")
        net = self.world.net
        reset = net.loss and self.rng.random() < net.loss
        reply_lost = reset and self.rng.random() < 0.5

        def deliver(result: object) -> None:
            _settle(answer, result)

        def broken() -> None:
            _settle(answer, _rpc_error(grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout"))

        async def serve() -> None:
            try:
                result: object = await agent.handle(method, request)
            except XchaError as error:
                result = _rpc_error(_code(error), str(error))
            except asyncio.CancelledError:
                self.world.send(
                    host, CONTROLLER, lambda: deliver(_rpc_error(grpc.StatusCode.UNAVAILABLE, "reset"))
                )
                raise
            if reply_lost:
                result = _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset")
            self.world.send(host, CONTROLLER, lambda: deliver(result), lossy=False, broken=broken)

        def arrive() -> None:
            if not agent.alive:
                self.world.send(
                    host, CONTROLLER, lambda: deliver(_rpc_error(grpc.StatusCode.UNAVAILABLE, "refused"))
                )
            else:
                agent.spawn(serve())

        if reset and not reply_lost:
            loop.call_later(0.002, deliver, _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset"))
        else:
            self.world.send(CONTROLLER, host, arrive, lossy=False, broken=broken)
        deadline = loop.time() + timeout
        boot = agent.boots  # the agent process the connection is to
        unhealthy_since: float | None = None
        try:
            while not answer.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                await asyncio.wait({answer}, timeout=min(remaining, 1.0))
                if answer.done():
                    break
                if agent.boots != boot and agent.alive and not agent.hung:
                    # A restarted agent's host answers the next keepalive ping with a reset.
                    raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset (agent restarted)")
                if self._connected(agent):
                    unhealthy_since = None
                elif unhealthy_since is None:
                    unhealthy_since = loop.time()
                elif loop.time() - unhealthy_since >= KEEPALIVE:
                    raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout")
        finally:
            if not answer.done():
                answer.cancel()
        result = answer.result()
        if isinstance(result, grpc.aio.AioRpcError):
            raise result
        return result

    # ---- faults ----------------------------------------------------------------------------

    def _target(self) -> SimAgent:
        """The master as the controller last recorded it, more often than not."""
        master = self.store.snapshot().groups.get(DATANODE)
        if master is not None and master.master and self.rng.random() < 0.6:
            return self.agents[master.master]
        return self.agents[self.rng.choice(sorted(self.agents))]

    def inject(self, kind: str, duration: float) -> None:
        now = self.loop.time()
        agent = self._target()
        pg = agent.pg
        net = self.world.net
        heal = _Heal(now + duration, "")
        if kind == "crash":
            self.world.stop(pg, "crashed (kill -9 of the postmaster)")
            what = f"crash of {pg.name}'s PostgreSQL"
        elif kind == "hang":
            agent.awake.clear()
            pg.hung = True
            what = f"hang of {pg.name}'s host for {duration:.2f}s"
            heal.undo = ["resume", agent]
        elif kind in ("restart", "agent_death"):
            if not agent.alive:
                return
            agent.kill()
            if kind == "restart":
                self.world.stop(pg, "stopped (host restart)")
            what = f"{kind.replace('_', ' ')} of {pg.name} for {duration:.2f}s"
            heal.undo = ["start", agent]
        elif kind == "partition":
            others = [m.host for m in self.world.members.values() if m is not pg]
            side = self.rng.choice(("controller", "members", "everyone"))
            peers = {"controller": [CONTROLLER], "members": others, "everyone": [CONTROLLER, *others]}[side]
            pairs = [frozenset((pg.host, peer)) for peer in peers]
            net.cut.update(pairs)
            what = f"partition of {pg.name} from {side} for {duration:.2f}s"
            heal.undo = ["join", pairs]
        elif kind in ("delay", "reorder", "loss", "duplication"):
            value = {
                "delay": (0.05, 1.5),
                "reorder": (0.01, 0.3),
                "loss": (0.1, 0.5),
                "duplication": (0.2, 0.8),
            }[kind]
            level = self.rng.uniform(*value)
            attribute = "delay" if kind == "reorder" else kind
            setattr(net, attribute, level)
            what = f"{kind} ({level:.2f}) for {duration:.2f}s"
            heal.undo = ["net", attribute]
        elif kind == "controller_restart":
            if self.controller is None:
                return
            self.kill_controller()
            what = f"controller down for {duration:.2f}s"
            heal.undo = ["controller"]
        elif kind == "coordinator_down":
            name = self.rng.choice(COORDINATORS)
            self.coordinators_down.add(name)
            what = f"coordinator {name} down for {duration:.2f}s"
            heal.undo = ["coordinator", name]
        else:
            what = "switchover requested"
            if self.controller is not None:
                try:
                    what += f": {self.controller.request_switchover(DATANODE, None)}"
                except XchaError as error:
                    what += f", refused: {error}"
        self.faults.append(kind)
        self.trace(f"FAULT {what}")
        if heal.undo:
            heal.what = what
            self.heals.append(heal)

    def heal(self, heal: _Heal) -> None:
        self.heals.remove(heal)
        undo = heal.undo
        match undo[0]:
            case "resume":
                agent = undo[1]
                assert isinstance(agent, SimAgent)
                agent.pg.hung = False
                agent.awake.set()
            case "start":
                agent = undo[1]
                assert isinstance(agent, SimAgent)
                agent.start(self.heartbeats)
            case "join":
                pairs = undo[1]
                assert isinstance(pairs, list)
                self.world.net.cut.subtract(pairs)
            case "net":
                setattr(self.world.net, str(undo[1]), 0.0)
            case "controller" if self.controller is None:
                self.start_controller()
            case "coordinator":
                self.coordinators_down.discard(str(undo[1]))
        self.trace(f"HEAL {heal.what}")

    # ---- running -----------------------------------------------------------------------------

    def _recovered(self) -> bool:
        """Protected, and every member back: the master, or a standby streaming from it."""
        controller = self.controller
        if controller is None:
            return False
        group = controller.groups[DATANODE]
        if group.state != GroupState.PROTECTED or group.master is None:
            return False
        return all(
            pg.name == group.master
            or (
                pg.running and pg.in_recovery and pg.stream is not None and pg.stream.upstream == group.master
            )
            for pg in self.world.members.values()
        )

    def _tick(self) -> None:
        self.world.step()
        for agent in self.agents.values():
            if agent.alive and not agent.hung:
                agent.watch()
        now = self.loop.time()
        for heal in [h for h in self.heals if h.at <= now]:
            self.heal(heal)
        self.world.check_split_brain(
            {name: agent.state.epoch for name, agent in self.agents.items()},
            frozenset(name for name, agent in self.agents.items() if agent.state.fenced),
        )

    async def _until(self, deadline: float, done: "object") -> bool:
        """Tick until done() holds (True) or the deadline (False); stops at a violation."""
        assert callable(done)
        while self.loop.time() < deadline:
            await asyncio.sleep(TICK)
            self._tick()
            if self.world.violation is not None:
                return True
            if done():
                return True
        return False

    async def main(self) -> float | None:
        for agent in self.agents.values():
            agent.start(self.heartbeats)
        self.start_controller()
        if not await self._until(self.loop.time() + START_BOUND, self._recovered):
            self.world.fail("stuck", f"not protected {START_BOUND:.0f}s after the start: {self._state()}")
        if self.world.violation is not None:
            return None
        begin = self.loop.time()
        count = self.rng.randint(1, 4)
        plan = sorted(
            (
                begin + self.rng.uniform(0, FAULT_WINDOW),
                self.rng.choice(FAULT_KINDS),
                self.rng.uniform(0.2, MAX_FAULT),
            )
            for _ in range(count)
        )
        for at, kind, duration in plan:
            if await self._until(at, lambda: False) or self.world.violation is not None:
                return None
            self.inject(kind, duration)
        if self.heals:
            last = max(h.at for h in self.heals)
            if await self._until(last, lambda: False) and self.world.violation is not None:
                return None
        for heal in list(self.heals):
            self.heal(heal)
        healed = self.loop.time()
        if not await self._until(healed + RECOVERY_BOUND, self._recovered):
            self.world.fail(
                "stuck", f"not back {RECOVERY_BOUND:.0f}s after every fault healed: {self._state()}"
            )
        if self.world.violation is not None:
            return None
        recovered = self.loop.time() - healed
        await self._until(self.loop.time() + SETTLE, lambda: False)
        if self.world.violation is None and self.controller is not None:
            self.world.check_final(self.controller.groups[DATANODE].master)
        return recovered

    def _state(self) -> str:
        controller = self.controller
        if controller is None:
            return "controller down"
        group = controller.groups[DATANODE]
        members = ", ".join(
            f"{pg.name} {'running' if pg.running else 'stopped'}"
            f"{' standby' if pg.in_recovery else ' master'}"
            f"{' <- ' + pg.stream.upstream if pg.stream else ''} at {len(pg.wal)}"
            for pg in self.world.members.values()
        )
        return f"{group.state} ({controller.reasons.get(DATANODE, group.reason)}); {members}"

    async def _run(self) -> float | None:
        try:
            return await self.main()
        finally:
            await self.kill_controller()
            for agent in self.agents.values():
                agent.kill()
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def run(self) -> Outcome:
        # The controller's probe, as the controller module holds it (xcha.pg.probe.ping).
        with _quiet(), mock.patch.object(observing_module, "ping", self.ping):
            try:
                recovered = self.loop.run_until_complete(self._run())
            finally:
                self.loop.run_until_complete(self.store.close())
                self.loop.close()
        return Outcome(
            seed=self.seed,
            shape=self.shape_name,
            allow_data_loss=self.allow_data_loss,
            faults=self.faults,
            violation=self.world.violation,
            step=len(self.lines) - 1,
            time=self.loop.time() - self.t0,
            trace=self.lines,
            commits=self.world.commits,
            acknowledged=len(self.world.acked),
            failovers=self.failovers,
            recovered_after=recovered,
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The controller logs every decision; the trace already says what matters."""
    logger = logging.getLogger("xcha")
    level, logger.level = logger.level, logging.CRITICAL + 1
    try:
        yield
    finally:
        logger.level = level


def run_history(seed: int, shapes: tuple[str, ...] = tuple(SHAPES)) -> Outcome:
    return History(seed, shapes).run()
