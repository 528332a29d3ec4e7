"""`gatewayd http`: the read-only /health and /metrics endpoint."""
