"""KV block allocation with reference counts and prefix caching by block hash. Pure Python, integers only."""
from collections import OrderedDict
from dataclasses import dataclass

from ironlm.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None              # set once the block is full and computed
    token_ids: tuple[int, ...] = ()      # kept to rule out hash collisions on a hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Freed blocks in least-recently-freed order; a freed block may still hold a reusable cached prefix.
        self.free_ids: OrderedDict[int, None] = OrderedDict()
        # Blocks never handed out, taken only when no freed block is left: the pool's pages are mapped lazily, so
        # the memory it takes follows the peak of blocks in use, not its size. (Cycling through the whole pool
        # would keep more prefixes cached, but a server's memory would creep up to the pool's bound at any load.)
        self.fresh_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: ascending
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0     # of those, how many were found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.fresh_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Gives the sequence enough blocks to hold num_new_tokens more tokens."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def find_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the start of the sequence. The last token is never matched: it must be computed
        to produce logits. A prompt whose logprobs are asked for is computed whole, since each of its tokens needs
        the logits before it."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits, parent = [], None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start:start + self.block_size])
            block_hash = hash((parent, tokens))
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = block_hash
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether the prefix hits plus num_new_tokens beyond them fit in free blocks, leaving `reserve` free."""
        num_cached = len(hits) * self.block_size
        total = -(-(num_cached + num_new_tokens) // self.block_size)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits that sit in the free list
        return total - len(hits) + reserve <= self.num_free_blocks - reclaimed

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Attaches the prefix hits to a sequence that has no blocks yet."""
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += seq.num_cached_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Makes the sequence's full, computed blocks findable by later prompts with the same prefix."""
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            block_hash = hash((parent, tokens))
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.token_ids = block_hash, tokens
                self.hash_to_block.setdefault(block_hash, block.block_id)
            seq.block_hashes.append(block_hash)

    def free(self, seq: Sequence) -> None:
        # Release the tail first so that, once evicted, prefixes go last (they are the most shareable).
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take_free(self) -> int:
        if not self.free_ids:
            block_id = self.fresh_ids.pop()
            self.blocks[block_id].ref_count = 1
            return block_id
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
