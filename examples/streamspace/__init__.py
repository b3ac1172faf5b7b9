"""StreamSpace (seed 002) on tidings: ``python -m examples.streamspace --port PORT``."""

from .app import AGENTS, FIELDS, AgentNotConnected, Client, Settings, StreamSpace

__all__ = ["AGENTS", "FIELDS", "AgentNotConnected", "Client", "Settings", "StreamSpace"]
