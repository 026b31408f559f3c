"""The timing defaults, in seconds, defined once: controller.toml and agent.toml fall back to
them, and the state machine's views, the agent before the controller's first heartbeat reply
and the deployments `xcha up` writes start from them.

The controller sends its heartbeat_interval and failure_timeout to the agents in every
heartbeat reply; an agent uses these defaults only until the first reply.
"""

HEARTBEAT_INTERVAL = 0.25  # liveness: keep-alive pings (or, unary, reports) this often
REPORT_INTERVAL = 2.0  # an agent on a Heartbeats stream re-sends an unchanged report this often
FAILURE_TIMEOUT = 2.0  # how long a member may go unheard before the failure rule judges it
PROBE_TIMEOUT = 0.5  # one direct PostgreSQL probe (the controller's; an agent's of its upstream)
TICK_INTERVAL = 0.05  # the controller's timer: failure timers and retries are checked this often
WATCH_INTERVAL = 0.05  # an agent checks its postmaster this often


def reply_timeout(heartbeat_interval: float) -> float:
    """How long a report may wait for its reply, and a keep-alive ping for its answer, before
    the connection counts as lost: a loaded machine answers in tens of milliseconds, rarely
    in hundreds."""
    return max(heartbeat_interval, 0.5)


def ping_timeout(heartbeat_interval: float, failure_timeout: float) -> float:
    """How long a keep-alive ping may go unanswered before the connection counts as lost:
    longer than a report's reply (a loaded machine delays pings, and each lost connection
    costs a reconnect), short enough that a stalled end is noticed by failure_timeout. It
    does not delay a failover: the silence is dated back to the last answered ping."""
    return max(
        reply_timeout(heartbeat_interval), min(4 * heartbeat_interval, failure_timeout - heartbeat_interval)
    )


def stream_silence(heartbeat_interval: float, failure_timeout: float) -> float:
    """How long before a Heartbeats stream's end the other side may last have been heard: a
    keep-alive ping is sent at most heartbeat_interval after the last sign of life, and the
    connection is closed ping_timeout after a ping went unanswered."""
    return heartbeat_interval + ping_timeout(heartbeat_interval, failure_timeout)
