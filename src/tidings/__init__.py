"""tidings: a real-time event server for Python, on Trio.

Backends publish events; tidings fans them out over WebSocket to every
subscribed client, never waiting on a slow one. The public API is what this
module exports; the layers under it, inside out:

* ``protocol``  - the wire protocols, sans I/O (no trio, no sockets);
* ``broker``    - topic state, history and fan-out, one task per node;
* ``connection``- one client: reader, writer and pinger in a nursery;
* ``transport`` - how bytes reach sockets (built-in server, ASGI);
* ``endpoint``  - application protocols: a path, a dialect, handlers;
* ``backplane`` - how nodes share topics (Redis);
* ``server``    - composes them; ``cli`` and ``client`` sit outside.
"""

from . import client as client
from ._version import __version__ as __version__
from .app import ClientInfo as ClientInfo
from .app import CloseInfo as CloseInfo
from .app import RequestContext as RequestContext
from .app import RequestError as RequestError
from .app import RequestHandler as RequestHandler
from .broker.broker import BrokerError as BrokerError
from .broker.outbox import OverflowPolicy as OverflowPolicy
from .broker.subscription import Subscription as Subscription
from .config import Config as Config
from .config import ConfigError as ConfigError
from .endpoint import Endpoint as Endpoint
from .endpoint import Session as Session
from .protocol.codes import CloseCode as CloseCode
from .protocol.codes import ErrorCode as ErrorCode
from .protocol.messages import Event as Event
from .protocol.messages import Position as Position
from .server import Server as Server
from .server import ServerStats as ServerStats
from .server import open_server as open_server
from .server import serve as serve
from .web import HttpError as HttpError
from .web import HttpRequest as HttpRequest

__all__ = [
    "BrokerError",
    "ClientInfo",
    "CloseCode",
    "CloseInfo",
    "Config",
    "ConfigError",
    "Endpoint",
    "ErrorCode",
    "Event",
    "HttpError",
    "HttpRequest",
    "OverflowPolicy",
    "Position",
    "RequestContext",
    "RequestError",
    "RequestHandler",
    "Server",
    "ServerStats",
    "Session",
    "Subscription",
    "__version__",
    "client",
    "open_server",
    "serve",
]
