"""Scheduler and block manager, without a model: token budgets, chunking, preemption, prefix sharing, no leaks."""
import pytest

from ironlm.engine.block_manager import BlockManager
from ironlm.engine.scheduler import Scheduler
from ironlm.engine.sequence import Sequence, SequenceStatus
from ironlm.sampling import SamplingParams


def make_seq(request_id: str, num_tokens: int, first: int = 0) -> Sequence:
    return Sequence(request_id, list(range(first, first + num_tokens)), SamplingParams(max_tokens=100))


def run_step(scheduler: Scheduler, next_token: int = 7):
    """Schedules, marks tokens computed, and appends a token to sequences whose prompt is done (like the engine)."""
    out = scheduler.schedule()
    scheduler.after_step(out)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
    return out


def assert_no_leaks(bm: BlockManager, scheduler: Scheduler):
    for seq in list(scheduler.running) + list(scheduler.waiting):
        scheduler.finish(seq, "abort")
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_token_budget_and_chunked_prefill():
    bm = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    long_seq = make_seq("long", 25)
    scheduler.add(long_seq)
    chunks = []
    while long_seq.num_computed_tokens < 25:
        out = run_step(scheduler)
        assert sum(n for _, n in out.scheduled) <= 10
        chunks.append(out.num_tokens["long"])
    assert chunks == [10, 10, 5]
    # A newcomer's prompt is chunked while the running sequence keeps decoding every step.
    other = make_seq("other", 30, first=100)
    scheduler.add(other)
    out = run_step(scheduler)
    assert out.num_tokens == {"long": 1, "other": 9}
    out = run_step(scheduler)
    assert out.num_tokens == {"long": 1, "other": 9}
    assert_no_leaks(bm, scheduler)


def test_fifo_admission_and_max_num_seqs():
    bm = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 3, first=10 * i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    out = run_step(scheduler)
    assert list(out.num_tokens) == ["r0", "r1"]
    scheduler.finish(seqs[0], "stop")
    out = run_step(scheduler)
    assert list(out.num_tokens) == ["r1", "r2"]
    assert [s.request_id for s in scheduler.waiting] == ["r3"]
    assert_no_leaks(bm, scheduler)


def test_preemption_by_recompute_and_resume():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq("a", 7), make_seq("b", 7, first=50)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # both prompts: 2 blocks each, and one left for a's next tokens
    assert bm.num_free_blocks == 1
    run_step(scheduler)  # the 8th tokens still fit
    out = run_step(scheduler)  # both need a third block: a takes the last one, b (newest) is preempted
    assert out.num_tokens == {"a": 1}
    assert [s.request_id for s in out.preempted] == ["b"]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and b.num_tokens == 9  # keeps its generated tokens, recomputes it all later
    scheduler.finish(a, "stop")
    out = run_step(scheduler)
    assert out.num_tokens == {"b": 9}
    assert b.status == SequenceStatus.RUNNING
    assert_no_leaks(bm, scheduler)


def test_admission_waits_for_room_for_the_whole_prompt():
    # A prompt starts beside running sequences only if all of it fits, with a block left for each of them to
    # decode into; its first chunk fitting is not enough, or its later chunks would preempt it.
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    a, b = make_seq("a", 10), make_seq("b", 28, first=50)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.add(b)
    out = run_step(scheduler)  # a finishes its prompt (3 blocks); b's 7 blocks and a's 1 do not fit in 7
    assert out.num_tokens == {"a": 2}
    assert [s.request_id for s in scheduler.waiting] == ["b"] and b.block_table == []
    for _ in range(3):
        assert run_step(scheduler).num_tokens == {"a": 1}
    scheduler.finish(a, "stop")
    chunks = [run_step(scheduler).num_tokens for _ in range(4)]
    assert chunks == [{"b": 8}, {"b": 8}, {"b": 8}, {"b": 4}]  # alone, b runs its prompt through unpreempted
    assert b.num_preemptions == 0
    # Once b decodes (8 blocks, 2 free), a newcomer whose prompt fits beside it with b's reserve starts at once.
    c = make_seq("c", 4, first=200)
    scheduler.add(c)
    assert run_step(scheduler).num_tokens == {"b": 1, "c": 4}
    assert_no_leaks(bm, scheduler)


def test_prefix_sharing_reuses_blocks_and_frees_them():
    bm = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    system = list(range(12))
    first = Sequence("first", system + [100, 101], SamplingParams())
    scheduler.add(first)
    run_step(scheduler)
    second = Sequence("second", system + [200], SamplingParams())
    scheduler.add(second)
    out = run_step(scheduler)
    assert out.num_tokens["second"] == 1  # 12 tokens came from the cache, only the last is computed
    assert second.num_cached_tokens == 12
    assert second.block_table[:3] == first.block_table[:3]
    assert all(bm.blocks[b].ref_count == 2 for b in first.block_table[:3])
    assert bm.prefix_hit_rate == pytest.approx(12 / (14 + 13))
    scheduler.finish(first, "stop")
    assert all(bm.blocks[b].ref_count == 1 for b in second.block_table[:3])
    scheduler.finish(second, "stop")
    # Freed blocks keep their contents: the same prefix hits again until the blocks are reused.
    third = Sequence("third", system + [300], SamplingParams())
    assert len(bm.find_prefix(third)) == 3
    assert_no_leaks(bm, scheduler)


def test_whole_prompt_cached_still_computes_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.add(Sequence("a", list(range(8)), SamplingParams()))
    run_step(scheduler)
    again = Sequence("b", list(range(8)), SamplingParams())
    scheduler.add(again)
    out = run_step(scheduler)
    assert out.num_tokens["b"] == 4 and again.num_cached_tokens == 4
    assert_no_leaks(bm, scheduler)


def test_eviction_reuses_cached_free_blocks_and_drops_their_hash():
    bm = BlockManager(num_blocks=3, block_size=2)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    scheduler.add(a)
    run_step(scheduler)
    scheduler.finish(a, "stop")
    assert len(bm.hash_to_block) == 2
    b = Sequence("b", [9, 9, 9, 9, 9], SamplingParams())
    scheduler.add(b)
    run_step(scheduler)
    assert b.num_cached_tokens == 0
    assert len(bm.find_prefix(Sequence("c", [1, 2, 3, 4, 5], SamplingParams()))) == 0
    assert_no_leaks(bm, scheduler)


def test_abort_waiting_and_running():
    bm = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq("a", 5), make_seq("b", 5, first=20)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.finish(b, "abort")  # still waiting
    scheduler.finish(a, "abort")  # running
    assert scheduler.num_unfinished == 0
    assert bm.num_free_blocks == bm.num_blocks


def test_freed_blocks_are_reused_before_untouched_ones():
    # The pool's pages are mapped lazily: reusing freed blocks keeps the memory touched to the peak in use.
    bm = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 8)
    scheduler.add(a)
    run_step(scheduler)
    assert a.block_table == [0, 1]
    scheduler.finish(a, "stop")
    b = make_seq("b", 8, first=50)
    scheduler.add(b)
    run_step(scheduler)
    assert sorted(b.block_table) == [0, 1] and bm.num_free_blocks == 6
    c = make_seq("c", 12, first=100)
    scheduler.add(c)
    run_step(scheduler)
    # None freed: untouched blocks, lowest first (b's next token took block 2 first).
    assert b.block_table[2] == 2 and c.block_table == [3, 4, 5]
    assert_no_leaks(bm, scheduler)
