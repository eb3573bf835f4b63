"""livekit-agents plugins for the appliance's local models."""
