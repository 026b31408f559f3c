"""What the controller tells operators: the cluster's and each group's status as the proto
messages `xcha ctl status` prints, and the plain samples its metrics are made of."""

from dataclasses import dataclass

from xcha import __version__
from xcha.controller.fsm import master_failure
from xcha.controller.loop import Deciding
from xcha.controller.views import NEVER
from xcha.rpc import ROLE_NAMES
from xcha.v1 import xcha_pb2 as pb


@dataclass(frozen=True)
class MemberSample:
    name: str
    role: str  # as reported: master, standby or stopped
    heartbeat_age: float | None  # None: never heard from
    lag_bytes: int
    sync_state: str  # as the master reports it, "" when it does not list the member


@dataclass(frozen=True)
class GroupSample:
    name: str
    state: str
    paused: bool
    reroute_pending: int
    members: tuple[MemberSample, ...]


@dataclass(frozen=True)
class ClusterSample:
    epoch: int
    groups: int  # in all: a sample holds a slice of them
    sampled: tuple[GroupSample, ...]


class Reporting(Deciding):
    def sample(self, start: int, count: int) -> ClusterSample:
        """Groups start..start+count as plain values, for a metrics scrape, read in slices on
        the event loop. A scrape that built the full cluster status of 1,000 groups on the loop
        (views, failure verdicts, a copy of every report) made it late by up to 84 ms (a 5 ms
        timer's lateness, in the scale benchmark) and delayed a failover that fell in it."""
        now, stale_after = self.clock(), self.stale_after
        names = list(self.groups)[start : start + count]
        return ClusterSample(
            self.epoch, len(self.groups), tuple(self._group_sample(d, now, stale_after) for d in names)
        )

    def _group_sample(self, datanode: str, now: float, stale_after: float) -> GroupSample:
        group = self.groups[datanode]
        master = self.observations[group.master] if group.master else None
        master_pg = master.pg if master is not None and master.status is not None else None
        members = []
        for record in self.members_of(datanode):
            observation = self.observations[record.name]
            status = observation.status
            role = ROLE_NAMES.get(status.postgres_status.role, "unknown") if status else "unknown"
            heard = observation.heard_at(now, stale_after)
            lag = 0
            running = status is not None and status.postgres_status.running
            if master_pg is not None and record.name != group.master and running:
                lag = max(0, master_pg.position - observation.pg.position)
            downstream = master_pg.downstream(record.name) if master_pg is not None else None
            members.append(
                MemberSample(
                    name=record.name,
                    role="stopped" if role == "unknown" else role,  # running, recovery state not known yet
                    heartbeat_age=None if heard == -NEVER else now - heard,
                    lag_bytes=lag,
                    sync_state=downstream.sync_state if downstream else "",
                )
            )
        return GroupSample(
            name=datanode,
            state=group.state.value,
            paused=group.paused or self.cluster_paused,
            reroute_pending=len(self.router.pending(datanode)),
            members=tuple(members),
        )

    def cluster_status(self) -> pb.ClusterStatus:
        status = pb.ClusterStatus(
            epoch=self.epoch,
            paused=self.cluster_paused,
            controller_version=__version__,
            uptime=self.clock() - self.started,
        )
        for datanode in self.groups:
            status.groups.append(self.group_status(datanode))
        return status

    def group_status(self, datanode: str) -> pb.GroupView:
        view = self.view(datanode)
        group = self.groups[datanode]
        master = view.master_view
        master_position = master.pg.position if master else 0
        message = pb.GroupView(
            name=datanode,
            state=group.state.value,
            master=group.master or "",
            paused=view.paused,
            reason=self.reasons.get(datanode, group.reason),
            synchronous=str(view.policy),
            sync_policy=view.on_sync_failure.value,
            allow_data_loss=view.allow_data_loss,
            reroute_pending=self.router.pending(datanode),
            failure_inputs=master_failure(view).inputs,
        )
        for member in view.members:
            observation = self.observations[member.name]
            record = self.records[member.name]
            downstream = master.pg.downstream(member.name) if master else None
            goal = self.goal(record)
            lag = (
                max(0, master_position - member.pg.position)
                if member.name != group.master and member.pg.running
                else 0
            )
            message.members.append(
                pb.MemberView(
                    name=member.name,
                    goal=pb.Goal.Name(goal.goal).removeprefix("GOAL_").lower(),
                    mode=member.mode,
                    status=observation.status or pb.MemberStatus(member=member.name, datanode=datanode),
                    heartbeat_age=member.heartbeat_age if member.heartbeat_age != NEVER else -1,
                    probe=observation.probe_detail if observation.probe_ok is not None else "not probed",
                    probe_age=member.probe_age if member.probe_age != NEVER else -1,
                    lag_bytes=lag,
                    sync_state=downstream.sync_state if downstream else "",
                    receiving_wal=member.receiving_wal(),
                )
            )
        return message
