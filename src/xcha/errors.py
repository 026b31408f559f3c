"""Errors that reach an operator as one clear line instead of a traceback."""


class XchaError(Exception):
    """Base class: the message is meant for an operator, complete on its own."""


class InvalidInput(XchaError):
    """A name, port, path or setting was refused before anything was changed."""


class PostgresError(XchaError):
    """A PostgreSQL program or server did not do what was asked."""


class NotFound(XchaError):
    """An unknown datanode or member."""


class Refused(XchaError):
    """Not now: the cluster's state does not allow it (a precondition failed)."""


class StaleEpoch(Refused):
    """A role message from an older epoch than the agent has seen: a deposed controller."""


class AgentFailed(XchaError):
    """One of the agent's loops ended unexpectedly: the agent stops so that it is restarted."""


class NotLeader(Refused):
    """Asked of a controller that does not lead; `leader_address` says where the leader is
    (empty when no controller leads now)."""

    def __init__(self, message: str, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_address = leader_address
