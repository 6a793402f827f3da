"""``AnthropicWorker``: Anthropic's Messages API and its named SSE events."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, final

from orchestrator.workers._http import HttpWorker
from orchestrator.workers._wire import (
    JsonObject,
    SseEvent,
    StreamState,
    TokenUsage,
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

__all__ = ["AnthropicWorker"]

ANTHROPIC_API: Final = "https://api.anthropic.com"
ANTHROPIC_VERSION: Final = "2023-06-01"

# The HTTP status Anthropic documents for each error type: an error event inside a 200
# stream names the type only.
_ERROR_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@final
class AnthropicWorker(HttpWorker):
    """Claude through the Messages API (``POST {base_url}/v1/messages``), streamed over SSE.

    Arguments default to the environment, like Anthropic's SDK: ``ANTHROPIC_BASE_URL``,
    ``ANTHROPIC_API_KEY``. The key is required for the public API only.

    Args:
        model: The model, e.g. ``"claude-3-5-haiku-latest"``.
        base_url: The API root; ``$ANTHROPIC_BASE_URL`` or ``https://api.anthropic.com``.
        api_key: ``$ANTHROPIC_API_KEY`` unless given; sent as ``x-api-key``.
        max_tokens: The most tokens to generate (the API requires one; default 1024).
        temperature: Sampling temperature, 0 to 1 (``None``: the API's default).
        system: A system prompt.
        stop: Stop sequences (one string or several).
        timeout: Seconds to wait for each read of a response (default 600).
        connect_timeout: Seconds to wait for a connection (default 5).
        client: An ``httpx.AsyncClient`` to borrow (left open by ``aclose``).
        name: The worker's name in metrics and errors.

    Raises:
        ValueError: No API key for the public API, or an option out of range.

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with AnthropicWorker(model="claude-3-5-haiku-latest") as worker:
        ...         print(await worker.infer("Say hi"))
    """

    _key_env = "ANTHROPIC_API_KEY"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 1024,
        temperature: float | None = None,
        system: str | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        name: str = "anthropic",
    ) -> None:
        if not model:
            raise ValueError("AnthropicWorker needs a model name")
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_API
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not api_key and base_url.rstrip("/") == ANTHROPIC_API:
            raise ValueError(
                "AnthropicWorker needs an API key for api.anthropic.com: pass api_key= or "
                "set ANTHROPIC_API_KEY"
            )
        self.model = model
        self.system = system
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
            settings={"model": model, "system": system},
        )

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _request(self, prompt: str, *, stream: bool) -> tuple[str, JsonObject]:
        body: JsonObject = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.system:
            body["system"] = self.system
        self._add_options(body, stop="stop_sequences")  # max_tokens: always set, required
        if stream:
            body["stream"] = True
        return "/v1/messages", body

    def _parse_response(self, data: JsonObject) -> tuple[str, TokenUsage | None]:
        blocks = get_list(data, "content")
        text = "".join(
            get_text(block, "text")
            for block in blocks
            if isinstance(block, dict) and block.get("type") == "text"
        )
        return text, _usage(data.get("usage"), None)

    def _parse_event(self, event: SseEvent, state: StreamState) -> str | None:
        if event.event == "ping":
            return None
        data = loads_object(event.data)
        kind = event.event if event.event != "message" else get_text(data, "type")
        if kind == "content_block_delta":
            delta = get_object(data, "delta")
            return get_text(delta, "text") if delta.get("type") == "text_delta" else None
        if kind == "content_block_start":  # its text is empty today, but it is text
            block = get_object(data, "content_block")
            return get_text(block, "text") if block.get("type") == "text" else None
        if kind == "message_start":
            state.usage = _usage(get_object(data, "message").get("usage"), None)
        elif kind == "message_delta":
            state.usage = _usage(data.get("usage"), state.usage)
        elif kind == "message_stop":
            state.done = True
        elif kind == "error":
            error = data.get("error")
            status = _ERROR_STATUS.get(str(error.get("type")) if isinstance(error, dict) else "")
            raise self._stream_error(
                data, status=status, retryable=status is not None and retryable_status(status)
            )
        # Other events (content_block_stop, new types) carry no text: Anthropic may add
        # event types, and clients are to ignore the ones they do not know.
        return None


def _usage(usage: object, before: TokenUsage | None) -> TokenUsage | None:
    """Usage from a ``usage`` object; a ``message_delta`` updates what ``message_start`` said."""
    if not isinstance(usage, dict):
        return before
    prompt = get_count(
        usage, "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"
    )
    completion = get_count(usage, "output_tokens")
    if before is not None:
        prompt = before.prompt_tokens if prompt is None else prompt
        completion = before.completion_tokens if completion is None else completion
    return TokenUsage(prompt, completion)
