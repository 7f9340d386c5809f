"""The HTTP API of the gateway (FastAPI): OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``,
plus ``/health`` and ``/metrics``. Every request is served through the coordinator's client protocol
(``workers/gateway_upstream.py``); the wire format is ``workers/gateway_openai.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from models.text import NoChatTemplate, encode_chat, encode_prompt
from protocol.messages import Generate, GenerationDone, HealthReported
from workers.gateway_metrics import GatewayMetrics
from workers.gateway_openai import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    SSE_DONE,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Outcome,
    ResponseShape,
    SamplingBody,
    StopMatcher,
    chat_messages,
    completion_prompt,
    generate_message,
    sse,
)
from workers.gateway_upstream import Generation, Upstream
from workers.gateway_view import CacheFeed, add_view_routes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    """What the HTTP API needs to know of the runtime."""

    model: str
    """The served model's id (``/v1/models``, ``model`` of every response)."""
    api_key: str | None = None
    """Bearer token of every ``/v1`` and ``/metrics`` request (None: none asked for)."""
    created: int = 0
    """Unix time the gateway started (``/v1/models``)."""
    tokenize_threads: int = 1
    """Threads that tokenise prompts (chat template and encode) off the event loop; requests beyond them wait their
    turn. One by default: a fast tokenizer's backend is not safe to call from several threads at once."""


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class Served:
    """One generation request from its body to its response, streamed or whole."""

    def __init__(self, app: GatewayApp, kind: str, body: SamplingBody, msg: Generate, stops: list[str],
                 prompt_tokens: int) -> None:
        self.app = app
        self.endpoint = f"/v1/{'completions' if kind == 'completion' else 'chat/completions'}"
        self.shape = ResponseShape("completion" if kind == "completion" else "chat", app.settings.model)
        self.body = body
        self.msg = msg
        self.matcher = StopMatcher(stops)
        self.outcome = Outcome(prompt_tokens=prompt_tokens)
        self.hidden = set(msg.stop_ids or []) | app.special_ids
        """Ids whose text is not part of the answer (stop ids, the end-of-sequence and other special tokens)."""

    async def texts(self, gen: Generation) -> AsyncIterator[str]:
        """The answer's text as it comes; ends at the request's end or at a stop string (the request is then
        left unfinished, and so cancelled)."""
        while True:
            event = await gen.next()
            if event is None:
                continue
            if isinstance(event, GenerationDone):
                self.outcome.token_ids = list(event.token_ids)
                self.outcome.finish_reason = event.finish_reason
                self.outcome.metrics = dict(event.metrics)
                tail = self.matcher.flush()
                self.outcome.text += tail
                if tail:
                    yield tail
                return
            self.outcome.token_ids.append(event.token_id)
            text, hit = self.matcher.push("" if event.token_id in self.hidden else event.text)
            self.outcome.text += text
            if text:
                yield text
            if hit:
                self.outcome.finish_reason = "stop"
                return

    async def whole(self, request: Request) -> Response:
        async def run() -> None:
            async with self.app.upstream.generation(self.msg) as gen:
                async for _ in self.texts(gen):
                    pass

        try:
            await until_disconnect(request, run())
        except ApiError as exc:
            self.app.metrics.observe(self.endpoint, exc.status)
            raise
        self.app.metrics.observe(self.endpoint, 200, self.outcome.metrics)
        return JSONResponse(self.shape.whole(self.outcome))

    async def stream(self) -> Response:
        """Server-sent events; refusals (busy, bad input, draining) are still plain errors with their status,
        since the request is accepted by the coordinator before the first byte of the stream."""
        gen = self.app.upstream.generation(self.msg)
        try:
            await gen.__aenter__()
            await gen.accept()
        except BaseException as exc:
            await gen.__aexit__(type(exc), exc, None)
            if isinstance(exc, ApiError):
                self.app.metrics.observe(self.endpoint, exc.status)
            raise
        return StreamingResponse(self._events(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, gen: Generation) -> AsyncIterator[str]:
        shape, status = self.shape, 200
        try:
            if shape.kind == "chat":
                yield sse(shape.chunk("", first=True))
            async for text in self.texts(gen):
                yield sse(shape.chunk(text))
            yield sse(shape.chunk(None, finish_reason=self.outcome.finish_reason, extra=self.outcome.extra()))
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield sse(shape.usage_chunk(self.outcome))
        except ApiError as exc:  # after the stream began (a deadline, a dead worker): said in the stream
            status = exc.status
            yield sse(exc.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            await gen.__aexit__(None, None, None)  # unfinished (client gone, stop string): cancelled
            self.app.metrics.observe(self.endpoint, status, self.outcome.metrics)
        yield SSE_DONE


async def until_disconnect(request: Request, work: Any) -> None:
    """Run ``work``; if the HTTP client disconnects first, cancel it (its generation is then cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            log.info("client disconnected: request cancelled")
            await asyncio.wait({task})  # cancel() only asks: the task is done once its cancellation has run
    if task.cancelled():
        raise ApiError("cancelled", "the client disconnected", status=499)
    task.result()


class GatewayApp:
    """The FastAPI application and what its handlers share (no module-level state)."""

    def __init__(self, settings: GatewaySettings, upstream: Upstream, tokenizer: Any | None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.tokenizer = tokenizer
        self.special_ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
        self.tokenizing = ThreadPoolExecutor(settings.tokenize_threads, thread_name_prefix="promoe-tokenize")
        """Where tokenisation runs: it is CPU work (a long prompt, a chat template) that would stall every stream."""
        self.feed = CacheFeed(upstream)
        self.metrics = GatewayMetrics()
        self.metrics.track("promoe_http_requests_in_flight", "Generate requests holding a connection to the "
                           "coordinator (bounded by --http-max-inflight)", lambda: upstream.generations)
        self.metrics.track("promoe_http_cache_view_subscribers", "Browsers watching the cache view (GET "
                           "/v1/cache/events)", lambda: len(self.feed.subscribers))
        self.api = FastAPI(title="promoe", docs_url=None, redoc_url=None, openapi_url=None)
        self._routes()
        add_view_routes(self.api, self.feed)

    def authorise(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError("invalid_api_key", "a valid API key is needed (Authorization: Bearer KEY)", status=401)

    def close(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, work: Callable[[], list[int]]) -> list[int]:
        """``work()`` (tokenisation) on the tokenising threads; its exception is raised here."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work)

    async def prompt_ids(self, prompt: str) -> list[int] | None:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        return await self.off_loop(lambda: encode_prompt(tokenizer, prompt, chat=False))

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation in the chat template; ``ApiError`` (400) where there is none or it refuses them."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ApiError("no_tokenizer", "this checkpoint has no tokenizer: use /v1/completions with token ids")
        try:
            return await self.off_loop(lambda: encode_chat(tokenizer, messages))
        except NoChatTemplate as exc:
            raise ApiError("no_chat_template", str(exc)) from None
        except (TemplateError, ValueError, TypeError) as exc:  # the template refused these messages
            raise ApiError("bad_request", f"the chat template refused the messages: {exc}",
                           param="messages") from None

    def _routes(self) -> None:
        api = self.api
        guarded = ("/v1/", "/metrics")

        @api.middleware("http")
        async def require_key(request: Request, call_next: Any) -> Response:
            """The key is checked before anything reads the body: a client without it is refused at once (401),
            whatever it sends."""
            if request.url.path.startswith(guarded):
                try:
                    self.authorise(request)
                except ApiError as exc:
                    return error_response(exc)
            response: Response = await call_next(request)
            return response

        @api.exception_handler(ApiError)
        async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
            return error_response(exc)

        @api.exception_handler(RequestValidationError)
        async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            errors = exc.errors()
            where = ".".join(str(p) for p in errors[0]["loc"][1:] if isinstance(p, str)) if errors else None
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
            return error_response(ApiError("bad_request", message or "invalid request body", param=where or None))

        @api.exception_handler(HTTPException)
        async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
            code = "not_found" if exc.status_code == 404 else "bad_request"
            return error_response(ApiError(code, str(exc.detail), status=exc.status_code))

        @api.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            prompt = completion_prompt(body)
            text = prompt if isinstance(prompt, str) else None
            ids = await self.prompt_ids(prompt) if isinstance(prompt, str) else prompt
            msg, stops = generate_message(body, ids, text if ids is None else None, body.max_tokens,
                                          DEFAULT_MAX_TOKENS)
            served = Served(self, "completion", body, msg, stops, len(ids) if ids is not None else 0)
            return await (served.stream() if body.stream else served.whole(request))

        @api.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request) -> Response:
            ids = await self.chat_ids(chat_messages(body))
            max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
            msg, stops = generate_message(body, ids, None, max_tokens, DEFAULT_CHAT_MAX_TOKENS)
            served = Served(self, "chat", body, msg, stops, len(ids))
            return await (served.stream() if body.stream else served.whole(request))

        @api.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.settings.model, "object": "model",
                                                "created": self.settings.created, "owned_by": "promoe"}]}

        @api.get("/health")
        async def health() -> JSONResponse:
            try:
                report: HealthReported | None = await self.upstream.health()
            except ApiError:
                report = None
            if report is None:
                return JSONResponse({"status": "unavailable", "coordinator": False}, status_code=503)
            ok = all(report.workers.values()) and not report.draining
            return JSONResponse({"status": "ok" if ok else ("draining" if report.draining else "degraded"),
                                 "coordinator": True, "workers": report.workers, "queued": report.queued,
                                 "running": report.running, "restarts": report.restarts,
                                 "draining": report.draining}, status_code=200 if ok else 503)

        @api.get("/metrics")
        async def metrics() -> Response:
            totals, health = await asyncio.gather(self.upstream.stats(), self.upstream.health(),
                                                  return_exceptions=True)
            text = self.metrics.render(None if isinstance(totals, BaseException) else totals,
                                       None if isinstance(health, BaseException) else health)
            return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
