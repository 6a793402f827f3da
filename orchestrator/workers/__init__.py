"""Model workers: the ``ModelWorker`` protocol, ``EchoWorker``, and HTTP workers.

``OpenAiWorker`` (OpenAI and any OpenAI-compatible server), ``AnthropicWorker`` (the
Messages API), ``LlamaCppWorker`` (llama.cpp's native server) and ``VllmWorker`` (vLLM's
OpenAI-compatible server); see docs/workers.md.
"""

from __future__ import annotations

from orchestrator.workers._wire import TokenUsage
from orchestrator.workers.anthropic import AnthropicWorker
from orchestrator.workers.base import EchoWorker, ModelWorker
from orchestrator.workers.llamacpp import LlamaCppWorker
from orchestrator.workers.openai import OpenAiWorker
from orchestrator.workers.vllm import VllmWorker

__all__ = [
    "AnthropicWorker",
    "EchoWorker",
    "LlamaCppWorker",
    "ModelWorker",
    "OpenAiWorker",
    "TokenUsage",
    "VllmWorker",
]
