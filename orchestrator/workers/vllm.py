"""``VllmWorker``: a vLLM server's OpenAI-compatible API (the wire format of ``openai.py``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, final

from orchestrator.workers.openai import OpenAiCompatibleWorker

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

__all__ = ["VllmWorker"]

VLLM_URL: Final = "http://localhost:8000"


@final
class VllmWorker(OpenAiCompatibleWorker):
    """A model served by ``vllm serve``, through ``{url}/v1/chat/completions`` (the
    model's chat template applies) or, with ``chat=False``, ``{url}/v1/completions`` (the
    prompt goes to the model as is).

    Args:
        model: The served model's name, as ``vllm serve`` was given it.
        url: The server; ``$VLLM_URL`` or ``http://localhost:8000``.
        chat: Use the chat endpoint (default) or the completions endpoint.
        api_key: The server's ``--api-key``, sent as a bearer token; ``$VLLM_API_KEY``
            (the server's own variable) unless given; none by default.
        max_tokens: The most tokens to generate (``None``: up to the context length).
        temperature: Sampling temperature (``None``: the model's default).
        system: A system message put before each prompt (chat only).
        stop: Stop sequences (one string or several).
        stream_usage: Ask for token usage in streams (``stream_options``).
        timeout: Seconds to wait for each read of a response (default 600).
        connect_timeout: Seconds to wait for a connection (default 5).
        client: An ``httpx.AsyncClient`` to borrow (left open by ``aclose``).
        name: The worker's name in metrics and errors.

    Raises:
        ValueError: An option out of range, or ``system`` with ``chat=False``.

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     worker = VllmWorker(model="Qwen/Qwen2.5-0.5B-Instruct", max_tokens=64)
        ...     async with worker:
        ...         print(await worker.infer("Say hi"))
    """

    _key_env = "VLLM_API_KEY"

    def __init__(
        self,
        *,
        model: str,
        url: str | None = None,
        chat: bool = True,
        api_key: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        system: str | None = None,
        stop: str | Sequence[str] | None = None,
        stream_usage: bool = True,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        name: str = "vllm",
    ) -> None:
        url = (url or os.environ.get("VLLM_URL") or VLLM_URL).rstrip("/")
        super().__init__(
            name=name,
            base_url=f"{url}/v1",
            api_key=api_key or os.environ.get("VLLM_API_KEY"),
            model=model,
            chat=chat,
            max_tokens=max_tokens,
            temperature=temperature,
            system=system,
            stop=stop,
            stream_usage=stream_usage,
            timeout=timeout,
            connect_timeout=connect_timeout,
            client=client,
        )
