"""The OpenAI-compatible HTTP app: routes, limits, and the bridge from HTTP requests to the async engine."""
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ironlm import reasoning
from ironlm.engine.async_engine import AsyncEngine, EngineDeadError
from ironlm.errors import IronlmError, RequestError
from ironlm.sampling import SamplingParams
from ironlm.server import protocol
from ironlm.server.limits import Guard, Slots, to_json
from ironlm.server.metrics import ServerMetrics
from ironlm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from ironlm.server.translate import (TokenTexts, compile_grammar, count_request_tokens, detokenize_request,
                                     echo_texts, grammar_source, request_sampling_params, request_thinking,
                                     request_tools, tokenize_request)
from ironlm.tool_stream import CallStream
from ironlm.tools import ToolSet

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Limits and identity of one server."""

    api_key: str | None = None          # None: no authentication
    max_concurrent: int = 64            # HTTP generation requests admitted to the engine at once
    max_queue: int = 256                # more requests wait for a slot; past that, 429
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1
    grammar_timeout_s: float = 10.0     # response_format schema compile budget
    served_model_name: str | None = None  # None: the engine's model name

    def validate(self) -> None:
        for name in ("max_concurrent", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise IronlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise IronlmError(f"max_queue must be at least 0, got {self.max_queue}")


def _sse(obj) -> bytes:
    return b"data: " + to_json(obj) + b"\n\n"


class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, awaitable):
    """Awaits `awaitable` unless the client disconnects first; then cancels it and raises _ClientGone."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise _ClientGone


