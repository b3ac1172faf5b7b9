"""tidings: a real-time event server for Python, on Trio.

Backends publish events; tidings fans them out over WebSocket to every
subscribed client, never waiting on a slow one. The public API is what this
module exports; the layers under it, inside out:

* ``protocol``   - the wire protocols, sans I/O (no trio, no sockets);
* ``broker``     - topic state, history and fan-out, one task per node;
* ``transport``  - how bytes reach sockets (built-in server, ASGI);
* ``connection`` - one client: a nursery with its reader, writer and pinger;
  the endpoints and sessions applications plug in;
* ``backplane``  - how nodes share topics (Redis);
* ``node``       - the core server: broker, connections, transports;
* ``http``, ``endpoints`` - the HTTP API and metrics, Centrifugo's protocol;
* ``server``     - the composition root (``open_server``);
  ``cli``, ``client``, ``publisher`` sit outside (``import tidings.publisher``:
  the node's processes need not load an HTTP client).

``docs/architecture.md`` draws it.
"""

from . import client as client
from ._version import __version__ as __version__
from .app import ClientInfo as ClientInfo
from .app import CloseInfo as CloseInfo
from .app import RequestContext as RequestContext
from .app import RequestHandler as RequestHandler
from .auth import Authenticator as Authenticator
from .auth import Identity as Identity
from .broker.outbox import OverflowPolicy as OverflowPolicy
from .broker.subscription import Subscription as Subscription
from .config import Config as Config
from .connection.endpoint import Endpoint as Endpoint
from .connection.session import Session as Session
from .errors import ApiCallError as ApiCallError
from .errors import AuthError as AuthError
from .errors import BrokerError as BrokerError
from .errors import ConfigError as ConfigError
from .errors import HttpError as HttpError
from .errors import RequestError as RequestError
from .errors import TidingsError as TidingsError
from .http.routes import HttpRequest as HttpRequest
from .http.routes import HttpResponse as HttpResponse
from .logs import configure as configure_logging
from .node.server import Server as Server
from .node.server import ServerStats as ServerStats
from .protocol import messages as messages
from .protocol.codes import CloseCode as CloseCode
from .protocol.codes import ErrorCode as ErrorCode
from .protocol.dialect import Dialect as Dialect
from .protocol.json_dialect import JsonDialect as JsonDialect
from .protocol.messages import AppMessage as AppMessage
from .protocol.messages import Event as Event
from .protocol.messages import Position as Position
from .protocol.native import NativeDialect as NativeDialect
from .protocol.topics import topic_problem as topic_problem
from .server import open_server as open_server
from .server import serve as serve
from .transport.base import UpgradeRequest as UpgradeRequest

__all__ = [
    "ApiCallError",
    "AppMessage",
    "AuthError",
    "Authenticator",
    "BrokerError",
    "ClientInfo",
    "CloseCode",
    "CloseInfo",
    "Config",
    "ConfigError",
    "Dialect",
    "Endpoint",
    "ErrorCode",
    "Event",
    "HttpError",
    "HttpRequest",
    "HttpResponse",
    "Identity",
    "JsonDialect",
    "NativeDialect",
    "OverflowPolicy",
    "Position",
    "RequestContext",
    "RequestError",
    "RequestHandler",
    "Server",
    "ServerStats",
    "Session",
    "Subscription",
    "TidingsError",
    "UpgradeRequest",
    "__version__",
    "client",
    "configure_logging",
    "messages",
    "open_server",
    "serve",
    "topic_problem",
]
