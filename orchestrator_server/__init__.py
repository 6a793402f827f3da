"""Starlette server for orchestrator (the ``server`` extra)."""