class _EventStream(StreamingResponse):
    """SSE response whose cleanup runs however it ends, even if the body never started."""

    def __init__(self, content, cleanup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class _Job:
    """One HTTP generation request: its choices in the engine, their shared output queue, and its slot."""

    def __init__(self, server: "_Server", kind: str, include_usage: bool):
        self.server = server
        self.kind = kind  # "chat" | "completion"
        self.include_usage = include_usage
        self.arrival = time.monotonic()
        self.response_id = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = protocol.now()
        self.prompts: list[list[int]] = []
        self.tools: ToolSet | None = None  # the tools a chat request offers, whose calls are read from answers
        self.thinking: bool | None = None  # a reasoning model's chat: whether the answer starts inside its thinking
        self.n = 1  # choices per prompt
        self.echo_texts: list[str] | None = None  # per prompt, when a completion repeats its prompt (echo)
        self.echoed: list[bool] = []  # per choice: its prompt went out already
        self.request_ids: list[str] = []
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.holds_slot = False
        self.closed = False
        # per choice
        self.last_time: list[float | None] = []
        self.num_tokens: list[int] = []
        self.num_cached: list[int] = []  # prompt tokens found in the prefix cache
        self.text_len: list[int] = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.jobs.discard(self)
        for request_id in self.request_ids:
            self.server.engine.abort(request_id)
        if self.holds_slot:
            self.server.slots.release()

    def observe(self, choice: int, output) -> None:
        now = time.monotonic()
        metrics = self.server.metrics
        last = self.last_time[choice]
        num_new = len(output.new_token_ids)
        if num_new:
            if last is None:
                metrics.ttft.observe(now - self.arrival)
            else:
                metrics.inter_token.observe((now - last) / num_new)
            self.last_time[choice] = now
        self.num_tokens[choice] += num_new
        self.num_cached[choice] = output.num_cached_tokens
        metrics.generation_tokens.inc(num_new)
        if output.finished:
            metrics.latency.observe(now - self.arrival)

    def echo(self, choice: int, output, token_texts: TokenTexts, want_logprobs: bool) -> tuple[str, list]:
        """The prompt text, and its logprob entries, that an echoing completion puts before a choice's first text;
        nothing for later outputs or without echo."""
        if self.echo_texts is None or self.echoed[choice]:
            return "", []
        self.echoed[choice] = True
        prompt = choice // self.n
        entries = token_texts.prompt_entries(self.prompts[prompt], output.prompt_logprobs) if want_logprobs else []
        return self.echo_texts[prompt], entries

    def usage(self) -> dict:
        # a prompt counts once, however many choices it has: so do its cached tokens (its first choice's)
        return protocol.usage(sum(len(p) for p in self.prompts), sum(self.num_tokens), sum(self.num_cached[::self.n]))


class _Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.vocab_size: int = engine.tokenizer.vocab_size
        self.model_name = settings.served_model_name or engine.model_name
        self.slots = Slots(settings.max_concurrent, settings.max_queue, settings.retry_after_s)
        self.grammar = engine.grammar
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts
        self.jobs: set[_Job] = set()  # open generation requests, to end them if a drain runs out of time
        self.metrics = ServerMetrics(engine.stats, lambda: {
            "num_queued": self.slots.num_queued, "num_active": self.slots.num_active, "alive": engine.is_alive})
        self.token_texts = TokenTexts(engine.tokenizer)

    # --- checks --------------------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in (self.model_name, "default"):
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                           f"(alias 'default')", "invalid_request_error", "model", "model_not_found")

    def check_serving(self) -> None:
        if self.draining:
            raise APIError(503, "The server is shutting down", "server_error", None, "shutting_down",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if not self.engine.is_alive:
            raise APIError(503, "The engine is not running; see the server log", "server_error", None,
                           "engine_dead")

    def drain(self, timeout_s: float) -> None:
        """Refuses new work now; ends whatever is still open after `timeout_s` with a 503 (or an error event).
        Callable from any thread."""
        self.draining = True

        def expire():
            error = APIError(503, "The server shut down before this request finished", "server_error", None,
                             "shutting_down")
            for job in list(self.jobs):
                job.outputs.put_nowait(error)

        self.loop.call_soon_threadsafe(self.loop.call_later, timeout_s, expire)

    # --- preparing a job -----------------------------------------------------------------------------------

    def tokenize(self, req, tools: ToolSet | None) -> list[list[int]]:
        """Prompt token ids, one list per prompt; runs in a worker thread."""
        return tokenize_request(self.tokenizer, req, tools)

    def sampling_params(self, req, prompt_len: int, choice: int) -> SamplingParams:
        return request_sampling_params(req, prompt_len, choice, self.engine.max_model_len, self.vocab_size)

    async def prepare(self, job: _Job, req) -> None:
        """Takes a slot, tokenizes, compiles the grammar and admits every choice to the engine."""
        await self.slots.acquire()
        job.holds_slot = True
        job.tools = request_tools(self.tokenizer, req)
        job.prompts = await asyncio.to_thread(self.tokenize, req, job.tools)
        job.echo_texts = echo_texts(self.tokenizer, req)
        job.thinking = request_thinking(self.tokenizer, req, job.prompts)
        job.n = req.n
        num_choices = len(job.prompts) * req.n
        job.echoed = [False] * num_choices
        params = [self.sampling_params(req, len(job.prompts[i // req.n]), i % req.n) for i in range(num_choices)]
        source = grammar_source(req, job.tools)
        if source is not None:
            if self.grammar.available():
                await asyncio.to_thread(self.grammar.prepare)
            try:
                processors = await asyncio.wait_for(
                    asyncio.to_thread(compile_grammar, self.grammar, source, num_choices, job.tools),
                    self.settings.grammar_timeout_s)
            except TimeoutError:
                param = "tools" if source[0] == "lark" else "response_format"
                raise bad_request(f"the JSON schema did not compile within {self.settings.grammar_timeout_s} s; "
                                  f"simplify it", param=param) from None
            for p, processor in zip(params, processors):
                p.logits_processor = processor
        job.last_time = [None] * num_choices
        job.num_tokens = [0] * num_choices
        job.num_cached = [0] * num_choices
        job.text_len = [0] * num_choices
        job.request_ids = [f"{job.response_id}-{i}" for i in range(num_choices)]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        results = await asyncio.gather(*[
            self.engine.add_request(job.request_ids[i], job.prompts[i // req.n], params[i], job.outputs)
            for i in range(num_choices)], return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # --- results -------------------------------------------------------------------------------------------

    def choice_logprobs(self, job: _Job, choice: int, output, want: bool, echoed: list):
        if not want:
            return None
        entries = echoed + self.token_texts.entries(output.logprobs)
        if job.kind == "chat":
            return protocol.chat_logprobs(entries)
        return protocol.completion_logprobs(entries, job.text_len[choice])

    async def collect(self, job: _Job, want_logprobs: bool) -> dict:
        num_choices = len(job.request_ids)
        index = {rid: i for i, rid in enumerate(job.request_ids)}
        texts = [[] for _ in range(num_choices)]
        entries = [[] for _ in range(num_choices)]
        finish = [None] * num_choices
        remaining = num_choices
        while remaining:
            output = await job.outputs.get()
            if isinstance(output, BaseException):
                raise output
            i = index[output.request_id]
            job.observe(i, output)
            echoed_text, echoed = job.echo(i, output, self.token_texts, want_logprobs)
            texts[i].append(echoed_text + output.new_text)
            if want_logprobs:
                entries[i] += echoed + self.token_texts.entries(output.logprobs)
            if output.finished:
                finish[i] = output.finish_reason
                remaining -= 1
        choices = []
        for i in range(num_choices):
            text = "".join(texts[i])
            if job.kind == "chat":
                message, finish_reason = protocol.chat_message(text, finish[i], job.tools, job.thinking)
                choices.append({"index": i, "message": message,
                                "logprobs": protocol.chat_logprobs(entries[i]) if want_logprobs else None,
                                "finish_reason": finish_reason})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish[i],
                                "logprobs": protocol.completion_logprobs(entries[i]) if want_logprobs else None})
        return {"id": job.response_id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.model_name, "system_fingerprint": None,
                "choices": choices, "usage": job.usage()}

    async def stream(self, job: _Job, want_logprobs: bool):
        chunk = protocol.chat_chunk if job.kind == "chat" else protocol.completion_chunk
        num_choices = len(job.request_ids)
        index = {rid: i for i, rid in enumerate(job.request_ids)}

        def event(choices: list[dict]) -> bytes:
            return _sse(chunk(job.response_id, job.created, self.model_name, choices, job.include_usage))

        # with tools, text that may be a call is held back and calls go out as tool_calls deltas; a reasoning
        # model's thinking goes out as reasoning_content, its answer as content
        calls = [CallStream(job.tools) for _ in range(num_choices)] if job.tools else None
        thoughts = [reasoning.Stream(job.thinking) for _ in range(num_choices)] if job.thinking is not None else None

        try:
            if job.kind == "chat":
                for i in range(num_choices):
                    yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            remaining = num_choices
            while remaining:
                output = await job.outputs.get()
                if isinstance(output, BaseException):
                    raise output
                i = index[output.request_id]
                job.observe(i, output)
                echoed_text, echoed = job.echo(i, output, self.token_texts, want_logprobs)
                thought, new_text = thoughts[i].feed(output.new_text) if thoughts else ("", output.new_text)
                text, deltas = calls[i].feed(new_text) if calls else (echoed_text + new_text, [])
                if text or thought or (want_logprobs and (output.logprobs or echoed)):
                    logprobs = self.choice_logprobs(job, i, output, want_logprobs, echoed)
                    job.text_len[i] += len(echoed_text) + len(output.new_text)
                    if job.kind == "chat":
                        yield event([{"index": i, "delta": protocol.chat_delta(thought, text), "logprobs": logprobs,
                                      "finish_reason": None}])
                    else:
                        yield event([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": None}])
                if deltas:
                    yield event([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                  "finish_reason": None}])
                if output.finished:
                    remaining -= 1
                    thought, rest = thoughts[i].finish() if thoughts else ("", "")  # what each held back
                    rest, deltas, called = calls[i].finish(rest) if calls else (rest, [], False)
                    finish_reason = job.tools.finish_reason(output.finish_reason, called) if calls else \
                        output.finish_reason
                    if thought or rest:
                        yield event([{"index": i, "delta": protocol.chat_delta(thought, rest), "logprobs": None,
                                      "finish_reason": None}])
                    if deltas:
                        yield event([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                      "finish_reason": None}])
                    if job.kind == "chat":
                        yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
                    else:
                        yield event([{"index": i, "text": "", "logprobs": None,
                                      "finish_reason": output.finish_reason}])
            if job.include_usage:
                final = chunk(job.response_id, job.created, self.model_name, [], False)
                final["usage"] = job.usage()
                yield _sse(final)
        except Exception as exc:  # mid-stream: an error event, then [DONE]
            yield _sse(_api_error(exc).body())
        finally:
            job.close()
        yield b"data: [DONE]\n\n"

    # --- the two generation endpoints --------------------------------------------------------------------

    async def generate(self, request: Request, kind: str) -> Response:
        model = ChatCompletionRequest if kind == "chat" else CompletionRequest
        req = protocol.parse_request(model, await request.body())
        self.check_model(req.model)
        self.check_serving()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        want_logprobs = (req.logprobs if kind == "chat" else req.logprobs is not None)
        job = _Job(self, kind, include_usage)
        self.jobs.add(job)
        handed_off = False
        try:
            await _until_disconnect(request, self.prepare(job, req))
            if req.stream:
                handed_off = True
                return _EventStream(self.stream(job, want_logprobs), job.close)
            result = await _until_disconnect(request, self.collect(job, want_logprobs))
            return Response(to_json(result), media_type="application/json")
        except _ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            raise _api_error(exc) from None
        finally:
            if not handed_off:
                job.close()


def _api_error(exc: BaseException) -> APIError:
    """Any failure as the APIError a client should see; unexpected ones are logged, never shown."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return bad_request(str(exc), exc.param, exc.code)
    if isinstance(exc, IronlmError):
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "server_error", None, "engine_dead")
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError(500, "Internal server error; see the server log", "server_error", None, "internal_error")


def _error_response(error: APIError) -> Response:
    return Response(to_json(error.body()), status_code=error.status, media_type="application/json",
                    headers=error.headers)


def create_app(async_engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `async_engine`; starting the app starts the engine thread, stopping it stops it."""
    settings = settings or ServerSettings()
    settings.validate()
    server = _Server(async_engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop = asyncio.get_running_loop()
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="ironlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error_response(bad_request(f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code))

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):
        return _error_response(_api_error(exc))

    @app.get("/health")
    async def health():
        if not async_engine.is_alive:
            return _error_response(APIError(503, "The engine is not running", "server_error", None, "engine_dead"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(name) for name in (server.model_name, "default")]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return _model_card(model)

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = protocol.parse_request(protocol.TokenizeRequest, await request.body())
        if req.model is not None:
            server.check_model(req.model)
        try:
            tokens = await asyncio.to_thread(count_request_tokens, server.tokenizer, req)
        except Exception as exc:
            raise _api_error(exc) from None
        return {"count": len(tokens), "max_model_len": async_engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = protocol.parse_request(protocol.DetokenizeRequest, await request.body())
        if req.model is not None:
            server.check_model(req.model)
        return {"prompt": detokenize_request(server.tokenizer, req)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, "completion")

    app.add_middleware(Guard, settings=settings, metrics=server.metrics)
    return app


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ironlm"}
