"""The loop that drives an LLMEngine through a long job, keeping it full.

A job is a stream of tasks. A task is a generator: it yields a list of engine requests (prompt token ids,
SamplingParams), receives their Completions in the same order, may yield again (a map-reduce step), and finally
returns the record to write. The runner adds requests as slots free up, so the engine always holds up to
`max_in_flight` of them: new prompts are prefilled in the same steps in which running ones decode, and only
`max_in_flight` tasks' prompts are in memory at once, however many documents the job has.
"""
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from ironlm.errors import IronlmError
from ironlm.jobs.body import Completion
from ironlm.sampling import SamplingParams
from ironlm.server.protocol import APIError

EngineRequest = tuple[list[int], SamplingParams]
TaskGenerator = Generator[list[EngineRequest], list[Completion], dict]

# Errors that fail one item and let the job go on; anything else stops the job.
ITEM_ERRORS = (IronlmError, APIError)


@dataclass
class Task:
    key: str                              # the item's custom_id
    start: Callable[[], TaskGenerator]    # called when the task enters the engine, not before


@dataclass
class RunStats:
    num_done: int = 0
    num_failed: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_in_flight: int = 0
    started: float = field(default_factory=time.monotonic)


class _Running:
    """A task between its yields: its generator and the results of the requests it is waiting for."""

    def __init__(self, task: Task, generator: TaskGenerator):
        self.task = task
        self.generator = generator
        self.results: list[Completion] = []  # per request, built up as its outputs come
        self.remaining = 0
        self.request_ids: set[str] = set()


class JobRunner:
    """Runs tasks on `engine` (an LLMEngine) with at most `max_in_flight` engine requests at once."""

    def __init__(self, engine, max_in_flight: int | None = None):
        self.engine = engine
        if max_in_flight is None:
            num_seqs = engine.config.max_num_seqs
            max_in_flight = num_seqs + num_seqs // 2  # some waiting, so freed slots are refilled at once
        self.max_in_flight = max_in_flight
        self._ids = itertools.count()

    def run(self, tasks: Iterator[Task], on_done: Callable[[str, dict], None],
            on_failed: Callable[[str, BaseException], None],
            on_step: Callable[[RunStats], None] | None = None) -> RunStats:
        """Runs every task; each ends in exactly one on_done(key, record) or on_failed(key, error).

        Item errors (IronlmError, APIError) fail that task only. On any other exception or KeyboardInterrupt
        the engine's requests are aborted and it propagates; finished tasks have been reported already.
        """
        stats = RunStats()
        pending: deque[tuple[_Running, int, EngineRequest]] = deque()
        active: dict[str, tuple[_Running, int]] = {}
        tasks = iter(tasks)
        exhausted = False

        def fail(running: _Running, exc: BaseException) -> None:
            for request_id in running.request_ids:
                if active.pop(request_id, None) is not None:
                    self.engine.abort_request(request_id)
            running.request_ids.clear()
            pending_left = [entry for entry in pending if entry[0] is not running]
            pending.clear()
            pending.extend(pending_left)
            running.generator.close()
            stats.num_failed += 1
            on_failed(running.task.key, exc)

        def advance(running: _Running, sent: list[Completion] | None) -> None:
            """Runs the task to its next yield; queues what it asks for, or reports its end."""
            try:
                requests = next(running.generator) if sent is None else running.generator.send(sent)
            except StopIteration as stop:
                stats.num_done += 1
                on_done(running.task.key, stop.value)
                return
            except ITEM_ERRORS as exc:
                stats.num_failed += 1
                on_failed(running.task.key, exc)
                return
            if not requests:
                raise RuntimeError(f"task {running.task.key!r} yielded no requests")
            running.results = [Completion() for _ in requests]
            running.remaining = len(requests)
            pending.extend((running, i, request) for i, request in enumerate(requests))

        def fill() -> None:
            nonlocal exhausted
            while len(active) < self.max_in_flight:
                if pending:
                    running, index, (prompt, params) = pending.popleft()
                    request_id = f"job-{next(self._ids)}"
                    try:
                        self.engine.add_request(request_id, prompt, params)
                    except ITEM_ERRORS as exc:
                        fail(running, exc)
                        continue
                    active[request_id] = (running, index)
                    running.request_ids.add(request_id)
                    stats.num_prompt_tokens += len(prompt)
                    continue
                if exhausted:
                    return
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    return
                advance(_Running(task, task.start()), None)

        try:
            while True:
                fill()
                stats.num_in_flight = len(active)
                if not active:
                    return stats
                for output in self.engine.step():
                    stats.num_generated_tokens += len(output.new_token_ids)
                    if output.request_id not in active:
                        continue
                    running, index = active[output.request_id]
                    running.results[index].add(output)
                    if not output.finished:
                        continue
                    del active[output.request_id]
                    running.request_ids.discard(output.request_id)
                    running.remaining -= 1
                    if running.remaining == 0:
                        advance(running, running.results)
                if on_step is not None:
                    on_step(stats)
        finally:
            for request_id in active:
                self.engine.abort_request(request_id)
            stats.num_in_flight = 0
            if on_step is not None:
                on_step(stats)
