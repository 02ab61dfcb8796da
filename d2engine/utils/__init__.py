"""Utilities shared by the engine: events, logging, comm, registry, environment info."""

__all__: list[str] = []
