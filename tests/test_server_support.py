"""Helpers for the server tests: a live uvicorn on a free loopback port, and a fake engine with the
LLMEngine methods (add_request, abort_request, step, has_unfinished, stats) for tests that need no model."""
import socket
import threading
import time

import uvicorn

from ironlm.engine.async_engine import AsyncEngine
from ironlm.engine.output import RequestOutput
from ironlm.errors import RequestError
from ironlm.grammar import GrammarCompiler
from ironlm.sampling import SampleResult
from ironlm.server.app import ServerSettings, create_app


class LiveServer:
    """uvicorn serving `app` in a thread on 127.0.0.1; `stop()` shuts it down and joins the thread."""

    def __init__(self, app, timeout_s: float = 30.0):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(engine, **settings) -> tuple[LiveServer, AsyncEngine]:
    async_engine = AsyncEngine(engine)
    return LiveServer(create_app(async_engine, ServerSettings(**settings))), async_engine


class FakeTokenizer:
    """Characters are tokens: id = byte + 1; id 0 is EOS."""

    vocab_size = 300
    eos_token_ids = frozenset({0})
    bos_token_id = None
    chat_template = "fake"
    template_variables = frozenset({"messages"})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Each step gives every request one letter (a, b, c, ...), so text and token ids are predictable.

    `step_s` makes steps take time; `fail_at_step` makes that step raise, as an engine fault would.
    """

    def __init__(self, step_s: float = 0.002, max_model_len: int = 128, fail_at_step: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.grammar = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size)  # as LLMEngine's; never prepared
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self.requests: dict[str, tuple[list[int], object, list[int]]] = {}
        self.num_steps = 0
        self.num_added = 0
        self.num_aborted = 0
        self.max_num_requests = 0  # most requests held at once

    def add_request(self, request_id, prompt_token_ids, params):
        params.validate(self.tokenizer.vocab_size)
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError("prompt too long", param="messages", code="context_length_exceeded")
        self.requests[request_id] = (list(prompt_token_ids), params, [])
        self.num_added += 1
        self.max_num_requests = max(self.max_num_requests, len(self.requests))

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.num_aborted += 1

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("simulated engine fault")
        time.sleep(self.step_s)
        outputs = []
        for request_id, (prompt, params, generated) in list(self.requests.items()):
            token_id = ord("a") + len(generated) % 26 + 1
            generated.append(token_id)
            finished = len(generated) >= params.max_tokens
            if finished:
                del self.requests[request_id]
            results = [SampleResult(token_id, -0.25, [(token_id, -0.25), (token_id + 1, -2.0)][: params.logprobs])]
            outputs.append(RequestOutput(
                request_id=request_id, new_token_ids=[token_id], new_text=self.tokenizer.decode([token_id]),
                token_ids=list(generated), text=self.tokenizer.decode(generated), finished=finished,
                finish_reason="length" if finished else None, num_prompt_tokens=len(prompt),
                logprobs=results if params.logprobs is not None else []))
        return outputs

    def stats(self) -> dict:
        return {"num_running": len(self.requests), "num_waiting": 0, "kv_usage": len(self.requests) / 100,
                "prefix_cache_hit_rate": 0.5, "num_steps": self.num_steps}


class ScriptedEngine(FakeEngine):
    """Answers every request with `answer` (ASCII), one character (one token) a step, so that markers a stream
    watches for arrive in pieces."""

    def __init__(self, answer: str, tokenizer: FakeTokenizer | None = None, max_model_len: int = 128):
        super().__init__(step_s=0.001, max_model_len=max_model_len)
        self.answer = answer
        self.tokenizer = tokenizer or FakeTokenizer()
        self.grammar = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for request_id, (prompt, params, generated) in list(self.requests.items()):
            generated.append(ord(self.answer[len(generated)]) + 1)
            done = len(generated) == len(self.answer)
            reason = "stop" if done else "length" if len(generated) >= params.max_tokens else None
            if reason:
                del self.requests[request_id]
            outputs.append(RequestOutput(
                request_id=request_id, new_token_ids=generated[-1:], new_text=self.tokenizer.decode(generated[-1:]),
                token_ids=list(generated), text=self.tokenizer.decode(generated), finished=reason is not None,
                finish_reason=reason, num_prompt_tokens=len(prompt)))
        return outputs
