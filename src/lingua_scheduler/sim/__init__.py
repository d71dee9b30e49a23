"""Simulators of nodes and sessions: used by tests, benchmarks and the ``simulate-*`` commands."""
