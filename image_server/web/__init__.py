"""The service's HTTP side: one aiohttp server in-process that features add routes to.

``HttpServer`` owns the listener; ``health`` adds /healthz, /readyz and /metrics. A later
page (a live gallery, a form) adds its own routes to ``HttpServer.app`` before ``start``.
"""

from image_server.web.server import HttpServer

__all__ = ["HttpServer"]
