"""Topic state and fan-out. Knows nothing of sockets, transports or dialects."""
