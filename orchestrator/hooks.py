"""The pluggable parts of the RAG, Assemble, Post and Stream stages, and their defaults.

Each hook is a plain function, sync or async: a sync hook runs inline (no task, no
hand-off); an async one runs in a task of its own, several requests at once up to
``PipelineConfig.stage_concurrency``, so a hook awaiting a vector store or a moderation
API does not serialize its stage. A hook that raises fails that request with
``StageError`` (the hook's exception as its cause) and the stage goes on serving.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from orchestrator.types import PostOutput, PromptRequest

__all__ = [
    "DEFAULT_TEMPLATE",
    "OutputSink",
    "PostProcessor",
    "Retriever",
    "Template",
    "default_retriever",
]

Retriever: TypeAlias = Callable[[PromptRequest], str | Awaitable[str]]
"""RAG: ``(request) -> context``."""

Template: TypeAlias = str | Callable[[PromptRequest, str], str | Awaitable[str]]
"""Assemble: a format string using ``{context}`` and ``{input}``, or a callable
``(request, context) -> prompt``."""

PostProcessor: TypeAlias = Callable[[PromptRequest, str], str | Awaitable[str]]
"""Post: ``(request, text) -> text``, applied in order after the tokens are joined."""

OutputSink: TypeAlias = Callable[[PostOutput], Awaitable[None] | None]
"""Stream: ``(output) -> None``, each sink called once per completed request, in order."""

DEFAULT_TEMPLATE = "{context}\n\nUser Query: {input}\n\nAssistant:"
"""The seed's prompt template."""


def default_retriever(request: PromptRequest) -> str:
    """The seed's context line: ``CONTEXT: Retrieved documents for '<first 50 chars>'``."""
    return f"CONTEXT: Retrieved documents for '{request.input[:50]}'"
