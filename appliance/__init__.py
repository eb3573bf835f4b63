"""Offline voice-agent appliance: local models in a livekit-agents AgentSession."""

__version__ = "0.1.0"
