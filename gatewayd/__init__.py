"""gatewayd: a self-healing edge gateway for ThingsBoard."""

__version__ = "0.1.0"
