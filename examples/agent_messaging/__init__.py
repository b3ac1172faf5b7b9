"""The agent messaging server (seed 004) on tidings: ``python -m examples.agent_messaging``."""

from .app import AgentMessaging, Store

__all__ = ["AgentMessaging", "Store"]
