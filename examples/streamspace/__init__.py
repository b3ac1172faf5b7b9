"""StreamSpace (seed 002) on tidings: ``python -m examples.streamspace --port PORT``."""

from .app import AGENTS, FIELDS, AgentNotConnected, Settings, StreamSpace

__all__ = ["AGENTS", "FIELDS", "AgentNotConnected", "Settings", "StreamSpace"]
