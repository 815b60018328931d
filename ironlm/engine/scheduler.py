"""Decides each step's work: {sequence: number of tokens}. Pure Python; prefill, chunked prefill, decode and
prefix hits are all just token counts."""
from collections import deque
from dataclasses import dataclass, field

from ironlm.engine.block_manager import BlockManager
from ironlm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> dict[str, int]:
        return {seq.request_id: n for seq, n in self.scheduled}

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the newest is preempted first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Running sequences first (decodes and unfinished prompt chunks), oldest first.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running.pop()  # the newest arrival gives way (recomputed later)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self.block_manager.append_slots(seq, num_new)
            out.scheduled.append((seq, num_new))
            budget -= num_new
            index += 1
        # Then admit waiting sequences in arrival order; never jump the queue, and not while memory is short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            hits = self.block_manager.find_prefix(seq)
            uncached = seq.num_tokens - len(hits) * self.block_manager.block_size
            num_new = min(uncached, budget)
            # Beside running sequences, only a prompt that can be finished: all of it must fit, with a block left
            # for each of them to decode into. (Their own prompts are done: one still in its prompt takes the whole
            # budget, and nothing is admitted in that step.) Started on its first chunk alone, a long prompt's later
            # chunks, or the decodes beside it, soon ran out of blocks and preempted it, and it was recomputed from
            # the start (BENCHMARKS.md, session 18). Alone, its first chunk is enough: it always fits in time.
            need = (uncached, len(self.running)) if self.running else (num_new, 0)
            if not self.block_manager.can_admit(seq, hits, *need):
                break
            self.waiting.popleft()
            self.block_manager.admit(seq, hits)
            self.block_manager.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return out

    def after_step(self, out: SchedulerOutput) -> None:
        """Records that the scheduled tokens are now in the KV cache."""
        for seq, num_new in out.scheduled:
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
