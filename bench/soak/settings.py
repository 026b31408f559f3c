"""The soak's fault kinds, bounds and addresses."""

KINDS = {
    "kill_master": "kill -9 of a master's postmaster",
    "kill_standby": "kill -9 of a standby's postmaster",
    "kill_agent": "kill -9 of an agent (the supervisor restarts it)",
    "kill_controller": "kill -9 of the controller (the supervisor restarts it)",
    "stop_master_host": "SIGSTOP of a master host (agent + every PostgreSQL process) for 0.5-5 s",
    "partition_master": "a master's network namespace cut off until the master moved, then healed",
    "switchover": "a planned switchover (the controller's Switchover RPC)",
    "lost_sync_standby": "the synchronous standby's host down for 1.25-2.5 x failure_timeout: its agent "
    "stopped (SIGSTOP), every PostgreSQL process of it killed; then the agent resumed",
    "hang_sync_standby": "SIGSTOP of the synchronous standby's host (agent + every PostgreSQL process) for "
    "1.25-2.5 x failure_timeout",
}
NEEDS_NAMESPACES = ("partition_master",)

POLL = 0.05  # s between two looks at the controller's status
PROBE_TABLE = "xcha_soak_probe"  # on every datanode: what the deposed-master probe commits
WRITES_AFTER = 5  # acknowledged writes per datanode, through the coordinator, that end a cycle
STOP_HOST_SECONDS = (0.5, 5.0)
STANDBY_DOWN = (1.25, 2.5)  # x failure_timeout: past it, the group degrades per its policy
PARTITION_HOLD = (0.0, 1.0)  # s the cut stays after the master moved

# Network namespaces: the benchmark's own client namespace, the controller's, one per member.
CLIENT_ADDRESS = "192.0.2.100"
CONTROLLER_ADDRESS = "192.0.2.101"
CLONE_NEWNET = 0x40000000
