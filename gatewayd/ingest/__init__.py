"""`gatewayd ingest`: MQTT, HTTP and spool-directory adapters writing into the controller queue."""
