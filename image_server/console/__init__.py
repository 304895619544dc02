"""The live console: a web page on the service's HTTP listener that shows what it renders.

``Console`` is a client of the service like any other (a ``RenderClient`` on its own
sockets, with its own ``reply_to``), so what it may cancel is scoped as any client's is.
``add_console_routes`` puts its pages on an aiohttp application.
"""

from image_server.console.console import Console
from image_server.console.routes import add_console_routes

__all__ = ["Console", "add_console_routes"]
