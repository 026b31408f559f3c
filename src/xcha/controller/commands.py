"""What operators and coordinators ask of the controller: switchover, failover, pause, add or
remove a standby, its mode, and a coordinator's report of a failing member. Each answer is
one sentence; refusals raise with the reason."""

import contextlib
from dataclasses import replace

import grpc

from xcha.controller.fsm import RUNNING_STATES, confirming_standbys, requested_candidate
from xcha.controller.loop import Deciding
from xcha.controller.observations import Observation
from xcha.controller.store import MemberRecord
from xcha.controller.views import GroupState, Request
from xcha.errors import InvalidInput, Refused, XchaError
from xcha.names import check_name
from xcha.v1 import xcha_pb2 as pb


class Commands(Deciding):
    def _request(self, datanode: str, request: Request) -> str:
        group = self._group(datanode)
        if request.target is not None:
            self._member(datanode, request.target)
            if request.target == group.master:
                raise Refused(f"{request.target} is already the master of {datanode}")
        if group.state not in RUNNING_STATES and not (
            request.kind == "failover" and group.state == GroupState.NO_CANDIDATE
        ):
            raise Refused(f"{datanode} is {group.state.value}: {group.reason or 'wait until it is running'}")
        view = replace(self.view(datanode), request=request)
        choice = requested_candidate(view)
        if choice.member is None:
            raise Refused(f"no {request.kind} for {datanode}: {choice.reason}")
        if (
            request.kind == "switchover"
            and choice.member.name not in confirming_standbys(view)
            and not request.allow_data_loss
        ):
            raise Refused(
                f"{choice.member.name} is not a synchronous standby that confirms every commit: "
                "it may lag; a switchover waits for it only when it is synchronous"
            )
        self._save_group(replace(group, request=request))
        self.event(datanode, request.kind, f"{request.kind} to {choice.member.name} requested")
        self.mark_dirty(datanode)
        return f"{request.kind} of {datanode} to {choice.member.name} started"

    def request_switchover(self, datanode: str, target: str | None) -> str:
        return self._request(datanode, Request("switchover", target or None))

    def request_failover(self, datanode: str, target: str | None, allow_data_loss: bool) -> str:
        return self._request(datanode, Request("failover", target or None, allow_data_loss))

    def set_paused(self, datanode: str | None, paused: bool) -> str:
        word = "paused" if paused else "resumed"
        if not datanode:
            self.cluster_paused = paused
            self.ledger.set_cluster_paused(paused)
            for group in self.groups.values():
                if group.paused != paused:
                    self._save_group(replace(group, paused=paused))
            self.event("", "pause", f"cluster {word}")
            return f"cluster {word}"
        group = self._group(datanode)
        self._save_group(replace(group, paused=paused))
        if not paused and self.cluster_paused:
            self.cluster_paused = False
            self.ledger.set_cluster_paused(False)
        self.event(datanode, "pause", f"{datanode} {word}")
        self.mark_dirty(datanode)
        return f"{datanode} {word}"

    def add_standby(self, datanode: str, member: str, mode: str) -> str:
        self._group(datanode)
        check_name(member, "member name")
        if mode not in ("sync", "async"):
            raise InvalidInput(f"invalid mode {mode!r}: expected sync or async")
        existing = self.records.get(member)
        if existing is not None and not existing.removed:
            raise Refused(f"{member} is already a member of datanode {existing.datanode}")
        record = MemberRecord(datanode, member, mode)
        if existing is not None:  # removed before: where its agent reported to be stays known
            record = replace(
                record, host=existing.host, port=existing.port, agent_address=existing.agent_address
            )
        self._save_member(record)
        self.observations.setdefault(member, Observation())
        self._index_members()
        self.event(
            datanode, "add_standby", f"{member} added as {mode} standby", {"member": member, "mode": mode}
        )
        self.mark_dirty(datanode)
        return f"{member} added to {datanode} as a {mode} standby: its agent clones it at its next heartbeat"

    def remove_standby(self, datanode: str, member: str) -> str:
        record = self._member(datanode, member)
        if self.groups[datanode].master == member:
            raise Refused(f"{member} is the master of {datanode}: switch over first")
        self._save_member(replace(record, removed=True))
        self.event(datanode, "remove_standby", f"{member} removed", {"member": member})
        request = pb.RemoveRequest(epoch=self.epoch, member=member)
        self._spawn(self._call(member, "Remove", lambda stub: stub.Remove(request, timeout=60)))
        self.mark_dirty(datanode)
        return f"{member} removed from {datanode}: its agent stops it"

    def set_mode(self, datanode: str, member: str, mode: str) -> str:
        record = self._member(datanode, member)
        if mode not in ("sync", "async"):
            raise InvalidInput(f"invalid mode {mode!r}: expected sync or async")
        self._save_member(replace(record, mode=mode))
        self.event(datanode, "mode", f"{member} is now a {mode} standby", {"member": member, "mode": mode})
        self.mark_dirty(datanode)
        return f"{member} set to {mode}"

    async def report_failure(self, datanode: str, member: str, reporter: str, detail: str) -> str:
        """A coordinator's report is a suspicion: check at once, never act on it alone."""
        group = self._group(datanode)
        target = member or group.master
        if target is None:
            raise Refused(f"{datanode} has no master yet")
        self._member(datanode, target)
        self.event(
            datanode,
            "report",
            f"{reporter or 'someone'} reports {target} failing: {detail}",
            {"member": target, "reporter": reporter},
        )
        await self._probe(target)
        with contextlib.suppress(grpc.aio.AioRpcError, XchaError):
            await self._get_status(target, self.config.probe_timeout, "report check")
        reason = self.evaluate(datanode)
        observation = self.observations[target]
        verdict = (
            f"probe: {observation.probe_detail}; agent: "
            f"{'reported just now' if self.clock() - observation.received_at < 1 else 'silent'}; {reason}"
        )
        self.event(datanode, "report", f"checked {target}: {verdict}", {"member": target})
        return verdict
