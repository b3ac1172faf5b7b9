"""The plain-HTTP side of a node: ``/health``, the server API (``/api/``), its
OpenAPI document, ``/metrics``, and the application's routes, as one ASGI app."""
