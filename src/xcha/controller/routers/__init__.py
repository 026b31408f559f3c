"""Router kinds: how coordinators are re-pointed after a promotion."""

from xcha.controller.config import RouterConfig
from xcha.controller.routing import Router
from xcha.errors import InvalidInput


def build_router(config: RouterConfig) -> Router:
    if config.kind == "none":
        return Router("none", [], config.retry_initial, config.retry_max, config.timeout)
    raise InvalidInput(f"router kind {config.kind!r} is not available yet")
