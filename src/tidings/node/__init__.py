"""The node's core: the :class:`~tidings.node.server.Server` that owns the broker,
admits and serves connections, and runs the transports. It imports nothing
above it; :mod:`tidings.server` assembles the rest around it."""
