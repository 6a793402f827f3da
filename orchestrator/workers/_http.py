"""What every HTTP model worker shares: the pooled client, streaming, error translation.

A worker subclasses ``HttpWorker`` and describes its wire format with four methods
(``_request``, ``_headers``, ``_parse_response``, ``_parse_event``); ``infer`` and ``stream``
here send the request, check the status, decode Server-Sent Events and turn every foreign
failure into ``InferenceError`` where it enters.
"""

from __future__ import annotations

import abc
import json
import logging
import warnings
from typing import TYPE_CHECKING, ClassVar, Final

import httpx

from orchestrator import metrics
from orchestrator._urls import redact_url
from orchestrator.errors import InferenceError
from orchestrator.workers._wire import (
    JsonObject,
    MalformedResponse,
    SseDecoder,
    SseEvent,
    StreamState,
    TokenUsage,
    describe_error,
    loads_object,
    parse_retry_after,
    retryable_status,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from types import TracebackType
    from typing import Self

logger = logging.getLogger("orchestrator.workers")


def _shown_url(url: str, *, key_env: str | None) -> str:
    """``url`` as errors, logs and ``repr`` show it, once checked: http(s), a host, and no
    query, fragment or userinfo.

    Credentials in the URL are refused, not hidden: httpx would log them at INFO on every
    call and send them as Basic auth in place of the worker's key. Messages quote ``url``
    redacted, whatever is wrong with it.
    """
    shown = redact_url(url)
    key = f"api_key= or {key_env}" if key_env else "api_key="
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        if shown != url:  # httpx may quote a piece of the password ("Invalid port: 'hun'")
            raise ValueError(
                f"invalid URL {shown!r}, and a URL must not carry a user name or password: "
                f"pass the key as {key} instead"
            ) from None
        raise ValueError(f"invalid URL {url!r}: {exc}") from exc
    if parsed.userinfo:
        raise ValueError(
            f"the URL {shown!r} carries a user name or password: pass the key as {key} instead"
        )
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"the URL must start with http:// or https://, got {shown!r}")
    if parsed.query or parsed.fragment:  # not quoted: a query may hold a key
        bare = str(parsed.copy_with(query=None, fragment=None))
        tail = "?..." if parsed.query else "#..."
        raise ValueError(f"the URL must not have a query or fragment, got {bare + tail!r}")
    return str(parsed).rstrip("/")


