"""The gateway's HTTP routes, one router per area; :func:`services.gateway.app.create_app`
includes them all."""

from . import chat, completions, feedback, models, pages

ROUTERS = (pages.router, models.router, chat.router, completions.router, feedback.router)

__all__ = ["ROUTERS"]
