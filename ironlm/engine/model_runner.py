"""Runs one scheduled step: builds the flat token batch and its attention metadata, runs the model, samples."""
import logging

import torch

from ironlm import kernels
from ironlm.engine.decode_graph import DecodeGraph
from ironlm.engine.sequence import Sequence
from ironlm.layers.attention import AttentionMetadata
from ironlm.layers.module import bind_submodules
from ironlm.models.llama import LlamaForCausalLM
from ironlm.sampling import Sampler, SampleResult, SampleState, SeenTokens


# Decode graphs for up to this many rows (a row per sequence, and one per prompt-lookup draft). Each row count
# gets its own graph and arena; past a few dozen sequences a step's kernels dwarf the Python around them
# (benchmarks/profile_decode.py on the 135M: 16 sequences 1.18x faster with graphs, 64 the same), so more graphs
# would only take memory.
MAX_GRAPH_BATCH = 32
# Rows of prompt logits computed at once when a prompt's logprobs are asked for: (256, 49152) float32 is 50 MB.
PROMPT_LOGITS_ROWS = 256


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: torch.Tensor, kv_scales: torch.Tensor | None,
                 block_size: int, max_model_len: int, enforce_eager: bool = False):
        self.model = model
        bind_submodules(model)  # the model is whole now: its children resolve as plain attributes from here on
        self.block_size = block_size
        self.table_width = -(-max_model_len // block_size)  # blocks of the longest sequence
        # Decode steps replayed from C++, one graph per batch size, captured on first use; None: Python only
        # (asked for, or the model's decode step runs something a graph cannot record).
        self.graphs: dict[int, DecodeGraph] | None = None if enforce_eager else {}
        self.kv_pool = kv_pool
        for index, attn in enumerate(model.attention_layers()):
            scales = (None, None) if kv_scales is None else (kv_scales[index, 0], kv_scales[index, 1])  # int8 pools
            attn.cache = kernels.PagedCache(kv_pool[index, 0], kv_pool[index, 1], *scales)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests only
        self.seen: dict[str, SeenTokens] = {}  # requests with a repetition penalty only
        # requests with prompt_logprobs: one entry per prompt token (None for the first, which nothing predicts)
        self.prompt_logprobs: dict[str, list[SampleResult | None]] = {}

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]],
                drafts: dict[str, int] | None = None) -> dict[str, list[SampleResult]]:
        """Computes the scheduled tokens; returns the tokens sampled for each sequence whose last token was computed:
        one, or for a sequence whose last `drafts[request_id]` tokens are drafts, the drafts the model agrees with
        and the token after them (verify_drafts)."""
        drafts = drafts or {}
        hidden, sampling_rows, sampling_seqs = self._forward(scheduled, drafts)
        self._score_prompts(scheduled, hidden)
        if not sampling_seqs:
            return {}
        rows, states, counts = [], [], []  # a drafted sequence samples at its drafts' rows and after them
        for row, seq in zip(sampling_rows, sampling_seqs):
            num_drafts = drafts.get(seq.request_id, 0)
            outputs = seq.output_token_ids  # ends with the drafts
            rows.extend(range(row - num_drafts, row + 1))
            states.extend(SampleState(seq.params, seq.prompt_token_ids, outputs[:len(outputs) - num_drafts + j],
                                      self._generator(seq), self._seen(seq), drafts=j) for j in range(num_drafts + 1))
            counts.append(num_drafts + 1)
        picked = hidden if len(rows) == hidden.shape[0] else hidden[rows]  # (R, hidden)
        # a seeded, sampled sequence's generator as before the step: it is to advance by the tokens kept, not the rows
        rewind = {seq.request_id: self.generators[seq.request_id].get_state() for seq, count
                  in zip(sampling_seqs, counts) if count > 1 and seq.request_id in self.generators
                  and not seq.params.greedy}
        results = self.sampler(self.model.compute_logits(picked), states, writable=True)  # fresh logits (R, V)
        sampled, start = {}, 0
        for seq, count in zip(sampling_seqs, counts):
            sampled[seq.request_id] = verify_drafts(seq.token_ids[seq.num_tokens - count + 1:],
                                                    results[start:start + count])
            start += count
        for request_id, state in rewind.items():  # so that a seed gives the same answer with drafts or without
            generator = self.generators[request_id]
            generator.set_state(state)
            for _ in sampled[request_id]:
                torch.rand(1, generator=generator, dtype=torch.float64)  # as the sampler draws, a row at a time
        return sampled

    def _score_prompts(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that this step's rows predict, for sequences that asked for them."""
        row = 0  # hidden holds each scheduled sequence's rows in turn, num_new of them
        for seq, num_new in scheduled:
            k = seq.params.prompt_logprobs
            start, first_row = seq.num_computed_tokens, row
            row += num_new
            if k is None or seq.num_output_tokens:  # not asked for, or scored before a preemption
                continue
            scores = self.prompt_logprobs.setdefault(seq.request_id, [None] * seq.num_prompt_tokens)
            end = min(start + num_new, seq.num_prompt_tokens - 1)  # positions whose next token is in the prompt
            for lo in range(start, end, PROMPT_LOGITS_ROWS):  # (rows, V) logits a piece at a time
                hi = min(lo + PROMPT_LOGITS_ROWS, end)
                rows = hidden[first_row + lo - start:first_row + hi - start]  # (hi - lo, hidden)
                logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)  # (hi - lo, V)
                targets = seq.token_ids[lo + 1:hi + 1]
                chosen = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
                top_values, top_ids = logprobs.topk(k) if k else (None, None)  # (hi - lo, k) each
                for i, token_id in enumerate(targets):
                    top = list(zip(top_ids[i].tolist(), top_values[i].tolist())) if k else None
                    scores[lo + 1 + i] = SampleResult(token_id, chosen[i], top)

    def take_prompt_logprobs(self, request_id: str) -> list[SampleResult | None] | None:
        """The prompt's logprobs once its last token is computed; None if not asked for."""
        return self.prompt_logprobs.pop(request_id, None)

    @torch.inference_mode()
    def all_logits(self, seq: Sequence, chunk: int | None = None) -> torch.Tensor:
        """Logits at every position of a sequence whose blocks are allocated and nothing computed: (T, V).
        chunk: tokens per forward pass, each attending to the cached K/V of those before it (1: as decoding)."""
        chunk = chunk or seq.num_tokens
        parts = []
        while seq.num_computed_tokens < seq.num_tokens:
            n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
            hidden, _, _ = self._forward([(seq, n)])
            parts.append(self.model.compute_logits(hidden))
            seq.num_computed_tokens += n
        return torch.cat(parts)

    def _forward(self, scheduled: list[tuple[Sequence, int]],
                 drafts: dict[str, int] | None = None) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        # decodes, each a sequence's next token and any drafts after it, run as graphs of one row per token
        drafts = drafts or {}
        if self.graphs is not None and sum(n for _, n in scheduled) <= MAX_GRAPH_BATCH \
                and all(n == 1 + drafts.get(seq.request_id, 0) for seq, n in scheduled) \
                and all(len(seq.block_table) <= self.table_width for seq, _ in scheduled):
            return self._forward_graph(scheduled)
        input_ids, positions, slots = [], [], []
        query_starts, query_lens, context_lens = [], [], []
        sampling_rows, sampling_seqs = [], []
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            query_starts.append(len(input_ids))
            query_lens.append(num_new)
            context_lens.append(start + num_new)
            input_ids.extend(seq.token_ids[start:start + num_new])
            positions.extend(range(start, start + num_new))
            table = seq.block_table
            slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, start + num_new))
            if start + num_new == seq.num_tokens:
                sampling_rows.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        max_blocks = max(len(seq.block_table) for seq, _ in scheduled)
        block_tables = torch.tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table))
                                     for seq, _ in scheduled], dtype=torch.int32)  # (B, max_blocks)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_starts=query_starts,
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables,
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32),
        )
        hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), meta)  # (T, hidden)
        return hidden, sampling_rows, sampling_seqs

    def _forward_graph(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        """A step of single-token rows, through the graph of its row count (captured by this step if new). A
        sequence with drafts takes a row per token: every row's K/V is written before any row attends, so each
        attends to the tokens before it as a one-token decode would."""
        batch = sum(n for _, n in scheduled)
        graph = self.graphs.get(batch)
        embedding = self.model.embedding()  # (V, hidden)
        fresh = graph is None
        if fresh:
            graph = DecodeGraph(batch, embedding.shape[1], embedding.dtype, self.table_width)
        input_ids, positions, slots, sampling_rows, sampling_seqs = [], [], [], [], []
        for seq, num_new in scheduled:
            table = seq.block_table
            for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
                graph.block_tables_np[len(positions), :len(table)] = table
                input_ids.append(seq.token_ids[position])
                positions.append(position)
                slots.append(table[position // self.block_size] * self.block_size + position % self.block_size)
            if positions[-1] + 1 == seq.num_tokens:
                sampling_rows.append(len(positions) - 1)
                sampling_seqs.append(seq)
        graph.positions_np[:] = positions
        graph.slots_np[:] = slots
        graph.context_lens_np[:] = [p + 1 for p in positions]
        torch.index_select(embedding, 0, torch.tensor(input_ids), out=graph.input)
        if not fresh:
            return graph.replay(), sampling_rows, sampling_seqs
        hidden = graph.capture(self.model.forward_embedded)
        if graph.refusal is None:
            self.graphs[batch] = graph
        else:  # this step ran from Python all the same; so will every later one
            logging.getLogger("ironlm").info("decode steps stay in Python: %s", graph.refusal)
            self.graphs = None
        return hidden, sampling_rows, sampling_seqs

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = torch.Generator().manual_seed(seq.params.seed)
        return self.generators[seq.request_id]

    def _seen(self, seq: Sequence) -> SeenTokens | None:
        if seq.params.repetition_penalty == 1.0:
            return None
        if seq.request_id not in self.seen:
            self.seen[seq.request_id] = SeenTokens(seq.prompt_token_ids)
        return self.seen[seq.request_id]

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.seen.pop(request_id, None)
        self.prompt_logprobs.pop(request_id, None)


def verify_drafts(draft_ids: list[int], results: list[SampleResult]) -> list[SampleResult]:
    """The tokens a step with drafts gives: results[j] was sampled after the drafts before draft_ids[j], so while
    it equals that draft, the draft is what the model chose, and the first that differs (or the one after the last
    draft) is the model's next token. Each token is drawn from the model's own distribution given the tokens
    before it, so greedy answers are unchanged and sampled ones keep their distribution."""
    kept = 0
    while kept < len(draft_ids) and results[kept].token_id == draft_ids[kept]:
        kept += 1
    return results[:kept + 1]
