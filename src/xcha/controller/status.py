"""What the controller tells operators: the cluster's and each group's status as the proto
messages `xcha ctl status` prints, and the event history."""

from xcha import __version__
from xcha.controller.fsm import master_failure
from xcha.controller.loop import Deciding
from xcha.controller.views import NEVER
from xcha.v1 import xcha_pb2 as pb


class Reporting(Deciding):
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
