"""The timing defaults, in seconds, defined once: controller.toml and agent.toml fall back to
them, and the state machine's views, the agent before the controller's first heartbeat reply
and the deployments `xcha up` writes start from them.

The controller sends its heartbeat_interval and failure_timeout to the agents in every
heartbeat reply; an agent uses these defaults only until the first reply.
"""

HEARTBEAT_INTERVAL = 0.25  # an agent reports at least this often
FAILURE_TIMEOUT = 2.0  # how long a member may go unheard before the failure rule judges it
PROBE_TIMEOUT = 0.5  # one direct PostgreSQL probe (the controller's; an agent's of its upstream)
TICK_INTERVAL = 0.05  # the controller's timer: failure timers and retries are checked this often
WATCH_INTERVAL = 0.05  # an agent checks its postmaster this often
