"""Metrics, tracing and the HTTP endpoints operators and load balancers watch."""
