"""The decision loop: build a group's view, ask the state machine (`fsm.decide`), persist the
decision, dispatch its steps. Heartbeats that change something and probe results evaluate their
group at once; `tick` handles what time alone changes. Each evaluation returns the state
machine's one-line reason, logged when it changes."""

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from xcha.controller.fsm import RUNNING_STATES, Action, Decision, decide, master_failure
from xcha.controller.steps import Acting
from xcha.controller.store import StoreError
from xcha.controller.views import NEVER, GroupState, GroupView, MemberView

log = logging.getLogger(__name__)

FOLLOW_BACKOFF = 5.0
SWEEP_INTERVAL = 1.0
STOP_FLUSH_TIMEOUT = 2.0  # seconds a stopping controller gives its queued writes


class Deciding(Acting):
    def view(self, datanode: str) -> GroupView:
        now = self.clock()
        group = self.groups[datanode]
        config = self.config.datanode(datanode)
        assert config is not None
        # How long a standby has been missing from the master's reports, in the master's report
        # time: when the master is silent (it may hang), nothing is "missing" for longer. A
        # standby its latest report lists streaming is not missing.
        master_heard = self.heard_at(group.master, now) if group.master else -NEVER
        master_status = self.observations[group.master].status if group.master else None
        streaming = {
            d.name
            for d in (master_status.postgres_status.downstreams if master_status is not None else ())
            if d.state == "streaming"
        }
        members = []
        for record in self.members_of(datanode):
            observation = self.observations[record.name]
            status = observation.status
            members.append(
                MemberView(
                    name=record.name,
                    mode=record.mode,
                    heartbeat_age=now - observation.heard_at(now, self.stale_after),
                    report_age=now - observation.received_at,
                    pg=observation.pg,
                    endpoint=self._endpoint(record.name),
                    epoch=status.epoch if status else 0,
                    activity=status.activity if status else "unknown",
                    fenced=status.fenced if status else False,
                    has_data=status.has_data if status else False,
                    postmaster_died=status.postmaster_died if status else False,
                    upstream_checked=status.upstream.checked if status else False,
                    upstream_ok=status.upstream.ok if status else True,
                    probe_ok=observation.probe_ok,
                    probe_age=now - observation.probe_at,
                    busy=observation.busy,
                    follow_backoff=now - observation.follow_failed_at < FOLLOW_BACKOFF,
                    streaming_missing_for=(
                        0.0 if record.name in streaming else master_heard - observation.streaming_seen_at
                    ),
                    removed=record.removed,
                    detached=status.detached and observation.pg.wal_receiver is None if status else False,
                )
            )
        failure = self.failures.get(datanode)
        task = self.group_tasks.get(datanode)
        return GroupView(
            name=datanode,
            state=group.state,
            members=tuple(members),
            master=group.master,
            candidate=group.candidate,
            sync_set=group.sync_set,
            policy=config.policy,
            on_sync_failure=config.on_sync_failure,
            allow_data_loss=config.allow_data_loss,
            paused=group.paused or self.cluster_paused,
            epoch=self.epoch,
            failure_timeout=self.config.failure_timeout,
            heartbeat_interval=self.config.heartbeat_interval,
            in_grace=self._learning(datanode, now),
            busy=task is not None and not task.done(),
            master_failed_for=now - failure[0] if failure is not None else 0.0,
            promote_attempts=group.promote_attempts,
            rerouted=group.rerouted_epoch >= self.epoch,
            switchover_failed=group.switchover_failed,
            promote_sent=group.promote_sent,
            request=group.request,
            takeover_port=group.takeover_port,
        )

    def _learning(self, datanode: str, now: float) -> bool:
        """After a start, silence and persisted states prove nothing until every member has
        reported at this controller's epoch (or startup_grace, at least failure_timeout, has
        passed): an agent that has not reported yet is not a failed one."""
        if datanode not in self.learning:
            return False
        if now - self.started < self.config.startup_grace and any(
            (status := self.observations[record.name].status) is None or status.epoch < self.epoch
            for record in self.members_of(datanode)
            if not record.removed
        ):
            return True
        self.learning.discard(datanode)
        return False

    def evaluate(self, datanode: str) -> str:
        """One cycle for one group: decide, persist, act. Returns the decision's reason."""
        view = self.view(datanode)
        verdict = master_failure(view)
        if verdict.failed and datanode not in self.failures:
            self.failures[datanode] = (self.clock(), time.time())  # the view has 0 s failed
        elif not verdict.failed and view.state in RUNNING_STATES:
            self.failures.pop(datanode, None)
        decision = decide(view)
        self._apply(view, decision)
        return decision.reason

    def _apply(self, view: GroupView, decision: Decision) -> None:
        group = self.groups[view.name]
        if decision.bump_epoch:
            self._bump_epoch()
        updated = replace(
            group,
            state=decision.next_state,
            master=decision.new_master if decision.new_master is not None else group.master,
            candidate=decision.new_candidate if decision.new_candidate is not None else group.candidate,
            sync_set=decision.sync_set if decision.sync_set is not None else group.sync_set,
            promote_attempts=(
                decision.promote_attempts if decision.promote_attempts is not None else group.promote_attempts
            ),
            request=None if decision.clear_request else group.request,
            reason=decision.reason if decision.steps or decision.next_state != group.state else group.reason,
            switchover_failed=group.switchover_failed and decision.next_state == GroupState.SWITCHOVER,
            promote_sent=group.promote_sent and decision.next_state == GroupState.SWITCHOVER,
        )
        if updated != group:
            self._save_group(updated)  # before any message goes out
        if self.reasons.get(view.name) != decision.reason:
            self.reasons[view.name] = decision.reason
            log.info("%s: %s", view.name, decision.reason)
        if decision.next_state != group.state:
            self.event(
                view.name,
                "state",
                f"{group.state} -> {decision.next_state}: {decision.reason}",
                {"from": group.state.value, "to": decision.next_state.value},
            )
        detach = [step.member for step in decision.steps if step.action == Action.DETACH and step.member]
        if detach:
            # One group task detaches every standby the state machine named, at once.
            self.event(view.name, "detach", decision.reason, {"members": detach})
            self._group_task(view.name, self._detach(detach, decision.reason))
        for step in decision.steps:
            if step.action != Action.DETACH:
                self._start(view, step, decision.reason)

    def tick(self) -> None:
        """Timers. Heartbeats that change something and probe results evaluate their group at
        once; a tick probes a master that is silent and evaluates only the groups
        where time alone can change a decision at this tick: a member heard from has been
        silent for failure_timeout, or will be by the next tick (the failure rule's threshold;
        a shorter silence decides nothing yet, and a silence that never ends since this
        controller started is "never", which time does not change), a master failure is under
        way, or an operation is. Every group is also evaluated once a second (grace, back-off
        and the like): a slice of the groups at each tick, so that no tick evaluates them all.
        A group still initializing waits for its members' reports (each evaluates it) and for
        that sweep. At scale this is what keeps a busy controller from evaluating every group
        whose heartbeats its own load delays, at every tick (which loads it further)."""
        now = self.clock()
        late = 1.5 * self.config.heartbeat_interval
        interval = self.config.heartbeat_interval
        # heard from before this, silent since: judged silent at this tick or the next
        judged = now - (self.config.failure_timeout - self.config.tick_interval)
        slices = max(1, round(SWEEP_INTERVAL / self.config.tick_interval))
        self._sweep_slice = (self._sweep_slice + 1) % slices
        observations, records, stale_after = self.observations, self.records, self.stale_after
        # One pass over the members (not one per group): most are never late.
        silent = {
            records[name].datanode
            for name, observation in observations.items()
            if -NEVER < observation.heard_at(now, stale_after) <= judged
        }
        for index, (datanode, group) in enumerate(self.groups.items()):
            master = group.master
            if master is not None:
                observation = observations[master]
                if (
                    now - observation.heard_at(now, stale_after) > late
                    and not observation.probing
                    and now - observation.probe_at >= interval
                ):
                    self._spawn(self._probe(master))
            if (
                index % slices == self._sweep_slice
                or (group.state not in RUNNING_STATES and group.state != GroupState.INITIALIZING)
                or datanode in silent
                or datanode in self.failures
            ):
                self.evaluate(datanode)

    async def run(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.tick_interval)

    async def stop(self) -> None:
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.agents.close()
        await self.router.close()
        # What was decided is written (events above all) unless this term is over.
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(self.ledger.flush(), STOP_FLUSH_TIMEOUT)
        await self.ledger.close()
