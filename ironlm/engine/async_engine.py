"""Runs an LLMEngine in its own thread and streams its outputs to asyncio tasks.

The engine is touched only by its thread. The event loop sends it commands (add, abort) through a thread-safe
inbox, and the thread hands each step's outputs back in one `loop.call_soon_threadsafe` call, so neither side
ever waits on the other: HTTP handling and tokenization go on while a step runs, and a step never waits for them.
"""
import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from ironlm.errors import IronlmError
from ironlm.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (a fault or shutdown); no request can be served."""


class AsyncEngine:
    """An asyncio front for an `LLMEngine` (or anything with its methods) stepping in a background thread.

    Call `start()` from the event loop that will use it, then `generate()` (or `add_request` + `abort`).
    `tokenizer`, `model_name` and `max_model_len` are the engine's own.
    """

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.grammar = engine.grammar  # JSON-schema grammars, shared by whatever serves this engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", id, prompt, params, future) | ("abort", id)
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}  # loop side: live request id -> where its outputs go
        self._error: BaseException | None = None
        self._stats: dict = engine.stats()  # before any step: the empty engine's, so /metrics is whole from the start

    # --- lifecycle (event loop side) ---------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread; outputs are delivered on the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ironlm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stops the thread after its current step; requests still open get EngineDeadError."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._error is None
                and not self._stopping.is_set())

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def num_requests(self) -> int:
        """Requests added and not yet finished or aborted, as seen from the event loop."""
        return len(self._queues)

    def stats(self) -> dict:
        """The engine's stats() as of its last step (num_running, num_waiting, kv_usage, ...)."""
        return dict(self._stats)

    # --- requests (event loop side) ------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          outputs: asyncio.Queue) -> None:
        """Queues a request and waits until the engine accepted it (within one step).

        Its RequestOutputs, then nothing more once one is `finished`, are put on `outputs`; an EngineDeadError
        is put there instead if the engine dies. Raises the engine's RequestError (e.g. code
        context_length_exceeded) or EngineDeadError. Cancelling the wait aborts the request.
        """
        self._check_alive()
        if request_id in self._queues:
            raise IronlmError(f"request id {request_id!r} is already in use")
        accepted = self._loop.create_future()
        self._queues[request_id] = outputs
        self._inbox.put(("add", request_id, prompt_token_ids, params, accepted))
        self._wakeup.set()
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._queues.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        """Stops a request (no-op once finished); the engine frees it before its next step."""
        if self._queues.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))
            self._wakeup.set()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator:
        """Yields the request's RequestOutput deltas until one is finished; closing early aborts it."""
        outputs: asyncio.Queue = asyncio.Queue()
        await self.add_request(request_id, prompt_token_ids, params, outputs)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.abort(request_id)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine has stopped after an internal error ({type(self._error).__name__})")
        if self._thread is None or self._stopping.is_set() or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")

    # --- delivery (event loop side, called from the thread via call_soon_threadsafe) -----------------------

    def _deliver(self, outputs: list, stats: dict) -> None:
        self._stats = stats
        for output in outputs:
            target = self._queues.get(output.request_id)
            if target is None:
                continue  # aborted meanwhile
            if output.finished:
                del self._queues[output.request_id]
            target.put_nowait(output)

    def _settle(self, future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        for target in self._queues.values():
            target.put_nowait(error)
        self._queues.clear()
        # adds the thread never saw
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._settle(command[4], error)

    def _on_death(self) -> None:
        self._fail_all(EngineDeadError(
            f"the engine stopped after an internal error ({type(self._error).__name__}); see the server log"))

    # --- the engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        live: set[str] = set()  # ids the engine holds: abort only those
        try:
            while not self._stopping.is_set():
                self._wakeup.clear()
                if self._apply_commands(live):
                    self._post(self._deliver, [], self.engine.stats())
                if not self.engine.has_unfinished():
                    self._wakeup.wait()
                    continue
                outputs = self.engine.step()
                for output in outputs:
                    if output.finished:
                        live.discard(output.request_id)
                self._post(self._deliver, outputs, self.engine.stats())
            for request_id in live:  # stopped: leave the engine empty for whoever uses it next
                self.engine.abort_request(request_id)
        except BaseException as exc:  # a fault in the engine: report it to every open request
            logger.exception("engine thread failed")
            self._error = exc
            self._post(self._on_death)

    def _apply_commands(self, live: set[str]) -> bool:
        changed = False
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if command[0] == "abort":
                if command[1] in live:
                    live.discard(command[1])
                    self.engine.abort_request(command[1])
                continue
            _, request_id, prompt_token_ids, params, accepted = command
            try:
                self.engine.add_request(request_id, prompt_token_ids, params)
            except IronlmError as exc:
                self._post(self._settle, accepted, exc)
                continue
            live.add(request_id)
            self._post(self._settle, accepted, None)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self._stopping.set()
