"""The timing defaults, in seconds, defined once: controller.toml and agent.toml fall back to
them, and the state machine's views, the agent before the controller's first heartbeat reply
and the deployments `xcha up` writes start from them.

The controller sends its heartbeat_interval, report_interval, keepalive_interval and
failure_timeout to the agents in every heartbeat reply; an agent uses these defaults only
until the first reply.
"""

from dataclasses import dataclass

HEARTBEAT_INTERVAL = 0.25  # unary agents report this often; an agent checks its PostgreSQL this often
REPORT_INTERVAL = 5.0  # an agent on a Heartbeats stream re-sends an unchanged report this often
KEEPALIVE_INTERVAL = 0.5  # between reports, keep-alive pings this often stand for heartbeats
FAILURE_TIMEOUT = 2.0  # how long a member may go unheard before the failure rule judges it
PROBE_TIMEOUT = 0.5  # one direct PostgreSQL probe (the controller's; an agent's of its upstream)
TICK_INTERVAL = 0.05  # the controller's timer: failure timers and retries are checked this often
WATCH_INTERVAL = 0.05  # an agent checks its postmaster this often


def reply_timeout(heartbeat_interval: float) -> float:
    """How long a report may wait for its reply, and a keep-alive ping for its answer, before
    the connection counts as lost: a loaded machine answers in tens of milliseconds, rarely
    in hundreds."""
    return max(heartbeat_interval, 0.5)


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keep-alive pings on an agent's connection to the controller, which stand for
    heartbeats between reports on its Heartbeats stream."""

    interval: float  # a ping this long after the last sign of life
    timeout: float  # unanswered this long: the connection is closed, its stream ends
    heartbeat_interval: float

    @classmethod
    def of(cls, heartbeat_interval: float, keepalive_interval: float, failure_timeout: float) -> "Keepalive":
        """The timeout is longer than a report's reply (a loaded machine delays pings, and each
        lost connection costs a reconnect), and short enough that a stalled end is noticed by
        failure_timeout."""
        timeout = max(
            reply_timeout(heartbeat_interval),
            min(4 * heartbeat_interval, failure_timeout - keepalive_interval),
        )
        return cls(keepalive_interval, timeout, heartbeat_interval)

    @property
    def silence(self) -> float:
        """How long before a stream's end the other end counts as last heard: the ping that
        went unanswered was sent `timeout` before, and the one before it, answered, at most
        `interval` before that. Dated back by heartbeat_interval, not interval: a stall shorter
        than failure_timeout - heartbeat_interval never fails over, as with a report every
        heartbeat_interval (a real stall is judged up to interval - heartbeat_interval later)."""
        return self.heartbeat_interval + self.timeout
