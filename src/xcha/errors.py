"""Errors that reach an operator as one clear line instead of a traceback."""


class XchaError(Exception):
    """Base class: the message is meant for an operator, complete on its own."""


class InvalidInput(XchaError):
    """A name, port, path or setting was refused before anything was changed."""


class PostgresError(XchaError):
    """A PostgreSQL program or server did not do what was asked."""
