"""The web console: a page a person opens to watch a node (or a cluster) live.

The page (``assets/``: plain HTML, CSS and ES modules, no build step, nothing
fetched from elsewhere) is a client of the HTTP API like any backend: it logs
in with the API key, which gives it a session cookie, and calls ``/api/`` with
that cookie and the session's CSRF token. ``docs/console.md`` describes it.
"""

from .handler import Console
from .sessions import ConsoleSession, SessionKeys

__all__ = ["Console", "ConsoleSession", "SessionKeys"]
