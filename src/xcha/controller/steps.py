"""Carrying out the state machine's steps: role messages to agents (promote, fence, follow,
synchronous standbys), the reroute barrier, and the switchover sequence. Every message first
waits until the decision behind it is durable, and goes out only while this controller leads."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc

from xcha.controller.agents import AgentStub
from xcha.controller.core import FailoverMarks
from xcha.controller.fsm import Action, Step
from xcha.controller.observing import Observing
from xcha.controller.store import Deposed
from xcha.controller.views import GroupView
from xcha.errors import Refused, XchaError
from xcha.pg.lsn import format_lsn
from xcha.rpc import endpoint_to_proto, sync_to_proto
from xcha.v1 import xcha_pb2 as pb

log = logging.getLogger(__name__)

FENCE_TIMEOUT = 60.0
BEST_EFFORT_FENCE_TIMEOUT = 2.0  # the old master while its successor is promoted
CLEAN_STOP_TIMEOUT = 120.0  # a switchover's master: every WAL record reaches the standbys
DETACH_TIMEOUT = 10.0  # the agent gives up on a WAL receiver that does not stop after 5 s


class Acting(Observing):
    def _start(self, view: GroupView, step: Step, reason: str) -> None:
        datanode = view.name
        member = step.member
        assert member is not None
        match step.action:
            case Action.BOOTSTRAP | Action.START_MASTER:
                self.event(datanode, "start_master", reason, {"member": member})
                self._group_task(datanode, self._promote(datanode, member, None, failover=False))
            case Action.PROMOTE:
                self.marks[datanode] = FailoverMarks(old_endpoint=self._endpoint(view.master))
                self._plan_takeover(datanode, view.master, member)
                self.event(datanode, "failover", reason, {"member": member, "epoch": self.epoch})
                self._group_task(datanode, self._promote(datanode, member, step.sync, failover=True))
            case Action.RESEND_PROMOTE:
                self._group_task(datanode, self._promote(datanode, member, step.sync, failover=True))
            case Action.FENCE:
                self.event(datanode, "fence", f"fencing {member}", {"member": member})
                if step.best_effort:
                    why = "a standby is being promoted"
                    self._spawn(self._fence(member, why, timeout=BEST_EFFORT_FENCE_TIMEOUT))
                else:
                    self._member_task(datanode, member, self._fence(member, reason))
            case Action.SWITCHOVER:
                self.event(datanode, "switchover", reason, {"member": member})
                self._group_task(datanode, self._switchover(datanode, member))
            case Action.REROUTE:
                self._group_task(datanode, self._reroute(datanode, member))
            case Action.FOLLOW:
                self.event(datanode, "follow", reason, {"member": member})
                self._member_task(datanode, member, self._follow(datanode, member))
            case Action.SET_SYNC:
                assert step.sync is not None
                self.event(datanode, "sync", reason, {"names": list(step.sync.names)})
                self._member_task(datanode, member, self._set_sync(member, step))

    async def _call(
        self,
        member: str,
        what: str,
        call: Callable[[AgentStub], Awaitable[pb.RoleReply]],
    ) -> pb.RoleReply | None:
        """A role message; a failure is logged and recorded, and returns None."""
        try:
            await self.ledger.flush()  # nothing goes out before the decision is durable
            if not self.leading():
                raise Deposed("no longer the leader")
            reply = await call(self._stub(member))
        except (grpc.aio.AioRpcError, XchaError) as error:
            message = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            log.warning("%s to %s failed: %s", what, member, message)
            self.event(
                self.records[member].datanode,
                "error",
                f"{what} to {member} failed: {message}",
                {"member": member},
            )
            return None
        try:
            self._check_reply(member, reply.status)
        except Refused as error:
            log.warning("%s to %s: %s", what, member, error)
            self.event(
                self.records[member].datanode, "error", f"{what} to {member}: {error}", {"member": member}
            )
            return None
        self.observe(member, reply.status, what)
        return reply

    def _plan_takeover(self, datanode: str, old: str | None, new: str) -> None:
        """Router takeover: the new master takes the old master's port and the old master,
        when it rejoins, the new master's former port (same host only)."""
        old_endpoint, new_endpoint = self._endpoint(old), self._endpoint(new)
        group = self.groups[datanode]
        if self.router.kind != "takeover" or old_endpoint is None or new_endpoint is None:
            return
        if old_endpoint.host != new_endpoint.host:
            self.event(datanode, "error", f"port takeover impossible: {old} and {new} are on different hosts")
            return
        self._save_group(
            replace(
                group, takeover_port=old_endpoint.port, handover_member=old, handover_port=new_endpoint.port
            )
        )

    async def _promote(self, datanode: str, member: str, sync: object, failover: bool) -> None:
        group = self.groups[datanode]
        takeover = group.takeover_port if failover and self.router.kind == "takeover" else 0
        request = pb.PromoteRequest(epoch=self.epoch, member=member, takeover_port=takeover)
        if sync is not None:
            request.synchronous_standbys.CopyFrom(sync_to_proto(sync))  # type: ignore[arg-type]
        started = time.time()
        reply = await self._call(member, "Promote", lambda stub: stub.Promote(request, timeout=120))
        if reply is None:
            # The group stays busy a moment: an agent that refuses at once (it is restarting)
            # would otherwise be asked again hundreds of times a second, an event each time.
            await asyncio.sleep(self.config.heartbeat_interval)
        if reply is not None and failover:
            marks = self.marks.setdefault(datanode, FailoverMarks())
            marks.promoted_at = time.time()
            marks.promote_seconds = reply.seconds
            log.info(
                "%s: %s promoted in %.0f ms (%s)",
                datanode,
                member,
                (time.time() - started) * 1000,
                reply.detail,
            )
        elif reply is not None:
            self.event(datanode, "start_master", f"{member}: {reply.detail}", {"member": member})
        if reply is not None and takeover and reply.status.postgres.port != takeover:
            # The old master still holds its port (a hung host): clients on that port reach
            # nothing writable, and the old master must not take the new master's port either.
            self._save_group(
                replace(self.groups[datanode], takeover_port=0, handover_member=None, handover_port=0)
            )
            self.event(
                datanode,
                "error",
                f"port takeover failed, {member} stays on port {reply.status.postgres.port}: {reply.detail}",
                {"member": member},
            )

    async def _detach(self, members: list[str], reason: str) -> None:
        """Detach standbys, all at once (a failover: nothing more can be confirmed through them
        and their positions, in the replies, are final). One that cannot be detached, or whose
        agent does not answer, keeps the group waiting a moment before it is asked again."""

        async def one(member: str) -> bool:
            request = pb.DetachRequest(epoch=self.epoch, member=member, reason=reason)
            return (
                await self._call(member, "Detach", lambda stub: stub.Detach(request, timeout=DETACH_TIMEOUT))
                is not None
            )

        results = await asyncio.gather(*(one(m) for m in members))
        if not all(results):
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _fence(
        self, member: str, reason: str, *, clean: bool = False, timeout: float = FENCE_TIMEOUT
    ) -> pb.RoleReply | None:
        """Stop the member (clean: a clean shutdown, every WAL record sent to its standbys)."""
        request = pb.FenceRequest(epoch=self.epoch, member=member, reason=reason, clean=clean)
        return await self._call(member, "Fence", lambda stub: stub.Fence(request, timeout=timeout))

    async def _reroute(self, datanode: str, master: str) -> None:
        new = self._endpoint(master)
        if new is None:
            raise Refused(f"no address known for {master}")
        epoch = self.epoch
        marks = self.marks.setdefault(datanode, FailoverMarks())
        await self.ledger.flush()
        if not self.leading():
            raise Deposed("no longer the leader")
        barrier = await self.router.reroute(datanode, new, marks.old_endpoint, epoch)
        self._save_group(replace(self.groups[datanode], rerouted_epoch=epoch, takeover_port=0))
        details: dict[str, object] = {
            "master": master,
            "address": str(new),
            "router": self.router.kind,
            "coordinators": {
                name: {
                    "attempts": p.attempts,
                    "acknowledged_after_ms": round(p.seconds * 1000, 1),
                    "detail": p.detail,
                }
                for name, p in barrier.targets.items()
            },
            "rerouted_at": time.time(),
            "promoted_at": marks.promoted_at,
            "promote_seconds": marks.promote_seconds,
            "switchover": marks.switchover,
        }
        failure = self.failures.get(datanode)
        if failure is not None and not marks.switchover:
            details["detected_at"] = failure[1]
        self.event(datanode, "rerouted", f"every coordinator points {datanode} at {master} ({new})", details)
        self.marks.pop(datanode, None)

    async def _follow(self, datanode: str, member: str) -> None:
        master = self.groups[datanode].master
        upstream = self._endpoint(master)
        if master is None or upstream is None:
            return
        checkpoint = pb.CheckpointRequest(epoch=self.epoch, member=master)
        await self._call(master, "Checkpoint", lambda stub: stub.Checkpoint(checkpoint, timeout=60))
        group = self.groups[datanode]
        port = group.handover_port if group.handover_member == member else 0
        request = pb.FollowRequest(
            epoch=self.epoch,
            member=member,
            upstream=endpoint_to_proto(upstream),
            upstream_member=master,
            port=port,
        )
        reply = await self._call(member, "Follow", lambda stub: stub.Follow(request, timeout=900))
        if reply is None:
            self.observations[member].follow_failed_at = self.clock()
        else:
            if port:
                self._save_group(replace(self.groups[datanode], handover_member=None, handover_port=0))
            self.event(
                datanode, "follow", f"{member}: {reply.detail}", {"member": member, "seconds": reply.seconds}
            )

    async def _set_sync(self, member: str, step: Step) -> None:
        assert step.sync is not None
        request = pb.SetSynchronousStandbysRequest(
            epoch=self.epoch, member=member, synchronous_standbys=sync_to_proto(step.sync)
        )
        await self._call(
            member, "SetSynchronousStandbys", lambda stub: stub.SetSynchronousStandbys(request, timeout=5)
        )

    async def _switchover(self, datanode: str, target: str) -> None:
        """Wait until the target has caught up with the master (stopping the master earlier
        can recycle WAL the target still needs); stop the master cleanly (every WAL record
        reaches the streaming standbys); wait until the target has flushed past the shutdown
        checkpoint; then promote it."""
        group = self.groups[datanode]
        old = group.master
        assert old is not None
        self.marks[datanode] = FailoverMarks(old_endpoint=self._endpoint(old), switchover=True)
        self._plan_takeover(datanode, old, target)
        try:
            master = await self._get_status(old, 2, "switchover")
        except (grpc.aio.AioRpcError, XchaError) as error:
            await self._switchover_failed(datanode, target, f"cannot read {old}'s position: {error}")
            return
        if not await self._reaches(target, master.postgres_status.current_lsn, 10):
            await self._switchover_failed(
                datanode, target, f"{target} did not catch up with {old} within 10 s"
            )
            return
        reply = await self._fence(old, f"switchover to {target}", clean=True, timeout=CLEAN_STOP_TIMEOUT)
        if reply is None:
            await self._switchover_failed(datanode, target, f"could not stop {old} cleanly")
            return
        if not await self._reaches(target, reply.final_lsn + 1, 30):
            position = self.observations[target].pg.position
            await self._switchover_failed(
                datanode,
                target,
                f"{target} did not receive WAL past {format_lsn(reply.final_lsn)} "
                f"(it has {format_lsn(position)})",
            )
            return
        self._save_group(replace(self.groups[datanode], promote_sent=True))  # before it goes out
        await self._promote(datanode, target, None, failover=True)
        if not self.observations[target].pg.running or self.observations[target].pg.in_recovery:
            await self._switchover_failed(datanode, target, f"{target} did not become master")

    async def _still_standby(self, member: str, attempts: int = 3) -> bool:
        """Whether the member's agent says, now, that its PostgreSQL runs in recovery."""
        for _ in range(attempts):
            with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
                status = await self._get_status(member, 2, "switchover")
                return status.postgres_status.role == pb.ROLE_STANDBY
            await asyncio.sleep(0.1)
        return False

    async def _reaches(self, member: str, position: int, timeout: float) -> bool:
        """Whether member reports (flushed or replayed) WAL up to position within timeout.
        No, at once, when its agent, idle, says its PostgreSQL does not run: it receives
        nothing until something starts it (the state machine decides what)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
                status = await self._get_status(member, 2, "switchover")
                if self.observations[member].pg.position >= position:
                    return True
                if not status.postgres_status.running and status.activity == "idle":
                    return False
            await asyncio.sleep(0.01)
        return False

    async def _switchover_failed(self, datanode: str, target: str, why: str) -> None:
        """The state machine's switchover_failed row starts the old master again (a no-op when
        it was never stopped) and returns the group to service. Once a Promote went to the
        target, only when the target says it is a standby: its reply may have been lost after
        it promoted, and two masters at one epoch would each acknowledge commits. A target that
        says its PostgreSQL does not run is started as master instead (fsm: target_stopped)."""
        if self.groups[datanode].promote_sent and not await self._still_standby(target):
            message = (
                f"switchover stalled: {why}; {target} may have been promoted (it does not say "
                "it is a standby): the old master stays stopped until it answers (a target whose "
                "PostgreSQL does not run is started as master)"
            )
            log.warning("%s: %s", datanode, message)
            self.event(datanode, "error", message)
            return
        message = f"switchover failed: {why}"
        self._save_group(replace(self.groups[datanode], reason=message, switchover_failed=True))
        self.event(datanode, "error", message)
        log.error("%s: %s", datanode, message)
