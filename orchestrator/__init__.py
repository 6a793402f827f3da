"""prompt-orchestrator: an asyncio pipeline for LLM prompts.

RAG -> Assemble -> Inference -> Post -> Stream, linked by bounded channels, with priority
scheduling, deadlines, cancellation and Prometheus metrics. See ``spawn_pipeline``.
"""

from __future__ import annotations

from orchestrator.config import PipelineConfig
from orchestrator.errors import (
    BackendUnavailable,
    CircuitOpen,
    InferenceError,
    InvalidRequest,
    OrchestratorError,
    Overloaded,
    PipelineClosed,
    QueueFull,
    RateLimited,
    RequestCancelled,
    RequestTimeout,
    StageError,
)
from orchestrator.pipeline import InputSender, PipelineHandles, spawn_pipeline
from orchestrator.ticket import Ticket
from orchestrator.types import (
    AssembleOutput,
    InferenceOutput,
    PostOutput,
    PromptRequest,
    RagOutput,
    RequestStatus,
    SessionId,
    shard_session,
)
from orchestrator.workers.base import EchoWorker, ModelWorker

__version__ = "0.1.0"

__all__ = [
    "AssembleOutput",
    "BackendUnavailable",
    "CircuitOpen",
    "EchoWorker",
    "InferenceError",
    "InferenceOutput",
    "InputSender",
    "InvalidRequest",
    "ModelWorker",
    "OrchestratorError",
    "Overloaded",
    "PipelineClosed",
    "PipelineConfig",
    "PipelineHandles",
    "PostOutput",
    "PromptRequest",
    "QueueFull",
    "RagOutput",
    "RateLimited",
    "RequestCancelled",
    "RequestStatus",
    "RequestTimeout",
    "SessionId",
    "StageError",
    "Ticket",
    "__version__",
    "shard_session",
    "spawn_pipeline",
]
