"""The outbox forwarder: controller queue -> archive + outbox, exactly once (docs/DESIGN.md)."""
