"""The HTTP side's two public names in one import, for the composition root.

`Api` (api.py) holds the routes over one config snapshot; `HttpServer`
(http_server.py) is the listener that serves them. Nothing else lives here.
"""

from __future__ import annotations

from .api import Api
from .http_server import HttpServer

__all__ = ["Api", "HttpServer"]
