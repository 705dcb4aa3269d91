"""Dramatiq actors and the long-running pipeline processes: listener, consumers, dashboard."""
