"""``OpenAiWorker``: OpenAI's Chat Completions API, and any server that speaks it.

The OpenAI wire format (chat and legacy completions, their SSE chunks, ``[DONE]``, usage)
is implemented once here, in ``OpenAiCompatibleWorker``; ``VllmWorker`` uses it too.
Ollama, LM Studio, llama.cpp's ``/v1``, TGI and vLLM all answer ``OpenAiWorker`` given
their ``base_url``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, final

from orchestrator.workers._http import HttpWorker
from orchestrator.workers._wire import (
    JsonObject,
    MalformedResponse,
    SseEvent,
    StreamState,
    TokenUsage,
    error_status,
    get_count,
    get_list,
    get_object,
    get_text,
    loads_object,
    retryable_status,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

__all__ = ["OpenAiCompatibleWorker", "OpenAiWorker"]

OPENAI_API: Final = "https://api.openai.com/v1"


class OpenAiCompatibleWorker(HttpWorker):
    """The OpenAI wire format: ``POST {base_url}/chat/completions`` (or ``/completions``),
    bearer auth, SSE chunks ending in ``data: [DONE]``. Use a subclass.

    Args:
        name: The worker's name in metrics and errors.
        base_url: The API root, ending in ``/v1``.
        api_key: Sent as ``Authorization: Bearer``; no header when ``None``.
        model: The model to ask.
        chat: Chat Completions (the prompt is the user message) or, when ``False``, the
            legacy Completions endpoint (the prompt is sent as is).
        max_tokens: The most tokens to generate (``None``: the server's default).
        temperature: Sampling temperature (``None``: the server's default).
        system: A system message put before the prompt (chat only).
        stop: Stop sequences.
        stream_usage: Ask for usage in the stream (``stream_options.include_usage``);
            turn off for servers that reject the option.
        timeout: Seconds to wait for each read (and write) of a response.
        connect_timeout: Seconds to wait for a connection.
        client: An ``httpx.AsyncClient`` to borrow instead of creating one.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        model: str,
        chat: bool,
        max_tokens: int | None,
        temperature: float | None,
        system: str | None,
        stop: str | Sequence[str] | None,
        stream_usage: bool,
        timeout: float,
        connect_timeout: float,
        client: httpx.AsyncClient | None,
    ) -> None:
        if not model:
            raise ValueError(f"{type(self).__name__} needs a model name")
        if system is not None and not chat:
            raise ValueError("a system prompt needs the chat endpoint (chat=True)")
        self.model = model
        self.chat = chat
        self.system = system
        self.stream_usage = stream_usage
        super().__init__(
            name=name,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            connect_timeout=connect_timeout,
            client=client,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            settings={"model": model, "chat": chat, "system": system},
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _request(self, prompt: str, *, stream: bool) -> tuple[str, JsonObject]:
        body: JsonObject = {"model": self.model}
        if self.chat:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": prompt})
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        self._add_options(body)
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return ("/chat/completions" if self.chat else "/completions"), body

    def _parse_response(self, data: JsonObject) -> tuple[str, TokenUsage | None]:
        choice = _first_choice(data)
        if choice is None:
            raise MalformedResponse("the response has no choices")
        if self.chat:
            return get_text(get_object(choice, "message"), "content"), _usage(data)
        return get_text(choice, "text"), _usage(data)

    def _parse_event(self, event: SseEvent, state: StreamState) -> str | None:
        if event.data == "[DONE]":
            state.done = True
            return None
        chunk = loads_object(event.data)
        if chunk.get("error") is not None or chunk.get("object") == "error":  # older vLLM
            error = chunk.get("error")
            status = error_status((error if isinstance(error, dict) else chunk).get("code"))
            # Without a status, an error mid-answer is the server's (OpenAI: server_error).
            raise self._stream_error(
                chunk, status=status, retryable=status is None or retryable_status(status)
            )
        if isinstance(chunk.get("usage"), dict):
            state.usage = _usage(chunk)
        choice = _first_choice(chunk)  # usage-only and filter-result chunks have none
        if choice is None:
            return None
        if self.chat:
            delta = choice.get("delta")
            return get_text(delta, "content") if isinstance(delta, dict) else None
        return get_text(choice, "text")


def _first_choice(data: JsonObject) -> JsonObject | None:
    choices = get_list(data, "choices")
    if not choices:
        return None
    if not isinstance(choices[0], dict):
        raise MalformedResponse(f"a choice is not an object: {choices[0]!r:.100}")
    return choices[0]


def _usage(data: JsonObject) -> TokenUsage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return TokenUsage(get_count(usage, "prompt_tokens"), get_count(usage, "completion_tokens"))


@final
class OpenAiWorker(OpenAiCompatibleWorker):
    """Chat Completions from OpenAI or any OpenAI-compatible server, streamed over SSE.

    Arguments default to the environment, like OpenAI's SDK: ``OPENAI_BASE_URL``,
    ``OPENAI_API_KEY``. A key is required for the public API only; a local server
    (Ollama, LM Studio, vLLM, TGI) is reached without one.

    Args:
        model: The model, e.g. ``"gpt-4o-mini"`` (or ``"llama3.2"`` on Ollama).
        base_url: The API root; ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``.
        api_key: ``$OPENAI_API_KEY`` unless given; sent as a bearer token.
        max_tokens: The most tokens to generate (``None``: the model's limit).
        temperature: Sampling temperature (``None``: the server's default).
        system: A system message put before each prompt.
        stop: Stop sequences (one string or several).
        stream_usage: Ask for token usage in streams (``stream_options``).
        timeout: Seconds to wait for each read of a response (default 600).
        connect_timeout: Seconds to wait for a connection (default 5).
        client: An ``httpx.AsyncClient`` to borrow (left open by ``aclose``).
        name: The worker's name in metrics and errors.

    Raises:
        ValueError: No API key for the public API, or an option out of range.

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with OpenAiWorker(model="gpt-4o-mini") as worker:
        ...         async for token in worker.stream("Say hi"):
        ...             print(token, end="")
    """

    _key_env = "OPENAI_API_KEY"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        system: str | None = None,
        stop: str | Sequence[str] | None = None,
        stream_usage: bool = True,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        name: str = "openai",
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_API
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key and base_url.rstrip("/") == OPENAI_API:
            raise ValueError(
                "OpenAiWorker needs an API key for api.openai.com: pass api_key= or set "
                "OPENAI_API_KEY (or point base_url at an OpenAI-compatible server)"
            )
        super().__init__(
            name=name,
            base_url=base_url,
            api_key=api_key,
            model=model,
            chat=True,
            max_tokens=max_tokens,
            temperature=temperature,
            system=system,
            stop=stop,
            stream_usage=stream_usage,
            timeout=timeout,
            connect_timeout=connect_timeout,
            client=client,
        )
