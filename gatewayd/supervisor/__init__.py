"""`gatewayd supervisor`: the controller container, software updates, commands, remote files, health."""
