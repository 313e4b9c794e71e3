"""Real-time audio streaming gateway for Meeting BaaS bots."""

__version__ = "0.1.0"
