"""Telemetry service: rolls up draft-service events into Prometheus metrics, JSON stats and a micro endpoint."""
