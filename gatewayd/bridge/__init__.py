"""The MQTT bridge to ThingsBoard: the only process that talks MQTT."""