class HttpWorker(abc.ABC):
    """A model worker behind an HTTP API: one pooled ``httpx.AsyncClient``, ``infer``,
    ``stream``, errors translated to ``InferenceError``.

    The client is created here and closed by ``aclose()`` (or ``async with worker:``),
    unless one is passed in: that one is borrowed and left open. The API key lives only
    in the request headers; it is kept out of ``repr``, errors and logs.

    Attributes:
        name: The worker's name in metrics and errors.
        max_tokens: The most tokens to generate (``None``: the server's default).
        temperature: Sampling temperature (``None``: the server's default).
        stop: Stop sequences.
        cache_identity: What, beside the prompt, changes the answers (JSON text).
        last_usage: The token usage of the last call that reported one.
    """

    _sse_extra_fields: frozenset[str] = frozenset()
    _key_env: ClassVar[str | None] = None  # where the key may come from, beside api_key=

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        timeout: float,
        connect_timeout: float,
        client: httpx.AsyncClient | None,
        max_tokens: int | None,
        temperature: float | None,
        stop: str | Sequence[str] | None,
        settings: Mapping[str, object],
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature is not None and not temperature >= 0:  # providers narrow it further
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError(f"timeouts must be > 0 seconds, got {timeout}, {connect_timeout}")
        self.name = name
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        self._base_url = base_url.rstrip("/")
        self._shown = _shown_url(self._base_url, key_env=self._key_env)
        self._settings = {
            "base_url": self._shown,
            **settings,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stop": self.stop,
        }
        self.cache_identity = json.dumps(
            {"worker": type(self).__name__, **self._settings}, sort_keys=True
        )
        api_key = api_key.strip() if api_key else None  # a key read from a file ends in \n
        if api_key and not (api_key.isascii() and api_key.isprintable()):
            # httpx would quote the bad header, key and all, in its error
            raise ValueError("the API key has characters an HTTP header cannot carry")
        self._api_key = api_key or None
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.last_usage: TokenUsage | None = None
        self._prompt_tokens = metrics.WORKER_TOKENS.labels(name, "prompt")
        self._completion_tokens = metrics.WORKER_TOKENS.labels(name, "completion")
        self._closed = False
        self._owns_client = client is None  # set after every check: __del__ reads it
        if client is None:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=64)
            client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
        self._client = client

    def _add_options(
        self, body: JsonObject, *, max_tokens: str = "max_tokens", stop: str = "stop"
    ) -> JsonObject:
        """``body`` with the sampling options that are set, under the provider's names."""
        if self.max_tokens is not None:
            body[max_tokens] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.stop:
            body[stop] = list(self.stop)
        return body

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._settings.items() if v not in (None, ()))
        return f"{type(self).__name__}({shown})"

    # -- what a wire format provides ------------------------------------------------------

    @abc.abstractmethod
    def _request(self, prompt: str, *, stream: bool) -> tuple[str, JsonObject]:
        """The path (appended to the base URL) and JSON body of a request for ``prompt``."""

    @abc.abstractmethod
    def _headers(self) -> dict[str, str]:
        """The headers every request carries (authentication, API version)."""

    @abc.abstractmethod
    def _parse_response(self, data: JsonObject) -> tuple[str, TokenUsage | None]:
        """The text and usage of a non-streaming response (``MalformedResponse`` if odd)."""

    @abc.abstractmethod
    def _parse_event(self, event: SseEvent, state: StreamState) -> str | None:
        """The text an event carries, if any; sets ``state.done`` at the end of the answer,
        ``state.usage`` when usage is reported, raises ``InferenceError`` for an error event."""

    # -- the ModelWorker protocol ---------------------------------------------------------

    async def infer(self, prompt: str) -> list[str]:
        """Send ``prompt`` without streaming and return the completion as one token.

        Returns:
            ``[text]``, or ``[]`` when the model answered nothing.

        Raises:
            InferenceError: The provider answered an error status or a malformed body, or
                the request timed out or lost its connection (``retryable`` says whether
                trying again may help; ``retry_after`` is the provider's hint).
            RuntimeError: The worker was closed.
        """
        path, body = self._request(prompt, stream=False)
        client = self._open_client()
        shown = self._shown + path
        logger.debug("%s: POST %s", self.name, shown)
        try:
            response = await client.post(
                self._base_url + path, json=body, headers=self._headers(), timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, shown) from exc
        if not response.is_success:
            raise self._status_error(response, shown)
        try:
            text, usage = self._parse_response(loads_object(response.text))
        except MalformedResponse as exc:
            raise self._error(f"malformed response from {shown}: {exc}", status=200) from exc
        self._record(usage)
        return [text] if text else []

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        """Send ``prompt`` with streaming on and yield text as the provider sends it.

        Closing the generator (``aclose()``) or cancelling its task closes the response,
        so the provider stops generating.

        Raises:
            InferenceError: As ``infer``, plus an error event in the stream, or a stream
                that ended before the answer did (retryable).
            RuntimeError: The worker was closed.
        """
        path, body = self._request(prompt, stream=True)
        client = self._open_client()
        shown = self._shown + path
        state = StreamState()
        decoder = SseDecoder(self._sse_extra_fields)
        logger.debug("%s: POST %s (streaming)", self.name, shown)
        try:
            async with client.stream(
                "POST",
                self._base_url + path,
                json=body,
                headers=self._headers(),
                timeout=self._timeout,
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise self._status_error(response, shown)
                async for chunk in response.aiter_bytes():
                    for event in decoder.feed(chunk):
                        if state.done:  # read to the end anyway, so the connection is reused
                            continue
                        text = self._parse_event(event, state)
                        if text:
                            yield text
                content_type = response.headers.get("content-type", "unknown")
        except httpx.HTTPError as exc:
            if not state.done:  # once the answer is complete, a broken tail loses nothing
                raise self._transport_error(exc, shown) from exc
        except MalformedResponse as exc:
            raise self._error(f"malformed event stream from {shown}: {exc}", status=200) from exc
        if not state.done:
            raise self._error(
                f"the stream from {shown} ended before the answer did "
                f"(content-type {content_type})",
                status=200,
                retryable=True,
            )
        self._record(state.usage)

    # -- lifetime -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the worker's HTTP client (a borrowed one stays open). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_owns_client", False) and not self._closed:
            warnings.warn(
                f"unclosed {self!r}: call `await worker.aclose()` or use `async with worker:`",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    # -- errors ---------------------------------------------------------------------------

    def _open_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        return self._client

    def _record(self, usage: TokenUsage | None) -> None:
        if usage is None:
            return
        self.last_usage = usage
        if usage.prompt_tokens:
            self._prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._completion_tokens.inc(usage.completion_tokens)

    def _error(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> InferenceError:
        """An ``InferenceError`` of this worker, the API key scrubbed from its message."""
        message = f"{self.name}: {message}"
        if self._api_key:  # a provider may echo the key back in its error message
            message = message.replace(self._api_key, "[redacted]")
        logger.debug("%s", message)
        return InferenceError(
            message,
            worker=self.name,
            status_code=status,
            retryable=retryable,
            retry_after=retry_after,
        )

    def _status_error(self, response: httpx.Response, url: str) -> InferenceError:
        status = response.status_code
        retryable = retryable_status(status)
        hint = response.headers.get("x-should-retry")  # OpenAI's and Anthropic's override
        if hint in ("true", "false"):
            retryable = hint == "true"
        message = f"HTTP {status} {response.reason_phrase} from {url}: "
        message += describe_error(response.text)
        if request_id := response.headers.get("request-id", response.headers.get("x-request-id")):
            message += f" [request id {request_id}]"
        retry_after = parse_retry_after(response.headers)
        return self._error(message, status=status, retryable=retryable, retry_after=retry_after)

    def _stream_error(
        self, body: JsonObject, *, status: int | None, retryable: bool
    ) -> InferenceError:
        """An error the provider reported inside a 200 event stream."""
        message = f"error in the event stream: {describe_error(body)}"
        return self._error(message, status=status, retryable=retryable)

    def _transport_error(self, exc: httpx.HTTPError, url: str) -> InferenceError:
        kind = type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            limits = f"connect {self._timeout.connect}s, read {self._timeout.read}s"
            return self._error(f"timed out ({kind}; {limits}) on {url}", retryable=True)
        retryable = isinstance(exc, _RETRYABLE_TRANSPORT)
        return self._error(f"request to {url} failed: {kind}: {exc}", retryable=retryable)


# A connection that broke or never came up may work next time; a bad protocol will not.
_RETRYABLE_TRANSPORT: Final = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)
