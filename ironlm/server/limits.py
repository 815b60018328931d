"""Request limits applied before any handler runs: API key, capacity, body size; and the slot queue."""
import asyncio
import hmac
import json

from ironlm.server.metrics import ServerMetrics
from ironlm.server.protocol import APIError

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics")


def to_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_error(send, error: APIError) -> None:
    body = to_json(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def capacity_error(retry_after_s: int) -> APIError:
    return APIError(429, "The server is at capacity; retry shortly", "rate_limit_error", None,
                    "rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)})


class Guard:
    """ASGI middleware run before routing: API key, capacity (before any body is read, so memory stays bounded),
    body size (read from the stream, so chunked bodies count too), and the request counter by status."""

    def __init__(self, app, settings, metrics: ServerMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.num_generating = 0  # generation requests anywhere past this point

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status_seen = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status_seen[0] if status_seen else 499)).inc()

    async def _guarded(self, scope, receive, send):
        generating = scope["path"] in GENERATION_PATHS and scope["method"] == "POST"
        if generating:
            if self.num_generating >= self.settings.max_concurrent + self.settings.max_queue:
                return await send_error(send, capacity_error(self.settings.retry_after_s))
            self.num_generating += 1
        try:
            await self._checked(scope, receive, send)
        finally:
            if generating:
                self.num_generating -= 1

    async def _checked(self, scope, receive, send):
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode())):
                return await send_error(send, APIError(
                    401, "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'",
                    "invalid_request_error", None, "invalid_api_key"))
        if scope["path"] == "/v1/files" and scope["method"] == "POST":
            # Batch uploads stream to disk under their own, larger limit (enforced by the upload parser).
            return await self.app(scope, receive, send)
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"Request body is larger than {limit} bytes", "invalid_request_error",
                             None, "request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await send_error(send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_error(send, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)


class Slots:
    """At most `max_active` requests in the engine; up to `max_queued` more wait; past that, 429 at once."""

    def __init__(self, max_active: int, max_queued: int, retry_after_s: int):
        self.max_active = max_active
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.num_active = 0
        self.num_queued = 0
        self._free = asyncio.Semaphore(max_active)

    async def acquire(self) -> None:
        if self._free.locked() and self.num_queued >= self.max_queued:
            raise capacity_error(self.retry_after_s)
        self.num_queued += 1
        try:
            await self._free.acquire()
        finally:
            self.num_queued -= 1
        self.num_active += 1

    def release(self) -> None:
        self.num_active -= 1
        self._free.release()
