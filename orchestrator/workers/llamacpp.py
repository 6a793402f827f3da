"""``LlamaCppWorker``: the llama.cpp server's native ``/completion`` endpoint."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, final

from orchestrator.workers._http import HttpWorker
from orchestrator.workers._wire import (
    JsonObject,
    SseEvent,
    StreamState,
    TokenUsage,
    error_status,
    get_count,
    get_text,
    loads_object,
    retryable_status,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

__all__ = ["LlamaCppWorker"]

LLAMA_CPP_URL: Final = "http://localhost:8080"


@final
class LlamaCppWorker(HttpWorker):
    """A local model served by llama.cpp's ``llama-server``, through its native
    ``POST {url}/completion``: the prompt goes to the model as is (no chat template), and
    the stream is ``data: {"content": ..., "stop": ...}`` lines.

    Args:
        url: The server; ``$LLAMA_CPP_URL`` or ``http://localhost:8080``.
        api_key: The server's ``--api-key``, sent as a bearer token; ``$LLAMA_API_KEY``
            (the server's own variable) unless given; none by default.
        max_tokens: The most tokens to generate, sent as ``n_predict`` (``None``: until
            the model stops or the context is full).
        temperature: Sampling temperature (``None``: the server's default).
        stop: Stop sequences (one string or several).
        timeout: Seconds to wait for each read of a response (default 600).
        connect_timeout: Seconds to wait for a connection (default 5).
        client: An ``httpx.AsyncClient`` to borrow (left open by ``aclose``).
        name: The worker's name in metrics and errors.

    Raises:
        ValueError: An option out of range, or a URL that is not http(s).

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with LlamaCppWorker(max_tokens=64) as worker:
        ...         async for token in worker.stream("The capital of France is"):
        ...             print(token, end="")
    """

    _key_env = "LLAMA_API_KEY"
    # llama-server reports a failure mid-stream as an "error: {...}" line.
    _sse_extra_fields = frozenset({"error"})

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        name: str = "llama_cpp",
    ) -> None:
        super().__init__(
            name=name,
            base_url=url or os.environ.get("LLAMA_CPP_URL") or LLAMA_CPP_URL,
            api_key=api_key or os.environ.get("LLAMA_API_KEY"),
            timeout=timeout,
            connect_timeout=connect_timeout,
            client=client,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            settings={},
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _request(self, prompt: str, *, stream: bool) -> tuple[str, JsonObject]:
        body: JsonObject = {"prompt": prompt, "stream": stream}
        return "/completion", self._add_options(body, max_tokens="n_predict")

    def _parse_response(self, data: JsonObject) -> tuple[str, TokenUsage | None]:
        return get_text(data, "content"), _usage(data)

    def _parse_event(self, event: SseEvent, state: StreamState) -> str | None:
        data = loads_object(event.data)
        error = data.get("error") if event.event != "error" else data
        if isinstance(error, dict):  # {"code", "message", "type"}, bare or under "error"
            status = error_status(error.get("code"))
            raise self._stream_error(
                data, status=status, retryable=status is None or retryable_status(status)
            )
        if data.get("stop") is True:  # the last chunk: usage and timings, maybe text
            state.done = True
            state.usage = _usage(data)
        return get_text(data, "content")


def _usage(data: JsonObject) -> TokenUsage | None:
    prompt = get_count(data, "tokens_evaluated")
    completion = get_count(data, "tokens_predicted")
    return None if prompt is None and completion is None else TokenUsage(prompt, completion)
